"""The recipe's quantization method applied to a model's linear layers: the numbers only.

`quantize_linears` takes the constant weights of the MatMuls to quantize, grouped by the
activation they read (q, k and v share one), plus what calibration measured on those
activations, and returns one `QuantizedLinear` per MatMul: codes, scales, and — for
SmoothQuant and AWQ — the per-channel input scale s (the MatMul then reads x / s, with
diag(s)·W quantized). Which ONNX ops run the numbers is the pass's business (encodings).

| weights | activations | rtn | smoothquant | awq | gptq |
|---|---|---|---|---|---|
| int8 per output channel | int8 (dynamic on ORT, static on TensorRT) | ✓ | ✓ | | ✓ |
| int4 groups of group_size | none (weight-only) | ✓ | | ✓ | ✓ |
| fp8 E4M3 per output channel | fp8 static per tensor | ✓ | ✓ | | |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..recipe import QuantizationOptions
from .awq import awq_quantize
from .gptq import gptq_quantize
from .numerics import (INT8_MAX, dequantize_fp8, fp8_e4m3, fp8_scale, quantize_fp8_per_tensor,
                       quantize_int4_groupwise, quantize_int8_per_channel)
from .smoothquant import search_alpha, smoothing_scales

#: statistics each method needs from calibration (compiler.calibration.ActivationStats fields)
NEEDED_STATISTICS = {"rtn": {"absmax"}, "smoothquant": {"absmax", "rows"}, "awq": {"rows"}, "gptq": {"hessian"}}


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


def quantize_linears(options: QuantizationOptions, linears: Sequence[Linear], stats: Mapping[str, object],
                     static_activations: bool = False) -> list[QuantizedLinear | Skipped]:
    """One QuantizedLinear (or a Skipped reason) per linear, in order.

    `stats` maps activation names to compiler.calibration.ActivationStats (with the
    fields of NEEDED_STATISTICS[options.method]); it may be empty for rtn when
    activations are dynamic. `static_activations`: int8 activations get a calibrated
    per-tensor scale (TensorRT); fp8 activations always do.
    """
    out: list[QuantizedLinear | Skipped | None] = [None] * len(linears)
    groups: dict[str, list[int]] = {}
    for i, linear in enumerate(linears):
        groups.setdefault(linear.activation, []).append(i)
    for activation, members in groups.items():
        weights = [linears[i].weight for i in members]
        results = _quantize_group(options, weights, stats.get(activation), static_activations)
        for i, result in zip(members, results):
            out[i] = result
    return out  # type: ignore[return-value]


def _quantize_group(options: QuantizationOptions, weights: list[np.ndarray], stat,
                    static_activations: bool) -> list[QuantizedLinear | Skipped]:
    fmt, method = options.weights, options.method
    if fmt == "int4":
        k = weights[0].shape[0]
        if k % options.group_size:
            reason = Skipped(f"K = {k} input rows are not a multiple of group_size = {options.group_size}")
            return [reason] * len(weights)
        if method == "awq":
            res = awq_quantize(_rows(stat, "awq"), weights, group_size=options.group_size)
            return [QuantizedLinear("int4", q, s, options.group_size, input_scale=res.input_scale, alpha=res.alpha)
                    for q, s in zip(res.q, res.scale)]
        if method == "gptq":
            return [QuantizedLinear("int4", *gptq_quantize(w, _hessian(stat), bits=4, group_size=options.group_size),
                                    options.group_size) for w in weights]
        return [QuantizedLinear("int4", *quantize_int4_groupwise(w, options.group_size), options.group_size)
                for w in weights]

    input_scale, alpha = None, None
    if method == "smoothquant":
        input_scale, alpha = _smoothing(options, weights, stat)
        weights = [w * input_scale[:, None] for w in weights]
    act_scale = None
    if fmt == "fp8" or static_activations:
        absmax = _absmax(stat)
        if input_scale is not None:
            absmax = absmax / input_scale
        top = float(np.max(absmax)) if absmax.size else 0.0
        act_scale = float(fp8_scale(top)) if fmt == "fp8" else (top / 127 if top > 0 else 1.0)
    results = []
    for w in weights:
        if fmt == "fp8":
            w_scale = fp8_scale(np.abs(w).max(axis=0))
            codes = fp8_e4m3(w / w_scale)
            results.append(QuantizedLinear("fp8", codes, w_scale, None, input_scale, act_scale, alpha))
        elif method == "gptq":
            codes, scale = gptq_quantize(w, _hessian(stat), bits=8, group_size=None)
            results.append(QuantizedLinear("int8", codes, scale[0], None, input_scale, act_scale, alpha))
        else:
            codes, scale = quantize_int8_per_channel(w)
            results.append(QuantizedLinear("int8", codes, scale, None, input_scale, act_scale, alpha))
    return results


def _smoothing(options: QuantizationOptions, weights: list[np.ndarray], stat) -> tuple[np.ndarray, float]:
    """SmoothQuant's s for the weights sharing one activation: given alpha, or the alpha
    with the least output error of the quantized layer on calibration rows."""
    absmax = _absmax(stat)
    if options.alpha is not None:
        return smoothing_scales(absmax, weights, options.alpha), options.alpha
    if options.weights == "fp8":
        alpha, s = search_alpha(_rows(stat, "smoothquant"), weights, quantize_activation=_fake_fp8,
                                quantize_weight=_fp8_weight, act_absmax=absmax)
    else:
        alpha, s = search_alpha(_rows(stat, "smoothquant"), weights, act_absmax=absmax)
    return s, alpha


def _fake_fp8(x: np.ndarray) -> np.ndarray:
    scale = fp8_scale(np.abs(x).max() if x.size else 0.0)
    return dequantize_fp8(quantize_fp8_per_tensor(x, scale), scale)


def _fp8_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = fp8_scale(np.abs(w).max(axis=0))
    return fp8_e4m3(w / scale), scale


def _absmax(stat) -> np.ndarray:
    if stat is None or stat.absmax is None:
        raise ValueError("calibration statistics (absmax) are missing for an activation")
    return np.asarray(stat.absmax, dtype=np.float32)


def _rows(stat, method: str) -> np.ndarray:
    if stat is None or stat.rows is None or not len(stat.rows):
        raise ValueError(f"{method} needs calibration rows of every quantized activation")
    return stat.rows


def _hessian(stat) -> np.ndarray:
    if stat is None or stat.hessian is None:
        raise ValueError("gptq needs the calibration Hessian of every quantized activation")
    return stat.hessian


__all__ = ["INT8_MAX", "Linear", "NEEDED_STATISTICS", "QuantizedLinear", "Skipped", "quantize_linears"]
