"""The prunable span and its kept count: one rule for every selection op.

An op with the attributes protect / span_end (and keep / keep_ratio when it selects)
works on the span [protect, end) of its N tokens, end = span_end, or N when span_end is
0; the tokens before and after the span are always kept. It keeps

    k = keep                                                   if keep > 0 (static)
    k = max(1, min(span, ceil(keep_ratio · span - 1e-9)))      else (span = end - protect)

`Span` computes this on plain ints and on TensorRT shape expressions (`sym` =
`tensorrt.plugin`, or anything with its `cdiv`, `max` and `min`: shape expressions have
+, -, * and // but no reflected operators, so they are kept on the left), in exact
integer arithmetic: keep_ratio = a / q exactly (a float is a dyadic rational).
`span_graph` / `around_span` build the same rule as ONNX nodes for a decomposition,
reading the attributes at run time (float64 there: it agrees with the exact form, see
tests/plugins/test_kernels.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from .base import AttrSpec

#: the slack of ceil(keep_ratio · span - EPS)
EPS = 1e-9
#: bound on the span length for which the symbolic k stays inside int64 arithmetic
_MAX_SPAN_BITS = 31


def plus(a, b):
    """a + b with a shape expression (if any) on the left."""
    return b + a if isinstance(a, int) and not isinstance(b, int) else a + b


def times(a, b):
    """a * b with a shape expression (if any) on the left."""
    return b * a if isinstance(a, int) and not isinstance(b, int) else a * b


def _ratio_terms(keep_ratio: float, symbolic: bool) -> tuple[int, int, int]:
    """(a, c, q) with ceil(keep_ratio · span - EPS) == ceil((a · span - c) / q) for every span.

    keep_ratio = a / q exactly and c = floor(EPS · q): for an integer t = q·j - a·span,
    t >= -EPS·q  <=>  t >= -floor(EPS·q). Symbolic (int64) arithmetic needs small terms:
    float32 ratios (what TensorRT passes) down to 2^-38 fit.
    """
    ratio = Fraction(keep_ratio)
    a, q = ratio.numerator, ratio.denominator
    c = math.floor(Fraction(EPS) * q)
    if symbolic and (abs(a).bit_length() + _MAX_SPAN_BITS > 62 or q.bit_length() > 62):
        raise ValueError(
            f"keep_ratio={keep_ratio!r} has no exact int64 form for a TensorRT shape expression "
            "(use a float32 value >= 2**-38, or a static keep > 0)")
    return a, c, q


def kept_count(span, *, keep: int, keep_ratio: float, sym=None):
    """Tokens kept of a span of `span` tokens (an int or a shape expression)."""
    if keep > 0:
        return keep
    a, c, q = _ratio_terms(keep_ratio, symbolic=not isinstance(span, int))
    if isinstance(span, int):
        return max(1, min(span, -((c - a * span) // q)))
    # the numerator is clamped to >= 1 so that CEIL_DIV only sees positive operands: k >= 1
    numerator = sym.max(span * a - c, 1) if a > 0 else 1
    k = sym.cdiv(numerator, q) if not isinstance(numerator, int) else 1
    return sym.min(k, span) if not isinstance(k, int) else k


def selection_attributes(verb: str) -> tuple[AttrSpec, ...]:
    """keep / protect / span_end / keep_ratio: the schema of the selection ops (TokenPrune
    and the ops built on its rule); `verb`: "kept", "picked", ..."""
    return (
        AttrSpec("keep", int, f"span tokens {verb} (build-time constant); 0: use keep_ratio at run time"),
        AttrSpec("protect", int, "start of the span: tokens before it are always kept", 0),
        AttrSpec("span_end", int, "end of the span (exclusive); 0 means N", 0),
        AttrSpec("keep_ratio", float, f"fraction of the span {verb} when keep == 0", 1.0),
    )


@dataclass(frozen=True)
class Span:
    """The span attributes of one node (`Span.of(op.attribute_values(...))`); an op
    without keep / keep_ratio (it only scores the span) leaves them neutral."""

    protect: int = 0
    span_end: int = 0
    keep: int = 0
    keep_ratio: float = 1.0

    @classmethod
    def of(cls, attrs: Mapping[str, Any]) -> Span:
        """The span of an op's attributes (those it lacks keep their defaults above)."""
        return cls(**{f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})

    def end(self, n):
        return self.span_end if self.span_end > 0 else n

    def length(self, n):
        return self.end(n) - self.protect

    def kept(self, n, sym=None):
        """k for N = n tokens (an int or a shape expression)."""
        if self.keep > 0:
            return self.keep
        return kept_count(self.length(n), keep=self.keep, keep_ratio=self.keep_ratio, sym=sym)

    def out_tokens(self, n, sym=None):
        """protect + k + (N - end): the tokens a selection keeps."""
        suffix = n - self.span_end if self.span_end > 0 else 0
        return plus(plus(self.kept(n, sym), self.protect), suffix)

    def check(self, n, op: str, counted: bool = True, sym=None) -> None:
        """Raise a one-line ValueError (prefixed by `op`) for a span outside the N tokens or
        a k outside [1, span]; with a shape expression `n`, only what does not depend on it
        (and, given `sym`, that k has an exact shape-expression form)."""
        protect, concrete = self.protect, isinstance(n, int)
        if concrete:
            bad = not 0 <= protect < self.end(n) <= n
        else:
            bad = protect < 0 or (self.span_end > 0 and protect >= self.span_end)
        if bad:
            end = self.end(n) if concrete or self.span_end > 0 else "N"
            raise ValueError(f"{op}: span [{protect}, {end}) is not inside {n if concrete else 'the N'} tokens")
        if not counted:
            return
        try:
            if concrete or self.span_end > 0:
                span = self.length(n)
                k = kept_count(span, keep=self.keep, keep_ratio=self.keep_ratio)
                if not 1 <= k <= span:
                    raise ValueError(f"keep={self.keep} must be in [1, {span}] for a span of {span} tokens")
            if sym is not None:
                self.kept(n, sym)
        except ValueError as exc:
            raise ValueError(f"{op}: {exc}") from None


