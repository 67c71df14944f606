"""Triton kernel of TokenRecycle: select, gather and merge into grid cells in one launch.

Grid (B, cdiv(D, BLOCK_D)). Selection is TokenPrune's (kernels/token_prune.py): a span
token is kept iff its stable descending rank among the span's scores is < k, the rank
being counted by BLOCK x BLOCK comparisons (no sort). Each program:

1. walks the N tokens in chunks of BLOCK_I: ranks them, gives each kept token its output
   slot (kept tokens before it, plus grid² for the suffix, which comes after the cells)
   and copies its features of this block; the first feature block writes kept_index;
2. walks the cells in chunks of BLOCK_C and, per chunk, the span in chunks of BLOCK_T:
   re-ranks those tokens (so nothing is kept between the phases: no scratch memory,
   one kernel, which the TensorRT AOT path needs), computes their cells from their
   original positions, and accumulates per cell, in float32, Σ w_j x_j and Σ w_j over
   the dropped members (w = score), Σ x_j and the member count, and the first
   highest-scoring dropped member and member (chunks are visited in index order, so a
   later chunk only wins with a strictly higher score: ties go to the lower index);
   then writes the cell tokens (weighted mean, else members' mean, else zeros) and
   their representatives.

The per-cell sums are a [BLOCK_T, BLOCK_C, BLOCK_D] broadcast reduced over the tokens
(exact float32, unlike a TF32 tl.dot). Re-ranking costs O(cells / BLOCK_C · span²)
comparisons, small next to the copy for ViT sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..span import Span
from ..token_recycle import NAME, check_attributes
from ._launch import aot_compile, block, largest, launch, load_tile, output_buffers, store_tile, triton_types, without_features
from .token_prune import span_rank

MAX_BLOCK_N = 64
MAX_BLOCK_D = 32
MAX_BLOCK_C = 16
BLOCK_T = 16  # span tokens per step of the cell phase (its broadcast is BLOCK_T x BLOCK_C x BLOCK_D)


@triton.jit
def _cell_of(pos, first_patch, grid_size, patch_rows, patch_cols):
    """Grid cell of original patch positions; -1 outside the patch layout."""
    p = pos - first_patch
    inside = (p >= 0) & (p < patch_rows * patch_cols)
    p = tl.where(inside, p, 0)
    row = p // patch_cols
    col = p % patch_cols
    cell = (row * grid_size // patch_rows) * grid_size + col * grid_size // patch_cols
    return tl.where(inside, cell, -1)


@triton.jit
def _first_best(chosen, s32, t, best_s, best_i, found_before):
    """Each cell's first highest-scoring token among `chosen` [BLOCK_T, BLOCK_C] after this
    chunk of tokens t (scores s32): (score, index, found). Chunks come in index order, so a
    later one only wins with a strictly higher score: ties go to the lower index."""
    key = tl.where(chosen, s32[:, None], float("-inf"))
    top = tl.max(key, axis=0)
    arg = tl.min(tl.where(chosen & (key == top[None, :]), t[:, None], 2147483647), axis=0)
    found = tl.max(chosen.to(tl.int32), axis=0) > 0
    take = found & (~found_before | (top > best_s))
    return tl.where(take, top, best_s), tl.where(take, arg, best_i), found_before | found


@triton.jit
def token_recycle_kernel(x_ptr, s_ptr, pos_ptr, N, D, keep, protect, end, grid_size, patch_rows, patch_cols,
                         first_patch, y_ptr, idx_ptr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cells = grid_size * grid_size
    m = protect + keep + cells + (N - end)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    s_row = s_ptr + b * N
    # 1. the kept tokens: prefix, chosen span tokens, then (after the cells) the suffix
    n_before = tl.sum(tl.zeros([BLOCK_I], dtype=tl.int32), axis=0)
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_valid = i < N
        s_i = tl.load(s_row + i, mask=i_valid, other=0.0)
        rank = span_rank(s_row, s_i, i, protect, end, BLOCK_J)
        in_span = i_valid & (i >= protect) & (i < end)
        kept = (i_valid & ((i < protect) | (i >= end))) | (in_span & (rank < keep))
        kept_i32 = kept.to(tl.int32)
        slot = n_before + tl.cumsum(kept_i32, axis=0) - kept_i32
        n_before += tl.sum(kept_i32, axis=0)
        slot = tl.where(i >= end, slot + cells, slot)
        first_block = (tl.zeros([BLOCK_I], dtype=tl.int32) + pid_d) == 0
        tl.store(idx_ptr + b * m + slot, i.to(tl.int64), mask=kept & first_block)
        rows = load_tile(x_ptr, b * N + i, kept, d, d_mask, D)
        store_tile(y_ptr, b * m + slot, kept, d, d_mask, D, rows)
    # 2. the cell tokens, BLOCK_C cells at a time
    for c0 in range(0, cells, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_valid = c < cells
        sum_w = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        sum_m = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        total_w = tl.zeros([BLOCK_C], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        best_drop_s = tl.zeros([BLOCK_C], dtype=tl.float32)
        best_drop_i = tl.zeros([BLOCK_C], dtype=tl.int32) + protect
        has_drop = tl.zeros([BLOCK_C], dtype=tl.int1)
        best_mem_s = tl.zeros([BLOCK_C], dtype=tl.float32)
        best_mem_i = tl.zeros([BLOCK_C], dtype=tl.int32) + protect
        has_mem = tl.zeros([BLOCK_C], dtype=tl.int1)
        for t0 in range(protect, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_valid = t < end
            s_t = tl.load(s_row + t, mask=t_valid, other=0.0)
            dropped = t_valid & (span_rank(s_row, s_t, t, protect, end, BLOCK_J) >= keep)
            pos = tl.load(pos_ptr + b * N + t, mask=t_valid, other=0)
            cell = tl.where(t_valid, _cell_of(pos, first_patch, grid_size, patch_rows, patch_cols), -1)
            member = (cell[:, None] == c[None, :]) & t_valid[:, None]  # [BLOCK_T, BLOCK_C]
            dropped_member = member & dropped[:, None]
            s32 = s_t.to(tl.float32)
            w = tl.where(dropped_member, s32[:, None], 0.0)
            one = member.to(tl.float32)
            rows = load_tile(x_ptr, b * N + t, t_valid, d, d_mask, D).to(tl.float32)
            sum_w += tl.sum(w[:, :, None] * rows[:, None, :], axis=0)
            sum_m += tl.sum(one[:, :, None] * rows[:, None, :], axis=0)
            total_w += tl.sum(w, axis=0)
            count += tl.sum(one, axis=0)
            best_drop_s, best_drop_i, has_drop = _first_best(dropped_member, s32, t, best_drop_s, best_drop_i, has_drop)
            best_mem_s, best_mem_i, has_mem = _first_best(member, s32, t, best_mem_s, best_mem_i, has_mem)
        weighted = total_w > 0
        mean_w = sum_w / tl.where(weighted, total_w, 1.0)[:, None]
        mean_m = sum_m / tl.maximum(count, 1.0)[:, None]
        value = tl.where(weighted[:, None], mean_w, mean_m)
        slot = protect + keep + c
        store_tile(y_ptr, b * m + slot, c_valid, d, d_mask, D, value)
        representative = tl.where(has_drop, best_drop_i, tl.where(has_mem, best_mem_i, protect))
        first_block = (tl.zeros([BLOCK_C], dtype=tl.int32) + pid_d) == 0
        tl.store(idx_ptr + b * m + slot, representative.to(tl.int64), mask=c_valid & first_block)


# ------------------------------------------------- launch (ints or shape expressions)


def out_tokens(n, attrs, sym=None):
    """protect + k + grid² + (N - end) (a shape expression, if any, stays on the left)."""
    return Span.of(attrs).out_tokens(n, sym) + attrs["grid"] * attrs["grid"]


def scalar_args(x_shape, score_shape, position_shape, *, sym=None, **attrs) -> list:
    """The int32 kernel arguments (in the kernel's order) from the input shapes (ints or shape exprs)."""
    span, n = Span.of(attrs), x_shape[1]
    return [n, x_shape[2], span.kept(n, sym), span.protect, span.end(n), attrs["grid"], attrs["patch_rows"],
            attrs["patch_cols"], attrs["first_patch"]]


def launch_grid(x_shape, score_shape=None, position_shape=None, cdiv=triton.cdiv, block_d: int = MAX_BLOCK_D) -> tuple:
    return (x_shape[0], cdiv(x_shape[2], block_d))


grid = launch_grid  # the name the kernel modules share (`grid` is also this op's attribute)


def constexprs(n: int, d: int, cells: int) -> dict:
    """Block sizes for at most `n` tokens of `d` features and `cells` cells (concrete ints)."""
    block_n = block(n, MAX_BLOCK_N)
    return {"BLOCK_I": block_n, "BLOCK_J": block_n, "BLOCK_C": block(cells, MAX_BLOCK_C),
            "BLOCK_T": min(block_n, BLOCK_T), "BLOCK_D": block(d, MAX_BLOCK_D)}


def run(x: torch.Tensor, score: torch.Tensor, position: torch.Tensor, *, out=None, **attrs):
    """x [B, N, D], score [B, N], position [B, N] int64 -> (y [B, M, D], kept_index [B, M]
    int64), M = protect + k + grid² + (N - end), matching `trimrt.plugins.token_recycle.reference`.
    `attrs`: keep, protect, span_end, keep_ratio, grid, patch_rows, patch_cols, first_patch."""
    if x.dim() != 3 or not x.shape[:2] == score.shape == position.shape:
        raise ValueError(f"TokenRecycle: need x [B, N, D], score and position [B, N], got "
                         f"{tuple(x.shape)}, {tuple(score.shape)}, {tuple(position.shape)}")
    b, n, d = x.shape
    check_attributes(n, attrs)
    x, score, position = x.contiguous(), score.contiguous(), position.to(torch.int64).contiguous()
    m = out_tokens(n, attrs)
    outs = output_buffers(NAME, out, x.device, ((b, m, d), x.dtype), ((b, m), torch.int64))
    if b == 0:
        return outs
    if d == 0:
        return without_features(run, x, score, position, outs=outs, **attrs)
    blocks = constexprs(n, d, attrs["grid"] ** 2)
    token_recycle_kernel[launch_grid(x.shape, block_d=blocks["BLOCK_D"])](
        x, score, position, *scalar_args(x.shape, score.shape, position.shape, **attrs), *outs, **blocks)
    return outs


def compile_kernel(dtypes: dict[str, str], *, n: int, d: int, cells: int, target=None):
    """Compile for at most `n` tokens of `d` features, `cells` cells; `dtypes`: "x", "score", "y" (the rest int64)."""
    return aot_compile(token_recycle_kernel, {"x_ptr": dtypes["x"], "s_ptr": dtypes["score"], "pos_ptr": "i64",
                                              "y_ptr": dtypes["y"], "idx_ptr": "i64"}, constexprs(n, d, cells), target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """[B, M, D] and [B, M], M = protect + k + grid² + (N - end); with keep == 0, k is
    TokenPrune's keep_ratio rule on the run-time span, as an exact shape expression."""
    b, n, d = shapes["x"][0], shapes["x"][1], shapes["x"][2]
    check_attributes(n, attrs, sym=trtp)
    m = out_tokens(n, attrs, trtp)
    return [(b, m, d), (b, m)]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX, with its grid and int32 scalars."""
    n, d, cells = largest(inputs["x"], 1), largest(inputs["x"], 2), attrs["grid"] ** 2
    kernel = compile_kernel(triton_types(inputs, outputs), n=n, d=d, cells=cells)
    return launch(trtp, kernel, inputs, launch_grid, scalar_args, attrs, block_d=constexprs(n, d, cells)["BLOCK_D"])
