"""QuantizationPass with calibration: SmoothQuant (folded into the LayerNorm), AWQ / GPTQ /
RTN INT4 (MatMulNBits), GPTQ INT8, FP8 Q/DQ, the TensorRT encodings, and the fidelity
guard — each build against a NumPy reference of its numerics, and the methods against
RTN on data where they should win."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import trimrt
from trimrt.errors import RecipeError
from trimrt.passes import quantization as quant_pass
from trimrt.quantization import encodings
from trimrt.quantization.numerics import (
    dequantize_int4_groupwise,
    fake_quant_dynamic_uint8,
    fp8_e4m3,
    quantize_fp8_per_tensor,
)
from trimrt.quantization.smoothquant import floor_quiet_channels

D, H, OUT, TOKENS = 64, 128, 32, 12


def _mlp(rng, outlier_gamma: bool = True, salient: bool = False):
    """x [b, T, D] → LayerNorm → {q = ·W1, k = ·W2} → q + k → Relu → ·W3 → y [b, T, OUT].

    W1 and W2 read the same LayerNorm output (a SmoothQuant / AWQ group); outlier channels
    come from γ, as in transformers."""
    gamma = np.ones(D, np.float32)
    if outlier_gamma:
        gamma[[3, 17, 40]] = [25.0, -30.0, 18.0]
    beta = (0.1 * rng.standard_normal(D)).astype(np.float32)
    w1 = (rng.standard_normal((D, H)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((D, H)) / 8).astype(np.float32)
    w3 = (rng.standard_normal((H, OUT)) / 11).astype(np.float32)
    init = [onnx.numpy_helper.from_array(a, n) for a, n in
            [(gamma, "gamma"), (beta, "beta"), (w1, "w1"), (w2, "w2"), (w3, "w3")]]
    nodes = [oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             oh.make_node("MatMul", ["ln", "w1"], ["a"], name="fc_q"),
             oh.make_node("MatMul", ["ln", "w2"], ["b"], name="fc_k"),
             oh.make_node("Add", ["a", "b"], ["ab"]),
             oh.make_node("Relu", ["ab"], ["r"]),
             oh.make_node("MatMul", ["r", "w3"], ["y"], name="fc_out")]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", TOKENS, D])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", TOKENS, OUT])], init)
    weights = {"gamma": gamma, "beta": beta, "w1": w1, "w2": w2, "w3": w3}
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), weights


@pytest.fixture
def mlp(tmp_path):
    rng = np.random.default_rng(0)
    model, weights = _mlp(rng)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(6):
        np.savez(calib / f"{i:02d}.npz", x=rng.standard_normal((1, TOKENS, D)).astype(np.float32))
    test_x = rng.standard_normal((4, TOKENS, D)).astype(np.float32)
    return path, weights, str(calib), test_x


def _compile(path, quantization: dict, calib: str, out, **kw):
    recipe = {"quantization": quantization, "calibration": {"source": calib}}
    manifest = trimrt.compile(str(path), recipe, out, **kw)
    return manifest, next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")


def _run(path, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, nbits_exact=False):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if nbits_exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _layer_norm(x, gamma, beta):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * gamma + beta


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _error(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _float(weights, x):
    ln = _layer_norm(x, weights["gamma"], weights["beta"])
    return np.maximum(ln @ weights["w1"] + ln @ weights["w2"], 0) @ weights["w3"]


def _int8_codes(inits, i):
    """The signed INT8 codes of quantized layer i (stored as uint8 with a zero point of 128)."""
    return inits[f"trimrt_quant_{i}_w"].astype(np.int32) - inits[f"trimrt_quant_{i}_w_zp"].astype(np.int32)


def test_smoothquant_folds_into_the_layer_norm_and_matches_its_numerics(mlp, tmp_path):
    path, w, calib, x = mlp
    manifest, report = _compile(path, {"method": "smoothquant", "alpha": 0.5}, calib, tmp_path / "sq")
    model = tmp_path / "sq" / "model.onnx"
    assert report["matmuls_quantized"] == 3 and report["calibration"] == {"samples": 6, "source": calib}
    assert [layer["alpha"] for layer in report["layers"][:2]] == [0.5, 0.5]
    # q and k share the LayerNorm output: 1/s is folded into γ and β; fc_out reads a Relu: a Mul
    smooth = [n for n in onnx.load(str(model)).graph.node if n.name.endswith("_smooth")]
    assert [n.input[0] for n in smooth] == ["r"]
    assert {"w1", "w2", "w3", "gamma"}.isdisjoint(_initializers(model))  # the float weights are gone
    inits = _initializers(model)
    s = w["gamma"] / inits["trimrt_quant_0_ln_scale"]
    np.testing.assert_allclose(inits["trimrt_quant_0_ln_bias"], w["beta"] / s, rtol=1e-6)
    # the activations' channel maxima on the calibration set (quiet ones floored), as SmoothQuant's formula uses them
    calib_x = np.concatenate([np.load(f"{calib}/{i:02d}.npz")["x"] for i in range(6)])
    act_max = np.abs(_layer_norm(calib_x, w["gamma"], w["beta"])).reshape(-1, D).max(0)
    w_max = np.maximum(np.abs(w["w1"]).max(1), np.abs(w["w2"]).max(1))
    np.testing.assert_allclose(s, np.sqrt(floor_quiet_channels(act_max)) / np.sqrt(w_max), rtol=1e-4)
    # y = DQ(Q(ln / s)) · DQ(Q(diag(s) W)), per tensor dynamic / per channel symmetric
    ln = fake_quant_dynamic_uint8((_layer_norm(x, w["gamma"], w["beta"]) / s).astype(np.float32))
    q1 = _int8_codes(inits, 0) * inits["trimrt_quant_0_w_scale"]
    q2 = _int8_codes(inits, 1) * inits["trimrt_quant_1_w_scale"]
    np.testing.assert_allclose(q1, w["w1"] * s[:, None], atol=np.abs(w["w1"] * s[:, None]).max() / 254 + 1e-6)
    hidden = np.maximum(ln @ q1 + ln @ q2, 0) * inits["trimrt_quant_2_input_scale"]
    want = fake_quant_dynamic_uint8(hidden) @ (_int8_codes(inits, 2) * inits["trimrt_quant_2_w_scale"])
    np.testing.assert_allclose(_run(model, x), want, rtol=2e-3, atol=2e-3)


def test_smoothquant_beats_rtn_on_outlier_channels(mlp, tmp_path):
    path, w, calib, x = mlp
    ref = _float(w, x)
    _, rtn = _compile(path, {"method": "rtn"}, calib, tmp_path / "rtn")
    _, sq = _compile(path, {"method": "smoothquant"}, calib, tmp_path / "sq")
    assert 0.3 <= sq["layers"][0]["alpha"] <= 0.95  # searched
    err_rtn = _error(_run(tmp_path / "rtn" / "model.onnx", x), ref)
    err_sq = _error(_run(tmp_path / "sq" / "model.onnx", x), ref)
    assert err_sq < 0.5 * err_rtn
    assert sq["fidelity"]["cosine"] > rtn["fidelity"]["cosine"]


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_int4_builds_are_matmul_nbits_with_the_method_numerics(mlp, tmp_path, monkeypatch, method):
    monkeypatch.setattr(encodings, "NBITS_ACCURACY_LEVEL", 0)  # float compute: an exact comparison
    path, w, calib, x = mlp
    _, report = _compile(path, {"weights": "int4", "method": method, "group_size": 32}, calib, tmp_path / method)
    model = tmp_path / method / "model.onnx"
    assert _ops(model)["MatMulNBits"] == 3 and _ops(model)["MatMul"] == 0
    assert report["weight_bytes_before"] / report["weight_bytes_after"] > 3.5
    inits = _initializers(model)
    # unpack MatMulNBits' B (codes + 8, two a byte, low nibble first) back to W ≈ q · scale
    deq = {}
    for i, name in enumerate(["w1", "w2", "w3"]):
        packed, scale = inits[f"trimrt_quant_{i}_w"], inits[f"trimrt_quant_{i}_w_scale"]
        n = packed.shape[0]
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1).astype(np.int16) - 8
        deq[name] = dequantize_int4_groupwise(codes.T.astype(np.int8), scale.T, 32)
        if method == "rtn":  # round to nearest on the group's grid
            step = np.repeat(scale.T, 32, axis=0)
            assert np.all(np.abs(deq[name] - w[name]) <= step / 2 + 1e-6)
    ln = _layer_norm(x, w["gamma"], w["beta"])
    if method == "awq":  # the input scale s is folded into the LayerNorm: recover it from γ
        s = w["gamma"] / inits["trimrt_quant_0_ln_scale"]
        ln = ln / s
        assert report["layers"][0]["alpha"] == report["layers"][1]["alpha"]
    hidden = np.maximum(ln @ deq["w1"] + ln @ deq["w2"], 0)
    if method == "awq":  # fc_out reads a Relu: its 1/s is a Mul
        hidden = hidden * inits["trimrt_quant_2_input_scale"]
    want = hidden @ deq["w3"]
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-4, atol=1e-4)


def test_awq_and_gptq_are_more_faithful_than_rtn_at_int4(mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(encodings, "NBITS_ACCURACY_LEVEL", 0)
    path, w, calib, x = mlp
    ref = _float(w, x)
    errors = {}
    for method in ("rtn", "awq", "gptq"):
        _compile(path, {"weights": "int4", "method": method, "group_size": 32}, calib, tmp_path / method)
        errors[method] = _error(_run(tmp_path / method / "model.onnx", x), ref)
    assert errors["awq"] < errors["rtn"] and errors["gptq"] < errors["rtn"], errors


def test_gptq_int8_is_more_faithful_than_rtn(mlp, tmp_path):
    path, w, calib, x = mlp
    ref = _float(w, x)
    _compile(path, {"method": "gptq"}, calib, tmp_path / "gptq")
    _compile(path, {"method": "rtn"}, calib, tmp_path / "rtn")
    assert _ops(tmp_path / "gptq" / "model.onnx")["MatMulInteger"] == 3
    assert _error(_run(tmp_path / "gptq" / "model.onnx", x), ref) < _error(_run(tmp_path / "rtn" / "model.onnx", x), ref)


def test_fp8_qdq_build_matches_the_numpy_reference_at_basic_level(mlp, tmp_path):
    path, w, calib, x = mlp
    _, report = _compile(path, {"weights": "fp8"}, calib, tmp_path / "fp8")
    model = tmp_path / "fp8" / "model.onnx"
    proto = onnx.load(str(model))
    assert next(o.version for o in proto.opset_import if o.domain == "") >= 19
    assert _ops(model)["QuantizeLinear"] == 3 and report["encoding"].startswith("QuantizeLinear/DequantizeLinear FLOAT8")
    inits = _initializers(model)

    def linear(a, i):  # activation Q/DQ per tensor, weight DQ per output channel
        a_scale = inits[f"trimrt_quant_{i}_x_scale"]
        a = quantize_fp8_per_tensor(a, a_scale).astype(np.float32) * a_scale
        return a @ (inits[f"trimrt_quant_{i}_w"].astype(np.float32) * inits[f"trimrt_quant_{i}_w_scale"])

    ln = _layer_norm(x, w["gamma"], w["beta"]).astype(np.float32)
    want = linear(np.maximum(linear(ln, 0) + linear(ln, 1), 0).astype(np.float32), 2)
    got = _run(model, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the weights are E4M3 values of W / (max|W| / 448) per output column
    w_scale = inits["trimrt_quant_2_w_scale"]
    np.testing.assert_allclose(w_scale, np.abs(w["w3"]).max(0) / 448, rtol=1e-6)
    np.testing.assert_array_equal(inits["trimrt_quant_2_w"].astype(np.float32), fp8_e4m3(w["w3"] / w_scale))


def test_guard_keeps_a_planted_sensitive_layer_in_float(tmp_path):
    rng = np.random.default_rng(1)
    model, w = _mlp(rng, outlier_gamma=False)
    # fc_k's column 5 makes hidden channel 5 huge: fc_out, reading it, loses every other
    # channel to its per-tensor int8 activation grid (planted sensitivity)
    w2 = w["w2"].copy()
    w2[:, :] *= 0.05
    w2[0, 5] = 40.0
    for init in model.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(onnx.numpy_helper.from_array(w2, "w2"))
    path = tmp_path / "planted.onnx"
    onnx.save(model, str(path))
    recipe = {"quantization": {"min_cosine": 0.9999}, "calibration": {"random": True, "samples": 8}}
    manifest = trimrt.compile(str(path), recipe, tmp_path / "g")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
    fid = report["fidelity"]
    assert fid["cosine_all_quantized"] < 0.9999 <= fid["cosine"]
    assert report["kept_float"] == ["fc_out"] and min(fid["sensitivity"], key=fid["sensitivity"].get) == "fc_out"
    formats = {layer["name"]: layer["format"] for layer in report["layers"]}
    assert formats == {"fc_q": "int8", "fc_k": "int8", "fc_out": "float"}
    graph = onnx.load(str(tmp_path / "g" / "model.onnx")).graph
    assert [n.input[1] for n in graph.node if n.op_type == "MatMul"] == ["w3"]  # fc_out alone stays a float MatMul


def test_tensorrt_encodings_run_on_onnxruntime(mlp, tmp_path):
    """The TensorRT forms (static INT8 Q/DQ, INT4 blocked DQ) are standard ONNX: ONNX
    Runtime runs them, so they are checked here even without TensorRT."""
    import onnx_ir as ir

    from trimrt.recipe import load_recipe

    path, w, calib, x = mlp
    ref = _float(w, x)
    for q, ops, opset in [({}, "QuantizeLinear", 19), ({"weights": "int4", "group_size": 32}, "DequantizeLinear", 21)]:
        recipe = load_recipe({"quantization": q, "calibration": {"source": calib}})
        model = ir.load(path)
        quant_pass.QuantizationPass(recipe.quantization, recipe.calibration, None, target="tensorrt",
                                    progress=False)(model)
        assert model.opset_imports[""] == opset and not [n for n in model.graph if n.domain == "com.microsoft"]
        out = tmp_path / f"trt_{opset}.onnx"
        ir.save(model, out)
        assert _ops(out)[ops] >= 3
        got = _run(out, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, nbits_exact=True)
        assert _error(got, ref) < (0.05 if opset == 19 else 0.2)


def test_tensorrt_int8_needs_calibration(mlp):
    import onnx_ir as ir

    from trimrt.recipe import load_recipe

    path, *_ = mlp
    recipe = load_recipe({"quantization": {}})
    with pytest.raises(RecipeError, match=r"INT8 builds for tensorrt need static activation scales: add a \[calibration\]"):
        quant_pass.QuantizationPass(recipe.quantization, None, target="tensorrt").call(ir.load(path))


def test_int4_layers_whose_k_is_not_a_multiple_of_the_group_stay_float(mlp, tmp_path):
    path, *_ = mlp
    manifest = trimrt.compile(str(path), {"quantization": {"weights": "int4", "group_size": 128}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
    reasons = {layer["name"]: layer.get("reason") for layer in report["layers"]}
    assert reasons["fc_q"] == "K = 64 input rows are not a multiple of group_size = 128"
    assert reasons["fc_out"] is None and report["matmuls_quantized"] == 1
