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

from .base import AttrSpec, OpDef, TensorSpec

NAME = "TokenMerge"


def max_merged(n: int, protect: int) -> int:
    """Largest r for n tokens: the A tokens that may be merged away (those at positions >=
    protect), or 0 when no B token may receive them."""
    sources = (n + 1) // 2 - math.ceil(protect / 2)  # even positions >= protect
    destinations = n // 2 - protect // 2  # odd positions >= protect
    return max(sources, 0) if destinations > 0 else 0


def merged_count(n, r: int, protect: int, sym=None, ratio: float = 0.0):
    """Tokens actually merged: min(asked, max_merged(n, protect)) with asked = r (or
    floor(ratio · n) when r == 0), as ToMe clamps r to what a block has, so one build
    serves every input length. Works on ints and on TensorRT shape expressions (`sym`:
    tensorrt.plugin, for its min/max; keep them on the left)."""
    asked = r
    if r <= 0 and ratio > 0:  # exact: ratio = a / q (a float is dyadic)
        frac = Fraction(float(ratio))
        asked = (n * frac.numerator) // frac.denominator
    if isinstance(n, int):
        return min(asked, max_merged(n, protect))
    sources = (n + 1) // 2 - (protect + 1) // 2
    destinations = n // 2 - protect // 2
    # destinations <= 0 → bound 0; destinations >= 1 → destinations · n >= n >= sources
    bound = sym.max(sources * 0, sym.min(sources, destinations * n))
    return sym.min(bound, asked if not isinstance(asked, int) else bound * 0 + asked)


def check_r(n: int, r: int, protect: int, ratio: float = 0.0) -> None:
    """Raise ValueError for what no implementation handles (ONNX ArgMax fails on an empty B set)."""
    problems = [(n < 2, f"needs at least 2 tokens, got {n}"), (protect < 0, f"protect={protect} must be >= 0"),
                (r < 0, f"r={r} must be >= 0"), (not 0.0 <= ratio < 1.0, f"ratio={ratio} must be in [0, 1)")]
    for bad, problem in problems:
        if bad:
            raise ValueError(f"TokenMerge: {problem}")


def reference(x: np.ndarray, metric: np.ndarray, size: np.ndarray, *, r: int, protect: int, ratio: float):
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


