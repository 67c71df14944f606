"""Triton kernels == NumPy references (through OpDef.run_triton, on torch tensors).

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in
conftest.py before the kernel modules are imported), so sizes stay small.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from tests.plugins.op_testing import check_compiles_to_ptx, to_torch  # noqa: E402
from trimrt.plugins import ATTENTION_ROW_SCORE, TOKEN_PRUNE  # noqa: E402
from trimrt.plugins.token_prune import span_keep  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------- AttentionRowScore

F32_MIN = np.finfo(np.float32).min


def _mask(kind: str, b: int, nq: int, n: int, rng) -> np.ndarray:
    """The additive masks models use, rank 4, broadcastable to [B, H, Nq, N]."""
    if kind == "none":
        return np.zeros((1, 1, 1, 1), np.float32)
    if kind == "padding":  # [B, 1, 1, N]: a different number of padded keys per sample
        m = np.zeros((b, 1, 1, n), np.float32)
        for i in range(b):
            m[i, ..., n - 1 - (i % max(n - 1, 1)):] = F32_MIN if n > 1 else 0.0
        return m
    # causal [1, 1, Nq, N] (queries are the last Nq keys), or [B, 1, Nq, N] with padding too
    causal = np.triu(np.full((nq, n), F32_MIN, np.float32), k=n - nq + 1)[None, None]
    if kind == "causal":
        return causal
    m = np.repeat(causal, b, axis=0).copy()
    m[1:, ..., 0] = F32_MIN  # left padding on every sample but the first
    return m


def _check_attention_row_score(q, k_t, mask, row, scale, device):
    (expected,) = ATTENTION_ROW_SCORE.run_reference(q, k_t, mask, row=row, scale=scale)
    (got,) = ATTENTION_ROW_SCORE.run_triton(to_torch(q, device), to_torch(k_t, device), to_torch(mask, device),
                                            row=row, scale=scale)
    got = got.cpu().numpy()
    assert got.shape == expected.shape == (q.shape[0], k_t.shape[3]) and got.dtype == np.float32
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    return got


@pytest.mark.parametrize(
    "b, h, nq, dh, n, row",
    [
        (1, 1, 1, 8, 16, 0),  # powers of two, single row
        (2, 3, 5, 13, 37, -1),  # batch > 1, last row, odd sizes
        (3, 2, 4, 48, 70, 0),  # Dh > one feature chunk, N > 64
        (2, 4, 6, 7, 1, -2),  # a single key
        (1, 2, 9, 33, 50, 3),  # middle row
    ],
)
def test_attention_row_score_matches_reference(b, h, nq, dh, n, row, rng, device):
    q = rng.standard_normal((b, h, nq, dh)).astype(np.float32)
    k_t = rng.standard_normal((b, h, dh, n)).astype(np.float32)
    _check_attention_row_score(q, k_t, _mask("none", b, nq, n, rng), row, dh**-0.5, device)


@pytest.mark.parametrize("row", [0, -1])
@pytest.mark.parametrize("kind", ["padding", "causal", "causal_batch"])
@pytest.mark.parametrize("b, h, nq, dh, n", [(3, 2, 19, 12, 19), (2, 3, 70, 8, 70), (2, 2, 5, 8, 21)])
def test_attention_row_score_masks(kind, row, b, h, nq, dh, n, rng, device):
    """Padding [B,1,1,N], causal [1,1,Nq,N] and [B,1,Nq,N], float32-min values: finite,
    masked keys get exactly 0."""
    q = rng.standard_normal((b, h, nq, dh)).astype(np.float32)
    k_t = rng.standard_normal((b, h, dh, n)).astype(np.float32)
    mask = _mask(kind, b, nq, n, rng)
    got = _check_attention_row_score(q, k_t, mask, row, dh**-0.5, device)
    rows = np.broadcast_to(mask, (b, 1, nq, n))[:, 0, row if mask.shape[2] > 1 else 0, :]
    masked = rows == F32_MIN
    open_rows = ~masked.all(axis=1)  # a fully masked row (left padding, row 0) is uniform, still finite
    assert np.all(got[open_rows][masked[open_rows]] == 0)
    np.testing.assert_allclose(got[~open_rows], 1 / n, rtol=1e-6)
    if kind == "causal" and row == 0 and nq == n:
        np.testing.assert_allclose(got[:, 0], 1.0, rtol=1e-6)  # the first token sees only itself


def test_attention_row_score_broadcast_mask_dims(rng, device):
    """Any mix of broadcast dimensions: per-head masks, a one-key mask, large logits."""
    b, h, nq, dh, n = 2, 3, 4, 5, 11
    q = 4 * rng.standard_normal((b, h, nq, dh)).astype(np.float32)
    k_t = 4 * rng.standard_normal((b, h, dh, n)).astype(np.float32)
    for shape in [(1, h, 1, n), (b, h, nq, n), (1, 1, nq, 1), (b, 1, 1, 1)]:
        mask = rng.standard_normal(shape).astype(np.float32) * 3
        for row in (0, -1, 2):
            _check_attention_row_score(q, k_t, mask, row, 1.0, device)


def test_attention_row_score_strided_keys_and_default_attributes(rng, device):
    """k_t as a transposed view of k (not contiguous); row and scale from their defaults."""
    q = rng.standard_normal((2, 2, 3, 12)).astype(np.float32)
    k = rng.standard_normal((2, 2, 21, 12)).astype(np.float32)
    k_t = np.swapaxes(k, -1, -2)
    mask = _mask("padding", 2, 3, 21, rng)
    (expected,) = ATTENTION_ROW_SCORE.run_reference(q, k_t, mask)
    (got,) = ATTENTION_ROW_SCORE.run_triton(to_torch(q, device), to_torch(k, device).transpose(-1, -2),
                                            to_torch(mask, device).expand(2, 2, 3, 21))
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=RTOL, atol=ATOL)


def test_attention_row_score_rejects_bad_row_and_mask(rng, device):
    q = to_torch(rng.standard_normal((1, 1, 3, 4)).astype(np.float32), device)
    k_t = to_torch(rng.standard_normal((1, 1, 4, 5)).astype(np.float32), device)
    zero = torch.zeros((1, 1, 1, 1), device=device)
    with pytest.raises(ValueError, match="row"):
        ATTENTION_ROW_SCORE.run_triton(q, k_t, zero, row=3)
    for shape in [(1, 1, 5), (1, 1, 2, 5), (1, 1, 1, 4)]:
        with pytest.raises(ValueError, match="mask"):
            ATTENTION_ROW_SCORE.run_triton(q, k_t, torch.zeros(shape, device=device))


# ------------------------------------------------------------------------ TokenPrune


def _check_token_prune(x, score, device, **attrs):
    expected = TOKEN_PRUNE.run_reference(x, score, **attrs)
    got = TOKEN_PRUNE.run_triton(to_torch(x, device), to_torch(score, device), **attrs)
    y, kept_index, fused = (t.cpu().numpy() for t in got)
    b, n, d = x.shape
    m = expected[1].shape[1]
    assert y.shape == (b, m, d) and y.dtype == x.dtype
    assert kept_index.shape == (b, m) and kept_index.dtype == np.int64
    assert fused.shape == (b, 1, d) and fused.dtype == x.dtype
    np.testing.assert_array_equal(kept_index, expected[1])
    np.testing.assert_array_equal(y, expected[0])  # a pure gather: exact
    np.testing.assert_allclose(fused, expected[2], rtol=RTOL, atol=1e-5)
    return kept_index


@pytest.mark.parametrize(
    "b, n, d, keep, protect",
    [
        (1, 9, 8, 1, 0),  # keep = 1, no prefix
        (2, 17, 13, 1, 1),  # keep = 1 behind a CLS token
        (3, 70, 45, 30, 1),  # N, D not powers of two; N over one chunk
        (2, 70, 48, 68, 2),  # keep = all prunable tokens: nothing fused
        (2, 33, 5, 33, 0),  # keep = all tokens, no prefix
        (3, 65, 7, 20, 2),  # one token into the second chunk
        (2, 6, 1, 3, 2),  # D = 1
    ],
)
def test_token_prune_matches_reference(b, n, d, keep, protect, rng, device):
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = rng.random((b, n)).astype(np.float32)
    _check_token_prune(x, score, device, keep=keep, protect=protect)


@pytest.mark.parametrize(
    "b, n, d, keep, protect, span_end, ratio",
    [
        (2, 40, 8, 5, 3, 30, 1.0),  # a span [3, 30): the 10 tokens after it are kept
        (1, 40, 8, 27, 3, 30, 1.0),  # the whole span kept: nothing fused
        (2, 80, 9, 20, 1, 70, 1.0),  # span over two chunks, suffix in the second
        (2, 10, 3, 1, 0, 1, 1.0),  # a one-token span at the start
        (2, 9, 4, 2, 2, 9, 1.0),  # span_end = N: no suffix
        (2, 23, 8, 0, 1, 0, 0.5),  # k from the ratio at run time: ceil(0.5 · 22) = 11
        (2, 23, 8, 0, 2, 20, 0.3),  # ratio over a span: ceil(0.3 · 18) = 6
        (2, 23, 8, 0, 1, 0, 0.001),  # ratio floor: at least one token
        (2, 71, 6, 0, 1, 66, float(np.float32(0.1))),  # float32 ratio (as TensorRT passes it): 0.1f · 65
        (1, 30, 5, 0, 0, 0, 1.0),  # ratio 1: everything kept
        (1, 30, 5, 0, 4, 0, 1.7),  # ratio > 1: clamped to the span
    ],
)
def test_token_prune_spans_and_ratios(b, n, d, keep, protect, span_end, ratio, rng, device):
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = rng.random((b, n)).astype(np.float32)
    kept = _check_token_prune(x, score, device, keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    end = span_end or n
    if end < n:
        np.testing.assert_array_equal(kept[:, -(n - end):], np.broadcast_to(np.arange(end, n), (b, n - end)))


@pytest.mark.parametrize("keep, protect, span_end, ratio", [(1, 0, 0, 1.0), (10, 1, 0, 1.0), (31, 2, 0, 1.0),
                                                            (50, 0, 0, 1.0), (7, 3, 60, 1.0), (0, 1, 66, 0.25)])
def test_token_prune_tied_scores(keep, protect, span_end, ratio, rng, device):
    """Few distinct scores, ties across chunk boundaries: lower index wins."""
    b, n, d = 2, 70, 6
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = (rng.integers(0, 4, size=(b, n)) / 4).astype(np.float32)
    score[1] = 0.25  # every score tied: keeps the first k span tokens
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    kept = _check_token_prune(x, score, device, **attrs)
    end = span_end or n
    k = span_keep(end - protect, keep, ratio)
    np.testing.assert_array_equal(kept[1], np.r_[np.arange(protect + k), np.arange(end, n)])


def test_token_prune_default_attributes(rng, device):
    """span_end and keep_ratio from their defaults: the whole tail is the span."""
    x = rng.standard_normal((2, 12, 3)).astype(np.float32)
    score = rng.random((2, 12)).astype(np.float32)
    expected = TOKEN_PRUNE.run_reference(x, score, keep=4, protect=1)
    got = TOKEN_PRUNE.run_triton(to_torch(x, device), to_torch(score, device), keep=4, protect=1)
    np.testing.assert_array_equal(got[1].cpu().numpy(), expected[1])


@pytest.mark.parametrize("keep, protect, span_end, match", [(9, 0, 0, "keep"), (8, 2, 0, "keep"), (5, 1, 5, "keep"),
                                                             (1, 8, 0, "span"), (1, 3, 3, "span"), (1, 0, 9, "span")])
def test_token_prune_rejects_bad_keep_or_span(keep, protect, span_end, match, rng, device):
    x = rng.standard_normal((1, 8, 4)).astype(np.float32)
    score = rng.random((1, 8)).astype(np.float32)
    attrs = dict(keep=keep, protect=protect, span_end=span_end)
    with pytest.raises(ValueError, match=match):
        TOKEN_PRUNE.run_reference(x, score, **attrs)
    with pytest.raises(ValueError, match=match):
        TOKEN_PRUNE.run_triton(to_torch(x, device), to_torch(score, device), **attrs)


def test_kept_count_is_the_reference_rule():
    """Span's exact-integer k == token_prune.span_keep == the float64 ceil(r · span - 1e-9)
    the ONNX decomposition computes."""
    import math

    from trimrt.plugins.span import kept_count

    ratios = [0.5, 0.3, 0.1, 0.001, 1.0, 0.25, 1 / 3, 2 / 3, 0.0, -0.5, 1.5, 0.9999, 1e-12]
    ratios += list(np.random.default_rng(3).random(100))
    ratios += [float(np.float32(r)) for r in ratios]
    for ratio in ratios:
        got = [kept_count(span, keep=0, keep_ratio=ratio) for span in range(1, 600)]
        assert got == [span_keep(span, 0, ratio) for span in range(1, 600)], ratio
        float64 = [max(1, min(span, math.ceil(ratio * span - 1e-9))) for span in range(1, 600)]
        assert got == float64, ratio
    assert kept_count(10, keep=3, keep_ratio=0.01) == 3


# ------------------------------------------------------------- real (AOT) compilation

@pytest.mark.slow
def test_kernels_compile_to_ptx():
    """The kernels compile for a real GPU target (sm_80 PTX, what the TensorRT AOT path
    embeds); the interpreter alone does not check that. Needs no GPU."""
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import attention_row_score as ars, token_prune as tp
        target = GPUTarget("cuda", 80, 32)
        for dt in ("fp32", "fp16"):
            k = ars.compile_kernel({"q": dt, "k_t": dt, "mask": "fp32", "score": dt}, n=197, dh=64, scale=0.125,
                                   target=target)
            assert ".entry attention_row_score_kernel" in k.asm["ptx"], k.metadata.name
            k = tp.compile_kernel({"x": dt, "score": dt, "y": dt, "fused": dt}, n=197, d=768, target=target)
            assert ".entry token_prune_kernel" in k.asm["ptx"], k.metadata.name
            assert getattr(k.metadata, "global_scratch_size", 0) == 0
        print("ok")
    """)
