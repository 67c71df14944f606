"""DiversityRank (DivPrune's greedy max-min selection as a score): the reference's
semantics, the ONNX decomposition on ONNX Runtime and the Triton kernel against it,
the TensorRT hooks with fake and (gpu-marked) real TensorRT.

Tie tests use tokens whose normalised features are exact in float32 (entries ±1, D a
power of 4, and zero tokens), so every distance is exact and ties are real ties in
float32 and float64 alike.
"""

from __future__ import annotations

import itertools

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
    to_torch,
    value,
)
from trimrt.plugins import REGISTRY
from trimrt.plugins.diversity_rank import cosine_distances, greedy_picks
from trimrt.plugins.token_prune import span_keep

DIVERSITY_RANK = REGISTRY["DiversityRank"]
TOKEN_PRUNE = REGISTRY["TokenPrune"]

CASES = [  # (batch, n, d, keep, protect, span_end, keep_ratio)
    (2, 5, 4, 3, 0, 0, 1.0),
    (3, 17, 8, 1, 1, 0, 1.0),  # k = 1: only the first pick
    (2, 17, 8, 16, 1, 0, 1.0),  # k = the whole span
    (2, 64, 16, 20, 0, 0, 1.0),
    (2, 64, 16, 64, 0, 0, 1.0),  # k = all tokens, nothing protected
    (2, 197, 32, 58, 1, 0, 1.0),  # ViT-B/16: CLS + 196 patches
    (2, 197, 32, 0, 1, 0, 0.3),  # k from the ratio at run time: ceil(0.3 · 196) = 59
    (2, 40, 8, 5, 3, 30, 1.0),  # a span [3, 30): the 10 tokens after it score 0
    (2, 40, 8, 27, 3, 30, 1.0),  # the whole span
    (2, 23, 8, 0, 2, 20, 0.3),  # ratio over a span: ceil(0.3 · 18) = 6
    (2, 23, 8, 0, 1, 0, 0.001),  # ratio floor: one token
    (2, 10, 3, 1, 4, 5, 1.0),  # a one-token span
]


def _expected_k(n, keep, protect, span_end, ratio):
    end = span_end or n
    return span_keep(end - protect, keep, ratio)


def _check_scores(score, x, keep, protect, span_end, ratio):
    """Scores are a permutation of k..1 on the span and 0 elsewhere; return the pick order per sample."""
    b, n, _ = x.shape
    end = span_end or n
    k = _expected_k(n, keep, protect, span_end, ratio)
    assert score.shape == (b, n) and score.dtype == x.dtype
    assert np.all(score[:, :protect] == 0) and np.all(score[:, end:] == 0)
    orders = []
    for row in score[:, protect:end]:
        assert sorted(row[row > 0].tolist()) == list(range(1, k + 1))
        assert np.count_nonzero(row) == k
        orders.append(list(np.argsort(-row, kind="stable")[:k]))
    return orders


# ------------------------------------------------------------------------- reference


def test_reference_semantics_by_hand():
    """Points on a line (as 2-D directions): the outliers first, then the gaps' middles."""
    angles = np.array([0.0, 0.1, 0.2, 1.5, 0.05])  # radians; cos distance grows with the angle gap
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)[None].astype(np.float32)
    (score,) = DIVERSITY_RANK.run_reference(x, keep=3)
    # nearest-neighbour distances: 1.5 is far from all -> first; then 0.0 (farthest from 1.5),
    # then 0.2 (its distance to {0.0, 1.5} is the largest min)
    assert score.tolist() == [[2.0, 0.0, 1.0, 3.0, 0.0]]


