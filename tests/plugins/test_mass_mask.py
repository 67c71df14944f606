"""MassMask: NumPy reference semantics, ONNX decomposition on ORT == reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins.base import FUNCTION_OPSET
from trimrt.plugins.token_prune import select

OP = REGISTRY["MassMask"]
_ONNX_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.int64): onnx.TensorProto.INT64}


def run_decomposition(inputs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    names = [t.name for t in OP.inputs]
    node = oh.make_node(OP.name, names, [t.name for t in OP.outputs], domain=DOMAIN, **attrs)
    graph = oh.make_graph(
        [node], "one_op",
        [oh.make_tensor_value_info(n, _ONNX_TYPES[a.dtype], list(a.shape)) for n, a in zip(names, inputs)],
        [oh.make_tensor_value_info(t.name, onnx.TensorProto.INT64 if t.dtype == "int64" else onnx.TensorProto.FLOAT,
                                   None) for t in OP.outputs],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", FUNCTION_OPSET), oh.make_opsetid(DOMAIN, 1)],
                          functions=[OP.function()])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))


def f32(value: float) -> float:
    """What a float ONNX attribute holds: the reference gets the same tau."""
    return float(np.float32(value))


def _check(score, kept_index, **attrs):
    got = run_decomposition([score, kept_index], **attrs)
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
        if acc / total >= tau - 1e-6:
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
