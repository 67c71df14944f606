"""Every op's ONNX-function decomposition, run on ONNX Runtime, equals its NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from tests.plugins.op_testing import run_decomposition
from trimrt.plugins import REGISTRY


def _mask(kind: str, batch: int, n: int) -> np.ndarray:
    if kind == "none":
        return np.zeros((1, 1, 1, 1), np.float32)
    if kind == "padding":  # [B, 1, 1, N]: the last keys of sample 0 are padding
        m = np.zeros((batch, 1, 1, n), np.float32)
        m[0, :, :, n - 2:] = np.finfo(np.float32).min
        return m
    causal = np.triu(np.full((n, n), np.finfo(np.float32).min, np.float32), k=1)  # [1, 1, N, N]
    return causal[None, None]


@pytest.mark.parametrize("batch,heads,n,dh", [(1, 1, 5, 4), (3, 6, 17, 8), (2, 4, 65, 16)])
@pytest.mark.parametrize("row", [0, -1, 2])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_attention_row_score_matches_reference(batch, heads, n, dh, row, mask_kind):
    rng = np.random.default_rng(n + row)
    q = rng.standard_normal((batch, heads, n, dh)).astype(np.float32)
    k_t = rng.standard_normal((batch, heads, dh, n)).astype(np.float32)
    mask = _mask(mask_kind, batch, n)
    (got,) = run_decomposition("AttentionRowScore", [q, k_t, mask], row=row, scale=0.35)
    (want,) = REGISTRY["AttentionRowScore"].run_reference(q, k_t, mask, row=row, scale=0.35)
    assert got.shape == (batch, n)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # head-mean of probability rows
    if mask_kind == "padding":
        assert np.all(got[0, n - 2:] == 0)  # padding keys get no attention
    if mask_kind == "causal" and row == 0:
        np.testing.assert_allclose(got[:, 0], 1.0, atol=1e-6)  # the first token sees only itself


def test_attention_row_score_reference_is_softmax_row():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 4, 3))
    k_t = rng.standard_normal((1, 2, 3, 4))
    logits = q @ k_t * 0.5
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    (got,) = REGISTRY["AttentionRowScore"].run_reference(q, k_t, np.zeros((1, 1, 1, 1)), row=0, scale=0.5)
    np.testing.assert_allclose(got[0], probs[0, :, 0, :].mean(axis=0))


CASES = [  # (batch, n, d, keep, protect, span_end, keep_ratio)
    (1, 10, 4, 6, 1, 0, 1.0),
    (3, 17, 8, 1, 1, 0, 1.0),  # k = 1
    (2, 17, 8, 16, 1, 0, 1.0),  # k = all prunable tokens
    (2, 12, 5, 12, 0, 0, 1.0),  # k = all tokens, nothing protected
    (4, 33, 6, 9, 2, 0, 1.0),  # protect a prefix of 2
    (2, 65, 16, 45, 1, 0, 1.0),
    (2, 40, 8, 5, 3, 30, 1.0),  # a span [3, 30): the 10 tokens after it are kept
    (1, 40, 8, 27, 3, 30, 1.0),  # the whole span kept
    (2, 23, 8, 0, 1, 0, 0.5),  # k from the ratio at run time: ceil(0.5 · 22) = 11
    (2, 23, 8, 0, 2, 20, 0.3),  # ratio over a span: ceil(0.3 · 18) = 6
    (2, 23, 8, 0, 1, 0, 0.001),  # ratio floor: at least one token
]


@pytest.mark.parametrize("batch,n,d,keep,protect,span_end,ratio", CASES)
def test_token_prune_matches_reference(batch, n, d, keep, protect, span_end, ratio):
    rng = np.random.default_rng(n * keep + protect)
    x = rng.standard_normal((batch, n, d)).astype(np.float32)
    score = rng.random((batch, n)).astype(np.float32)
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    got = run_decomposition("TokenPrune", [x, score], **attrs)
    want = REGISTRY["TokenPrune"].run_reference(x, score, **attrs)
    end = span_end or n
    k = keep or max(1, int(np.ceil(ratio * (end - protect) - 1e-9)))
    m = protect + k + n - end
    assert got[0].shape == (batch, m, d)
    assert got[1].shape == (batch, m)
    assert got[2].shape == (batch, 1, d)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)
    assert np.all(got[1][:, :protect] == np.arange(protect)) and np.all(got[1][:, m - (n - end):] == np.arange(end, n))


def test_token_prune_reference_semantics():
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
    score = np.array([[0.0, 0.1, 0.9, 0.2, 0.9, 0.05]], dtype=np.float32)
    y, kept, fused = REGISTRY["TokenPrune"].run_reference(x, score, keep=3, protect=1)
    # CLS kept; the top-3 of tokens 1..5 are 2, 4 (tie: both kept) and 3; order preserved
    assert kept.tolist() == [[0, 2, 3, 4]]
    assert y[0, :, 0].tolist() == [0.0, 2.0, 3.0, 4.0]
    # fused = Σ score_j x_j over dropped tokens 1 and 5
    np.testing.assert_allclose(fused[0, 0, 0], 0.1 * 1 + 0.05 * 5, rtol=1e-6)


def test_token_prune_span_semantics():
    x = np.arange(8, dtype=np.float32).reshape(1, 8, 1)
    score = np.array([[0.0, 0.1, 0.9, 0.2, 0.8, 0.05, 0.99, 0.99]], dtype=np.float32)
    y, kept, fused = REGISTRY["TokenPrune"].run_reference(x, score, keep=2, protect=1, span_end=6)
    # span [1, 6) keeps its top 2 (2 and 4); 0 and the suffix 6, 7 are kept whatever their score
    assert kept.tolist() == [[0, 2, 4, 6, 7]]
    np.testing.assert_allclose(fused[0, 0, 0], 0.1 * 1 + 0.2 * 3 + 0.05 * 5, rtol=1e-6)


def test_token_prune_ties_prefer_lower_index():
    x = np.random.default_rng(0).standard_normal((2, 8, 3)).astype(np.float32)
    score = np.full((2, 8), 0.5, dtype=np.float32)
    got = run_decomposition("TokenPrune", [x, score], keep=3, protect=1)
    assert got[1].tolist() == [[0, 1, 2, 3]] * 2


def test_token_prune_rejects_bad_keep():
    x = np.zeros((1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="keep=4 must be in"):
        REGISTRY["TokenPrune"].run_reference(x, np.zeros((1, 4), np.float32), keep=4, protect=1)