def test_reference_greedy_is_max_min():
    """Every pick maximises the distance to the ones before it (the definition, brute force)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 6))
    dist = cosine_distances(x)
    picks = greedy_picks(dist, 12)
    np.testing.assert_allclose(dist, dist.T, atol=1e-12)
    off = dist + np.diag(np.full(12, np.inf))
    assert picks[0] == int(np.argmax(off.min(axis=0)))
    for t in range(1, 12):
        before = picks[:t]
        gaps = [dist[before, j].min() if j not in before else -np.inf for j in range(12)]
        assert picks[t] == int(np.argmax(gaps))


def test_reference_rejects_bad_keep_and_span():
    x = np.zeros((1, 6, 2), np.float32)
    with pytest.raises(ValueError, match="keep=6 must be in"):
        DIVERSITY_RANK.run_reference(x, keep=6, protect=1)
    with pytest.raises(ValueError, match="span"):
        DIVERSITY_RANK.run_reference(x, keep=1, protect=3, span_end=3)
    with pytest.raises(ValueError, match="required"):
        DIVERSITY_RANK.run_reference(x)


# --------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("batch,n,d,keep,protect,span_end,ratio", CASES)
def test_decomposition_matches_reference(batch, n, d, keep, protect, span_end, ratio):
    rng = np.random.default_rng(n * 7 + keep + protect)
    x = rng.standard_normal((batch, n, d)).astype(np.float32)
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    (got,) = run_decomposition("DiversityRank", [x], **attrs)
    (want,) = DIVERSITY_RANK.run_reference(x, **attrs)
    _check_scores(want, x, keep, protect, span_end, ratio)
    np.testing.assert_array_equal(got, want)


def test_decomposition_default_attributes():
    x = np.random.default_rng(2).standard_normal((2, 9, 5)).astype(np.float32)
    (got,) = run_decomposition("DiversityRank", [x], keep=4)
    np.testing.assert_array_equal(got, DIVERSITY_RANK.run_reference(x, keep=4)[0])


def _tied_tokens(rng, b, n, d, zeros=2):
    """±1 entries (few distinct directions: many duplicates, distance 0) and zero tokens."""
    x = rng.choice([-1.0, 1.0], size=(b, n, d)).astype(np.float32)
    x[:, rng.choice(n, size=zeros, replace=False)] = 0.0
    x *= rng.choice([0.5, 2.0, 4.0], size=(b, n, 1)).astype(np.float32)  # scale: same direction
    return x


@pytest.mark.parametrize("n,d,keep,protect,span_end", [(17, 4, 16, 1, 0), (17, 4, 5, 1, 0), (64, 4, 64, 0, 0),
                                                         (40, 16, 12, 3, 30), (6, 1, 6, 0, 0)])
def test_decomposition_ties_and_duplicates(n, d, keep, protect, span_end):
    """Exact ties everywhere (duplicates at distance 0, zero tokens at distance 1): lower index wins."""
    x = _tied_tokens(np.random.default_rng(n + keep), 3, n, d)
    attrs = dict(keep=keep, protect=protect, span_end=span_end)
    (want,) = DIVERSITY_RANK.run_reference(x, **attrs)
    _check_scores(want, x, keep, protect, span_end, 1.0)
    (got,) = run_decomposition("DiversityRank", [x], **attrs)
    np.testing.assert_array_equal(got, want)


def test_all_tokens_identical_picks_in_index_order():
    """Every distance 0: each argmax is a tie over the unpicked tokens, so picks go 0, 1, 2, ..."""
    x = np.ones((2, 7, 4), np.float32)
    (want,) = DIVERSITY_RANK.run_reference(x, keep=4, protect=1)
    assert want.tolist() == [[0, 4, 3, 2, 1, 0, 0]] * 2
    (got,) = run_decomposition("DiversityRank", [x], keep=4, protect=1)
    np.testing.assert_array_equal(got, want)


def test_duplicates_are_picked_after_every_distinct_token():
    """Random distinct tokens, each repeated: the first picks cover every distinct token once."""
    rng = np.random.default_rng(11)
    distinct = rng.standard_normal((2, 9, 8)).astype(np.float32)
    copies = rng.integers(0, 9, size=(2, 20))
    x = np.take_along_axis(distinct, copies[:, :, None], axis=1)
    for b in range(2):
        x[b, :9] = distinct[b]  # every distinct token is present
    (got,) = run_decomposition("DiversityRank", [x], keep=x.shape[1])
    (want,) = DIVERSITY_RANK.run_reference(x, keep=x.shape[1])
    for score in (got, want):
        for b in range(2):
            first = np.argsort(-score[b], kind="stable")[:9]
            kinds = [tuple(x[b, j]) for j in first]
            assert len(set(kinds)) == 9


# ------------------------------------------------------------------------ properties


@pytest.mark.parametrize("keep,protect,span_end,ratio", [(7, 1, 0, 1.0), (1, 0, 0, 1.0), (30, 2, 32, 1.0),
                                                          (0, 1, 0, 0.4), (33, 0, 0, 1.0)])
def test_token_prune_keeps_exactly_the_greedy_set(keep, protect, span_end, ratio):
    """score -> TokenPrune (same attributes) keeps the protected tokens, the suffix and the picks."""
    rng = np.random.default_rng(keep + 3)
    x = rng.standard_normal((3, 33, 8)).astype(np.float32)
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    (score,) = DIVERSITY_RANK.run_reference(x, **attrs)
    _, kept, fused = TOKEN_PRUNE.run_reference(x, score, **attrs)
    end = span_end or 33
    k = _expected_k(33, keep, protect, span_end, ratio)
    for b in range(3):
        picks = greedy_picks(cosine_distances(x[b, protect:end]), k)
        want = list(range(protect)) + sorted(p + protect for p in picks) + list(range(end, 33))
        assert kept[b].tolist() == want
    np.testing.assert_array_equal(fused, 0)  # the dropped tokens score 0: nothing fused


def _min_pairwise(dist, subset):
    return min(dist[i, j] for i, j in itertools.combinations(subset, 2))


def test_greedy_set_is_more_diverse_than_random_subsets():
    """Clustered tokens: the greedy set's closest pair is at least as far apart as a random
    subset's (a sanity property of max-min selection, not a bound)."""
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((6, 16))
    x = (np.repeat(centres, 10, axis=0) + 0.05 * rng.standard_normal((60, 16)))[rng.permutation(60)]
    x = x[None].astype(np.float32)
    dist = cosine_distances(x[0])
    for k in (3, 6, 10):
        (score,) = run_decomposition("DiversityRank", [x], keep=k)
        chosen = np.flatnonzero(score[0])
        greedy = _min_pairwise(dist, chosen)
        for _ in range(20):
            assert greedy >= _min_pairwise(dist, rng.choice(60, size=k, replace=False))
        if k == 6:  # one token per cluster
            assert greedy > 0.1


