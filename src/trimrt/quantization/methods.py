"""The recipe's quantization method applied to a model's linear layers: the numbers only
(codes, scales, and SmoothQuant / AWQ's per-channel input scale s: the MatMul reads x / s,
diag(s)·W is quantized); which ONNX ops run them is the encodings' business.

A calibrated choice must hold on data it was not fitted to (SmoothQuant's α and AWQ's
scales can fit the outliers of the samples they saw): given `held_out` statistics, each
SmoothQuant / AWQ group and each GPTQ layer (after retrying with `GPTQ_DAMPING`) keeps the
method's numbers only when their held-out output error is below round-to-nearest's, else
falls back to RTN (`QuantizedLinear.method` then says "rtn").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from ..errors import RecipeError
from ..registry import QUANTIZATION_METHODS
from .awq import awq_quantize
from .gptq import gptq_quantize
from .numerics import (
    fake_quant_dynamic_uint8,
    fake_quant_fp8,
    fp8_scale,
    int8_scale,
    output_error,
    quantize_fp8_per_channel,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from .smoothquant import floor_quiet_channels, search_alpha, smoothed_output_error, smoothing_scales

if TYPE_CHECKING:
    from ..recipe import QuantizationOptions

#: GPTQ's relative dampings, tried in order until the held-out error beats RTN's
#: (more damping: less trust in the fitted Hessian, closer to RTN)
GPTQ_DAMPING = (0.01, 0.1, 1.0)
INT8_INT8, INT4_WEIGHT_ONLY, FP8_FP8 = ("int8", "int8"), ("int4", "none"), ("fp8", "fp8")
#: per-output-channel round to nearest of each per-channel format: w [K, N] -> (codes, scale [N])
PER_CHANNEL = {"int8": quantize_int8_per_channel, "fp8": quantize_fp8_per_channel}


@dataclass
class Linear:
    """One MatMul by a constant weight: the activation it reads and its weight [K, N]."""

    name: str
    activation: str
    weight: np.ndarray


@dataclass
class QuantizedLinear:
    """The quantized numbers of one MatMul: W ≈ codes · scale (per output channel for
    int8 / fp8, per group of `group_size` input rows for int4), read as x / input_scale."""

    format: str  # "int8" | "int4" | "fp8"
    codes: np.ndarray  # int8 [K, N] (int8 / int4 codes) or float32 on the E4M3 grid (fp8)
    scale: np.ndarray  # float32 [N] (int8, fp8) or [K // group_size, N] (int4)
    group_size: int | None = None
    #: SmoothQuant / AWQ: the MatMul reads x / input_scale (diag(s)·W is what is quantized)
    input_scale: np.ndarray | None = None
    #: static per-tensor activation scale (fp8; int8 on TensorRT), None: dynamic
    activation_scale: float | None = None
    #: SmoothQuant / AWQ: the migration strength chosen
    alpha: float | None = None
    #: the method that made these numbers: the recipe's, or "rtn" when the held-out check rejected it
    method: str | None = None
    #: held-out output error of the method's numbers / RTN's (None: not checked); < 1 when kept
    held_out_vs_rtn: float | None = None
    #: GPTQ: the relative damping used
    damping: float | None = None

    def dequantized(self) -> np.ndarray:
        """float32 [K, N]: the weight the build effectively multiplies x / input_scale by."""
        codes = self.codes.astype(np.float32)
        if self.format == "int4":
            return codes * np.repeat(self.scale, self.group_size, axis=0)
        return codes * self.scale[None, :]

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes (int4 packed two a byte), scales, zero points (one byte per
        output channel for int8 / fp8), the input scale."""
        k, n = self.codes.shape
        codes = k * n // 2 if self.format == "int4" else k * n + n
        return codes + self.scale.nbytes + (0 if self.input_scale is None else self.input_scale.nbytes)


class Skipped(Exception):
    """This MatMul cannot take the recipe's format (the message says why); it stays float."""


class QuantizationMethod:
    """A [quantization] method, registered with `@QUANTIZATION_METHODS.register("name")`:
    `formats` (the (weights, activations) pairs it builds), `recipe_keys` (its own keys),
    `needs_calibration` (even for dynamic activations), `statistics` / `held_out_statistics`
    (the ActivationStats fields its fit / its held-out check read) and `plan`, its numbers."""

    formats: ClassVar[tuple[tuple[str, str], ...]] = ()
    recipe_keys: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = True
    statistics: ClassVar[frozenset[str]] = frozenset()
    held_out_statistics: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: QuantizationOptions) -> None:
        self.options = options

    def plan(self, weights: list[np.ndarray], stat, static_activations: bool, check) -> list[QuantizedLinear]:
        """One QuantizedLinear per weight [K, N] reading the activation of `stat` (its
        calibration statistics; `check`: those of the held-out samples, or None)."""
        raise NotImplementedError


