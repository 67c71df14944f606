"""BlockSparseAttention: attention over the few key blocks that hold a query block's mass,
with Rectified SpaAttn's corrections (Liu et al., 2025; BienLuky/Rectified-SpaAttn).

The tokens are cut into blocks of `block_size` (the last one may be shorter). Per
(batch, head):

1. block means q̄, k̄, v̄ (over each block's real tokens) and the pooled probabilities
   P = softmax(q̄·k̄ᵀ·scale) over the key blocks a query block may see (causal: j ≤ i);
2. selection: the `sink` first blocks and the `local` nearest ones (|i − j| < local; the
   diagonal when local = 1) always, then the highest P, `top_k` blocks in all (0: every
   block); a static count, so the shape never depends on the data;
3. exact attention of each query block over the tokens of its selected blocks only
   ([block × top_k·block] products, never N × N), causal inside the diagonal block;
4. `rectify`: the sparse output over-weights the selected blocks and loses the rest.
   A non-selected block whose pooled score is reliable (GAPR: |q̄·k̄| above the pooling
   error |mean|Δq|·k̄| + |q̄·mean|Δk||) contributes P·v̄ (pooled); the others' mass goes
   to the selected ones (IPAR): out = R·out_sparse + Σ_pooled P·v̄, with R the mass not
   pooled. Causal models pool only blocks wholly in the past (j < i).

With every block selected the result is dense attention (R = 1, nothing pooled).
q, k, v share their head count (repeat grouped KV heads first).
"""

from __future__ import annotations

import numpy as np

from .base import AttrSpec, OpDef, TensorSpec

