"""inspect / compile show what quantization did: counts, bytes, fidelity, float layers, fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.cli_compile import compile_with_recipe
from trimrt.cli import main
from trimrt.inspect import fidelity_text, fusion_line, human_bytes, inspect_target, quantization_line, quantization_summary

# a guard this strict keeps some layers float on the tiny ViT (all quantized: ~0.9999)
RECIPE = """
[quantization]
method = "smoothquant"
min_cosine = 0.99999

[calibration]
random = true
samples = 4

[onnxruntime]
fuse = true
"""


@pytest.fixture(scope="module")
def quantized_build(tiny_vit_onnx, tmp_path_factory):
    """(build dir, compile output, the quantization report, the fusion report)."""
    _, model = tiny_vit_onnx
    tmp = tmp_path_factory.mktemp("inspect_quant")
    with pytest.warns(UserWarning, match="random data"):
        result = compile_with_recipe(model, RECIPE, tmp)
    manifest = json.loads((tmp / "build" / "manifest.json").read_text())
    reports = {p["pass"]: p["report"] for p in manifest["passes"]}
    return tmp / "build", result.output, reports["quantization"], reports["ort_fusion"]


def _expected(report: dict) -> dict:
    """The facts, recomputed from the per-layer entries of the report."""
    layers = report["layers"]
    floats = [x["name"] for x in layers if x["format"] == "float"]
    return {"total": len(layers), "quantized": len(layers) - len(floats), "floats": floats,
            "before": sum(4 * int(np.prod(x["shape"])) for x in layers)}


def test_inspect_dict_holds_the_quantization_facts(quantized_build):
    build, _, report, fusion = quantized_build
    want = _expected(report)
    q = inspect_target(str(build))["quantization"]
    assert (q["weights"], q["activations"], q["method"]) == ("int8", "int8", "smoothquant")
    assert "MatMulInteger" in q["encoding"]
    assert (q["quantized"], q["linear_layers"]) == (want["quantized"], want["total"])
    assert 0 < want["quantized"] < want["total"], "the strict guard should keep some layers, not all, float"
    assert q["weight_bytes_before"] == want["before"]
    assert q["weight_bytes_after"] < want["before"]
    assert q["weight_ratio"] == pytest.approx(want["before"] / q["weight_bytes_after"], rel=1e-3)
    assert q["calibration"] == {"samples": 4, "source": "random"}
    assert q["fidelity"]["min_cosine"] == 0.99999 and q["fidelity"]["cosine"] >= 0.99999
    assert q["fidelity"]["cosine_all_quantized"] < q["fidelity"]["cosine"]
    # the float layers: every one of them, the guard's in its order (most sensitive first)
    kept = [x["name"] for x in q["kept_float"]]
    assert sorted(kept) == sorted(want["floats"]) and kept[:len(report["kept_float"])] == report["kept_float"]
    assert all(x["reason"] == "fidelity guard" for x in q["kept_float"] if x["name"] in report["kept_float"])
    sensitivity = report["fidelity"]["sensitivity"]
    for row in q["layers"]:
        assert row.get("cosine_alone") == sensitivity.get(row["name"])
    assert inspect_target(str(build))["onnxruntime_fusion"] == fusion


def test_inspect_json_is_complete(quantized_build):
    build, _, report, _ = quantized_build
    result = CliRunner().invoke(main, ["inspect", str(build), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["quantization"] == json.loads(json.dumps(inspect_target(str(build))["quantization"]))
    assert len(info["quantization"]["layers"]) == len(report["layers"])
    assert {p["pass"] for p in info["passes"]} >= {"quantization", "ort_fusion"}


def test_inspect_cli_prints_the_quantization_section(quantized_build):
    build, _, report, fusion = quantized_build
    want = _expected(report)
    out = CliRunner().invoke(main, ["inspect", str(build)])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "quantization: int8, method smoothquant" in text
    assert f"{want['quantized']} of {want['total']} linear layers quantized" in text
    ratio = want["before"] / report["weight_bytes_after"]
    assert (f"weights: {human_bytes(want['before'])} → {human_bytes(report['weight_bytes_after'])} "
            f"({ratio:.2f}× smaller)") in text
    assert "calibration: 4 samples from random data" in text
    assert (f"fidelity on the calibration set: cosine {report['fidelity']['cosine']:.6f} on 4 random calibration "
            f"samples (guard: min_cosine 0.99999, all quantized {report['fidelity']['cosine_all_quantized']:.6f})") in text
    for name in report["kept_float"]:
        assert f"kept float: {name} (fidelity guard, cosine with only it quantized" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("node_MatMul", "node_Gemm"))]
    assert [r[0] for r in rows] == [x["name"] for x in report["layers"]]
    for row, layer in zip(rows, report["layers"]):
        assert row[1] == "×".join(map(str, layer["shape"])) and row[2] == layer["format"]
        if "alpha" in layer:
            assert float(row[3]) == layer["alpha"]
    assert "  " + fusion_line(fusion) in text
    assert "structure: not analysed" in text


def test_compile_prints_one_line_each_for_quantization_and_fusion(quantized_build):
    _, output, report, fusion = quantized_build
    want = _expected(report)
    lines = output.splitlines()
    build_line = next(i for i, line in enumerate(lines) if line.startswith("build written"))
    quant = next(line for line in lines if line.startswith("quantization: "))
    assert lines.index(quant) > build_line
    assert quant.startswith(f"quantization: {want['quantized']}/{want['total']} linear layers int8 (smoothquant), "
                            f"weights {human_bytes(want['before'])} → {human_bytes(report['weight_bytes_after'])}")
    assert f"cosine {report['fidelity']['cosine']:.6f} on 4 random calibration samples" in quant
    assert quant.endswith(f"kept float: {', '.join(report['kept_float'])} (fidelity guard)")
    assert fusion_line(fusion) in lines
    if fusion["applied"]:
        assert all(f"{k} ×{v}" in fusion_line(fusion) for k, v in fusion["fused"].items())
    else:
        assert fusion_line(fusion).startswith(f"ONNX Runtime fusion: not applied ({fusion['reason']})")


def test_summary_lines_for_int4_weight_only_without_calibration():
    """RTN INT4: no calibration, so no fidelity; a skipped layer is listed with its reason."""
    report = {"weights": "int4", "activations": "none", "method": "rtn", "encoding": "MatMulNBits",
              "matmuls_quantized": 2, "matmuls_float": 1, "group_size": 32,
              "weight_bytes_before": 3 * 4096 * 4, "weight_bytes_after": 2 * (2048 + 4096 // 32 * 4) + 4096 * 4,
              "layers": [{"name": "a", "shape": [64, 64], "format": "int4"},
                         {"name": "b", "shape": [64, 64], "format": "float", "reason": "K not a multiple of 32"},
                         {"name": "c", "shape": [64, 64], "format": "int4"}]}
    q = quantization_summary(report)
    assert q["group_size"] == 32 and q["fidelity"] is None and q["kept_float"] == [
        {"name": "b", "reason": "K not a multiple of 32"}]
    assert q["weight_ratio"] == pytest.approx(49152 / 21504, rel=1e-3)
    assert quantization_line(q) == ("quantization: 2/3 linear layers int4 weight-only (rtn), weights 49.2 kB → 21.5 kB "
                                    "(2.3× smaller), fidelity not measured (no [calibration] data); "
                                    "kept float: b (K not a multiple of 32)")


def test_fidelity_text_names_the_held_out_cosine_and_the_fitted_one():
    """min_cosine applies to the held-out cosine: it comes first, the fit's beside it."""
    summary = {"calibration": {"samples": 48, "source": "calib.txt", "fit": 36, "held_out": 12},
               "fidelity": {"measured_on": "held-out", "samples": 12, "cosine": 0.9913, "cosine_fit": 0.99251,
                            "samples_fit": 32, "min_cosine": 0.99, "cosine_all_quantized": 0.9913}}
    assert fidelity_text(summary) == ("cosine 0.991300 on 12 held-out calibration samples (0.992510 on 32 fitted "
                                      "ones) (guard: min_cosine 0.99, all quantized 0.991300)")
    summary["fidelity"].update(measured_on="fit", samples=6)
    assert fidelity_text(summary).startswith("cosine 0.991300 on 6 calibration samples (guard:")


def test_fusion_line_and_bytes():
    applied = {"applied": True, "fused": {"mha_no_past": 6, "skip_layer_norm": 12}, "max_relative_error": 2.1e-6,
               "contrib_ops": ["MultiHeadAttention", "SkipLayerNormalization"]}
    assert fusion_line(applied) == ("ONNX Runtime fusion: mha_no_past ×6, skip_layer_norm ×12 → MultiHeadAttention, "
                                    "SkipLayerNormalization (max relative error vs unfused 2.1e-06)")
    assert fusion_line({"applied": False, "reason": "no pattern matched"}) == \
        "ONNX Runtime fusion: not applied (no pattern matched)"
    asks = {**applied, "session": {"disabled_optimizers": ["SkipLayerNormFusion"]}}
    assert fusion_line(asks) == fusion_line(applied) + "; the build disables ONNX Runtime's SkipLayerNormFusion"
    assert [human_bytes(n) for n in (999, 1000, 86_000_000, 2.5e9)] == ["999 B", "1.0 kB", "86.0 MB", "2.5 GB"]
