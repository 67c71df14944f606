"""TokenPrune: keep the top-k scored tokens of a span, and every token outside it, in order.

Inputs x [B, N, D] and score [B, N]. Tokens before `protect` (CLS, a system prefix) and
from `span_end` on (the text after an image span; `span_end` = 0 means N) are always
kept; of the span [protect, span_end), the k highest-scoring are kept (ties: lower
index first). Everything stays in its original order, so position-dependent parts
downstream (the CLS at index 0, causal order) remain valid.

k is `keep` when it is > 0 — a build-time constant, so shapes are static (TensorRT needs
a static TopK k) — else max(1, ceil(keep_ratio · span length)) computed at run time, for
models whose token count is only known then (text).

Outputs:
- y [B, protect + k + (N - span_end), D]: the kept tokens,
- kept_index [B, protect + k + (N - span_end)] int64: their original positions (to gather
  masks and position ids with the tokens),
- fused [B, 1, D]: Σ score_j · x_j over the dropped span tokens (EViT inattentive-token
  fusion; the pass appends it to y when the recipe asks for fusion).

The decomposition gathers rows with GatherND, so everything after the op really runs
on fewer tokens.
"""

from __future__ import annotations

import numpy as np

from .base import OpDef, TensorSpec
from .span import Span, around_span, drop_mask, selection_attributes, span_graph

NAME = "TokenPrune"


def span_keep(span: int, keep: int, keep_ratio: float) -> int:
    """Tokens kept of a span of `span` tokens (`Span.kept`, the rule of every selection op)."""
    return Span(keep=keep, keep_ratio=keep_ratio).kept(span)


def select(score: np.ndarray, k: int, protect: int, end: int) -> np.ndarray:
    """Original positions of the kept tokens, ascending, [B, protect + k + N - end]."""
    b, n = score.shape
    s = score[:, protect:end]
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    chosen = np.sort(order, axis=1) + protect
    prefix = np.broadcast_to(np.arange(protect, dtype=np.int64), (b, protect))
    suffix = np.broadcast_to(np.arange(end, n, dtype=np.int64), (b, n - end))
    return np.concatenate([prefix, chosen.astype(np.int64), suffix], axis=1)


def reference(x: np.ndarray, score: np.ndarray, *, keep: int, protect: int, span_end: int, keep_ratio: float):
    n = x.shape[1]
    span = Span(protect, span_end, keep, keep_ratio)
    span.check(n, NAME)
    protect, end = span.protect, span.end(n)
    kept = select(score, span.kept(n), protect, end)
    y = np.take_along_axis(x, kept[:, :, None], axis=1)
    weights = np.zeros(score.shape, dtype=np.float64)
    weights[:, protect:end] = score[:, protect:end]
    np.put_along_axis(weights, kept, 0.0, axis=1)
    fused = np.einsum("bn,bnd->bd", weights, x.astype(np.float64))[:, None, :].astype(x.dtype)
    return y, kept, fused


def top_k_in_order(b, score, s):
    """(span scores s_p, the kept tokens' positions in the span, ascending; the same in the
    sequence)."""
    ax1 = b.const([1])
    s_p = b.Slice(score, s.protect, s.end, ax1)
    _, order = b.TopK(s_p, s.k, axis=1, largest=1, sorted=1, _outputs=2)
    kept, _ = b.TopK(order, s.k, axis=1, largest=0, sorted=1, _outputs=2)
    return s_p, kept, b.Add(kept, s.protect)


def decompose(b, x, score):
    s = span_graph(b, score)
    # rank the span's tokens; keep the top k, then restore their order
    s_p, kept, chosen = top_k_in_order(b, score, s)
    # with the protected prefix 0..protect-1 and suffix end..N-1
    kept_index = around_span(b, s, chosen)
    y = b.GatherND(x, b.Unsqueeze(kept_index, b.const([-1])), batch_dims=1)
    # fusion weights: the scores of the dropped span tokens, zero elsewhere
    w_row = b.Unsqueeze(b.CastLike(b.Mul(s_p, drop_mask(b, kept, s_p)), x), b.const([1]))  # [B, 1, span]
    fused = b.MatMul(w_row, b.Slice(x, s.protect, s.end, b.const([1])))  # [B, 1, D]
    return y, kept_index, fused


def examples(rng):
    """k = 1, k = the whole span, a span with a suffix, k from keep_ratio, tied scores."""
    cases = []
    for (batch, n, d), attrs in [((2, 9, 4), dict(keep=1)), ((1, 12, 3), dict(keep=11, protect=1)),
                                 ((2, 20, 5), dict(keep=4, protect=2, span_end=15)),
                                 ((3, 23, 8), dict(keep=0, protect=1, keep_ratio=0.375))]:
        x = rng.standard_normal((batch, n, d)).astype(np.float32)
        cases.append(([x, rng.random((batch, n)).astype(np.float32)], attrs))
    x = rng.standard_normal((2, 10, 3)).astype(np.float32)
    cases.append(([x, (rng.integers(0, 3, (2, 10)) / 3).astype(np.float32)], dict(keep=4, protect=1)))
    return cases


OP = OpDef.of_module(
    __name__,
    inputs=(
        TensorSpec("x", "tokens [B, N, D]"),
        TensorSpec("score", "token scores [B, N], higher = more important"),
    ),
    outputs=(
        TensorSpec("y", "kept tokens [B, protect + k + N - span_end, D]"),
        TensorSpec("kept_index", "original positions of the kept tokens", "int64"),
        TensorSpec("fused", "score-weighted sum of the dropped tokens [B, 1, D]"),
    ),
    attributes=selection_attributes("kept"),
)
