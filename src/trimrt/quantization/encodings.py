"""ONNX encodings of one quantized MatMul y = x @ W, W [K, N] constant, x float32 [..., K].

The methods decide the numbers (codes and scales); an `Encoding`, registered in
`QUANTIZED_ENCODINGS` for a weight format and its targets (`encoding_for(format, target)`),
decides how a target runs them: it builds its nodes with the pass's `GraphBuilder` and
returns the float32 output [..., N]; the caller places the nodes, rewires the MatMul's
uses and raises the model's opsets to the encoding's `opsets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..errors import BuildError
from ..registry import QUANTIZED_ENCODINGS
from .numerics import INT4_MAX, INT4_MIN

if TYPE_CHECKING:
    from ..passes.base import GraphBuilder
    from .methods import QuantizedLinear

#: activation -> (xq, x_scale, x_zero_point) of its one DynamicQuantizeLinear
SharedQuantized = dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]]

MS_DOMAIN = "com.microsoft"
#: MatMulNBits accuracy level of ONNX Runtime INT4 builds: 4 = int8 compute (fast), 0 = float (exact)
NBITS_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class Encoding:
    """How one quantized MatMul is written for a target; `build(b, x, q, shared)` adds the nodes
    computing x @ q's weight and returns their output; `static_activations`: activations use a
    calibrated per-tensor scale."""

    format: str
    targets: tuple[str, ...]
    opsets: dict[str, int]
    label: str
    build: Callable[[GraphBuilder, ir.Value, QuantizedLinear, SharedQuantized], ir.Value]
    static_activations: bool = False

    def describe(self) -> str:
        return self.label.format(accuracy_level=NBITS_ACCURACY_LEVEL)  # the level in force when building


QUANTIZED_ENCODINGS.register("int8_dynamic")(Encoding(
    "int8", ("onnxruntime",), {"": 11},  # DynamicQuantizeLinear
    "DynamicQuantizeLinear + MatMulInteger (ONNX Runtime DynamicQuantizeMatMul)",
    lambda b, x, q, shared: int8_dynamic(b, x, q.codes, q.scale, shared)))

QUANTIZED_ENCODINGS.register("int4_matmul_nbits")(Encoding(
    "int4", ("onnxruntime",), {MS_DOMAIN: 1}, "com.microsoft MatMulNBits (accuracy level {accuracy_level})",
    lambda b, x, q, shared: int4_matmul_nbits(b, x, q.codes, q.scale, q.group_size, NBITS_ACCURACY_LEVEL)))

QUANTIZED_ENCODINGS.register("int4_blocked_dq")(Encoding(
    "int4", ("tensorrt", "openvino"), {"": 21},  # block_size and INT4 in DequantizeLinear; OpenVINO: compressed weights
    "INT4 initializers + blocked DequantizeLinear (opset 21)",
    lambda b, x, q, shared: int4_blocked_dq(b, x, q.codes, q.scale, q.group_size)))

QUANTIZED_ENCODINGS.register("qdq_int8")(Encoding(
    "int8", ("tensorrt", "openvino"), {"": 19},  # the TensorRT Q/DQ form; OpenVINO runs it as INT8 kernels
    "QuantizeLinear/DequantizeLinear INT8, static activation scales",
    lambda b, x, q, shared: qdq_static(b, x, q.activation_scale, q.codes, q.scale, "int8"),
    static_activations=True))

QUANTIZED_ENCODINGS.register("qdq_fp8")(Encoding(
    "fp8", ("onnxruntime", "tensorrt"), {"": 19},  # FLOAT8E4M3FN in QuantizeLinear
    "QuantizeLinear/DequantizeLinear FLOAT8E4M3FN, static activation scales",
    lambda b, x, q, shared: qdq_static(b, x, q.activation_scale, q.codes, q.scale, "fp8"),
    static_activations=True))


def encoding_for(fmt: str, target: str) -> str:
    """The registered encoding of weight format `fmt` for `target`."""
    table = {(QUANTIZED_ENCODINGS[name].format, t): name for name in QUANTIZED_ENCODINGS
             for t in QUANTIZED_ENCODINGS[name].targets}
    if (fmt, target) not in table:
        raise BuildError(f"no quantized encoding writes {fmt} weights for target {target!r}")
    return table[(fmt, target)]


def int8_dynamic(b: GraphBuilder, x: ir.Value, q: np.ndarray, scale: np.ndarray,
                 shared: SharedQuantized | None = None) -> ir.Value:
    """y = Cast(MatMulInteger(xq, q, x_zp, 0)) · (x_scale · scale), x quantized once per tensor.

    q int8 [K, N], scale float32 [N]. Pass the same `shared` dict for every MatMul of a
    model so the MatMuls reading one activation share its DynamicQuantizeLinear (the
    first call adds the node; later calls reuse its outputs).
    """
    _, n = _check_weight(q, np.int8, "int8_dynamic", x)
    scale = _check_scale(scale, (n,), "int8_dynamic")
    prefix = b.prefix
    shared = {} if shared is None else shared
    if x not in shared:
        shared[x] = tuple(b.op_multi_out("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{prefix}_dql"))
    xq, x_scale, x_zp = shared[x]
    # uint8 codes q + 128 with zero point 128: the same integer products as int8 codes with
    # zero point 0, but ONNX Runtime then runs its U8U8 kernels, which are exact on every x86
    # CPU; its U8S8 kernels on AVX2 CPUs without VNNI add u8·s8 pairs in saturating int16
    # (vpmaddubsw) and were off by up to 44% of an output on activations with outliers
    q_v = constant(b, f"{prefix}_w", (q.astype(np.int16) + 128).astype(np.uint8))
    zp_v = constant(b, f"{prefix}_w_zp", np.array(128, np.uint8))
    scale_v = constant(b, f"{prefix}_w_scale", scale)
    product = b.op("MatMulInteger", [xq, q_v, x_zp, zp_v], name=f"{prefix}_matmul")
    cast = b.op("Cast", [product], {"to": ir.DataType.FLOAT}, name=f"{prefix}_cast")
    scales = b.op("Mul", [x_scale, scale_v], name=f"{prefix}_scales")
    return _typed(b.op("Mul", [cast, scales], name=f"{prefix}_out"), x, n)


def int4_matmul_nbits(b: GraphBuilder, x: ir.Value, q: np.ndarray, scale: np.ndarray, group_size: int,
                      accuracy_level: int = 4) -> ir.Value:
    """y = MatMulNBits(x, pack(q + 8), scaleᵀ), the default zero point 8 undoing the +8.

    q int8 [K, N] in [-8, 7], scale float32 [K // group_size, N]: W[k, n] = q[k, n] ·
    scale[k // group_size, n]. accuracy_level 0 computes in float (exact); 4 lets ONNX
    Runtime quantize x to int8 per block (faster, ~1% error).
    """
    k, n, scale = _check_int4(q, scale, group_size, "int4_matmul_nbits", x)
    if group_size < 16 or group_size & (group_size - 1):
        raise BuildError(f"MatMulNBits needs a power-of-two group size >= 16, got {group_size}: change group_size")
    b_v = constant(b, f"{b.prefix}_w", pack_matmul_nbits(q, group_size))
    scale_v = constant(b, f"{b.prefix}_w_scale", np.ascontiguousarray(scale.T))
    attributes = {"K": k, "N": n, "bits": 4, "block_size": group_size, "accuracy_level": accuracy_level}
    out = b.op("MatMulNBits", [x, b_v, scale_v], attributes, domain=MS_DOMAIN, name=f"{b.prefix}_matmul")
    return _typed(out, x, n)


def pack_matmul_nbits(q: np.ndarray, group_size: int) -> np.ndarray:
    """MatMulNBits' B: uint8 [N, K // g, g // 2], codes q + 8 along K, two per byte, low nibble first."""
    k, n = q.shape
    codes = (q.astype(np.int16) - INT4_MIN).astype(np.uint8).T.reshape(n, k // group_size, group_size)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def int4_blocked_dq(b: GraphBuilder, x: ir.Value, q: np.ndarray, scale: np.ndarray, group_size: int) -> ir.Value:
    """y = MatMul(x, DequantizeLinear(q as INT4, scale, axis=0, block_size=group_size)).

    q int8 [K, N] in [-8, 7] stored as a 4-bit INT4 initializer, scale float32
    [K // group_size, N]; no zero point (0). Needs default opset >= 21.
    """
    _, n, scale = _check_int4(q, scale, group_size, "int4_blocked_dq", x)
    q_v = constant(b, f"{b.prefix}_w", q.astype(ml_dtypes.int4))
    scale_v = constant(b, f"{b.prefix}_w_scale", scale)
    w = b.op("DequantizeLinear", [q_v, scale_v], {"axis": 0, "block_size": group_size}, name=f"{b.prefix}_w_dq")
    return _typed(b.op("MatMul", [x, w], name=f"{b.prefix}_matmul"), x, n)


def qdq_static(b: GraphBuilder, x: ir.Value, x_scale: float, q_w: np.ndarray, w_scale: np.ndarray,
               dtype: str) -> ir.Value:
    """y = MatMul(DQ(Q(x, x_scale)), DQ(q_w, w_scale, axis=1)), zero points 0 (TensorRT's form).

    dtype "int8": q_w int8 [K, N]; x rounds to nearest and saturates to [-128, 127].
    dtype "fp8": q_w float32 [K, N] already on the E4M3 grid, stored as FLOAT8E4M3FN; x
    casts to E4M3 saturating at ±448. x_scale > 0 per tensor, w_scale float32 [N].
    """
    if dtype == "int8":
        _, n = _check_weight(q_w, np.int8, "qdq_static", x)
        stored, zero_dtype = q_w, np.int8
    elif dtype == "fp8":
        _, n = _check_weight(q_w, np.float32, "qdq_static", x)
        stored, zero_dtype = q_w.astype(ml_dtypes.float8_e4m3fn), ml_dtypes.float8_e4m3fn
        if not np.array_equal(stored.astype(np.float32), q_w):
            raise BuildError("qdq_static fp8 weights are not on the E4M3 grid (|w| <= 448, 3 mantissa bits): "
                             "round them with float8_e4m3fn first")
    else:
        raise BuildError(f"qdq_static dtype must be 'int8' or 'fp8', got {dtype!r}")
    w_scale = _check_scale(w_scale, (n,), "qdq_static")
    prefix = b.prefix
    x_dq = fake_quantized(b, x, x_scale, zero_dtype)
    w_v = constant(b, f"{prefix}_w", stored)
    w_scale_v = constant(b, f"{prefix}_w_scale", w_scale)
    w_zp_v = constant(b, f"{prefix}_w_zp", np.zeros(n, zero_dtype))
    w_dq = b.op("DequantizeLinear", [w_v, w_scale_v, w_zp_v], {"axis": 1}, name=f"{prefix}_w_dq")
    return _typed(b.op("MatMul", [x_dq, w_dq], name=f"{prefix}_matmul"), x, n)


def fake_quantized(b: GraphBuilder, x: ir.Value, scale: float, zero_dtype=np.int8) -> ir.Value:
    """DequantizeLinear(QuantizeLinear(x)) with one static scale and zero point 0: float32 x
    on the int8 (or E4M3) grid, the form TensorRT and OpenVINO run a product's input in INT8 from."""
    if not (np.isfinite(scale) and scale > 0):
        raise BuildError(f"static activation scale must be a positive number, got {scale}: recalibrate")
    scale_v = constant(b, f"{b.prefix}_x_scale", np.array(scale, np.float32))
    zero_v = constant(b, f"{b.prefix}_x_zp", np.zeros((), zero_dtype))
    quantized = b.op("QuantizeLinear", [x, scale_v, zero_v], name=f"{b.prefix}_x_q")
    out = b.op("DequantizeLinear", [quantized, scale_v, zero_v], name=f"{b.prefix}_x_dq")
    out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), x.shape
    return out


def constant(b: GraphBuilder, name: str, array: np.ndarray) -> ir.Value:
    """`array` as the graph initializer `name` (b.const), with its type and shape on the value."""
    value = b.const(array, name)
    value.shape, value.type = ir.Shape(value.const_value.shape), ir.TensorType(value.const_value.dtype)
    return value


def _typed(out: ir.Value, x: ir.Value, n: int) -> ir.Value:
    """A float32 output, shaped like x with the last axis N."""
    out.type = ir.TensorType(ir.DataType.FLOAT)
    if x.shape is not None:
        out.shape = ir.Shape([*x.shape[:-1], n])
    return out


def _check_weight(q: np.ndarray, dtype, encoding: str, x: ir.Value) -> tuple[int, int]:
    if not isinstance(q, np.ndarray) or q.ndim != 2 or q.dtype != dtype:
        got = f"{q.dtype} {q.shape}" if isinstance(q, np.ndarray) else type(q).__name__
        raise BuildError(f"{encoding} needs a 2-D {np.dtype(dtype)} weight [K, N], got {got}")
    last = x.shape[-1] if x.shape is not None and len(x.shape) else None
    if isinstance(last, int) and last != q.shape[0]:
        raise BuildError(f"{encoding}: activation {x.name!r} has {last} features but the weight has K={q.shape[0]}")
    return q.shape


def _check_scale(scale: np.ndarray, shape: tuple[int, ...], encoding: str) -> np.ndarray:
    scale = np.asarray(scale, np.float32)
    if scale.shape != shape:
        raise BuildError(f"{encoding} needs scales of shape {list(shape)}, got {list(scale.shape)}")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise BuildError(f"{encoding} scales must be positive and finite: an all-zero group should get scale 1")
    return scale


def _check_int4(q: np.ndarray, scale: np.ndarray, group_size: int, encoding: str,
                x: ir.Value) -> tuple[int, int, np.ndarray]:
    k, n = _check_weight(q, np.int8, encoding, x)
    if group_size <= 0 or k % group_size:
        raise BuildError(f"{encoding}: K={k} is not a multiple of group_size={group_size}; choose a divisor of K")
    if q.size and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise BuildError(f"{encoding} codes must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    return k, n, _check_scale(scale, (k // group_size, n), encoding)
