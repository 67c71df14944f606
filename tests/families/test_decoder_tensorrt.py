"""The TensorRT path of KV-cache decoder builds, checked here without TensorRT: the graph the
tensorrt target emits stays at the exported opset (no ONNX Runtime rewrites), uses only ops
onnx-tensorrt 10.x parses, has a known rank everywhere (TensorRT networks are static-rank),
and the engine's optimization profile spans prefill (no past) and decode on the graph's
own input shapes. Building the engine needs TensorRT and a GPU (the `gpu` tests)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

from tests.families.causal_lms import FAMILIES, make  # noqa: E402
from trimrt.compiler.decoder import DECODER_SPEC, export_causal_lm  # noqa: E402
from trimrt.compiler.input_limits import INPUT_LIMITS, find_input_limits  # noqa: E402
from trimrt.compiler.pipeline import build_passes, run_pipeline  # noqa: E402
from trimrt.compiler.tensorrt_target import decoder_profile  # noqa: E402
from trimrt.passes.base import PipelineContext  # noqa: E402
from trimrt.plugins import runnable_proto  # noqa: E402
from trimrt.recipe import load_recipe  # noqa: E402
from trimrt.runtime.backends import OnnxRuntimeBackend  # noqa: E402
from trimrt.runtime.kv_cache import ATTENTION_BIAS  # noqa: E402

#: onnx-tensorrt 10.x operators (its docs/operators.md) a decoder export may use
TENSORRT_OPS = {
    "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "Cos", "Div", "Equal", "Erf", "Expand",
    "Gather", "Gemm", "Greater", "GreaterOrEqual", "Identity", "IsInf", "IsNaN", "LayerNormalization", "Less",
    "LessOrEqual", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow", "Range", "Reciprocal", "ReduceMax",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt",
    "Squeeze", "Sub", "Tanh", "Transpose", "Trilu", "Unsqueeze", "Where",
}


@pytest.fixture(scope="module", params=FAMILIES)
def tensorrt_graph(request):
    """(family, the tensorrt target's graph of its KV-cache export, pass reports, decoder spec)."""
    model, _, spec, _ = export_causal_lm(make(request.param), opset=18)
    limits = find_input_limits(ir.serde.serialize_model(model))
    passes = build_passes(load_recipe(None), "tensorrt",
                          context=PipelineContext(shared={DECODER_SPEC: spec, INPUT_LIMITS: limits}))
    reports = run_pipeline(model, passes)
    return request.param, model, [r.name for r in reports], spec


def test_the_kv_cache_graph_uses_what_tensorrt_parses(tensorrt_graph):
    family, model, passes, _ = tensorrt_graph
    assert "kv_attention" not in passes and "packed_projections" not in passes  # ONNX Runtime rewrites only
    assert model.opset_imports[""] == 18
    ops = {(n.domain or "", n.op_type) for n in model.graph}
    assert {d for d, _ in ops} == {""}, ops  # no contrib or custom op
    assert {op for _, op in ops} <= TENSORRT_OPS, ({op for _, op in ops} - TENSORRT_OPS, family)
    unranked = [v.name for n in model.graph for v in n.outputs if v.shape is None]
    assert not unranked, (family, unranked[:5])


def test_the_engine_profile_spans_prefill_and_decode(tensorrt_graph):
    family, model, _, spec = tensorrt_graph
    ranges = decoder_profile(spec, max_batch=4)
    inputs = {v.name: v for v in model.graph.inputs}
    assert set(ranges) == set(inputs)
    for name, (low, opt, high) in ranges.items():
        shape = list(inputs[name].shape)
        assert len(low) == len(opt) == len(high) == len(shape), name
        for axis, dim in enumerate(shape):
            assert low[axis] <= opt[axis] <= high[axis], (name, axis)
            if isinstance(dim, int):
                assert low[axis] == opt[axis] == high[axis] == dim, (name, axis)
    past = ranges["past_key_values.0.key"]
    assert past[0][2] == 0 and past[2][2] == spec.max_positions - 1  # prefill has no past
    assert ranges["input_ids"][2] == [4, spec.max_positions]
    # the profile's corners are shapes the graph runs at: a 1-token prefill, a decode step at opt
    proto = runnable_proto(ir.serde.serialize_model(model))
    backend = OnnxRuntimeBackend(proto.SerializeToString())
    backend.activate()
    for feeds in (spec.random_feeds(1, new=1, past=0), spec.random_feeds(1, new=1, past=past[1][2])):
        out = backend.infer({k: v for k, v in feeds.items() if k != ATTENTION_BIAS})
        assert out["logits"].shape == (1, 1, spec.vocab_size) and np.isfinite(out["logits"]).all()


# ---------------------------------------------------------------------- with TensorRT


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_decoder_engine_generates_like_hugging_face(tmp_path, family):
    """On a machine with TensorRT and a GPU: the engine built from the KV-cache graph (one
    profile for prefill and decode) generates what Hugging Face does, for prompts of different
    lengths (left-padded) with the cache fed back each step."""
    import trimrt
    from tests.families.causal_lms import hf_greedy

    prompts = [[1, 17, 99, 5, 42, 7, 150, 3, 88, 61, 12], [1, 5], [1, 23, 9, 180, 44, 2]]
    trimrt.compile(make(family), None, tmp_path / "engine", target="tensorrt")
    session = trimrt.load(tmp_path / "engine", backend="tensorrt")
    got = session.generator().generate(prompts, max_new_tokens=16)
    assert [r.tokens for r in got] == hf_greedy(make(family), prompts, 16)
