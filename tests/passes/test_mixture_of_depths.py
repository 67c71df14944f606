"""MixtureOfDepthsPass: routed blocks run on the top tokens of the span and the rest skip
them, equal to a NumPy / PyTorch reference of the routing written from p-MoD's formulas;
a routing of every token reproduces the original; the schedule and bad recipes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.passes.in_memory import apply_recipe, pixels, run_model
from trimrt.errors import RecipeError
from trimrt.recipe import load_recipe


def test_routing_every_token_reproduces_the_original(vit):
    _, path = vit
    x = pixels()
    import onnx_ir as ir

    want = run_model(ir.load(path), {"pixel_values": x})
    model, reports = apply_recipe(path, "mixture_of_depths", ratios=[1.0, 0.999, 0.999, 0.999])
    ops = Counter(n.op_type for n in model.graph if n.domain == "trimrt")
    assert ops == {"AttentionRowScore": 3, "TokenPrune": 3, "TokenRejoin": 3 + 2}  # + the scores of routed blocks
    assert [entry["tokens_run"] for entry in reports["mixture_of_depths"]["layers"]] == [65, 65, 65]
    np.testing.assert_allclose(run_model(model, {"pixel_values": x}), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratios", [[1.0, 0.5, 0.5, 0.25], [1.0, 0.3, 1.0, 0.6], [1.0, 1.0, 0.1, 1.0]])
def test_routed_build_equals_a_pytorch_routing(tiny_vit_onnx, ratios):
    import torch

    from tests.passes.mod_reference import mod_forward

    module, path = tiny_vit_onnx
    x = pixels(seed=3, batch=3)
    model, reports = apply_recipe(path, "mixture_of_depths", ratios=ratios)
    with torch.no_grad():
        want = mod_forward(module.eval(), torch.from_numpy(x), ratios).numpy()
    np.testing.assert_allclose(run_model(model, {"pixel_values": x}), want, rtol=1e-4, atol=1e-4)
    runs = [entry["tokens_run"] for entry in reports["mixture_of_depths"]["layers"]]
    assert runs == [1 + int(np.ceil(r * 64 - 1e-9)) for r in ratios if r < 1.0]


def test_the_schedule_is_p_mods_shifted_cosine():
    options = load_recipe({"mixture_of_depths": {}}).mixture_of_depths
    ratios = options.block_ratios(32)
    # p-MoD at 32 layers: 0-7 dense, 8-23 decay 0.844 -> 0.156, 24-31 at the 0.15 floor, mean 0.5375
    assert ratios[:8] == [1.0] * 8 and ratios[24:] == [0.15] * 8
    assert ratios[8] == pytest.approx(0.844, abs=1e-3) and ratios[23] == pytest.approx(0.156, abs=1e-3)
    assert sum(ratios) / 32 == pytest.approx(0.5375, abs=1e-4)
    shifted = load_recipe({"mixture_of_depths": {"mean_ratio": 0.5}}).mixture_of_depths.block_ratios(32)
    assert sum(shifted) / 32 == pytest.approx(0.5, abs=0.5 / 32) and shifted == sorted(shifted, reverse=True)
    assert load_recipe({"mixture_of_depths": {"ratios": [1, 0.5]}}).mixture_of_depths.block_ratios(2) == [1.0, 0.5]


@pytest.mark.parametrize("table, message", [
    ({"ratios": [1, 0]}, r"ratios must be a non-empty list of numbers in \(0, 1\], one per block"),
    ({"ratios": [1, 0.5], "min_ratio": 0.2}, "give ratios .* or the schedule's max_ratio"),
    ({"min_ratio": 0.9, "max_ratio": 0.5}, "min_ratio 0.9 is above max_ratio 0.5"),
    ({"mean_ratio": 0.1}, "mean_ratio 0.1 is below min_ratio 0.15"),
    ({"router": "learned"}, r"router must be one of \['attention', 'model'\]"),
    ({"protect": "cls", "prunable": [1, 5]}, "give either protect or prunable"),
])
def test_bad_tables_are_one_line(table, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe({"mixture_of_depths": table})
    assert "\n" not in str(info.value)


def test_what_the_pass_refuses(tiny_vit_onnx):
    _, path = tiny_vit_onnx
    for table, message in [({"ratios": [0.5, 1, 1, 1]}, "block 0 cannot be routed: give it ratio 1.0"),
                           ({"ratios": [1, 1, 1, 1]}, r"routes no block: every block's ratio is 1.0 at 4 blocks"),
                           ({"ratios": [1, 0.5, 1]}, "ratios lists 3 values; the model has 4 blocks"),
                           ({"ratios": [1, 0.5, 1, 1], "prunable": [1, 80]}, r"span \[1, 80\) does not fit the "
                                                                              "model's 65 tokens"),
                           ({"router": "model", "ratios": [1, 0.5, 1, 1]}, r'router = "model" found no MoD router '
                            r"in the export \(a layer exported as h \+ g·MLP\(h\), .*use router = \"attention\"")]:
        with pytest.raises(RecipeError, match=message):
            apply_recipe(path, "mixture_of_depths", **table)
    with pytest.raises(RecipeError, match=r"\[token_pruning\] and \[mixture_of_depths\] cannot be combined yet"):
        load_recipe({"token_pruning": {"layers": [1], "keep": 0.5}, "mixture_of_depths": {}})
