"""AttentionRowScore: the head-mean attention probabilities of one query row.

Token scores in EViT (the CLS row, row 0) and FastV (the last row, row -1) need one
row of the attention matrix only. Computing it as a side branch,
softmax(q_row · Kᵀ · scale + mask_row) averaged over heads, costs O(H·N·Dh) and leaves
the main attention free to stay fused, instead of materialising the full N×N matrix
twice. `mask` is the additive attention mask of the model (padding, causal), rank 4 and
broadcastable to [B, H, Nq, N]; its row `row` is used (a mask with one query row
broadcasts). Pass a [1, 1, 1, 1] zero when the model has no mask.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh

from .base import AttrSpec, OpDef, TensorSpec, const, const_from_attr, make_function

NAME = "AttentionRowScore"


def reference(q: np.ndarray, k_t: np.ndarray, mask: np.ndarray, *, row: int, scale: float) -> tuple[np.ndarray]:
    """q [B, H, Nq, Dh], k_t [B, H, Dh, N], mask [B|1, H|1, Nq|1, N] -> head-mean probabilities of `row`, [B, N]."""
    qr = q[:, :, row, :][:, :, None, :].astype(np.float64)
    logits = (qr @ k_t.astype(np.float64))[:, :, 0, :] * scale
    mask_row = mask[:, :, row if mask.shape[2] > 1 else 0, :].astype(np.float64)
    logits = logits + mask_row
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return (p.mean(axis=1).astype(q.dtype),)


def build_function():
    nodes = [
        const_from_attr("row", "row"),
        const_from_attr("scale", "scale", "value_float"),
        const("axes_heads", np.array([1], dtype=np.int64)),
        const("axes_row", np.array([2], dtype=np.int64)),
        oh.make_node("Gather", ["q", "row"], ["q_row3"], axis=2),  # [B, H, Dh]
        oh.make_node("Unsqueeze", ["q_row3", "axes_row"], ["q_row"]),  # [B, H, 1, Dh]
        oh.make_node("MatMul", ["q_row", "k_t"], ["logits4"]),  # [B, H, 1, N]
        oh.make_node("Squeeze", ["logits4", "axes_row"], ["logits3"]),  # [B, H, N]
        oh.make_node("CastLike", ["scale", "logits3"], ["scale_t"]),
        oh.make_node("Mul", ["logits3", "scale_t"], ["scaled"]),
        # the mask's row (a one-row mask broadcasts over the queries: take its row 0)
        oh.make_node("Shape", ["mask"], ["mask_rows"], start=2, end=3),
        const("one", np.array([1], dtype=np.int64)),
        oh.make_node("Equal", ["mask_rows", "one"], ["single_row"]),
        const("zero_s", np.array(0, dtype=np.int64)),
        oh.make_node("Squeeze", ["single_row"], ["single_row_s"]),
        oh.make_node("Where", ["single_row_s", "zero_s", "row"], ["mask_row_index"]),
        oh.make_node("Gather", ["mask", "mask_row_index"], ["mask_row"], axis=2),  # [B|1, H|1, N]
        oh.make_node("CastLike", ["mask_row", "scaled"], ["mask_row_t"]),
        oh.make_node("Add", ["scaled", "mask_row_t"], ["masked"]),
        oh.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        oh.make_node("ReduceMean", ["probs", "axes_heads"], ["score"], keepdims=0),  # [B, N]
    ]
    return make_function(NAME, ["q", "k_t", "mask"], ["score"], ["row", "scale"], nodes, __doc__,
                         defaults={"row": 0, "scale": 1.0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(
        TensorSpec("q", "queries [B, H, Nq, Dh] (possibly pre-scaled)"),
        TensorSpec("k_t", "transposed keys [B, H, Dh, N] (possibly pre-scaled)"),
        TensorSpec("mask", "additive mask, rank 4, broadcastable to [B, H, Nq, N]"),
    ),
    outputs=(TensorSpec("score", "head-mean attention probabilities of the row, [B, N]"),),
    attributes=(
        AttrSpec("row", int, "query row: 0 for CLS (EViT), -1 for the last token (FastV)", 0),
        AttrSpec("scale", float, "multiplier applied to q·kᵀ before the mask and softmax", 1.0),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.attention_row_score:run",
)