# ---------------------------------------------------------------------- Triton kernel


@pytest.fixture
def torch():
    pytest.importorskip("triton")
    return pytest.importorskip("torch")


def _run_kernel(torch, x, device, **attrs):
    (score,) = DIVERSITY_RANK.run_triton(to_torch(x, device), **attrs)
    assert score.dtype == torch.float32 and tuple(score.shape) == x.shape[:2]
    return score.cpu().numpy()


KERNEL_CASES = [  # (batch, n, d, keep, protect, span_end, keep_ratio): small, for the interpreter
    (2, 5, 4, 3, 0, 0, 1.0),
    (3, 17, 8, 1, 1, 0, 1.0),  # k = 1
    (2, 17, 13, 16, 1, 0, 1.0),  # k = span, D not a power of two
    (2, 64, 16, 20, 0, 0, 1.0),  # span = 4 tiles exactly
    (2, 70, 40, 70, 0, 0, 1.0),  # k = all, D over one chunk
    (2, 40, 8, 5, 3, 30, 1.0),  # span [3, 30)
    (2, 23, 8, 0, 2, 20, 0.3),  # k from the ratio: 6
    (2, 23, 8, 0, 1, 0, 0.001),  # ratio floor: 1
    (2, 10, 3, 1, 4, 5, 1.0),  # a one-token span
]


@pytest.mark.parametrize("batch,n,d,keep,protect,span_end,ratio", KERNEL_CASES)
def test_kernel_matches_reference(batch, n, d, keep, protect, span_end, ratio, torch, device):
    x = np.random.default_rng(n * 5 + keep).standard_normal((batch, n, d)).astype(np.float32)
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    (want,) = DIVERSITY_RANK.run_reference(x, **attrs)
    np.testing.assert_array_equal(_run_kernel(torch, x, device, **attrs), want)


@pytest.mark.slow
def test_kernel_large_span_and_features(torch, device):
    """N and D of a ViT-B/16 layer (197 tokens; 96 features to keep the interpreter quick)."""
    x = np.random.default_rng(9).standard_normal((2, 197, 96)).astype(np.float32)
    attrs = dict(keep=0, protect=1, keep_ratio=0.1)  # 20 picks
    (want,) = DIVERSITY_RANK.run_reference(x, **attrs)
    np.testing.assert_array_equal(_run_kernel(torch, x, device, **attrs), want)


