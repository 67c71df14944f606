"""AWQ (Lin et al.): activation-aware INT4 weight quantization.

Weights that multiply large activations matter most, so AWQ scales those input rows up
before rounding (their relative rounding error shrinks) and divides the activation by
the same factor (X W = (X / s) diag(s) W). The factor is a power of the mean activation
magnitude, s = mean|X_j|^a, with a searched on a grid for the smallest output error of
every linear reading X; a = 0 is plain round-to-nearest. Then, per group and output
column, the quantization range is shrunk (clipped) where that lowers the output error.

Weights are quantized with `numerics.quantize_int4_groupwise` (symmetric, zero point 0).
The caller folds 1/s into whatever produces X (e.g. the preceding LayerNorm) and stores
the codes and scales of diag(s) W. Output errors are measured through the Gram matrix
XᵀX, so the cost of the search does not grow with the number of calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .numerics import check_group_size, check_weights, dequantize_int4_groupwise, output_error, quantize_int4_groupwise

#: channels whose mean activation is below this fraction of the largest keep that floor,
#: so s stays finite and positive for dead channels
MEAN_FLOOR = 1e-4


@dataclass(frozen=True)
class AwqResult:
    """AWQ of the linears reading one activation X [M, K].

    input_scale: s float32 [K]; the quantized layers read X / s.
    q: per weight, int8 [K, N_i] INT4 codes in [-8, 7] of diag(s) W_i.
    scale: per weight, float32 [K // group_size, N_i] group scales.
    clip: per weight, float32 [K // group_size, N_i] chosen clip ratios (1 = no clipping).
    alpha: the chosen exponent a of s = mean|X|^a (0 = no scaling).
    """

    input_scale: np.ndarray
    q: list[np.ndarray]
    scale: list[np.ndarray]
    clip: list[np.ndarray]
    alpha: float
    group_size: int

    def dequantized(self, index: int) -> np.ndarray:
        """float32 [K, N_i]: the weight the build multiplies X / s by (≈ diag(s) W_i)."""
        return dequantize_int4_groupwise(self.q[index], self.scale[index], self.group_size)


def awq_quantize(x: np.ndarray, weights: Sequence[np.ndarray], group_size: int | None = 128, grid: int = 20,
                 clip_grid: int = 20, max_shrink: float = 0.5) -> AwqResult:
    """AWQ of the weights W_i [K, N_i] that read the activations x [M, K].

    a runs over 0, 1/grid, ..., (grid - 1)/grid and the chosen a minimises
    Σ_i ||X W_i - (X / s) Q(diag(s) W_i)||²; s = mean|X_j|^a / sqrt(max · min) (the
    normalisation keeps s around 1). Clip ratios 1, 1 - 1/clip_grid, ..., 1 - max_shrink
    are then chosen per group and output column, each minimising its group's share of
    the output error on X / s. Rows of x may be a subsample of the calibration tokens.
    """
    x = np.asarray(x, dtype=np.float32)
    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    k = x.shape[1]
    _check_inputs(x, weights, grid, clip_grid, max_shrink)
    group_size = check_group_size(k, group_size)
    w = np.concatenate(weights, axis=1)
    gram = (x.T @ x).astype(np.float64)  # float32 products: the search compares errors, it needs no more
    mean = np.abs(x.astype(np.float64)).mean(axis=0)

    best = (np.inf, 0.0, np.ones(k, np.float32))
    for step in range(grid):
        alpha = step / grid
        s = awq_scales(mean, alpha)
        q, scale = quantize_int4_groupwise(w * s[:, None], group_size)
        deq = dequantize_int4_groupwise(q, scale, group_size).astype(np.float64)
        error = output_error(gram, w.astype(np.float64) - deq / s.astype(np.float64)[:, None])
        if error < best[0]:
            best = (error, alpha, s)
    _, alpha, s = best

    scaled = w * s[:, None]
    clip = _search_clip(scaled, _group_grams(gram, s, group_size), group_size, clip_grid, max_shrink)
    q, scale = quantize_int4_groupwise(scaled, group_size, clip_ratio=clip)
    splits = np.cumsum([wi.shape[1] for wi in weights])[:-1]
    return AwqResult(input_scale=s, q=np.split(q, splits, axis=1), scale=np.split(scale, splits, axis=1),
                     clip=np.split(clip, splits, axis=1), alpha=alpha, group_size=group_size)


def awq_scales(act_mean: np.ndarray, alpha: float) -> np.ndarray:
    """float32 [K]: mean|X_j|^alpha divided by sqrt(max · min) of it; alpha = 0 gives all ones."""
    act_mean = np.abs(np.asarray(act_mean, dtype=np.float64))
    top = act_mean.max() if act_mean.size else 0.0
    floor = MEAN_FLOOR * top if top > 0 else 1.0
    s = np.maximum(act_mean, floor) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def _search_clip(scaled: np.ndarray, group_grams: np.ndarray, group_size: int, clip_grid: int,
                 max_shrink: float) -> np.ndarray:
    """float32 [K // g, N]: per group and column, the clip ratio with the least group output error."""
    k, n = scaled.shape
    groups = k // group_size
    w64 = scaled.astype(np.float64).reshape(groups, group_size, n)
    ratios = [1.0 - i / clip_grid for i in range(int(np.floor(max_shrink * clip_grid + 1e-9)) + 1)]
    best_error = np.full((groups, n), np.inf)
    best_ratio = np.ones((groups, n), np.float32)
    for ratio in ratios:
        q, scale = quantize_int4_groupwise(scaled, group_size, clip_ratio=ratio)
        deq = dequantize_int4_groupwise(q, scale, group_size).astype(np.float64)
        diff = w64 - deq.reshape(groups, group_size, n)
        error = np.sum(diff * (group_grams @ diff), axis=1)  # [groups, n]: ||X'_g d_g||²
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_ratio = np.where(better, np.float32(ratio), best_ratio)
    return best_ratio


def _group_grams(gram: np.ndarray, s: np.ndarray, group_size: int) -> np.ndarray:
    """[K // g, g, g]: the diagonal blocks of (X / s)ᵀ (X / s)."""
    groups = gram.shape[0] // group_size
    inv = 1.0 / s.astype(np.float64)
    scaled = gram * inv[:, None] * inv[None, :]
    index = np.arange(groups)
    return scaled.reshape(groups, group_size, groups, group_size)[index, :, index, :]


def _check_inputs(x: np.ndarray, weights: list[np.ndarray], grid: int, clip_grid: int, max_shrink: float) -> None:
    if x.ndim != 2:
        raise ValueError(f"activations must be [M, K] rows of tokens, got shape {x.shape}")
    check_weights(weights, x.shape[1])
    if grid < 1 or clip_grid < 1:
        raise ValueError(f"grid = {grid} and clip_grid = {clip_grid} must be at least 1")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink = {max_shrink} must be in [0, 1)")
