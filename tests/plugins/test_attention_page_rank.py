"""AttentionPageRank (Zero-TPrune's score): reference properties, the ONNX decomposition
on ONNX Runtime, the Triton kernel (interpreter on CPU) and the TensorRT hooks."""

from __future__ import annotations

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
from trimrt.plugins.attention_page_rank import (
    IMPORTANT_OFFSET,
    VAR_MAX,
    VAR_MIN,
    importance,
)

OP = REGISTRY["AttentionPageRank"]
WIDE = dict(var_min=0.0, var_max=1e30)  # every head passes the filter


def softmax_probs(rng, b, h, n, temperatures=None, duplicates=()):
    """Random attention probabilities [B, H, N, N]; head h's logits are scaled by
    temperatures[h] (sharper heads have a larger PageRank variance). For each (src, dst)
    in `duplicates`, key dst gets the logits of key src, so their columns are identical
    and so are their importances: exact ties."""
    logits = rng.standard_normal((b, h, n, n))
    if temperatures is not None:
        logits *= np.asarray(temperatures, dtype=np.float64)[None, :, None, None]
    for src, dst in duplicates:
        logits[..., dst] = logits[..., src]
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def metric_with_duplicates(rng, b, n, c, duplicates=()):
    x = rng.standard_normal((b, n, c)).astype(np.float32)
    for src, dst in duplicates:
        x[:, dst] = x[:, src]
    return x


def head_variances(probs, iterations):
    p = probs.astype(np.float64)
    n = p.shape[-1]
    s = np.full(p.shape[:3], 1.0 / n)
    for _ in range(iterations):
        s = np.einsum("bhij,bhi->bhj", p, s)
    return (n * s).var(axis=-1)


def span_of(n, protect, span_end):
    return protect, span_end if span_end > 0 else n


def check_score_layout(score, probs, *, iterations, protect, span_end, var_min=VAR_MIN, var_max=VAR_MAX):
    """The score's structure, from the I-stage alone: important half = 4 + I (the
    ceil(span/2) largest I, ties to the lower index), 1 - sim in [0, 2] for the rest,
    I outside the span."""
    imp = importance(probs, iterations=iterations, var_min=var_min, var_max=var_max)
    start, end = span_of(probs.shape[2], protect, span_end)
    m = (end - start + 1) // 2
    for bi in range(score.shape[0]):
        order = np.argsort(-imp[bi, start:end], kind="stable")
        important = np.zeros(end - start, bool)
        important[order[:m]] = True
        span = score[bi, start:end]
        np.testing.assert_allclose(span[important], IMPORTANT_OFFSET + imp[bi, start:end][important], rtol=1e-5)
        assert np.all(span[~important] >= -1e-6) and np.all(span[~important] <= 2 + 1e-6)
        np.testing.assert_allclose(score[bi, :start], imp[bi, :start], rtol=1e-5)
        np.testing.assert_allclose(score[bi, end:], imp[bi, end:], rtol=1e-5)


# ------------------------------------------------------------------- reference properties


def test_reference_uniform_attention_gives_uniform_importance():
    """Uniform attention: s = 1/N for every head, variance 0 (all heads filtered, so all
    kept), I = sqrt(H)/N everywhere; the important half is the first ceil(span/2) tokens."""
    b, h, n, c = 2, 3, 9, 4
    probs = np.full((b, h, n, n), 1.0 / n, np.float32)
    metric = np.random.default_rng(0).standard_normal((b, n, c)).astype(np.float32)
    imp = importance(probs, iterations=4, var_min=VAR_MIN, var_max=VAR_MAX)
    np.testing.assert_allclose(imp, np.sqrt(h) / n)
    (score,) = OP.run_reference(probs, metric, iterations=4, protect=1, span_end=8)
    np.testing.assert_allclose(score[:, [0, 8]], np.sqrt(h) / n, rtol=1e-6)
    np.testing.assert_allclose(score[:, 1:5], IMPORTANT_OFFSET + np.sqrt(h) / n, rtol=1e-6)  # 4 of 7, lowest first
    assert np.all(score[:, 5:8] < 2.0 + 1e-6)


