"""MassMask: reference semantics; decomposition on ORT, Triton kernel (interpreter on CPU,
see conftest.py) and TensorRT plugin (`gpu`) == the NumPy reference; the plugin hooks
against a fake tensorrt."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest

from tests.plugins.op_testing import (
    Dim,
    FakeDesc,
    aot_supported,
    check_compiles_to_ptx,
    fake_tensorrt,
    one_node_model,
    run_decomposition,
    run_tensorrt,
    run_triton,
    value,
)
from trimrt.plugins import REGISTRY
from trimrt.plugins import tensorrt_glue as glue
from trimrt.plugins.token_prune import select

OP = REGISTRY["MassMask"]
def f32(value: float) -> float:
    """What a float ONNX attribute holds: the reference gets the same tau."""
    return float(np.float32(value))


def _check(score, kept_index, **attrs):
    got = run_decomposition(OP, [score, kept_index], **attrs)
    want = OP.run_reference(score, kept_index, **attrs)
    b, m = kept_index.shape
    assert got[0].shape == want[0].shape == (b, m) and got[0].dtype == score.dtype
    assert got[1].shape == want[1].shape == (b,) and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert set(np.unique(got[0])) <= {0.0, 1.0}
    return got


def _needed_by_hand(s: np.ndarray, tau: float) -> int:
    """The smallest top set of s reaching mass tau (a plain loop, float64)."""
    total = float(np.sum(s, dtype=np.float64))
    if total == 0:
        return len(s)
    acc = 0.0
    for count, v in enumerate(sorted(s.astype(np.float64), reverse=True), start=1):
        acc += v
        if acc / total >= tau - 2**-20:
            return count
    return len(s)


CASES = [  # (batch, n, k_max, protect, span_end, tau)
    (1, 10, 6, 1, 0, 0.5),
    (3, 17, 16, 1, 0, 0.9),  # k_max = all prunable tokens
    (2, 17, 1, 1, 0, 0.5),  # k_max = 1
    (4, 33, 20, 2, 0, 0.7),
    (2, 65, 45, 0, 0, 0.95),  # no prefix
    (2, 40, 20, 3, 30, 0.6),  # a span [3, 30) with a suffix
    (2, 197, 150, 1, 0, 0.8),  # ViT-B/16
    (2, 197, 196, 1, 0, 1.0),  # tau = 1: every token with (non-negligible) mass
    (2, 12, 8, 0, 0, 1e-4),  # tau tiny: only the top token
]


@pytest.mark.parametrize("b, n, k_max, protect, span_end, tau", CASES)
def test_decomposition_matches_reference(b, n, k_max, protect, span_end, tau):
    rng = np.random.default_rng(n + k_max)
    score = rng.random((b, n)).astype(np.float32) ** 3  # skewed, like attention
    tau = f32(tau)
    end = span_end or n
    kept_index = select(score, k_max, protect, end)
    valid, count = _check(score, kept_index, tau=tau, protect=protect, span_end=span_end)
    for i in range(b):
        c = _needed_by_hand(score[i, protect:end], tau)
        assert count[i] == c
        # the needed ones are the top-c of the span (those TokenPrune kept first), the rest is valid
        in_span = (kept_index[i] >= protect) & (kept_index[i] < end)
        assert valid[i, ~in_span].all()
        assert valid[i, in_span].sum() == min(c, k_max)
        top = set(np.argsort(-score[i, protect:end], kind="stable")[:c] + protect)
        assert all((bool(v) == (t in top)) for v, t in zip(valid[i, in_span], kept_index[i, in_span]))


@pytest.mark.parametrize("tau", [1e-6, 0.01, 0.3, 0.5, 0.75, 0.999, 1.0])
def test_ties_and_zero_scores(tau):
    """Few distinct scores (ties: lower index first), zero-mass tokens, an all-zero sample
    (every span token needed) and a sample where all scores are tied."""
    rng = np.random.default_rng(int(tau * 1000))
    b, n = 4, 21
    score = (rng.integers(0, 4, size=(b, n)) / 4).astype(np.float32)
    score[1] = 0.0
    score[2] = 0.25
    score[3, 1:11] = 0.0
    tau = f32(tau)
    kept_index = select(score, 15, 1, n)
    valid, count = _check(score, kept_index, tau=tau, protect=1)
    assert count[1] == n - 1 and valid[1].all()
    assert count[2] == max(1, int(np.ceil(tau * 20 - 1e-4)))  # equal scores: ceil(tau · span)
    assert count[3] <= 10  # the zero-mass tokens are never needed (tau <= 1)
    if tau == 1.0:
        assert count.tolist() == [np.count_nonzero(score[i, 1:]) or n - 1 for i in range(b)]


def test_tau_tiny_and_one():
    score = np.array([[9.0, 0.1, 0.5, 0.0, 0.4, 0.0]], np.float32)
    kept_index = np.array([[0, 1, 2, 4, 5]])  # a static top-4 of [1, 6) behind a CLS
    valid, count = _check(score, kept_index, tau=f32(1e-5), protect=1)
    assert count.tolist() == [1] and valid.tolist() == [[1, 0, 1, 0, 0]]
    valid, count = _check(score, kept_index, tau=1.0, protect=1)
    assert count.tolist() == [3] and valid.tolist() == [[1, 1, 1, 1, 0]]


def test_reference_semantics_by_hand():
    """cum = 0.5, 0.75, 1.0: tau = 0.75 needs 2 tokens (reached exactly, within the
    tolerance), tau = 0.76 needs 3; tokens outside the span and any kept order are fine."""
    score = np.array([[5.0, 0.25, 0.5, 0.25, 7.0]], np.float32)
    kept_index = np.array([[4, 3, 1, 0, 2]])  # unsorted, with the prefix and suffix tokens
    valid, count = _check(score, kept_index, tau=0.75, protect=1, span_end=4)
    assert count.tolist() == [2] and valid.tolist() == [[1, 0, 1, 1, 1]]  # tie 1 vs 3: 1 first
    valid, count = _check(score, kept_index, tau=f32(0.76), protect=1, span_end=4)
    assert count.tolist() == [3] and valid.tolist() == [[1, 1, 1, 1, 1]]


def test_random_kept_index_with_repeats():
    """kept_index is any index tensor (repeats, any order): each entry is looked up."""
    rng = np.random.default_rng(3)
    score = rng.random((3, 30)).astype(np.float32)
    kept_index = rng.integers(0, 30, size=(3, 50))
    _check(score, kept_index, tau=f32(0.6), protect=2, span_end=25)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5])
def test_rejects_tau_outside_unit_interval(tau):
    with pytest.raises(ValueError, match="tau"):
        OP.run_reference(np.ones((1, 4), np.float32), np.zeros((1, 2), np.int64), tau=tau)


def test_rejects_bad_span_and_index():
    s = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="span"):
        OP.run_reference(s, np.zeros((1, 2), np.int64), tau=0.5, protect=4)
    with pytest.raises(ValueError, match="kept_index"):
        OP.run_reference(s, np.array([[0, 4]]), tau=0.5)


# --------------------------------------------------------- Triton kernel (interpreter)


def _check_kernel(score, kept_index, device, **attrs):
    valid, count = run_triton(OP, [score, kept_index], device, **attrs)
    want = OP.run_reference(score, kept_index, **attrs)
    assert valid.shape == want[0].shape and valid.dtype == score.dtype
    assert count.shape == want[1].shape and count.dtype == np.int64
    np.testing.assert_array_equal(count, want[1])
    np.testing.assert_array_equal(valid, want[0])
    return valid, count


@pytest.mark.parametrize("b, n, k_max, protect, span_end, tau", CASES)
def test_kernel_matches_reference(b, n, k_max, protect, span_end, tau, device):
    rng = np.random.default_rng(n + k_max)
    score = rng.random((b, n)).astype(np.float32) ** 3
    kept_index = select(score, k_max, protect, span_end or n)
    _check_kernel(score, kept_index, device, tau=f32(tau), protect=protect, span_end=span_end)


@pytest.mark.parametrize("tau", [1e-6, 0.3, 0.75, 1.0])
def test_kernel_ties_zero_scores_and_any_index(tau, device):
    rng = np.random.default_rng(int(tau * 100))
    b, n = 4, 70  # the span over two chunks
    score = (rng.integers(0, 4, size=(b, n)) / 4).astype(np.float32)
    score[1] = 0.0
    score[2] = 0.25
    score[3, 1:40] = 0.0
    _check_kernel(score, select(score, 50, 1, n), device, tau=f32(tau), protect=1)
    _check_kernel(score, rng.integers(0, n, size=(b, 90)), device, tau=f32(tau), protect=3, span_end=66)


def test_kernel_fp16_empty_batch_and_out_buffers(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    score = rng.random((2, 20)).astype(np.float16)
    _check_kernel(score, select(score, 9, 1, 20), device, tau=f32(0.7), protect=1)
    valid, count = run_triton(OP, [score[:0], np.zeros((0, 9), np.int64)], device, tau=0.5)
    assert valid.shape == (0, 9) and count.shape == (0,)
    from trimrt.plugins.kernels import mass_mask as kernels

    s = torch.from_numpy(score.astype(np.float32)).to(device)
    idx = torch.from_numpy(select(score, 9, 1, 20)).to(device)
    out = (torch.empty((2, 10), device=device), torch.empty((2,), dtype=torch.int64, device=device))
    kernels.run(s, idx, **OP.attribute_values(dict(tau=0.5, protect=1)), out=out)
    want = OP.run_reference(score.astype(np.float32), idx.cpu().numpy(), tau=0.5, protect=1)
    np.testing.assert_array_equal(out[0].cpu().numpy(), want[0])
    np.testing.assert_array_equal(out[1].cpu().numpy(), want[1])
    with pytest.raises(ValueError, match="output buffers"):
        kernels.run(s, idx, **OP.attribute_values(dict(tau=0.5, protect=1)), out=(out[0][:, :3], out[1]))


@pytest.mark.parametrize("attrs, match", [(dict(tau=0.0), "tau"), (dict(tau=1.5), "tau"),
                                          (dict(tau=0.5, protect=8), "span"), (dict(tau=0.5, span_end=9), "span")])
def test_kernel_rejects_what_the_reference_rejects(attrs, match, device):
    s, idx = np.ones((1, 8), np.float32), np.zeros((1, 3), np.int64)
    with pytest.raises(ValueError, match=match):
        OP.run_reference(s, idx, **attrs)
    with pytest.raises(ValueError, match=match):
        run_triton(OP, [s, idx], device, **attrs)


@pytest.mark.slow
def test_kernel_compiles_to_ptx():
    """The kernel (float64 sums, tau baked in) compiles for a real GPU target (sm_80 PTX)."""
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import mass_mask
        for dt in ("fp32", "fp16"):
            k = mass_mask.compile_kernel({"score": dt, "valid": dt}, n=197, tau=0.9, target=GPUTarget("cuda", 80, 32))
            assert ".entry mass_mask_kernel" in k.asm["ptx"] and not getattr(k.metadata, "global_scratch_size", 0)
        print("ok")
    """)


