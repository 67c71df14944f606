"""BlockSparseAttention: attention over the few key blocks that hold a query block's mass,
with Rectified SpaAttn's corrections (Liu et al., 2025; BienLuky/Rectified-SpaAttn).

The tokens are cut into blocks of `block_size` (the last one may be shorter). Per
(batch, head):

1. block means q̄, k̄, v̄ (over each block's tokens whose key is not masked: padding
   counts for nothing, whatever its values) and the pooled probabilities
   P = softmax(q̄·k̄ᵀ·scale) over the key blocks a query block may see (causal: j ≤ i; with a
   sliding `window`, only blocks holding a key some query of the block sees in it);
2. selection: the `sink` first blocks and the `local` nearest ones (|i − j| < local; the
   diagonal when local = 1) always (and, with a `window` of whole blocks, the block at its
   edge, j = i − window / block_size), then the highest P, `top_k` blocks in all (0: every
   block); a static count, so the shape never depends on the data. With `tau` < 1 a
   query block keeps, of those, only the ones (largest P first) until their mass reaches
   tau: the rest of its slots are masked (a static upper bound plus a mask);
3. exact attention of each query block over the tokens of its selected blocks only
   ([block × top_k·block] products, never N × N), causal inside the diagonal block; with
   `window` (causal only) a query sees no key `window` or more positions before it;
4. `rectify`: the sparse output over-weights the selected blocks and loses the rest. A
   non-selected block whose pooled score is reliable (GAPR: |q̄·k̄| above the pooling error
   |mean|Δq|·k̄| + |q̄·mean|Δk||; causal: only blocks wholly in the past, j < i, and inside
   every query's window) is pooled.
   rectify = 1 (per token): each pooled block joins every query's softmax as one key k̄
   with value v̄ and the weight of its c tokens (logit q·k̄·scale + log c + their mean key
   bias, over the tokens whose key is not masked), so the selected keys' mass is
   reallocated exactly, per query. rectify = 2 (per block, Rectified SpaAttn's formula):
   out = R·out_sparse + Σ_pooled P·v̄ with R the pooled mass not pooled (IPAR); the pooled
   P underestimates a selected block whose keys vary (exp of the mean logit is below the
   mean of exp), which per-token reallocation does not.

`key_bias` [B, N] is added to every query's logit of a key (0 for all: none; a large
negative number masks a padding key); a block whose keys are all masked (≤ MASKED_BIAS)
is never selected or pooled, and a query block that may see no key block (a left-padded
prompt's first blocks in a causal model) outputs zeros. With every block selected the
result is dense attention (R = 1, nothing pooled). q, k, v share their head count (repeat
grouped KV heads first).
"""

from __future__ import annotations

import numpy as np

from .base import AttrSpec, OpDef, TensorSpec

