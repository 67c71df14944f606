"""The token-pruning methods beyond EViT/FastV (zero_tprune, divprune, recycle, adaptive)
end to end on the tiny ViT: each build equals the same method applied in PyTorch with
the ops' references; keeping everything reproduces the original; shapes shrink."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from tests.passes.in_memory import apply_recipe, run_model
from tests.passes.pruning_reference import pruned_forward
from trimrt.errors import RecipeError, StructureError
from trimrt.recipe import load_recipe

EXPORTS = ["tiny_vit_onnx", "tiny_vit_sdpa_onnx", "tiny_vit_torchscript_onnx", "tiny_vit_opset23_onnx"]


def prune_in_memory(path, **options):
    return apply_recipe(path, "token_pruning", **options)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return run_model(model, {"pixel_values": x})


@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("method, options", [
    ("zero_tprune", {"iterations": [30, 5]}),
    ("divprune", {}),
    ("recycle", {"recycle_grid": 2}),
    ("adaptive", {"mass": 0.6}),
])
def test_build_matches_method_in_pytorch(export, method, options, request, images):
    module, path = request.getfixturevalue(export)
    layers, keep = [1, 2], 0.5
    model, reports = prune_in_memory(path, method=method, layers=layers, keep=keep, **options)
    got = run(model, images)
    kwargs = {"iterations": options.get("iterations"), "grid": options.get("recycle_grid", 2),
              "mass": options.get("mass", 0.9)}
    with torch.no_grad():
        want = pruned_forward(module, torch.from_numpy(images), method, layers, keep, **kwargs).numpy()
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
    ops = Counter(n.op_type for n in model.graph if n.domain == "trimrt")
    cells = 4 if method == "recycle" else 0
    # 65 tokens: CLS + 32 kept (+ cells), then CLS + 16 kept (+ cells again)
    assert [x["tokens_out"] for x in reports["token_pruning"]["layers"]] == [33 + cells, 17 + 2 * cells]
    assert ops[{"zero_tprune": "AttentionPageRank", "divprune": "DiversityRank", "recycle": "AttentionRowScore",
                "adaptive": "MassMask"}[method]] == 2


@pytest.mark.parametrize("method, options", [("zero_tprune", {}), ("divprune", {}), ("adaptive", {"mass": 1.0})])
def test_keep_all_reproduces_original(method, options, tiny_vit_onnx, images):
    module, path = tiny_vit_onnx
    model, _ = prune_in_memory(path, method=method, layers=[0, 2], keep=1.0, **options)
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(run(model, images), want, atol=1e-5)


def test_divprune_prunes_before_the_block(tiny_vit_onnx, images):
    _, path = tiny_vit_onnx
    model, reports = prune_in_memory(path, method="divprune", layers=[0], keep=0.25)
    layer = reports["token_pruning"]["layers"][0]
    assert layer["at"] == "block input" and layer["tokens_out"] == 17
    proto = ir.serde.serialize_model(model)
    first_softmax = next(n.outputs[0].name for n in model.graph if n.op_type == "Softmax")
    proto.graph.output.add().name = first_softmax
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run([first_softmax], {"pixel_values": images})[0].shape[-1] == 17  # block 0 attends 17 tokens


def test_adaptive_reports_the_visible_count_tensor(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    model, reports = prune_in_memory(path, method="adaptive", layers=[1], keep=0.7, mass=0.5)
    name = reports["token_pruning"]["layers"][0]["visible_count"]
    assert any(v.name == name for n in model.graph for v in n.outputs)


def test_method_options_are_checked():
    with pytest.raises(RecipeError, match="recycle_grid applies to method"):
        load_recipe({"token_pruning": {"layers": [1], "keep": 0.5, "recycle_grid": 3}})
    with pytest.raises(RecipeError, match="one integer >= 1 per layer"):
        load_recipe({"token_pruning": {"method": "zero_tprune", "layers": [1, 2], "keep": 0.5, "iterations": [3]}})
    with pytest.raises(RecipeError, match="mass must be"):
        load_recipe({"token_pruning": {"method": "adaptive", "layers": [1], "keep": 0.5, "mass": 0}})


def test_recycle_needs_a_square_patch_span(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    with pytest.raises(StructureError, match="not a square number"):
        prune_in_memory(path, method="recycle", layers=[1], keep=0.5, prunable=[1, 40])
    with pytest.raises(RecipeError, match="larger than the 8×8"):
        prune_in_memory(path, method="recycle", layers=[1], keep=0.5, recycle_grid=9)


def test_verify_reports_realised_keep_ratios(tmp_path):
    """adaptive: the visible share of each layer's span varies per input, within the bound."""
    import trimrt

    build = tmp_path / "adaptive"
    trimrt.compile("examples.models.vit:tiny_vit", {"token_pruning": {"method": "adaptive", "layers": [1, 2],
                                                                   "keep": 0.5, "mass": 0.5}}, build)
    report = trimrt.verify(build, "examples.models.vit:tiny_vit", samples=3)
    assert [k["block"] for k in report.keep_ratios] == [1, 2]
    first = report.keep_ratios[0]
    assert 0 < first["min"] <= first["mean"] <= first["max"] <= 32 / 64  # at most the static bound of 64 patches
