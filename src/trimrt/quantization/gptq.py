"""GPTQ (Frantar et al.): round input rows one at a time and let the rows not yet rounded
absorb the error, weighted by the inverse Hessian of the layer's output error.

For y = x W the squared output error over calibration rows X has Hessian H = 2 XᵀX
[K, K]. Rounding row j of W [K, N] leaves an error that the optimal brain surgeon update
spreads over the remaining rows through H⁻¹; GPTQ does this in a fixed row order using
the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), whose row j is exactly the update
direction once rows before j are fixed. Rows are processed in blocks with the updates
beyond the block applied lazily, once per block, so the work is matrix products.

Codes are symmetric with zero point 0, like `numerics.quantize_int4_groupwise`: INT4 in
[-8, 7] with scale max|group| / 7 per group of input rows, or INT8 in [-127, 127] with
max / 127. A group's scales are taken from the error-updated weights when its first row
is reached. With act_order (rows in order of decreasing H_jj) the groups stay contiguous
in the original order (so blocked DequantizeLinear can read them) and their scales come
from the weights before any update ("static groups").
"""

from __future__ import annotations

import numpy as np

from .numerics import INT4_MAX, INT4_MIN, INT8_MAX, check_group_size, group_scales

_CODE_RANGE = {4: (INT4_MIN, INT4_MAX), 8: (-INT8_MAX, INT8_MAX)}


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int = 4, group_size: int | None = 128,
                  block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [K, N], scale float32 [K // group_size, N]) for W [K, N] and H [K, K].

    bits 4 gives INT4 codes in [-8, 7], bits 8 INT8 codes in [-127, 127]; group_size None
    means one group of all K rows (per output channel). Inputs that never fire (H_jj = 0)
    get zero weights. damp · mean(diag H) is added to the diagonal. The result
    dequantizes with `numerics.dequantize_int4_groupwise(q, scale, group_size)`.
    """
    if bits not in _CODE_RANGE:
        raise ValueError(f"GPTQ supports bits = 4 or 8, got {bits}")
    w = np.array(w, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {h.shape} does not match the weight's {k} input rows (expected [{k}, {k}])")
    if block_size < 1:
        raise ValueError(f"block_size = {block_size} must be at least 1")
    group_size = check_group_size(k, group_size)
    low, high = _CODE_RANGE[bits]

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    scale = group_scales(w, group_size, top=high) if act_order else np.ones((k // group_size, n), np.float32)
    w = w[order]
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = _inverse_cholesky_upper(h, damp)

    q = np.zeros((k, n), np.int8)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[start:end].copy()
        errors = np.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            j = start + i
            if not act_order and j % group_size == 0:
                current = _current_rows(w, block, errors, u, start, end, j, j + group_size)
                scale[j // group_size] = group_scales(current, group_size, top=high)[0]
            row_scale = scale[order[j] // group_size].astype(np.float64)
            codes = np.clip(np.rint(block[i] / row_scale), low, high)
            q[j] = codes
            error = (block[i] - codes * row_scale) / u_block[i, i]
            block[i + 1:] -= u_block[i, i + 1:, None] * error[None, :]
            errors[i] = error
        w[end:] -= u[start:end, end:].T @ errors
    q[order] = q.copy()
    return q, scale


def _current_rows(w: np.ndarray, block: np.ndarray, errors: np.ndarray, u: np.ndarray, start: int, end: int,
                  first: int, last: int) -> np.ndarray:
    """Rows first..last-1 with every update so far applied (those past the block lag by its errors)."""
    inside = block[first - start:min(last, end) - start]
    if last <= end:
        return inside
    done = first - start
    beyond = w[end:last] - u[start:first, end:last].T @ errors[:done]
    return np.vstack([inside, beyond])


def _inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with UᵀU = H⁻¹."""
    advice = f"the Hessian is not positive definite even after damping {damp}: raise damp (e.g. to {damp * 10:g})"
    if not np.all(np.isfinite(h)):
        raise ValueError("the Hessian has NaN or infinite entries: check the calibration activations")
    try:
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.solve(lower, np.eye(h.shape[0]))
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T
    except np.linalg.LinAlgError:
        raise ValueError(advice) from None
