"""[quantization] and [calibration] tables: the allowed format / method combinations, the
keys that belong to one method or format only, and which builds need calibration data."""

from __future__ import annotations

import pytest

from trimrt.errors import RecipeError
from trimrt.recipe import QUANT_COMBINATIONS, CalibrationOptions, QuantizationOptions, load_recipe

RANDOM = {"random": True}
NEEDS_DATA = r'needs calibration data: add \[calibration\] source = "\.\.\." \(a folder of \.npy/\.npz feeds, ' \
             r"a text file, or an image folder\), or random = true for a smoke test"


def test_defaults_are_int8_rtn_without_calibration():
    recipe = load_recipe({"quantization": {}})
    assert recipe.quantization == QuantizationOptions("int8", "int8", "rtn", 128, None, None)
    assert recipe.calibration is None and not recipe.is_empty
    assert recipe.to_dict() == {"quantization": {"weights": "int8", "activations": "int8", "method": "rtn"}}


@pytest.mark.parametrize("weights,activations", [("int8", "int8"), ("int4", "none"), ("fp8", "fp8")])
def test_activations_follow_the_weights(weights, activations):
    recipe = load_recipe({"quantization": {"weights": weights}, "calibration": RANDOM})
    assert recipe.quantization.activations == activations


@pytest.mark.parametrize("combo", [(w, a, m) for (w, a), methods in QUANT_COMBINATIONS.items() for m in methods])
def test_every_allowed_combination_parses(combo):
    weights, activations, method = combo
    q = load_recipe({"quantization": {"weights": weights, "activations": activations, "method": method},
                     "calibration": RANDOM}).quantization
    assert (q.weights, q.activations, q.method) == combo


def test_the_allowed_set_is_the_issue_table():
    assert QUANT_COMBINATIONS == {("int8", "int8"): ("rtn", "smoothquant", "gptq"),
                                  ("int4", "none"): ("rtn", "awq", "gptq"),
                                  ("fp8", "fp8"): ("rtn", "smoothquant")}


@pytest.mark.parametrize("table", [
    {"weights": "int8", "method": "awq"},
    {"weights": "int4", "activations": "int8"},
    {"weights": "fp8", "method": "gptq"},
    {"weights": "int8", "activations": "none"},
    {"weights": "int4", "activations": "fp8", "method": "awq"},
])
def test_other_combinations_name_the_allowed_ones(table):
    with pytest.raises(RecipeError, match=r"is not a supported combination; choose one of: weights = 'int8', "
                                          r"activations = 'int8': method in \['rtn', 'smoothquant', 'gptq'\]; "
                                          r"weights = 'int4', activations = 'none': method in "
                                          r"\['rtn', 'awq', 'gptq'\]; weights = 'fp8', activations = 'fp8'"):
        load_recipe({"quantization": table, "calibration": RANDOM})