@QUANTIZATION_METHODS.register("rtn")
class RoundToNearest(QuantizationMethod):
    """Round to nearest: per output channel (int8, fp8) or per group of input rows (int4)."""

    formats = (INT8_INT8, INT4_WEIGHT_ONLY, FP8_FP8)
    needs_calibration = False
    statistics = frozenset({"absmax"})

    def plan(self, weights, stat, static_activations, check):
        if self.options.weights == "int4":
            return [_rtn(w, "int4", self.options.group_size) for w in weights]
        return _per_channel(self.options, weights, stat, static_activations)


@QUANTIZATION_METHODS.register("smoothquant")
class SmoothQuant(QuantizationMethod):
    """SmoothQuant: x / s and diag(s)·W, s migrating activation outliers into the weights."""

    formats = (INT8_INT8, FP8_FP8)
    recipe_keys = ("alpha",)
    statistics = frozenset({"absmax", "rows"})
    held_out_statistics = frozenset({"rows"})

    def plan(self, weights, stat, static_activations, check):
        input_scale, alpha, ratio = _smoothing(self.options, weights, stat, check)
        if ratio is not None and not ratio < 1.0:
            input_scale, alpha = None, None  # smoothing did not help on held-out rows: RTN
        else:
            weights = [w * input_scale[:, None] for w in weights]
        results = _per_channel(self.options, weights, stat, static_activations, input_scale, alpha)
        for q in results:
            q.method = "smoothquant" if input_scale is not None else "rtn"
            q.held_out_vs_rtn = None if ratio is None else round(float(ratio), 6)
        return results


@QUANTIZATION_METHODS.register("awq")
class Awq(QuantizationMethod):
    """AWQ: INT4 weights scaled (and clipped) per input channel by the activations' salience."""

    formats = (INT4_WEIGHT_ONLY,)
    statistics = frozenset({"rows"})
    held_out_statistics = frozenset({"hessian"})

    def plan(self, weights, stat, static_activations, check):
        g = self.options.group_size
        res = awq_quantize(_stat(stat, "rows", "awq"), weights, group_size=g)
        awq = [QuantizedLinear("int4", q, s, g, input_scale=res.input_scale, alpha=res.alpha)
               for q, s in zip(res.q, res.scale)]
        return _first_better_than_rtn([awq], weights, check, lambda w: _rtn(w, "int4", g))


@QUANTIZATION_METHODS.register("gptq")
class Gptq(QuantizationMethod):
    """GPTQ: weights rounded column by column, the error pushed onto the columns left (Hessian XᵀX);
    with a held-out Hessian, the first damping of GPTQ_DAMPING whose held-out error beats
    RTN's, else RTN."""

    formats = (INT8_INT8, INT4_WEIGHT_ONLY)
    statistics = frozenset({"hessian"})
    held_out_statistics = frozenset({"hessian"})

    def plan(self, weights, stat, static_activations, check):
        fmt = self.options.weights
        g = self.options.group_size if fmt == "int4" else None
        act_scale = None if fmt == "int4" else _activation_scale(fmt, stat, None, static_activations)
        h = _stat(stat, "hessian", "gptq")
        results = []
        for w in weights:
            candidates = ([_gptq(w, h, fmt, g, damp)] for damp in GPTQ_DAMPING)
            [q] = _first_better_than_rtn(candidates, [w], check, lambda w: _rtn(w, fmt, g))
            q.activation_scale = act_scale
            results.append(q)
        return results


def quantize_linears(options: QuantizationOptions, linears: Sequence[Linear], stats: Mapping[str, object],
                     static_activations: bool = False,
                     held_out: Mapping[str, object] | None = None) -> list[QuantizedLinear | Skipped]:
    """One QuantizedLinear (or a Skipped reason) per linear, in order. `stats` / `held_out`:
    activation name -> ActivationStats of the fit / held-out samples (the method's
    `statistics` / `held_out_statistics`); `static_activations`: calibrated int8 activation
    scales (TensorRT; fp8 always has them)."""
    method_class = QUANTIZATION_METHODS[options.method]
    if (options.weights, options.activations) not in method_class.formats:
        raise RecipeError(f"quantization method {options.method!r} does not build weights = {options.weights!r}, "
                          f"activations = {options.activations!r}; it builds {list(method_class.formats)}")
    method = method_class(options)
    out: list[QuantizedLinear | Skipped | None] = [None] * len(linears)
    groups: dict[str, list[int]] = {}
    for i, linear in enumerate(linears):
        groups.setdefault(linear.activation, []).append(i)
    for activation, members in groups.items():
        weights = [linears[i].weight for i in members]
        check = None if held_out is None else held_out.get(activation)
        k, g = weights[0].shape[0], options.group_size
        if options.weights == "int4" and k % g:
            results = [Skipped(f"K = {k} input rows are not a multiple of group_size = {g}")] * len(weights)
        else:
            results = method.plan(weights, stats.get(activation), static_activations, check)
        for i, result in zip(members, results):
            if isinstance(result, QuantizedLinear) and result.method is None:
                result.method = options.method
            out[i] = result
    return out  # type: ignore[return-value]


