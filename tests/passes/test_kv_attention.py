"""KVAttentionPass: each decoder layer's attention is one attention op on its cache (ONNX
Runtime's GroupQueryAttention; RMSNorm and RoPE fused), never a repeated cache, with the
exported graph's results, and a cache buffer shared by past and present written in place."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import build  # noqa: E402
from trimrt.runtime.backends import OnnxRuntimeBackend  # noqa: E402

# family: (RMSNorms fused, RoPEs fused) of its 2 layers; GPT-2 has LayerNorms and learned positions
FUSED = {"llama": (5, 4), "qwen2": (5, 4), "mistral": (5, 4), "gpt2": (0, 0)}


@pytest.mark.parametrize("family", sorted(FUSED))
def test_attention_ops_equal_the_exported_attention(family):
    path, _ = build(family)
    session = trimrt.load(path)
    report = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "kv_attention")
    rms, rope = FUSED[family]
    assert report["attention_ops"] == 2 and report["grouped"] == 0 and report["opset"] == 23
    assert report["rms_normalization"] == rms and report["rotary_embedding"] == rope and report["token_major"] == 2
    assert report["kv_op"] == "GroupQueryAttention" and "reason" not in report
    assert report["rotary_in_attention"] == (2 if rope else 0)  # the attention applies the RoPE from tables
    assert report["max_relative_error"] < 1e-4
    assert session.manifest["flops"]["ratio"] == pytest.approx(1.0, abs=1e-4)  # the Attention counts its products
    graph = ir.load(str(path / "model.onnx")).graph
    ops = [n.op_type for n in graph]
    assert ops.count("GroupQueryAttention") == 2 and "Attention" not in ops and "Softmax" not in ops
    assert "RotaryEmbedding" not in ops
    # the attention runs on the packed Q/K/V projection as it comes ([B, S, (H + 2·Hkv)·d]): no Split, no
    # head views around it
    packed = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "packed_projections")
    assert packed["attention_fed_packed"] == 2
    for n in graph:
        if n.op_type == "GroupQueryAttention":
            kv_heads = 4 if family == "gpt2" else 2  # GPT-2 has no grouped heads
            assert n.inputs[1] is None and n.inputs[2] is None and n.inputs[0].shape[2] == (4 + 2 * kv_heads) * 16
    assert ops.count("Split") == (0 if family == "gpt2" else 2)  # GPT-2's MLP is not gated: only the MLPs' gate/up
    assert not [n for n in graph if n.op_type == "Transpose" and list(n.attributes.get_ints("perm", [])) == [0, 2, 1, 3]]
    # no Expand copies the cache (a 5-D Expand: [B, Hkv, G, T, d])
    assert not [n for n in graph if n.op_type == "Expand" and n.outputs[0].shape is not None
                and len(n.outputs[0].shape) == 5]
    reference = OnnxRuntimeBackend(str(path / session.manifest["reference"]))
    reference.activate()
    spec = session.generator().spec
    # a batch of several new tokens on a past runs too, as one batch (query_seqlens), a prompt with every
    # row's own positions
    for feeds in (spec.random_feeds(2, new=3, past=9), spec.random_feeds(2, new=7, past=0)):
        want, got = reference.infer(feeds), session.run(feeds)
        assert set(got) == set(want)  # the present key / value keep their names
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    # as one batch in a plain ONNX Runtime session too (another runtime does not split batches)
    plain = onnxruntime.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = spec.random_feeds(2, new=3, past=9)
    np.testing.assert_allclose(plain.run(["logits"], feeds)[0], reference.infer(feeds)["logits"], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_shared_cache_buffer_is_written_in_place(family):
    """The build takes a past buffer longer than its past (ONNX Runtime GenAI's shared buffer):
    a prompt and then decode steps written into one buffer, growing by chunks, give the
    logits and caches of the exported graph fed its past each step."""
    from trimrt.runtime.kv_cache import ATTENTION_BIAS, ATTENTION_MASK, LOGITS, KVCache, present_name

    path, _ = build(family)
    session = trimrt.load(path)
    spec = session.generator().spec
    assert spec.shared_buffer and session.manifest["decoder"]["shared_buffer"] is True
    reference = OnnxRuntimeBackend(str(path / session.manifest["reference"]))
    reference.activate()
    cache = KVCache(spec, batch=2, chunk=8)
    past = spec.empty_cache(2)
    for step, new in enumerate((5, 1, 1, 2, 1)):  # 6 tokens fill the first chunk; the 4th step outgrows it
        feeds = spec.random_feeds(2, new=new, past=cache.length, seed=step)
        feeds = {**feeds, **past}
        if step == 2:  # an extra mask on one step only: the next step must not keep it
            bias = np.zeros((2, 1, new, cache.length + new), np.float32)
            bias[:, :, :, 3] = -1e4
            feeds[ATTENTION_BIAS] = bias
        want = reference.infer(feeds)
        got = session.run_with_cache({k: v for k, v in feeds.items() if k not in past}, cache)
        assert set(got) == {LOGITS} and cache.length == feeds[ATTENTION_MASK].shape[1]
        assert cache.capacity == 8 * -(-cache.length // 8)
        np.testing.assert_allclose(got[LOGITS], want[LOGITS], atol=1e-5)
        past = {name: want[present_name(*name.split(".")[1:])] for name in past}
        for name, view in cache.views().items():
            np.testing.assert_allclose(view, past[name], atol=1e-5, err_msg=name)
    assert cache.nbytes == 2 * cache.length * spec.kv_bytes_per_token


def _rope_graph(extra_input: bool) -> tuple[ir.Graph, ir.Node, np.ndarray]:
    """A RotaryEmbedding whose cos / sin are computed from position_ids (and, with
    `extra_input`, scaled by the token count of another input, as dynamic RoPE scaling does)."""
    from trimrt.passes.base import GraphBuilder

    ids = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", 16]))
    graph = ir.Graph([ids, x], [], nodes=[], opset_imports={"": 23})
    b = GraphBuilder(graph, "test")
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    angles = b.op("Mul", [b.op("Cast", [b.op("Unsqueeze", [ids, b.const(np.array([2]))])], {"to": ir.DataType.FLOAT}),
                          b.const(inv_freq)])
    if extra_input:
        count = b.op("Cast", [b.op("Shape", [x], {"start": 1, "end": 2})], {"to": ir.DataType.FLOAT})
        angles = b.op("Div", [angles, count])
    rope = b.op("RotaryEmbedding", [x, b.op("Cos", [angles]), b.op("Sin", [angles])], {"num_heads": 2})
    b.append_to_graph()
    graph.outputs.append(rope)
    return graph, rope.producer(), inv_freq


def test_rope_tables_come_from_the_angles_computation_run_on_every_position():
    """GroupQueryAttention's cos / sin tables are the model's own angle computation on positions
    0 … n − 1; angles that read anything but the position ids (dynamic scaling) make none."""
    from trimrt.passes.kv_attention import _rotary_tables

    graph, rope, inv_freq = _rope_graph(extra_input=False)
    cos, sin, ids = _rotary_tables(rope, 40, "table")
    angles = np.arange(40)[:, None] * inv_freq
    np.testing.assert_allclose(cos.const_value.numpy(), np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin.const_value.numpy(), np.sin(angles), atol=1e-6)
    assert ids.name == "position_ids" and cos.const_value.shape == (40, 4)
    graph, rope, _ = _rope_graph(extra_input=True)
    assert _rotary_tables(rope, 40, "table") is None
