"""[sparse_attention]: every block selected reproduces the original on every ViT export form;
a sparse build equals the PyTorch ViT with the op's reference as its attention (also with
tau and with tiled / Hilbert token orders); composes with token pruning; what the pass
refuses; the orders are compact tiles of the grid."""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from tests.passes.in_memory import apply_recipe, pixels, run_model
from trimrt.compiler.analysis import structure_of
from trimrt.errors import RecipeError, StructureError
from trimrt.passes.sparse_attention import patch_order
from trimrt.plugins import REGISTRY
from trimrt.recipe import load_recipe

OP = REGISTRY["BlockSparseAttention"]


def test_every_block_selected_reproduces_the_original(vit):
    _, path = vit
    x = pixels()
    want = run_model(ir.load(path), {"pixel_values": x})
    model, reports = apply_recipe(path, "sparse_attention", block_size=8, top_k=9)  # 65 tokens: 9 blocks
    assert Counter(n.op_type for n in model.graph if n.domain == "trimrt") == {"BlockSparseAttention": 4}
    assert reports["sparse_attention"]["density"] == 1.0
    np.testing.assert_allclose(run_model(model, {"pixel_values": x}), want, rtol=1e-5, atol=1e-5)


def _with_reference_attention(module, layers, order=None, **attrs):
    """The PyTorch ViT whose attention in `layers` is the op's NumPy reference (on the tokens
    in `order`, the output put back)."""
    import torch

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        perm = np.arange(n) if order is None else order
        (out,) = OP.run_reference(*(t.numpy()[:, :, perm] for t in (q, k, v)), np.zeros((b, n), np.float32),
                                  scale=self.scale, **attrs)
        out = out[:, :, np.argsort(perm)]
        return self.proj(torch.from_numpy(out).transpose(1, 2).reshape(b, n, c))

    for i in layers:
        attention = module.blocks[i].attn
        attention.forward = types.MethodType(forward, attention)
    return module


@pytest.fixture(scope="module")
def peaked_vit(tmp_path_factory):
    """(module, export path) of the tiny ViT with its query and key projections scaled up: its
    random weights give near-uniform attention, whose block ranking the last bit of rounding
    (PyTorch against ONNX Runtime) would decide; a trained model's attention is peaked."""
    import torch

    from examples.models.vit import tiny_vit
    from trimrt.compiler.source import export_torch

    module, example = tiny_vit()
    with torch.no_grad():
        for block in module.blocks:
            width = block.attn.qkv.weight.shape[0] // 3
            block.attn.qkv.weight[:2 * width] *= 4.0
    model, _ = export_torch(module, example)
    path = tmp_path_factory.mktemp("models") / "peaked_vit.onnx"
    ir.save(model, path)
    return module, path


@pytest.mark.parametrize("options", [{"layers": [0, 2], "top_k": 2, "block_size": 8, "rectify": True},
                                     {"top_k": 3, "block_size": 16, "sink": 0, "local": 2, "rectify": "blocks"},
                                     {"top_k": 4, "tau": 0.6, "block_size": 8, "order": "tiled", "grid": [8, 8]},
                                     {"top_k": 2, "block_size": 16, "order": "hilbert", "grid": [8, 8]}])
