"""TokenPruningPass: which ops appear, the no-op reproduces the original, the pruned
build equals an independent PyTorch EViT implementation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import trimrt
from tests.passes.evit_reference import evit_forward
from tests.passes.in_memory import apply_recipe, run_model
from trimrt.errors import RecipeError
from trimrt.passes import PASS_TAG


def compile_in_memory(path, **options):
    return apply_recipe(path, "token_pruning", **options)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_model(model, {"pixel_values": x})


def test_inserts_scoring_and_pruning_ops_tagged(vit):
    _, path = vit
    model, reports = compile_in_memory(path, layers=[1, 2], keep=0.5, fuse_pruned=True)
    ops = Counter((n.domain, n.op_type) for n in model.graph)
    assert ops[("trimrt", "AttentionRowScore")] == 2
    assert ops[("trimrt", "TokenPrune")] == 2
    inserted = [n for n in model.graph if n.metadata_props.get(PASS_TAG) == "token_pruning"]
    assert {"AttentionRowScore", "TokenPrune", "Concat"} <= {n.op_type for n in inserted}
    assert {f.name for f in model.functions.values()} == {"AttentionRowScore", "TokenPrune"}
    report = reports["token_pruning"]
    # 65 tokens: keep ceil(0.5·64)=32 + CLS + fused = 34; then ceil(0.5·33)=17 + 2 = 19
    assert [(x["tokens_in"], x["tokens_out"]) for x in report["layers"]] == [(65, 34), (34, 19)]


def test_baked_token_counts_are_freed(tiny_vit_onnx):
    """The dynamo export bakes 65 into the Reshape targets of every block; after pruning
    at block 1 those of blocks 2 and 3 (2 per block) must follow the runtime count."""
    _, path = tiny_vit_onnx
    model, reports = compile_in_memory(path, layers=[1], keep=0.5)
    assert reports["token_pruning"]["shape_constants_rewritten"] == 4
    rewritten = [n for n in model.graph if n.metadata_props.get("trimrt.rewritten_by") == "token_pruning"]
    assert len(rewritten) == 4 and {n.op_type for n in rewritten} == {"Reshape"}
    for node in rewritten:
        target = ir.convenience.get_const_tensor(node.inputs[1]).numpy().tolist()
        assert 65 not in target and target[1] == 0 and node.attributes["allowzero"].value == 0


def test_keep_all_reproduces_original(vit, images):
    _, path = vit
    base = run(ir.load(path), images)
    model, reports = compile_in_memory(path, layers=[0, 1, 2, 3], keep=1.0, fuse_pruned=True)
    assert all(not x["fused"] for x in reports["token_pruning"]["layers"])  # nothing dropped: nothing fused
    np.testing.assert_allclose(run(model, images), base, atol=1e-5)


@pytest.mark.parametrize("layers,keep,fuse", [([1], 0.7, False), ([1, 2], 0.5, True), ([0, 3], 0.25, True)])
@pytest.mark.parametrize("export", ["tiny_vit_onnx", "tiny_vit_torchscript_onnx", "tiny_vit_opset23_onnx"])
def test_pruned_build_matches_pytorch_evit(export, request, images, layers, keep, fuse):
    module, path = request.getfixturevalue(export)
    model, _ = compile_in_memory(path, layers=layers, keep=keep, fuse_pruned=fuse)
    with torch.no_grad():
        want = evit_forward(module, torch.from_numpy(images), layers, keep, fuse).numpy()
        full = module(torch.from_numpy(images)).numpy()
    got = run(model, images)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - full).max() > 1e-3  # pruning really changed the computation


def test_pruning_shrinks_tensors_downstream(tiny_vit_onnx, images):
    _, path = tiny_vit_onnx
    model, _ = compile_in_memory(path, layers=[1], keep=0.25)
    proto = ir.serde.serialize_model(model)
    import onnx
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(proto)
    del inlined.graph.output[:]
    # the MLP input of block 1 (a LayerNormalization after the prune) must have 1 + 16 tokens
    ln = [n for n in inlined.graph.node if n.op_type == "LayerNormalization"]
    inlined.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in ln)
    sess = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = [o.shape[1] for o in sess.run(None, {"pixel_values": images})]
    assert tokens == [65, 65, 65, 17, 17, 17, 17, 17, 17]


def test_layer_out_of_range_is_a_recipe_error(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    with pytest.raises(RecipeError, match=r"layers \[7\] do not exist: the model has 4 blocks \(0..3\)"):
        compile_in_memory(path, layers=[1, 7], keep=0.5)


def test_protect_prefix(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    model, reports = compile_in_memory(path, layers=[1], keep=0.5, protect="first:5")
    (layer,) = reports["token_pruning"]["layers"]
    assert layer["protected"] == 5 and layer["kept"] == 30  # ceil(0.5·60)
    prune = next(n for n in model.graph if n.op_type == "TokenPrune")
    assert prune.attributes["protect"].value == 5


def test_a_post_norm_stream_is_pruned_before_its_layernorm(small_vocab_bert, tmp_path):
    """In a post-LN block the pruned stream is a LayerNorm's output: the selection gathers the
    norm's input and the norm runs on the kept tokens only (the same values: LayerNorm is per
    token); with EViT's fused token (a sum of normalised tokens) it gathers after the norm."""
    import onnx

    path = small_vocab_bert
    feeds = {"input_ids": np.array([[5, 17, 3, 44, 9, 2, 31, 8, 12, 7]]), "attention_mask": np.ones((1, 10), np.int64)}
    outputs = {}
    for fuse in (False, True):
        recipe = {"token_pruning": {"method": "cls_attention", "layers": [0], "keep": 0.5, "fuse_pruned": fuse}}
        trimrt.compile(path, recipe, tmp_path / f"b{fuse}")
        graph = onnx.load(tmp_path / f"b{fuse}" / "model.onnx").graph
        producers = {out: node for node in graph.node for out in node.output}
        prune = next(n for n in graph.node if n.op_type == "TokenPrune")
        sunk = [n for n in graph.node if n.op_type == "LayerNormalization" and prune.output[0] in n.input]
        assert (producers[prune.input[0]].op_type, len(sunk)) == (("LayerNormalization", 0) if fuse else ("Add", 1))
        outputs[fuse] = trimrt.load(tmp_path / f"b{fuse}").run(feeds)
    # keep everything: the sunk norm reproduces the original model
    recipe = {"token_pruning": {"method": "cls_attention", "layers": [0], "keep": 1.0}}
    trimrt.compile(path, recipe, tmp_path / "all")
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = trimrt.load(tmp_path / "all").run(feeds)
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("export", ["small_llama", "small_llama_opset23"])
@pytest.mark.parametrize("layer", [0, 1])
def test_a_plain_causal_export_is_pruned(export, request, layer):
    """FastV (last_token_attention) on a plain PyTorch LLaMA-style export, whose causal mask
    ([N, N]) and rotary tables ([N, Dh]) have no batch axis: the tables travel with the kept
    tokens (each keeps its position's angle), the mask is re-derived for the kept count, and
    the build equals FastV written in PyTorch; keep = 1 reproduces the export. Both export
    forms: Softmax over q·kᵀ + mask, and opset 23's Attention op (is_causal)."""
    from tests.families.fastv_reference import fastv_llama_style

    module, path = request.getfixturevalue(export)
    ids = np.random.default_rng(3).integers(0, 100, (2, 40))
    model, _ = compile_in_memory(path, method="last_token_attention", layers=[layer], keep=1.0)
    np.testing.assert_allclose(run_model(model, {"input_ids": ids}), run_model(ir.load(path), {"input_ids": ids}),
                               rtol=1e-5, atol=1e-5)
    model, reports = compile_in_memory(path, method="last_token_attention", layers=[layer], keep=0.5, prunable=[1, 39])
    got = run_model(model, {"input_ids": ids})
    with torch.no_grad():
        want = fastv_llama_style(module, torch.from_numpy(ids), layer, 0.5, (1, 39)).numpy()
    assert got.shape == want.shape == (2, 1 + 19 + 1, 100)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if layer == 0:  # block 1's attention runs on the kept tokens
        assert set(reports["token_pruning"]["travelling_tensors"]) == {"cos", "sin"}
