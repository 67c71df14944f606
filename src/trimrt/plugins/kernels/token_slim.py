"""Triton kernel of TokenSlim: softmax over the tokens and the weighted token sum, fused.

`run` works in two steps:

1. the MLP logits [B, N, M] = scale · (GELU(LN(x) @ w1 + b1) @ w2 + b2) with torch ops
   (LayerNorm and two GEMMs: cuBLAS does these well, and a hand-written GEMM here
   would add nothing but risk);
2. `token_slim_mix_kernel`, grid (B, M, cdiv(D, BLOCK_D)): each program takes one output
   token m of one image, computes the softmax over the N tokens of logits[b, :, m]
   (a first loop over N chunks for the running max and normaliser, online, in
   float32), then a second loop accumulates Σ_n p_n · x[b, n, d] for its feature
   block. Neither the [B, M, N] weights nor the transposed logits are ever stored.

Because step 1 is not a Triton kernel, the TensorRT AOT path (one Triton kernel per
plugin, no Python at run time) is unavailable: `trt_aot` raises
BackendUnavailableError and TensorRT builds use the JIT `impl` (which calls `run`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import BackendUnavailableError
from ._launch import aot_compile, block, load_tile, output_buffers

MAX_BLOCK_N = 64
MAX_BLOCK_D = 64


@triton.jit
def token_slim_mix_kernel(logits_ptr, x_ptr, N, M, D, y_ptr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    pid_d = tl.program_id(2)
    column = logits_ptr + b * N * M + m  # logits[b, :, m], stride M
    # 1. softmax statistics over the N tokens (online max and normaliser)
    run_max = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    run_sum = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        l = tl.load(column + n * M, mask=n < N, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(l, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(l - new_max), axis=0)
        run_max = new_max
    # 2. y[b, m, d] = Σ_n softmax_n · x[b, n, d] for this feature block
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        l = tl.load(column + n * M, mask=n_mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(l - run_max) / run_sum
        rows = load_tile(x_ptr, b * N + n, n_mask, d, d_mask, D).to(tl.float32)
        acc += tl.sum(p[:, None] * rows, axis=0)
    tl.store(y_ptr + (b * M + m) * D + d, acc.to(y_ptr.dtype.element_ty), mask=d_mask)


def scalar_args(x_shape, w2_shape) -> list:
    """The int32 kernel arguments (in the kernel's order): ints or TensorRT shape expressions."""
    return [x_shape[1], w2_shape[1], x_shape[2]]


def grid(x_shape, w2_shape, cdiv=triton.cdiv, block_d: int = MAX_BLOCK_D) -> tuple:
    return (x_shape[0], w2_shape[1], cdiv(x_shape[2], block_d))


def constexprs(n: int, d: int) -> dict:
    """Block sizes for at most `n` tokens of `d` features (concrete ints)."""
    return {"BLOCK_N": block(n, MAX_BLOCK_N), "BLOCK_D": block(d, MAX_BLOCK_D)}


def check_shapes(x_shape, ln_scale_shape, ln_bias_shape, w1_shape, b1_shape, w2_shape, b2_shape) -> None:
    """Raise ValueError unless the (concrete) shapes fit the op's schema."""
    if len(x_shape) != 3:
        raise ValueError(f"TokenSlim: x must be [B, N, D], got {tuple(x_shape)}")
    _, n, d = x_shape
    if len(w1_shape) != 2 or len(w2_shape) != 2:
        raise ValueError(f"TokenSlim: w1 and w2 must be matrices, got {tuple(w1_shape)}, {tuple(w2_shape)}")
    hd, m = w1_shape[1], w2_shape[1]
    want = {"ln_scale": (d,), "ln_bias": (d,), "w1": (d, hd), "b1": (hd,), "w2": (hd, m), "b2": (m,)}
    got = dict(zip(want, (ln_scale_shape, ln_bias_shape, w1_shape, b1_shape, w2_shape, b2_shape)))
    bad = {k: tuple(v) for k, v in got.items() if tuple(v) != want[k]}
    if bad:
        raise ValueError(f"TokenSlim: for x {tuple(x_shape)} and {m} output tokens, {bad} should be "
                         f"{ {k: want[k] for k in bad} }")
    if n == 0:
        raise ValueError("TokenSlim: a softmax over zero tokens is undefined")


def mlp_logits(x, ln_scale, ln_bias, w1, b1, w2, b2, *, epsilon: float, scale: float) -> torch.Tensor:
    """scale · (GELU_erf(LN(x) @ w1 + b1) @ w2 + b2), [B, N, M], computed in float32."""
    f = torch.float32
    normed = torch.nn.functional.layer_norm(x.to(f), (x.shape[2],), ln_scale.to(f), ln_bias.to(f), eps=epsilon)
    hidden = torch.nn.functional.gelu(normed @ w1.to(f) + b1.to(f), approximate="none")
    return ((hidden @ w2.to(f) + b2.to(f)) * scale).contiguous()


def run(x: torch.Tensor, ln_scale, ln_bias, w1, b1, w2, b2, *, epsilon: float, scale: float, out=None):
    """x [B, N, D] and the TSM weights -> (y [B, M, D],), matching
    `trimrt.plugins.token_slim.reference`: logits by torch, softmax + mixing by Triton."""
    tensors = (x, ln_scale, ln_bias, w1, b1, w2, b2)
    check_shapes(*(tuple(t.shape) for t in tensors))
    b, n, d = x.shape
    m = w2.shape[1]
    (y,) = output_buffers("TokenSlim", out, x.device, ((b, m, d), x.dtype))
    if b == 0 or m == 0 or d == 0:
        return (y,)
    x = x.contiguous()
    logits = mlp_logits(*tensors, epsilon=epsilon, scale=scale)
    blocks = constexprs(n, d)
    token_slim_mix_kernel[grid(x.shape, w2.shape, block_d=blocks["BLOCK_D"])](
        logits, x, *scalar_args(x.shape, w2.shape), y, **blocks)
    return (y,)


def compile_kernel(dtypes: dict[str, str], *, n: int, d: int, target=None):
    """Compile the mixing kernel for `target` (default: the current GPU). `dtypes` maps
    "x" and "y" to Triton type names; the logits are float32."""
    return aot_compile(token_slim_mix_kernel, {"logits_ptr": "fp32", "x_ptr": dtypes["x"], "y_ptr": dtypes["y"]},
                       constexprs(n, d), target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """y [B, M, D]: M from w2's columns (shape expressions or ints)."""
    x, w2 = shapes["x"], shapes["w2"]
    return [(x[0], w2[1], x[2])]


def trt_aot(trtp, inputs, attrs, outputs):
    """Unavailable: the MLP logits run as torch ops before the Triton kernel, and an AOT
    plugin launches exactly one Triton kernel (use the JIT impl)."""
    raise BackendUnavailableError(
        "TokenSlim has no TensorRT AOT implementation: its MLP logits are computed by torch before the "
        "Triton softmax-mixing kernel, and an AOT plugin launches a single kernel; build without aot=1 (JIT impl)")
