"""verify on quantized builds: the header says what is quantized, and --per-pass rebuilds
the quantization with its calibration data (relative sources) and the ORT fusion step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner

from trimrt.cli import main
from trimrt.verification import quantization_facts

TOKENS, D, H = 8, 32, 64

RECIPE = """
[quantization]
method = "smoothquant"

[calibration]
source = "calib"
samples = 6
"""


def _mlp(rng) -> onnx.ModelProto:
    """x [b, T, D] → LayerNorm (outlier γ channels) → ·W1 → Relu → ·W2 → y [b, T, D]."""
    gamma = np.ones(D, np.float32)
    gamma[[2, 9]] = [20.0, -15.0]
    arrays = {"gamma": gamma, "beta": (0.1 * rng.standard_normal(D)).astype(np.float32),
              "w1": (rng.standard_normal((D, H)) / 6).astype(np.float32),
              "w2": (rng.standard_normal((H, D)) / 8).astype(np.float32)}
    nodes = [oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1),
             oh.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
             oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", TOKENS, D])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", TOKENS, D])],
                          [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])


@pytest.fixture
def project(tmp_path):
    """A recipe folder holding the model, a relative calibration folder of .npz feeds and
    the recipe; plus another folder to run commands from."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "project"
    (folder / "calib").mkdir(parents=True)
    onnx.save(_mlp(rng), folder / "mlp.onnx")
    for i in range(6):
        np.savez(folder / "calib" / f"{i:02d}.npz", x=rng.standard_normal((1, TOKENS, D)).astype(np.float32))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return folder, elsewhere


def _compile(folder, recipe_text: str, monkeypatch, cwd):
    (folder / "recipe.toml").write_text(recipe_text)
    monkeypatch.chdir(cwd)  # compile reads the relative source from the recipe's folder, wherever it runs
    result = CliRunner().invoke(main, ["compile", str(folder / "mlp.onnx"), "-o", str(folder / "build"),
                                       "--recipe", str(folder / "recipe.toml")])
    assert result.exit_code == 0, result.output
    return json.loads((folder / "build" / "manifest.json").read_text())


def _verify(folder, *extra):
    return CliRunner().invoke(main, ["verify", str(folder / "build"), "--reference", str(folder / "mlp.onnx"),
                                     "--samples", "3", *extra])


def test_per_pass_rebuilds_quantization_with_its_relative_calibration(project, monkeypatch):
    folder, elsewhere = project
    manifest = _compile(folder, RECIPE, monkeypatch, cwd=elsewhere)
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
    assert report["matmuls_quantized"] == 2 and report["calibration"]["samples"] == 6

    assert manifest["recipe_dir"] == str(folder.resolve())  # the relative source resolves there, from anywhere
    result = _verify(folder, "--per-pass", "--json")
    assert result.exit_code == 0, result.output
    verified = json.loads(result.output)
    (step,) = verified["per_pass"]
    assert step["passes"] == ["quantization"]
    # the rebuild with the same calibration data is the build itself
    assert step["cosine_mean"]["y"] == pytest.approx(verified["outputs"][0]["cosine_mean"], abs=1e-6)
    assert 0.99 < step["cosine_mean"]["y"] < 1.0
    assert verified["quantization"] == {"weights": "int8", "activations": "int8", "method": "smoothquant",
                                        "quantized": 2, "linear_layers": 2,
                                        "calibration_cosine": report["fidelity"]["cosine"]}


def test_per_pass_adds_onnxruntime_fusion_where_it_ran(project, monkeypatch):
    folder, _ = project
    manifest = _compile(folder, RECIPE + "\n[onnxruntime]\nfuse = true\n", monkeypatch, cwd=folder)
    ran = [p["pass"] for p in manifest["passes"]]
    first, second = sorted(["quantization", "onnxruntime"],
                           key=lambda t: ran.index({"onnxruntime": "ort_fusion"}.get(t, t)))
    result = _verify(folder, "--per-pass", "--json")
    assert result.exit_code == 0, result.output
    verified = json.loads(result.output)
    assert [s["passes"] for s in verified["per_pass"]] == [[first], [first, second]]
    # the last step is the whole recipe: it reproduces the build's own cosine
    assert verified["per_pass"][-1]["cosine_mean"]["y"] == pytest.approx(verified["outputs"][0]["cosine_mean"], abs=1e-6)


def test_verify_header_names_the_quantization(project, monkeypatch):
    folder, _ = project
    manifest = _compile(folder, RECIPE, monkeypatch, cwd=folder)
    cosine = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")["fidelity"]["cosine"]
    result = _verify(folder, "--per-pass")
    assert result.exit_code == 0, result.output
    assert "(3 samples, quantized int8 smoothquant)" in result.output
    assert (f"quantized build (2/2 linear layers int8, smoothquant): the cosines above are its fidelity against the "
            f"float model; at compile time, on its calibration set: cosine {cosine:.6f}") in result.output
    assert "after quantization: mean cosine y 0.99" in result.output


def test_unquantized_builds_have_no_quantization_facts():
    assert quantization_facts({"passes": [{"pass": "token_pruning", "report": {}}]}) is None
    float_only = {"matmuls_quantized": 0, "matmuls_float": 3, "weights": "int8", "method": "rtn"}
    assert quantization_facts({"passes": [{"pass": "quantization", "report": float_only}]}) is None


def test_per_pass_names_a_calibration_source_that_is_gone(project, monkeypatch):
    import shutil

    folder, elsewhere = project
    _compile(folder, RECIPE, monkeypatch, cwd=elsewhere)
    shutil.rmtree(folder / "calib")
    lost = _verify(folder, "--per-pass")
    assert lost.exit_code == 2, lost.output
    last = [line for line in lost.output.splitlines() if line.strip()][-1]
    assert last.startswith("error: per-pass drift") and "'calib'" in last and str(folder.resolve()) in last
