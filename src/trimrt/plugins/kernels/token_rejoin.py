"""Triton kernel of TokenRejoin: copy x, then write the routed rows of y at their positions.

Grid (B, cdiv(D, BLOCK_D)). Each program owns one batch row and one block of features:
it copies its N rows of x to the output in chunks of BLOCK_I, then stores the M rows of
y at `index`. The same program does both in that order, so no other program writes its
cells and no synchronisation is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import aot_compile, block, largest, launch, load_tile, output_buffers, store_tile, triton_types

MAX_BLOCK_N = 64
MAX_BLOCK_D = 64


@triton.jit
def token_rejoin_kernel(x_ptr, y_ptr, idx_ptr, N, M, D, out_ptr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        valid = i < N
        store_tile(out_ptr, b * N + i, valid, d, d_mask, D, load_tile(x_ptr, b * N + i, valid, d, d_mask, D))
    for m0 in range(0, M, BLOCK_I):
        m = m0 + tl.arange(0, BLOCK_I)
        valid = m < M
        slot = tl.load(idx_ptr + b * M + m, mask=valid, other=0)
        store_tile(out_ptr, b * N + slot, valid, d, d_mask, D, load_tile(y_ptr, b * M + m, valid, d, d_mask, D))


# ------------------------------------------------- launch (ints or shape expressions)


def scalar_args(x_shape, y_shape, index_shape, *, sym=None) -> list:
    """The int32 kernel arguments N, M, D (ints or shape expressions)."""
    return [x_shape[1], y_shape[1], x_shape[2]]


def grid(x_shape, y_shape, index_shape, cdiv=triton.cdiv, block_d: int = MAX_BLOCK_D) -> tuple:
    return (x_shape[0], cdiv(x_shape[2], block_d))


def constexprs(n: int, d: int) -> dict:
    """Block sizes for at most `n` tokens of `d` features (concrete ints)."""
    return {"BLOCK_I": block(n, MAX_BLOCK_N), "BLOCK_D": block(d, MAX_BLOCK_D)}


def run(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, *, out=None):
    """x [B, N, D], y [B, M, D], index [B, M] -> (out [B, N, D],), matching
    `trimrt.plugins.token_rejoin.reference` (each index once per row)."""
    if x.dim() != 3 or y.dim() != 3 or tuple(index.shape) != tuple(y.shape[:2]) or x.shape[0] != y.shape[0] \
            or x.shape[2] != y.shape[2]:
        raise ValueError(f"TokenRejoin: need x [B, N, D], y [B, M, D] and index [B, M], got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(index.shape)}")
    b, n, d = x.shape
    x, y, index = x.contiguous(), y.contiguous(), index.contiguous()
    outs = output_buffers("TokenRejoin", out, x.device, ((b, n, d), x.dtype))
    if outs[0].numel() == 0:
        return outs
    blocks = constexprs(max(n, y.shape[1]), d)
    token_rejoin_kernel[grid(x.shape, y.shape, index.shape, block_d=blocks["BLOCK_D"])](
        x, y, index, *scalar_args(x.shape, y.shape, index.shape), *outs, **blocks)
    return outs


def compile_kernel(dtypes: dict[str, str], *, n: int, d: int, target=None):
    """Compile for at most `n` tokens of `d` features; `dtypes`: "x", "y", "out" (index: int64)."""
    return aot_compile(token_rejoin_kernel, {"x_ptr": dtypes["x"], "y_ptr": dtypes["y"], "idx_ptr": "i64",
                                             "out_ptr": dtypes["out"]}, constexprs(n, d), target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """out has the shape of x."""
    return [tuple(shapes["x"])]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX, with its grid and int32 scalars."""
    n, d = largest(inputs["x"], 1), largest(inputs["x"], 2)
    kernel = compile_kernel(triton_types(inputs, outputs), n=n, d=d)
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs, block_d=constexprs(n, d)["BLOCK_D"])
