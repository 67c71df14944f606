"""SmoothQuant: the scales follow the paper's formula, smoothing leaves X W unchanged, it
lowers the W8A8 error when a channel is an outlier, and the alpha search returns the
argmin of the error computed here from the formulas."""

from __future__ import annotations

import numpy as np
import pytest

from trimrt.quantization.smoothquant import floor_quiet_channels, search_alpha, smoothing_scales


def smooth_weights(weights, s):
    """float32 diag(s) W for each weight (the activation side is X / s)."""
    s = np.asarray(s, dtype=np.float32)
    return [np.asarray(w, dtype=np.float32) * s[:, None] for w in weights]


def _dynamic_uint8(x):
    """DynamicQuantizeLinear + DequantizeLinear, from the ONNX operator text."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    zp = np.float32(np.clip(np.rint(-np.float32(lo) / scale), 0, 255))
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale


def _int8_per_channel(w):
    scale = (np.abs(w).max(0) / np.float32(127)).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127) * scale


def _w8a8_error(x, weights, s):
    xq = _dynamic_uint8((x / s).astype(np.float32))
    return sum(float(np.sum((x.astype(np.float64) @ w - xq @ _int8_per_channel((w * s[:, None]).astype(np.float32))) ** 2))
               for w in weights)


def _outlier_layer(seed=0, m=256, k=64, n=(48, 48, 48)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, [3, 17, 29]] *= 40  # outlier channels, as in LayerNorm outputs of transformers
    weights = [(rng.standard_normal((k, ni)) * 0.1).astype(np.float32) for ni in n]
    return x, weights


def test_scales_follow_the_formula_with_shared_weights():
    rng = np.random.default_rng(1)
    act = rng.uniform(0.1, 30, 16)
    act[2] = 0  # a dead channel
    w1, w2 = rng.standard_normal((16, 8)), rng.standard_normal((16, 5)) * 3
    w1[5], w2[5] = 0, 0  # a channel no weight reads
    s = smoothing_scales(act, [w1, w2], 0.6)
    assert s.dtype == np.float32 and s.shape == (16,)
    wmax = np.maximum(np.abs(w1).max(1), np.abs(w2).max(1))
    live = np.array([j not in (2, 5) for j in range(16)])
    want = act[live] ** 0.6 / wmax[live] ** 0.4
    np.testing.assert_allclose(s[live], want, rtol=1e-6)
    assert s[2] == 1 and s[5] == 1
    huge = smoothing_scales(np.full(4, 1e30), [np.full((4, 2), 1e-30)], 0.5)
    assert np.all(huge == np.float32(1e5))  # clamped


def test_smoothing_keeps_the_product():
    x, weights = _outlier_layer(seed=2)
    x = x.astype(np.float64)
    s = smoothing_scales(np.abs(x).max(0), weights, 0.5)
    smoothed = smooth_weights(weights, s)
    for w, ws in zip(weights, smoothed):
        np.testing.assert_array_equal(ws, w * s[:, None])
        # exact in real arithmetic: only float64 rounding remains (float32 W' adds its own rounding)
        reference = x @ w.astype(np.float64)
        smoothed = (x / s) @ (w.astype(np.float64) * s[:, None])
        np.testing.assert_allclose(smoothed, reference, rtol=0, atol=1e-12 * np.abs(reference).max())


def test_smoothing_lowers_the_w8a8_error_of_an_outlier_layer():
    x, weights = _outlier_layer(seed=3)
    plain = _w8a8_error(x, weights, np.ones(x.shape[1], np.float32))
    smoothed = _w8a8_error(x, weights, smoothing_scales(np.abs(x).max(0), weights, 0.5))
    assert smoothed < plain / 3


@pytest.mark.parametrize("seed", [4, 5])
def test_alpha_search_returns_the_argmin(seed):
    x, weights = _outlier_layer(seed=seed, k=32, n=(24, 40))
    alphas = np.round(np.arange(0.3, 0.96, 0.05), 2)
    alpha, s = search_alpha(x, weights)  # the default grid
    errors = [_w8a8_error(x, weights, smoothing_scales(np.abs(x).max(0), weights, a)) for a in alphas]
    assert alpha == alphas[int(np.argmin(errors))]
    np.testing.assert_array_equal(s, smoothing_scales(np.abs(x).max(0), weights, alpha))
    assert min(errors) < max(errors) * 0.9  # the search had something to choose


def test_alpha_search_takes_the_calibration_maximum_and_custom_quantizers():
    x, weights = _outlier_layer(seed=6, k=32, n=(16,))
    act_absmax = np.abs(x).max(0) * 2  # as if the full calibration set had larger maxima
    alpha, s = search_alpha(x[:64], weights, quantize_activation=lambda a: a,
                            quantize_weight=lambda w: (w, np.float32(1)), alphas=[0.5], act_absmax=act_absmax)
    assert alpha == 0.5
    np.testing.assert_array_equal(s, smoothing_scales(act_absmax, weights, 0.5))
    with pytest.raises(ValueError, match="expected \\[32, N\\]"):
        smoothing_scales(np.ones(32), [np.ones((31, 4))], 0.5)


def test_quiet_channels_are_floored_at_the_median_and_outliers_kept():
    absmax = np.array([0.01, 0.5, 1.0, 1.2, 2.0, 40.0])
    floored = floor_quiet_channels(absmax)
    median = np.median(absmax)
    np.testing.assert_allclose(floored, np.maximum(absmax, median))
    assert floored[-1] == 40.0 and floored[0] == median
    # so a channel quiet on the calibration data is not amplified beyond a median one
    weights = [np.ones((6, 4), np.float32)]
    s = smoothing_scales(floored, weights, 0.9)
    assert (absmax / s)[0] < (absmax / s)[2] and s[0] == s[1] == s[2]
