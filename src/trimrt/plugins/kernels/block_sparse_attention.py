"""Triton kernel of BlockSparseAttention: attention over the selected key blocks, online softmax.

The block selection and the rectification terms are O(nb²·Dh) and run in PyTorch
(`select_blocks`, `rectification`, the semantics of `plugins/block_sparse_attention.py`);
the kernel does the O(N·K·block·Dh) part. Grid (nb, B·H): each program owns one query
block of one head, loops over its K selected key blocks (their ids in `chosen`, 0 in
`chosen_ok` for a slot that counts for nothing: a causal query block sees fewer than K, or
the slot comes after `tau`'s mass) and keeps
the running max, denominator and accumulator in float32 (flash attention's recurrence).
A block of `bs` tokens is a power-of-two tile BLOCK ≥ bs, masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_sparse_attention import MASKED_BIAS, RECTIFY_BLOCKS
from ._launch import block, output_buffers

MAX_BLOCK_D = 128


@triton.jit
def block_sparse_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, chosen_ptr, ok_ptr, N, H, NB, K, D, BS, scale,
                                  window, out_ptr, lse_ptr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bias_row = bias_ptr + (bh // H) * N
    t = tl.arange(0, BLOCK)
    rows = qb * BS + t
    row_ok = (t < BS) & (rows < N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    base = bh * N * D
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    slots = (bh * NB + qb) * K
    for s in range(0, K):
        kb = tl.load(chosen_ptr + slots + s)
        limit = tl.where(tl.load(ok_ptr + slots + s) != 0, N, 0)  # a slot that is no block: no key
        cols = kb * BS + t
        col_ok = (t < BS) & (cols < limit)
        kt = tl.load(k_ptr + base + cols[None, :] * D + d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                     other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK]
        key_bias = tl.load(bias_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        logits = tl.sum(q[:, :, None] * kt[None, :, :], axis=1) * scale + key_bias[None, :]  # [BLOCK, BLOCK]
        visible = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None]) & ((window == 0) | (rows[:, None] - cols[None, :] < window))
        logits = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp(logits - shift[:, None])
        alpha = tl.exp(m - shift)
        vv = tl.load(v_ptr + base + cols[:, None] * D + d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)  # [BLOCK, BLOCK_D]
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv[None, :, :], axis=1)
        m = m_new
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    tl.store(out_ptr + base + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(den == 0.0, float("-inf"), m + tl.log(tl.where(den == 0.0, 1.0, den)))
    tl.store(lse_ptr + bh * N + rows, lse, mask=row_ok)  # the per-token rectification weighs the pooled keys by it


def _block_means(x: torch.Tensor, bs: int, nb: int, pooling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in blocks [B, H, nb, bs, Dh] zero-padded, the block means over the tokens `pooling`
    [B, nb, bs] counts, [B, H, nb, Dh])."""
    b, h, n, d = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * bs - n)).reshape(b, h, nb, bs, d)
    weights = pooling[:, None, :, :, None].float()
    return padded, (padded * weights).sum(dim=3) / weights.sum(dim=3).clamp(min=1.0)


