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
import onnx_ir as ir

from .base import AttrSpec, OpDef, TensorSpec
from .span import Span, span_graph

NAME = "AttentionPageRank"
#: added to the importance of the important span tokens: above every unimportant score (<= 2)
IMPORTANT_OFFSET = 4.0
#: smallest norm a metric row is divided by (a zero row stays zero instead of NaN)
NORM_EPS = 1e-12
#: the paper's head-variance range, as the float32 values an ONNX attribute holds
VAR_MIN = float(np.float32(0.01))
VAR_MAX = float(np.float32(0.7))


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


def check_call(probs_shape, metric_shape, *, iterations: int, protect: int, span_end: int, **_) -> None:
    """Raise ValueError unless probs is [B, H, N, N], metric [B, N, C], iterations >= 1 and
    the span inside the N tokens (`metric_shape` None: only the attributes, on an N that
    may be a shape expression)."""
    if metric_shape is not None and (len(probs_shape) != 4 or probs_shape[2] != probs_shape[3]
                                     or len(metric_shape) != 3 or tuple(metric_shape[:2]) != (probs_shape[0], probs_shape[2])):
        raise ValueError(f"{NAME}: need probs [B, H, N, N] and metric [B, N, C], got {tuple(probs_shape)}, "
                         f"{tuple(metric_shape)}")
    if iterations < 1:
        raise ValueError(f"{NAME}: iterations={iterations} must be >= 1")
    Span(protect, span_end).check(probs_shape[2], NAME, counted=False)


def reference(probs: np.ndarray, metric: np.ndarray, *, iterations: int, var_min: float, var_max: float,
              protect: int, span_end: int) -> tuple[np.ndarray]:
    check_call(probs.shape, metric.shape, iterations=iterations, protect=protect, span_end=span_end)
    b, _, n, _ = probs.shape
    end = Span(protect, span_end).end(n)
    imp = importance(probs, iterations=iterations, var_min=var_min, var_max=var_max)
    score = imp.copy()
    span_imp = imp[:, protect:end]
    m = (end - protect + 1) // 2  # important tokens: ceil(span / 2)
    order = np.argsort(-span_imp, axis=1, kind="stable")  # ties: lower index first
    x = metric[:, protect:end].astype(np.float64)
    c = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)
    for bi in range(b):
        important, unimportant = order[bi, :m], order[bi, m:]
        sim = c[bi, unimportant] @ c[bi, important].T  # [span - m, m]
        score[bi, protect + important] = IMPORTANT_OFFSET + span_imp[bi, important]
        score[bi, protect + unimportant] = 1.0 - sim.max(axis=1, initial=-np.inf)
    return (score.astype(probs.dtype),)


