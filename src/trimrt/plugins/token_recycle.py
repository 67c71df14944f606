"""TokenRecycle: prune like TokenPrune, but merge the dropped tokens into grid cells (VFlowOpt).

Inputs x [B, N, D], score [B, N] (>= 0, e.g. CLS attention) and position [B, N] int64:
the ORIGINAL patch index of each token (1..196 for a 14x14 ViT with its CLS at 0), which
the compiler carries through earlier prunes, so a token still knows where it was in the
image when the sequence is no longer a full grid.

Selection is TokenPrune's exactly (`keep`, `protect`, `span_end`, `keep_ratio`: the top-k
of the span [protect, end), ties to the lower index). The dropped span tokens are not
thrown away: the image's patch_rows x patch_cols layout is cut into a fixed grid x grid
of cells, and each cell's dropped tokens are merged into one token, weighted by score,
so the pruned detail survives as coarse spatial context at a static cost of grid² tokens.

Cell of a span token j: p = position[j] - first_patch, row = p // patch_cols,
col = p % patch_cols, cell = (row · grid // patch_rows) · grid + col · grid // patch_cols;
a token whose p is outside [0, patch_rows · patch_cols) (not a patch: a CLS left in the
span, say) belongs to no cell. Cell token c, with members = the span tokens of cell c and
w_j = score_j for its dropped members (0 for its kept ones):
Σ w_j x_j / Σ w_j if Σ w_j > 0; else the plain mean of its members if it has any (all kept
or all zero-scored: the cell still says what is there); else zeros.

Outputs, in this order along the token axis (protected prefix, kept span tokens in their
original order, the grid² cell tokens row-major, the suffix [end, N)):
- y [B, protect + k + grid² + (N - end), D],
- kept_index [B, same] int64: the index into x of each output token; for a cell token, its
  highest-scoring dropped token (ties: lower index), else its highest-scoring member,
  else `protect` (an empty cell) — a representative, so masks and position ids can still
  be gathered with kept_index.

The decomposition selects with TopK and gathers with GatherND (everything downstream
runs on fewer tokens); the cell assignment is a one-hot [B, span, grid²] (Equal against
a Range) and the merges are one MatMul, no scatter with reduction.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh

from .base import (AttrSpec, OpDef, TensorSpec, const, const_from_attr, drop_mask_nodes, kept_count_nodes, make_function,
                   prefix_suffix_nodes, selection_attributes, span_nodes)
from .token_prune import select, span_keep

NAME = "TokenRecycle"


def check_layout(grid: int, patch_rows: int, patch_cols: int) -> None:
    """Raise ValueError unless the grid fits the patch layout (every cell holds patches)."""
    if patch_rows < 1 or patch_cols < 1:
        raise ValueError(f"TokenRecycle: patch layout {patch_rows}x{patch_cols} must be at least 1x1")
    if not 1 <= grid <= min(patch_rows, patch_cols):
        raise ValueError(f"TokenRecycle: grid={grid} must be in [1, {min(patch_rows, patch_cols)}] "
                         f"for a {patch_rows}x{patch_cols} patch layout")


def cell_of(position: np.ndarray, *, grid: int, patch_rows: int, patch_cols: int, first_patch: int) -> np.ndarray:
    """Grid cell of each original patch position; -1 for a position outside the layout."""
    p = position.astype(np.int64) - first_patch
    inside = (p >= 0) & (p < patch_rows * patch_cols)
    p = np.where(inside, p, 0)
    row, col = p // patch_cols, p % patch_cols
    cell = (row * grid // patch_rows) * grid + col * grid // patch_cols
    return np.where(inside, cell, -1)


def reference(x: np.ndarray, score: np.ndarray, position: np.ndarray, *, keep: int, protect: int = 0,
              span_end: int = 0, keep_ratio: float = 1.0, grid: int, patch_rows: int, patch_cols: int,
              first_patch: int = 1):
    b, n, d = x.shape
    end = span_end if span_end > 0 else n
    if not 0 <= protect < end <= n:
        raise ValueError(f"span [{protect}, {end}) is not inside {n} tokens")
    check_layout(grid, patch_rows, patch_cols)
    span = end - protect
    k = span_keep(span, keep, keep_ratio)
    if not 1 <= k <= span:
        raise ValueError(f"keep={keep} must be in [1, {span}] for a span of {span} tokens")
    kept = select(score, k, protect, end)  # prefix, chosen span tokens, suffix
    cells = grid * grid
    cell = cell_of(position[:, protect:end], grid=grid, patch_rows=patch_rows, patch_cols=patch_cols,
                   first_patch=first_patch)
    cell_x = np.zeros((b, cells, d), dtype=np.float64)
    cell_index = np.full((b, cells), protect, dtype=np.int64)
    for i in range(b):
        is_kept = np.zeros(span, dtype=bool)
        is_kept[kept[i, protect:protect + k] - protect] = True
        for c in range(cells):
            members = np.flatnonzero(cell[i] == c) + protect  # ascending
            dropped = members[~is_kept[members - protect]]
            w = score[i, dropped].astype(np.float64)
            if w.sum() > 0:
                cell_x[i, c] = w @ x[i, dropped].astype(np.float64) / w.sum()
            elif members.size:
                cell_x[i, c] = x[i, members].astype(np.float64).mean(axis=0)
            representatives = dropped if dropped.size else members
            if representatives.size:  # argmax: the first (lowest index) of the highest scores
                cell_index[i, c] = representatives[np.argmax(score[i, representatives])]
    head = kept[:, :protect + k]
    y = np.concatenate([np.take_along_axis(x, head[:, :, None], axis=1), cell_x.astype(x.dtype), x[:, end:]], axis=1)
    kept_index = np.concatenate([head, cell_index, kept[:, protect + k:]], axis=1)
    return y, kept_index


def build_function():
    big = np.iinfo(np.int64).max
    nodes = [
        const_from_attr("keep_s", "keep"),
        const_from_attr("protect_s", "protect"),
        const_from_attr("span_end_s", "span_end"),
        const_from_attr("ratio_f", "keep_ratio", "value_float"),
        const_from_attr("grid_s", "grid"),
        const_from_attr("rows_s", "patch_rows"),
        const_from_attr("cols_s", "patch_cols"),
        const_from_attr("first_s", "first_patch"),
        const("ax0", np.array([0], dtype=np.int64)),
        const("ax1", np.array([1], dtype=np.int64)),
        const("axm1", np.array([-1], dtype=np.int64)),
        const("start0", np.array([0], dtype=np.int64)),
        const("end_max", np.array([big], dtype=np.int64)),
        const("zero_s", np.array(0, dtype=np.int64)),
        const("one_s", np.array(1, dtype=np.int64)),
        const("minus_one_s", np.array(-1, dtype=np.int64)),
        const("one_f", np.array([1.0], dtype=np.float32)),
        const("neg_inf_f", np.array(-np.inf, dtype=np.float32)),
        # span [protect, end) and k: TokenPrune's rule (keep, or the keep_ratio of the span)
        *span_nodes("score"),
        *kept_count_nodes(),
        # the kept span tokens, in their original order
        oh.make_node("Slice", ["score", "protect", "end", "ax1"], ["s_p"]),
        oh.make_node("TopK", ["s_p", "k"], ["_top", "order"], axis=1, largest=1, sorted=1),
        oh.make_node("TopK", ["order", "k"], ["order_sorted", "_pos"], axis=1, largest=0, sorted=1),
        oh.make_node("Add", ["order_sorted", "protect"], ["chosen"]),
        # dropped mask over the span: ones scattered (no reduction) at the kept positions
        *drop_mask_nodes(),
        oh.make_node("Cast", ["drop_mask"], ["dropped"], to=9),  # bool [B, span]
        # cell of each span token from its original patch position (-1: not a patch)
        oh.make_node("Slice", ["position", "protect", "end", "ax1"], ["pos_p"]),
        oh.make_node("Sub", ["pos_p", "first_s"], ["p"]),
        oh.make_node("Mul", ["rows_s", "cols_s"], ["n_patches"]),
        oh.make_node("GreaterOrEqual", ["p", "zero_s"], ["p_ge0"]),
        oh.make_node("Less", ["p", "n_patches"], ["p_lt"]),
        oh.make_node("And", ["p_ge0", "p_lt"], ["inside"]),
        oh.make_node("Where", ["inside", "p", "zero_s"], ["p_safe"]),
        oh.make_node("Div", ["p_safe", "cols_s"], ["row"]),
        oh.make_node("Mod", ["p_safe", "cols_s"], ["col"]),
        oh.make_node("Mul", ["row", "grid_s"], ["row_g"]),
        oh.make_node("Div", ["row_g", "rows_s"], ["cell_row"]),
        oh.make_node("Mul", ["col", "grid_s"], ["col_g"]),
        oh.make_node("Div", ["col_g", "cols_s"], ["cell_col"]),
        oh.make_node("Mul", ["cell_row", "grid_s"], ["cell_row_base"]),
        oh.make_node("Add", ["cell_row_base", "cell_col"], ["cell_in"]),
        oh.make_node("Where", ["inside", "cell_in", "minus_one_s"], ["cell"]),
        # one-hot membership [B, span, grid²]
        oh.make_node("Mul", ["grid_s", "grid_s"], ["cells_s"]),
        oh.make_node("Range", ["zero_s", "cells_s", "one_s"], ["cell_ids"]),
        oh.make_node("Unsqueeze", ["cell", "axm1"], ["cell_col_vec"]),
        oh.make_node("Equal", ["cell_col_vec", "cell_ids"], ["member_b"]),
        # merges: [score-weighted dropped | plain members] one-hots, summed by one MatMul
        oh.make_node("CastLike", ["member_b", "x"], ["member"]),
        oh.make_node("Mul", ["s_p", "drop_mask"], ["w"]),
        oh.make_node("CastLike", ["w", "x"], ["w_x"]),
        oh.make_node("Unsqueeze", ["w_x", "axm1"], ["w_col"]),
        oh.make_node("Mul", ["member", "w_col"], ["weighted"]),
        oh.make_node("Concat", ["weighted", "member"], ["stacked"], axis=2),  # [B, span, 2·grid²]
        oh.make_node("Transpose", ["stacked"], ["stacked_t"], perm=[0, 2, 1]),
        oh.make_node("Slice", ["x", "protect", "end", "ax1"], ["x_p"]),
        oh.make_node("MatMul", ["stacked_t", "x_p"], ["sums"]),  # [B, 2·grid², D]
        oh.make_node("ReduceSum", ["stacked", "ax1"], ["totals"], keepdims=0),  # [B, 2·grid²]
        oh.make_node("Split", ["sums"], ["w_sum", "m_sum"], axis=1, num_outputs=2),
        oh.make_node("Split", ["totals"], ["w_total", "m_count"], axis=1, num_outputs=2),
        oh.make_node("CastLike", ["one_f", "x"], ["one_x"]),
        oh.make_node("Sub", ["one_x", "one_x"], ["zero_x"]),
        oh.make_node("Greater", ["w_total", "zero_x"], ["has_weight"]),
        oh.make_node("Where", ["has_weight", "w_total", "one_x"], ["w_den"]),
        oh.make_node("Max", ["m_count", "one_x"], ["m_den"]),  # an empty cell: 0 / 1 = zeros
        oh.make_node("Unsqueeze", ["w_den", "axm1"], ["w_den_col"]),
        oh.make_node("Unsqueeze", ["m_den", "axm1"], ["m_den_col"]),
        oh.make_node("Div", ["w_sum", "w_den_col"], ["w_mean"]),
        oh.make_node("Div", ["m_sum", "m_den_col"], ["m_mean"]),
        oh.make_node("Unsqueeze", ["has_weight", "axm1"], ["has_weight_col"]),
        oh.make_node("Where", ["has_weight_col", "w_mean", "m_mean"], ["cell_tokens"]),
        # representatives: the first highest score among dropped members, else among members
        oh.make_node("CastLike", ["neg_inf_f", "s_p"], ["neg_inf"]),
        oh.make_node("Unsqueeze", ["s_p", "axm1"], ["s_col"]),
        oh.make_node("Unsqueeze", ["dropped", "axm1"], ["dropped_col"]),
        oh.make_node("And", ["member_b", "dropped_col"], ["dropped_member"]),
        oh.make_node("Where", ["dropped_member", "s_col", "neg_inf"], ["key_dropped"]),
        oh.make_node("Where", ["member_b", "s_col", "neg_inf"], ["key_member"]),
        oh.make_node("ArgMax", ["key_dropped"], ["best_dropped"], axis=1, keepdims=0, select_last_index=0),
        oh.make_node("ArgMax", ["key_member"], ["best_member"], axis=1, keepdims=0, select_last_index=0),
        oh.make_node("Cast", ["dropped_member"], ["dropped_member_i"], to=7),
        oh.make_node("ReduceMax", ["dropped_member_i", "ax1"], ["n_dropped_any"], keepdims=0),
        oh.make_node("Cast", ["n_dropped_any"], ["has_dropped"], to=9),
        oh.make_node("Greater", ["m_count", "zero_x"], ["has_member"]),
        oh.make_node("Where", ["has_member", "best_member", "zero_s"], ["best_or_first"]),
        oh.make_node("Where", ["has_dropped", "best_dropped", "best_or_first"], ["best_local"]),
        oh.make_node("Add", ["best_local", "protect_s"], ["cell_index"]),
        # outputs: prefix, kept span tokens, cell tokens, suffix
        *prefix_suffix_nodes("score"),
        oh.make_node("Concat", ["prefix", "chosen", "cell_index", "suffix"], ["kept_index"], axis=1),
        oh.make_node("Unsqueeze", ["chosen", "axm1"], ["gather_idx"]),
        oh.make_node("GatherND", ["x", "gather_idx"], ["x_kept"], batch_dims=1),
        oh.make_node("Slice", ["x", "start0", "protect", "ax1"], ["x_prefix"]),
        oh.make_node("Slice", ["x", "end", "end_max", "ax1"], ["x_suffix"]),
        oh.make_node("Concat", ["x_prefix", "x_kept", "cell_tokens", "x_suffix"], ["y"], axis=1),
    ]
    return make_function(NAME, ["x", "score", "position"], ["y", "kept_index"],
                         ["keep", "protect", "span_end", "keep_ratio", "grid", "patch_rows", "patch_cols",
                          "first_patch"], nodes, __doc__,
                         defaults={"protect": 0, "span_end": 0, "keep_ratio": 1.0, "first_patch": 1})


OP = OpDef(
    name=NAME,
    doc=__doc__,
    inputs=(
        TensorSpec("x", "tokens [B, N, D]"),
        TensorSpec("score", "token scores [B, N], >= 0, higher = more important"),
        TensorSpec("position", "original patch index of each token [B, N]", "int64"),
    ),
    outputs=(
        TensorSpec("y", "prefix, kept span tokens, grid² cell tokens, suffix [B, protect + k + grid² + N - end, D]"),
        TensorSpec("kept_index", "index into x of each output token (a cell: its representative)", "int64"),
    ),
    attributes=(
        *selection_attributes("kept"),
        AttrSpec("grid", int, "cells per side of the merge grid (grid² cell tokens)"),
        AttrSpec("patch_rows", int, "rows of the original patch layout"),
        AttrSpec("patch_cols", int, "columns of the original patch layout"),
        AttrSpec("first_patch", int, "original position of patch (0, 0)", 1),
    ),
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.token_recycle:run",
)
