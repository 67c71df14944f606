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

import math

import numpy as np
import onnx.helper as oh

from .base import (OpDef, TensorSpec, const, const_from_attr, drop_mask_nodes, kept_count_nodes, make_function, prefix_suffix_nodes,
                   selection_attributes, span_nodes)

NAME = "TokenPrune"


def span_keep(span: int, keep: int, keep_ratio: float) -> int:
    """Tokens kept of a span of `span` tokens (the rule the decomposition computes)."""
    if keep > 0:
        return keep
    return max(1, min(span, math.ceil(keep_ratio * span - 1e-9)))


def select(score: np.ndarray, k: int, protect: int, end: int) -> np.ndarray:
    """Original positions of the kept tokens, ascending, [B, protect + k + N - end]."""
    b, n = score.shape
    s = score[:, protect:end]
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    chosen = np.sort(order, axis=1) + protect
    prefix = np.broadcast_to(np.arange(protect, dtype=np.int64), (b, protect))
    suffix = np.broadcast_to(np.arange(end, n, dtype=np.int64), (b, n - end))
    return np.concatenate([prefix, chosen.astype(np.int64), suffix], axis=1)


def reference(x: np.ndarray, score: np.ndarray, *, keep: int, protect: int, span_end: int = 0, keep_ratio: float = 1.0):
    n = x.shape[1]
    end = span_end if span_end > 0 else n
    if not 0 <= protect < end <= n:
        raise ValueError(f"span [{protect}, {end}) is not inside {n} tokens")
    k = span_keep(end - protect, keep, keep_ratio)
    if not 1 <= k <= end - protect:
        raise ValueError(f"keep={keep} must be in [1, {end - protect}] for a span of {end - protect} tokens")
    kept = select(score, k, protect, end)
    y = np.take_along_axis(x, kept[:, :, None], axis=1)
    weights = np.zeros(score.shape, dtype=np.float64)
    weights[:, protect:end] = score[:, protect:end]
    np.put_along_axis(weights, kept, 0.0, axis=1)
    fused = np.einsum("bn,bnd->bd", weights, x.astype(np.float64))[:, None, :].astype(x.dtype)
    return y, kept, fused


def build_function():
    big = np.iinfo(np.int64).max
    nodes = [
        const_from_attr("keep_s", "keep"),
        const_from_attr("protect_s", "protect"),
        const_from_attr("span_end_s", "span_end"),
        const_from_attr("ratio_f", "keep_ratio", "value_float"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("axm1", np.array([-1], dtype=np.int64)),
        const("end_max", np.array([big], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("one_f", np.array([1.0], dtype=np.float32)),
        *span_nodes("score"),
        *kept_count_nodes(),
        # rank the span's tokens; keep the top k, then restore their order
        oh.make_node("Slice", ["score", "protect", "end", "ax1"], ["s_p"]),
        oh.make_node("TopK", ["s_p", "k"], ["_top", "order"], axis=1, largest=1, sorted=1),
        oh.make_node("TopK", ["order", "k"], ["order_sorted", "_pos"], axis=1, largest=0, sorted=1),
        oh.make_node("Add", ["order_sorted", "protect"], ["chosen"]),
        # protected prefix 0..protect-1 and suffix end..N-1, broadcast over the batch
        *prefix_suffix_nodes("score"),
        oh.make_node("Concat", ["prefix", "chosen", "suffix"], ["kept_index"], axis=1),
        oh.make_node("Unsqueeze", ["kept_index", "axm1"], ["gather_idx"]),
        oh.make_node("GatherND", ["x", "gather_idx"], ["y"], batch_dims=1),
        # fusion weights: the scores of the dropped span tokens, zero elsewhere
        *drop_mask_nodes(),
        oh.make_node("Mul", ["s_p", "drop_mask"], ["w"]),
        oh.make_node("CastLike", ["w", "x"], ["w_x"]),
        oh.make_node("Unsqueeze", ["w_x", "ax1"], ["w_row"]),  # [B, 1, span]
        oh.make_node("Slice", ["x", "protect", "end", "ax1"], ["x_p"]),
        oh.make_node("MatMul", ["w_row", "x_p"], ["fused"]),  # [B, 1, D]
    ]
    return make_function(NAME, ["x", "score"], ["y", "kept_index", "fused"],
                         ["keep", "protect", "span_end", "keep_ratio"], nodes, __doc__,
                         defaults={"protect": 0, "span_end": 0, "keep_ratio": 1.0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(
        TensorSpec("x", "tokens [B, N, D]"),
        TensorSpec("score", "token scores [B, N], higher = more important"),
    ),
    outputs=(
        TensorSpec("y", "kept tokens [B, protect + k + N - span_end, D]"),
        TensorSpec("kept_index", "original positions of the kept tokens", "int64"),
        TensorSpec("fused", "score-weighted sum of the dropped tokens [B, 1, D]"),
    ),
    attributes=(
        *selection_attributes("kept"),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.token_prune:run",
)