def test_a_sparse_build_equals_the_reference_attention_in_pytorch(peaked_vit, options):
    """Also with tau's mask and with the grid's patches (after the CLS token) tiled or along a
    Hilbert curve: the tiny ViT's 8 × 8 grid in tiles of 2 × 4 (blocks of 8) or 4 × 4 (16)."""
    import torch

    module, path = peaked_vit
    x = pixels(seed=2, batch=3)
    model, reports = apply_recipe(path, "sparse_attention", **options)
    layers = options.get("layers", range(4))
    attrs = {key: int(options.get(key, default)) for key, default in
             (("block_size", 128), ("top_k", 0), ("sink", 1), ("local", 1))}
    attrs["rectify"] = {False: 0, True: 1, "blocks": 2}[options.get("rectify", True)]
    order = {"tiled": [0, *(1 + np.arange(64).reshape(4, 2, 2, 4).transpose(0, 2, 1, 3).reshape(-1))],
             "hilbert": [0, *(1 + patch_order((8, 8), "hilbert", 16))]}.get(options.get("order"))
    with torch.no_grad():
        want = _with_reference_attention(module.eval(), layers, order, causal=0, tau=options.get("tau", 1.0),
                                         **attrs)(torch.from_numpy(x)).numpy()
    got = run_model(model, {"pixel_values": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [entry["block"] for entry in reports["sparse_attention"]["layers"]] == list(layers)


def test_it_composes_with_token_pruning(tiny_vit_onnx):
    """On the tokens pruning keeps: every block selected is the pruned build; fewer change it.
    EViT's score reads block 1's q and k, which stay: that block is sparse too."""
    from trimrt.compiler.pipeline import build_passes, run_pipeline

    _, path = tiny_vit_onnx
    pruning = {"method": "cls_attention", "layers": [1], "keep": 0.5}
    x = pixels()

    def build(sparse):
        model = ir.load(path)
        recipe = load_recipe({"token_pruning": pruning, **({"sparse_attention": sparse} if sparse else {})})
        reports = {r.name: r.details for r in run_pipeline(model, build_passes(recipe))}
        return run_model(model, {"pixel_values": x}), reports

    pruned, _ = build(None)
    every, reports = build({"top_k": 9, "block_size": 8})  # 65 tokens, then 33: every block
    assert [layer["block"] for layer in reports["sparse_attention"]["layers"]] == [0, 1, 2, 3]
    assert reports["sparse_attention"]["kept_dense"] == []
    np.testing.assert_allclose(every, pruned, rtol=1e-5, atol=1e-5)
    fewer, _ = build({"top_k": 2, "block_size": 8})
    assert fewer.shape == pruned.shape and np.abs(fewer - pruned).max() > 1e-4


def test_what_the_pass_refuses(tiny_vit_onnx, small_llama, tmp_path):
    with pytest.raises(RecipeError, match=r"\[sparse_attention\] layers \[7\] do not exist: the model has 4 blocks"):
        apply_recipe(tiny_vit_onnx[1], "sparse_attention", layers=[7], top_k=2)
    def remasked(name, plus_causal):  # the LLaMA's causal mask transposed (each query sees the keys after it)
        model = ir.load(small_llama[1])
        mask = structure_of(model, {}).blocks[0].attention.mask
        readers = list(mask.uses())
        nodes = [ir.Node("", "Transpose", [mask], attributes=[ir.AttrInt64s("perm", [1, 0])])]
        if plus_causal:  # and the causal mask: only the diagonal is seen, a window of one
            nodes.append(ir.Node("", "Add", [mask, nodes[0].outputs[0]]))
        model.graph.insert_after(mask.producer(), nodes)
        for user, index in readers:
            user.replace_input_with(index, nodes[-1].outputs[0])
        ir.save(model, tmp_path / name)
        return tmp_path / name

    with pytest.raises(StructureError, match=r"\[sparse_attention\] block 0's attention has a mask that is neither "
                                             r"the causal rule nor a bias of the keys alone"):
        apply_recipe(remasked("anticausal.onnx", False), "sparse_attention", top_k=2)
    _, reports = apply_recipe(remasked("diagonal.onnx", True), "sparse_attention", top_k=2)
    assert [(e["block"], e["causal"], e.get("window")) for e in reports["sparse_attention"]["layers"]][0] == (0, True, 1)
    with pytest.raises(StructureError, match=r"the grid \[16, 16\] has 256 patches but the blocks see 65 tokens"):
        apply_recipe(tiny_vit_onnx[1], "sparse_attention", top_k=2, order="tiled", grid=[16, 16])
    # block 2's probabilities as a graph output (output_attentions): dense by default, refused listed
    model = ir.load(tiny_vit_onnx[1])
    model.graph.outputs.append(structure_of(model, {}).blocks[2].attention.core.outputs[0])
    ir.save(model, tmp_path / "probabilities.onnx")
    _, reports = apply_recipe(tmp_path / "probabilities.onnx", "sparse_attention", top_k=2, block_size=16)
    assert [e["block"] for e in reports["sparse_attention"]["layers"]] == [0, 1, 3]
    assert reports["sparse_attention"]["kept_dense"] == [2]
    with pytest.raises(StructureError, match=r"\[sparse_attention\] block 2's attention is also read by a graph output "
                                             r"\(e.g. a token pruning's scores\), which needs it dense"):
        apply_recipe(tmp_path / "probabilities.onnx", "sparse_attention", top_k=2, block_size=16, layers=[1, 2])
    with pytest.raises(RecipeError, match="top_k must be an integer >= 1, got 0"):
        load_recipe({"sparse_attention": {"top_k": 0}})
    with pytest.raises(RecipeError, match="top_k"):
        load_recipe({"sparse_attention": {}})


def test_a_compiled_build_runs_and_inspect_tells_its_blocks(tiny_vit_onnx, tmp_path):
    from click.testing import CliRunner

    import trimrt
    from trimrt.cli import main

    _, path = tiny_vit_onnx
    manifest = trimrt.compile(str(path), {"sparse_attention": {"top_k": 2, "block_size": 16, "rectify": True}},
                              tmp_path / "build")
    assert list(manifest["ops"]) == ["BlockSparseAttention"]
    assert manifest["flops"]["ratio"] > 1.0  # the attention products of 2 of 5 key blocks
    out = trimrt.load(tmp_path / "build").run({"pixel_values": pixels()})
    assert np.isfinite(next(iter(out.values()))).all()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "build")])
    assert result.exit_code == 0, result.output
    for block in range(4):  # 65 tokens: 5 blocks of 16
        assert (f"block-sparse attention at block {block}: 2 key blocks of 5 per query block (blocks of 16 tokens, "
                "rectified)") in result.output


@pytest.mark.parametrize("grid, block_size, tile", [((8, 8), 16, (4, 4)), ((8, 8), 8, (2, 4)), ((6, 10), 4, (2, 2)),
                                                    ((4, 8, 8), 32, (2, 4, 4)), ((3, 14, 14), 196, (2, 7, 14))])
