"""Triton kernel of TokenPrune: select, gather and fuse in one launch.

Grid (B, cdiv(D, BLOCK_D)). Each program walks the N tokens of its batch row in
chunks of BLOCK_I and, per chunk:

1. select: rank_i = #{prunable j : s_j > s_i, or s_j == s_i and j < i} (a
   BLOCK_I x BLOCK_J comparison, looped over j), so token i is kept iff it is protected
   (i < protect) or prunable with rank_i < keep — exactly the stable descending sort of
   the reference, ties to the lower index;
2. its output slot is the number of kept tokens before it (running count plus an
   exclusive `tl.cumsum`), which keeps the original order; the program of the first
   feature block writes kept_index;
3. gather: the kept rows' features of this block are stored at their slots in y;
4. fuse: the dropped prunable rows, weighted by their scores, are summed into `fused`.

Selection is recomputed by every feature block (O(N²) comparisons, cheap next to
the copy for N up to a few thousand) so that everything is one kernel: the TensorRT
AOT path launches exactly one kernel per plugin. No sort or top-k is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: kernel parameters in launch order: input pointers, int32 scalars, output pointers
POINTERS_IN = ("x_ptr", "s_ptr")
SCALARS = ("N", "D", "keep", "protect")
POINTERS_OUT = ("y_ptr", "idx_ptr", "fused_ptr")
MAX_BLOCK_N = 64
MAX_BLOCK_D = 64


@triton.jit
def token_prune_kernel(x_ptr, s_ptr, N, D, keep, protect, y_ptr, idx_ptr, fused_ptr,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    m = protect + keep
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    fused = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_before = tl.sum(tl.zeros([BLOCK_I], dtype=tl.int32), axis=0)  # kept tokens in earlier chunks
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_valid = i < N
        s_i = tl.load(s_ptr + b * N + i, mask=i_valid, other=0.0)
        # 1. rank among the prunable tokens
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(protect, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_valid = j < N
            s_j = tl.load(s_ptr + b * N + j, mask=j_valid, other=0.0)
            beats = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((beats & j_valid[None, :]).to(tl.int32), axis=1)
        prunable = i_valid & (i >= protect)
        kept = (i_valid & (i < protect)) | (prunable & (rank < keep))
        # 2. output slots in original order
        kept_i32 = kept.to(tl.int32)
        slot = n_before + tl.cumsum(kept_i32, axis=0) - kept_i32
        n_before += tl.sum(kept_i32, axis=0)
        first_block = (tl.zeros([BLOCK_I], dtype=tl.int32) + pid_d) == 0
        tl.store(idx_ptr + b * m + slot, i.to(tl.int64), mask=kept & first_block)
        # 3. gather the kept rows
        rows = tl.load(x_ptr + (b * N + i)[:, None] * D + d[None, :],
                       mask=i_valid[:, None] & d_mask[None, :], other=0.0)
        tl.store(y_ptr + (b * m + slot)[:, None] * D + d[None, :], rows, mask=kept[:, None] & d_mask[None, :])
        # 4. fuse the dropped rows
        w = tl.where(prunable & (rank >= keep), s_i.to(tl.float32), 0.0)
        fused += tl.sum(w[:, None] * rows.to(tl.float32), axis=0)
    tl.store(fused_ptr + b * D + d, fused.to(fused_ptr.dtype.element_ty), mask=d_mask)


def scalar_args(x_shape, score_shape, *, keep: int, protect: int) -> list:
    """The int32 kernel arguments (SCALARS order) from the input shapes."""
    return [x_shape[1], x_shape[2], keep, protect]


def grid(x_shape, score_shape, cdiv=triton.cdiv, block_d: int = MAX_BLOCK_D) -> tuple:
    return (x_shape[0], cdiv(x_shape[2], block_d))


def constexprs(n: int, d: int) -> dict:
    """Block sizes for at most `n` tokens of `d` features (concrete ints)."""
    block_n = min(triton.next_power_of_2(max(int(n), 1)), MAX_BLOCK_N)
    return {"BLOCK_I": block_n, "BLOCK_J": block_n,
            "BLOCK_D": min(triton.next_power_of_2(max(int(d), 1)), MAX_BLOCK_D)}


def run(x: torch.Tensor, score: torch.Tensor, *, keep: int, protect: int, out=None):
    """x [B, N, D], score [B, N] -> (y [B, protect + keep, D], kept_index [B, protect + keep] int64,
    fused [B, 1, D]), matching `trimrt.plugins.token_prune.reference`."""
    if x.dim() != 3 or score.dim() != 2 or tuple(score.shape) != tuple(x.shape[:2]):
        raise ValueError(f"TokenPrune: need x [B, N, D] and score [B, N], got {tuple(x.shape)}, {tuple(score.shape)}")
    b, n, d = x.shape
    if not 1 <= keep <= n - protect or protect < 0:
        raise ValueError(f"keep={keep} must be in [1, {n - protect}] for {n} tokens, protect={protect}")
    x, score = x.contiguous(), score.contiguous()
    m = protect + keep
    if out is not None:
        y, kept_index, fused = out
    else:
        y = torch.empty((b, m, d), dtype=x.dtype, device=x.device)
        kept_index = torch.empty((b, m), dtype=torch.int64, device=x.device)
        fused = torch.empty((b, 1, d), dtype=x.dtype, device=x.device)
    if b == 0:
        return y, kept_index, fused
    if d == 0:  # no feature block would write kept_index
        kept_index.copy_(_select_without_features(score, keep, protect))
        return y, kept_index, fused
    blocks = constexprs(n, d)
    token_prune_kernel[grid(x.shape, score.shape, block_d=blocks["BLOCK_D"])](
        x, score, *scalar_args(x.shape, score.shape, keep=keep, protect=protect),
        y, kept_index, fused, **blocks)
    return y, kept_index, fused


def _select_without_features(score, keep, protect):
    x = torch.zeros((*score.shape, 1), dtype=score.dtype, device=score.device)
    return run(x, score, keep=keep, protect=protect)[1]


def compile_kernel(dtypes: dict[str, str], *, n: int, d: int, target=None):
    """Compile for `target` (default: the current GPU).

    `dtypes` maps "x", "score", "y", "fused" to Triton type names ("fp32", "fp16",
    "bf16"); kept_index is always int64. Returns the `triton.compiler.CompiledKernel`.
    """
    signature = {"x_ptr": f"*{dtypes['x']}", "s_ptr": f"*{dtypes['score']}"}
    signature.update({name: "i32" for name in SCALARS})
    signature.update({"y_ptr": f"*{dtypes['y']}", "idx_ptr": "*i64", "fused_ptr": f"*{dtypes['fused']}"})
    consts = constexprs(n, d)
    signature.update({name: "constexpr" for name in consts})
    src = triton.compiler.ASTSource(fn=token_prune_kernel, signature=signature, constexprs=consts)
    return triton.compile(src, target=target)
