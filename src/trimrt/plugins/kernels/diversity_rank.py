"""Triton kernel of DiversityRank: DivPrune's greedy max-min picks, one program per sample.

Grid (B,). The span is [protect, end) of S = end - protect tokens; k (`keep`, the kept
count TokenPrune uses: the static `keep`, or the `keep_ratio` rule on the run-time span,
computed on the host — or as a TensorRT shape expression — and passed in as a scalar)
tokens are picked. With cos_ij = (x_i · x_j) / (max(‖x_i‖, eps) · max(‖x_j‖, eps)) and
dist = 1 - cos, the program

1. finds the first pick, argmax_j min_{i≠j} dist_ij: the span is walked in BLOCK_J
   column chunks; per chunk, BLOCK_I × BLOCK_J tiles of the Gram matrix come from
   `tl.dot` (IEEE fp32, no TF32, so near-ties resolve like the float64 reference) with
   the row norms accumulated alongside; the running (best value, lowest index) pair
   carries the argmax across chunks (strict > keeps the lower index on ties);
2. keeps the running minimum distance to the picked set, `nearest` [BLOCK_S], and the
   scores, `score` [BLOCK_S], in registers (BLOCK_S = next power of two >= S); each of
   the k - 1 further picks is the first argmax of `nearest`, whose distance row
   (x_p · x_j over BLOCK_DR feature chunks, times the inverse norms) is folded into the
   minimum: O(S·D) per pick, not the O(k²·S) of re-deriving the minima;
3. writes score[b, protect + s] for the span and 0 before and after it (each output
   element written once).

No scratch memory and a single launch, as the TensorRT AOT path requires. One program
per sample keeps the pick loop sequential (it is), at the price of B programs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..diversity_rank import NAME, NORM_EPS
from ..span import Span
from ._launch import aot_compile, block, largest, launch, load_tile, one_program_per_sample, output_buffers, triton_types

#: tiles of the first pick's Gram matrix (tl.dot needs every dimension >= 16)
BLOCK_TILE = 16
MAX_BLOCK_D = 32
#: elements of the [BLOCK_S, BLOCK_DR] feature chunk a pick loads at once
PICK_CHUNK = 8192


@triton.jit
def _distance_row(row_base, x_span, s, s_valid, inv_norm, inv_norm_p, D,
                  BLOCK_S: tl.constexpr, BLOCK_DR: tl.constexpr):
    """1 - cos(x_p, x_s) for every span token s, [BLOCK_S]; row_base points at x_p."""
    dots = tl.zeros([BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DR):
        d = d0 + tl.arange(0, BLOCK_DR)
        d_mask = d < D
        xp = tl.load(row_base + d, mask=d_mask, other=0.0).to(tl.float32)
        xs = load_tile(x_span, s, s_valid, d, d_mask, D).to(tl.float32)
        dots += tl.sum(xs * xp[None, :], axis=1)
    return 1.0 - dots * inv_norm * inv_norm_p


@triton.jit
def diversity_rank_kernel(x_ptr, N, D, keep, protect, end, score_ptr,
                          BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DR: tl.constexpr, NORM_EPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    span = end - protect
    x_span = x_ptr + (b * N + protect) * D  # row s of the span at x_span + s * D

    # 1. first pick: the largest nearest-neighbour distance, lowest index on ties
    best = tl.max(tl.full([BLOCK_J], float("-inf"), tl.float32), axis=0)
    first = tl.sum(tl.zeros([BLOCK_J], dtype=tl.int32), axis=0)
    for j0 in range(0, span, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_valid = j < span
        nearest_j = tl.full([BLOCK_J], float("inf"), tl.float32)
        for i0 in range(0, span, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            i_valid = i < span
            gram = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
            sq_i = tl.zeros([BLOCK_I], dtype=tl.float32)
            sq_j = tl.zeros([BLOCK_J], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d < D
                xi = load_tile(x_span, i, i_valid, d, d_mask, D).to(tl.float32)
                xj = load_tile(x_span, j, j_valid, d, d_mask, D).to(tl.float32)
                gram += tl.dot(xi, tl.trans(xj), input_precision="ieee")
                sq_i += tl.sum(xi * xi, axis=1)
                sq_j += tl.sum(xj * xj, axis=1)
            inv_i = 1.0 / tl.maximum(tl.sqrt(sq_i), NORM_EPS)
            inv_j = 1.0 / tl.maximum(tl.sqrt(sq_j), NORM_EPS)
            dist = 1.0 - gram * inv_i[:, None] * inv_j[None, :]
            others = i_valid[:, None] & (i[:, None] != j[None, :])
            nearest_j = tl.minimum(nearest_j, tl.min(tl.where(others, dist, float("inf")), axis=0))
        nearest_j = tl.where(j_valid, nearest_j, float("-inf"))  # one token alone: +inf, still picked
        chunk_best = tl.max(nearest_j, axis=0)
        chunk_first = j0 + tl.argmax(nearest_j, axis=0)
        better = chunk_best > best
        first = tl.where(better, chunk_first, first)
        best = tl.where(better, chunk_best, best)

    # 2. the other picks, from the running minimum distance to the picked set
    s = tl.arange(0, BLOCK_S)
    s_valid = s < span
    sq = tl.zeros([BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DR):
        d = d0 + tl.arange(0, BLOCK_DR)
        xs = load_tile(x_span, s, s_valid, d, d < D, D).to(tl.float32)
        sq += tl.sum(xs * xs, axis=1)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sq), NORM_EPS)
    inv_first = tl.sum(tl.where(s == first, inv_norm, 0.0), axis=0)
    row = _distance_row(x_span + first * D, x_span, s, s_valid, inv_norm, inv_first, D, BLOCK_S, BLOCK_DR)
    nearest = tl.where(s_valid & (s != first), row, float("-inf"))
    score = tl.where(s == first, keep * 1.0, 0.0)
    for t in range(1, keep):
        p = tl.argmax(nearest, axis=0)  # lowest index on ties; picked and padding lanes are -inf
        inv_p = tl.sum(tl.where(s == p, inv_norm, 0.0), axis=0)
        row = _distance_row(x_span + p * D, x_span, s, s_valid, inv_norm, inv_p, D, BLOCK_S, BLOCK_DR)
        score = tl.where(s == p, (keep - t) * 1.0, score)
        nearest = tl.where(s == p, float("-inf"), tl.minimum(nearest, row))

    # 3. the span's scores, and 0 outside it
    out = score_ptr + b * N
    tl.store(out + protect + s, score.to(score_ptr.dtype.element_ty), mask=s_valid)
    for o0 in range(0, N, BLOCK_S):
        o = o0 + tl.arange(0, BLOCK_S)
        outside = (o < N) & ((o < protect) | (o >= end))
        tl.store(out + o, tl.zeros([BLOCK_S], dtype=tl.float32).to(score_ptr.dtype.element_ty), mask=outside)


# ------------------------------------------------- launch (ints or shape expressions)


def scalar_args(x_shape, *, sym=None, **attrs) -> list:
    """The int32 kernel arguments (in the kernel's order; keep: the picked span count k) from x's shape (ints or shape exprs)."""
    span, n = Span.of(attrs), x_shape[1]
    return [n, x_shape[2], span.kept(n, sym), span.protect, span.end(n)]


grid = one_program_per_sample


def constexprs(n: int, d: int) -> dict:
    """Block sizes for a span of at most `n` tokens of `d` features (concrete ints)."""
    block_s = block(n)
    return {"BLOCK_S": block_s, "BLOCK_I": BLOCK_TILE, "BLOCK_J": BLOCK_TILE,
            "BLOCK_D": block(d, MAX_BLOCK_D, BLOCK_TILE), "BLOCK_DR": block(d, max(1, PICK_CHUNK // block_s)),
            "NORM_EPS": NORM_EPS}


def run(x: torch.Tensor, *, keep: int, protect: int, span_end: int, keep_ratio: float, out=None):
    """x [B, N, D] -> (score [B, N],) on x's device and dtype, matching
    `trimrt.plugins.diversity_rank.reference`."""
    if x.dim() != 3:
        raise ValueError(f"{NAME}: need x [B, N, D], got {tuple(x.shape)}")
    b, n, d = x.shape
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=keep_ratio)
    Span.of(attrs).check(n, NAME)
    x = x.contiguous()
    (score,) = output_buffers(NAME, out, x.device, ((b, n), x.dtype))
    if b == 0:
        return (score,)
    diversity_rank_kernel[grid(x.shape)](x, *scalar_args(x.shape, **attrs), score, **constexprs(n, d))
    return (score,)


def compile_kernel(dtypes: dict[str, str], *, n: int, d: int, target=None):
    """Compile for at most `n` tokens of `d` features; `dtypes`: "x", "score"."""
    return aot_compile(diversity_rank_kernel, {"x_ptr": dtypes["x"], "score_ptr": dtypes["score"]}, constexprs(n, d),
                       target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """score [B, N]; the attributes are checked as far as they do not depend on N, so
    that a bad keep_ratio fails the build here rather than in aot_impl."""
    b, n = shapes["x"][0], shapes["x"][1]
    Span.of(attrs).check(n, NAME, sym=trtp)
    return [(b, n)]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX for the profile's largest N and D, with its grid and int32 scalars."""
    x = inputs["x"]
    kernel = compile_kernel(triton_types(inputs, outputs), n=largest(x, 1), d=largest(x, 2))
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs)