def test_tiled_order_cuts_the_grid_into_tiles_of_a_block(grid, block_size, tile):
    order = patch_order(grid, "tiled", block_size)
    assert sorted(order) == list(range(int(np.prod(grid))))
    coords = np.stack(np.unravel_index(order, grid), axis=1)
    first = coords[:block_size]  # the first block: one whole tile at the origin
    assert tuple(first.max(axis=0) + 1) == tile and (first.min(axis=0) == 0).all()


@pytest.mark.parametrize("grid", [(8, 8), (5, 12), (1, 7)])
def test_the_hilbert_order_steps_to_a_neighbour(grid):
    order = patch_order(grid, "hilbert", 16)
    assert sorted(order) == list(range(int(np.prod(grid))))
    coords = np.stack(np.unravel_index(order, grid), axis=1)
    if grid[0] & (grid[0] - 1) == 0 and grid[0] == grid[1]:  # a whole square: every step is to a neighbour
        assert (np.abs(np.diff(coords, axis=0)).sum(axis=1) == 1).all()


def test_a_causal_mask_in_the_graph_becomes_the_causal_rule(small_llama):
    """The LLaMA-style export's mask is found to be the causal rule: every block selected
    reproduces the original; top_k of them equals the PyTorch model with the op's causal
    reference as its attention, on a ragged last block (40 tokens, blocks of 16 then 8)."""
    import torch

    module, path = small_llama
    ids = np.random.default_rng(3).integers(0, 100, (2, 40))
    want = run_model(ir.load(path), {"input_ids": ids})
    model, reports = apply_recipe(path, "sparse_attention", block_size=16, top_k=3)
    assert [x["causal"] for x in reports["sparse_attention"]["layers"]] == [True, True]
    np.testing.assert_allclose(run_model(model, {"input_ids": ids}), want, rtol=1e-4, atol=1e-4)

    model, _ = apply_recipe(path, "sparse_attention", block_size=8, top_k=2, rectify=True)

    def reference(self, q, k, v):
        bias = np.zeros((q.shape[0], q.shape[2]), np.float32)
        (out,) = OP.run_reference(q.numpy(), k.numpy(), v.numpy(), bias, block_size=8, top_k=2, tau=1.0, sink=1, local=1,
                                  causal=1, rectify=1, scale=q.shape[-1] ** -0.5)
        return torch.from_numpy(out)

    with pytest.raises(StructureError, match=r"block 0's attention is causal: its tokens keep their order"):
        apply_recipe(path, "sparse_attention", top_k=2, order="tiled", grid=[5, 8])
    for block in module.blocks:
        block.attn.attend = types.MethodType(reference, block.attn)
    with torch.no_grad():
        expected = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(run_model(model, {"input_ids": ids}), expected, rtol=1e-3, atol=1e-3)


def test_a_padding_mask_becomes_the_key_bias(small_vocab_bert):
    """BERT's padding mask ([B, 1, N, N], the same for every query): every block selected
    reproduces the original on a padded batch; fewer blocks never select the padding."""
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 60, (2, 30)), "attention_mask": np.ones((2, 30), np.int64)}
    feeds["attention_mask"][1, 12:] = 0  # row 1: 18 padding tokens, blocks 2 and 3 wholly padding
    want = run_model(ir.load(small_vocab_bert), feeds)
    model, _ = apply_recipe(small_vocab_bert, "sparse_attention", block_size=6, top_k=5)
    np.testing.assert_allclose(run_model(model, feeds), want, rtol=1e-5, atol=1e-5)
    model, _ = apply_recipe(small_vocab_bert, "sparse_attention", block_size=6, top_k=2)
    got = run_model(model, feeds)
    assert np.isfinite(got).all()
    # row 1's real tokens (blocks 0 and 1) see only blocks 0 and 1: with top_k = 2 its attention is exact
    np.testing.assert_allclose(got[1, :12], want[1, :12], rtol=1e-4, atol=1e-4)


def test_a_padding_mask_a_token_pruning_gathered_becomes_the_key_bias(small_vocab_bert):
    """EViT at block 0 gathers the padding mask of the tokens it keeps (a value with no shape
    left): block 1 sparse over every block is the pruned build on a padded batch."""
    from trimrt.compiler.pipeline import build_passes, run_pipeline

    feeds = {"input_ids": np.random.default_rng(1).integers(0, 60, (2, 30)), "attention_mask": np.ones((2, 30), np.int64)}
    feeds["attention_mask"][1, 20:] = 0
    pruning = {"method": "cls_attention", "layers": [0], "keep": 0.5}

    def build(sparse):
        model = ir.load(small_vocab_bert)
        recipe = load_recipe({"token_pruning": pruning, **({"sparse_attention": sparse} if sparse else {})})
        run_pipeline(model, build_passes(recipe))
        return run_model(model, feeds)

    pruned = build(None)
    np.testing.assert_allclose(build({"top_k": 4, "block_size": 4, "layers": [1]}), pruned, rtol=1e-5, atol=1e-5)