def _activation_scale(fmt: str, stat, input_scale: np.ndarray | None, static_activations: bool) -> float | None:
    """The static per-tensor activation scale (fp8 always, int8 when static), else None."""
    if not (fmt == "fp8" or static_activations):
        return None
    absmax = np.asarray(_stat(stat, "absmax", "quantization"), np.float32)
    if input_scale is not None:
        absmax = absmax / input_scale
    top = float(np.max(absmax)) if absmax.size else 0.0
    return float(fp8_scale(top)) if fmt == "fp8" else int8_scale(top)


def _per_channel(options: QuantizationOptions, weights: list[np.ndarray], stat, static_activations: bool,
                 input_scale: np.ndarray | None = None, alpha: float | None = None) -> list[QuantizedLinear]:
    """Round to nearest per output channel (int8 or fp8 E4M3), with the activation scale."""
    fmt = options.weights
    act_scale = _activation_scale(fmt, stat, input_scale, static_activations)
    return [QuantizedLinear(fmt, *PER_CHANNEL[fmt](w), None, input_scale, act_scale, alpha) for w in weights]


def _rtn(w: np.ndarray, fmt: str, group_size: int | None) -> QuantizedLinear:
    if fmt == "int4":
        return QuantizedLinear("int4", *quantize_int4_groupwise(w, group_size), group_size, method="rtn")
    return QuantizedLinear(fmt, *PER_CHANNEL[fmt](w), method="rtn")


def _gptq(w: np.ndarray, h: np.ndarray, fmt: str, group_size: int | None, damp: float) -> QuantizedLinear:
    codes, scale = gptq_quantize(w, h, bits=4 if fmt == "int4" else 8, group_size=group_size, damp=damp)
    return QuantizedLinear(fmt, codes, scale if fmt == "int4" else scale[0], group_size, damping=damp)


def _weight_error(h: np.ndarray, w: np.ndarray, q: QuantizedLinear) -> float:
    """||X (W - Ŵ)||² through H ∝ XᵀX, Ŵ the weight the build effectively applies to x."""
    effective = q.dequantized().astype(np.float64)
    if q.input_scale is not None:
        effective = effective / q.input_scale.astype(np.float64)[:, None]
    return output_error(h, np.asarray(w, np.float64) - effective)


def _ratio(error: float, baseline: float) -> float:
    if baseline > 0:
        return error / baseline
    return 1.0 if error == 0 else float("inf")


def _first_better_than_rtn(candidates: Iterable[list[QuantizedLinear]], weights: list[np.ndarray], check,
                           rtn: Callable[[np.ndarray], QuantizedLinear]) -> list[QuantizedLinear]:
    """The first of `candidates` (each the numbers of `weights`) whose summed held-out error
    is below RTN's, else RTN's (marked with the best ratio tried); without held-out
    statistics, the first candidate."""
    candidates = iter(candidates)
    if check is None or check.hessian is None:
        return next(candidates)
    fallback = [rtn(w) for w in weights]

    def error(qs: list[QuantizedLinear]) -> float:
        return sum(_weight_error(check.hessian, w, q) for w, q in zip(weights, qs))

    baseline, best = error(fallback), float("inf")
    for chosen in candidates:
        ratio = _ratio(error(chosen), baseline)
        best = min(best, ratio)
        if ratio < 1.0:
            break
    else:
        chosen = fallback
    for q in chosen:
        q.held_out_vs_rtn = round(best, 6)
    return chosen


def _smoothing(options: QuantizationOptions, weights: list[np.ndarray], stat,
               check) -> tuple[np.ndarray, float, float | None]:
    """SmoothQuant's s for the weights sharing one activation (from its channel maxima,
    quiet channels floored): given alpha, or the alpha with the least output error of
    the quantized layer on calibration rows; and the
    held-out output error with s over RTN's (None without held-out rows)."""
    absmax = floor_quiet_channels(np.asarray(_stat(stat, "absmax", "smoothquant"), np.float32))
    quantizers = (fake_quant_fp8 if options.weights == "fp8" else fake_quant_dynamic_uint8,
                  PER_CHANNEL[options.weights])
    if options.alpha is not None:
        alpha, s = options.alpha, smoothing_scales(absmax, weights, options.alpha)
    else:
        alpha, s = search_alpha(_stat(stat, "rows", "smoothquant"), weights, *quantizers,
                                act_absmax=absmax)
    if check is None or check.rows is None or not len(check.rows):
        return s, alpha, None
    x = np.asarray(check.rows, np.float32)
    references = [x @ w for w in weights]
    smoothed = smoothed_output_error(x, weights, references, s, *quantizers)
    plain = smoothed_output_error(x, weights, references, np.ones_like(s), *quantizers)
    return s, alpha, _ratio(smoothed, plain)


def _stat(stat, field: str, method: str) -> np.ndarray:
    """One calibration statistic (an ActivationStats field) of an activation the method needs."""
    value = None if stat is None else getattr(stat, field)
    if value is None or not len(value):
        raise ValueError(f"{method} needs the calibration statistic {field!r} of every quantized activation")
    return value