def test_reference_one_iteration_is_column_mean():
    """iterations = 1: s_j = (1/N) Σ_i A_ij, the column mean of the attention."""
    rng = np.random.default_rng(1)
    probs = softmax_probs(rng, 2, 1, 7)
    imp = importance(probs, iterations=1, **WIDE)
    np.testing.assert_allclose(imp, probs[:, 0].astype(np.float64).mean(axis=1), rtol=1e-12)


def test_reference_similarity_stage_by_hand():
    """One sample, 4 tokens, span = all: tokens 0 and 2 are important (largest I); token 1
    duplicates token 0's metric (score 1 - 1 = 0), token 3 is orthogonal to both (score 1)."""
    # column sums 1.6, 0.4, 1.2, 0.8 -> I ∝ those after one step
    a = np.array([[0.4, 0.1, 0.3, 0.2]] * 4, np.float32)[None, None]
    metric = np.array([[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 3]]], np.float32)
    (score,) = OP.run_reference(a, metric, iterations=1, **WIDE)
    imp = a[0, 0].mean(axis=0)
    np.testing.assert_allclose(score[0], [4 + imp[0], 0.0, 4 + imp[2], 1.0], rtol=1e-6, atol=1e-7)


def test_reference_head_filter_and_fallback():
    """Head 0 uniform (variance 0) and head 2 one-hot (variance N-1) are dropped by the
    default range, head 1 moderate is kept; when the range admits no head, all are kept."""
    rng = np.random.default_rng(2)
    n = 11
    probs = np.empty((1, 3, n, n), np.float32)
    probs[0, 0] = 1.0 / n
    probs[0, 1] = softmax_probs(rng, 1, 1, n, temperatures=[0.6])[0, 0]
    probs[0, 2] = 0.0
    probs[0, 2, :, 3] = 1.0
    var = head_variances(probs, 3)[0]
    assert var[0] < 0.01 and 0.01 <= var[1] <= 0.7 and var[2] > 0.7
    s = np.full((3, n), 1.0 / n)
    for _ in range(3):
        s = np.einsum("hij,hi->hj", probs[0].astype(np.float64), s)
    np.testing.assert_allclose(importance(probs, iterations=3, var_min=VAR_MIN, var_max=VAR_MAX)[0], s[1], rtol=1e-12)
    np.testing.assert_allclose(importance(probs, iterations=3, var_min=50.0, var_max=60.0)[0],
                               np.sqrt((s**2).sum(axis=0)), rtol=1e-12)


# ------------------------------------------------------------- decomposition on ORT


DECOMPOSITION_CASES = [  # (batch, heads, n, c, iterations, protect, span_end)
    (2, 1, 5, 4, 1, 0, 0),
    (3, 1, 5, 3, 5, 1, 0),
    (2, 6, 17, 8, 5, 1, 0),
    (3, 6, 17, 8, 1, 0, 12),
    (2, 6, 16, 8, 30, 1, 15),
    (2, 6, 65, 16, 30, 1, 0),
    (2, 6, 65, 16, 5, 0, 40),
    (2, 1, 64, 8, 30, 1, 2),  # a span of one token: it is the important one
]
# temperatures mixing heads the default variance range drops (too flat / too sharp) and keeps
TEMPERATURES = [0.2, 0.7, 1.0, 1.5, 3.0, 6.0]


def _case(rng, b, h, n, c, duplicates=()):
    probs = softmax_probs(rng, b, h, n, TEMPERATURES[:h] if h > 1 else [1.0], duplicates)
    return probs, metric_with_duplicates(rng, b, n, c, duplicates)


def _duplicates(n):
    """Token pairs with identical attention columns and metric rows (ties)."""
    return [(1, 2), (n - 1, n - 2)] if n > 4 else [(1, 3)]


