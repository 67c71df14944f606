"""Quantized MatMul encodings: each one-MatMul model runs on ONNX Runtime CPU and equals a
NumPy reference of the numerics written from the op specs (DynamicQuantizeLinear,
MatMulNBits, blocked DequantizeLinear, QuantizeLinear with INT8 / FP8 E4M3 saturation)."""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort
import pytest

from trimrt.errors import BuildError
from trimrt.passes.base import GraphBuilder
from trimrt.quantization import encodings
from trimrt.registry import QUANTIZED_ENCODINGS

K, N = 256, 48
TAG = "trimrt.pass"


def _builder(graph: ir.Graph, prefix: str = "q") -> GraphBuilder:
    """The quantization pass's builder: nodes tagged with the pass, named after `prefix`."""
    return GraphBuilder(graph, "quantization", prefix)


def _one(encode, prefix: str = "q"):
    """A `_model` build of one encoded MatMul: encode(builder, x) -> its output."""
    def build(graph, x):
        b = _builder(graph, prefix)
        out = encode(b, x)
        return list(b.nodes), [out]

    return build


def required_opsets(encoding: str) -> dict[str, int]:
    """Minimum opset per domain a model needs for `encoding` (a name in QUANTIZED_ENCODINGS)."""
    if encoding not in QUANTIZED_ENCODINGS:
        raise BuildError(f"unknown quantized encoding {encoding!r}: use one of {', '.join(QUANTIZED_ENCODINGS)}")
    return dict(QUANTIZED_ENCODINGS[encoding].opsets)


def _model(encoding: str, build, k: int = K) -> tuple[ir.Model, list[ir.Node]]:
    """A model of x [b, s, k] -> the encoder's output(s), with the opsets it asks for."""
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", k]), type=ir.TensorType(ir.DataType.FLOAT))
    opsets = {"": 18}
    for domain, version in required_opsets(encoding).items():
        opsets[domain] = max(opsets.get(domain, 0), version)
    graph = ir.Graph([x], [], nodes=[], opset_imports=opsets, name="mm")
    nodes, outputs = build(graph, x)
    graph.extend(nodes)
    for i, out in enumerate(outputs):
        out.name = f"y{i}"
        graph.outputs.append(out)
    return ir.Model(graph, ir_version=10), nodes


