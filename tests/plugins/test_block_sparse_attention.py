"""BlockSparseAttention: every block selected is dense attention; the selection rule by hand;
decomposition on ORT == reference == Triton kernel (interpreter) on ragged blocks, causal
masks and batch > 1; the decomposition's FLOPs follow the density; rectification lowers
the error on inputs with locality."""

from __future__ import annotations

import numpy as np
import pytest

from tests.plugins.op_testing import FakeDesc, decomposition_model, fake_tensorrt, run_decomposition, run_triton
from trimrt.plugins import REGISTRY
from trimrt.plugins import tensorrt_glue as glue
from trimrt.plugins.block_sparse_attention import key_bias

OP = REGISTRY["BlockSparseAttention"]


def _qkv(rng, b, h, n, d, dtype=np.float32):
    return [rng.standard_normal((b, h, n, d)).astype(dtype) for _ in range(3)]


def _unbiased(q):
    """The key bias of no mask: zeros [B, N]."""
    return np.zeros((q.shape[0], q.shape[2]), q.dtype)


def _dense(q, k, v, causal: bool, scale: float) -> np.ndarray:
    logits = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) * scale
    if causal:
        n = q.shape[2]
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v.astype(np.float64)


def _local_qkv(rng, b, h, n, d):
    """Queries and keys that vary smoothly along the sequence (nearby tokens attend each
    other, as in images and video), values with the same locality."""
    t = np.arange(n)[:, None] / n
    basis = np.concatenate([np.sin(2 * np.pi * f * t + rng.random()) for f in rng.uniform(0.5, 4, d)], axis=1)
    make = lambda: (basis + 0.3 * rng.standard_normal((b, h, n, d))).astype(np.float32)  # noqa: E731
    return [make(), make(), make()]


