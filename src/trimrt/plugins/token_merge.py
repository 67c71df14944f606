"""TokenMerge: ToMe's bipartite soft matching, merging r tokens by size-weighted average.

Inputs x [B, N, D] (tokens), metric [B, N, C] (matching features; ToMe uses the head-mean
of the keys) and size [B, N] (how many original tokens each token stands for: ones
before the first merge). Tokens split alternately into A (even positions) and B (odd
positions); every A token finds its most similar B token (cosine of the metric), and
the r A tokens with the best matches are averaged into their matches, weighted by
size. The first `protect` tokens (CLS) are neither merged away nor merged into.

This is ToMe's `bipartite_soft_matching` with `class_token=True` for protect = 1
(Bolya et al., "Token Merging: Your ViT but faster"), ties broken deterministically:
a token's best match is its lowest-index best B token, and among equal best scores the
lower-index A token is merged first.

With r == 0 the count is floor(ratio · N) instead, for inputs whose length varies (text).
Either way it is an upper bound: a block merges min(r, its mergeable A tokens), as ToMe clamps it,
so a build with a static r serves inputs of any length (the count depends on N only,
never on the data: shapes stay static per input shape).

Outputs (N - r tokens: the kept A tokens in their original order, then all B tokens):
- y [B, N - r, D]: the tokens, merged ones the size-weighted mean of their group,
- size_out [B, N - r]: the sizes after merging (feed to the next merge and to
  proportional attention, log(size) added to the logits),
- index [B, N - r] int64: the input position each output token descends from (a kept
  A token's own, a B token's own), to gather masks and positions with the tokens.

The decomposition sums the merged
tokens into their destinations with a one-hot matmul (exact, no scatter with reduction,
which ONNX and TensorRT lack or get wrong) and gathers the kept ones, so everything
after the op really runs on N - r tokens.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import onnx.helper as oh

from .base import AttrSpec, OpDef, TensorSpec, const, const_from_attr, make_function

NAME = "TokenMerge"


def max_merged(n: int, protect: int) -> int:
    """Largest r for n tokens: the A tokens that may be merged away (those at positions >=
    protect), or 0 when no B token may receive them."""
    sources = (n + 1) // 2 - math.ceil(protect / 2)  # even positions >= protect
    destinations = n // 2 - protect // 2  # odd positions >= protect
    return max(sources, 0) if destinations > 0 else 0


def asked_count(n, r: int, ratio: float):
    """r when > 0, else floor(ratio · n) (exact: ratio = a / q, a float is dyadic)."""
    if r > 0 or ratio <= 0:
        return r
    frac = Fraction(float(ratio))
    return (n * frac.numerator) // frac.denominator


def merged_count(n, r: int, protect: int, sym=None, ratio: float = 0.0):
    """Tokens actually merged: min(asked, max_merged(n, protect)), as ToMe clamps r to what
    a block has, so one build serves every input length. Works on ints and on TensorRT
    shape expressions (`sym`: tensorrt.plugin, for its min/max; keep them on the left)."""
    asked = asked_count(n, r, ratio)
    if isinstance(n, int):
        return min(asked, max_merged(n, protect))
    sources = (n + 1) // 2 - (protect + 1) // 2
    destinations = n // 2 - protect // 2
    # destinations <= 0 → bound 0; destinations >= 1 → destinations · n >= n >= sources
    bound = sym.max(sources * 0, sym.min(sources, destinations * n))
    return sym.min(bound, asked if not isinstance(asked, int) else bound * 0 + asked)


def check_r(n: int, r: int, protect: int, ratio: float = 0.0) -> None:
    """Raise ValueError for what no implementation handles (ONNX ArgMax fails on an empty B set)."""
    if n < 2:
        raise ValueError(f"TokenMerge: needs at least 2 tokens, got {n}")
    if protect < 0:
        raise ValueError(f"TokenMerge: protect={protect} must be >= 0")
    if r < 0:
        raise ValueError(f"TokenMerge: r={r} must be >= 0")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"TokenMerge: ratio={ratio} must be in [0, 1)")


def reference(x: np.ndarray, metric: np.ndarray, size: np.ndarray, *, r: int, protect: int = 1, ratio: float = 0.0):
    batch, n, _ = x.shape
    check_r(n, r, protect, ratio)
    r = merged_count(n, r, protect, ratio=ratio)
    nb = n // 2
    m = metric.astype(np.float64)
    m = m / np.linalg.norm(m, axis=-1, keepdims=True)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(0, 2, 1)  # [B, Na, Nb] cosine similarities
    scores[:, np.arange(0, n, 2) < protect, :] = -np.inf
    scores[:, :, np.arange(1, n, 2) < protect] = -np.inf
    node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)  # argmax: the first best
    order = np.argsort(-node_max, axis=1, kind="stable")  # best matches first, ties lower index
    src = order[:, :r]
    unm = np.sort(order[:, r:], axis=1)
    dst = np.take_along_axis(node_idx, src, axis=1)

    size64 = size.astype(np.float64)
    xs = x.astype(np.float64) * size64[..., None]
    xs_a, xs_b = xs[:, 0::2], xs[:, 1::2]
    size_a, size_b = size64[:, 0::2], size64[:, 1::2]
    onehot_t = (dst[:, :, None] == np.arange(nb)).astype(np.float64).transpose(0, 2, 1)  # [B, Nb, r]
    b_sum = xs_b + onehot_t @ np.take_along_axis(xs_a, src[..., None], axis=1)
    b_size = size_b + (onehot_t @ np.take_along_axis(size_a, src, axis=1)[..., None])[..., 0]
    total = np.concatenate([np.take_along_axis(xs_a, unm[..., None], axis=1), b_sum], axis=1)
    size_out = np.concatenate([np.take_along_axis(size_a, unm, axis=1), b_size], axis=1)
    y = total / size_out[..., None]
    index = np.concatenate([2 * unm, np.broadcast_to(2 * np.arange(nb) + 1, (batch, nb))], axis=1)
    return y.astype(x.dtype), size_out.astype(x.dtype), index.astype(np.int64)


def build_function():
    def every_other(src: str, start: str, out: str):
        return oh.make_node("Slice", [src, start, "end_max", "ax1", "two"], [out])

    nodes = [
        const_from_attr("r_s", "r"),
        const_from_attr("protect_s", "protect"),
        const_from_attr("ratio_f", "ratio", "value_float"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("axm1", np.array([-1], dtype=np.int64)),
        const("zero", np.array([0], dtype=np.int64)),
        const("one", np.array([1], dtype=np.int64)),
        const("two", np.array([2], dtype=np.int64)),
        const("end_max", np.array([np.iinfo(np.int64).max], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("two_s", np.array(2, dtype=np.int64)),
        const("neg_inf", np.array(-np.inf, dtype=np.float32)),
        # cosine similarities of A (even positions) to B (odd positions): [B, Na, Nb]
        oh.make_node("ReduceL2", ["metric", "axm1"], ["norm"], keepdims=1),
        oh.make_node("Div", ["metric", "norm"], ["m"]),
        every_other("m", "zero", "m_a"),
        every_other("m", "one", "m_b"),
        oh.make_node("Transpose", ["m_b"], ["m_b_t"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["m_a", "m_b_t"], ["raw_scores"]),
        # protected tokens neither merge away (rows) nor receive (columns)
        oh.make_node("Shape", ["x"], ["n1"], start=1, end=2),
        oh.make_node("Squeeze", ["n1"], ["n_s"]),
        oh.make_node("Range", ["zero_s", "n_s", "one_s"], ["positions"]),
        oh.make_node("Slice", ["positions", "zero", "end_max", "ax0", "two"], ["a_pos"]),
        oh.make_node("Slice", ["positions", "one", "end_max", "ax0", "two"], ["b_pos"]),
        oh.make_node("Less", ["a_pos", "protect_s"], ["a_protected"]),
        oh.make_node("Unsqueeze", ["a_protected", "axm1"], ["a_protected_col"]),
        oh.make_node("Less", ["b_pos", "protect_s"], ["b_protected"]),
        oh.make_node("Or", ["a_protected_col", "b_protected"], ["blocked"]),
        oh.make_node("CastLike", ["neg_inf", "raw_scores"], ["neg_inf_t"]),
        oh.make_node("Where", ["blocked", "neg_inf_t", "raw_scores"], ["scores"]),
        # each A token's best B match (ArgMax: first best), A ranked by it (TopK: ties lower index first)
        oh.make_node("ReduceMax", ["scores", "axm1"], ["node_max"], keepdims=0),
        oh.make_node("ArgMax", ["scores"], ["node_idx"], axis=-1, keepdims=0, select_last_index=0),
        oh.make_node("Shape", ["node_max"], ["na"], start=1, end=2),
        oh.make_node("TopK", ["node_max", "na"], ["_ranked", "order"], axis=1, largest=1, sorted=1),
        # r = min(r, mergeable A tokens): ToMe's clamp, so short inputs merge what they have
        oh.make_node("Add", ["n_s", "one_s"], ["n_plus"]),
        oh.make_node("Div", ["n_plus", "two_s"], ["na_s"]),
        oh.make_node("Add", ["protect_s", "one_s"], ["p_plus"]),
        oh.make_node("Div", ["p_plus", "two_s"], ["a_protected_n"]),
        oh.make_node("Sub", ["na_s", "a_protected_n"], ["sources"]),
        oh.make_node("Div", ["n_s", "two_s"], ["nb_all"]),
        oh.make_node("Div", ["protect_s", "two_s"], ["b_protected_n"]),
        oh.make_node("Sub", ["nb_all", "b_protected_n"], ["destinations"]),
        oh.make_node("Greater", ["destinations", "zero_s"], ["can_receive"]),
        oh.make_node("Max", ["sources", "zero_s"], ["sources_pos"]),
        oh.make_node("Where", ["can_receive", "sources_pos", "zero_s"], ["bound"]),
        # asked = r, or floor(ratio · N) when r == 0 (in float64: exact for a float32 ratio)
        oh.make_node("Cast", ["n_s"], ["n_d"], to=11),
        oh.make_node("Cast", ["ratio_f"], ["ratio_d"], to=11),
        oh.make_node("Mul", ["n_d", "ratio_d"], ["r_real"]),
        oh.make_node("Floor", ["r_real"], ["r_floor"]),
        oh.make_node("Cast", ["r_floor"], ["r_from_ratio"], to=7),
        oh.make_node("Greater", ["r_s", "zero_s"], ["static_r"]),
        oh.make_node("Where", ["static_r", "r_s", "r_from_ratio"], ["asked"]),
        oh.make_node("Min", ["asked", "bound"], ["r_eff"]),
        oh.make_node("Unsqueeze", ["r_eff", "ax0"], ["r"]),
        oh.make_node("Slice", ["order", "zero", "r", "ax1"], ["src"]),  # [B, r] merged away
        oh.make_node("Slice", ["order", "r", "end_max", "ax1"], ["unm_ranked"]),
        oh.make_node("Sub", ["na", "r"], ["n_unm"]),
        oh.make_node("TopK", ["unm_ranked", "n_unm"], ["unm", "_unm_pos"], axis=1, largest=0, sorted=1),
        oh.make_node("GatherElements", ["node_idx", "src"], ["dst"], axis=1),  # [B, r] their B targets
        # size-weighted tokens, split like the metric
        oh.make_node("CastLike", ["size", "x"], ["size_x"]),
        oh.make_node("Unsqueeze", ["size_x", "axm1"], ["size_col"]),
        oh.make_node("Mul", ["x", "size_col"], ["xs"]),
        every_other("xs", "zero", "xs_a"),
        every_other("xs", "one", "xs_b"),
        every_other("size_x", "zero", "size_a"),
        every_other("size_x", "one", "size_b"),
        # B_sum = xs_B + onehot(dst)ᵀ · xs_A[src], sizes likewise
        oh.make_node("Unsqueeze", ["src", "axm1"], ["src_nd"]),
        oh.make_node("GatherND", ["xs_a", "src_nd"], ["xs_src"], batch_dims=1),  # [B, r, D]
        oh.make_node("GatherElements", ["size_a", "src"], ["size_src"], axis=1),  # [B, r]
        oh.make_node("Shape", ["size_b"], ["nb"], start=1, end=2),
        oh.make_node("Squeeze", ["nb"], ["nb_s"]),
        oh.make_node("Range", ["zero_s", "nb_s", "one_s"], ["b_slots"]),
        oh.make_node("Unsqueeze", ["dst", "axm1"], ["dst_col"]),
        oh.make_node("Equal", ["dst_col", "b_slots"], ["hit"]),  # [B, r, Nb]
        oh.make_node("CastLike", ["hit", "x"], ["onehot"]),
        oh.make_node("Transpose", ["onehot"], ["onehot_t"], perm=[0, 2, 1]),  # [B, Nb, r]
        oh.make_node("MatMul", ["onehot_t", "xs_src"], ["xs_merged"]),
        oh.make_node("Add", ["xs_b", "xs_merged"], ["b_sum"]),
        oh.make_node("Unsqueeze", ["size_src", "axm1"], ["size_src_col"]),
        oh.make_node("MatMul", ["onehot_t", "size_src_col"], ["size_merged_col"]),
        oh.make_node("Squeeze", ["size_merged_col", "axm1"], ["size_merged"]),
        oh.make_node("Add", ["size_b", "size_merged"], ["b_size"]),
        # kept A tokens in order, then B; divide the sums by the sizes
        oh.make_node("Unsqueeze", ["unm", "axm1"], ["unm_nd"]),
        oh.make_node("GatherND", ["xs_a", "unm_nd"], ["xs_unm"], batch_dims=1),
        oh.make_node("GatherElements", ["size_a", "unm"], ["size_unm"], axis=1),
        oh.make_node("Concat", ["xs_unm", "b_sum"], ["total"], axis=1),
        oh.make_node("Concat", ["size_unm", "b_size"], ["size_out"], axis=1),
        oh.make_node("Unsqueeze", ["size_out", "axm1"], ["size_out_col"]),
        oh.make_node("Div", ["total", "size_out_col"], ["y"]),
        # input positions: 2·unm for kept A tokens, 2j + 1 for B token j
        oh.make_node("Mul", ["unm", "two_s"], ["unm_pos"]),
        oh.make_node("Shape", ["x"], ["batch"], start=0, end=1),
        oh.make_node("Concat", ["batch", "nb"], ["b_index_shape"], axis=0),
        oh.make_node("Expand", ["b_pos", "b_index_shape"], ["b_index"]),
        oh.make_node("Concat", ["unm_pos", "b_index"], ["index"], axis=1),
    ]
    return make_function(NAME, ["x", "metric", "size"], ["y", "size_out", "index"], ["r", "protect", "ratio"],
                         nodes, __doc__, defaults={"protect": 1, "ratio": 0.0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(
        TensorSpec("x", "tokens [B, N, D]"),
        TensorSpec("metric", "matching features [B, N, C] (ToMe: head-mean keys)"),
        TensorSpec("size", "original tokens each token stands for [B, N] (ones at first)"),
    ),
    outputs=(
        TensorSpec("y", "merged tokens [B, N - r, D]: kept A tokens in order, then B tokens"),
        TensorSpec("size_out", "sizes after merging [B, N - r]"),
        TensorSpec("index", "input position each output token descends from [B, N - r]", "int64"),
    ),
    attributes=(
        AttrSpec("r", int, "tokens merged away, at most (build-time constant; clamped to the mergeable tokens)"),
        AttrSpec("protect", int, "leading tokens never merged away nor merged into (CLS)", 1),
        AttrSpec("ratio", float, "when r == 0: merge floor(ratio · N) tokens (text of any length)", 0.0),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.token_merge:run",
)