def decompose(b, probs, metric):
    f32 = 1
    ax1, axm1 = b.const([1]), b.const([-1])
    one_f = b.const(1.0, np.float32)
    probs_f = b.Cast(probs, to=f32)
    # ---- I-stage: s⁰ = 1/N as rows [B, H, 1, N], then `iterations` steps s <- s · A
    s = span_graph(b, probs, counted=False, axis=3)
    n1 = s.n1
    n_f = b.Cast(s.n_s, to=f32)
    ones = b.ConstantOfShape(b.Concat(b.Shape(probs, start=0, end=2), ax1, n1, axis=0),
                             value=ir.tensor(np.array([1.0], dtype=np.float32)))

    def power_step(body, step, cond_in, s_in):  # s_j <- Σ_i s_i A_ij (A from the enclosing scope)
        return body.Identity(cond_in), body.MatMul(s_in, probs_f)

    scalar = ()
    loop_body = b.subgraph("power_step", [("step", ir.DataType.INT64, scalar), ("cond_in", ir.DataType.BOOL, scalar),
                                          ("s_in", ir.DataType.FLOAT, None)], power_step,
                           [("cond_out", ir.DataType.BOOL, scalar), ("s_out", ir.DataType.FLOAT, None)])
    s_rows = b.Loop(b.attr("iterations"), b.const(True, np.bool_), b.Div(ones, n_f), body=loop_body)
    p = b.Squeeze(s_rows, b.const([2]))  # [B, H, N]
    # head filter: population variance of N·s over the tokens
    ns = b.Mul(p, n_f)
    ns_dev = b.Sub(ns, b.ReduceMean(ns, axm1, keepdims=1))
    variance = b.ReduceMean(b.Mul(ns_dev, ns_dev), axm1, keepdims=0)  # [B, H]
    head_ok = b.Cast(b.And(b.GreaterOrEqual(variance, b.attr("var_min")), b.LessOrEqual(variance, b.attr("var_max"))),
                     to=f32)
    none_ok = b.Sub(one_f, b.ReduceMax(head_ok, ax1, keepdims=1))  # [B, 1]
    head_w = b.Unsqueeze(b.Max(head_ok, none_ok), axm1)  # no head kept: all heads, [B, H, 1]
    imp = b.Sqrt(b.ReduceSum(b.Mul(b.Mul(p, p), head_w), ax1, keepdims=0))  # [B, N]
    # ---- S-stage on the span [protect, end)
    m = b.Unsqueeze(b.Div(b.Add(s.span_s, s.one_s), b.const(2)), s.ax0)  # ceil(span / 2)
    imp_span = b.Slice(imp, s.protect, s.end, ax1)  # [B, S]
    _, important = b.TopK(imp_span, m, axis=1, largest=1, sorted=1, _outputs=2)
    # important-token mask of the span (ScatterElements without reduction)
    zeros_span = b.ConstantOfShape(b.Shape(imp_span), value=ir.tensor(np.array([0.0], dtype=np.float32)))
    ones_m = b.Expand(one_f, b.Shape(important))
    is_important = b.Cast(b.ScatterElements(zeros_span, important, ones_m, axis=1), to=9)
    # unit metric rows of the span, and of its important tokens
    x_span = b.Slice(b.Cast(metric, to=f32), s.protect, s.end, ax1)  # [B, S, C]
    x_norm = b.Sqrt(b.ReduceSum(b.Mul(x_span, x_span), axm1, keepdims=1))
    unit = b.Div(x_span, b.Max(x_norm, b.const(NORM_EPS, np.float32)))
    unit_important = b.GatherND(unit, b.Unsqueeze(important, axm1), batch_dims=1)  # [B, m, C]
    sim = b.MatMul(unit, b.Transpose(unit_important, perm=[0, 2, 1]))  # [B, S, m]
    unimportant_score = b.Sub(one_f, b.ReduceMax(sim, axm1, keepdims=0))
    important_score = b.Add(imp_span, b.const(IMPORTANT_OFFSET, np.float32))
    span_score = b.Where(is_important, important_score, unimportant_score)
    # outside the span: the importance itself
    imp_prefix = b.Slice(imp, s.ax0, s.protect, ax1)
    imp_suffix = b.Slice(imp, s.end, n1, ax1)
    return b.CastLike(b.Concat(imp_prefix, span_score, imp_suffix, axis=1), probs)


def examples(rng):
    """Softmax attention of a few temperatures, with and without a span."""
    cases = []
    for (batch, heads, n, c), attrs in [((1, 2, 6, 3), dict(iterations=1)),
                                        ((2, 3, 11, 4), dict(iterations=5, protect=1)),
                                        ((2, 2, 16, 8), dict(iterations=3, protect=2, span_end=12, var_min=0.0))]:
        logits = rng.standard_normal((batch, heads, n, n)) * rng.choice([0.3, 1.0, 4.0], size=(1, heads, 1, 1))
        probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        cases.append(([probs.astype(np.float32), rng.standard_normal((batch, n, c)).astype(np.float32)], attrs))
    return cases


OP = OpDef.of_module(
    __name__,
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
)
