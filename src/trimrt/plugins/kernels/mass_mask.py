"""Triton kernel of MassMask: the needed top set of a span, as a mask over kept tokens.

One program per sample (grid (B,)), three passes over its scores, all without a sort:

1. total = Σ of the span's scores, in float64;
2. for each span token i, its cumulative mass in the stable descending order,
   cum_i = s_i + Σ{s_j : j beats i} (j beats i: s_j > s_i, or s_j == s_i and j < i;
   BLOCK_I x BLOCK_J comparisons, float64), and c = min(span, 1 + #{i : cum_i / total <
   tau - 2^-20}), or span when total == 0; count[b] = c;
3. for each kept token t (kept_index[b, t]): valid = 1 if it is outside the span, else
   1 iff its rank #{j beats it} < c.

The float64 sums add the same numbers as the reference's cumulative sum in another
order: they can differ in the last bits only, far below the 2^-20 tolerance. tau is a
float32 (a run-time scalar here, a compile-time constant for TensorRT AOT; both exact
for the float32 the ONNX attribute holds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mass_mask import NAME, TOLERANCE, check_attributes
from ..span import Span
from ._launch import aot_compile, block, largest, launch, one_program_per_sample, output_buffers, triton_types
from .token_prune import span_rank

MAX_BLOCK_N = 64


@triton.jit
def _mass_above(s_row_ptr, s_i, i, protect, end, BLOCK_J: tl.constexpr):
    """Σ s_j in float64 over the span tokens j beating i (`span_rank`'s) for a chunk of tokens i."""
    mass = tl.zeros(s_i.shape, dtype=tl.float64)
    for j0 in range(protect, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_valid = j < end
        s_j = tl.load(s_row_ptr + j, mask=j_valid, other=0.0)
        beats = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
        mass += tl.sum(tl.where(beats & j_valid[None, :], s_j.to(tl.float64)[None, :], 0.0), axis=1)
    return mass


@triton.jit
def mass_mask_kernel(s_ptr, idx_ptr, N, M, protect, end, tau, valid_ptr, count_ptr,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, TOL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + b * N
    span = end - protect
    # 1. the span's total mass
    total = tl.sum(tl.zeros([BLOCK_J], dtype=tl.float64), axis=0)
    for j0 in range(protect, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        total += tl.sum(tl.load(s_row + j, mask=j < end, other=0.0).to(tl.float64), axis=0)
    # 2. how many top tokens reach the mass tau
    threshold = (tau + tl.zeros([BLOCK_I], dtype=tl.float32)).to(tl.float64) - TOL
    has_mass = total > 0
    den = tl.where(has_mass, total, 1.0)
    below = tl.sum(tl.zeros([BLOCK_I], dtype=tl.int32), axis=0)
    for i0 in range(protect, end, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_valid = i < end
        s_i = tl.load(s_row + i, mask=i_valid, other=0.0)
        cum = _mass_above(s_row, s_i, i, protect, end, BLOCK_J) + s_i.to(tl.float64)
        below += tl.sum((i_valid & (cum / den < threshold)).to(tl.int32), axis=0)
    count = tl.where(has_mass, tl.minimum(below + 1, span), span)
    tl.store(count_ptr + b, count.to(tl.int64))
    # 3. valid: outside the span, or ranked among the needed
    for t0 in range(0, M, BLOCK_I):
        t = t0 + tl.arange(0, BLOCK_I)
        t_valid = t < M
        idx = tl.load(idx_ptr + b * M + t, mask=t_valid, other=0)
        in_span = t_valid & (idx >= protect) & (idx < end)
        idx_safe = tl.where(in_span, idx, protect)
        s_t = tl.load(s_row + idx_safe, mask=in_span, other=0.0)
        valid = (~in_span) | (span_rank(s_row, s_t, idx_safe, protect, end, BLOCK_J) < count)
        tl.store(valid_ptr + b * M + t, valid.to(valid_ptr.dtype.element_ty), mask=t_valid)


# ------------------------------------------------------------ launch (ints or symbolic)


def scalar_args(score_shape, kept_index_shape, *, tau: float, protect: int, span_end: int, sym=None) -> list:
    """The int32 kernel arguments (in the kernel's order) from the input shapes (ints or shape exprs)."""
    n = score_shape[1]
    return [n, kept_index_shape[1], protect, Span(protect, span_end).end(n)]


grid = one_program_per_sample


def constexprs(n: int) -> dict:
    """Block sizes for at most `n` tokens (concrete ints)."""
    block_n = block(n, MAX_BLOCK_N)
    return {"BLOCK_I": block_n, "BLOCK_J": block_n, "TOL": TOLERANCE}


def run(score: torch.Tensor, kept_index: torch.Tensor, *, tau: float, protect: int, span_end: int, out=None):
    """score [B, N], kept_index [B, M] int64 -> (valid [B, M] of score's dtype, count [B] int64),
    matching `trimrt.plugins.mass_mask.reference` (tau taken as a float32)."""
    if score.dim() != 2 or kept_index.dim() != 2 or kept_index.shape[0] != score.shape[0]:
        raise ValueError(f"MassMask: need score [B, N] and kept_index [B, M], got {tuple(score.shape)}, "
                         f"{tuple(kept_index.shape)}")
    b, n = score.shape
    m = kept_index.shape[1]
    attrs = dict(tau=tau, protect=protect, span_end=span_end)
    check_attributes(n, **attrs)
    score, kept_index = score.contiguous(), kept_index.to(torch.int64).contiguous()
    outs = output_buffers(NAME, out, score.device, ((b, m), score.dtype), ((b,), torch.int64))
    if b == 0:
        return outs
    mass_mask_kernel[grid(score.shape)](
        score, kept_index, *scalar_args(score.shape, kept_index.shape, **attrs), float(tau), *outs, **constexprs(n))
    return outs


def compile_kernel(dtypes: dict[str, str], *, n: int, tau: float, target=None):
    """Compile for at most `n` tokens, `tau` baked in; `dtypes`: "score", "valid" (kept_index, count: int64)."""
    return aot_compile(mass_mask_kernel, {"s_ptr": dtypes["score"], "idx_ptr": "i64", "valid_ptr": dtypes["valid"],
                                          "count_ptr": "i64"}, {"tau": float(tau), **constexprs(n)}, target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """valid [B, M] (kept_index's shape) and count [B]."""
    check_attributes(shapes["score"][1], **attrs)
    b, m = shapes["kept_index"][0], shapes["kept_index"][1]
    return [(b, m), (b,)]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX with tau baked in, its grid and int32 scalars."""
    kernel = compile_kernel(triton_types(inputs, outputs), n=largest(inputs["score"], 1), tau=attrs["tau"])
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs)
