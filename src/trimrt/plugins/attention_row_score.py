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

from .base import AttrSpec, OpDef, TensorSpec

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


def decompose(b, q, k_t, mask):
    row = b.attr("row")
    axes_row = b.const([2])
    q_row = b.Unsqueeze(b.Gather(q, row, axis=2), axes_row)  # [B, H, 1, Dh]
    logits = b.Squeeze(b.MatMul(q_row, k_t), axes_row)  # [B, H, N]
    scaled = b.Mul(logits, b.CastLike(b.attr("scale"), logits))
    # the mask's row (a one-row mask broadcasts over the queries: take its row 0)
    single_row = b.Squeeze(b.Equal(b.Shape(mask, start=2, end=3), b.const([1])))
    mask_row = b.Gather(mask, b.Where(single_row, b.const(0), row), axis=2)  # [B|1, H|1, N]
    probs = b.Softmax(b.Add(scaled, b.CastLike(mask_row, scaled)), axis=-1)
    return b.ReduceMean(probs, b.const([1]), keepdims=0)  # [B, N]


def examples(rng):
    """(inputs, attributes) for the contract suite: masks of every broadcast form."""
    cases = []
    for (batch, heads, n, dh), row, mask_shape in [((1, 1, 5, 4), 0, (1, 1, 1, 1)), ((3, 4, 17, 8), -1, (3, 1, 1, 17)),
                                                   ((2, 2, 9, 16), 2, (1, 1, 9, 9))]:
        q = rng.standard_normal((batch, heads, n, dh)).astype(np.float32)
        k_t = rng.standard_normal((batch, heads, dh, n)).astype(np.float32)
        mask = np.where(rng.random(mask_shape) < 0.2, np.finfo(np.float32).min, 0.0).astype(np.float32)
        cases.append(([q, k_t, mask], {"row": row, "scale": dh**-0.5}))
    return cases


OP = OpDef.of_module(
    __name__,
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
)