@pytest.mark.parametrize("n, block_size", [(37, 8), (32, 8), (5, 8)])
@pytest.mark.parametrize("causal", [0, 1])
def test_every_block_selected_is_dense_attention(n, block_size, causal, rng):
    q, k, v = _qkv(rng, 2, 3, n, 8)
    want = _dense(q, k, v, causal, 8**-0.5)
    for top_k in (0, -(-n // block_size)):
        attrs = {"block_size": block_size, "top_k": top_k, "causal": causal, "rectify": 1, "scale": 8**-0.5}
        np.testing.assert_allclose(OP.run_reference(q, k, v, _unbiased(q), **attrs)[0], want, atol=1e-5)
        got = run_decomposition("BlockSparseAttention", [q, k, v, _unbiased(q)], **attrs)[0]
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("causal", [0, 1])
def test_every_block_selected_is_dense_attention_over_the_keys_not_masked(causal, rng):
    """A padded batch: row 1's last 9 keys masked (a whole block and part of another), row 0
    unmasked, and a finite bias on top; every block selected is dense attention with the bias."""
    q, k, v = _qkv(rng, 2, 3, 37, 8)
    bias = key_bias(rng, 2, 37, "padding") + 0.5 * rng.standard_normal((2, 37)).astype(np.float32)
    logits = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) * 8**-0.5 + bias[:, None, None, :]
    if causal:
        logits = np.where(np.tril(np.ones((37, 37), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    want = (p / p.sum(axis=-1, keepdims=True)) @ v
    attrs = {"block_size": 8, "top_k": 0, "causal": causal, "rectify": 1, "scale": 8**-0.5}
    np.testing.assert_allclose(OP.run_reference(q, k, v, bias, **attrs)[0], want, atol=1e-5)
    np.testing.assert_allclose(run_decomposition("BlockSparseAttention", [q, k, v, bias], **attrs)[0], want, atol=1e-5)


@pytest.mark.parametrize("rectify", [0, 1, 2])
@pytest.mark.parametrize("causal", [0, 1])
def test_padding_counts_for_nothing(rectify, causal, rng):
    """A right-padded batch (row 1's last 9 tokens padding: masked keys, of any values): the
    real tokens of row 1 get what the row alone, unpadded, gets (no block mean, selection or
    pooled key counts the padding)."""
    q, k, v = _qkv(rng, 2, 2, 45, 8)
    bias = key_bias(rng, 2, 45, "padding")
    attrs = {"block_size": 8, "top_k": 2, "causal": causal, "rectify": rectify, "scale": 8**-0.5}
    alone = [x[1:, :, :36] for x in (q, k, v)]
    want = OP.run_reference(*alone, _unbiased(alone[0]), **attrs)[0]
    for got in (OP.run_reference(q, k, v, bias, **attrs)[0],
                run_decomposition("BlockSparseAttention", [q, k, v, bias], **attrs)[0]):
        np.testing.assert_allclose(got[1:, :, :36], want, atol=1e-5)


@pytest.mark.parametrize("rectify", [0, 1, 2])
def test_a_query_block_that_may_see_no_key_gives_zeros(rectify, rng):
    """A left-padded causal prompt (row 1's first 10 keys masked: block 0 wholly, with blocks
    of 8): its first query block may see no key block and gives zeros, not NaN (it would
    poison a decoder's cache); the rows after it are attention over the keys not masked."""
    q, k, v = _qkv(rng, 2, 2, 29, 8)
    bias = key_bias(rng, 2, 29, "left_padding")
    attrs = {"block_size": 8, "top_k": 0, "causal": 1, "rectify": rectify, "scale": 8**-0.5}
    for got in (OP.run_reference(q, k, v, bias, **attrs)[0],
                run_decomposition("BlockSparseAttention", [q, k, v, bias], **attrs)[0]):
        assert np.isfinite(got).all()
        assert (got[1, :, :8] == 0).all() and (got[0, :, :8] != 0).all()
        want = _dense(q[1:, :, 10:], k[1:, :, 10:], v[1:, :, 10:], True, 8**-0.5)
        np.testing.assert_allclose(got[1, :, 10:], want[0], atol=1e-5)


@pytest.mark.parametrize("rectify", [0, 1])
def test_a_causal_query_whose_keys_are_all_minus_inf_gives_zeros(rectify, rng, device):
    """A left-padded causal prompt masked with -inf (a boolean mask's, as exports write it):
    row 1's first 5 tokens see only masked keys inside a block that has keys to see. Their
    softmax is over -inf only: zeros, as PyTorch's exported attention gives them (NaN would
    reach the real tokens through their values), from reference, decomposition and kernel."""
    q, k, v = _qkv(rng, 2, 2, 24, 8)
    bias = np.zeros((2, 24), np.float32)
    bias[1, :5] = -np.inf
    attrs = {"block_size": 8, "top_k": 2, "causal": 1, "rectify": rectify, "scale": 8**-0.5}
    want = OP.run_reference(q, k, v, bias, **attrs)[0]
    assert (want[1, :, :5] == 0).all() and np.isfinite(want).all()
    np.testing.assert_allclose(run_decomposition("BlockSparseAttention", [q, k, v, bias], **attrs)[0], want, atol=1e-5)
    np.testing.assert_allclose(run_triton(OP, [q, k, v, bias], device, **attrs)[0], want, atol=1e-5)


@pytest.mark.parametrize("padding", [None, "left_padding"])  # (the diagonal-first rule; the general one)
@pytest.mark.parametrize("window", [5, 8, 13, 16, 20])  # (8 and 16: whole blocks)
def test_a_sliding_window_sees_no_key_window_positions_back(window, padding, rng, device):
    """Every block selected with a window is dense causal attention within the window (a
    Mistral layer's); fewer blocks: decomposition and kernel are the reference, and a key
    outside every query's window is never seen (its value changes nothing)."""
    q, k, v = _qkv(rng, 2, 2, 45, 8)
    bias = key_bias(rng, 2, 45, padding)
    t = np.arange(45)
    logits = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) * 0.3 + bias[:, None, None, :]
    logits = np.where((t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window), logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    dense = (p / p.sum(axis=-1, keepdims=True)) @ v
    attrs = {"block_size": 8, "causal": 1, "scale": 0.3, "window": window}
    rows = np.broadcast_to((bias > -1e4)[:, None, :, None], dense.shape)
    every = OP.run_reference(q, k, v, bias, top_k=0, rectify=1, **attrs)[0]
    np.testing.assert_allclose(every[rows], dense[rows], atol=1e-5)
    for rectify in (0, 1, 2):
        want = OP.run_reference(q, k, v, bias, top_k=2, rectify=rectify, **attrs)[0]
        np.testing.assert_allclose(run_decomposition("BlockSparseAttention", [q, k, v, bias], top_k=2, rectify=rectify,
                                                     **attrs)[0], want, atol=1e-5)
        np.testing.assert_allclose(run_triton(OP, [q, k, v, bias], device, top_k=2, rectify=rectify, **attrs)[0], want,
                                   atol=1e-5)
        far = v.copy()
        far[:, :, :44 - window - 8] += 100.0  # keys the last block's queries never see
        np.testing.assert_allclose(OP.run_reference(q, k, far, bias, top_k=2, rectify=rectify, **attrs)[0][:, :, 40:],
                                   want[:, :, 40:], atol=1e-5)


def test_a_window_of_whole_blocks_keeps_the_block_at_its_edge(rng):
    """Blocks of 8, a window of 16, two slots and no sink: query block 3 keeps its diagonal
    and block 1, at the window's edge (partly seen), whatever the pooled scores say; block 2
    is not attended (its values change nothing)."""
    q, k, v = _qkv(rng, 1, 2, 32, 8)
    attrs = {"block_size": 8, "top_k": 2, "sink": 0, "local": 1, "causal": 1, "rectify": 0, "scale": 0.3, "window": 16}
    want = OP.run_reference(q, k, v, _unbiased(q), **attrs)[0]
    for block, moves in ((1, True), (2, False)):
        changed = v.copy()
        changed[:, :, 8 * block:8 * block + 8] += 10.0
        got = OP.run_reference(q, k, changed, _unbiased(q), **attrs)[0]
        assert (np.abs(got[:, :, 24:] - want[:, :, 24:]).max() > 1e-3) == moves
        np.testing.assert_allclose(run_decomposition("BlockSparseAttention", [q, k, changed, _unbiased(q)], **attrs)[0],
                                   got, atol=1e-5)


def test_one_block_each_is_block_diagonal_attention(rng):
    """top_k = 1 with the diagonal always kept: each query block attends its own block."""
    q, k, v = _qkv(rng, 1, 2, 12, 4)
    (got,) = OP.run_reference(q, k, v, _unbiased(q), block_size=4, top_k=1, sink=0, local=1, causal=0, rectify=0,
                              scale=0.5)
    for blk in range(3):
        part = slice(4 * blk, 4 * blk + 4)
        np.testing.assert_allclose(got[:, :, part], _dense(q[:, :, part], k[:, :, part], v[:, :, part], False, 0.5),
                                   atol=1e-6)


def test_the_sink_and_the_highest_pooled_blocks_are_selected():
    """Four blocks of one token: query block 3 keeps the sink (0), its diagonal (3) and the
    block its pooled score ranks first (2, whose key is the query's direction)."""
    q = np.zeros((1, 1, 4, 4), np.float32)
    q[0, 0, 3, 0] = 1
    k = np.array([[[[0, 1, 0, 0], [0, -1, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0]]]], np.float32)
    v = np.eye(4, dtype=np.float32)[None, None]
    (got,) = OP.run_reference(q, k, v, _unbiased(q), block_size=1, top_k=3, sink=1, local=1, causal=0, rectify=0,
                              scale=1.0)
    row = got[0, 0, 3]
    assert row[1] == 0 and row[0] > 0 and row[2] > 0 and row[3] > 0  # block 1 skipped
    logits = np.array([0.0, 4.0, 0.0])  # keys 0, 2, 3
    np.testing.assert_allclose(row[[0, 2, 3]], np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)


@pytest.mark.parametrize("attrs", [
    {"block_size": 8, "top_k": 2, "causal": 1, "rectify": 1},
    {"block_size": 16, "top_k": 3, "causal": 0, "rectify": 1, "sink": 0, "local": 2},
    {"block_size": 5, "top_k": 2, "causal": 0, "rectify": 0},
    {"block_size": 8, "top_k": 5, "tau": 0.6, "causal": 0, "rectify": 1},
    {"block_size": 8, "top_k": 4, "tau": 0.5, "causal": 1, "rectify": 1, "local": 0},
    {"block_size": 8, "top_k": 2, "causal": 1, "rectify": 2},
    {"block_size": 16, "top_k": 1, "causal": 0, "rectify": 2, "sink": 0},
])
@pytest.mark.parametrize("bias", [None, "padding", "left_padding", "random"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decomposition_and_kernel_match_the_reference(attrs, bias, dtype, rng, device):
    ins = _qkv(rng, 2, 2, 45, 16, dtype)
    ins.append(np.maximum(key_bias(rng, 2, 45, bias), np.finfo(dtype).min).astype(dtype))
    attrs = {**attrs, "scale": 0.25}
    want = OP.run_reference(*ins, **attrs)[0]
    tol = 1e-5 if dtype == np.float32 else 2e-2
    got = run_decomposition("BlockSparseAttention", ins, **attrs)[0]
    assert got.dtype == dtype
    # compared at the tokens that are not padding: a padding token counts in no block mean, so
    # a query block of padding alone ranks the key blocks by ties (and what a padding query sees
    # of masked keys only is rounding: float16's lowest bias swallows the logits)
    rows = np.broadcast_to((ins[3] > -1e4)[:, None, :, None], want.shape)
    np.testing.assert_allclose(got.astype(np.float32)[rows], want.astype(np.float32)[rows], atol=tol)
    (kernel,) = run_triton(OP, ins, device, **attrs)
    np.testing.assert_allclose(kernel.astype(np.float32)[rows], want.astype(np.float32)[rows], atol=tol)
    assert np.isfinite(got).all() and np.isfinite(kernel).all()


def test_tau_keeps_the_blocks_that_cover_its_mass():
    """Pooled probabilities 0.5, 0.3, 0.15, 0.05 (one token per block; the query block 0 has
    no forced block): tau 0.7 keeps the first two (0.5 < 0.7, 0.8 >= 0.7 stops), tau 0.85 three,
    tau 1.0 all of top_k; the kept keys' softmax is renormalised among them."""
    weights = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    q = np.zeros((1, 1, 4, 4), np.float32)
    q[0, 0, 0, 0] = 1.0
    k = np.zeros((1, 1, 4, 4), np.float32)
    k[0, 0, :, 0] = weights
    v = np.eye(4, dtype=np.float32)[None, None]
    for tau, kept in ((0.7, 2), (0.85, 3), (1.0, 4)):
        attrs = {"block_size": 1, "top_k": 4, "tau": tau, "sink": 0, "local": 0, "rectify": 0, "scale": 1.0}
        row = OP.run_reference(q, k, v, _unbiased(q), **attrs)[0][0, 0, 0]
        want = np.zeros(4)
        want[:kept] = np.exp(weights[:kept]) / np.exp(weights[:kept]).sum()
        np.testing.assert_allclose(row, want, atol=1e-6)
        got = run_decomposition("BlockSparseAttention", [q, k, v, _unbiased(q)], **attrs)[0]
        np.testing.assert_allclose(got[0, 0, 0], want, atol=1e-6)


def test_the_decomposition_computes_only_the_selected_blocks(rng):
    """Matmul FLOPs of the decomposition at 2 of 16 blocks: about an eighth of dense (the If
    branches taken are counted)."""
    from trimrt.compiler.flops import count_flops

    ins = _qkv(rng, 1, 2, 256, 16)
    ins.append(_unbiased(ins[0]))
    feeds = dict(zip(["q", "k", "v", "key_bias"], ins))
    attrs = OP.attribute_values({"block_size": 16, "scale": 0.25, "rectify": 0})  # every attribute, as passes emit
    flops = {top_k: count_flops(decomposition_model(OP, ins, **{**attrs, "top_k": top_k}), feeds) for top_k in (0, 2)}
    assert flops[2] / flops[0] < 2 / 16 + 0.03
    # per-token rectification adds one pooled key per block to each query: 16 columns to its 32
    rectified = count_flops(decomposition_model(OP, ins, **{**attrs, "top_k": 2, "rectify": 1}), feeds)
    assert rectified / flops[2] < 1 + 16 / 32 + 0.05


def test_rectification_lowers_the_error_on_inputs_with_locality(rng):
    q, k, v = _local_qkv(rng, 1, 2, 256, 16)
    want = _dense(q, k, v, False, 0.5)
    for top_k in (2, 4, 8):  # 12.5%, 25% and 50% of the blocks
        errors = [np.linalg.norm(OP.run_reference(q, k, v, _unbiased(q), block_size=16, top_k=top_k, rectify=r,
                                                  scale=0.5)[0] - want) / np.linalg.norm(want) for r in (0, 1)]
        assert errors[1] < 0.9 * errors[0], (top_k, errors)


def test_per_token_rectification_beats_the_per_block_formula_on_self_similar_attention(rng):
    """Keys equal to the queries (each token attends itself and its neighbours most, as in the
    ViT of benchmarks/sparse_attention_models.py): the pooled scores underestimate the selected
    blocks, whose mass the per-block formula (2) moves away; per token (1) is better than it
    and than no rectification."""
    q, _, v = _local_qkv(rng, 1, 2, 256, 16)
    k = q
    want = _dense(q, k, v, False, 1.0)
    for top_k in (2, 4):
        errors = [np.linalg.norm(OP.run_reference(q, k, v, _unbiased(q), block_size=16, top_k=top_k, rectify=r,
                                                  scale=1.0)[0] - want) / np.linalg.norm(want) for r in (0, 1, 2)]
        assert errors[1] < 0.8 * min(errors[0], errors[2]), (top_k, errors)


def test_reference_refuses_bad_shapes():
    q = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(ValueError, match=r"need q, k, v of one shape \[B, H, N, Dh\]"):
        OP.run_reference(q, q[:, :, :3], q, _unbiased(q))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        OP.run_reference(q, q, q, _unbiased(q), block_size=0)
    with pytest.raises(ValueError, match=r"tau \(the pooled mass to cover\) must be in \(0, 1\], got 1.5"):
        OP.run_reference(q, q, q, _unbiased(q), tau=1.5)
    with pytest.raises(ValueError, match=r"key_bias must be \[B, N\] = \[1, 4\], got \[4\]"):
        OP.run_reference(q, q, q, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"window must be >= 0 and needs causal = 1, got window 4, causal 0"):
        OP.run_reference(q, q, q, _unbiased(q), window=4)


def test_describe_gives_the_shape_of_q():
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    descs = [FakeDesc(("B", "H", "N", "D"), "half")] * 3 + [FakeDesc(("B", "N"), "half")]
    assert describe(*descs) == ((("B", "H", "N", "D"), "half"),)