# ------------------------------------------------------- TensorRT hooks (fake tensorrt)


def test_generated_plugin_signatures_follow_the_schema():
    trt, trtp = fake_tensorrt()
    spec = glue.spec_for(OP)
    names = [t.name for t in OP.inputs] + [a.name for a in OP.attributes]
    describe = inspect.signature(glue._descriptor(spec, trt, trtp))
    assert list(describe.parameters) == names == ["score", "kept_index", "tau", "protect", "span_end"]
    assert [p.annotation for p in describe.parameters.values()] == [trtp.TensorDesc] * 2 + [float, int, int]
    assert typing.get_args(describe.return_annotation) == (trtp.TensorDesc,) * 2
    assert list(inspect.signature(glue._jit_impl(spec, trtp)).parameters) == names + ["outputs", "stream"]
    assert list(inspect.signature(glue._aot_impl(spec, trtp)).parameters) == names + ["outputs", "tactic"]


def test_describe_and_symbolic_launch_args():
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import mass_mask as kernels

    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    score, kept = FakeDesc(("B", "N")), FakeDesc(("B", "M"), "int64")
    assert describe(score, kept, tau=0.5) == ((("B", "M"), "half"), (("B",), "int64"))
    with pytest.raises(ValueError, match="tau"):
        describe(score, kept, tau=0.0)
    with pytest.raises(ValueError, match="span"):
        describe(score, kept, tau=0.5, protect=4, span_end=3)
    for span_end in (0, 30):
        sym = kernels.scalar_args((Dim(2), Dim(40)), (Dim(2), Dim(17)), tau=0.5, protect=3, span_end=span_end,
                                  sym=trtp)
        assert [value(v) for v in sym] == \
            kernels.scalar_args((2, 40), (2, 17), tau=0.5, protect=3, span_end=span_end) == [40, 17, 3, span_end or 40]
    assert kernels.grid((Dim(3), Dim(40)))[0].value == 3


# ---------------------------------------------------------------------- with TensorRT


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("tau, protect, span_end", [(0.5, 1, 0), (0.9, 1, 0), (1.0, 2, 150), (1e-4, 0, 0)])
def test_tensorrt_plugin(aot, tau, protect, span_end):
    pytest.importorskip("tensorrt")
    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(OP)
    rng = np.random.default_rng(protect)
    score = (rng.random((3, 197)) ** 3).astype(np.float32)
    score[1, 50:] = 0.0
    feeds = {"score": score, "kept_index": select(score, 120, protect, span_end or 197)}
    attrs = dict(tau=f32(tau), protect=protect, span_end=span_end)
    expected = OP.run_reference(*feeds.values(), **attrs)
    model = one_node_model(OP, feeds, [e.shape for e in expected], attrs, aot)
    tensors = run_tensorrt(model, feeds, strongly_typed=False)
    np.testing.assert_array_equal(tensors["count"], expected[1])
    np.testing.assert_array_equal(tensors["valid"], expected[0])
