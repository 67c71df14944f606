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
import onnx.helper as oh

from .base import AttrSpec, OpDef, TensorSpec, const, const_from_attr, make_function, span_nodes

NAME = "MassMask"
#: cum < tau - TOLERANCE: the slack of the mass comparison (a power of two: exact everywhere)
TOLERANCE = 2.0**-20


def check_tau(tau: float) -> None:
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"MassMask: tau={tau} must be in (0, 1]")


def needed_count(span_scores: np.ndarray, tau: float) -> np.ndarray:
    """c per row of span_scores [B, span]: the smallest top set reaching mass tau."""
    span = span_scores.shape[1]
    ordered = -np.sort(-span_scores.astype(np.float64), axis=1, kind="stable")
    cum = np.cumsum(ordered, axis=1)
    total = cum[:, -1:]
    below = (cum / np.where(total > 0, total, 1.0) < tau - TOLERANCE).sum(axis=1)
    return np.where(total[:, 0] > 0, np.minimum(span, 1 + below), span).astype(np.int64)


def reference(score: np.ndarray, kept_index: np.ndarray, *, tau: float, protect: int = 0, span_end: int = 0):
    b, n = score.shape
    end = span_end if span_end > 0 else n
    if not 0 <= protect < end <= n:
        raise ValueError(f"span [{protect}, {end}) is not inside {n} tokens")
    check_tau(tau)
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


def build_function():
    big = np.iinfo(np.int64).max
    nodes = [
        const_from_attr("tau_f", "tau", "value_float"),
        const_from_attr("protect_s", "protect"),
        const_from_attr("span_end_s", "span_end"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("ax1_s", np.array(1, dtype=np.int64)),
        const("last", np.array([-1], dtype=np.int64)),
        const("end_max", np.array([big], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("zero_d", np.array(0.0, dtype=np.float64)),
        const("one_d", np.array(1.0, dtype=np.float64)),
        const("tolerance", np.array(TOLERANCE, dtype=np.float64)),
        const("one_f", np.array(1.0, dtype=np.float32)),
        # span [protect, end)
        *span_nodes("score"),
        oh.make_node("Unsqueeze", ["span_s", "ax0"], ["span"]),
        # the span's scores in stable descending order, their cumulative mass in float64
        oh.make_node("Slice", ["score", "protect", "end", "ax1"], ["s_p"]),
        oh.make_node("Cast", ["s_p"], ["s_d"], to=11),
        oh.make_node("TopK", ["s_d", "span"], ["ordered", "order"], axis=1, largest=1, sorted=1),
        oh.make_node("CumSum", ["ordered", "ax1_s"], ["cum"]),
        oh.make_node("Slice", ["cum", "last", "end_max", "ax1"], ["total"]),  # [B, 1]
        oh.make_node("Greater", ["total", "zero_d"], ["has_mass"]),
        oh.make_node("Where", ["has_mass", "total", "one_d"], ["den"]),
        oh.make_node("Div", ["cum", "den"], ["fraction"]),
        oh.make_node("Cast", ["tau_f"], ["tau_d"], to=11),
        oh.make_node("Sub", ["tau_d", "tolerance"], ["threshold"]),
        oh.make_node("Less", ["fraction", "threshold"], ["below"]),
        oh.make_node("Cast", ["below"], ["below_i"], to=7),
        oh.make_node("ReduceSum", ["below_i", "ax1"], ["n_below"], keepdims=1),
        oh.make_node("Add", ["n_below", "one_s"], ["c_raw"]),
        oh.make_node("Min", ["c_raw", "span"], ["c_capped"]),
        oh.make_node("Where", ["has_mass", "c_capped", "span"], ["c"]),  # [B, 1]
        oh.make_node("Squeeze", ["c", "ax1"], ["count"]),
        # rank of every span token: rank[order[r]] = r (a scatter without reduction)
        oh.make_node("Range", ["zero_s", "span_s", "one_s"], ["ranks1"]),
        oh.make_node("Shape", ["order"], ["order_shape"]),
        oh.make_node("Expand", ["ranks1", "order_shape"], ["ranks"]),
        oh.make_node("ConstantOfShape", ["order_shape"], ["rank_zeros"],
                     value=oh.make_tensor("zero", 7, [1], [0])),
        oh.make_node("ScatterElements", ["rank_zeros", "order", "ranks"], ["rank"], axis=1),
        oh.make_node("Less", ["rank", "c"], ["needed"]),
        oh.make_node("CastLike", ["needed", "score"], ["needed_f"]),
        # valid = outside the span, or a needed span token
        oh.make_node("Sub", ["kept_index", "protect_s"], ["local"]),
        oh.make_node("GreaterOrEqual", ["local", "zero_s"], ["after_start"]),
        oh.make_node("Less", ["local", "span_s"], ["before_end"]),
        oh.make_node("And", ["after_start", "before_end"], ["in_span"]),
        oh.make_node("Where", ["in_span", "local", "zero_s"], ["local_safe"]),
        oh.make_node("GatherElements", ["needed_f", "local_safe"], ["needed_kept"], axis=1),
        oh.make_node("CastLike", ["one_f", "score"], ["one_t"]),
        oh.make_node("Where", ["in_span", "needed_kept", "one_t"], ["valid"]),
    ]
    return make_function(NAME, ["score", "kept_index"], ["valid", "count"], ["tau", "protect", "span_end"],
                         nodes, __doc__, defaults={"protect": 0, "span_end": 0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
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
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.mass_mask:run",
)