NAME = "BlockSparseAttention"
#: `rectify`: the pooled blocks join each query's softmax as one key each (k̄, v̄, weight = their
#: token count), or the published per-block formula R·out + Σ P·v̄
RECTIFY_TOKENS, RECTIFY_BLOCKS = 1, 2
#: a key whose bias is at most this is masked: a block of only such keys is never selected or pooled
MASKED_BIAS = -1e4


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; a row of only -inf (nothing to attend) gives zeros."""
    top = x.max(axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_bias: np.ndarray, *, block_size: int, top_k: int,
              tau: float, sink: int, local: int, causal: int, rectify: int, scale: float, window: int = 0
              ) -> tuple[np.ndarray]:
    """q, k, v [B, H, N, Dh], key_bias [B, N] -> (out [B, H, N, Dh],)."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"BlockSparseAttention: need q, k, v of one shape [B, H, N, Dh], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if np.shape(key_bias) != (q.shape[0], q.shape[2]):
        raise ValueError(f"BlockSparseAttention: key_bias must be [B, N] = {[q.shape[0], q.shape[2]]}, got "
                         f"{list(np.shape(key_bias))}")
    if block_size < 1 or top_k < 0 or sink < 0 or local < 0:
        raise ValueError(f"BlockSparseAttention: block_size must be >= 1 and top_k, sink, local >= 0, got "
                         f"{block_size}, {top_k}, {sink}, {local}")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"BlockSparseAttention: tau (the pooled mass to cover) must be in (0, 1], got {tau}")
    if window < 0 or (window and not causal):
        raise ValueError(f"BlockSparseAttention: window must be >= 0 and needs causal = 1, got window {window}, "
                         f"causal {causal}")
    if rectify not in (0, RECTIFY_TOKENS, RECTIFY_BLOCKS):
        raise ValueError(f"BlockSparseAttention: rectify must be 0 (off), {RECTIFY_TOKENS} (per token) or "
                         f"{RECTIFY_BLOCKS} (per block, as published), got {rectify}")
    b, h, n, d = q.shape
    nb = -(-n // block_size)
    pad = ((0, 0), (0, 0), (0, nb * block_size - n), (0, 0))
    qb, kb, vb = (np.pad(x.astype(np.float64), pad).reshape(b, h, nb, block_size, d) for x in (q, k, v))
    real = (np.arange(nb * block_size) < n).reshape(nb, block_size)  # [nb, bs]: the tokens that exist
    bias = np.where(real, np.pad(np.asarray(key_bias, np.float64), ((0, 0), (0, nb * block_size - n))
                                 ).reshape(b, nb, block_size), -np.inf)  # [B, nb, bs]
    # the block means and their spread count the tokens whose key is not masked (padding counts for nothing)
    pooling = (bias > MASKED_BIAS)[:, None, :, :, None]  # [B, 1, nb, bs, 1]
    pooled_counts = np.maximum(pooling.sum(axis=3), 1)  # [B, 1, nb, 1]
    qm, km, vm = ((x * pooling).sum(axis=3) / pooled_counts for x in (qb, kb, vb))  # block means [B, H, nb, Dh]
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    allowed = ((j <= i) if causal else np.ones((nb, nb), bool)) & (bias > MASKED_BIAS).any(axis=2)[:, None, None, :]
    if window:  # a block some query of block i sees a key of: the nearest pair closer than the window
        allowed &= (j >= i) | ((i - j - 1) * block_size + 1 < window)
    p = _softmax(np.where(allowed, qm @ km.swapaxes(-1, -2) * scale, -np.inf))  # [B, H, nb, nb]
    forced = ((j < sink) | (np.abs(i - j) < local)) & allowed
    # a window of whole blocks: the block at its edge, partly seen, is kept after the diagonal
    edge = ((j == i - window // block_size) & allowed) if window and window % block_size == 0 else np.zeros_like(allowed)
    forced |= edge
    # forced blocks first, the diagonal first of them, then the window's edge (when forced: the decomposition's causal
    # rule expects them there)
    chosen = np.argsort(-np.where(allowed, p + 2.0 * forced + 4.0 * (forced & (i == j)) + 2.0 * edge, -1.0), axis=-1,
                        kind="stable")
    chosen = chosen[..., :min(top_k, nb) if top_k > 0 else nb]  # [B, H, nb, K]
    mass = np.take_along_axis(p, chosen, axis=-1)
    kept = np.take_along_axis(np.broadcast_to(forced, p.shape), chosen, axis=-1) | (np.cumsum(mass, axis=-1) - mass < tau)
    selected = np.zeros(p.shape, bool)
    np.put_along_axis(selected, chosen, kept | (tau >= 1.0), axis=-1)
    selected &= allowed

    # exact attention over the selected blocks' tokens
    key_ok = selected[..., None, :, None] & real[None, None, None, None, :, :]  # [B, H, nb, 1, nb, bs]
    key_ok = np.broadcast_to(key_ok, (b, h, nb, block_size, nb, block_size)).copy()
    if causal:
        pos = np.arange(nb * block_size).reshape(nb, block_size)
        key_ok &= (pos[None, None, None, None] <= pos[None, None, :, :, None, None])
        if window:
            key_ok &= (pos[None, None, :, :, None, None] - pos[None, None, None, None] < window)
    logits = np.einsum("bhiqd,bhjkd->bhiqjk", qb, kb) * scale + bias[:, None, None, None]
    logits = np.where(key_ok, logits, -np.inf).reshape(b, h, nb, block_size, nb * block_size)
    values = vb.reshape(b, h, 1, nb * block_size, d)
    if rectify:  # GAPR: the skipped blocks whose pooled score is reliable
        dq = (np.abs(qb - qm[:, :, :, None]) * pooling).sum(axis=3) / pooled_counts
        dk = (np.abs(kb - km[:, :, :, None]) * pooling).sum(axis=3) / pooled_counts
        gain = np.abs(qm @ km.swapaxes(-1, -2))
        error = np.abs(dq @ km.swapaxes(-1, -2)) + np.abs(qm @ dk.swapaxes(-1, -2))
        pooled = allowed & ~selected & (gain > error) & ((j < i) if causal else True)
        if window:  # wholly inside the window of every query of the block
            pooled &= (i - j + 1) * block_size - 1 < window
    if rectify == RECTIFY_TOKENS:  # one pooled key per such block in every query's softmax
        tokens = pooled_counts[:, 0, :, 0]  # [B, nb]: a pooled key stands for the block's tokens not masked
        weight = np.log(tokens) + np.where(bias > MASKED_BIAS, bias, 0.0).sum(axis=2) / tokens
        pooled_logits = np.einsum("bhiqd,bhjd->bhiqj", qb, km) * scale + weight[:, None, None, None, :]
        probs = _softmax(np.concatenate([logits, np.where(pooled[:, :, :, None], pooled_logits, -np.inf)], axis=-1))
        out = probs[..., :nb * block_size] @ values + probs[..., nb * block_size:] @ vm[:, :, None]
    else:
        out = _softmax(logits) @ values  # [B, H, nb, bs, Dh]
    if rectify == RECTIFY_BLOCKS:  # the published formula: R·out + Σ P·v̄ over the pooled blocks
        kept_mass = (p * ~pooled).sum(axis=-1)  # R [B, H, nb]
        out = out * kept_mass[..., None, None] + ((p * pooled) @ vm)[:, :, :, None, :]
    out = np.where(selected.any(axis=-1)[..., None, None], out, 0.0)  # a query block that may see no key: zeros
    return (out.reshape(b, h, nb * block_size, d)[:, :, :n].astype(q.dtype),)


def decompose(b, q, k, v, key_bias):
    """The [block × selected keys] products and their softmax are the only work of the logits'
    size: q carries the scale; keys that must not count (a ragged last block's padding,
    slots beyond `tau`'s mass) get their -inf through the product (a bias column); padding,
    the key mask, the causal rule and the rectification run in If branches, so a call that
    needs none of them pays nothing for them."""
    bs, top_k, tau = b.attr("block_size"), b.attr("top_k"), b.CastLike(b.attr("tau"), q)
    scale = b.CastLike(b.attr("scale"), q)
    causal = b.Cast(b.attr("causal"), to=9)  # BOOL
    zero, one, ax = b.const(0), b.const(1), lambda *a: b.const(list(a))
    fconst = lambda x: b.CastLike(b.const(x, np.float32), q)  # noqa: E731
    minus_inf = fconst(-np.inf)
    n = b.Gather(b.Shape(q), b.const(2))
    nb = b.Div(b.Sub(b.Add(n, bs), one), bs)  # ceil(N / bs)
    padded = b.Mul(nb, bs)
    ragged = b.Greater(padded, n)
    as5 = b.Concat(ax(0, 0), b.Reshape(nb, ax(1)), b.Reshape(bs, ax(1)), ax(-1), axis=0)

    bias = b.CastLike(key_bias, q)
    as3 = b.Concat(ax(0), b.Reshape(nb, ax(1)), b.Reshape(bs, ax(1)), axis=0)

    def pad(sub):
        pads = sub.Concat(b.const([0, 0, 0, 0, 0, 0]), sub.Reshape(sub.Sub(padded, n), ax(1)), b.const([0]), axis=0)
        bias_pads = sub.Concat(b.const([0, 0, 0]), sub.Reshape(sub.Sub(padded, n), ax(1)), axis=0)
        return [*(sub.Reshape(sub.Pad(x, pads), as5) for x in (q, k, v)), sub.Reshape(sub.Pad(bias, bias_pads), as3)]

    qb, kb, vb, bias_blocks = _branch(b, ragged, pad, lambda sub: [*(sub.Reshape(x, as5) for x in (q, k, v)),
                                                                  sub.Reshape(bias, as3)], "pad", 4)
    pos = b.Reshape(b.Range(zero, padded, one), b.Concat(b.Reshape(nb, ax(1)), b.Reshape(bs, ax(1)), axis=0))
    real = b.Less(pos, n)  # [nb, bs]
    token_bias = b.Where(real, bias_blocks, minus_inf)  # [B, nb, bs]: the padding of a ragged block -inf
    counts = b.ReduceSum(b.CastLike(real, q), ax(1), keepdims=1)  # [nb, 1]
    # the block means count the tokens whose key is not masked (a masked one is padding)
    pooling = b.CastLike(b.Unsqueeze(b.Greater(token_bias, fconst(MASKED_BIAS)), ax(1, -1)), q)  # [B, 1, nb, bs, 1]
    masked_tokens = b.Less(b.ReduceMin(b.Where(real, token_bias, fconst(0.0)), keepdims=0), fconst(MASKED_BIAS))

    def pooled_means(sub):
        tokens = sub.Max(sub.ReduceSum(pooling, ax(3), keepdims=0), fconst(1.0))  # [B, 1, nb, 1]
        return [*(sub.Div(sub.ReduceSum(sub.Mul(x, pooling), ax(3), keepdims=0), tokens) for x in (qb, kb, vb)),
                tokens]

    def means(sub):
        return [*(sub.Div(sub.ReduceSum(x, ax(3), keepdims=0), counts) for x in (qb, kb, vb)),
                sub.Unsqueeze(counts, ax(0, 1))]  # [1, 1, nb, 1]: both branches of one rank (OpenVINO)

    qm, km, vm, pooled_counts = _branch(b, masked_tokens, pooled_means, means, "pooled_means", 4)  # [B, H, nb, Dh]
    km_t = b.Transpose(km, perm=[0, 1, 3, 2])
    q_scaled = b.Mul(qb, scale)  # the queries of every product with keys
    blocks = b.Range(zero, nb, one)
    i, j = b.Unsqueeze(blocks, ax(1)), b.Unsqueeze(blocks, ax(0))
    seen = b.Greater(b.ReduceMax(token_bias, ax(2), keepdims=0), fconst(MASKED_BIAS))  # [B, nb]: a key not masked
    window = b.attr("window")
    windowed = b.Greater(window, zero)
    # (with a window: a block some query of block i sees a key of)
    in_window = b.Or(b.Not(windowed), b.Or(b.GreaterOrEqual(j, i), b.Less(b.Add(b.Mul(b.Sub(b.Sub(i, j), one), bs), one),
                                                                           window)))
    allowed = b.And(b.And(b.Or(b.Not(causal), b.LessOrEqual(j, i)), in_window),
                    b.Unsqueeze(seen, ax(1, 2)))  # [B, 1, nb, nb]
    pooled_dot = b.MatMul(qm, km_t)  # q̄·k̄ [B, H, nb, nb]: the pooled logits, and GAPR's gain
    p = b.Softmax(b.Where(allowed, b.Mul(pooled_dot, scale), minus_inf), axis=-1)  # [B, H, nb, nb]
    distance = b.Abs(b.Sub(i, j))
    # a window of whole blocks: the block at its edge (partly seen) is forced, in slot 1 after the diagonal
    whole = b.And(windowed, b.Equal(b.Mod(window, bs), zero))
    edge = b.And(b.And(whole, b.Equal(j, b.Sub(i, b.Div(window, bs)))), allowed)
    forced = b.Or(b.And(b.Or(b.Less(j, b.attr("sink")), b.Less(distance, b.attr("local"))), allowed), edge)
    lead = b.And(forced, b.Equal(i, j))  # the diagonal, when forced, in slot 0: see causal_rule
    rank = b.Where(allowed, b.Add(b.Add(p, b.Add(b.Mul(b.CastLike(forced, q), fconst(2.0)), b.Mul(b.CastLike(lead, q),
                                                                                                 fconst(4.0)))),
                                  b.Mul(b.CastLike(edge, q), fconst(2.0))), fconst(-1.0))
    count = b.Where(b.Greater(top_k, zero), b.Min(top_k, nb), nb)
    ranked, chosen = b.TopK(rank, b.Reshape(count, ax(1)), axis=-1, largest=1, sorted=1, _outputs=2)  # [B, H, nb, K]
    # a slot counts if its block may be seen and is forced or comes before tau's mass is reached
    mass_before = b.CumSum(b.GatherElements(p, chosen, axis=-1), b.const(-1), exclusive=1)
    within_tau = b.Or(b.Less(mass_before, tau), b.GreaterOrEqual(tau, fconst(1.0)))
    chosen_ok = b.And(b.Greater(ranked, fconst(-0.5)), b.Or(b.Greater(ranked, fconst(1.5)), within_tau))

    # the selected blocks' keys and values, [B, H, nb, K·bs, Dh], and their products with the query blocks
    where = b.Unsqueeze(chosen, ax(-1))

    def per_query_block(g, blocks):  # [B, H, nb, K, bs, D] -> [B, H, nb, K·bs, D]
        return g.Reshape(blocks, g.Concat(ax(0, 0, 0, -1), g.Shape(blocks, start=-1), axis=0))

    v_sel = per_query_block(b, b.GatherND(vb, where, batch_dims=2))

    def all_keys(sub):
        """Every selected key counts: q·scale against the selected keys."""
        k_sel = per_query_block(sub, sub.GatherND(kb, where, batch_dims=2))
        return [sub.MatMul(q_scaled, sub.Transpose(k_sel, perm=[0, 1, 2, 4, 3]))]

    def with_ones(sub):  # [q·scale, 1]: [B, H, nb, bs, Dh + 1], against keys with a bias column
        return sub.Concat(q_scaled, sub.Expand(fconst([1.0]), sub.Concat(sub.Shape(qb, start=0, end=4), ax(1), axis=0)),
                          axis=-1)

    def key_masked(sub):
        """q' = [q·scale, 1] against k' = [k, bias] with each key's own bias (padding -inf), the
        column joined to the key blocks before they are gathered (a pass over N keys, not over
        the blocks × K·bs selected): the biased logits without a pass over the logits."""
        heads_bias = sub.Expand(sub.Unsqueeze(token_bias, ax(1, -1)), sub.Concat(sub.Shape(kb, start=0, end=4), ax(1),
                                                                                  axis=0))  # [B, H, nb, bs, 1]
        k_aug = per_query_block(sub, sub.GatherND(sub.Concat(kb, heads_bias, axis=-1), where, batch_dims=2))
        return [sub.MatMul(with_ones(sub), sub.Transpose(k_aug, perm=[0, 1, 2, 4, 3]))]

    def slot_masked(sub):
        """As key_masked, with the slots past tau's mass masked too: a bias per (query block, slot)."""
        per_batch = sub.Reshape(chosen, sub.Concat(sub.Shape(chosen, start=0, end=1), ax(-1, 1), axis=0))
        bias_sel = sub.Reshape(sub.GatherND(token_bias, per_batch, batch_dims=1),  # [B, H, nb, K, bs]
                               sub.Concat(sub.Shape(chosen), sub.Reshape(bs, ax(1)), axis=0))
        bias_sel = sub.Reshape(sub.Where(sub.Unsqueeze(chosen_ok, ax(-1)), bias_sel, minus_inf), ax(0, 0, 0, -1))
        k_sel = per_query_block(sub, sub.GatherND(kb, where, batch_dims=2))
        k_aug = sub.Concat(k_sel, sub.Unsqueeze(bias_sel, ax(-1)), axis=-1)  # [B, H, nb, K·bs, Dh + 1]
        return [sub.MatMul(with_ones(sub), sub.Transpose(k_aug, perm=[0, 1, 2, 4, 3]))]

    biased = b.Greater(b.ReduceMax(b.Abs(bias), keepdims=0), fconst(0.0))

    def diagonal_first(sub, logits, edge: bool = False):
        """The causal rule when every query block's diagonal leads its slots (forced: local >= 1;
        seen: no block wholly masked): a triangle over slot 0's keys, and a bias per slot for the
        slots that count for nothing (fewer than K allowed blocks, or past tau), as two
        broadcast Adds (ONNX Runtime's Where over the logits costs ~8× its Add). `edge`: a
        window of whole blocks, whose edge block (forced) is slot 1 of the query blocks that
        have one (i >= window / block_size): the keys at and below its diagonal are masked too."""
        # (the width from chosen's shape: a Shape of the logits would read them after the Adds, which then could not
        # write over them)
        rows, cols = sub.Range(zero, bs, one), sub.Range(zero, sub.Mul(sub.Gather(sub.Shape(chosen), b.const(-1)), bs), one)
        row, col = sub.Unsqueeze(rows, ax(1)), sub.Unsqueeze(cols, ax(0))
        above = sub.And(sub.Greater(col, row), sub.Less(cols, bs))  # [bs, K·bs]
        if edge:  # [nb, bs, K·bs]
            below = sub.And(sub.LessOrEqual(sub.Sub(col, bs), row), sub.And(sub.GreaterOrEqual(cols, bs),
                                                                          sub.Less(cols, sub.Mul(bs, b.const(2)))))
            has_edge = sub.Unsqueeze(sub.GreaterOrEqual(blocks, sub.Div(window, bs)), ax(1, 2))
            above = sub.Or(above, sub.And(below, has_edge))
        triangle = sub.Where(above, minus_inf, fconst(0.0))
        slot_bias = sub.Reshape(sub.Expand(sub.Unsqueeze(sub.Where(chosen_ok, fconst(0.0), minus_inf), ax(-1)),
                                           sub.Concat(sub.Shape(chosen), sub.Reshape(bs, ax(1)), axis=0)),
                                ax(0, 0, 0, 1, -1))  # [B, H, nb, 1, K·bs]
        return sub.Add(sub.Add(logits, slot_bias), triangle)

    def window_first(sub, logits):
        """diagonal_first with a sliding window not of whole blocks: a key `window` or more positions before its query
        gets a very negative logit through one Min with a bound that is ±(at least 2^99): in float32
        from exact half-integers (key − query + window − ½, scaled by a power of two), so its sign
        is exact; casting to float16 makes it ±inf. One Sub and one Min over the logits (the
        general rule's Where and its boolean passes cost ~2× the products' time)."""
        big = 2.0**100
        key_pos = sub.Cast(sub.Reshape(sub.Add(sub.Mul(where, bs), sub.Range(zero, bs, one)), ax(0, 0, 0, 1, -1)), to=1)
        first = sub.Cast(sub.Reshape(sub.Mul(blocks, bs), ax(-1, 1, 1)), to=1)  # [nb, 1, 1]: the blocks' first query
        offset = sub.Cast(sub.Sub(window, one), to=1)  # the window's reach back, in positions
        reach = sub.Mul(sub.Add(sub.Sub(key_pos, first), sub.Add(offset, b.const(0.5, np.float32))), b.const(big, np.float32))
        rows = sub.Mul(sub.Cast(sub.Unsqueeze(sub.Range(zero, bs, one), ax(-1)), to=1), b.const(big, np.float32))  # [bs, 1]
        bound = sub.CastLike(sub.Sub(reach, rows), q)  # [B, H, nb, bs, K·bs]: > 0 where the key is in the window
        return sub.Min(diagonal_first(sub, logits), bound)

    def causal_rule(sub, logits):
        """Keys after the query, and slots that count for nothing (fewer than K allowed blocks,
        or past tau), masked."""
        key_pos = sub.Reshape(sub.Add(sub.Mul(where, bs), sub.Range(zero, bs, one)), ax(0, 0, 0, -1))  # [B, H, nb, K·bs]
        slot_ok = sub.Reshape(sub.Expand(sub.Unsqueeze(chosen_ok, ax(-1)),
                                         sub.Concat(sub.Shape(chosen), sub.Reshape(bs, ax(1)), axis=0)), ax(0, 0, 0, -1))
        before = sub.Sub(sub.Unsqueeze(pos, ax(-1)), sub.Unsqueeze(key_pos, ax(3)))  # query − key positions
        visible = sub.And(sub.Unsqueeze(slot_ok, ax(3)), sub.GreaterOrEqual(before, zero))
        return sub.Where(sub.And(visible, sub.Or(sub.Not(windowed), sub.Less(before, window))), logits, minus_inf)

    def products(rule, name: str):
        """The logits [B, H, nb, bs, K·bs] with `rule` (the causal masking, or none) applied in the
        branch that computes them: there its Adds write over them (on a value from outside the
        branch ONNX Runtime cannot, and allocates a new one)."""
        def ruled(product):
            return lambda sub: [rule(sub, product(sub)[0])]

        def masked(sub):
            # (without tau, a slot that is not allowed holds a wholly masked block, or a later one,
            # which the causal rule masks: per-key biases cover it)
            return [_branch(sub, sub.Less(tau, fconst(1.0)), ruled(slot_masked), ruled(key_masked), f"{name}_slot_masked")]

        return lambda sub: [_branch(sub, per_key_bias, masked, ruled(all_keys), f"{name}_masked_keys")]

    per_key_bias = b.Or(b.Or(ragged, biased), b.Less(tau, fconst(1.0)))
    leads = b.And(b.Greater(b.attr("local"), zero), b.Cast(b.ReduceMin(b.Cast(seen, to=6), keepdims=0), to=9))

    def causal_logits(sub):
        def windows(win):
            return [_branch(win, whole, products(lambda s, x: diagonal_first(s, x, edge=True), "edge_first"),
                            products(window_first, "window_first"), "whole_blocks")]

        def first(lead):
            return [_branch(lead, windowed, windows, products(diagonal_first, "diagonal"), "windowed")]

        return [_branch(sub, leads, first, products(causal_rule, "causal_rule"), "diagonal_first")]

    logits = _branch(b, causal, causal_logits, products(lambda sub, x: x, "plain"), "causal")
    # per-token rectification reads the sparse softmax's log-sum-exp back as max logit − log max
    # probability: the max is taken before the Softmax, so the Softmax stays the logits' last
    # reader and writes over them (a reader after it would keep them alive: several times
    # slower on ONNX Runtime), and the max probability is one more cheap pass
    top_logit = _branch(b, b.Equal(b.attr("rectify"), b.const(RECTIFY_TOKENS)),
                        lambda sub: [sub.ReduceMax(logits, ax(-1), keepdims=1)], lambda sub: [sub.Identity(minus_inf)],
                        "top_logit")
    probs = b.Softmax(logits, axis=-1)
    sparse = b.MatMul(probs, v_sel)  # [B, H, nb, bs, Dh]

    def rectified(sub):
        """GAPR's pooled blocks, then per token (the pooled keys join each query's softmax: the
        sparse softmax's log-sum-exp weighs them) or per block (R·sparse + Σ P·v̄)."""
        one_hot = sub.OneHot(chosen, sub.Reshape(nb, ax(1)), fconst([0.0, 1.0]), axis=-1)
        selected = sub.ReduceMax(sub.Mul(one_hot, sub.Unsqueeze(sub.CastLike(chosen_ok, q), ax(-1))), ax(3),
                                 keepdims=0)  # [B, H, nb, nb]
        def spread(x, m):
            """mean |x − x̄| over the tokens a block's mean counts: the padding of a ragged block
            (zeros) adds |x̄| per padded token; masked tokens are multiplied out."""
            def weighted(w):
                return [w.Div(w.ReduceL1(w.Mul(w.Sub(x, w.Unsqueeze(m, ax(3))), pooling), ax(3), keepdims=0),
                              pooled_counts)]

            def unweighted(u):
                missing = u.Sub(u.CastLike(bs, q), counts)  # [nb, 1]
                return [u.Div(u.Sub(u.ReduceL1(u.Sub(x, u.Unsqueeze(m, ax(3))), ax(3), keepdims=0),
                                    u.Mul(missing, u.Abs(m))), counts)]

            return _branch(sub, masked_tokens, weighted, unweighted, "spread")

        dq, dk = spread(qb, qm), spread(kb, km)
        gain = sub.Abs(pooled_dot)
        error = sub.Add(sub.Abs(sub.MatMul(dq, km_t)), sub.Abs(sub.MatMul(qm, sub.Transpose(dk, perm=[0, 1, 3, 2]))))
        past = sub.Or(sub.Not(causal), sub.Less(j, i))  # wholly in the past, and within every query's window
        past = sub.And(past, sub.Or(sub.Not(windowed), sub.Less(sub.Sub(sub.Mul(sub.Add(sub.Sub(i, j), one), bs), one),
                                                                 window)))
        pooled = sub.And(sub.And(sub.And(allowed, past), sub.Greater(gain, error)), sub.Less(selected, fconst(0.5)))

        def per_token(tok):
            # a pooled key stands for its block's tokens whose key is not masked: their count, mean bias
            tokens = tok.Squeeze(pooled_counts, ax(1, 3))  # [B | 1, nb]
            counted = tok.Greater(token_bias, fconst(MASKED_BIAS))
            weight = tok.Add(tok.Log(tokens), tok.Div(tok.ReduceSum(tok.Where(counted, token_bias, fconst(0.0)), ax(2),
                                                                    keepdims=0), tokens))  # [B, nb]
            weight = tok.Where(pooled, tok.Unsqueeze(weight, ax(1, 2)), minus_inf)  # [B, H, nb, nb]: -inf not pooled
            pooled_logits = tok.Add(tok.MatMul(q_scaled, tok.Unsqueeze(km_t, ax(2))),
                                    tok.Unsqueeze(weight, ax(3)))  # [B, H, nb, bs, nb]
            # the sparse softmax's log-sum-exp [B, H, nb, bs, 1] (ONNX Runtime's ReduceLogSumExp
            # is 10× slower than its Softmax): its top probability is exp(top logit − lse)
            lse = tok.Sub(top_logit, tok.Log(tok.ReduceMax(probs, ax(-1), keepdims=1)))
            top = tok.Max(lse, tok.ReduceMax(pooled_logits, ax(-1), keepdims=1))
            sparse_w, pooled_w = tok.Exp(tok.Sub(lse, top)), tok.Exp(tok.Sub(pooled_logits, top))
            total = tok.Add(sparse_w, tok.ReduceSum(pooled_w, ax(-1), keepdims=1))
            mixed = tok.Add(tok.Mul(sparse, sparse_w), tok.MatMul(pooled_w, tok.Unsqueeze(vm, ax(2))))
            return [tok.Div(mixed, total)]

        def per_block(blk):
            pooled_p = blk.Mul(p, blk.CastLike(pooled, q))
            kept = blk.Sub(blk.ReduceSum(p, ax(-1), keepdims=1), blk.ReduceSum(pooled_p, ax(-1), keepdims=1))
            return [blk.Add(blk.Mul(sparse, blk.Unsqueeze(kept, ax(-1))),
                            blk.Unsqueeze(blk.MatMul(pooled_p, vm), ax(3)))]

        return [_branch(sub, sub.Equal(b.attr("rectify"), b.const(RECTIFY_BLOCKS)), per_block, per_token, "per_block")]

    out = _branch(b, b.Greater(b.attr("rectify"), zero), rectified, lambda sub: [sub.Identity(sparse)], "rectify")
    # a query block that may see no key block (all of them masked) has no softmax: zeros; so has a
    # causal query whose keys up to itself are all -inf (a left-padded prompt's padding: its
    # softmax, over -inf only, is NaN, which would reach the real tokens through its values)
    sees = b.Unsqueeze(b.ReduceMax(b.CastLike(chosen_ok, q), ax(-1), keepdims=1), ax(-1))  # [B, H, nb, 1, 1]
    blind_rows = b.And(causal, b.Equal(b.ReduceMin(bias, keepdims=0), minus_inf))
    out = _branch(b, b.Or(b.Less(b.ReduceMin(sees, keepdims=0), fconst(0.5)), blind_rows),
                  lambda sub: [sub.Where(sub.And(sub.Greater(sees, fconst(0.5)), sub.Not(sub.IsNaN(out))), out,
                                         fconst(0.0))],
                  lambda sub: [sub.Identity(out)], "blind")
    out = b.Reshape(out, b.Concat(ax(0, 0, -1), b.Slice(b.Shape(v), ax(3), ax(4)), axis=0))
    return b.Slice(out, ax(0), b.Reshape(n, ax(1)), ax(2))


def _branch(b, condition, then, otherwise, name: str, count: int = 1):
    """If(condition) with branches built by `then(sub)` / `otherwise(sub)` (their nodes may read
    any value built before), each returning `count` values."""
    outputs = [(f"{name}_out{i}", None, None) for i in range(count)]
    return b.If(condition, then_branch=b.subgraph(f"{name}_then", [], then, outputs),
                else_branch=b.subgraph(f"{name}_else", [], otherwise, outputs), _outputs=count)


def examples(rng):
    """Ragged last blocks, causal and not, sinks and local blocks, a sliding window, a mass
    threshold, padded keys (a left-padded prompt's first blocks see no key) and a finite key
    bias, every block selected, batch > 1."""
    cases = []
    for (batch, heads, n, dh), attrs, bias in [
        ((1, 1, 8, 4), {"block_size": 4, "top_k": 0}, None),
        ((2, 3, 37, 8), {"block_size": 8, "top_k": 2, "sink": 1, "local": 1, "rectify": 1}, "padding"),
        ((1, 2, 45, 16), {"block_size": 8, "top_k": 3, "sink": 1, "local": 1, "causal": 1, "rectify": 1}, None),
        ((2, 2, 30, 8), {"block_size": 4, "top_k": 4, "sink": 0, "local": 2, "causal": 0, "rectify": 0}, "random"),
        ((1, 2, 64, 8), {"block_size": 8, "top_k": 6, "tau": 0.7, "causal": 0, "rectify": 1}, None),
        ((2, 2, 40, 8), {"block_size": 8, "top_k": 2, "causal": 1, "rectify": 2}, "padding"),
        ((2, 2, 30, 8), {"block_size": 4, "top_k": 3, "causal": 1, "rectify": 1}, "left_padding"),
        ((2, 2, 40, 8), {"block_size": 8, "top_k": 3, "causal": 1, "rectify": 1, "window": 13}, "left_padding"),
    ]:
        q, k, v = (rng.standard_normal((batch, heads, n, dh)).astype(np.float32) for _ in range(3))
        cases.append(([q, k, v, key_bias(rng, batch, n, bias)], {"scale": dh**-0.5, **attrs}))
    return cases


def key_bias(rng, batch: int, n: int, kind: str | None) -> np.ndarray:
    """A [batch, n] key bias for tests: None (zeros), "padding" (row r's last 9·r keys
    masked, as a padded batch's mask is), "left_padding" (row r's first 10·r keys masked, as
    a left-padded prompt's) or "random" (finite, standard normal)."""
    if kind == "random":
        return rng.standard_normal((batch, n)).astype(np.float32)
    bias = np.zeros((batch, n), np.float32)
    for row in range(batch):
        if kind == "padding":
            bias[row, n - 9 * row:] = np.finfo(np.float32).min
        elif kind == "left_padding":
            bias[row, :10 * row] = np.finfo(np.float32).min
    return bias


OP = OpDef.of_module(
    __name__,
    inputs=(
        TensorSpec("q", "queries [B, H, N, Dh]"),
        TensorSpec("k", "keys [B, H, N, Dh] (the heads of q: grouped heads repeated)"),
        TensorSpec("v", "values [B, H, N, Dh]"),
        TensorSpec("key_bias", "[B, N] added to every query's logit of the key (padding: a large negative number)"),
    ),
    outputs=(TensorSpec("out", "attention output [B, H, N, Dh]"),),
    attributes=(
        AttrSpec("block_size", int, "tokens per block (the last block may be shorter)", 64),
        AttrSpec("top_k", int, "key blocks each query block attends, the always-kept ones included (0: all)", 0),
        AttrSpec("tau", float, "besides top_k: a query block stops at the blocks (by pooled mass, largest first) that "
                 "cover this share of its mass; the rest of its top_k slots are masked (1: no threshold)", 1.0),
        AttrSpec("sink", int, "the first blocks every query block keeps", 1),
        AttrSpec("local", int, "blocks within this distance of the diagonal are always kept (1: the diagonal)", 1),
        AttrSpec("causal", int, "1: a query sees no later key (decoders)", 0),
        AttrSpec("window", int, "a sliding window (causal only): a query sees no key this many positions or more "
                 "before it (0: none)", 0),
        AttrSpec("rectify", int, "0: off; 1: the reliable skipped blocks as pooled keys in every query's softmax; 2: "
                 "Rectified SpaAttn's per-block formula", 1),
        AttrSpec("scale", float, "multiplier applied to q·kᵀ before the softmax", 1.0),
    ),
)