def _run(model: ir.Model, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, config=None,
         optimized_path=None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _int4_weight(rng, k: int, n: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    q[:group_size, 0] = [-8, 7] * (group_size // 2)  # both ends of the range, alternating nibbles
    scale = rng.uniform(0.005, 0.05, size=(k // group_size, n)).astype(np.float32)
    return q, scale


def _dequant_groupwise(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    """W[k, n] = q[k, n] · scale[k // g, n], in float64."""
    return q.astype(np.float64) * np.repeat(scale.astype(np.float64), group_size, axis=0)


def _dynamic_quantize(x: np.ndarray):
    """ONNX DynamicQuantizeLinear: uint8, the range widened to include 0, zero point rounded."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return np.clip(np.rint(x / scale) + zp, 0, 255), scale, zp


def _tagged_and_named(nodes: list[ir.Node]) -> bool:
    return all(n.metadata_props.get(TAG) == "quantization" and n.name for n in nodes)


def test_int8_dynamic_equals_the_reference_and_shares_the_activation_quantization():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((64, n)).astype(np.float32) for n in (24, 40)]
    quantized = []
    for w in weights:
        scale = (np.abs(w).max(0) / 127).astype(np.float32)
        quantized.append((np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale))
    shared = {}

    def build(graph, x):
        outs, nodes = [], []
        for i, (q, scale) in enumerate(quantized):
            b = _builder(graph, f"q{i}")
            outs.append(encodings.int8_dynamic(b, x, q, scale, shared=shared))
            nodes += b.nodes
        return nodes, outs

    model, nodes = _model("int8_dynamic", build, k=64)
    ops = Counter(n.op_type for n in nodes)
    assert ops == {"DynamicQuantizeLinear": 1, "MatMulInteger": 2, "Cast": 2, "Mul": 4}
    assert _tagged_and_named(nodes) and len(shared) == 1
    assert [list(v.shape) for v in model.graph.outputs] == [["b", "s", 24], ["b", "s", 40]]
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    got = _run(model, x)
    xq, x_scale, x_zp = _dynamic_quantize(x)
    for (q, scale), y in zip(quantized, got):
        want = ((xq - x_zp) @ q.astype(np.float64)) * (x_scale * scale)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_int8_dynamic_is_exact_where_u8s8_kernels_saturate():
    """Activation codes near 255 against weight codes near ±127: pairs of products overflow
    int16, where ONNX Runtime's U8S8 kernels on AVX2 CPUs without VNNI saturate. The
    encoding must give the exact integer products on every CPU."""
    rng = np.random.default_rng(1)
    q = rng.choice(np.array([-127, 127], np.int8), size=(64, 32))
    scale = np.full(32, 0.01, np.float32)
    model, _ = _model("int8_dynamic", _one(lambda b, x: encodings.int8_dynamic(b, x, q, scale)), k=64)
    x = np.abs(rng.standard_normal((2, 16, 64))).astype(np.float32)
    x[..., ::2] += 40.0  # outliers: most activation codes near the top of the uint8 range
    x[0, 0, 0] = -1.0  # a zero point above 0
    xq, x_scale, x_zp = _dynamic_quantize(x)
    want = ((xq - x_zp) @ q.astype(np.float64)) * (x_scale * scale)
    (got,) = _run(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_int8_dynamic_weights_run_as_int8_where_that_is_exact(tmp_path):
    """The runtime stores nothing new: on a VNNI CPU it runs the uint8 codes (zero point 128) as
    int8 codes (zero point 0), the same integer products through ONNX Runtime's faster U8S8
    kernels; a weight something else also reads stays as it is."""
    from trimrt.runtime.backends import exact_u8s8, signed_int8_model

    rng = np.random.default_rng(2)
    qs = [rng.choice(np.array([-127, 127], np.int8), size=(64, 32)), rng.integers(-127, 128, (64, 16)).astype(np.int8)]
    scale = np.full(32, 0.01, np.float32)

    def build(graph, x):
        outs, nodes = [], []
        for i, q in enumerate(qs):
            b = _builder(graph, f"q{i}")
            outs.append(encodings.int8_dynamic(b, x, q, scale[:q.shape[1]]))
            nodes += b.nodes
        return nodes, outs

    model, _ = _model("int8_dynamic", build, k=64)
    proto = ir.serde.serialize_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    converted, count = signed_int8_model(path)
    assert count == 2 and onnx.load(path) == proto  # the file is left as it is
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(converted).graph.initializer}
    for i, q in enumerate(qs):
        np.testing.assert_array_equal(weights[f"q{i}_w"], q)
        assert weights[f"q{i}_w_zp"].dtype == np.int8 and weights[f"q{i}_w_zp"] == 0
    if exact_u8s8():  # the saturating case of the test above: equal to the stored form, bit for bit
        x = np.abs(rng.standard_normal((2, 16, 64))).astype(np.float32)
        x[..., ::2] += 40.0
        runs = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})
                for m in (proto.SerializeToString(), converted)]
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a, b)
    # q0's weight also read by another node: only q1 converts
    proto.graph.node.append(onnx.helper.make_node("Identity", ["q0_w"], ["w_copy"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("w_copy", onnx.TensorProto.UINT8, [64, 32]))
    onnx.save(proto, path)
    converted, count = signed_int8_model(path)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(converted).graph.initializer}
    assert count == 1 and weights["q0_w"].dtype == np.uint8 and weights["q1_w"].dtype == np.int8
    ort.InferenceSession(converted, providers=["CPUExecutionProvider"])  # still a valid model


def test_matmul_nbits_packs_two_codes_per_byte_low_nibble_first():
    q = np.array([[-8, 7], [7, -8], [0, 1], [-1, 2]] * 4, np.int8)  # K=16, N=2
    packed = encodings.pack_matmul_nbits(q, 16)
    assert packed.shape == (2, 1, 8) and packed.dtype == np.uint8
    assert packed[0, 0, :2].tolist() == [0 | 15 << 4, 8 | 7 << 4]  # codes q + 8: column 0 is -8, 7, 0, -1
    assert packed[1, 0, :2].tolist() == [15 | 0 << 4, 9 | 10 << 4]


@pytest.mark.parametrize("group_size", [32, 128])
def test_matmul_nbits_at_accuracy_level_0_equals_x_times_the_dequantized_weight(group_size):
    rng = np.random.default_rng(group_size)
    q, scale = _int4_weight(rng, K, N, group_size)
    model, nodes = _model("int4_matmul_nbits", _one(lambda b, x: encodings.int4_matmul_nbits(
        b, x, q, scale, group_size, accuracy_level=0)))
    (node,) = nodes
    assert (node.domain, node.op_type) == ("com.microsoft", "MatMulNBits") and _tagged_and_named(nodes)
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    assert attrs == {"K": K, "N": N, "bits": 4, "block_size": group_size, "accuracy_level": 0}
    assert node.inputs[1].const_value.shape == (N, K // group_size, group_size // 2)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    (got,) = _run(model, x)
    want = x.astype(np.float64) @ _dequant_groupwise(q, scale, group_size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_matmul_nbits_at_accuracy_level_4_quantizes_the_activation():
    rng = np.random.default_rng(7)
    q, scale = _int4_weight(rng, K, N, 32)
    model, _ = _model("int4_matmul_nbits",
                      _one(lambda b, x: encodings.int4_matmul_nbits(b, x, q, scale, 32)))
    x = rng.standard_normal((1, 4, K)).astype(np.float32)
    (got,) = _run(model, x)
    want = x.astype(np.float64) @ _dequant_groupwise(q, scale, 32)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-6 < error < 0.03  # int8 activations: close, not exact


@pytest.mark.parametrize("group_size", [32, 128])
def test_blocked_dq_stores_4_bits_and_equals_x_times_the_dequantized_weight(group_size, tmp_path):
    rng = np.random.default_rng(10 + group_size)
    q, scale = _int4_weight(rng, K, N, group_size)
    model, nodes = _model("int4_blocked_dq", _one(lambda b, x: encodings.int4_blocked_dq(
        b, x, q, scale, group_size)))
    assert [n.op_type for n in nodes] == ["DequantizeLinear", "MatMul"] and _tagged_and_named(nodes)
    assert model.opset_imports[""] == 21
    weight = model.graph.initializers["q_w"].const_value
    assert weight.dtype == ir.DataType.INT4 and weight.nbytes == K * N // 2
    proto = ir.serde.serialize_model(model)
    assert len(proto.SerializeToString()) < K * N // 2 + scale.nbytes + 1024
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    want = x.astype(np.float64) @ _dequant_groupwise(q, scale, group_size)
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * np.abs(want).max()}
    (plain,) = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # the DequantizeLinear itself
    np.testing.assert_allclose(plain, want, **tolerance)
    optimized = tmp_path / "optimized.onnx"
    (fused,) = _run(model, x, config={"session.qdq_matmulnbits_accuracy_level": "0"}, optimized_path=optimized)
    np.testing.assert_allclose(fused, want, **tolerance)
    assert "MatMulNBits" in {n.op_type for n in ir.load(optimized).graph}  # ORT fuses the blocked DQ + MatMul


def _qdq_model(dtype: str, x_scale: float, q_w: np.ndarray, w_scale: np.ndarray):
    return _model(f"qdq_{dtype}", k=q_w.shape[0],
                  build=_one(lambda b, x: encodings.qdq_static(b, x, x_scale, q_w, w_scale, dtype)))


def _activations(rng, k: int, limit: float) -> np.ndarray:
    """Normal activations plus values past the saturation limit, both signs."""
    x = rng.standard_normal((2, 4, k)).astype(np.float32)
    x[0, 0, :8] = np.array([1.5, -1.5, 3, -3, 10, -10, 1.01, -1.01], np.float32) * limit
    return x


def test_qdq_int8_equals_the_reference_with_saturation():
    rng = np.random.default_rng(20)
    k, n, x_scale = 64, 40, 0.02  # |x| beyond 127 · 0.02 = 2.54 saturates
    q_w = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, size=n).astype(np.float32)
    model, nodes = _qdq_model("int8", x_scale, q_w, w_scale)
    assert [n.op_type for n in nodes] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
    assert _tagged_and_named(nodes) and model.graph.initializers["q_w"].const_value.dtype == ir.DataType.INT8
    x = _activations(rng, k, 127 * x_scale)
    (got,) = _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    x_dq = np.clip(np.rint(x / np.float32(x_scale)), -128, 127).astype(np.float64) * np.float32(x_scale)
    want = x_dq @ (q_w.astype(np.float64) * w_scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(x_dq).max() == pytest.approx(128 * x_scale)  # the reference did saturate


def test_qdq_fp8_equals_the_reference_with_saturation():
    rng = np.random.default_rng(30)
    k, n, x_scale = 64, 40, 0.01  # |x| beyond 448 · 0.01 = 4.48 saturates
    q_w = np.clip(rng.standard_normal((k, n)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    w_scale = rng.uniform(0.001, 0.01, size=n).astype(np.float32)
    model, nodes = _qdq_model("fp8", x_scale, q_w, w_scale)
    weight = model.graph.initializers["q_w"].const_value
    assert weight.dtype == ir.DataType.FLOAT8E4M3FN and weight.nbytes == k * n
    assert model.graph.initializers["q_x_zp"].const_value.dtype == ir.DataType.FLOAT8E4M3FN
    x = _activations(rng, k, 448 * x_scale)
    (got,) = _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    scaled = np.clip(x / np.float32(x_scale), -448, 448)  # QuantizeLinear saturates; a bare cast would give NaN
    x_dq = scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * np.float32(x_scale)
    want = x_dq @ (q_w.astype(np.float64) * w_scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(x_dq).max() == pytest.approx(448 * x_scale)


def test_required_opsets_and_refusals():
    assert required_opsets("int4_matmul_nbits") == {"com.microsoft": 1}
    assert required_opsets("int4_blocked_dq") == {"": 21}
    assert required_opsets("qdq_fp8") == {"": 19}
    with pytest.raises(BuildError, match="unknown quantized encoding"):
        required_opsets("int3")
    graph = ir.Graph([], [], nodes=[])
    x = ir.Value(name="x", shape=ir.Shape([1, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    q = np.zeros((64, 8), np.int8)
    scale = np.ones((2, 8), np.float32)
    with pytest.raises(BuildError, match=r"in \[-8, 7\]"):
        encodings.int4_matmul_nbits(_builder(graph, "a"), x, q + 9, scale, 32)
    with pytest.raises(BuildError, match="not a multiple of group_size"):
        encodings.int4_blocked_dq(_builder(graph, "b"), x, q, np.ones((1, 8), np.float32), 48)
    with pytest.raises(BuildError, match="power-of-two"):
        encodings.int4_matmul_nbits(_builder(graph, "c"), x, q, np.ones((8, 8), np.float32), 8)
    with pytest.raises(BuildError, match="E4M3 grid"):
        encodings.qdq_static(_builder(graph, "d"), x, 0.1, np.full((64, 8), 0.3, np.float32), np.ones(8, np.float32),
                             "fp8")
    with pytest.raises(BuildError, match="'int8' or 'fp8'"):
        encodings.qdq_static(_builder(graph, "e"), x, 0.1, q, np.ones(8, np.float32), "int4")
    with pytest.raises(BuildError, match="has 64 features but the weight has K=32"):
        encodings.int8_dynamic(_builder(graph, "f"), x, q[:32], np.ones(8, np.float32))
    assert not graph.initializers  # a refusal registers nothing

