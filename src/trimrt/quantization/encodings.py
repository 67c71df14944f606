"""ONNX encodings of one quantized MatMul y = x @ W, W [K, N] constant, x float32 [..., K].

The quantization methods decide the numbers (integer codes and scales); these builders
decide how a target runs them. Each returns the new nodes, in order, and the float32
output [..., N]; weights and scales become graph initializers. The caller inserts the
nodes, rewires the old MatMul's uses and adds `required_opsets(encoding)` to the model.

- `int8_dynamic`: DynamicQuantizeLinear + MatMulInteger, what ONNX Runtime's CPU kernels
  fuse into DynamicQuantizeMatMul (the numerics of `quantize_dynamic(per_channel=True)`;
  weights stored as uint8 with zero point 128, so the products are exact on every CPU).
- `int4_matmul_nbits`: com.microsoft MatMulNBits, ONNX Runtime's INT4 weight-only kernel.
- `int4_blocked_dq`: INT4 initializer + opset-21 blocked DequantizeLinear + MatMul, the
  TensorRT form (ONNX Runtime fuses it back into MatMulNBits).
- `qdq_static`: explicit QuantizeLinear/DequantizeLinear on activation and weight, zero
  point 0, INT8 or FP8 E4M3 — the strongly typed TensorRT form.
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..errors import BuildError

#: stamps the inserting pass on a node (TrimrtPass.tagged)
Tag = Callable[[ir.Node], ir.Node]
#: activation -> (xq, x_scale, x_zero_point) of its one DynamicQuantizeLinear
SharedQuantized = dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]]

MS_DOMAIN = "com.microsoft"
INT4_MIN, INT4_MAX = -8, 7
FP8_E4M3_MAX = 448.0

_OPSETS = {
    "int8_dynamic": {"": 11},  # DynamicQuantizeLinear
    "int4_matmul_nbits": {MS_DOMAIN: 1},
    "int4_blocked_dq": {"": 21},  # block_size and INT4 in DequantizeLinear
    "qdq_int8": {"": 19},  # the TensorRT Q/DQ form
    "qdq_fp8": {"": 19},  # FLOAT8E4M3FN in QuantizeLinear
}
ENCODINGS = tuple(_OPSETS)


def required_opsets(encoding: str) -> dict[str, int]:
    """Minimum opset per domain a model needs for `encoding` (one of ENCODINGS)."""
    if encoding not in _OPSETS:
        raise BuildError(f"unknown quantized encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    return dict(_OPSETS[encoding])


def int8_dynamic(graph: ir.Graph, x: ir.Value, q: np.ndarray, scale: np.ndarray, prefix: str, tag: Tag,
                 shared: SharedQuantized | None = None) -> tuple[list[ir.Node], ir.Value]:
    """y = Cast(MatMulInteger(xq, q, x_zp, 0)) · (x_scale · scale), x quantized once per tensor.

    q int8 [K, N], scale float32 [N]. Pass the same `shared` dict for every MatMul of a
    model so the MatMuls reading one activation share its DynamicQuantizeLinear (the
    first call's node is among its returned nodes; later calls reuse its outputs).
    """
    _, n = _check_weight(q, np.int8, "int8_dynamic", x)
    scale = _check_scale(scale, (n,), "int8_dynamic")
    nodes = []
    shared = {} if shared is None else shared
    if x not in shared:
        dql = _node(tag, "DynamicQuantizeLinear", [x], f"{prefix}_dql", num_outputs=3)
        nodes.append(dql)
        shared[x] = tuple(dql.outputs)
    xq, x_scale, x_zp = shared[x]
    # uint8 codes q + 128 with zero point 128: the same integer products as int8 codes with
    # zero point 0, but ONNX Runtime then runs its U8U8 kernels, which are exact on every x86
    # CPU; its U8S8 kernels on AVX2 CPUs without VNNI add u8·s8 pairs in saturating int16
    # (vpmaddubsw) and were off by up to 44% of an output on activations with outliers
    q_v = add_initializer(graph, f"{prefix}_w", (q.astype(np.int16) + 128).astype(np.uint8))
    zp_v = add_initializer(graph, f"{prefix}_w_zp", np.array(128, np.uint8))
    scale_v = add_initializer(graph, f"{prefix}_w_scale", scale)
    mmi = _node(tag, "MatMulInteger", [xq, q_v, x_zp, zp_v], f"{prefix}_matmul")
    cast = _node(tag, "Cast", [mmi.outputs[0]], f"{prefix}_cast", {"to": ir.DataType.FLOAT})
    scales = _node(tag, "Mul", [x_scale, scale_v], f"{prefix}_scales")
    out = _node(tag, "Mul", [cast.outputs[0], scales.outputs[0]], f"{prefix}_out")
    nodes += [mmi, cast, scales, out]
    return nodes, _typed_output(out, x, n)


def int4_matmul_nbits(graph: ir.Graph, x: ir.Value, q: np.ndarray, scale: np.ndarray, group_size: int,
                      prefix: str, tag: Tag, accuracy_level: int = 4) -> tuple[list[ir.Node], ir.Value]:
    """y = MatMulNBits(x, pack(q + 8), scaleᵀ), the default zero point 8 undoing the +8.

    q int8 [K, N] in [-8, 7], scale float32 [K // group_size, N]: W[k, n] = q[k, n] ·
    scale[k // group_size, n]. accuracy_level 0 computes in float (exact); 4 lets ONNX
    Runtime quantize x to int8 per block (faster, ~1% error).
    """
    k, n, scale = _check_int4(q, scale, group_size, "int4_matmul_nbits", x)
    if group_size < 16 or group_size & (group_size - 1):
        raise BuildError(f"MatMulNBits needs a power-of-two group size >= 16, got {group_size}: change group_size")
    b_v = add_initializer(graph, f"{prefix}_w", pack_matmul_nbits(q, group_size))
    scale_v = add_initializer(graph, f"{prefix}_w_scale", np.ascontiguousarray(scale.T))
    attributes = {"K": k, "N": n, "bits": 4, "block_size": group_size, "accuracy_level": accuracy_level}
    node = _node(tag, "MatMulNBits", [x, b_v, scale_v], f"{prefix}_matmul", attributes, domain=MS_DOMAIN)
    return [node], _typed_output(node, x, n)


def pack_matmul_nbits(q: np.ndarray, group_size: int) -> np.ndarray:
    """MatMulNBits' B: uint8 [N, K // g, g // 2], codes q + 8 along K, two per byte, low nibble first."""
    k, n = q.shape
    codes = (q.astype(np.int16) - INT4_MIN).astype(np.uint8).T.reshape(n, k // group_size, group_size)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def int4_blocked_dq(graph: ir.Graph, x: ir.Value, q: np.ndarray, scale: np.ndarray, group_size: int,
                    prefix: str, tag: Tag) -> tuple[list[ir.Node], ir.Value]:
    """y = MatMul(x, DequantizeLinear(q as INT4, scale, axis=0, block_size=group_size)).

    q int8 [K, N] in [-8, 7] stored as a 4-bit INT4 initializer, scale float32
    [K // group_size, N]; no zero point (0). Needs default opset >= 21.
    """
    _, n, scale = _check_int4(q, scale, group_size, "int4_blocked_dq", x)
    q_v = add_initializer(graph, f"{prefix}_w", q.astype(ml_dtypes.int4))
    scale_v = add_initializer(graph, f"{prefix}_w_scale", scale)
    dq = _node(tag, "DequantizeLinear", [q_v, scale_v], f"{prefix}_w_dq", {"axis": 0, "block_size": group_size})
    matmul = _node(tag, "MatMul", [x, dq.outputs[0]], f"{prefix}_matmul")
    return [dq, matmul], _typed_output(matmul, x, n)


def qdq_static(graph: ir.Graph, x: ir.Value, x_scale: float, q_w: np.ndarray, w_scale: np.ndarray, dtype: str,
               prefix: str, tag: Tag) -> tuple[list[ir.Node], ir.Value]:
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
    if not (np.isfinite(x_scale) and x_scale > 0):
        raise BuildError(f"qdq_static activation scale must be a positive number, got {x_scale}: recalibrate")
    w_scale = _check_scale(w_scale, (n,), "qdq_static")
    x_scale_v = add_initializer(graph, f"{prefix}_x_scale", np.array(x_scale, np.float32))
    x_zp_v = add_initializer(graph, f"{prefix}_x_zp", np.zeros((), zero_dtype))
    w_v = add_initializer(graph, f"{prefix}_w", stored)
    w_scale_v = add_initializer(graph, f"{prefix}_w_scale", w_scale)
    w_zp_v = add_initializer(graph, f"{prefix}_w_zp", np.zeros(n, zero_dtype))
    quant = _node(tag, "QuantizeLinear", [x, x_scale_v, x_zp_v], f"{prefix}_x_q")
    dequant = _node(tag, "DequantizeLinear", [quant.outputs[0], x_scale_v, x_zp_v], f"{prefix}_x_dq")
    w_dq = _node(tag, "DequantizeLinear", [w_v, w_scale_v, w_zp_v], f"{prefix}_w_dq", {"axis": 1})
    matmul = _node(tag, "MatMul", [dequant.outputs[0], w_dq.outputs[0]], f"{prefix}_matmul")
    return [quant, dequant, w_dq, matmul], _typed_output(matmul, x, n)


def _node(tag: Tag, op_type: str, inputs, name: str, attributes: dict | None = None, *, domain: str = "",
          num_outputs: int = 1) -> ir.Node:
    node = ir.node(op_type, inputs, attributes or {}, domain=domain, num_outputs=num_outputs, name=name)
    for i, out in enumerate(node.outputs):
        out.name = out.name or (f"{name}_out{i}" if num_outputs > 1 else f"{name}_out")
    return tag(node)


def _typed_output(node: ir.Node, x: ir.Value, n: int) -> ir.Value:
    """The node's float32 output, shaped like x with the last axis N."""
    out = node.outputs[0]
    out.type = ir.TensorType(ir.DataType.FLOAT)
    if x.shape is not None:
        out.shape = ir.Shape([*x.shape[:-1], n])
    return out


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a graph initializer named `name`; return its value."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


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