@pytest.mark.parametrize("b, h, n, c, iterations, protect, span_end", DECOMPOSITION_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_decomposition_matches_reference(b, h, n, c, iterations, protect, span_end, ties):
    rng = np.random.default_rng(n * 100 + iterations + protect + span_end)
    probs, metric = _case(rng, b, h, n, c, _duplicates(n) if ties else ())
    attrs = dict(iterations=iterations, protect=protect, span_end=span_end)
    (want,) = OP.run_reference(probs, metric, **attrs)
    (got,) = run_decomposition(OP, [probs, metric], **attrs)
    assert got.shape == (b, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    check_score_layout(want, probs, **attrs)
    if ties:  # duplicated tokens tie exactly; across the important boundary the lower index wins
        imp = importance(probs, iterations=iterations, var_min=VAR_MIN, var_max=VAR_MAX)
        start, end = span_of(n, protect, span_end)
        for src, dst in _duplicates(n):
            np.testing.assert_array_equal(imp[:, src], imp[:, dst])
            low, high = sorted((src, dst))
            if start <= low and high < end:
                assert np.all((got[:, high] > 2.5) <= (got[:, low] > 2.5))


def test_decomposition_cases_exercise_the_head_filter():
    """The random cases above really drop some heads and keep others."""
    rng = np.random.default_rng(17 * 100 + 5 + 1)
    probs, _ = _case(rng, 2, 6, 17, 8)
    var = head_variances(probs, 5)
    kept = (var >= 0.01) & (var <= 0.7)
    assert kept.any(axis=1).all() and not kept.all(axis=1).any()


def test_decomposition_tie_at_the_important_boundary():
    """Uniform attention: every importance ties, the important half is the lowest
    indices of the span, and unimportant duplicates of an important token score 0."""
    b, h, n, c = 2, 6, 9, 4
    probs = np.full((b, h, n, n), 1.0 / n, np.float32)
    metric = np.random.default_rng(3).standard_normal((b, n, c)).astype(np.float32)
    metric[:, 7] = 2.5 * metric[:, 2]  # unimportant token 7 duplicates important token 2 (same direction)
    attrs = dict(iterations=7, protect=1, span_end=0)
    (want,) = OP.run_reference(probs, metric, **attrs)
    (got,) = run_decomposition(OP, [probs, metric], **attrs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 1:5], IMPORTANT_OFFSET + np.sqrt(h) / n, rtol=1e-5)
    assert np.all(got[:, 5:] < 2.0 + 1e-6)
    np.testing.assert_allclose(got[:, 7], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[:, 0], np.sqrt(h) / n, rtol=1e-5)


@pytest.mark.parametrize("h", [1, 6])
def test_decomposition_one_iteration_is_column_mean(h):
    """iterations = 1 and a single kept head: outside the span and on the important
    tokens (minus the offset) the score is the column mean of the attention."""
    rng = np.random.default_rng(4)
    b, n = 3, 17
    probs = softmax_probs(rng, b, h, n)
    metric = rng.standard_normal((b, n, 5)).astype(np.float32)
    (got,) = run_decomposition(OP, [probs[:, :1], metric], iterations=1, protect=3, span_end=9, **WIDE)
    column_mean = probs[:, 0].mean(axis=1)
    np.testing.assert_allclose(got[:, :3], column_mean[:, :3], rtol=1e-5)
    np.testing.assert_allclose(got[:, 9:], column_mean[:, 9:], rtol=1e-5)
    top = np.sort(got[:, 3:9], axis=1)[:, -3:]
    np.testing.assert_allclose(top - IMPORTANT_OFFSET, np.sort(column_mean[:, 3:9], axis=1)[:, -3:], rtol=1e-5)
    if h > 1:  # with every head kept: the root-sum-of-squares of the heads' column means
        (got_all,) = run_decomposition(OP, [probs, metric], iterations=1, protect=3, span_end=9, **WIDE)
        np.testing.assert_allclose(got_all[:, :3], np.sqrt((probs.mean(axis=2) ** 2).sum(axis=1))[:, :3], rtol=1e-5)


def test_decomposition_all_heads_filtered_falls_back_to_all_heads():
    """Per sample: sample 0 has only sharp heads (all dropped: fallback to all), sample 1
    keeps its moderate heads only."""
    rng = np.random.default_rng(5)
    n, h = 17, 4
    sharp = softmax_probs(rng, 1, h, n, temperatures=[8.0] * h)
    mixed = softmax_probs(rng, 1, h, n, temperatures=[8.0, 0.7, 1.0, 8.0])
    probs = np.concatenate([sharp, mixed])
    metric = rng.standard_normal((2, n, 6)).astype(np.float32)
    var = head_variances(probs, 5)
    assert np.all(var[0] > 0.7) and ((var[1] >= 0.01) & (var[1] <= 0.7)).tolist() == [False, True, True, False]
    attrs = dict(iterations=5, protect=1)
    (got,) = run_decomposition(OP, [probs, metric], **attrs)
    (want,) = OP.run_reference(probs, metric, **attrs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    (all_heads,) = OP.run_reference(probs, metric, **attrs, **WIDE)
    np.testing.assert_allclose(got[0], all_heads[0], rtol=1e-5, atol=1e-6)
    (kept_only,) = OP.run_reference(probs[:, 1:3], metric, **attrs, **WIDE)
    np.testing.assert_allclose(got[1], kept_only[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[1], all_heads[1], rtol=1e-3)  # the filter matters
    # a range no head of any sample satisfies: everything falls back
    (none,) = run_decomposition(OP, [probs, metric], **attrs, var_min=1e6, var_max=2e6)
    np.testing.assert_allclose(none, all_heads, rtol=1e-5, atol=1e-6)


def test_decomposition_float16_inputs():
    rng = np.random.default_rng(6)
    probs, metric = _case(rng, 2, 6, 17, 8)
    attrs = dict(iterations=5, protect=1)
    # through ORT with float16 inputs: the function computes in float32 and casts back
    p16, m16 = probs.astype(np.float16), metric.astype(np.float16)
    (got,) = run_decomposition(OP, [p16, m16], **attrs)
    (want,) = OP.run_reference(p16, m16, **attrs)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_decomposition_uses_a_loop_with_the_attribute_trip_count():
    fn = OP.function()
    loops = [node for node in fn.node if node.op_type == "Loop"]
    assert len(loops) == 1
    assert {node.op_type for node in fn.node}.isdisjoint({"NonZero", "ScatterND"})
    scatters = [node for node in fn.node if node.op_type == "ScatterElements"]
    assert all(not any(a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute) for node in scatters)


@pytest.mark.parametrize("attrs, match", [
    (dict(iterations=0), "iterations"),
    (dict(iterations=2, protect=5, span_end=5), "span"),
    (dict(iterations=2, span_end=9), "span"),
])
def test_reference_rejects_bad_attributes(attrs, match):
    probs = np.full((1, 1, 8, 8), 1 / 8, np.float32)
    with pytest.raises(ValueError, match=match):
        OP.run_reference(probs, np.ones((1, 8, 2), np.float32), **attrs)


# ------------------------------------------------------------ Triton kernel (interpreter)


KERNEL_CASES = [  # (batch, heads, n, c, iterations, protect, span_end)
    (2, 1, 5, 4, 1, 0, 0),
    (3, 6, 17, 8, 5, 1, 0),
    (2, 6, 16, 8, 30, 1, 15),
    (2, 6, 65, 16, 5, 0, 40),
    (2, 3, 37, 64, 30, 1, 0),  # C = 64, odd N > 32 (several row chunks)
    (2, 1, 64, 8, 3, 1, 2),  # a one-token span
    (1, 2, 197, 16, 3, 1, 0),  # ViT-B/16 tokens: BLOCK_N 256
]


@pytest.mark.parametrize("b, h, n, c, iterations, protect, span_end", KERNEL_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_kernel_matches_reference(b, h, n, c, iterations, protect, span_end, ties, device):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    rng = np.random.default_rng(n * 100 + iterations + protect + span_end)
    probs, metric = _case(rng, b, h, n, c, _duplicates(n) if ties else ())
    attrs = dict(iterations=iterations, protect=protect, span_end=span_end)
    (want,) = OP.run_reference(probs, metric, **attrs)
    (got,) = OP.run_triton(to_torch(probs, device), to_torch(metric, device), **attrs)
    got = got.cpu().numpy()
    assert got.shape == (b, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_kernel_ties_fallback_and_column_mean(device):
    """Uniform attention (every importance ties: the lowest span indices are important),
    per-sample head fallback, and iterations = 1 giving the column mean."""
    pytest.importorskip("triton")
    b, h, n, c = 2, 6, 9, 4
    probs = np.full((b, h, n, n), 1.0 / n, np.float32)
    metric = np.random.default_rng(3).standard_normal((b, n, c)).astype(np.float32)
    metric[:, 7] = 2.5 * metric[:, 2]
    (got,) = OP.run_triton(to_torch(probs, device), to_torch(metric, device), iterations=7, protect=1)
    got = got.cpu().numpy()
    np.testing.assert_allclose(got, OP.run_reference(probs, metric, iterations=7, protect=1)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 1:5], IMPORTANT_OFFSET + np.sqrt(h) / n, rtol=1e-5)
    np.testing.assert_allclose(got[:, 7], 0.0, atol=1e-6)

    rng = np.random.default_rng(5)
    n = 17
    probs = np.concatenate([softmax_probs(rng, 1, 4, n, temperatures=[8.0] * 4),
                            softmax_probs(rng, 1, 4, n, temperatures=[8.0, 0.7, 1.0, 8.0])])
    metric = rng.standard_normal((2, n, 6)).astype(np.float32)
    for attrs in [dict(iterations=5, protect=1), dict(iterations=5, var_min=1e6, var_max=2e6)]:
        (got,) = OP.run_triton(to_torch(probs, device), to_torch(metric, device), **attrs)
        np.testing.assert_allclose(got.cpu().numpy(), OP.run_reference(probs, metric, **attrs)[0],
                                   rtol=1e-5, atol=1e-6)

    (got,) = OP.run_triton(to_torch(probs[:, :1], device), to_torch(metric, device), iterations=1, protect=3, span_end=9)
    column_mean = probs[:, 0].mean(axis=1)
    np.testing.assert_allclose(got.cpu().numpy()[:, 9:], column_mean[:, 9:], rtol=1e-5)


def test_kernel_float16_and_out_buffer(device):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    rng = np.random.default_rng(8)
    probs, metric = _case(rng, 2, 6, 17, 8)
    p16, m16 = probs.astype(np.float16), metric.astype(np.float16)
    from trimrt.plugins.kernels.attention_page_rank import run

    out = torch.empty((2, 17), dtype=torch.float16, device=device)  # as TensorRT's JIT impl passes it
    (got,) = run(to_torch(p16, device), to_torch(m16, device), **OP.attribute_values(dict(iterations=5, protect=1)),
                 out=(out,))
    assert got is out and got.dtype == torch.float16
    (want,) = OP.run_reference(p16, m16, iterations=5, protect=1)
    np.testing.assert_allclose(got.cpu().numpy().astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_kernel_rejects_bad_shapes_and_attributes(device):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    probs = torch.full((1, 1, 8, 8), 1 / 8, device=device)
    with pytest.raises(ValueError, match="metric"):
        OP.run_triton(probs, torch.ones((1, 7, 2), device=device), iterations=1)
    with pytest.raises(ValueError, match="span"):
        OP.run_triton(probs, torch.ones((1, 8, 2), device=device), iterations=1, protect=8)
    with pytest.raises(ValueError, match="iterations"):
        OP.run_triton(probs, torch.ones((1, 8, 2), device=device), iterations=0)


@pytest.mark.slow
def test_kernel_compiles_to_ptx():
    """The kernel compiles for a real GPU target (sm_80 PTX, what the TensorRT AOT path
    embeds) without global scratch; the interpreter alone does not check that. Needs no GPU."""
    pytest.importorskip("triton")
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import attention_page_rank as apr
        for probs, metric in (("fp32", "fp32"), ("fp16", "fp16"), ("fp32", "bf16")):
            k = apr.compile_kernel({"probs": probs, "metric": metric, "score": probs}, n=197, var_min=0.01,
                                   var_max=0.7, target=GPUTarget("cuda", 80, 32))
            assert ".entry attention_page_rank_kernel" in k.asm["ptx"], k.metadata.name
            assert getattr(k.metadata, "global_scratch_size", 0) == 0
        print("ok")
    """)


# --------------------------------------------------------------------------- TensorRT


def test_descriptor_gives_score_shape_and_dtype():
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    probs, metric = FakeDesc(("B", "H", "N", "N")), FakeDesc(("B", "N", "C"), "float")
    assert describe(probs, metric, iterations=5) == ((("B", "N"), "half"),)
    assert describe(probs, metric, 30, 0.0, 1.0, 1, 60) == ((("B", "N"), "half"),)
    with pytest.raises(ValueError, match="iterations"):
        describe(probs, metric, iterations=0)
    with pytest.raises(ValueError, match="span"):
        describe(probs, metric, iterations=1, protect=4, span_end=4)


@pytest.mark.parametrize("n, protect, span_end", [(17, 0, 0), (17, 1, 0), (197, 1, 0), (64, 1, 2), (65, 0, 40),
                                                   (16, 3, 16), (1, 0, 0)])
def test_symbolic_launch_args(n, protect, span_end):
    """The AOT scalars as shape expressions (N known only at run time) == those of the
    kernel's own launch on ints; the important count is ceil(span / 2)."""
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import attention_page_rank as kernels

    _, trtp = fake_tensorrt()
    b, h, c = 2, 6, 8
    attrs = dict(iterations=5, var_min=VAR_MIN, var_max=VAR_MAX, protect=protect, span_end=span_end)
    want = kernels.scalar_args((b, h, n, n), (b, n, c), **attrs)
    end = span_end or n
    assert want == [h, n, c, 5, protect, end, -(-(end - protect) // 2)]
    sym_probs, sym_metric = (Dim(b), Dim(h), Dim(n), Dim(n)), (Dim(b), Dim(n), Dim(c))
    assert [value(v) for v in kernels.scalar_args(sym_probs, sym_metric, **attrs, sym=trtp)] == want
    assert [value(v) for v in kernels.grid(sym_probs, sym_metric, cdiv=trtp.cdiv)] == [b]
    assert [tuple(value(v) for v in s) for s in kernels.trt_output_shapes(
        {"probs": sym_probs, "metric": sym_metric}, attrs, trtp)] == [(b, n)]


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("iterations, protect, span_end", [(1, 0, 0), (5, 1, 0), (30, 1, 40)])
def test_plugin_matches_reference(aot, iterations, protect, span_end):
    pytest.importorskip("tensorrt")
    from trimrt.plugins import tensorrt_glue as glue

    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(OP)
    glue.register(OP)  # idempotent
    rng = np.random.default_rng(9)
    probs, metric = _case(rng, 2, 6, 65, 16, _duplicates(65))
    attrs = dict(iterations=iterations, protect=protect, span_end=span_end)
    (expected,) = OP.run_reference(probs, metric, **attrs)
    feeds = {"probs": probs, "metric": metric}
    got = run_tensorrt(one_node_model(OP, feeds, [expected.shape], attrs, aot), feeds)
    np.testing.assert_allclose(got["score"], expected, rtol=1e-5, atol=2e-6)
