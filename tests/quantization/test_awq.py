"""AWQ: the stored codes follow the INT4 formula on diag(s) W, a = 0 is plain RTN, the
scale and clip searches return the argmin of errors computed here directly, and AWQ
beats RTN where some input channels are salient (never loses on Gaussian data)."""

from __future__ import annotations

import numpy as np
import pytest

from trimrt.quantization.awq import awq_quantize


def _rtn(w, g, ratio=1.0):
    """Symmetric INT4 per group of g input rows, written from the formula."""
    k, n = w.shape
    absmax = np.abs(w).reshape(k // g, g, n).max(1).astype(np.float64)
    scale = (ratio * absmax / 7).astype(np.float32)
    scale[scale == 0] = 1
    full = np.repeat(scale, g, 0)
    return np.clip(np.rint(w / full), -8, 7) * full, scale


def _scales(x, a):
    mean = np.abs(x.astype(np.float64)).mean(0)
    s = np.maximum(mean, 1e-4 * mean.max()) ** a
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def _error(x, w, x_in, deq):
    x = x.astype(np.float64)
    return float(np.sum((x @ w.astype(np.float64) - x_in.astype(np.float64) @ deq.astype(np.float64)) ** 2))


def _salient_layer(seed, m=512, k=128, n=48, salient=(5, 40, 77, 100), factor=30):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, list(salient)] *= factor
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return x, w


def test_codes_follow_the_int4_formula_on_scaled_weights():
    x, w = _salient_layer(0)
    w2 = np.random.default_rng(9).standard_normal((128, 16)).astype(np.float32)
    result = awq_quantize(x, [w, w2], group_size=32)
    s = result.input_scale
    assert s.dtype == np.float32 and s.shape == (128,)
    np.testing.assert_array_equal(s, _scales(x, result.alpha))
    for i, wi in enumerate((w, w2)):
        q, scale, clip = result.q[i], result.scale[i], result.clip[i]
        assert q.dtype == np.int8 and q.shape == wi.shape and scale.shape == clip.shape == (4, wi.shape[1])
        assert q.min() >= -8 and q.max() <= 7
        scaled = wi * s[:, None]
        absmax = np.abs(scaled).reshape(4, 32, -1).max(1).astype(np.float64)
        np.testing.assert_allclose(scale, clip * absmax / 7, rtol=1e-6)
        full = np.repeat(scale, 32, 0)
        np.testing.assert_array_equal(q * full, np.clip(np.rint(scaled / full), -8, 7) * full)
        np.testing.assert_array_equal(result.dequantized(i), q * full)
        assert np.all((clip >= 0.5 - 1e-6) & (clip <= 1))


def test_alpha_zero_is_rtn():
    x, w = _salient_layer(1)
    result = awq_quantize(x, [w], group_size=32, grid=1, max_shrink=0.0)
    assert result.alpha == 0 and np.all(result.input_scale == 1) and np.all(result.clip[0] == 1)
    want, want_scale = _rtn(w, 32)
    np.testing.assert_array_equal(result.dequantized(0), want)
    np.testing.assert_array_equal(result.scale[0], want_scale)


def test_scale_search_returns_the_argmin():
    x, w = _salient_layer(2, factor=10)
    grid = 10
    result = awq_quantize(x, [w], group_size=32, grid=grid, max_shrink=0.0)
    errors = []
    for step in range(grid):
        s = _scales(x, step / grid)
        errors.append(_error(x, w, x / s, _rtn(w * s[:, None], 32)[0]))
    assert result.alpha == pytest.approx(int(np.argmin(errors)) / grid)
    assert 0 < result.alpha  # salient channels make scaling worth it
    assert _error(x, w, x / result.input_scale, result.dequantized(0)) == pytest.approx(min(errors), rel=1e-9)


def test_clip_search_returns_the_argmin_per_group_and_column():
    x, w = _salient_layer(3, k=64, n=6, salient=(5, 40))
    result = awq_quantize(x, [w], group_size=16, grid=4, clip_grid=10, max_shrink=0.4)
    s = result.input_scale
    xs = (x / s).astype(np.float64)
    scaled = w * s[:, None]
    ratios = [1.0, 0.9, 0.8, 0.7, 0.6]
    for group in range(4):
        rows = slice(group * 16, (group + 1) * 16)
        errors = np.stack([np.sum((xs[:, rows] @ (scaled[rows] - _rtn(scaled[rows], 16, r)[0])) ** 2, axis=0)
                           for r in ratios])  # [ratios, columns]
        np.testing.assert_allclose(result.clip[0][group], np.array(ratios)[np.argmin(errors, 0)], rtol=1e-6)
    assert np.any(result.clip[0] < 1)


def test_awq_beats_rtn_on_salient_channels():
    x, w = _salient_layer(4, m=1024, k=256, n=64, salient=(3, 50, 99, 180, 201))
    result = awq_quantize(x, [w], group_size=32)
    awq = _error(x, w, x / result.input_scale, result.dequantized(0))
    rtn = _error(x, w, x, _rtn(w, 32)[0])
    assert awq < 0.6 * rtn


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_awq_never_worse_than_rtn_on_gaussian_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 64)).astype(np.float32)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    result = awq_quantize(x, [w], group_size=32)
    awq = _error(x, w, x / result.input_scale, result.dequantized(0))
    assert awq <= _error(x, w, x, _rtn(w, 32)[0]) * (1 + 1e-6)


def test_shared_input_is_one_search_over_all_weights():
    x, w = _salient_layer(8)
    together = awq_quantize(x, [w[:, :20], w[:, 20:]], group_size=32)
    joined = awq_quantize(x, [w], group_size=32)
    np.testing.assert_array_equal(together.input_scale, joined.input_scale)
    np.testing.assert_array_equal(np.concatenate(together.q, 1), joined.q[0])
    np.testing.assert_array_equal(np.concatenate(together.scale, 1), joined.scale[0])


def test_bad_shapes_are_named():
    x = np.ones((8, 48), np.float32)
    with pytest.raises(ValueError, match="K = 48.*group_size = 32"):
        awq_quantize(x, [np.ones((48, 4), np.float32)], group_size=32)
    with pytest.raises(ValueError, match="expected \\[48, N\\]"):
        awq_quantize(x, [np.ones((40, 4), np.float32)], group_size=16)
