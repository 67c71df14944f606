"""AttentionPageRank: the token score of Zero-TPrune (CVPR'24, training-free pruning).

TokenPrune keeps the top-k of a span by score; this op makes that top-k follow
Zero-TPrune's two stages.

I-stage (importance): per head h, Weighted PageRank on the attention graph,
s_h⁰ = 1/N, s_h ← A_hᵀ s_h for `iterations` steps (a token is important when important
tokens attend to it). Heads whose variance of N·s_h over the tokens lies outside
[var_min, var_max] are dropped (near-uniform heads say nothing, one-token heads are
degenerate); if a sample drops every head, all its heads are kept. The importance is
I = sqrt(Σ_kept s_h²).

S-stage (similarity), on the span [protect, end) (end = span_end, or N when 0): the
ceil(span / 2) span tokens of largest I are important (ties: lower index first), the
others unimportant. With c = metric / ||metric|| (a zero vector: c = 0), each
unimportant token u gets sim_u = max over important i of c_u · c_i. Scores:
4 + I for important span tokens, 1 - sim_u (in [0, 2]) for unimportant ones, I
outside the span. So a top-k keeps the important half first, then the unimportant
tokens least similar to an important one: the near-duplicates are pruned.

Inputs: probs [B, H, N, N] (attention probabilities, rows sum to 1) and metric
[B, N, C] (similarity features: the pass feeds the head-mean keys). Output: score [B, N].

The decomposition runs the power iteration as an ONNX Loop (trip count = the
`iterations` attribute) in float32, and compares the span tokens with the important
ones only (a [span, ceil(span/2)] similarity, gathered rows), so no N×N similarity
matrix is built.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

from .base import AttrSpec, OpDef, TensorSpec, const, const_from_attr, make_function

NAME = "AttentionPageRank"
#: added to the importance of the important span tokens: above every unimportant score (<= 2)
IMPORTANT_OFFSET = 4.0
#: smallest norm a metric row is divided by (a zero row stays zero instead of NaN)
NORM_EPS = 1e-12
#: the paper's head-variance range, as the float32 values an ONNX attribute holds
VAR_MIN = float(np.float32(0.01))
VAR_MAX = float(np.float32(0.7))


def span_end_of(n: int, span_end: int) -> int:
    return span_end if span_end > 0 else n


def important_count(span: int) -> int:
    """Important tokens of a span: ceil(span / 2)."""
    return (span + 1) // 2


def importance(probs: np.ndarray, *, iterations: int, var_min: float, var_max: float) -> np.ndarray:
    """I-stage: [B, H, N, N] probabilities -> importance [B, N] (float64)."""
    p = probs.astype(np.float64)
    b, h, n, _ = p.shape
    s = np.full((b, h, n), 1.0 / n)
    for _ in range(iterations):
        s = np.einsum("bhij,bhi->bhj", p, s)  # s <- A_hᵀ s
    variance = (n * s).var(axis=-1)  # population variance, [B, H]
    kept = (variance >= var_min) & (variance <= var_max)
    kept[~kept.any(axis=1)] = True  # no head passes: keep them all
    return np.sqrt((s**2 * kept[:, :, None]).sum(axis=1))


def reference(probs: np.ndarray, metric: np.ndarray, *, iterations: int, var_min: float = VAR_MIN,
              var_max: float = VAR_MAX, protect: int = 0, span_end: int = 0) -> tuple[np.ndarray]:
    b, h, n, n2 = probs.shape
    if n != n2 or metric.ndim != 3 or metric.shape[:2] != (b, n):
        raise ValueError(f"{NAME}: need probs [B, H, N, N] and metric [B, N, C], got {probs.shape}, {metric.shape}")
    if iterations < 1:
        raise ValueError(f"{NAME}: iterations={iterations} must be >= 1")
    end = span_end_of(n, span_end)
    if not 0 <= protect < end <= n:
        raise ValueError(f"{NAME}: span [{protect}, {end}) is not inside {n} tokens")
    imp = importance(probs, iterations=iterations, var_min=var_min, var_max=var_max)
    score = imp.copy()
    span_imp = imp[:, protect:end]
    m = important_count(end - protect)
    order = np.argsort(-span_imp, axis=1, kind="stable")  # ties: lower index first
    x = metric[:, protect:end].astype(np.float64)
    c = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)
    for bi in range(b):
        important, unimportant = order[bi, :m], order[bi, m:]
        sim = c[bi, unimportant] @ c[bi, important].T  # [span - m, m]
        score[bi, protect + important] = IMPORTANT_OFFSET + span_imp[bi, important]
        score[bi, protect + unimportant] = 1.0 - sim.max(axis=1, initial=-np.inf)
    return (score.astype(probs.dtype),)


def _power_step_body() -> onnx.GraphProto:
    """Loop body: s <- s · A (s as a row [B, H, 1, N]: s_j <- Σ_i s_i A_ij); A is `probs_f`
    from the enclosing scope."""
    return oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("MatMul", ["s_in", "probs_f"], ["s_out"])],
        "power_step",
        [oh.make_tensor_value_info("step", onnx.TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         oh.make_tensor_value_info("s_in", onnx.TensorProto.FLOAT, None)],
        [oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         oh.make_tensor_value_info("s_out", onnx.TensorProto.FLOAT, None)],
    )


def build_function():
    f32 = onnx.TensorProto.FLOAT
    nodes = [
        const_from_attr("iterations_s", "iterations"),
        const_from_attr("var_min_f", "var_min", "value_float"),
        const_from_attr("var_max_f", "var_max", "value_float"),
        const_from_attr("protect_s", "protect"),
        const_from_attr("span_end_s", "span_end"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("ax2", np.array([2], dtype=np.int64)),
        const("axm1", np.array([-1], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("two_s", np.array(2, dtype=np.int64)),
        const("true", np.array(True)),
        const("one_f", np.array(1.0, dtype=np.float32)),
        const("offset_f", np.array(IMPORTANT_OFFSET, dtype=np.float32)),
        const("norm_eps", np.array(NORM_EPS, dtype=np.float32)),
        oh.make_node("Cast", ["probs"], ["probs_f"], to=f32),
        oh.make_node("Cast", ["metric"], ["metric_f"], to=f32),
        # ---- I-stage: s⁰ = 1/N as rows [B, H, 1, N], then `iterations` steps s <- s · A
        oh.make_node("Shape", ["probs"], ["bh"], start=0, end=2),
        oh.make_node("Shape", ["probs"], ["n1"], start=3, end=4),
        oh.make_node("Concat", ["bh", "ax1", "n1"], ["s_shape"], axis=0),
        oh.make_node("ConstantOfShape", ["s_shape"], ["ones_s"], value=onnx.numpy_helper.from_array(
            np.array([1.0], dtype=np.float32))),
        oh.make_node("Squeeze", ["n1"], ["n_s"]),
        oh.make_node("Cast", ["n_s"], ["n_f"], to=f32),
        oh.make_node("Div", ["ones_s", "n_f"], ["s0"]),
        oh.make_node("Loop", ["iterations_s", "true", "s0"], ["s_rows"], body=_power_step_body()),
        oh.make_node("Squeeze", ["s_rows", "ax2"], ["s"]),  # [B, H, N]
        # head filter: population variance of N·s over the tokens
        oh.make_node("Mul", ["s", "n_f"], ["ns"]),
        oh.make_node("ReduceMean", ["ns", "axm1"], ["ns_mean"], keepdims=1),
        oh.make_node("Sub", ["ns", "ns_mean"], ["ns_dev"]),
        oh.make_node("Mul", ["ns_dev", "ns_dev"], ["ns_dev2"]),
        oh.make_node("ReduceMean", ["ns_dev2", "axm1"], ["variance"], keepdims=0),  # [B, H]
        oh.make_node("GreaterOrEqual", ["variance", "var_min_f"], ["above_min"]),
        oh.make_node("LessOrEqual", ["variance", "var_max_f"], ["below_max"]),
        oh.make_node("And", ["above_min", "below_max"], ["head_ok"]),
        oh.make_node("Cast", ["head_ok"], ["head_ok_f"], to=f32),
        oh.make_node("ReduceMax", ["head_ok_f", "ax1"], ["any_ok"], keepdims=1),  # [B, 1]
        oh.make_node("Sub", ["one_f", "any_ok"], ["none_ok"]),
        oh.make_node("Max", ["head_ok_f", "none_ok"], ["head_w"]),  # no head kept: all heads
        oh.make_node("Unsqueeze", ["head_w", "axm1"], ["head_w3"]),  # [B, H, 1]
        oh.make_node("Mul", ["s", "s"], ["s2"]),
        oh.make_node("Mul", ["s2", "head_w3"], ["s2_kept"]),
        oh.make_node("ReduceSum", ["s2_kept", "ax1"], ["imp2"], keepdims=0),
        oh.make_node("Sqrt", ["imp2"], ["imp"]),  # [B, N]
        # ---- S-stage on the span [protect, end)
        oh.make_node("Greater", ["span_end_s", "zero_s"], ["has_end"]),
        oh.make_node("Where", ["has_end", "span_end_s", "n_s"], ["end_s"]),
        oh.make_node("Unsqueeze", ["end_s", "ax0"], ["end"]),
        oh.make_node("Unsqueeze", ["protect_s", "ax0"], ["protect"]),
        oh.make_node("Sub", ["end_s", "protect_s"], ["span_s"]),
        oh.make_node("Add", ["span_s", "one_s"], ["span_p1"]),
        oh.make_node("Div", ["span_p1", "two_s"], ["m_s"]),  # ceil(span / 2)
        oh.make_node("Unsqueeze", ["m_s", "ax0"], ["m"]),
        oh.make_node("Slice", ["imp", "protect", "end", "ax1"], ["imp_span"]),  # [B, S]
        oh.make_node("TopK", ["imp_span", "m"], ["_top", "important"], axis=1, largest=1, sorted=1),
        # important-token mask of the span (ScatterElements without reduction)
        oh.make_node("Shape", ["important"], ["important_shape"]),
        oh.make_node("Expand", ["one_f", "important_shape"], ["ones_m"]),
        oh.make_node("Shape", ["imp_span"], ["span_shape"]),
        oh.make_node("ConstantOfShape", ["span_shape"], ["zeros_span"], value=onnx.numpy_helper.from_array(
            np.array([0.0], dtype=np.float32))),
        oh.make_node("ScatterElements", ["zeros_span", "important", "ones_m"], ["important_f"], axis=1),
        oh.make_node("Cast", ["important_f"], ["is_important"], to=onnx.TensorProto.BOOL),
        # unit metric rows of the span, and of its important tokens
        oh.make_node("Slice", ["metric_f", "protect", "end", "ax1"], ["x_span"]),  # [B, S, C]
        oh.make_node("Mul", ["x_span", "x_span"], ["x_sq"]),
        oh.make_node("ReduceSum", ["x_sq", "axm1"], ["x_norm2"], keepdims=1),
        oh.make_node("Sqrt", ["x_norm2"], ["x_norm"]),
        oh.make_node("Max", ["x_norm", "norm_eps"], ["x_norm_safe"]),
        oh.make_node("Div", ["x_span", "x_norm_safe"], ["unit"]),
        oh.make_node("Unsqueeze", ["important", "axm1"], ["important_idx"]),  # [B, m, 1]
        oh.make_node("GatherND", ["unit", "important_idx"], ["unit_important"], batch_dims=1),  # [B, m, C]
        oh.make_node("Transpose", ["unit_important"], ["unit_important_t"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["unit", "unit_important_t"], ["sim"]),  # [B, S, m]
        oh.make_node("ReduceMax", ["sim", "axm1"], ["best_sim"], keepdims=0),  # [B, S]
        oh.make_node("Sub", ["one_f", "best_sim"], ["unimportant_score"]),
        oh.make_node("Add", ["imp_span", "offset_f"], ["important_score"]),
        oh.make_node("Where", ["is_important", "important_score", "unimportant_score"], ["span_score"]),
        # outside the span: the importance itself
        oh.make_node("Slice", ["imp", "ax0", "protect", "ax1"], ["imp_prefix"]),
        oh.make_node("Slice", ["imp", "end", "n1", "ax1"], ["imp_suffix"]),
        oh.make_node("Concat", ["imp_prefix", "span_score", "imp_suffix"], ["score_f"], axis=1),
        oh.make_node("CastLike", ["score_f", "probs"], ["score"]),
    ]
    return make_function(NAME, ["probs", "metric"], ["score"],
                         ["iterations", "var_min", "var_max", "protect", "span_end"], nodes, __doc__,
                         defaults={"var_min": VAR_MIN, "var_max": VAR_MAX, "protect": 0, "span_end": 0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(
        TensorSpec("probs", "attention probabilities [B, H, N, N] (rows sum to 1)"),
        TensorSpec("metric", "similarity features [B, N, C] (head-mean keys)"),
    ),
    outputs=(TensorSpec("score", "Zero-TPrune token scores [B, N], higher = keep"),),
    attributes=(
        AttrSpec("iterations", int, "PageRank steps s <- Aᵀ s (>= 1)"),
        AttrSpec("var_min", float, "heads with variance of N·s below this are dropped", VAR_MIN),
        AttrSpec("var_max", float, "heads with variance of N·s above this are dropped", VAR_MAX),
        AttrSpec("protect", int, "start of the scored span: tokens before it get their importance", 0),
        AttrSpec("span_end", int, "end of the scored span (exclusive); 0 means N", 0),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.attention_page_rank:run",
)