@pytest.mark.parametrize("n,d,keep,protect,span_end", [(17, 4, 16, 1, 0), (40, 16, 12, 3, 30), (33, 4, 33, 0, 0),
                                                         (6, 1, 6, 0, 0)])
def test_kernel_ties_and_duplicates(n, d, keep, protect, span_end, torch, device):
    x = _tied_tokens(np.random.default_rng(n + keep), 3, n, d)
    attrs = dict(keep=keep, protect=protect, span_end=span_end)
    (want,) = DIVERSITY_RANK.run_reference(x, **attrs)
    np.testing.assert_array_equal(_run_kernel(torch, x, device, **attrs), want)
    ones = np.ones((2, 7, 4), np.float32)  # all tied: index order
    assert _run_kernel(torch, ones, device, keep=4, protect=1).tolist() == [[0, 4, 3, 2, 1, 0, 0]] * 2


def test_kernel_half_precision_and_no_features(torch, device):
    x = np.random.default_rng(3).standard_normal((2, 12, 8)).astype(np.float16)
    (want,) = DIVERSITY_RANK.run_reference(x, keep=5, protect=1)
    (got,) = DIVERSITY_RANK.run_triton(torch.from_numpy(x).to(device), keep=5, protect=1)
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    empty = np.zeros((2, 6, 0), np.float32)  # no features: every distance 1, index order
    (want,) = DIVERSITY_RANK.run_reference(empty, keep=3)
    assert want.tolist() == [[3, 2, 1, 0, 0, 0]] * 2
    np.testing.assert_array_equal(_run_kernel(torch, empty, device, keep=3), want)


def test_kernel_writes_into_given_buffer_and_rejects_bad_attributes(torch, device):
    x = np.random.default_rng(1).standard_normal((2, 9, 4)).astype(np.float32)
    xt = torch.from_numpy(x).to(device)
    out = torch.full((2, 9), 7.0, device=device)
    from trimrt.plugins.kernels.diversity_rank import run

    # the TensorRT JIT impl's call
    run(xt, **DIVERSITY_RANK.attribute_values(dict(keep=3, protect=2, span_end=8)), out=(out,))
    np.testing.assert_array_equal(out.cpu().numpy(), DIVERSITY_RANK.run_reference(x, keep=3, protect=2, span_end=8)[0])
    with pytest.raises(ValueError, match="DiversityRank: keep=9 must be in"):
        DIVERSITY_RANK.run_triton(xt, keep=9, protect=1)
    with pytest.raises(ValueError, match="DiversityRank: span"):
        DIVERSITY_RANK.run_triton(xt, keep=1, protect=4, span_end=4)
    with pytest.raises(ValueError, match="output buffer"):
        run(xt, **DIVERSITY_RANK.attribute_values(dict(keep=1)), out=(torch.empty((2, 8), device=device),))


