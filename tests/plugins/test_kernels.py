"""Triton kernels == NumPy references (through OpDef.run_triton, on torch tensors).

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set in
conftest.py before the kernel modules are imported), so sizes stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from trimrt.plugins import ATTENTION_ROW_SCORE, TOKEN_PRUNE  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


def _torch(array, device):
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


# ----------------------------------------------------------------- AttentionRowScore


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
    scale = dh**-0.5
    (expected,) = ATTENTION_ROW_SCORE.run_reference(q, k_t, row=row, scale=scale)
    (got,) = ATTENTION_ROW_SCORE.run_triton(_torch(q, device), _torch(k_t, device), row=row, scale=scale)
    assert got.shape == (b, n) and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.cpu().numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_attention_row_score_strided_keys_and_default_attributes(rng, device):
    """k_t as a transposed view of k (not contiguous); row and scale from their defaults."""
    q = rng.standard_normal((2, 2, 3, 12)).astype(np.float32)
    k = rng.standard_normal((2, 2, 21, 12)).astype(np.float32)
    k_t = np.swapaxes(k, -1, -2)
    (expected,) = ATTENTION_ROW_SCORE.run_reference(q, k_t)
    (got,) = ATTENTION_ROW_SCORE.run_triton(_torch(q, device), _torch(k, device).transpose(-1, -2))
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=RTOL, atol=ATOL)


def test_attention_row_score_rejects_bad_row(rng, device):
    q = _torch(rng.standard_normal((1, 1, 3, 4)).astype(np.float32), device)
    k_t = _torch(rng.standard_normal((1, 1, 4, 5)).astype(np.float32), device)
    with pytest.raises(ValueError, match="row"):
        ATTENTION_ROW_SCORE.run_triton(q, k_t, row=3)


# ------------------------------------------------------------------------ TokenPrune


def _check_token_prune(x, score, keep, protect, device):
    expected = TOKEN_PRUNE.run_reference(x, score, keep=keep, protect=protect)
    got = TOKEN_PRUNE.run_triton(_torch(x, device), _torch(score, device), keep=keep, protect=protect)
    y, kept_index, fused = (t.cpu().numpy() for t in got)
    b, _, d = x.shape
    assert y.shape == (b, protect + keep, d) and y.dtype == x.dtype
    assert kept_index.shape == (b, protect + keep) and kept_index.dtype == np.int64
    assert fused.shape == (b, 1, d) and fused.dtype == x.dtype
    np.testing.assert_array_equal(kept_index, expected[1])
    np.testing.assert_array_equal(y, expected[0])  # a pure gather: exact
    np.testing.assert_allclose(fused, expected[2], rtol=RTOL, atol=1e-5)


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
    _check_token_prune(x, score, keep, protect, device)


@pytest.mark.parametrize("keep, protect", [(1, 0), (10, 1), (31, 2), (50, 0)])
def test_token_prune_tied_scores(keep, protect, rng, device):
    """Few distinct scores, ties across chunk boundaries: lower index wins."""
    b, n, d = 2, 70, 6
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    score = (rng.integers(0, 4, size=(b, n)) / 4).astype(np.float32)
    score[1] = 0.25  # every score tied: keeps the first `keep` prunable tokens
    _check_token_prune(x, score, keep, protect, device)
    got = TOKEN_PRUNE.run_triton(_torch(x, device), _torch(score, device), keep=keep, protect=protect)[1]
    np.testing.assert_array_equal(got.cpu().numpy()[1], np.arange(protect + keep))


@pytest.mark.parametrize("keep, protect", [(0, 0), (9, 0), (8, 2)])
def test_token_prune_rejects_bad_keep(keep, protect, rng, device):
    x = _torch(rng.standard_normal((1, 8, 4)).astype(np.float32), device)
    score = _torch(rng.random((1, 8)).astype(np.float32), device)
    with pytest.raises(ValueError, match="keep"):
        TOKEN_PRUNE.run_triton(x, score, keep=keep, protect=protect)


# ------------------------------------------------------------- real (AOT) compilation

_COMPILE = textwrap.dedent(
    """
    import sys
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends import backends
    except ImportError as exc:
        print(exc); sys.exit(77)
    if "nvidia" not in backends:
        print("no nvidia backend"); sys.exit(77)
    from trimrt.plugins.kernels import attention_row_score as ars, token_prune as tp
    target = GPUTarget("cuda", 80, 32)
    for dt in ("fp32", "fp16"):
        k = ars.compile_kernel({"q": dt, "k_t": dt, "score": dt}, n=197, dh=64, scale=0.125, target=target)
        assert ".entry attention_row_score_kernel" in k.asm["ptx"], k.metadata.name
        k = tp.compile_kernel({"x": dt, "score": dt, "y": dt, "fused": dt}, n=197, d=768, target=target)
        assert ".entry token_prune_kernel" in k.asm["ptx"], k.metadata.name
        assert getattr(k.metadata, "global_scratch_size", 0) == 0
    print("ok")
    """
)


def test_kernels_compile_to_ptx():
    """The kernels compile for a real GPU target (sm_80 PTX, what the TensorRT AOT path
    embeds); the interpreter alone does not check that. Needs no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(f"triton cannot compile for CUDA here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
