"""Triton kernel of TokenMerge: match, rank and merge in one launch.

Grid (B, cdiv(D, BLOCK_D)). Every program holds all Na = ceil(N/2) A tokens (even
positions) of its batch row at once (BLOCK_A >= Na, so N is bounded: MAX_TOKENS) and:

1. match: the cosine of each A token to each B token (odd positions), the metrics
   normalised first as in the reference, in BLOCK_B x BLOCK_C tiles (`tl.dot` in IEEE
   fp32, no TF32); protected rows and columns are -inf; a running max keeps each A
   token's best score and its lowest-index best B token;
2. rank: rank_i = #{A tokens k : best_k > best_i, or best_k == best_i and k < i} (a
   BLOCK_A x BLOCK_A comparison), the stable descending sort of the reference without
   sorting: the r lowest ranks are merged away, the others keep their order, their
   output slot an exclusive `tl.cumsum`;
3. merge: for its feature block, the kept A rows are written to their slots and each
   B row to slot Na - r + j as (x_j·size_j + Σ merged x_i·size_i) / (size_j + Σ size_i),
   the sums a one-hot `tl.dot` (hit[i, j] = i merged into j) over the A rows.

The program of the first feature block also writes size_out and index. Matching is
recomputed by every feature block (O(Na·Nb·C), small next to the merge for ViT sizes)
so that all of it is one kernel: the TensorRT AOT path launches exactly one per plugin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..token_merge import check_r, merged_count
from ._launch import aot_compile, block, largest, launch, load_tile, output_buffers, store_tile, triton_types, without_features

#: tl.dot needs every block dimension >= 16
MIN_BLOCK = 16
MAX_BLOCK_B = 32
MAX_BLOCK_C = 32
MAX_BLOCK_D = 64
#: all A tokens live in one block (BLOCK_A >= ceil(N/2)); the rank is BLOCK_A² comparisons
MAX_TOKENS = 1024


@triton.jit
def token_merge_kernel(x_ptr, metric_ptr, size_ptr, N, D, C, r, protect, y_ptr, size_out_ptr, idx_ptr,
                       BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    na = (N + 1) // 2
    nb = N // 2
    m_out = N - r
    metric_row = metric_ptr + b * N * C
    i = tl.arange(0, BLOCK_A)  # A token i is input position 2i
    a_valid = i < na

    # 1. match: norms of the A metrics, then each A token's best B token
    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ma = load_tile(metric_row, 2 * i, a_valid, c, c < C, C).to(tl.float32)
        sq_a += tl.sum(ma * ma, axis=1)
    norm_a = tl.where(a_valid, tl.sqrt(sq_a), 1.0)
    a_blocked = (2 * i) < protect
    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_A], dtype=tl.int32)
    for j0 in range(0, nb, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        b_valid = j < nb
        sq_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mb = load_tile(metric_row, 2 * j + 1, b_valid, c, c < C, C).to(tl.float32)
            sq_b += tl.sum(mb * mb, axis=1)
        norm_b = tl.where(b_valid, tl.sqrt(sq_b), 1.0)
        scores = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_valid = c < C
            ma = load_tile(metric_row, 2 * i, a_valid, c, c_valid, C).to(tl.float32) / norm_a[:, None]
            mb = load_tile(metric_row, 2 * j + 1, b_valid, c, c_valid, C).to(tl.float32) / norm_b[:, None]
            scores += tl.dot(ma, tl.trans(mb), input_precision="ieee")
        blocked = a_blocked[:, None] | ((2 * j + 1) < protect)[None, :] | (j >= nb)[None, :]
        scores = tl.where(blocked, float("-inf"), scores)
        chunk_best = tl.max(scores, axis=1)
        chunk_j = tl.min(tl.where(scores == chunk_best[:, None], j[None, :], 2147483647), axis=1)
        better = chunk_best > best  # strict: an earlier chunk keeps a tie
        best_j = tl.where(better, chunk_j, best_j)
        best = tl.where(better, chunk_best, best)

    # 2. rank the A tokens by best score (descending, ties to the lower index)
    beats = (best[None, :] > best[:, None]) | ((best[None, :] == best[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum((beats & a_valid[None, :]).to(tl.int32), axis=1)
    merged = a_valid & (rank < r)
    kept = a_valid & (rank >= r)
    kept_i32 = kept.to(tl.int32)
    slot = tl.cumsum(kept_i32, axis=0) - kept_i32
    size_a = tl.load(size_ptr + b * N + 2 * i, mask=a_valid, other=1.0).to(tl.float32)
    kept_first = kept & ((i * 0 + pid_d) == 0)  # a vector mask: the interpreter rejects a scalar one
    tl.store(idx_ptr + b * m_out + slot, (2 * i).to(tl.int64), mask=kept_first)
    tl.store(size_out_ptr + b * m_out + slot, size_a.to(size_out_ptr.dtype.element_ty), mask=kept_first)

    # 3. merge this block of features: kept A rows, then every B row with what merged into it
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d < D
    xa = load_tile(x_ptr, b * N + 2 * i, a_valid, d, d_valid, D).to(tl.float32)
    xs_a = xa * size_a[:, None]
    store_tile(y_ptr, b * m_out + slot, kept, d, d_valid, D, xs_a / size_a[:, None])
    for j0 in range(0, nb, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        b_valid = j < nb
        hit = (merged[:, None] & (best_j[:, None] == j[None, :])).to(tl.float32)  # [BLOCK_A, BLOCK_B]
        size_b = tl.load(size_ptr + b * N + 2 * j + 1, mask=b_valid, other=1.0).to(tl.float32)
        xb = load_tile(x_ptr, b * N + 2 * j + 1, b_valid, d, d_valid, D).to(tl.float32)
        total = xb * size_b[:, None] + tl.dot(tl.trans(hit), xs_a, input_precision="ieee")
        size_total = size_b + tl.sum(hit * size_a[:, None], axis=0)
        out_slot = na - r + j
        store_tile(y_ptr, b * m_out + out_slot, b_valid, d, d_valid, D, total / size_total[:, None])
        b_first = b_valid & ((j * 0 + pid_d) == 0)
        tl.store(idx_ptr + b * m_out + out_slot, (2 * j + 1).to(tl.int64), mask=b_first)
        tl.store(size_out_ptr + b * m_out + out_slot, size_total.to(size_out_ptr.dtype.element_ty), mask=b_first)


# ------------------------------------------------------------ counts (ints or symbolic)


def check_attributes(n, *, r: int, protect: int, ratio: float) -> None:
    """Raise ValueError for what the reference rejects; with a symbolic `n`, only what
    does not depend on it."""
    if isinstance(n, int):
        check_r(n, r, protect, ratio)
        if n > MAX_TOKENS:
            raise ValueError(f"TokenMerge: the Triton kernel holds at most {MAX_TOKENS} tokens, got {n}")
    elif r < 0 or protect < 0 or not 0.0 <= ratio < 1.0:
        raise ValueError(f"TokenMerge: r={r} and protect={protect} must be >= 0, ratio={ratio} in [0, 1)")


def out_tokens(n, *, r: int, protect: int, ratio: float, sym=None):
    """N - min(r, mergeable) (an int or a shape expression)."""
    return n - merged_count(n, r, protect, sym, ratio)


def scalar_args(x_shape, metric_shape, size_shape, *, r: int, protect: int, ratio: float, sym=None) -> list:
    """The int32 kernel arguments (in the kernel's order) from the input shapes (ints or shape exprs);
    r is the clamped count."""
    return [x_shape[1], x_shape[2], metric_shape[2], merged_count(x_shape[1], r, protect, sym, ratio), protect]


def grid(x_shape, metric_shape, size_shape, cdiv=triton.cdiv, block_d: int = MAX_BLOCK_D) -> tuple:
    return (x_shape[0], cdiv(x_shape[2], block_d))


def constexprs(n: int, c: int, d: int) -> dict:
    """Block sizes for at most `n` tokens, `c` metric and `d` token features (concrete ints)."""
    return {"BLOCK_A": block((n + 1) // 2, MAX_TOKENS, MIN_BLOCK), "BLOCK_B": block(n // 2, MAX_BLOCK_B, MIN_BLOCK),
            "BLOCK_C": block(c, MAX_BLOCK_C, MIN_BLOCK), "BLOCK_D": block(d, MAX_BLOCK_D, MIN_BLOCK)}


def run(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, *, r: int, protect: int, ratio: float, out=None):
    """x [B, N, D], metric [B, N, C], size [B, N] -> (y [B, N - r, D], size_out [B, N - r],
    index [B, N - r] int64), matching `trimrt.plugins.token_merge.reference`; y and
    size_out in x's dtype."""
    if x.dim() != 3 or metric.dim() != 3 or not x.shape[:2] == metric.shape[:2] == size.shape:
        raise ValueError(f"TokenMerge: need x [B, N, D], metric [B, N, C], size [B, N], got "
                         f"{tuple(x.shape)}, {tuple(metric.shape)}, {tuple(size.shape)}")
    b, n, d = x.shape
    attrs = dict(r=r, protect=protect, ratio=ratio)
    check_attributes(n, **attrs)
    m = out_tokens(n, **attrs)
    outs = output_buffers("TokenMerge", out, x.device, ((b, m, d), x.dtype), ((b, m), x.dtype), ((b, m), torch.int64))
    if b == 0:
        return outs
    if d == 0:
        return without_features(run, x, metric, size, outs=outs, **attrs)
    x, metric, size = x.contiguous(), metric.contiguous(), size.contiguous()
    blocks = constexprs(n, metric.shape[2], d)
    token_merge_kernel[grid(x.shape, metric.shape, size.shape, block_d=blocks["BLOCK_D"])](
        x, metric, size, *scalar_args(x.shape, metric.shape, size.shape, **attrs), *outs, **blocks)
    return outs


def compile_kernel(dtypes: dict[str, str], *, n: int, c: int, d: int, target=None):
    """Compile for at most `n` tokens; `dtypes`: "x", "metric", "size", "y", "size_out" (index: int64)."""
    return aot_compile(token_merge_kernel, {"x_ptr": dtypes["x"], "metric_ptr": dtypes["metric"],
                                            "size_ptr": dtypes["size"], "y_ptr": dtypes["y"],
                                            "size_out_ptr": dtypes["size_out"], "idx_ptr": "i64"},
                       constexprs(n, c, d), target)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """[B, N - r, D], [B, N - r], [B, N - r] (shape expressions or ints)."""
    b, n, d = shapes["x"][0], shapes["x"][1], shapes["x"][2]
    check_attributes(n, **attrs)
    m = out_tokens(n, **attrs, sym=trtp)
    return [(b, m, d), (b, m), (b, m)]


def trt_aot(trtp, inputs, attrs, outputs):
    """aot_impl: the same kernel compiled to PTX for the profile's largest N, with its grid and int32 scalars."""
    n, c, d = largest(inputs["x"], 1), largest(inputs["metric"], 2), largest(inputs["x"], 2)
    check_attributes(n, **attrs)
    kernel = compile_kernel(triton_types(inputs, outputs), n=n, c=c, d=d)
    return launch(trtp, kernel, inputs, grid, scalar_args, attrs, block_d=constexprs(n, c, d)["BLOCK_D"])
