"""TokenPrune: keep the top-`keep` scored tokens (plus a protected prefix), in order.

Inputs x [B, N, D] and score [B, N]. The first `protect` tokens (CLS, a prefix) are
always kept; of the rest, the `keep` highest-scoring are kept (ties: lower index
first) and stay in their original order, so position-dependent parts downstream
(the CLS at index 0, causal order) remain valid. Outputs:

- y [B, protect + keep, D]: the kept tokens,
- kept_index [B, protect + keep] int64: their original positions (to gather masks and
  position ids with the tokens),
- fused [B, 1, D]: Σ score_j · x_j over the dropped tokens (EViT inattentive-token
  fusion; the pass appends it to y when the recipe asks for fusion).

`keep` is a build-time constant (TensorRT needs static TopK k), so shapes are static
per build. The decomposition gathers rows with GatherND, so everything after the op
really runs on fewer tokens.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh

from .base import AttrSpec, OpDef, TensorSpec, const, const_from_attr, make_function

NAME = "TokenPrune"


def select(score: np.ndarray, keep: int, protect: int) -> np.ndarray:
    """Original positions of the kept tokens, ascending, [B, protect + keep]."""
    s = score[:, protect:]
    order = np.argsort(-s, axis=1, kind="stable")[:, :keep]
    chosen = np.sort(order, axis=1) + protect
    prefix = np.broadcast_to(np.arange(protect, dtype=np.int64), (score.shape[0], protect))
    return np.concatenate([prefix, chosen.astype(np.int64)], axis=1)


def reference(x: np.ndarray, score: np.ndarray, *, keep: int, protect: int):
    n = x.shape[1]
    if not 1 <= keep <= n - protect:
        raise ValueError(f"keep={keep} must be in [1, {n - protect}] for {n} tokens, protect={protect}")
    kept = select(score, keep, protect)
    y = np.take_along_axis(x, kept[:, :, None], axis=1)
    weights = score.astype(np.float64).copy()
    np.put_along_axis(weights, kept, 0.0, axis=1)
    weights[:, :protect] = 0.0
    fused = np.einsum("bn,bnd->bd", weights, x.astype(np.float64))[:, None, :].astype(x.dtype)
    return y, kept, fused


def build_function():
    big = np.iinfo(np.int64).max
    nodes = [
        const_from_attr("keep_s", "keep"),
        const_from_attr("protect_s", "protect"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("axm1", np.array([-1], dtype=np.int64)),
        const("end", np.array([big], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("one_f", np.array([1.0], dtype=np.float32)),
        oh.make_node("Unsqueeze", ["keep_s", "ax0"], ["keep"]),
        oh.make_node("Unsqueeze", ["protect_s", "ax0"], ["protect"]),
        # rank the prunable tokens; keep the top `keep`, then restore their order
        oh.make_node("Slice", ["score", "protect", "end", "ax1"], ["s_p"]),
        oh.make_node("TopK", ["s_p", "keep"], ["_top", "order"], axis=1, largest=1, sorted=1),
        oh.make_node("TopK", ["order", "keep"], ["order_sorted", "_pos"], axis=1, largest=0, sorted=1),
        oh.make_node("Add", ["order_sorted", "protect"], ["chosen"]),
        # protected prefix 0..protect-1, broadcast over the batch
        oh.make_node("Range", ["zero_s", "protect_s", "one_s"], ["prefix1"]),
        oh.make_node("Shape", ["score"], ["batch"], start=0, end=1),
        oh.make_node("Concat", ["batch", "protect"], ["prefix_shape"], axis=0),
        oh.make_node("Expand", ["prefix1", "prefix_shape"], ["prefix"]),
        oh.make_node("Concat", ["prefix", "chosen"], ["kept_index"], axis=1),
        oh.make_node("Unsqueeze", ["kept_index", "axm1"], ["gather_idx"]),
        oh.make_node("GatherND", ["x", "gather_idx"], ["y"], batch_dims=1),
        # fusion weights: the scores of the dropped prunable tokens, zero elsewhere
        oh.make_node("Shape", ["order"], ["order_shape"]),
        oh.make_node("CastLike", ["one_f", "s_p"], ["one_t"]),
        oh.make_node("Expand", ["one_t", "order_shape"], ["ones"]),
        oh.make_node("Shape", ["s_p"], ["s_p_shape"]),
        oh.make_node("ConstantOfShape", ["s_p_shape"], ["zeros_f"]),
        oh.make_node("CastLike", ["zeros_f", "s_p"], ["zeros"]),
        oh.make_node("ScatterElements", ["zeros", "order", "ones"], ["kept_mask"], axis=1),
        oh.make_node("Sub", ["one_t", "kept_mask"], ["drop_mask"]),
        oh.make_node("Mul", ["s_p", "drop_mask"], ["w"]),
        oh.make_node("CastLike", ["w", "x"], ["w_x"]),
        oh.make_node("Unsqueeze", ["w_x", "ax1"], ["w_row"]),  # [B, 1, N - protect]
        oh.make_node("Slice", ["x", "protect", "end", "ax1"], ["x_p"]),
        oh.make_node("MatMul", ["w_row", "x_p"], ["fused"]),  # [B, 1, D]
    ]
    return make_function(NAME, ["x", "score"], ["y", "kept_index", "fused"], ["keep", "protect"], nodes, __doc__)


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(
        TensorSpec("x", "tokens [B, N, D]"),
        TensorSpec("score", "token scores [B, N], higher = more important"),
    ),
    outputs=(
        TensorSpec("y", "kept tokens [B, protect + keep, D]"),
        TensorSpec("kept_index", "original positions of the kept tokens [B, protect + keep]", "int64"),
        TensorSpec("fused", "score-weighted sum of the dropped tokens [B, 1, D]"),
    ),
    attributes=(
        AttrSpec("keep", int, "number of prunable tokens kept (build-time constant)"),
        AttrSpec("protect", int, "number of leading tokens always kept", 0),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.token_prune:run",
    tensorrt="trimrt.plugins.tensorrt_glue:register_token_prune",
)