def select_blocks(qm, km, seen, *, nb: int, top_k: int, tau: float, sink: int, local: int, causal: int,
                  scale: float, block_size: int = 1, window: int = 0):
    """(pooled probabilities P [B, H, nb, nb], chosen [B, H, nb, K] int64, chosen_ok [B, H, nb, K],
    allowed [B, 1, nb, nb]): the op's selection rule, ties to the lower block; `seen` [B, nb]:
    the blocks with a key not masked; a slot is not ok when its block may not be seen or comes
    after tau's mass."""
    i = torch.arange(nb, device=qm.device)[:, None]
    j = torch.arange(nb, device=qm.device)[None, :]
    allowed = ((j <= i) if causal else torch.ones(nb, nb, dtype=torch.bool, device=qm.device)) & seen[:, None, None, :]
    if window:  # a block some query of block i sees a key of
        allowed = allowed & ((j >= i) | ((i - j - 1) * block_size + 1 < window))
    p = torch.softmax(torch.where(allowed, qm @ km.transpose(-1, -2) * scale, float("-inf")), dim=-1)
    forced = ((j < sink) | ((i - j).abs() < local)) & allowed
    edge = (j == i - window // block_size) & allowed if window and window % block_size == 0 else torch.zeros_like(allowed)
    forced = forced | edge  # a window of whole blocks: the block at its edge, after the diagonal
    rank = torch.where(allowed, p + 2.0 * forced + 4.0 * (forced & (i == j)) + 2.0 * edge, -1.0)
    count = min(top_k, nb) if top_k > 0 else nb
    order = torch.sort(-rank, dim=-1, stable=True).indices[..., :count]
    ranked, mass = torch.gather(rank, -1, order), torch.gather(p, -1, order)
    within_tau = (torch.cumsum(mass, dim=-1) - mass < tau) | (tau >= 1.0)
    return p, order, (ranked > -0.5) & ((ranked > 1.5) | within_tau), allowed


def pooled_blocks(qb, kb, qm, km, pooling, p, chosen, chosen_ok, allowed, causal: int, window: int = 0):
    """GAPR's pooled blocks [B, H, nb, nb]: allowed, not selected, wholly in the past when causal
    (and inside every query's window), and a gain above the pooling error (the spread over the tokens `pooling` counts)."""
    nb = p.shape[-1]
    selected = torch.zeros_like(p, dtype=torch.bool).scatter(-1, chosen, chosen_ok)
    weights = pooling[:, None, :, :, None].float()
    counts = weights.sum(dim=3).clamp(min=1.0)
    dq = ((qb - qm[:, :, :, None]).abs() * weights).sum(dim=3) / counts
    dk = ((kb - km[:, :, :, None]).abs() * weights).sum(dim=3) / counts
    gain = (qm @ km.transpose(-1, -2)).abs()
    error = (dq @ km.transpose(-1, -2)).abs() + (qm @ dk.transpose(-1, -2)).abs()
    i = torch.arange(nb, device=p.device)[:, None]
    j = torch.arange(nb, device=p.device)[None, :]
    past = (j < i) if causal else torch.ones_like(allowed)
    if window:  # wholly inside the window of every query of the block
        past = past & ((i - j + 1) * qb.shape[3] - 1 < window)
    return allowed & past & ~selected & (gain > error)


def rectify_per_token(sparse, lse, qb, km, vm, bias, pooling, pooled, scale: float):
    """The sparse output [B, H, nb, bs, Dh] with the pooled blocks as keys (k̄, v̄, weight of the
    tokens `pooling` counts) in every query's softmax: `lse` [B, H, nb, bs] is the sparse
    softmax's log-sum-exp."""
    counts = pooling.sum(dim=2).clamp(min=1).to(torch.float32)  # [B, nb]
    weight = counts.log() + torch.where(pooling, bias, 0.0).sum(dim=2) / counts  # [B, nb]
    logits = torch.einsum("bhiqd,bhjd->bhiqj", qb, km) * scale + weight[:, None, None, None, :]
    logits = torch.where(pooled[:, :, :, None, :], logits, float("-inf"))
    top = torch.maximum(lse, logits.amax(dim=-1))[..., None]
    top = torch.where(torch.isinf(top), 0.0, top)  # a query that sees no key and no pooled key: zeros
    sparse_w, pooled_w = torch.exp(lse[..., None] - top), torch.exp(logits - top)
    total = sparse_w + pooled_w.sum(dim=-1, keepdim=True)
    return (sparse * sparse_w + pooled_w @ vm[:, :, None]) / torch.where(total > 0, total, 1.0)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, *, block_size: int, top_k: int,
        tau: float, sink: int, local: int, causal: int, rectify: int, scale: float, window: int = 0, out=None):
    """q, k, v [B, H, N, Dh], key_bias [B, N] -> (out [B, H, N, Dh],), matching the op's reference."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"BlockSparseAttention: need q, k, v of one shape [B, H, N, Dh], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if block_size < 1:
        raise ValueError(f"BlockSparseAttention: block_size must be >= 1, got {block_size}")
    b, h, n, d = q.shape
    (result,) = output_buffers("BlockSparseAttention", out, q.device, ((b, h, n, d), q.dtype))
    if result.numel() == 0:
        return (result,)
    nb = -(-n // block_size)
    real = (torch.arange(nb * block_size, device=q.device) < n).reshape(nb, block_size)
    bias = torch.nn.functional.pad(key_bias.float(), (0, nb * block_size - n)).reshape(b, nb, block_size)
    pooling = real & (bias > MASKED_BIAS)  # the tokens a block's mean counts (padding none)
    qb, qm = _block_means(q, block_size, nb, pooling)
    kb, km = _block_means(k, block_size, nb, pooling)
    _, vm = _block_means(v, block_size, nb, pooling)
    seen = pooling.any(dim=2)
    p, chosen, chosen_ok, allowed = select_blocks(qm, km, seen, nb=nb, top_k=top_k, tau=tau, sink=sink, local=local,
                                                  causal=causal, scale=scale, block_size=block_size, window=window)
    sparse = torch.empty((b, h, n, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    block_sparse_attention_kernel[(nb, b * h)](
        q.contiguous(), k.contiguous(), v.contiguous(), key_bias.float().contiguous(), chosen.contiguous(),
        chosen_ok.to(torch.int8).contiguous(), n, h, nb, chosen.shape[-1], d, block_size, float(scale), int(window),
        sparse, lse,
        CAUSAL=bool(causal), BLOCK=block(block_size), BLOCK_D=block(d, MAX_BLOCK_D))
    if rectify:
        pooled = pooled_blocks(qb, kb, qm, km, pooling, p, chosen, chosen_ok, allowed, causal, window)
        blocks = torch.nn.functional.pad(sparse, (0, 0, 0, nb * block_size - n)).reshape(b, h, nb, block_size, d)
        if rectify == RECTIFY_BLOCKS:
            pooled_p = p * pooled
            blocks = blocks * (p * ~pooled).sum(dim=-1)[..., None, None] + (pooled_p @ vm)[:, :, :, None, :]
        else:
            lse_blocks = torch.nn.functional.pad(lse, (0, nb * block_size - n)).reshape(b, h, nb, block_size)
            blocks = rectify_per_token(blocks, lse_blocks, qb, km, vm, bias, pooling, pooled, scale)
        sparse = blocks.reshape(b, h, -1, d)[:, :, :n]
    blind = ~chosen_ok.any(dim=-1).repeat_interleave(block_size, dim=-1)[:, :, :n]  # a query block that sees no key
    sparse = torch.where(blind[..., None], 0.0, sparse)
    result.copy_(sparse.to(q.dtype))
    return (result,)


# ------------------------------------------------------------- TensorRT plugin hooks


def trt_output_shapes(shapes, attrs, trtp):
    """out has the shape of q."""
    return [tuple(shapes["q"])]


def trt_aot(trtp, inputs, attrs, outputs):
    """No ahead-of-time plugin yet: the selection and rectification run in PyTorch (the JIT
    plugin, `impl`, runs `run`)."""
    raise NotImplementedError("BlockSparseAttention has no ahead-of-time TensorRT plugin yet: its block selection "
                              "runs in PyTorch; build with the JIT plugin")