def decompose(b, x, metric, size):
    ax0, ax1, axm1 = b.const([0]), b.const([1]), b.const([-1])
    zero, one, two, end_max = b.const([0]), b.const([1]), b.const([2]), b.const([np.iinfo(np.int64).max])
    zero_s, one_s, two_s = b.const(0), b.const(1), b.const(2)
    protect_s = b.attr("protect")

    def every_other(src, start):
        return b.Slice(src, start, end_max, ax1, two)

    # cosine similarities of A (even positions) to B (odd positions): [B, Na, Nb]
    m = b.Div(metric, b.ReduceL2(metric, axm1, keepdims=1))
    raw_scores = b.MatMul(every_other(m, zero), b.Transpose(every_other(m, one), perm=[0, 2, 1]))
    # protected tokens neither merge away (rows) nor receive (columns)
    n_s = b.Squeeze(b.Shape(x, start=1, end=2))
    positions = b.Range(zero_s, n_s, one_s)
    b_pos = b.Slice(positions, one, end_max, ax0, two)
    a_protected = b.Unsqueeze(b.Less(b.Slice(positions, zero, end_max, ax0, two), protect_s), axm1)
    blocked = b.Or(a_protected, b.Less(b_pos, protect_s))
    scores = b.Where(blocked, b.CastLike(b.const(-np.inf, np.float32), raw_scores), raw_scores)
    # each A token's best B match (ArgMax: first best), A ranked by it (TopK: ties lower index first)
    node_max = b.ReduceMax(scores, axm1, keepdims=0)
    node_idx = b.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)
    na = b.Shape(node_max, start=1, end=2)
    _, order = b.TopK(node_max, na, axis=1, largest=1, sorted=1, _outputs=2)
    # r = min(r, mergeable A tokens): ToMe's clamp, so short inputs merge what they have
    sources = b.Sub(b.Div(b.Add(n_s, one_s), two_s), b.Div(b.Add(protect_s, one_s), two_s))
    destinations = b.Sub(b.Div(n_s, two_s), b.Div(protect_s, two_s))
    bound = b.Where(b.Greater(destinations, zero_s), b.Max(sources, zero_s), zero_s)
    # asked = r, or floor(ratio · N) when r == 0 (in float64: exact for a float32 ratio)
    r_from_ratio = b.Cast(b.Floor(b.Mul(b.Cast(n_s, to=11), b.Cast(b.attr("ratio"), to=11))), to=7)
    r_s = b.attr("r")
    r = b.Unsqueeze(b.Min(b.Where(b.Greater(r_s, zero_s), r_s, r_from_ratio), bound), ax0)
    src = b.Slice(order, zero, r, ax1)  # [B, r] merged away
    unm, _ = b.TopK(b.Slice(order, r, end_max, ax1), b.Sub(na, r), axis=1, largest=0, sorted=1, _outputs=2)
    dst = b.GatherElements(node_idx, src, axis=1)  # [B, r] their B targets
    # size-weighted tokens, split like the metric
    size_x = b.CastLike(size, x)
    xs = b.Mul(x, b.Unsqueeze(size_x, axm1))
    xs_a, xs_b, size_a, size_b = every_other(xs, zero), every_other(xs, one), every_other(size_x, zero), \
        every_other(size_x, one)
    # B_sum = xs_B + onehot(dst)ᵀ · xs_A[src], sizes likewise
    xs_src = b.GatherND(xs_a, b.Unsqueeze(src, axm1), batch_dims=1)  # [B, r, D]
    size_src = b.GatherElements(size_a, src, axis=1)  # [B, r]
    nb = b.Shape(size_b, start=1, end=2)
    hit = b.Equal(b.Unsqueeze(dst, axm1), b.Range(zero_s, b.Squeeze(nb), one_s))  # [B, r, Nb]
    onehot_t = b.Transpose(b.CastLike(hit, x), perm=[0, 2, 1])  # [B, Nb, r]
    b_sum = b.Add(xs_b, b.MatMul(onehot_t, xs_src))
    size_merged = b.Squeeze(b.MatMul(onehot_t, b.Unsqueeze(size_src, axm1)), axm1)
    b_size = b.Add(size_b, size_merged)
    # kept A tokens in order, then B; divide the sums by the sizes
    xs_unm = b.GatherND(xs_a, b.Unsqueeze(unm, axm1), batch_dims=1)
    total = b.Concat(xs_unm, b_sum, axis=1)
    size_out = b.Concat(b.GatherElements(size_a, unm, axis=1), b_size, axis=1)
    y = b.Div(total, b.Unsqueeze(size_out, axm1))
    # input positions: 2·unm for kept A tokens, 2j + 1 for B token j
    b_index = b.Expand(b_pos, b.Concat(b.Shape(x, start=0, end=1), nb, axis=0))
    index = b.Concat(b.Mul(unm, two_s), b_index, axis=1)
    return y, size_out, index


def examples(rng):
    """Odd and even N, CLS protected or not, r from ratio, sizes from an earlier merge."""
    cases = []
    for (batch, n, d, c), attrs in [((2, 9, 5, 4), dict(r=3)), ((1, 12, 4, 3), dict(r=6, protect=0)),
                                    ((2, 17, 6, 5), dict(r=0, ratio=0.25)), ((2, 10, 3, 4), dict(r=20, protect=3))]:
        size = rng.integers(1, 4, (batch, n)).astype(np.float32)
        cases.append(([rng.standard_normal((batch, n, d)).astype(np.float32),
                       rng.standard_normal((batch, n, c)).astype(np.float32), size], attrs))
    return cases


OP = OpDef.of_module(
    __name__,
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
)