@pytest.mark.slow
def test_kernel_compiles_to_ptx():
    """The kernel compiles for sm_80 (what the TensorRT AOT path embeds), no GPU needed."""
    pytest.importorskip("triton")
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import diversity_rank
        for dt in ("fp32", "fp16"):
            for n, d in ((577, 1024), (197, 768), (5, 3)):
                k = diversity_rank.compile_kernel({"x": dt, "score": dt}, n=n, d=d, target=GPUTarget("cuda", 80, 32))
                assert ".entry diversity_rank_kernel" in k.asm["ptx"], k.metadata.name
                assert getattr(k.metadata, "global_scratch_size", 0) == 0
        print("ok")
    """)


# ------------------------------------------------------------------ TensorRT hooks


def test_generated_tensorrt_signatures_follow_the_schema():
    import inspect
    import typing

    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    spec = glue.spec_for(DIVERSITY_RANK)
    names = ["x", "keep", "protect", "span_end", "keep_ratio"]
    describe = inspect.signature(glue._descriptor(spec, trt, trtp))
    assert list(describe.parameters) == names
    assert [p.annotation for p in describe.parameters.values()] == [trtp.TensorDesc, int, int, int, float]
    assert typing.get_args(describe.return_annotation) == (trtp.TensorDesc,)
    assert list(inspect.signature(glue._jit_impl(spec, trtp)).parameters) == names + ["outputs", "stream"]
    assert list(inspect.signature(glue._aot_impl(spec, trtp)).parameters) == names + ["outputs", "tactic"]


def test_tensorrt_describe_gives_score_shape_and_rejects_what_the_reference_rejects():
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(DIVERSITY_RANK), trt, trtp)
    assert describe(FakeDesc(("B", "N", "D")), keep=5) == ((("B", "N"), "half"),)
    x = FakeDesc((Dim(1), Dim(8), Dim(4)))
    with pytest.raises(ValueError, match="DiversityRank: span"):
        describe(x, keep=1, protect=5, span_end=5)
    with pytest.raises(ValueError, match="DiversityRank: keep=5 must be in"):
        describe(x, keep=5, protect=1, span_end=5)
    with pytest.raises(ValueError, match="DiversityRank: keep_ratio"):  # no exact int64 form
        describe(x, keep=0, keep_ratio=1e-30)


@pytest.mark.parametrize("n, keep, protect, span_end, ratio",
                         [(17, 5, 1, 0, 1.0), (40, 5, 3, 30, 1.0), (197, 0, 1, 0, 0.3), (23, 0, 2, 20, 0.3),
                          (23, 0, 1, 0, 0.001), (577, 0, 1, 0, 0.098), (9, 0, 0, 0, 1.0)])
def test_tensorrt_symbolic_launch_args_are_the_run_args(n, keep, protect, span_end, ratio):
    """The AOT scalars as shape expressions (N known only at run time) == run's on ints,
    and k == the reference's (and TokenPrune's) count."""
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import diversity_rank as kernels

    ratio = float(np.float32(ratio))  # what an ONNX float attribute holds
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    _, trtp = fake_tensorrt()
    sym_x = (Dim(2), Dim(n), Dim(3))
    want = kernels.scalar_args((2, n, 3), **attrs)
    assert [value(v) for v in kernels.scalar_args(sym_x, **attrs, sym=trtp)] == want
    assert want == [n, 3, _expected_k(n, keep, protect, span_end, ratio), protect, span_end or n]
    assert [value(v) for v in kernels.grid(sym_x, cdiv=trtp.cdiv)] == [2]


def test_registration_with_fake_tensorrt(monkeypatch):
    import sys

    from trimrt.plugins import DOMAIN
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    calls = []

    def decorator(kind):
        return lambda plugin_id: (lambda fn: calls.append((kind, plugin_id, fn.__name__)) or fn)

    trtp.register, trtp.impl, trtp.aot_impl = decorator("register"), decorator("impl"), decorator("aot_impl")
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(glue, "_REGISTERED", set())
    glue.register(DIVERSITY_RANK)
    glue.register(DIVERSITY_RANK)  # idempotent
    pid = f"{DOMAIN}::DiversityRank"
    assert calls == [("register", pid, "DiversityRank_describe"), ("impl", pid, "DiversityRank_impl"),
                     ("aot_impl", pid, "DiversityRank_aot_impl")]


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("keep, protect, span_end, keep_ratio",
                         [(1, 0, 0, 1.0), (20, 1, 0, 1.0), (69, 1, 0, 1.0), (5, 3, 60, 1.0), (0, 1, 0, 0.3)])
def test_tensorrt_plugin(aot, keep, protect, span_end, keep_ratio, rng):
    """DiversityRank alone, and feeding TokenPrune, through TensorRT == the reference."""
    pytest.importorskip("tensorrt")
    from trimrt.plugins import tensorrt_glue as glue

    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(DIVERSITY_RANK)
    x = rng.standard_normal((3, 70, 40)).astype(np.float32)
    attrs = {"keep": keep, "protect": protect, "span_end": span_end, "keep_ratio": keep_ratio}
    (expected,) = DIVERSITY_RANK.run_reference(x, **{**attrs, "keep_ratio": float(np.float32(keep_ratio))})
    model = one_node_model(DIVERSITY_RANK, {"x": x}, [expected.shape], attrs, aot)
    got = run_tensorrt(model, {"x": x})
    np.testing.assert_array_equal(got["score"], expected)
