"""Triton kernel of AttentionPageRank: Zero-TPrune's I-stage and S-stage in one launch.

Grid (B,): one program per sample holds its token vectors (N padded to BLOCK_N) in
registers and never writes scratch memory, so the same kernel serves TensorRT's AOT
path (one kernel per plugin, no workspace):

1. I-stage, per head: s = 1/N, then `iterations` times s_j <- Σ_i A_ij s_i, reading A
   in chunks of BLOCK_I rows; the chunk's s_i are picked out of the register vector s
   with a one-hot sum (Triton has no register indexing). The head's variance of N·s
   decides whether it is kept; both Σ_kept s² and Σ_all s² are accumulated, so the
   "no head kept: keep all" fallback needs no second pass. I = sqrt(the chosen sum).
2. Important set: rank_j = #{span i : I_i > I_j, or I_i == I_j and i < j} (chunked
   comparisons); j is important iff it is in the span and rank_j < ceil(span / 2):
   exactly TopK's choice, ties to the lower index.
3. Similarity: for each chunk of span rows i, the dot products x_i · x_j with every
   token j (a loop over the C features), scaled by both inverse norms; the max over the
   important i gives each token's best match.
4. score = 4 + I (important), 1 - best (other span tokens), I (outside the span).

Work is O(H · iterations · N²) + O(span · N · C) per sample, fine for ViT-sized N (the
op targets N up to a few hundred; BLOCK_N = next power of two of N, up to MAX_N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_page_rank import IMPORTANT_OFFSET, NAME, NORM_EPS
from ..attention_page_rank import check_call as reference_checks
from ..span import Span
from ._launch import aot_compile, block, largest, launch, load_tile, one_program_per_sample, output_buffers, triton_types

#: elements of one [BLOCK_I, BLOCK_N] tile
TILE = 4096
MAX_N = 4096


@triton.jit
def attention_page_rank_kernel(p_ptr, m_ptr, H, N, C, iterations, protect, end, n_important,
                               var_min, var_max, out_ptr,
                               BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                               OFFSET: tl.constexpr, EPS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_N)
    j_valid = j < N
    n_f = N.to(tl.float32)
    # ---- 1. I-stage
    sum_kept = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_all = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_kept = tl.sum(tl.zeros([BLOCK_N], dtype=tl.int32), axis=0)
    for h in range(0, H):
        p_head = p_ptr + (b * H + h) * N * N
        s = tl.where(j_valid, 1.0 / n_f, 0.0)
        for _step in range(0, iterations):
            s_next = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i0 in range(0, N, BLOCK_I):
                i = i0 + tl.arange(0, BLOCK_I)
                s_i = tl.sum(tl.where(i[:, None] == j[None, :], s[None, :], 0.0), axis=1)
                a = load_tile(p_head, i, i < N, j, j_valid, N).to(tl.float32)
                s_next += tl.sum(a * s_i[:, None], axis=0)
            s = s_next
        ns = s * n_f
        dev = tl.where(j_valid, ns - tl.sum(ns, axis=0) / n_f, 0.0)
        variance = tl.sum(dev * dev, axis=0) / n_f
        head_ok = (variance >= var_min) & (variance <= var_max)
        s2 = s * s
        sum_all += s2
        sum_kept += tl.where(head_ok, s2, 0.0)
        n_kept += head_ok.to(tl.int32)
    imp = tl.sqrt(tl.where(n_kept > 0, sum_kept, sum_all))
    # ---- 2. important span tokens: rank by importance, ties to the lower index
    in_span = (j >= protect) & (j < end)
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i0 in range(protect, end, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        imp_i = tl.sum(tl.where(i[:, None] == j[None, :], imp[None, :], 0.0), axis=1)
        beats = (imp_i[:, None] > imp[None, :]) | ((imp_i[:, None] == imp[None, :]) & (i[:, None] < j[None, :]))
        rank += tl.sum((beats & (i < end)[:, None]).to(tl.int32), axis=0)
    important = in_span & (rank < n_important)
    # ---- 3. best cosine similarity to an important token
    m_row = m_ptr + b * N * C
    norm2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(0, C):
        x_j = tl.load(m_row + j * C + c, mask=j_valid, other=0.0).to(tl.float32)
        norm2 += x_j * x_j
    inv_norm = 1.0 / tl.maximum(tl.sqrt(norm2), EPS)
    best = tl.full([BLOCK_N], -3.0, dtype=tl.float32)  # below any cosine; the span has an important token
    for i0 in range(protect, end, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_valid = i < end
        pick = i[:, None] == j[None, :]
        important_i = tl.sum((pick & important[None, :]).to(tl.int32), axis=1) > 0
        inv_norm_i = tl.sum(tl.where(pick, inv_norm[None, :], 0.0), axis=1)
        dot = tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32)
        for c in range(0, C):
            x_i = tl.load(m_row + i * C + c, mask=i_valid, other=0.0).to(tl.float32)
            x_j = tl.load(m_row + j * C + c, mask=j_valid, other=0.0).to(tl.float32)
            dot += x_i[:, None] * x_j[None, :]
        sim = dot * inv_norm_i[:, None] * inv_norm[None, :]
        best = tl.maximum(best, tl.max(tl.where(important_i[:, None], sim, -3.0), axis=0))
    # ---- 4. scores
    score = tl.where(important, OFFSET + imp, tl.where(in_span, 1.0 - best, imp))
    tl.store(out_ptr + b * N + j, score.to(out_ptr.dtype.element_ty), mask=j_valid)


# ------------------------------------------------------ launch geometry (ints or symbolic)


def check_call(probs_shape, metric_shape=None, **attrs) -> None:
    """Raise ValueError for what the reference rejects (`attention_page_rank.check_call`:
    with a shape expression N, only what does not depend on it) and for an N above MAX_N."""
    reference_checks(probs_shape, metric_shape, **attrs)
    n = probs_shape[2]
    if isinstance(n, int) and n > MAX_N:
        raise ValueError(f"{NAME}: the Triton kernel handles at most {MAX_N} tokens, got {n}")


def scalar_args(probs_shape, metric_shape, *, iterations: int, protect: int, span_end: int, sym=None, **_) -> list:
    """The int32 kernel arguments (in the kernel's order) from the input shapes (ints or shape exprs):
    H, N, C, iterations, protect, end, ceil((end - protect) / 2)."""
    h, n = probs_shape[1], probs_shape[2]
    span = Span(protect, span_end)
    return [h, n, metric_shape[2], iterations, protect, span.end(n), (span.length(n) + 1) // 2]


grid = one_program_per_sample


def constexprs(n: int) -> dict:
    """Block sizes for at most `n` tokens (a concrete int), and the op's constants."""
    block_n = block(n)
    return {"BLOCK_N": block_n, "BLOCK_I": max(1, min(16, TILE // block_n)),
            "OFFSET": IMPORTANT_OFFSET, "EPS": NORM_EPS}


def run(probs: torch.Tensor, metric: torch.Tensor, *, iterations: int, var_min: float, var_max: float, protect: int,
        span_end: int, out=None):
    """probs [B, H, N, N], metric [B, N, C] -> (score [B, N],) in probs' dtype, matching
    `trimrt.plugins.attention_page_rank.reference`."""
    attrs = dict(iterations=iterations, protect=protect, span_end=span_end)
    check_call(tuple(probs.shape), tuple(metric.shape), **attrs)
    b, _, n, _ = probs.shape
    probs, metric = probs.contiguous(), metric.contiguous()
    (score,) = output_buffers(NAME, out, probs.device, ((b, n), probs.dtype))
    if b == 0:
        return (score,)
    attention_page_rank_kernel[grid(probs.shape)](
        probs, metric, *scalar_args(probs.shape, metric.shape, **attrs), float(var_min), float(var_max), score, **constexprs(n))
    return (score,)


def compile_kernel(dtypes: dict[str, str], *, n: int, var_min: float, var_max: float, target=None):
    """Compile for at most `n` tokens, var_min and var_max baked in; `dtypes`: "probs", "metric", "score"."""
    return aot_compile(attention_page_rank_kernel, {"p_ptr": dtypes["probs"], "m_ptr": dtypes["metric"],
                                                    "out_ptr": dtypes["score"]},
                       {"var_min": float(var_min), "var_max": float(var_max), **constexprs(n)}, target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """score [B, N] (shape expressions or ints)."""
    probs = shapes["probs"]
    check_call(probs, None, **attrs)
    return [(probs[0], probs[2])]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX, with its grid and int32 scalars."""
    kernel = compile_kernel(triton_types(inputs, outputs), n=largest(inputs["probs"], 2), var_min=attrs["var_min"],
                            var_max=attrs["var_max"])
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs)
