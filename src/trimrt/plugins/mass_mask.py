"""MassMask: which of a static top-k are really needed to reach a score mass (adaptive keep).

ATP-style adaptive pruning keeps, per input, the smallest top set of the span whose
cumulative score mass reaches `tau`, so the kept count is data-dependent. Shapes must be
static, so the compiler prunes with a TokenPrune of a static upper bound k_max and adds
this op, whose mask marks the kept tokens the input really needs (attention masks them
out); the count says how many that is.

Inputs score [B, N] (>= 0) and kept_index [B, M] int64 (TokenPrune's output: the input
tokens that were kept). The span is [protect, end) (end = span_end, or N when 0).

Per sample: the span's scores sorted descending (stable: ties to the lower index first),
cum_r = (s_(0) + ... + s_(r)) / total, total = the sum of the span's scores, and
c = min(span, 1 + #{r : cum_r < tau - TOLERANCE}); the span token of rank r is needed iff
r < c. If total == 0 no mass can be reached: every span token is needed (c = span).
TOLERANCE = 2^-20 (about 1e-6) absorbs rounding of the cumulative sum, so tau = 1.0 needs
the tokens up to the one completing the mass and none of the zero-mass tokens after it
(nor tokens carrying, together, less than 2^-20 of the mass at the tail). The sums are in
float64 and total is the last cumulative sum (the same additions); tau is a float32 (what
the ONNX attribute holds), and tau - 2^-20 is then exact in float64 in every
implementation (a power of two is a float32 constant in the Triton kernel too).

Outputs valid [B, M] (1.0 / 0.0): 1 where kept_index is outside the span or a needed span
token; count [B] int64: c.

The decomposition ranks with TopK, sums with CumSum, places the ranks with a
ScatterElements without reduction and reads them back with GatherElements by kept_index.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import AttrSpec, OpDef, TensorSpec
from .span import Span, span_graph
from .token_prune import select

NAME = "MassMask"
#: cum < tau - TOLERANCE: the slack of the mass comparison (a power of two: exact everywhere)
TOLERANCE = 2.0**-20


def check_attributes(n, *, tau: float, protect: int, span_end: int) -> None:
    """Raise ValueError for a tau outside (0, 1] or a span outside the n tokens (with a
    shape expression `n`: only what does not depend on it)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"MassMask: tau={tau} must be in (0, 1]")
    Span(protect, span_end).check(n, NAME, counted=False)


def needed_count(span_scores: np.ndarray, tau: float) -> np.ndarray:
    """c per row of span_scores [B, span]: the smallest top set reaching mass tau."""
    span = span_scores.shape[1]
    ordered = -np.sort(-span_scores.astype(np.float64), axis=1, kind="stable")
    cum = np.cumsum(ordered, axis=1)
    total = cum[:, -1:]
    below = (cum / np.where(total > 0, total, 1.0) < tau - TOLERANCE).sum(axis=1)
    return np.where(total[:, 0] > 0, np.minimum(span, 1 + below), span).astype(np.int64)


def reference(score: np.ndarray, kept_index: np.ndarray, *, tau: float, protect: int, span_end: int):
    b, n = score.shape
    check_attributes(n, tau=tau, protect=protect, span_end=span_end)
    end = Span(protect, span_end).end(n)
    if kept_index.size and not (0 <= kept_index.min() and kept_index.max() < n):
        raise ValueError(f"MassMask: kept_index must index the {n} tokens")
    s = score[:, protect:end]
    count = needed_count(s, tau)
    rank = np.argsort(np.argsort(-s, axis=1, kind="stable"), axis=1, kind="stable")  # stable descending rank
    needed = rank < count[:, None]
    in_span = (kept_index >= protect) & (kept_index < end)
    local = np.where(in_span, kept_index - protect, 0)
    valid = ~in_span | np.take_along_axis(needed, local, axis=1)
    return valid.astype(score.dtype), count


def decompose(b, score, kept_index):
    double, ax1 = 11, b.const([1])
    # span [protect, end)
    s = span_graph(b, score, counted=False)
    span = b.Unsqueeze(s.span_s, s.ax0)
    # the span's scores in stable descending order, their cumulative mass in float64
    s_p = b.Slice(score, s.protect, s.end, ax1)
    ordered, order = b.TopK(b.Cast(s_p, to=double), span, axis=1, largest=1, sorted=1, _outputs=2)
    cum = b.CumSum(ordered, b.const(1))
    total = b.Slice(cum, b.const([-1]), b.const([np.iinfo(np.int64).max]), ax1)  # [B, 1]
    has_mass = b.Greater(total, b.const(0.0, np.float64))
    fraction = b.Div(cum, b.Where(has_mass, total, b.const(1.0, np.float64)))
    threshold = b.Sub(b.Cast(b.attr("tau"), to=double), b.const(TOLERANCE, np.float64))
    n_below = b.ReduceSum(b.Cast(b.Less(fraction, threshold), to=7), ax1, keepdims=1)
    c = b.Where(has_mass, b.Min(b.Add(n_below, s.one_s), span), span)  # [B, 1]
    # rank of every span token: rank[order[r]] = r (a scatter without reduction)
    order_shape = b.Shape(order)
    ranks = b.Expand(b.Range(s.zero_s, s.span_s, s.one_s), order_shape)
    rank_zeros = b.ConstantOfShape(order_shape, value=ir.tensor(np.array([0], dtype=np.int64)))
    rank = b.ScatterElements(rank_zeros, order, ranks, axis=1)
    needed_f = b.CastLike(b.Less(rank, c), score)
    # valid = outside the span, or a needed span token
    local = b.Sub(kept_index, s.protect_s)
    in_span = b.And(b.GreaterOrEqual(local, s.zero_s), b.Less(local, s.span_s))
    needed_kept = b.GatherElements(needed_f, b.Where(in_span, local, s.zero_s), axis=1)
    valid = b.Where(in_span, needed_kept, b.CastLike(b.const(1.0, np.float32), score))
    return valid, b.Squeeze(c, ax1)


def examples(rng):
    """kept_index from a TokenPrune of the span's top k_max; ties and zero scores."""
    cases = []
    for (batch, n, k_max), attrs in [((2, 10, 6), dict(tau=0.5)), ((3, 17, 9), dict(tau=0.9, protect=1)),
                                     ((2, 20, 7), dict(tau=1.0, protect=2, span_end=16))]:
        score = rng.random((batch, n)).astype(np.float32) ** 3
        score[0, -3:] = 0.0
        cases.append(([score, select(score, k_max, attrs.get("protect", 0), attrs.get("span_end") or n)], attrs))
    return cases


OP = OpDef.of_module(
    __name__,
    inputs=(
        TensorSpec("score", "token scores [B, N], >= 0"),
        TensorSpec("kept_index", "input tokens kept by a TokenPrune with the upper bound k_max [B, M]", "int64"),
    ),
    outputs=(
        TensorSpec("valid", "1.0 where the kept token is needed or outside the span, else 0.0 [B, M]"),
        TensorSpec("count", "needed span tokens per sample [B]", "int64"),
    ),
    attributes=(
        AttrSpec("tau", float, "score mass the needed top set must reach, in (0, 1]"),
        AttrSpec("protect", int, "start of the span: tokens before it are always valid", 0),
        AttrSpec("span_end", int, "end of the span (exclusive); 0 means N", 0),
    ),
)
