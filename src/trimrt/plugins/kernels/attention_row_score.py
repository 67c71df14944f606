"""Triton kernel of AttentionRowScore: head-mean softmax of one query row against all keys.

One program per batch row loops over the heads; per head it computes the logits
q[b, h, row, :] · k_t[b, h, :, :] in chunks of BLOCK_DH features (all N keys at once,
N padded to a power of two and masked), takes the softmax over the keys in float32 and
accumulates it; the mean over heads is written to score[b, :].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: kernel parameters in launch order: input pointers, int32 scalars, float scalar, output pointer
POINTERS_IN = ("q_ptr", "kt_ptr")
SCALARS = ("H", "Nq", "Dh", "N", "row")
POINTERS_OUT = ("out_ptr",)
MAX_BLOCK_DH = 32


@triton.jit
def attention_row_score_kernel(q_ptr, kt_ptr, H, Nq, Dh, N, row, scale, out_ptr,
                               BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(0, H):
        bh = b * H + h
        q_row = q_ptr + (bh * Nq + row) * Dh
        k_base = kt_ptr + bh * Dh * N
        logits = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, Dh, BLOCK_DH):
            d = d0 + tl.arange(0, BLOCK_DH)
            d_mask = d < Dh
            qv = tl.load(q_row + d, mask=d_mask, other=0.0).to(tl.float32)
            kv = tl.load(k_base + d[:, None] * N + n[None, :],
                         mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            logits += tl.sum(qv[:, None] * kv, axis=0)
        logits = tl.where(n_mask, logits * scale, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        acc += p / tl.sum(p, axis=0)
    tl.store(out_ptr + b * N + n, (acc / H).to(out_ptr.dtype.element_ty), mask=n_mask)


def _row_index(row: int, nq):
    """Non-negative query row; `nq` may be an int or a symbolic shape expression."""
    return row if row >= 0 else nq + row


def scalar_args(q_shape, k_t_shape, *, row: int) -> list:
    """The int32 kernel arguments (SCALARS order) from the input shapes."""
    _, h, nq, dh = q_shape
    return [h, nq, dh, k_t_shape[3], _row_index(row, nq)]


def grid(q_shape, k_t_shape, cdiv=triton.cdiv) -> tuple:
    return (q_shape[0],)


def constexprs(n: int, dh: int) -> dict:
    """Block sizes for at most `n` keys of `dh` features (concrete ints)."""
    return {"BLOCK_N": triton.next_power_of_2(max(int(n), 1)),
            "BLOCK_DH": min(triton.next_power_of_2(max(int(dh), 1)), MAX_BLOCK_DH)}


def run(q: torch.Tensor, k_t: torch.Tensor, *, row: int, scale: float, out=None):
    """q [B, H, Nq, Dh], k_t [B, H, Dh, N] -> (score [B, N],) on q's device and dtype."""
    if q.dim() != 4 or k_t.dim() != 4:
        raise ValueError(f"AttentionRowScore: q and k_t must be 4-D, got {tuple(q.shape)}, {tuple(k_t.shape)}")
    b, h, nq, dh = q.shape
    n = k_t.shape[3]
    if tuple(k_t.shape[:3]) != (b, h, dh):
        raise ValueError(f"AttentionRowScore: k_t {tuple(k_t.shape)} does not match q {tuple(q.shape)}")
    if not -nq <= row < nq:
        raise ValueError(f"AttentionRowScore: row={row} out of range for {nq} query rows")
    q, k_t = q.contiguous(), k_t.contiguous()
    score = out[0] if out is not None else torch.empty((b, n), dtype=q.dtype, device=q.device)
    if b == 0 or n == 0:
        return (score,)
    attention_row_score_kernel[grid(q.shape, k_t.shape)](
        q, k_t, *scalar_args(q.shape, k_t.shape, row=row), float(scale), score, **constexprs(n, dh))
    return (score,)


def compile_kernel(dtypes: dict[str, str], *, n: int, dh: int, scale: float, target=None):
    """Compile for `target` (default: the current GPU) with `scale` baked in as a constant.

    `dtypes` maps "q", "k_t", "score" to Triton type names ("fp32", "fp16", "bf16").
    Returns the `triton.compiler.CompiledKernel` (name, PTX in `.asm["ptx"]`, metadata).
    The launch then passes the pointers and `scalar_args` in order, without `scale`.
    """
    signature = {"q_ptr": f"*{dtypes['q']}", "kt_ptr": f"*{dtypes['k_t']}"}
    signature.update({name: "i32" for name in SCALARS})
    signature["scale"] = "constexpr"
    signature["out_ptr"] = f"*{dtypes['score']}"
    consts = {"scale": float(scale), **constexprs(n, dh)}
    signature.update({name: "constexpr" for name in constexprs(n, dh)})
    src = triton.compiler.ASTSource(fn=attention_row_score_kernel, signature=signature, constexprs=consts)
    return triton.compile(src, target=target)