NAME = "BlockSparseAttention"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, block_size: int, top_k: int, sink: int, local: int,
              causal: int, rectify: int, scale: float) -> tuple[np.ndarray]:
    """q, k, v [B, H, N, Dh] -> (out [B, H, N, Dh],)."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"BlockSparseAttention: need q, k, v of one shape [B, H, N, Dh], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if block_size < 1 or top_k < 0 or sink < 0 or local < 0:
        raise ValueError(f"BlockSparseAttention: block_size must be >= 1 and top_k, sink, local >= 0, got "
                         f"{block_size}, {top_k}, {sink}, {local}")
    b, h, n, d = q.shape
    nb = -(-n // block_size)
    pad = ((0, 0), (0, 0), (0, nb * block_size - n), (0, 0))
    qb, kb, vb = (np.pad(x.astype(np.float64), pad).reshape(b, h, nb, block_size, d) for x in (q, k, v))
    real = (np.arange(nb * block_size) < n).reshape(nb, block_size)  # [nb, bs]: the tokens that exist
    counts = real.sum(axis=1)[:, None]
    qm, km, vm = (x.sum(axis=3) / counts for x in (qb, kb, vb))  # block means [B, H, nb, Dh]
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    allowed = (j <= i) if causal else np.ones((nb, nb), bool)
    p = _softmax(np.where(allowed, qm @ km.swapaxes(-1, -2) * scale, -np.inf))  # [B, H, nb, nb]
    forced = ((j < sink) | (np.abs(i - j) < local)) & allowed
    chosen = np.argsort(-np.where(allowed, p + 2.0 * forced, -1.0), axis=-1, kind="stable")
    chosen = chosen[..., :min(top_k, nb) if top_k > 0 else nb]  # [B, H, nb, K]
    selected = np.zeros((b, h, nb, nb), bool)
    np.put_along_axis(selected, chosen, True, axis=-1)
    selected &= allowed

    # exact attention over the selected blocks' tokens
    key_ok = selected[..., None, :, None] & real[None, None, None, None, :, :]  # [B, H, nb, 1, nb, bs]
    key_ok = np.broadcast_to(key_ok, (b, h, nb, block_size, nb, block_size)).copy()
    if causal:
        pos = np.arange(nb * block_size).reshape(nb, block_size)
        key_ok &= (pos[None, None, None, None] <= pos[None, None, :, :, None, None])
    logits = np.einsum("bhiqd,bhjkd->bhiqjk", qb, kb) * scale
    logits = np.where(key_ok, logits, -np.inf).reshape(b, h, nb, block_size, nb * block_size)
    probs = _softmax(logits)
    out = probs @ vb.reshape(b, h, 1, nb * block_size, d)  # [B, H, nb, bs, Dh]

    if rectify:
        dq = (np.abs(qb - qm[:, :, :, None]) * real[..., None]).sum(axis=3) / counts
        dk = (np.abs(kb - km[:, :, :, None]) * real[..., None]).sum(axis=3) / counts
        gain = np.abs(qm @ km.swapaxes(-1, -2))
        error = np.abs(dq @ km.swapaxes(-1, -2)) + np.abs(qm @ dk.swapaxes(-1, -2))
        pooled = allowed & ~selected & (gain > error) & ((j < i) if causal else True)
        kept_mass = (p * ~pooled).sum(axis=-1)  # R [B, H, nb]
        out = out * kept_mass[..., None, None] + ((p * pooled) @ vm)[:, :, :, None, :]
    return (out.reshape(b, h, nb * block_size, d)[:, :, :n].astype(q.dtype),)


def decompose(b, q, k, v):
    bs, top_k, scale = b.attr("block_size"), b.attr("top_k"), b.attr("scale")
    causal = b.Cast(b.attr("causal"), to=9)  # BOOL
    zero, one, ax = b.const(0), b.const(1), lambda *a: b.const(list(a))
    n = b.Gather(b.Shape(q), b.const(2))
    nb = b.Div(b.Sub(b.Add(n, bs), one), bs)  # ceil(N / bs)
    padded = b.Mul(nb, bs)
    pads = b.Concat(b.const([0, 0, 0, 0, 0, 0]), b.Reshape(b.Sub(padded, n), ax(1)), b.const([0]), axis=0)
    as5 = b.Concat(ax(0, 0), b.Reshape(nb, ax(1)), b.Reshape(bs, ax(1)), ax(-1), axis=0)
    qb, kb, vb = (b.Reshape(b.Pad(x, pads), as5) for x in (q, k, v))  # [B, H, nb, bs, Dh]
    pos = b.Reshape(b.Range(zero, padded, one), b.Concat(b.Reshape(nb, ax(1)), b.Reshape(bs, ax(1)), axis=0))
    real = b.Less(pos, n)  # [nb, bs]
    real_f = b.CastLike(real, q)
    counts = b.ReduceSum(real_f, ax(1), keepdims=1)  # [nb, 1]
    qm, km, vm = (b.Div(b.ReduceSum(x, ax(3), keepdims=0), counts) for x in (qb, kb, vb))  # [B, H, nb, Dh]
    km_t = b.Transpose(km, perm=[0, 1, 3, 2])
    blocks = b.Range(zero, nb, one)
    i, j = b.Unsqueeze(blocks, ax(1)), b.Unsqueeze(blocks, ax(0))
    allowed = b.Or(b.Not(causal), b.LessOrEqual(j, i))  # [nb, nb]
    minus_inf = b.CastLike(b.const(-np.inf, np.float32), q)
    pooled_logits = b.Mul(b.MatMul(qm, km_t), b.CastLike(scale, q))
    p = b.Softmax(b.Where(allowed, pooled_logits, minus_inf), axis=-1)  # [B, H, nb, nb]
    distance = b.Abs(b.Sub(i, j))
    forced = b.And(b.Or(b.Less(j, b.attr("sink")), b.Less(distance, b.attr("local"))), allowed)
    rank = b.Where(allowed, b.Add(p, b.Mul(b.CastLike(forced, q), b.CastLike(b.const(2.0, np.float32), q))),
                   b.CastLike(b.const(-1.0, np.float32), q))
    count = b.Where(b.Greater(top_k, zero), b.Min(top_k, nb), nb)
    _, chosen = b.TopK(rank, b.Reshape(count, ax(1)), axis=-1, largest=1, sorted=1, _outputs=2)  # [B, H, nb, K]
    chosen_ok = b.Greater(b.GatherElements(rank, chosen, axis=-1), b.CastLike(b.const(-0.5, np.float32), q))

    # the selected blocks' keys and values, [B, H, nb, K·bs, Dh], and which of them a query may see
    width = b.Slice(b.Shape(q), ax(3), ax(4))
    flat = b.Concat(ax(0, 0, 0, -1), width, axis=0)
    where = b.Unsqueeze(chosen, ax(-1))
    k_sel, v_sel = (b.Reshape(b.GatherND(x, where, batch_dims=2), flat) for x in (kb, vb))
    key_pos = b.Add(b.Mul(where, bs), b.Range(zero, bs, one))  # [B, H, nb, K, bs]
    key_ok = b.And(b.Less(key_pos, n), b.Unsqueeze(chosen_ok, ax(-1)))
    key_pos, key_ok = (b.Reshape(x, ax(0, 0, 0, -1)) for x in (key_pos, key_ok))  # [B, H, nb, K·bs]
    key_pos, key_ok = (b.Unsqueeze(x, ax(3)) for x in (key_pos, key_ok))  # [B, H, nb, 1, K·bs]
    query_pos = b.Unsqueeze(pos, ax(-1))  # [nb, bs, 1]
    visible = b.And(key_ok, b.Or(b.Not(causal), b.LessOrEqual(key_pos, query_pos)))
    logits = b.Mul(b.MatMul(qb, b.Transpose(k_sel, perm=[0, 1, 2, 4, 3])), b.CastLike(scale, q))
    probs = b.Softmax(b.Where(visible, logits, minus_inf), axis=-1)
    sparse = b.MatMul(probs, v_sel)  # [B, H, nb, bs, Dh]

    # rectification (computed always, O(nb²·Dh); chosen by the attribute)
    selected = b.ReduceMax(b.Mul(b.OneHot(chosen, b.Reshape(nb, ax(1)), b.CastLike(b.const([0.0, 1.0], np.float32), q),
                                          axis=-1),
                                 b.Unsqueeze(b.CastLike(chosen_ok, q), ax(-1))), ax(3), keepdims=0)  # [B, H, nb, nb]
    real_5 = b.Unsqueeze(real_f, ax(-1))  # [nb, bs, 1]
    dq, dk = (b.Div(b.ReduceSum(b.Mul(b.Abs(b.Sub(x, b.Unsqueeze(m, ax(3)))), real_5), ax(3), keepdims=0), counts)
              for x, m in ((qb, qm), (kb, km)))
    gain = b.Abs(b.MatMul(qm, km_t))
    error = b.Add(b.Abs(b.MatMul(dq, km_t)), b.Abs(b.MatMul(qm, b.Transpose(dk, perm=[0, 1, 3, 2]))))
    past = b.Or(b.Not(causal), b.Less(j, i))
    pooled = b.And(b.And(b.And(allowed, past), b.Greater(gain, error)),
                   b.Less(selected, b.CastLike(b.const(0.5, np.float32), q)))
    pooled_p = b.Mul(p, b.CastLike(pooled, q))
    kept_mass = b.Sub(b.ReduceSum(p, ax(-1), keepdims=1), b.ReduceSum(pooled_p, ax(-1), keepdims=1))  # [B, H, nb, 1]
    rectified = b.Add(b.Mul(sparse, b.Unsqueeze(kept_mass, ax(-1))), b.Unsqueeze(b.MatMul(pooled_p, vm), ax(3)))
    out = b.Where(b.Cast(b.attr("rectify"), to=9), rectified, sparse)
    out = b.Reshape(out, b.Concat(ax(0, 0, -1), width, axis=0))
    return b.Slice(out, ax(0), b.Reshape(n, ax(1)), ax(2))


def examples(rng):
    """Ragged last blocks, causal and not, sinks and windows, every block selected, batch > 1."""
    cases = []
    for (batch, heads, n, dh), attrs in [
        ((1, 1, 8, 4), {"block_size": 4, "top_k": 0}),
        ((2, 3, 37, 8), {"block_size": 8, "top_k": 2, "sink": 1, "local": 1, "rectify": 1}),
        ((1, 2, 45, 16), {"block_size": 8, "top_k": 3, "sink": 1, "local": 1, "causal": 1, "rectify": 1}),
        ((2, 2, 30, 8), {"block_size": 4, "top_k": 4, "sink": 0, "local": 2, "causal": 0, "rectify": 0}),
    ]:
        q, k, v = (rng.standard_normal((batch, heads, n, dh)).astype(np.float32) for _ in range(3))
        cases.append(([q, k, v], {"scale": dh**-0.5, **attrs}))
    return cases


OP = OpDef.of_module(
    __name__,
    inputs=(
        TensorSpec("q", "queries [B, H, N, Dh]"),
        TensorSpec("k", "keys [B, H, N, Dh] (the heads of q: grouped heads repeated)"),
        TensorSpec("v", "values [B, H, N, Dh]"),
    ),
    outputs=(TensorSpec("out", "attention output [B, H, N, Dh]"),),
    attributes=(
        AttrSpec("block_size", int, "tokens per block (the last block may be shorter)", 64),
        AttrSpec("top_k", int, "key blocks each query block attends, the always-kept ones included (0: all)", 0),
        AttrSpec("sink", int, "the first blocks every query block keeps", 1),
        AttrSpec("local", int, "blocks within this distance of the diagonal are always kept (1: the diagonal)", 1),
        AttrSpec("causal", int, "1: a query sees no later key (decoders)", 0),
        AttrSpec("rectify", int, "1: Rectified SpaAttn's reallocation and pooled term for the skipped blocks", 1),
        AttrSpec("scale", float, "multiplier applied to q·kᵀ before the softmax", 1.0),
    ),
)
