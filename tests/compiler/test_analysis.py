"""Structure analysis on exported graphs: blocks, token axis, attention, pooling; clear errors."""

from __future__ import annotations

import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from trimrt.compiler.analysis import analyse, infer_shapes
from trimrt.errors import StructureError


def load(path) -> ir.Model:
    model = ir.load(path)
    infer_shapes(model)
    return model


@pytest.mark.parametrize("which", ["tiny_vit_onnx", "tiny_vit_sdpa_onnx"])
def test_finds_vit_structure(which, request):
    _, path = request.getfixturevalue(which)
    tmap = analyse(load(path))
    assert len(tmap.blocks) == 4
    assert tmap.token_axis == 1 and tmap.num_tokens == 65 and tmap.width == 64
    assert tmap.pooling == "cls"
    assert all(not b.post_norm for b in tmap.blocks)
    assert [b.attention.num_heads for b in tmap.blocks] == [4] * 4
    # each block's stream_in is the previous block's output stream
    for prev, block in zip(tmap.blocks, tmap.blocks[1:]):
        assert block.stream_in.producer().op_type == "Add"
        assert block.index == prev.index + 1


def test_scale_is_found_on_explicit_attention(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    tmap = analyse(load(path))
    assert tmap.blocks[0].attention.scale == pytest.approx(16 ** -0.5)


def test_graph_without_attention_says_what_is_missing():
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = oh.make_graph([oh.make_node("Relu", ["x", ], ["h"]), oh.make_node("Softmax", ["h"], ["y"])], "mlp", [x], [y])
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    with pytest.raises(StructureError, match=r"no transformer blocks found: no attention .* \(1 Softmax node\(s\)\)"):
        analyse(model)



def test_attention_whose_logits_add_two_terms_is_refused_naming_them():
    """q·kᵀ + a position bias + a mask, added one after the other: no one mask a pass could
    rewrite (taking one and dropping the other would build a wrong model)."""
    f = onnx.TensorProto.FLOAT
    ins = [oh.make_tensor_value_info(n, f, [1, 2, 8, 4]) for n in ("q", "k", "v")]
    ins += [oh.make_tensor_value_info(n, f, [1, 2, 8, 8]) for n in ("bias", "mask")]
    nodes = [oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), oh.make_node("MatMul", ["q", "kt"], ["s"]),
             oh.make_node("Add", ["s", "bias"], ["s1"]), oh.make_node("Add", ["s1", "mask"], ["s2"]),
             oh.make_node("Softmax", ["s2"], ["p"], axis=-1), oh.make_node("MatMul", ["p", "v"], ["y"])]
    graph = oh.make_graph(nodes, "attention", ins, [oh.make_tensor_value_info("y", f, [1, 2, 8, 4])])
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    with pytest.raises(StructureError, match=r"adds more than one term to its logits \(e.g. a position bias and a mask"):
        analyse(model)

def test_a_compile_analyses_once_and_again_after_rewiring(tiny_vit_onnx, monkeypatch):
    """AnalysePass shares its structure with the token passes; a pass that rewired the
    graph since (here: pruning itself) makes the next reader analyse again."""
    from trimrt.compiler import analysis
    from trimrt.compiler.pipeline import build_passes, run_pipeline
    from trimrt.recipe import load_recipe

    calls = []
    real = analysis.analyse
    monkeypatch.setattr(analysis, "analyse", lambda model, *args: calls.append(1) or real(model, *args))
    _, path = tiny_vit_onnx
    passes = build_passes(load_recipe({"token_pruning": {"layers": [1], "keep": 0.5}}))
    run_pipeline(ir.load(path), passes)
    assert len(calls) == 1
    shared = passes[0].context.shared
    model = ir.load(path)
    analysis.structure_of(model, shared)  # another graph: analysed
    analysis.structure_of(model, shared)  # the same graph, unchanged: shared
    assert len(calls) == 2
    model.graph.outputs[0] = model.graph.node(-1).inputs[0]  # rewired
    analysis.structure_of(model, shared)
    assert len(calls) == 3


def test_a_compile_finds_input_limits_once_and_probes_each_graph_once(tiny_vit_torchscript_onnx, tmp_path,
                                                                      monkeypatch):
    """The original model's input limits are found once (they are also the build's, in its
    manifest) and shared with the shape probes; a probe of a graph is shared by the readers
    of that graph (analysis, the token passes) and run again once the graph was rewired."""
    import trimrt
    from trimrt.compiler import input_limits, probe

    found, probed = [], []
    real_find, real_probe = input_limits._find, probe.probe_shape_runs
    monkeypatch.setattr(input_limits, "_find", lambda proto: found.append(1) or real_find(proto))
    monkeypatch.setattr(probe, "probe_shape_runs", lambda *args: probed.append(args[2]) or real_probe(*args))
    _, path = tiny_vit_torchscript_onnx
    trimrt.compile(str(path), {"token_pruning": {"layers": [1, 2], "keep": 0.5}}, tmp_path / "b")
    assert len(found) == 1
    assert probed and None not in probed  # every probe ran on the shared limits
    probed.clear()
    shared = {input_limits.INPUT_LIMITS: {"ids": {}, "tokens": None}}
    model = load(path)
    probe.probe_shapes(model, shared)
    probe.TokenDims(model, "n", shared)  # the same graph: its probe is shared
    assert len(probed) == 1
    model.graph.outputs[0] = model.graph.node(-1).inputs[0]  # rewired
    probe.probe_shapes(model, shared)
    assert len(probed) == 2
