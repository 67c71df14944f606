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

from .base import AttrSpec, OpDef, TensorSpec
from .span import Span, around_span, drop_mask, selection_attributes, span_graph
from .token_prune import select, top_k_in_order

NAME = "TokenRecycle"


def check_attributes(n, attrs, sym=None) -> None:
    """Raise ValueError for a span outside the n tokens, a k outside it or a grid that does
    not fit the patch layout (every cell must hold patches); with a shape expression `n`,
    only what does not depend on it (and, given `sym`, that k has a shape-expression form)."""
    Span.of(attrs).check(n, NAME, counted=False)
    grid, patch_rows, patch_cols = attrs["grid"], attrs["patch_rows"], attrs["patch_cols"]
    if patch_rows < 1 or patch_cols < 1:
        raise ValueError(f"TokenRecycle: patch layout {patch_rows}x{patch_cols} must be at least 1x1")
    if not 1 <= grid <= min(patch_rows, patch_cols):
        raise ValueError(f"TokenRecycle: grid={grid} must be in [1, {min(patch_rows, patch_cols)}] "
                         f"for a {patch_rows}x{patch_cols} patch layout")
    Span.of(attrs).check(n, NAME, sym=sym)


def cell_of(position: np.ndarray, *, grid: int, patch_rows: int, patch_cols: int, first_patch: int) -> np.ndarray:
    """Grid cell of each original patch position; -1 for a position outside the layout."""
    p = position.astype(np.int64) - first_patch
    inside = (p >= 0) & (p < patch_rows * patch_cols)
    p = np.where(inside, p, 0)
    row, col = p // patch_cols, p % patch_cols
    cell = (row * grid // patch_rows) * grid + col * grid // patch_cols
    return np.where(inside, cell, -1)


def reference(x: np.ndarray, score: np.ndarray, position: np.ndarray, *, keep: int, protect: int, span_end: int,
              keep_ratio: float, grid: int, patch_rows: int, patch_cols: int, first_patch: int):
    b, n, d = x.shape
    check_attributes(n, dict(protect=protect, span_end=span_end, keep=keep, keep_ratio=keep_ratio, grid=grid,
                             patch_rows=patch_rows, patch_cols=patch_cols))
    rule = Span(protect, span_end, keep, keep_ratio)
    end, span, k = rule.end(n), rule.length(n), rule.kept(n)
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


def decompose(b, x, score, position):
    ax1, axm1 = b.const([1]), b.const([-1])
    grid_s, rows_s, cols_s = b.attr("grid"), b.attr("patch_rows"), b.attr("patch_cols")
    # span [protect, end) and k: TokenPrune's rule; the kept span tokens, in their original order
    s = span_graph(b, score)
    s_p, kept, chosen = top_k_in_order(b, score, s)
    # dropped mask over the span: ones scattered (no reduction) at the kept positions
    dropped_f = drop_mask(b, kept, s_p)
    dropped = b.Cast(dropped_f, to=9)  # bool [B, span]
    # cell of each span token from its original patch position (-1: not a patch)
    p = b.Sub(b.Slice(position, s.protect, s.end, ax1), b.attr("first_patch"))
    inside = b.And(b.GreaterOrEqual(p, s.zero_s), b.Less(p, b.Mul(rows_s, cols_s)))
    p_safe = b.Where(inside, p, s.zero_s)
    cell_row = b.Div(b.Mul(b.Div(p_safe, cols_s), grid_s), rows_s)
    cell_col = b.Div(b.Mul(b.Mod(p_safe, cols_s), grid_s), cols_s)
    cell = b.Where(inside, b.Add(b.Mul(cell_row, grid_s), cell_col), b.const(-1))
    # one-hot membership [B, span, grid²]
    cell_ids = b.Range(s.zero_s, b.Mul(grid_s, grid_s), s.one_s)
    member_b = b.Equal(b.Unsqueeze(cell, axm1), cell_ids)
    # merges: [score-weighted dropped | plain members] one-hots, summed by one MatMul
    member = b.CastLike(member_b, x)
    w_col = b.Unsqueeze(b.CastLike(b.Mul(s_p, dropped_f), x), axm1)
    stacked = b.Concat(b.Mul(member, w_col), member, axis=2)  # [B, span, 2·grid²]
    x_p = b.Slice(x, s.protect, s.end, ax1)
    sums = b.MatMul(b.Transpose(stacked, perm=[0, 2, 1]), x_p)  # [B, 2·grid², D]
    totals = b.ReduceSum(stacked, ax1, keepdims=0)  # [B, 2·grid²]
    w_sum, m_sum = b.Split(sums, axis=1, num_outputs=2, _outputs=2)
    w_total, m_count = b.Split(totals, axis=1, num_outputs=2, _outputs=2)
    one_x = b.CastLike(b.const([1.0], np.float32), x)
    has_weight = b.Greater(w_total, b.Sub(one_x, one_x))
    w_mean = b.Div(w_sum, b.Unsqueeze(b.Where(has_weight, w_total, one_x), axm1))
    m_mean = b.Div(m_sum, b.Unsqueeze(b.Max(m_count, one_x), axm1))  # an empty cell: 0 / 1 = zeros
    cell_tokens = b.Where(b.Unsqueeze(has_weight, axm1), w_mean, m_mean)
    # representatives: the first highest score among dropped members, else among members
    neg_inf = b.CastLike(b.const(-np.inf, np.float32), s_p)
    s_col = b.Unsqueeze(s_p, axm1)
    dropped_member = b.And(member_b, b.Unsqueeze(dropped, axm1))
    best_dropped = b.ArgMax(b.Where(dropped_member, s_col, neg_inf), axis=1, keepdims=0, select_last_index=0)
    best_member = b.ArgMax(b.Where(member_b, s_col, neg_inf), axis=1, keepdims=0, select_last_index=0)
    has_dropped = b.Cast(b.ReduceMax(b.Cast(dropped_member, to=7), ax1, keepdims=0), to=9)
    best_or_first = b.Where(b.Greater(m_count, b.Sub(one_x, one_x)), best_member, s.zero_s)
    cell_index = b.Add(b.Where(has_dropped, best_dropped, best_or_first), s.protect_s)
    # outputs: prefix, kept span tokens, cell tokens, suffix
    kept_index = around_span(b, s, b.Concat(chosen, cell_index, axis=1))
    x_kept = b.GatherND(x, b.Unsqueeze(chosen, axm1), batch_dims=1)
    x_prefix = b.Slice(x, b.const([0]), s.protect, ax1)
    x_suffix = b.Slice(x, s.end, b.const([np.iinfo(np.int64).max]), ax1)
    return b.Concat(x_prefix, x_kept, cell_tokens, x_suffix, axis=1), kept_index


def examples(rng):
    """A 4x4 layout behind a CLS: grid 1 and 2, k from keep_ratio, a suffix after the span."""
    cases = []
    for (batch, d, suffix), attrs in [((2, 3, 0), dict(keep=5, protect=1, grid=2)),
                                      ((1, 4, 0), dict(keep=1, protect=1, grid=1)),
                                      ((2, 5, 3), dict(keep=0, protect=1, span_end=17, keep_ratio=0.5, grid=2))]:
        n = 17 + suffix
        position = np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n)).copy()
        position[:, 1:17] = rng.permuted(position[:, 1:17], axis=1)
        score = rng.random((batch, n)).astype(np.float32)
        cases.append(([rng.standard_normal((batch, n, d)).astype(np.float32), score, position],
                      {**attrs, "patch_rows": 4, "patch_cols": 4}))
    return cases


OP = OpDef.of_module(
    __name__,
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
)