# ------------------------------------------------------------------ as ONNX nodes


def span_graph(b, tokens, counted: bool = True, axis: int = 1) -> SimpleNamespace:
    """The span of `tokens` (N on `axis`: [B, N, ...] by default) in a decomposition (builder `b`), from the function's
    attributes protect / span_end (and keep / keep_ratio when `counted`): scalars n_s,
    end_s, span_s, protect_s (and k_s), and the [1] tensors end, protect (and k)."""
    s = SimpleNamespace(ax0=b.const([0]), zero_s=b.const(0), one_s=b.const(1))
    s.protect_s, span_end_s = b.attr("protect"), b.attr("span_end")
    s.n1 = b.Shape(tokens, start=axis, end=axis + 1)
    s.n_s = b.Squeeze(s.n1)
    s.end_s = b.Where(b.Greater(span_end_s, s.zero_s), span_end_s, s.n_s)  # span_end == 0 means N
    s.end = b.Unsqueeze(s.end_s, s.ax0)
    s.protect = b.Unsqueeze(s.protect_s, s.ax0)
    s.span_s = b.Sub(s.end_s, s.protect_s)
    if counted:
        # keep when > 0, else max(1, min(span, ceil(keep_ratio · span - EPS))) in float64
        double = 11
        keep_s, ratio = b.attr("keep"), b.attr("keep_ratio")
        k_real = b.Mul(b.Cast(s.span_s, to=double), b.Cast(ratio, to=double))
        k_ratio_raw = b.Cast(b.Ceil(b.Sub(k_real, b.const(EPS, np.float64))), to=7)
        k_ratio = b.Min(b.Max(k_ratio_raw, s.one_s), s.span_s)
        s.k_s = b.Where(b.Greater(keep_s, s.zero_s), keep_s, k_ratio)
        s.k = b.Unsqueeze(s.k_s, s.ax0)
    return s


def around_span(b, s: SimpleNamespace, middle):
    """The positions a selection keeps, int64 [B, protect + m + N - end]: the prefix
    0..protect-1, then `middle` [B, m] (the span positions it picked), then the suffix
    end..N-1: `middle` padded with zeros to that length, plus the prefix / suffix positions
    (a Range of that length, zero over the middle). Never a Concat of a possibly empty
    prefix / suffix Range: OpenVINO 2026.4 crashes (SIGFPE) folding the Broadcast of an empty
    Range when the shapes are static."""
    after_s = b.Add(s.protect_s, b.Squeeze(b.Shape(middle, start=1, end=2)))  # where the suffix starts
    suffix_len = b.Sub(s.n1, s.end)
    padded = b.Pad(middle, b.Concat(s.ax0, s.protect, s.ax0, suffix_len, axis=0))  # zeros around it
    i = b.Range(s.zero_s, b.Add(after_s, b.Squeeze(suffix_len)), s.one_s)
    outside = b.Where(b.Less(i, s.protect_s), i,
                      b.Where(b.Less(i, after_s), s.zero_s, b.Add(s.end_s, b.Sub(i, after_s))))
    return b.Add(padded, outside)


def drop_mask(b, kept, s_p):
    """[B, span] 1 where a span token was dropped, 0 where kept, in the type of the span
    scores `s_p`, from the kept positions in the span (ones scattered there without reduction)."""
    one_t = b.CastLike(b.const([1.0], np.float32), s_p)
    ones = b.Expand(one_t, b.Shape(kept))
    zeros = b.CastLike(b.ConstantOfShape(b.Shape(s_p)), s_p)
    return b.Sub(one_t, b.ScatterElements(zeros, kept, ones, axis=1))
