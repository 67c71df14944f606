"""Triton kernel of TokenPrune: select, gather and fuse in one launch.

Grid (B, cdiv(D, BLOCK_D)). The prunable span is [protect, end) (end = span_end, or N);
k of its tokens are kept (`Span.kept`: the static `keep`, or the `keep_ratio` rule on
the run-time span length, computed on the host — or as a TensorRT shape expression —
and passed in as a scalar). Each program walks the N tokens of its batch row in chunks
of BLOCK_I and, per chunk:

1. select: rank_i = #{span j : s_j > s_i, or s_j == s_i and j < i} (a BLOCK_I x BLOCK_J
   comparison, looped over the span), so token i is kept iff it is outside the span
   (i < protect or i >= end) or inside with rank_i < k — exactly the stable descending
   sort of the reference, ties to the lower index;
2. its output slot is the number of kept tokens before it (running count plus an
   exclusive `tl.cumsum`), which keeps the original order (prefix, chosen, suffix);
   the program of the first feature block writes kept_index;
3. gather: the kept rows' features of this block are stored at their slots in y;
4. fuse: the dropped span rows, weighted by their scores, are summed into `fused`.

Selection is recomputed by every feature block (O(N²) comparisons, cheap next to
the copy for N up to a few thousand) so that everything is one kernel: the TensorRT
AOT path launches exactly one kernel per plugin. No sort or top-k is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..span import Span
from ._launch import aot_compile, block, largest, launch, load_tile, output_buffers, store_tile, triton_types, without_features

MAX_BLOCK_N = 64
MAX_BLOCK_D = 64


@triton.jit
def span_rank(s_row_ptr, s_i, i, protect, end, BLOCK_J: tl.constexpr):
    """#{span j : s_j > s_i, or s_j == s_i and j < i}: the stable descending rank of i."""
    rank = tl.zeros(s_i.shape, dtype=tl.int32)
    for j0 in range(protect, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_valid = j < end
        s_j = tl.load(s_row_ptr + j, mask=j_valid, other=0.0)
        beats = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((beats & j_valid[None, :]).to(tl.int32), axis=1)
    return rank


@triton.jit
def token_prune_kernel(x_ptr, s_ptr, N, D, keep, protect, end, y_ptr, idx_ptr, fused_ptr,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    m = protect + keep + (N - end)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    fused = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_before = tl.sum(tl.zeros([BLOCK_I], dtype=tl.int32), axis=0)  # kept tokens in earlier chunks
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_valid = i < N
        s_i = tl.load(s_ptr + b * N + i, mask=i_valid, other=0.0)
        # 1. rank among the span's tokens
        rank = span_rank(s_ptr + b * N, s_i, i, protect, end, BLOCK_J)
        in_span = i_valid & (i >= protect) & (i < end)
        kept = (i_valid & ((i < protect) | (i >= end))) | (in_span & (rank < keep))
        # 2. output slots in original order
        kept_i32 = kept.to(tl.int32)
        slot = n_before + tl.cumsum(kept_i32, axis=0) - kept_i32
        n_before += tl.sum(kept_i32, axis=0)
        first_block = (tl.zeros([BLOCK_I], dtype=tl.int32) + pid_d) == 0
        tl.store(idx_ptr + b * m + slot, i.to(tl.int64), mask=kept & first_block)
        # 3. gather the kept rows
        rows = load_tile(x_ptr, b * N + i, i_valid, d, d_mask, D)
        store_tile(y_ptr, b * m + slot, kept, d, d_mask, D, rows)
        # 4. fuse the dropped span rows
        w = tl.where(in_span & (rank >= keep), s_i.to(tl.float32), 0.0)
        fused += tl.sum(w[:, None] * rows.to(tl.float32), axis=0)
    tl.store(fused_ptr + b * D + d, fused.to(fused_ptr.dtype.element_ty), mask=d_mask)


# ------------------------------------------------- launch (ints or shape expressions)


def scalar_args(x_shape, score_shape, *, sym=None, **attrs) -> list:
    """The int32 kernel arguments (in the kernel's order; keep: the kept span count k) from the input shapes (ints or shape exprs)."""
    span, n = Span.of(attrs), x_shape[1]
    return [n, x_shape[2], span.kept(n, sym), span.protect, span.end(n)]


def grid(x_shape, score_shape, cdiv=triton.cdiv, block_d: int = MAX_BLOCK_D) -> tuple:
    return (x_shape[0], cdiv(x_shape[2], block_d))


def constexprs(n: int, d: int) -> dict:
    """Block sizes for at most `n` tokens of `d` features (concrete ints)."""
    block_n = block(n, MAX_BLOCK_N)
    return {"BLOCK_I": block_n, "BLOCK_J": block_n, "BLOCK_D": block(d, MAX_BLOCK_D)}


def run(x: torch.Tensor, score: torch.Tensor, *, keep: int, protect: int, span_end: int, keep_ratio: float, out=None):
    """x [B, N, D], score [B, N] -> (y [B, M, D], kept_index [B, M] int64, fused [B, 1, D]),
    M = protect + k + (N - end), matching `trimrt.plugins.token_prune.reference`."""
    if x.dim() != 3 or score.dim() != 2 or tuple(score.shape) != tuple(x.shape[:2]):
        raise ValueError(f"TokenPrune: need x [B, N, D] and score [B, N], got {tuple(x.shape)}, {tuple(score.shape)}")
    b, n, d = x.shape
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=keep_ratio)
    Span.of(attrs).check(n, "TokenPrune")
    x, score = x.contiguous(), score.contiguous()
    m = Span.of(attrs).out_tokens(n)
    outs = output_buffers("TokenPrune", out, x.device, ((b, m, d), x.dtype), ((b, m), torch.int64), ((b, 1, d), x.dtype))
    if b == 0:
        return outs
    if d == 0:
        return without_features(run, x, score, outs=outs, **attrs)
    blocks = constexprs(n, d)
    token_prune_kernel[grid(x.shape, score.shape, block_d=blocks["BLOCK_D"])](
        x, score, *scalar_args(x.shape, score.shape, **attrs), *outs, **blocks)
    return outs


def compile_kernel(dtypes: dict[str, str], *, n: int, d: int, target=None):
    """Compile for at most `n` tokens of `d` features; `dtypes`: "x", "score", "y", "fused" (kept_index: int64)."""
    return aot_compile(token_prune_kernel, {"x_ptr": dtypes["x"], "s_ptr": dtypes["score"], "y_ptr": dtypes["y"],
                                            "idx_ptr": "i64", "fused_ptr": dtypes["fused"]}, constexprs(n, d), target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """[B, M, D], [B, M], [B, 1, D] with M = protect + k + (N - end). With keep == 0, k is
    max(1, min(span, ceil(keep_ratio · span - 1e-9))) of the run-time span, expressed
    exactly in integer shape arithmetic (keep_ratio = a / q, a float32 is dyadic)."""
    b, n, d = shapes["x"][0], shapes["x"][1], shapes["x"][2]
    span = Span.of(attrs)
    span.check(n, "TokenPrune", sym=trtp)
    m = span.out_tokens(n, trtp)
    return [(b, m, d), (b, m), (b, 1, d)]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX, with its grid and int32 scalars."""
    n, d = largest(inputs["x"], 1), largest(inputs["x"], 2)
    kernel = compile_kernel(triton_types(inputs, outputs), n=n, d=d)
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs, block_d=constexprs(n, d)["BLOCK_D"])