@pytest.mark.parametrize("table,message", [
    ({"weights": "int2"}, r"weights must be one of \['int8', 'int4', 'fp8'\], got 'int2'"),
    ({"activations": "int16"}, r"activations must be one of \['int8', 'fp8', 'none'\]"),
    ({"method": "hqq"}, r"method must be one of \['rtn', 'smoothquant', 'awq', 'gptq'\]"),
    ({"bits": 4}, r"unknown key\(s\) \['bits'\]"),
    ({"weights": "int4", "group_size": 100}, r"group_size must be a power of two >= 16 \(e.g. 128\), got 100"),
    ({"weights": "int4", "group_size": 8}, r"group_size must be a power of two >= 16"),
    ({"weights": "int4", "group_size": True}, r"group_size must be a power of two >= 16"),
    ({"weights": "int4", "group_size": 64.0}, r"group_size must be a power of two >= 16"),
    ({"group_size": 64}, r"group_size applies to int4 weights \(weights is 'int8'\)"),
    ({"weights": "fp8", "group_size": 128}, r"group_size applies to int4 weights"),
    ({"method": "smoothquant", "alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
    ({"method": "smoothquant", "alpha": -0.1}, r"alpha must be a number in \[0, 1\]"),
    ({"method": "smoothquant", "alpha": "0.5"}, r"alpha must be a number in \[0, 1\]"),
    ({"method": "gptq", "alpha": 0.5}, r"alpha applies to method = \"smoothquant\" only \(method is 'gptq'\)"),
    ({"alpha": 0.5}, r"alpha applies to method = \"smoothquant\" only \(method is 'rtn'\)"),
    ({"min_cosine": 0.0}, r"min_cosine must be a number in \(0, 1\], got 0.0"),
    ({"min_cosine": 1.01}, r"min_cosine must be a number in \(0, 1\]"),
    ({"min_cosine": True}, r"min_cosine must be a number in \(0, 1\]"),
])
def test_invalid_quantization(table, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"quantization": table, "calibration": RANDOM})


def test_method_keys_are_kept():
    q = load_recipe({"quantization": {"weights": "int4", "method": "awq", "group_size": 32},
                     "calibration": RANDOM}).quantization
    assert q.group_size == 32 and q.activations == "none"
    q = load_recipe({"quantization": {"method": "smoothquant", "alpha": 0, "min_cosine": 1},
                     "calibration": RANDOM}).quantization
    assert q.alpha == 0.0 and isinstance(q.alpha, float) and q.min_cosine == 1.0


@pytest.mark.parametrize("table,what", [
    ({"method": "smoothquant"}, r'method = "smoothquant"'),
    ({"method": "gptq"}, r'method = "gptq"'),
    ({"weights": "int4", "method": "awq"}, r'method = "awq"'),
    ({"weights": "fp8"}, r'weights = "fp8" \(static activation scales\)'),
    ({"min_cosine": 0.99}, r"min_cosine \(the fidelity guard\)"),
])
def test_what_needs_calibration_says_how_to_add_it(table, what):
    with pytest.raises(RecipeError, match=r"^<dict>: \[quantization\] " + what + " " + NEEDS_DATA + "$"):
        load_recipe({"quantization": table})
    assert load_recipe({"quantization": table, "calibration": {"source": "calib/"}}).quantization.needs_calibration


@pytest.mark.parametrize("table", [{}, {"weights": "int4"}, {"weights": "int4", "group_size": 64}])
def test_rtn_int8_and_int4_need_no_calibration(table):
    q = load_recipe({"quantization": table}).quantization
    assert not q.needs_calibration


def test_calibration_table():
    recipe = load_recipe({"quantization": {"method": "smoothquant"},
                          "calibration": {"source": "calib.txt", "samples": 16, "tokenizer": "bert-base-uncased",
                                          "max_length": 64, "seed": 3}})
    assert recipe.calibration == CalibrationOptions("calib.txt", 16, False, "bert-base-uncased", 64, 3)
    assert load_recipe({"quantization": {}, "calibration": RANDOM}).calibration == CalibrationOptions(random=True)


@pytest.mark.parametrize("table,message", [
    ({}, r"give exactly one of source = \"\.\.\.\" \(real calibration data\) or random = true \(a smoke test\)"),
    ({"random": False}, r"give exactly one of source"),
    ({"source": "calib/", "random": True}, r"give exactly one of source"),
    ({"source": ""}, r"source must be a path"),
    ({"source": 3}, r"source must be a path"),
    ({"random": "yes"}, r"random must be true or false, got 'yes'"),
    ({"random": True, "samples": 0}, r"samples must be an integer >= 1, got 0"),
    ({"random": True, "samples": 2.5}, r"samples must be an integer >= 1"),
    ({"random": True, "max_length": 0}, r"max_length must be an integer >= 1"),
    ({"random": True, "seed": -1}, r"seed must be an integer >= 0"),
    ({"random": True, "tokenizer": 7}, r"tokenizer must be a Hugging Face tokenizer name or folder"),
    ({"random": True, "batch": 4}, r"\[calibration\]: unknown key\(s\) \['batch'\]"),
])
def test_invalid_calibration(table, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"quantization": {"method": "gptq"}, "calibration": table})


def test_calibration_needs_quantization():
    with pytest.raises(RecipeError, match=r"\[calibration\] without \[quantization\]"):
        load_recipe({"calibration": RANDOM})
    with pytest.raises(RecipeError, match=r"\[calibration\] must be a table"):
        load_recipe({"quantization": {}, "calibration": "calib/"})


@pytest.mark.parametrize("data", [
    {"quantization": {}},
    {"quantization": {"weights": "int4", "method": "gptq", "group_size": 64}, "calibration": {"source": "c"}},
    {"quantization": {"method": "smoothquant", "alpha": 0.5, "min_cosine": 0.99},
     "calibration": {"source": "c.txt", "tokenizer": "t", "max_length": 32, "samples": 8, "seed": 1}},
    {"quantization": {"weights": "fp8"}, "calibration": RANDOM},
    {"quantization": {"weights": "int4"}, "token_pruning": {"layers": [1], "keep": 0.5}},
])
def test_to_dict_reloads_to_the_same_recipe(data):
    recipe = load_recipe(data)
    again = load_recipe(recipe.to_dict())
    assert again == recipe
    assert all(v is not None for table in recipe.to_dict().values() for v in table.values())


def test_a_recipe_file_gives_its_folder(tmp_path):
    path = tmp_path / "int4.toml"
    path.write_text('[quantization]\nweights = "int4"\nmethod = "awq"\n\n[calibration]\nsource = "calib/"\n'
                    'samples = 32\n')
    recipe = load_recipe(path)
    assert recipe.directory == tmp_path.resolve() and load_recipe({"quantization": {}}).directory is None
    assert recipe.calibration.source == "calib/" and recipe.calibration.samples == 32
    assert recipe.to_dict()["calibration"] == {"source": "calib/", "samples": 32, "seed": 0}
