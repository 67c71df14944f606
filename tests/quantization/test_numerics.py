"""Number formats: the codes follow the formulas, and where ONNX has an operator for the
format, ONNX Runtime computes the same numbers as the NumPy arithmetic."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from trimrt.quantization.numerics import (
    FP8_E4M3,
    dequantize_fp8,
    dequantize_int4_groupwise,
    dequantize_int8_per_channel,
    fake_quant_dynamic_uint8,
    fp8_e4m3,
    fp8_scale,
    quantize_fp8_per_tensor,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from trimrt.quantization.numerics import quantize_int8_per_channel as quantize_weight


def _run(nodes, inputs, outputs, initializers, x, opset):
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x} if x is not None else {})[0]


def test_int8_per_channel_formula_and_zero_column():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 12)) * rng.uniform(0.01, 5, 12)).astype(np.float32)
    w[:, 5] = 0
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (12,)
    live = np.arange(12) != 5
    np.testing.assert_allclose(scale[live], np.abs(w[:, live]).max(0) / 127, rtol=1e-6)
    assert scale[5] == 1 and np.all(q[:, 5] == 0)
    assert np.all(np.abs(q[:, live]).max(0) == 127)
    assert np.all(np.abs(dequantize_int8_per_channel(q, scale) - w) <= scale / 2 * (1 + 1e-6))
    q_pass, scale_pass = quantize_weight(w)  # the first slice's formula, unchanged
    np.testing.assert_array_equal(q, q_pass)
    np.testing.assert_array_equal(scale, scale_pass)


def test_int4_groupwise_formula():
    rng = np.random.default_rng(1)
    k, n, g = 64, 10, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[16:32, 2] = 0  # one zero group
    q, scale = quantize_int4_groupwise(w, g)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (k // g, n)
    assert q.min() >= -8 and q.max() <= 7
    for group in range(k // g):
        rows = w[group * g:(group + 1) * g]
        expected = np.abs(rows).max(0) / 7
        expected[expected == 0] = 1
        np.testing.assert_allclose(scale[group], expected, rtol=1e-6)
        np.testing.assert_array_equal(q[group * g:(group + 1) * g],
                                      np.clip(np.rint(rows / scale[group]), -8, 7))
    assert scale[1, 2] == 1 and np.all(q[16:32, 2] == 0)
    deq = dequantize_int4_groupwise(q, scale, g)
    assert deq.dtype == np.float32
    assert np.all(np.abs(deq - w) <= np.repeat(scale, g, 0) / 2 * (1 + 1e-6))


def test_int4_clip_ratio_scalar_and_per_group():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 6)).astype(np.float32)
    _, full = quantize_int4_groupwise(w, 8)
    q, half = quantize_int4_groupwise(w, 8, clip_ratio=0.5)
    np.testing.assert_allclose(half, full * 0.5, rtol=1e-6)
    assert np.sum(q == 7) + np.sum(q == -8) > np.sum(quantize_int4_groupwise(w, 8)[0] == 7)  # outliers clip
    ratios = rng.uniform(0.5, 1.0, size=(4, 6))
    _, per_group = quantize_int4_groupwise(w, 8, clip_ratio=ratios)
    np.testing.assert_allclose(per_group, full * ratios, rtol=1e-6)


def test_int4_group_size_must_divide_k():
    with pytest.raises(ValueError, match="K = 30.*group_size = 8"):
        quantize_int4_groupwise(np.ones((30, 4), np.float32), 8)
    q, scale = quantize_int4_groupwise(np.ones((30, 4), np.float32), None)  # one group
    assert scale.shape == (1, 4) and np.all(q == 7)


def test_int4_dequantize_matches_onnx_blocked_dequantize_linear():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    q, scale = quantize_int4_groupwise(w, 16)
    q_init = onnx.numpy_helper.from_array(q.astype(ml_dtypes.int4), "q")
    s_init = onnx.numpy_helper.from_array(scale, "s")
    node = oh.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0, block_size=16)
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 8])
    got = _run([node], [], [y], [q_init, s_init], None, 21)
    np.testing.assert_array_equal(got, dequantize_int4_groupwise(q, scale, 16))


def test_dynamic_uint8_matches_onnx_runtime():
    rng = np.random.default_rng(4)
    nodes = [oh.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             oh.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    x_info = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 16])
    y_info = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 16])
    for x in (rng.standard_normal((50, 16)) * 3 + 1, rng.uniform(0.5, 2, (50, 16)), -rng.uniform(0.5, 2, (50, 16))):
        x = x.astype(np.float32)
        got = _run(nodes, [x_info], [y_info], [], x, 13)
        want = fake_quant_dynamic_uint8(x)
        np.testing.assert_array_equal(got, want)
        lo, hi = min(0.0, x.min()), max(0.0, x.max())
        assert np.abs(want - x).max() <= (hi - lo) / 255 * 0.5 + 1e-6  # within half a step
    assert np.all(fake_quant_dynamic_uint8(np.zeros((3, 4), np.float32)) == 0)


def test_fp8_rounding_and_saturation():
    x = np.array([0.0, 1.0, 1.0625, 1.1875, 448.0, 460.0, 1000.0, -1e9, np.inf, -np.inf, 2.0 ** -9, 2.0 ** -11],
                 np.float32)
    got = fp8_e4m3(x)
    # 1.0625 is halfway between 1 and 1.125 (3 mantissa bits): ties to even -> 1;
    # 1.1875 is halfway between 1.125 and 1.25 -> 1.25 (even mantissa); 2^-9 is the
    # smallest subnormal, 2^-11 rounds to 0
    want = np.array([0, 1, 1, 1.25, 448, 448, 448, -448, 448, -448, 2.0 ** -9, 0], np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(fp8_e4m3(np.array([np.nan], np.float32)))[0]
    assert fp8_scale(896.0) == 2 and fp8_scale(0.0) == 1


def test_fp8_quantize_linear_matches_onnx_runtime():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((30, 16)) * 200).astype(np.float32)
    x[0, :3] = [5000, -5000, 0]  # saturates
    scale = np.float32(0.75)
    zp = onnx.numpy_helper.from_array(np.zeros((), FP8_E4M3), "zp")
    nodes = [oh.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             oh.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    x_info = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [30, 16])
    y_info = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [30, 16])
    got = _run(nodes, [x_info], [y_info], [onnx.numpy_helper.from_array(scale.reshape(()), "s"), zp], x, 19)
    codes = quantize_fp8_per_tensor(x, scale)
    assert codes.dtype == FP8_E4M3
    want = dequantize_fp8(codes, scale)
    np.testing.assert_array_equal(got, want)
    assert want[0, 0] == 448 * 0.75 and want[0, 1] == -448 * 0.75
    np.testing.assert_array_equal(want, fp8_e4m3(x / scale) * scale)
