"""Triton kernel of AttentionRowScore: head-mean softmax of one query row against all keys.

One program per batch row loops over the heads; per head it computes the logits
q[b, h, row, :] · k_t[b, h, :, :] in chunks of BLOCK_DH features (all N keys at once,
N padded to a power of two and masked), scales them, adds the mask's row (before the
max-subtraction, so a float32-min mask stays finite), takes the softmax over the keys in
float32 and accumulates it; the mean over heads is written to score[b, :].

The mask is rank 4 and broadcastable to [B, H, Nq, N]: the kernel reads it (made
contiguous) through element strides that are 0 along its size-1 dimensions, and at
its row `row`, or row 0 when it has a single query row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..span import times
from ._launch import aot_compile, block, largest, launch, load_tile, one_program_per_sample, output_buffers, triton_types

MAX_BLOCK_DH = 32


@triton.jit
def attention_row_score_kernel(q_ptr, kt_ptr, mask_ptr, H, Nq, Dh, N, row,
                               mask_sb, mask_sh, mask_sn, mask_row_offset, scale, out_ptr,
                               BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    mask_b = mask_ptr + b * mask_sb + mask_row_offset
    for h in range(0, H):
        bh = b * H + h
        q_row = q_ptr + (bh * Nq + row) * Dh
        k_base = kt_ptr + bh * Dh * N
        logits = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, Dh, BLOCK_DH):
            d = d0 + tl.arange(0, BLOCK_DH)
            d_mask = d < Dh
            qv = tl.load(q_row + d, mask=d_mask, other=0.0).to(tl.float32)
            kv = load_tile(k_base, d, d_mask, n, n_mask, N).to(tl.float32)
            logits += tl.sum(qv[:, None] * kv, axis=0)
        m = tl.load(mask_b + h * mask_sh + n * mask_sn, mask=n_mask, other=0.0).to(tl.float32)
        logits = tl.where(n_mask, logits * scale + m, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        acc += p / tl.sum(p, axis=0)
    tl.store(out_ptr + b * N + n, (acc / H).to(out_ptr.dtype.element_ty), mask=n_mask)


def _not_one(dim, sym):
    """1 if dim != 1 else 0, for dims >= 1: an int, or a TensorRT shape expression (`sym`
    is then `tensorrt.plugin`, or anything with its `min`)."""
    if isinstance(dim, int):
        return int(dim != 1)
    return sym.min(dim - 1, 1)


def scalar_args(q_shape, k_t_shape, mask_shape, *, row: int, sym=None, **_) -> list:
    """The int32 kernel arguments (in the kernel's order) from the input shapes.

    Works on ints and on TensorRT shape expressions (`sym` = `tensorrt.plugin` then).
    The mask is taken as contiguous: its element strides, zeroed along broadcast
    (size-1) dimensions, and the offset of the row the op reads."""
    _, h, nq, dh = q_shape
    mb, mh, mq, mn = mask_shape
    row_index = row if row >= 0 else nq + row  # nq: an int or a shape expression
    s_h = times(mq, mn)  # a head of the mask (a row is mn elements)
    s_b = times(mh, s_h)
    row_offset = times(times(row_index, _not_one(mq, sym)), mn)  # row 0 of a one-row mask
    return [h, nq, dh, k_t_shape[3], row_index,
            times(s_b, _not_one(mb, sym)), times(s_h, _not_one(mh, sym)), _not_one(mn, sym), row_offset]


grid = one_program_per_sample


def constexprs(n: int, dh: int) -> dict:
    """Block sizes for at most `n` keys of `dh` features (concrete ints)."""
    return {"BLOCK_N": block(n), "BLOCK_DH": block(dh, MAX_BLOCK_DH)}


def check_shapes(q_shape, k_t_shape, mask_shape, row: int) -> None:
    """Raise ValueError unless the (concrete) shapes and `row` fit the op's schema."""
    if len(q_shape) != 4 or len(k_t_shape) != 4:
        raise ValueError(f"AttentionRowScore: q and k_t must be 4-D, got {tuple(q_shape)}, {tuple(k_t_shape)}")
    b, h, nq, dh = q_shape
    n = k_t_shape[3]
    if tuple(k_t_shape[:3]) != (b, h, dh):
        raise ValueError(f"AttentionRowScore: k_t {tuple(k_t_shape)} does not match q {tuple(q_shape)}")
    if not -nq <= row < nq:
        raise ValueError(f"AttentionRowScore: row={row} out of range for {nq} query rows")
    if len(mask_shape) != 4 or any(m not in (1, full) for m, full in zip(mask_shape, (b, h, nq, n))):
        raise ValueError(f"AttentionRowScore: mask {tuple(mask_shape)} is not rank 4 and broadcastable "
                         f"to {(b, h, nq, n)}")


def run(q: torch.Tensor, k_t: torch.Tensor, mask: torch.Tensor, *, row: int, scale: float, out=None):
    """q [B, H, Nq, Dh], k_t [B, H, Dh, N], mask broadcastable to [B, H, Nq, N]
    -> (score [B, N],) on q's device and dtype."""
    check_shapes(tuple(q.shape), tuple(k_t.shape), tuple(mask.shape), row)
    b, dh, n = q.shape[0], q.shape[3], k_t.shape[3]
    q, k_t, mask = q.contiguous(), k_t.contiguous(), mask.contiguous()
    (score,) = output_buffers("AttentionRowScore", out, q.device, ((b, n), q.dtype))
    if b == 0 or n == 0:
        return (score,)
    attention_row_score_kernel[grid(q.shape, k_t.shape, mask.shape)](
        q, k_t, mask, *scalar_args(q.shape, k_t.shape, mask.shape, row=row), float(scale), score, **constexprs(n, dh))
    return (score,)


def compile_kernel(dtypes: dict[str, str], *, n: int, dh: int, scale: float, target=None):
    """Compile for at most `n` keys of `dh` features, `scale` baked in; `dtypes`: "q", "k_t", "mask" (default: q's), "score"."""
    return aot_compile(attention_row_score_kernel, {"q_ptr": dtypes["q"], "kt_ptr": dtypes["k_t"],
                       "mask_ptr": dtypes.get("mask", dtypes["q"]), "out_ptr": dtypes["score"]},
                       {"scale": float(scale), **constexprs(n, dh)}, target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """score [B, N] (shape expressions or ints)."""
    return [(shapes["q"][0], shapes["k_t"][3])]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX, with its grid and int32 scalars."""
    kernel = compile_kernel(triton_types(inputs, outputs), n=largest(inputs["k_t"], 3), dh=largest(inputs["q"], 3),
                            scale=attrs["scale"])
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs)
