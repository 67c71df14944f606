"""GPTQ: the blocked Cholesky implementation gives the codes of the paper's plain
row-by-row OBS update with an explicitly updated inverse Hessian, beats RTN on
correlated inputs, reduces to RTN when H is a multiple of the identity, and handles
dead inputs and Hessians that are not positive definite."""

from __future__ import annotations

import numpy as np
import pytest

from trimrt.quantization.gptq import gptq_quantize
from trimrt.quantization.numerics import dequantize_int4_groupwise


def hessian(x: np.ndarray) -> np.ndarray:
    """float64 [K, K] = 2 XᵀX of activations x [M, K].

    Sum it over calibration batches (or average: GPTQ is invariant to a positive factor
    on H, the damping being relative to its diagonal).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    return 2.0 * (x.T @ x)


def _obs_reference(w, h, group_size, high, low, damp=0.01):
    """Row-by-row OBS: quantize row j, spread its error with H⁻¹[:, j] / H⁻¹[j, j], then
    remove j from H⁻¹ (H⁻¹ -= H⁻¹[:, j] H⁻¹[j, :] / H⁻¹[j, j]). Group scales from the
    updated rows when a group starts."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    q = np.zeros((k, n))
    scale = np.zeros((k // group_size, n), np.float32)
    for j in range(k):
        if j % group_size == 0:
            s = (np.abs(w[j:j + group_size]).max(0) / high).astype(np.float32)
            scale[j // group_size] = np.where(s > 0, s, 1)
        s = scale[j // group_size].astype(np.float64)
        q[j] = np.clip(np.rint(w[j] / s), low, high)
        err = (w[j] - q[j] * s) / hinv[j, j]
        w -= np.outer(hinv[:, j], err)
        hinv -= np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q, scale


def _correlated(seed, m=512, k=64, n=24, rank=6):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, k)) + 0.2 * rng.standard_normal((m, k))
    w = rng.standard_normal((k, n))
    return x.astype(np.float32), w.astype(np.float32)


def _rtn(w, g, high=7, low=-8):
    k, n = w.shape
    scale = (np.abs(w).reshape(k // g, g, n).max(1) / high).astype(np.float32)
    full = np.repeat(scale, g, 0)
    return np.clip(np.rint(w / full), low, high), scale


def _error(x, w, deq):
    x = x.astype(np.float64)
    return float(np.sum((x @ w.astype(np.float64) - x @ deq.astype(np.float64)) ** 2))


@pytest.mark.parametrize("group_size,block_size", [(16, 8), (16, 24), (64, 16), (8, 64)])
def test_blocked_equals_the_row_by_row_reference(group_size, block_size):
    x, w = _correlated(0)
    h = hessian(x)
    q, scale = gptq_quantize(w, h, group_size=group_size, block_size=block_size)
    want_q, want_scale = _obs_reference(w, h, group_size, 7, -8)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (64 // group_size, 24)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    assert q.min() >= -8 and q.max() <= 7


def test_int8_one_group_equals_the_reference():
    x, w = _correlated(1)
    h = hessian(x)
    q, scale = gptq_quantize(w, h, bits=8, group_size=None, block_size=16)
    want_q, want_scale = _obs_reference(w, h, 64, 127, -127)
    assert scale.shape == (1, 24)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    np.testing.assert_allclose(scale[0], np.abs(w).max(0) / 127, rtol=1e-6)  # the first group is not yet updated


def test_gptq_beats_rtn_on_correlated_inputs():
    x, w = _correlated(2, k=128, n=32)
    q, scale = gptq_quantize(w, hessian(x), group_size=32)
    rtn_q, rtn_scale = _rtn(w, 32)
    gptq = _error(x, w, dequantize_int4_groupwise(q, scale, 32))
    rtn = _error(x, w, rtn_q * np.repeat(rtn_scale, 32, 0))
    assert gptq < 0.5 * rtn


def test_act_order_uses_static_contiguous_groups_and_beats_rtn():
    x, w = _correlated(3, k=128, n=32)
    x[:, ::7] *= 5  # uneven input energy, so the order matters
    q, scale = gptq_quantize(w, hessian(x), group_size=32, block_size=32, act_order=True)
    rtn_q, rtn_scale = _rtn(w, 32)
    np.testing.assert_array_equal(scale, rtn_scale)  # static groups: scales of the original weights
    gptq = _error(x, w, dequantize_int4_groupwise(q, scale, 32))
    assert gptq < 0.5 * _error(x, w, rtn_q * np.repeat(rtn_scale, 32, 0))


def test_identity_hessian_is_rtn():
    rng = np.random.default_rng(4)
    x, _ = np.linalg.qr(rng.standard_normal((200, 64)))  # orthonormal columns: XᵀX = I
    w = rng.standard_normal((64, 20)).astype(np.float32)
    q, scale = gptq_quantize(w, hessian(x), group_size=16, block_size=32)
    rtn_q, rtn_scale = _rtn(w, 16)
    np.testing.assert_array_equal(q, rtn_q)
    np.testing.assert_array_equal(scale, rtn_scale)


def test_dead_inputs_get_zero_weights():
    x, w = _correlated(5)
    x[:, [3, 30]] = 0
    q, scale = gptq_quantize(w, hessian(x), group_size=16, block_size=16)
    assert np.all(q[[3, 30]] == 0) and np.all(np.isfinite(scale))
    want_q, _ = _obs_reference(w, hessian(x), 16, 7, -8)
    np.testing.assert_array_equal(q, want_q)


def test_hessian_sums_over_batches():
    x, _ = _correlated(6)
    np.testing.assert_allclose(hessian(x[:200]) + hessian(x[200:]), hessian(x), rtol=1e-10)
    np.testing.assert_allclose(hessian(x), 2 * x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-10)


def test_errors_name_the_fix():
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="raise damp"):
        gptq_quantize(w, np.array([[1.0, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), group_size=None)
    with pytest.raises(ValueError, match="K = 4.*group_size = 3"):
        gptq_quantize(w, np.eye(4), group_size=3)
    with pytest.raises(ValueError, match="bits = 4 or 8"):
        gptq_quantize(w, np.eye(4), bits=3, group_size=None)
