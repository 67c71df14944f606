"""The arithmetic of each quantized number format, as the ONNX operators define it.

Weights are [K, N] = [in_features, out_features] (ONNX MatMul(x[..., K], W[K, N])), so a
"per output channel" scale is one per column and an INT4 "group" is `group_size`
consecutive input rows of one column. All weight formats are symmetric with zero point
0, because TensorRT accepts only that. Rounding is round-half-to-even (np.rint), and the
division by the scale happens in float32, as QuantizeLinear does on float32 inputs, so
codes computed here match the codes an ONNX graph would compute.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
UINT8_MAX = 255
FP8_E4M3_MAX = 448.0
FP8_E4M3 = ml_dtypes.float8_e4m3fn


def quantize_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [K, N], scale float32 [N]): symmetric per output column, scale = max|W[:, n]| / 127.

    An all-zero column gets scale 1 (and codes 0), so dequantization never divides by zero.
    """
    w = np.asarray(w, dtype=np.float32)
    scale = _nonzero(np.abs(w).max(axis=0) / np.float32(INT8_MAX))
    q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def dequantize_int8_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 [K, N] = q · scale[n]."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)


#: float32 q · scale, as ONNX DequantizeLinear of FLOAT8E4M3FN codes with zero point 0 (the same product)
dequantize_fp8 = dequantize_int8_per_channel


def check_weights(weights, k: int) -> None:
    """Refuse an empty list of weights, or one that is not [K, N] for K input channels."""
    if not len(weights):
        raise ValueError("at least one weight must read the activation")
    for w in weights:
        if np.ndim(w) != 2 or np.shape(w)[0] != k:
            raise ValueError(f"weight of shape {np.shape(w)} does not read {k} input channels (expected [{k}, N])")


def check_group_size(k: int, group_size: int | None) -> int:
    """The group size to use for K input rows (None means one group of all K rows)."""
    if group_size is None:
        return k
    if group_size <= 0 or k % group_size:
        raise ValueError(f"K = {k} input rows are not divisible by group_size = {group_size}: "
                         f"pick a group_size that divides {k}")
    return group_size


