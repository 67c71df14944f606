"""[sparse_attention]: every block selected reproduces the original on every ViT export form;
a sparse build equals the PyTorch ViT with the op's reference as its attention; composes
with token pruning; what the pass refuses."""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from tests.passes.in_memory import apply_recipe, pixels, run_model
from trimrt.errors import RecipeError, StructureError
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


def _with_reference_attention(module, layers, **attrs):
    """The PyTorch ViT whose attention in `layers` is the op's NumPy reference."""
    import torch

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        (out,) = OP.run_reference(q.numpy(), k.numpy(), v.numpy(), scale=self.scale, **attrs)
        return self.proj(torch.from_numpy(out).transpose(1, 2).reshape(b, n, c))

    for i in layers:
        attention = module.blocks[i].attn
        attention.forward = types.MethodType(forward, attention)
    return module


@pytest.mark.parametrize("options", [{"layers": [0, 2], "top_k": 2, "block_size": 8},
                                     {"top_k": 3, "block_size": 16, "sink": 0, "local": 2, "rectify": False}])
def test_a_sparse_build_equals_the_reference_attention_in_pytorch(tiny_vit_onnx, options):
    import torch

    module, path = tiny_vit_onnx
    x = pixels(seed=2, batch=3)
    model, reports = apply_recipe(path, "sparse_attention", **options)
    layers = options.get("layers", range(4))
    attrs = {key: int(options.get(key, default)) for key, default in
             (("block_size", 128), ("top_k", 0), ("sink", 1), ("local", 1), ("rectify", True))}
    with torch.no_grad():
        want = _with_reference_attention(module.eval(), layers, causal=0, **attrs)(torch.from_numpy(x)).numpy()
    got = run_model(model, {"pixel_values": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [entry["block"] for entry in reports["sparse_attention"]["layers"]] == list(layers)


def test_it_composes_with_token_pruning(tiny_vit_onnx):
    from trimrt.compiler.pipeline import build_passes, run_pipeline

    _, path = tiny_vit_onnx
    model = ir.load(path)
    recipe = load_recipe({"token_pruning": {"layers": [1], "keep": 0.5},
                          "sparse_attention": {"layers": [0, 3], "top_k": 2, "block_size": 8}})
    reports = {r.name: r.details for r in run_pipeline(model, build_passes(recipe))}
    assert set(reports) >= {"token_pruning", "sparse_attention"}
    out = run_model(model, {"pixel_values": pixels()})
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_what_the_pass_refuses(tiny_vit_onnx, small_vocab_bert):
    with pytest.raises(RecipeError, match=r"\[sparse_attention\] layers \[7\] do not exist: the model has 4 blocks"):
        apply_recipe(tiny_vit_onnx[1], "sparse_attention", layers=[7], top_k=2)
    with pytest.raises(StructureError, match=r"\[sparse_attention\] block 0's attention has a mask \(padding or "
                                             r"causal, written into the graph\)"):
        apply_recipe(small_vocab_bert, "sparse_attention", top_k=2)
    with pytest.raises(RecipeError, match="top_k must be an integer >= 1, got 0"):
        load_recipe({"sparse_attention": {"top_k": 0}})
    with pytest.raises(RecipeError, match="top_k"):
        load_recipe({"sparse_attention": {}})


def test_a_compiled_build_runs_and_inspect_tells_its_blocks(tiny_vit_onnx, tmp_path):
    from click.testing import CliRunner

    import trimrt
    from trimrt.cli import main

    _, path = tiny_vit_onnx
    manifest = trimrt.compile(str(path), {"sparse_attention": {"top_k": 2, "block_size": 16}}, tmp_path / "build")
    assert list(manifest["ops"]) == ["BlockSparseAttention"]
    assert manifest["flops"]["ratio"] > 1.0  # the attention products of 2 of 5 key blocks
    out = trimrt.load(tmp_path / "build").run({"pixel_values": pixels()})
    assert np.isfinite(next(iter(out.values()))).all()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "build")])
    assert result.exit_code == 0, result.output
    for block in range(4):  # 65 tokens: 5 blocks of 16
        assert (f"block-sparse attention at block {block}: 2 key blocks of 5 per query block (blocks of 16 tokens, "
                "rectified)") in result.output
