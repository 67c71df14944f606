"""The calibration split (which samples fit, which check) and the held-out check of each
method's choice against round-to-nearest, on synthetic activations where the fitted
choice does or does not carry over to samples it never saw."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.quantization.test_gptq import hessian
from trimrt.quantization.calibration import ActivationStats
from trimrt.quantization.holdout import HELD_OUT_EVERY, MIN_SPLIT_SAMPLES, split_samples
from trimrt.quantization.methods import Linear, quantize_linears
from trimrt.quantization.numerics import fake_quant_dynamic_uint8, quantize_int8_per_channel
from trimrt.quantization.smoothquant import smoothed_output_error
from trimrt.recipe import QuantizationOptions


def test_equal_lengths_interleave_and_the_parts_are_disjoint():
    split = split_samples(list(range(12)), size=lambda _: 7)
    assert split.held_out == [3, 7, 11] and split.fit == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert split.measured_on == "held-out"


def test_the_longest_samples_are_held_out_by_real_tokens():
    lengths = [5, 30, 6, 7, 31, 8, 9, 10, 11, 4, 12, 13]
    feeds = [{"input_ids": np.zeros((1, 40), np.int64),
              "attention_mask": (np.arange(40) < n).astype(np.int64)[None]} for n in lengths]
    split = split_samples(feeds)
    assert sorted(int(f["attention_mask"].sum()) for f in split.held_out) == [13, 30, 31]
    assert len(split.fit) == len(feeds) - len(feeds) // HELD_OUT_EVERY


def test_too_few_samples_are_not_split_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="trimrt.quantization.holdout"):
        split = split_samples(list(range(MIN_SPLIT_SAMPLES - 1)))
    assert split.held_out == [] and split.fit == list(range(MIN_SPLIT_SAMPLES - 1))
    assert split.measured_on == "fit"
    assert "too few to hold some back" in caplog.text


def _stats(x, want=("absmax", "rows", "hessian")) -> ActivationStats:
    return ActivationStats("x", len(x), absmax=np.abs(x).max(0) if "absmax" in want else None,
                           rows=x if "rows" in want else None,
                           hessian=hessian(x) / len(x) if "hessian" in want else None)


def _layer(seed=0, m=512, k=64, n=48, quiet_spikes=False):
    """(fit rows, held-out rows, weights): outlier channels as in transformers; with
    `quiet_spikes`, channels that were quiet while fitting spike in the held-out rows."""
    rng = np.random.default_rng(seed)
    fit, held = (rng.standard_normal((m, k)).astype(np.float32) for _ in range(2))
    for x in (fit, held):
        x[:, [3, 17, 29]] *= 40
    if quiet_spikes:
        fit[:, 40:48] *= 0.01
        held[::7, 40:48] *= 60
    weights = [(rng.standard_normal((k, n)) * 0.1).astype(np.float32) for _ in range(2)]
    return fit, held, weights


def _smoothquant(fit, held, weights, check=True):
    linears = [Linear(f"fc{i}", "x", w) for i, w in enumerate(weights)]
    return quantize_linears(QuantizationOptions(method="smoothquant"), linears, {"x": _stats(fit)},
                            held_out={"x": _stats(held, ("rows",))} if check else None)


def test_smoothquant_that_carries_over_is_kept():
    fit, held, weights = _layer()
    plan = _smoothquant(fit, held, weights)
    assert all(q.method == "smoothquant" and q.input_scale is not None for q in plan)
    assert plan[0].held_out_vs_rtn < 1.0 and plan[0].alpha is not None


def test_smoothquant_fitted_to_quiet_channels_falls_back_to_rtn_on_held_out_spikes():
    fit, held, weights = _layer(quiet_spikes=True)
    unchecked = _smoothquant(fit, held, weights, check=False)
    s = unchecked[0].input_scale
    refs = [held @ w for w in weights]
    smoothed = smoothed_output_error(held, weights, refs, s, fake_quant_dynamic_uint8, quantize_int8_per_channel)
    rtn = smoothed_output_error(held, weights, refs, np.ones_like(s), fake_quant_dynamic_uint8,
                                quantize_int8_per_channel)
    assert smoothed > rtn  # the fitted α hurts on the held-out rows: the check must catch it
    plan = _smoothquant(fit, held, weights)
    assert all(q.method == "rtn" and q.input_scale is None and q.alpha is None for q in plan)
    assert plan[0].held_out_vs_rtn == pytest.approx(smoothed / rtn, rel=1e-5)
    for q, w in zip(plan, weights):
        codes, scale = quantize_int8_per_channel(w)
        np.testing.assert_array_equal(q.codes, codes)


@pytest.mark.parametrize("weights_format", ["int8", "int4"])
def test_gptq_keeps_only_what_beats_rtn_on_held_out_rows(weights_format):
    """Fitted on rows that span half the input space, GPTQ pushes rounding error into the
    other half; held-out rows that use it expose that. Kept ⇒ better than RTN there."""
    rng = np.random.default_rng(1)
    k, n = 64, 32
    basis = rng.standard_normal((k // 2, k))
    fit = (rng.standard_normal((1024, k // 2)) @ basis).astype(np.float32)
    held = rng.standard_normal((1024, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    options = QuantizationOptions(weights=weights_format, method="gptq", group_size=16,
                                  activations="none" if weights_format == "int4" else "int8")
    linears = [Linear("fc", "x", w)]
    [unchecked] = quantize_linears(options, linears, {"x": _stats(fit)})
    [checked] = quantize_linears(options, linears, {"x": _stats(fit)}, held_out={"x": _stats(held, ("hessian",))})
    h = held.astype(np.float64).T @ held

    def error(q):
        e = w - q.dequantized()
        return float(np.sum(e * (h @ e)))

    [rtn] = quantize_linears(QuantizationOptions(weights=weights_format, group_size=16,
                                                 activations=options.activations), linears, {})
    assert error(unchecked) > error(rtn)  # GPTQ at 1% damping overfits the fit rows' subspace
    assert checked.held_out_vs_rtn is not None
    if checked.method == "gptq":
        assert error(checked) < error(rtn) and checked.damping > unchecked.damping
    else:
        assert checked.method == "rtn"
        np.testing.assert_array_equal(checked.codes, rtn.codes)


def test_awq_scales_fitted_to_quiet_channels_fall_back_to_rtn_on_held_out_spikes():
    fit, held, weights = _layer(k=128, quiet_spikes=True)
    fit[:, 60:64] *= 30  # the fit's salient channels: AWQ scales their weight rows up
    options = QuantizationOptions(weights="int4", activations="none", method="awq", group_size=32)
    linears = [Linear(f"fc{i}", "x", w) for i, w in enumerate(weights)]
    unchecked = quantize_linears(options, linears, {"x": _stats(fit)})
    checked = quantize_linears(options, linears, {"x": _stats(fit)}, held_out={"x": _stats(held, ("hessian",))})
    rtn = quantize_linears(QuantizationOptions(weights="int4", activations="none", group_size=32), linears, {})
    h = held.astype(np.float64).T @ held

    def error(plan):
        total = 0.0
        for q, w in zip(plan, weights):
            e = w - q.dequantized() / (1.0 if q.input_scale is None else q.input_scale[:, None])
            total += float(np.sum(e * (h @ e)))
        return total

    assert unchecked[0].alpha > 0 and error(unchecked) > error(rtn)
    assert all(q.method == "rtn" and q.input_scale is None for q in checked)
    assert checked[0].held_out_vs_rtn == pytest.approx(error(unchecked) / error(rtn), rel=1e-4)
