"""DiversityRank: DivPrune's greedy max-min diversity selection, as a score for TokenPrune.

DivPrune keeps the tokens of a span that are most different from each other instead of
the most attended ones: with f = x / ‖x‖₂ and the cosine distance Dist = 1 - f fᵀ over the
span [protect, end) (end = span_end, or N when it is 0), it picks

- first, the token farthest from its nearest neighbour: argmax_j min_{i≠j} Dist[i, j]
  (a span of one token picks it);
- then, k - 1 times, the token farthest from everything picked so far:
  argmax_j min_{s picked} Dist[s, j], kept as a running minimum (O(k·n) updates after
  the distance matrix, not the O(k²·n) of recomputing it per pick).

Ties go to the lower index. k is `keep` when > 0 (a build-time constant), else
max(1, ceil(keep_ratio · span length)) at run time — TokenPrune's rule, so the same
attributes on both nodes agree on k.

Output score [B, N]: the t-th pick (t = 0..k-1) scores k - t (>= 1); every other token,
unpicked or outside the span, scores 0. TokenPrune (top-k of the span) turns it into
exactly the picked set, in original order; its score-weighted fusion sees zeros for
the dropped tokens. A zero token has no direction: its norm is clamped to NORM_EPS, so
it sits at distance 1 from every token.

The decomposition builds the span's distance matrix once (it is needed for the first
pick) and runs the picks in an ONNX Loop of k - 1 iterations carrying the running
minimum and the score: ArgMax, a one-hot (Equal against a Range) of the pick, the
picked row of the distance matrix (GatherND) folded into the minimum, Where to mark
the pick (-inf) and write its score.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import OpDef, TensorSpec
from .span import Span, selection_attributes, span_graph

NAME = "DiversityRank"
#: lower bound on a token's norm before normalising (a zero token would divide by zero)
NORM_EPS = 1e-12


def cosine_distances(tokens: np.ndarray) -> np.ndarray:
    """1 - cos between every two rows of tokens [n, D] (float64), [n, n]."""
    t = tokens.astype(np.float64)
    f = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), NORM_EPS)
    return 1.0 - f @ f.T


def greedy_picks(dist: np.ndarray, k: int) -> list[int]:
    """DivPrune's pick order on a distance matrix [n, n]: k distinct indices."""
    n = dist.shape[0]
    off_diagonal = dist.copy()
    np.fill_diagonal(off_diagonal, np.inf)  # one token: its nearest neighbour is +inf, it is picked
    picks = [int(np.argmax(off_diagonal.min(axis=0)))]
    nearest_picked = dist[picks[0]].copy()
    nearest_picked[picks[0]] = -np.inf
    for _ in range(k - 1):
        p = int(np.argmax(nearest_picked))  # first maximum: ties to the lower index
        picks.append(p)
        nearest_picked = np.minimum(nearest_picked, dist[p])
        nearest_picked[p] = -np.inf
    assert len(set(picks)) == k <= n
    return picks


def reference(x: np.ndarray, *, keep: int, protect: int, span_end: int, keep_ratio: float):
    b, n, _ = x.shape
    span = Span(protect, span_end, keep, keep_ratio)
    span.check(n, NAME)
    end, k = span.end(n), span.kept(n)
    score = np.zeros((b, n), dtype=x.dtype)
    for i in range(b):
        for t, p in enumerate(greedy_picks(cosine_distances(x[i, protect:end]), k)):
            score[i, protect + p] = k - t
    return (score,)


def decompose(b, x):
    axm1 = b.const([-1])
    # span [protect, end) and k, as TokenPrune
    s = span_graph(b, x)
    # cosine distances of the span's tokens, [B, S, S]
    x_p = b.Slice(x, s.protect, s.end, b.const([1]))
    f = b.Div(x_p, b.Max(b.ReduceL2(x_p, axm1, keepdims=1), b.CastLike(b.const(NORM_EPS, np.float32), x_p)))
    dist = b.Sub(b.CastLike(b.const(1.0, np.float32), x_p), b.MatMul(f, b.Transpose(f, perm=[0, 2, 1])))
    # first pick: the largest nearest-neighbour distance (the diagonal excluded)
    positions = b.Range(s.zero_s, s.span_s, s.one_s)  # [S]
    inf_t = b.CastLike(b.const(np.inf, np.float32), x_p)
    neg_inf = b.Neg(inf_t)
    dist_off = b.Where(b.Equal(b.Unsqueeze(positions, axm1), positions), inf_t, dist)
    nearest_neighbour = b.ReduceMin(dist_off, b.const([1]), keepdims=0)  # [B, S]
    first = b.ArgMax(nearest_neighbour, axis=1, keepdims=1)  # [B, 1]
    is_first = b.Equal(first, positions)
    first_dist = b.GatherND(dist, first, batch_dims=1)  # [B, S]
    nearest0 = b.Where(is_first, neg_inf, first_dist)
    zeros = b.CastLike(b.ConstantOfShape(b.Shape(first_dist)), x_p)
    score0 = b.Where(is_first, b.CastLike(s.k_s, x_p), zeros)
    last_score = b.Sub(s.k_s, s.one_s)

    def pick(body, iteration, cond_in, nearest_in, score_in):
        """One pick: argmax of the running minimum, fold its distance row in, score it."""
        p = body.ArgMax(nearest_in, axis=1, keepdims=1)  # [B, 1], first maximum
        is_pick = body.Equal(p, positions)  # [B, S] one-hot
        nearest_min = body.Min(nearest_in, body.GatherND(dist, p, batch_dims=1))
        # the (iteration + 1)-th pick after the first scores k - 1 - iteration
        rank = body.CastLike(body.Sub(last_score, iteration), nearest_in)
        return (body.Identity(cond_in), body.Where(is_pick, neg_inf, nearest_min),
                body.Where(is_pick, rank, score_in))

    scalar = ()
    loop_body = b.subgraph(
        "diversity_pick",
        [("iteration", ir.DataType.INT64, scalar), ("cond_in", ir.DataType.BOOL, scalar),
         ("nearest_in", None, None), ("score_in", None, None)],
        pick, [("cond_out", ir.DataType.BOOL, scalar), ("nearest_out", None, None), ("score_out", None, None)])
    # the other k - 1 picks
    _, score_span = b.Loop(last_score, b.const(True, np.bool_), nearest0, score0, body=loop_body, _outputs=2)
    # 0 for the tokens outside the span
    n_suffix = b.Unsqueeze(b.Sub(s.n_s, s.end_s), s.ax0)
    zero_1 = b.const([0])
    return b.Pad(score_span, b.Concat(zero_1, s.protect, zero_1, n_suffix, axis=0), mode="constant")


def examples(rng):
    """Random tokens, duplicated and zero tokens, k from keep_ratio, a span with a suffix."""
    dup = rng.standard_normal((2, 12, 4)).astype(np.float32)
    dup[:, 5], dup[:, 7], dup[:, 9] = dup[:, 2], 0.0, 0.0
    return [([rng.standard_normal((1, 7, 3)).astype(np.float32)], dict(keep=3)),
            ([dup], dict(keep=8, protect=1)),
            ([rng.standard_normal((2, 20, 6)).astype(np.float32)],
             dict(keep=0, protect=2, span_end=15, keep_ratio=0.25))]


OP = OpDef.of_module(
    __name__,
    inputs=(TensorSpec("x", "tokens [B, N, D]"),),
    outputs=(TensorSpec("score", "[B, N]: k - t for the t-th greedy pick of the span, 0 elsewhere"),),
    attributes=selection_attributes("picked"),
)
