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
import onnx
import onnx.helper as oh

from .base import OpDef, TensorSpec, const, const_from_attr, kept_count_nodes, make_function, selection_attributes, span_nodes
from .token_prune import span_keep

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


def reference(x: np.ndarray, *, keep: int, protect: int = 0, span_end: int = 0, keep_ratio: float = 1.0):
    b, n, _ = x.shape
    end = span_end if span_end > 0 else n
    if not 0 <= protect < end <= n:
        raise ValueError(f"span [{protect}, {end}) is not inside {n} tokens")
    k = span_keep(end - protect, keep, keep_ratio)
    if not 1 <= k <= end - protect:
        raise ValueError(f"keep={keep} must be in [1, {end - protect}] for a span of {end - protect} tokens")
    score = np.zeros((b, n), dtype=x.dtype)
    for i in range(b):
        for t, p in enumerate(greedy_picks(cosine_distances(x[i, protect:end]), k)):
            score[i, protect + p] = k - t
    return (score,)


def _untyped(name: str) -> onnx.ValueInfoProto:
    """A loop-carried value without a declared type: the function is generic over floats."""
    info = onnx.ValueInfoProto()
    info.name = name
    return info


def _pick_loop_body() -> onnx.GraphProto:
    """One pick: argmax of the running minimum, fold its distance row in, score it.

    Reads `dist` [B, S, S], `positions` [S], `neg_inf` and `last_score` (k - 1) from
    the enclosing function."""
    nodes = [
        oh.make_node("ArgMax", ["nearest_in"], ["pick"], axis=1, keepdims=1),  # [B, 1], first maximum
        oh.make_node("Equal", ["pick", "positions"], ["is_pick"]),  # [B, S] one-hot
        oh.make_node("GatherND", ["dist", "pick"], ["pick_dist"], batch_dims=1),  # [B, S]
        oh.make_node("Min", ["nearest_in", "pick_dist"], ["nearest_min"]),
        oh.make_node("Where", ["is_pick", "neg_inf", "nearest_min"], ["nearest_out"]),
        # the (iteration + 1)-th pick after the first scores k - 1 - iteration
        oh.make_node("Sub", ["last_score", "iteration"], ["rank_i"]),
        oh.make_node("CastLike", ["rank_i", "nearest_in"], ["rank"]),
        oh.make_node("Where", ["is_pick", "rank", "score_in"], ["score_out"]),
        oh.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    return oh.make_graph(
        nodes, "diversity_pick",
        [oh.make_tensor_value_info("iteration", onnx.TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         _untyped("nearest_in"),
         _untyped("score_in")],
        [oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         _untyped("nearest_out"),
         _untyped("score_out")],
    )


def build_function():
    nodes = [
        const_from_attr("keep_s", "keep"),
        const_from_attr("protect_s", "protect"),
        const_from_attr("span_end_s", "span_end"),
        const_from_attr("ratio_f", "keep_ratio", "value_float"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("axm1", np.array([-1], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("one_f", np.array(1.0, dtype=np.float32)),
        const("norm_eps", np.array(NORM_EPS, dtype=np.float32)),
        const("inf_f", np.array(np.inf, dtype=np.float32)),
        const("true", np.array(True)),
        # span [protect, end) and k, as TokenPrune
        *span_nodes("x"),
        *kept_count_nodes(),
        # cosine distances of the span's tokens, [B, S, S]
        oh.make_node("Slice", ["x", "protect", "end", "ax1"], ["x_p"]),
        oh.make_node("ReduceL2", ["x_p", "axm1"], ["norm"], keepdims=1),
        oh.make_node("CastLike", ["norm_eps", "x_p"], ["norm_eps_t"]),
        oh.make_node("Max", ["norm", "norm_eps_t"], ["norm_safe"]),
        oh.make_node("Div", ["x_p", "norm_safe"], ["f"]),
        oh.make_node("Transpose", ["f"], ["f_t"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["f", "f_t"], ["cos"]),
        oh.make_node("CastLike", ["one_f", "x_p"], ["one_t"]),
        oh.make_node("Sub", ["one_t", "cos"], ["dist"]),
        # first pick: the largest nearest-neighbour distance (the diagonal excluded)
        oh.make_node("Range", ["zero_s", "span_s", "one_s"], ["positions"]),  # [S]
        oh.make_node("Unsqueeze", ["positions", "axm1"], ["positions_col"]),  # [S, 1]
        oh.make_node("Equal", ["positions_col", "positions"], ["diagonal"]),  # [S, S]
        oh.make_node("CastLike", ["inf_f", "x_p"], ["inf_t"]),
        oh.make_node("Neg", ["inf_t"], ["neg_inf"]),
        oh.make_node("Where", ["diagonal", "inf_t", "dist"], ["dist_off"]),
        oh.make_node("ReduceMin", ["dist_off", "ax1"], ["nearest_neighbour"], keepdims=0),  # [B, S]
        oh.make_node("ArgMax", ["nearest_neighbour"], ["first"], axis=1, keepdims=1),  # [B, 1]
        oh.make_node("Equal", ["first", "positions"], ["is_first"]),
        oh.make_node("GatherND", ["dist", "first"], ["first_dist"], batch_dims=1),  # [B, S]
        oh.make_node("Where", ["is_first", "neg_inf", "first_dist"], ["nearest0"]),
        oh.make_node("CastLike", ["k_s", "x_p"], ["k_t"]),
        oh.make_node("Shape", ["first_dist"], ["bs_shape"]),
        oh.make_node("ConstantOfShape", ["bs_shape"], ["zeros_f"]),
        oh.make_node("CastLike", ["zeros_f", "x_p"], ["zeros"]),
        oh.make_node("Where", ["is_first", "k_t", "zeros"], ["score0"]),
        # the other k - 1 picks
        oh.make_node("Sub", ["k_s", "one_s"], ["last_score"]),
        oh.make_node("Loop", ["last_score", "true", "nearest0", "score0"], ["_nearest", "score_span"],
                     body=_pick_loop_body()),
        # 0 for the tokens outside the span
        oh.make_node("Sub", ["n_s", "end_s"], ["n_suffix_s"]),
        oh.make_node("Unsqueeze", ["n_suffix_s", "ax0"], ["n_suffix"]),
        const("zero_1", np.array([0], dtype=np.int64)),
        oh.make_node("Concat", ["zero_1", "protect", "zero_1", "n_suffix"], ["pads"], axis=0),
        oh.make_node("Pad", ["score_span", "pads"], ["score"], mode="constant"),
    ]
    return make_function(NAME, ["x"], ["score"], ["keep", "protect", "span_end", "keep_ratio"], nodes, __doc__,
                         defaults={"protect": 0, "span_end": 0, "keep_ratio": 1.0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(TensorSpec("x", "tokens [B, N, D]"),),
    outputs=(TensorSpec("score", "[B, N]: k - t for the t-th greedy pick of the span, 0 elsewhere"),),
    attributes=(
        *selection_attributes("picked"),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.diversity_rank:run",
)