def group_scales(w: np.ndarray, group_size: int | None, clip_ratio=None, top: int = INT4_MAX) -> np.ndarray:
    """float32 [K // group_size, N]: clip_ratio · max|group| / top (INT4 codes by default), zero groups -> 1."""
    w = np.asarray(w)
    k, n = w.shape
    group_size = check_group_size(k, group_size)
    absmax = np.abs(w.astype(np.float64)).reshape(k // group_size, group_size, n).max(axis=1)
    ratio = np.float64(1.0) if clip_ratio is None else np.asarray(clip_ratio, dtype=np.float64)
    if np.any(ratio <= 0):
        raise ValueError("clip_ratio must be positive")
    return _nonzero(np.broadcast_to(ratio * absmax / top, absmax.shape).astype(np.float32))


def quantize_int4_groupwise(w: np.ndarray, group_size: int | None,
                            clip_ratio=None) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [K, N] holding INT4 codes in [-8, 7], scale float32 [K // group_size, N]).

    Symmetric per group of `group_size` consecutive input rows of each output column:
    scale = clip_ratio · max|group| / 7 (clip_ratio a scalar or a [K // g, N] array,
    default 1; below 1 it clips outliers to round the rest more finely), q =
    clip(rint(w / scale), -8, 7). group_size None means one group per column.
    """
    w = np.asarray(w, dtype=np.float32)
    group_size = check_group_size(w.shape[0], group_size)
    scale = group_scales(w, group_size, clip_ratio)
    q = np.clip(np.rint(w / np.repeat(scale, group_size, axis=0)), INT4_MIN, INT4_MAX).astype(np.int8)
    return q, scale


def dequantize_int4_groupwise(q: np.ndarray, scale: np.ndarray, group_size: int | None) -> np.ndarray:
    """float32 [K, N] = q · scale of its group (what opset-21 blocked DequantizeLinear computes)."""
    group_size = check_group_size(q.shape[0], group_size)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.shape != (q.shape[0] // group_size, q.shape[1]):
        raise ValueError(f"scale has shape {scale.shape}, expected {(q.shape[0] // group_size, q.shape[1])} "
                         f"for codes {q.shape} in groups of {group_size}")
    return q.astype(np.float32) * np.repeat(scale, group_size, axis=0)


def fake_quant_dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """float32 x after ONNX DynamicQuantizeLinear and DequantizeLinear (per tensor, uint8).

    The range is widened to include 0, scale = (max - min) / 255, zero point =
    clip(rint(-min / scale), 0, 255), codes = clip(rint(x / scale) + zp, 0, 255). An
    all-zero tensor stays zero.
    """
    x = np.asarray(x, dtype=np.float32)
    lo = np.float32(min(0.0, float(x.min()))) if x.size else np.float32(0)
    hi = np.float32(max(0.0, float(x.max()))) if x.size else np.float32(0)
    scale = np.float32((hi - lo) / np.float32(UINT8_MAX))
    if scale == 0:
        return np.zeros_like(x)
    zero_point = np.float32(np.clip(np.rint(-lo / scale), 0, UINT8_MAX))
    codes = np.clip(np.rint(x / scale) + zero_point, 0, UINT8_MAX)
    return ((codes - zero_point) * scale).astype(np.float32)


def fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to FLOAT8E4M3FN and back: nearest even, saturating to ±448.

    Saturation as ONNX casts with saturate=1: overflow and ±inf become ±448, NaN stays NaN.
    """
    return _to_fp8(np.asarray(x, dtype=np.float32)).astype(np.float32)


def quantize_fp8_per_tensor(x: np.ndarray, scale) -> np.ndarray:
    """FLOAT8E4M3FN codes of ONNX QuantizeLinear(x, scale, zero point of type FLOAT8E4M3FN).

    With saturate=1 (the default): x / scale in float32, cast to E4M3FN with saturation.
    Returns an ml_dtypes.float8_e4m3fn array (the initializer / output type).
    """
    return _to_fp8(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32))


def int8_scale(absmax: float) -> float:
    """Static per-tensor int8 activation scale mapping |x| <= absmax onto [-127, 127] (0 -> 1)."""
    return absmax / INT8_MAX if absmax > 0 else 1.0


def fp8_scale(absmax) -> np.ndarray:
    """float32 scale mapping |x| <= absmax onto the E4M3 range: absmax / 448 (0 -> 1)."""
    return _nonzero((np.asarray(absmax, dtype=np.float64) / FP8_E4M3_MAX).astype(np.float32))


def quantize_fp8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes float32 [K, N] on the E4M3 grid, scale float32 [N]): scale = max|W[:, n]| / 448."""
    scale = fp8_scale(np.abs(w).max(axis=0))
    return fp8_e4m3(w / scale), scale


def fake_quant_fp8(x: np.ndarray) -> np.ndarray:
    """float32 x after QuantizeLinear / DequantizeLinear to E4M3 with one scale max|x| / 448."""
    scale = fp8_scale(np.abs(x).max() if x.size else 0.0)
    return dequantize_fp8(quantize_fp8_per_tensor(x, scale), scale)


def output_error(gram: np.ndarray, e: np.ndarray) -> float:
    """||X E||² = Σ E ⊙ (XᵀX E), through the Gram matrix XᵀX [K, K] of the rows X."""
    return float(np.sum(e * (gram @ e)))


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """float32 scales with zeros (all-zero channels or groups) replaced by 1."""
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def _to_fp8(x: np.ndarray) -> np.ndarray:
    # ml_dtypes turns anything past the largest finite value into NaN, so clip first
    return np.clip(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(FP8_E4M3)
