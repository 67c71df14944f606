"""Recipe parsing and validation: one-line errors naming the key."""

from __future__ import annotations

import pytest

from trimrt.errors import RecipeError
from trimrt.recipe import TokenPruningOptions, load_recipe

GOOD = """
[token_pruning]
method = "cls_attention"
layers = [3, 6, 9]
keep = 0.7
protect = "cls"
fuse_pruned = true
"""


def test_reads_the_issue_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert recipe.token_pruning == TokenPruningOptions("cls_attention", (3, 6, 9), 0.7, "cls", True)
    assert recipe.to_dict()["token_pruning"]["layers"] == [3, 6, 9]


@pytest.mark.parametrize("table,message", [
    ({"layers": [3], "keep": 0.7, "speed": 2}, r"unknown key\(s\) \['speed'\]"),
    ({"layers": [3], "keep": 0.0}, r"keep must be a number in \(0, 1\], got 0.0"),
    ({"layers": [3], "keep": 1.5}, r"keep must be a number in \(0, 1\]"),
    ({"layers": [3], "keep": True}, r"keep must be a number"),
    ({"layers": [], "keep": 0.5}, r"layers must be a non-empty list"),
    ({"layers": [-1], "keep": 0.5}, r"0-based block indices >= 0"),
    ({"layers": [2, 2], "keep": 0.5}, r"duplicates"),
    ({"layers": [2], "keep": 0.5, "protect": "cls2"}, r"protect must be"),
    ({"layers": [2], "keep": 0.5, "method": "magic"}, r"method 'magic' is not supported"),
    ({"layers": [2], "keep": 0.5, "fuse_pruned": "yes"}, r"fuse_pruned must be true or false"),
])
def test_invalid_token_pruning(table, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"token_pruning": table})


def test_unknown_table_and_bad_files(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe table\(s\) \['pruning'\]"):
        load_recipe({"pruning": {}})
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[token_pruning\nkeep=")
    with pytest.raises(RecipeError, match="is not valid TOML"):
        load_recipe(bad)


@pytest.mark.parametrize("protect,prefix", [("cls", 1), ("none", 0), ("first:7", 7)])
def test_protected_prefix(protect, prefix):
    assert TokenPruningOptions(layers=(1,), keep=0.5, protect=protect).protected_prefix == prefix


def test_kept_count_rounds_up_and_keeps_one():
    opts = TokenPruningOptions(layers=(1,), keep=0.7)
    assert opts.kept_count(196) == 138  # ceil(0.7 · 196), DeiT-S layer 3
    assert TokenPruningOptions(layers=(1,), keep=0.001).kept_count(10) == 1
    assert TokenPruningOptions(layers=(1,), keep=1.0).kept_count(10) == 10


def test_example_recipes_load():
    """Every recipe shipped in examples/recipes parses."""
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "examples" / "recipes").glob("*.toml"))
    assert len(recipes) >= 5
    for path in recipes:
        recipe = load_recipe(path)
        assert not recipe.is_empty, path.name


def test_onnxruntime_table():
    recipe = load_recipe({"onnxruntime": {"fuse": True}})
    assert recipe.onnxruntime.fuse and recipe.to_dict() == {"onnxruntime": {"fuse": True}}
    with pytest.raises(RecipeError, match=r"\[onnxruntime\]: fuse must be true or false"):
        load_recipe({"onnxruntime": {"fuse": "yes"}})
    with pytest.raises(RecipeError, match=r"\[onnxruntime\]: unknown key\(s\) \['threads'\]"):
        load_recipe({"onnxruntime": {"threads": 2}})


ZTP = {"method": "zero_tprune", "layers": [0], "keep": 0.5}


@pytest.mark.parametrize("recipe,message", [
    ({"token_pruning": {**ZTP, "iterations": [1_000_000_000_000]}}, "iterations must be at most 100"),
    ({"token_pruning": {"method": "recycle", "layers": [0], "keep": 0.5, "recycle_grid": 10_000}},
     "recycle_grid must be an integer in [1, 64]"),
    ({"token_pruning": {"layers": [0], "keep": 0.5, "prunable": [0, 10**12]}}, "end <= 65536"),
    ({"token_pruning": {"layers": [0], "keep": 0.5, "protect": "first:99999999999"}}, "(N <= 65536)"),
    ({"token_merging": {"r": 10**9}}, "r must be an integer in [1, 65536]"),
    ({"token_merging": {"r": [1, 10**9]}}, "list of integers in [0, 65536]"),
    ({"quantization": {"weights": "int4", "group_size": 2**40}}, "group_size must be at most 65536"),
    ({"quantization": {"min_cosine": 0.9}, "calibration": {"random": True, "samples": 10**9}},
     "samples must be at most 100000"),
    ({"quantization": {"min_cosine": 0.9}, "calibration": {"random": True, "max_length": 10**9}},
     "max_length must be at most 65536"),
])
def test_numbers_that_cost_time_or_memory_are_bounded(recipe, message):
    """A few zeros too many must fail in the recipe check, not hang the compile."""
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert message in str(info.value)


def test_bounds_admit_the_largest_allowed_values():
    assert load_recipe({"token_pruning": {**ZTP, "iterations": [100]}}).token_pruning.iterations == (100,)
    assert load_recipe({"token_merging": {"r": 65536}}).token_merging.r == (65536,)
