"""TokenMerge (ToMe bipartite soft matching + size-weighted merge): NumPy reference vs a
PyTorch ToMe written from the paper, ONNX decomposition on ONNX Runtime, Triton kernel
under the interpreter, TensorRT plugin hooks (with fake tensorrt; real TensorRT on GPU)."""

from __future__ import annotations

import inspect
import math
import typing

import numpy as np
import onnx
import onnx.helper as oh
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
from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins.token_merge import max_merged

OP = REGISTRY["TokenMerge"]

# (batch, n, d, c, r, protect)
CASES = [
    (1, 9, 5, 4, 3, 1),  # N odd
    (2, 10, 6, 4, 2, 1),  # N even, batch > 1
    (3, 17, 8, 6, 0, 1),  # r = 0: only the A-then-B reordering
    (2, 17, 8, 6, 8, 1),  # r = max (Na - 1) with a CLS
    (2, 16, 8, 6, 8, 0),  # r = max (Na) with nothing protected
    (2, 15, 7, 5, 3, 0),  # protect = 0, N odd
    (2, 12, 4, 3, 4, 3),  # protect = 3: A tokens 0, 2 and B token 1 are fixed
    (1, 2, 3, 2, 0, 1),  # the smallest input
    (2, 3, 3, 2, 1, 0),  # one B token receives
    (2, 65, 16, 8, 20, 1),  # N over a 32-token B chunk
    (2, 197, 64, 32, 16, 1),  # DeiT-S geometry (ToMe r = 16)
]


def _inputs(rng, batch, n, d, c, ones=False):
    x = rng.standard_normal((batch, n, d)).astype(np.float32)
    metric = rng.standard_normal((batch, n, c)).astype(np.float32)
    size = np.ones((batch, n), np.float32) if ones else rng.integers(1, 5, size=(batch, n)).astype(np.float32)
    return x, metric, size


def _tied_metric(rng, batch, n, c, categories):
    """One-hot metrics scaled by random positive factors: normalised they are exactly
    one-hot, every cosine is exactly 0 or 1 in any precision, so most scores tie."""
    cat = rng.integers(0, categories, size=(batch, n))
    metric = np.zeros((batch, n, c), np.float32)
    np.put_along_axis(metric, cat[..., None], rng.uniform(0.5, 3.0, size=(batch, n, 1)).astype(np.float32), axis=2)
    return metric


def _check_against_reference(got, want, batch, n, d, r):
    y, size_out, index = got
    assert y.shape == (batch, n - r, d) and size_out.shape == (batch, n - r) and index.shape == (batch, n - r)
    assert index.dtype == np.int64 and y.dtype == want[0].dtype and size_out.dtype == want[1].dtype
    np.testing.assert_array_equal(index, want[2])
    np.testing.assert_allclose(size_out, want[1], rtol=1e-6)
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the reference itself


def tome_torch(x, metric, size, r):
    """ToMe with a class token, from the paper's formulas: bipartite soft matching on the
    L2-normalised metric (A = even, B = odd tokens, the CLS row blocked), the r A tokens
    with the best matches merged into them by size-weighted average (merge_wavg).
    Ties broken like the op: stable sort, first best index."""
    import torch

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -math.inf  # the class token never merges
    node_max, node_idx = scores.max(dim=-1)  # first maximal index on ties
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx = edge_idx[:, r:].sort(dim=1).values  # keeps the class token first
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(t):
        t_a, t_b = t[:, ::2], t[:, 1::2]
        width = t.shape[-1]
        unm = t_a.gather(dim=1, index=unm_idx.expand(-1, -1, width))
        src = t_a.gather(dim=1, index=src_idx.expand(-1, -1, width))
        dst = t_b.scatter_reduce(1, dst_idx.expand(-1, -1, width), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    weighted = merge(x * size[..., None])
    new_size = merge(size[..., None])
    return weighted / new_size, new_size[..., 0], unm_idx[..., 0]


@pytest.mark.parametrize("batch, n, d, c, r", [(1, 9, 5, 4, 3), (2, 10, 6, 4, 2), (3, 17, 8, 6, 0), (2, 17, 8, 6, 8),
                                                (2, 65, 16, 8, 20), (4, 197, 24, 16, 16), (2, 50, 8, 8, 24)])
@pytest.mark.parametrize("ones", [True, False])
def test_reference_agrees_with_torch_tome(batch, n, d, c, r, ones):
    """Acceptance: with protect = 1 the NumPy reference is ToMe (class_token=True, merge_wavg)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n * 31 + r)
    x, metric, size = _inputs(rng, batch, n, d, c, ones)
    want_y, want_size, unm = tome_torch(*(torch.from_numpy(a).double() for a in (x, metric, size)), r)
    y, size_out, index = OP.run_reference(x, metric, size, r=r)  # protect defaults to 1
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(size_out, want_size.numpy())
    na = (n + 1) // 2
    np.testing.assert_array_equal(index[:, :na - r], 2 * unm.numpy())
    np.testing.assert_array_equal(index[:, na - r:], np.broadcast_to(np.arange(1, n, 2), (batch, n // 2)))


def test_reference_semantics():
    """A hand-checked merge: CLS kept, the best-matching A token averaged into its B match
    by size, the others untouched, index pointing at the input tokens."""
    # tokens 0..5: A = 0, 2, 4; B = 1, 3, 5. Metrics: 2 ~ 5 (cos 1), 4 ~ 3 (cos 0.8), 0 (CLS) ~ 1.
    metric = np.array([[[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.6, 0.8], [0, 0, 1], [0, 1, 0]]], np.float32)
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1) * 10
    size = np.array([[1, 1, 3, 1, 1, 2]], np.float32)
    y, size_out, index = OP.run_reference(x, metric, size, r=1, protect=1)
    # token 2 (size 3, x 20) merges into token 5 (size 2, x 50): (60 + 100) / 5 = 32
    assert index.tolist() == [[0, 4, 1, 3, 5]]
    assert size_out.tolist() == [[1, 1, 1, 1, 5]]
    np.testing.assert_allclose(y[0, :, 0], [0, 40, 10, 30, 32])
    # r = 2: token 4 (cos 0.8 with 3) merges too; the CLS stays although its match is perfect
    y, size_out, index = OP.run_reference(x, metric, size, r=2, protect=1)
    assert index.tolist() == [[0, 1, 3, 5]]
    np.testing.assert_allclose(y[0, :, 0], [0, 10, 35, 32])
    assert size_out.tolist() == [[1, 1, 2, 5]]
    # protect = 0: the CLS (cos 1 with token 1) is the first merged (ties: lower index)
    _, size_out, index = OP.run_reference(x, metric, size, r=1, protect=0)
    assert index.tolist() == [[2, 4, 1, 3, 5]] and size_out.tolist() == [[3, 1, 2, 1, 2]]


def test_reference_ties():
    """All metrics equal: every score ties. The lowest unprotected A tokens merge, all into
    the lowest unprotected B token."""
    x = np.random.default_rng(0).standard_normal((1, 9, 2)).astype(np.float32)
    metric = np.ones((1, 9, 3), np.float32)
    y, size_out, index = OP.run_reference(x, metric, np.ones((1, 9), np.float32), r=2, protect=1)
    assert index.tolist() == [[0, 6, 8, 1, 3, 5, 7]]  # A tokens 2 and 4 merged into B token 1
    assert size_out.tolist() == [[1, 1, 1, 3, 1, 1, 1]]
    np.testing.assert_allclose(y[0, 3], x[0, [1, 2, 4]].mean(axis=0), rtol=1e-6)
    _, _, index = OP.run_reference(x, metric, np.ones((1, 9), np.float32), r=2, protect=4)
    assert index.tolist() == [[0, 2, 8, 1, 3, 5, 7]]  # 4 and 6 merge (into 5); 0 and 2 are protected


@pytest.mark.parametrize("n, protect, bound", [(9, 1, 4), (10, 1, 4), (10, 0, 5), (9, 3, 3), (5, 4, 0), (6, 4, 1), (4, 4, 0),
                                               (3, 2, 0), (2, 1, 0), (2, 0, 1)])
def test_max_merged(n, protect, bound):
    """r beyond the mergeable tokens is clamped, as ToMe does: r = bound + 3 merges `bound`."""
    assert max_merged(n, protect) == bound
    x, metric, size = _inputs(np.random.default_rng(n), 1, n, 2, 3)
    exact = OP.run_reference(x, metric, size, r=bound, protect=protect)
    clamped = OP.run_reference(x, metric, size, r=bound + 3, protect=protect)
    assert clamped[0].shape[1] == n - bound
    for a, b in zip(exact, clamped):
        np.testing.assert_array_equal(a, b)
    if n >= 4:  # the decomposition clamps the same way at run time
        got = run_decomposition(OP, [x, metric, size], r=bound + 3, protect=protect)
        np.testing.assert_allclose(got[0], exact[0], atol=1e-5)
        np.testing.assert_array_equal(got[2], exact[2])


def test_reference_rejects_bad_attributes():
    x, metric, size = _inputs(np.random.default_rng(0), 1, 8, 2, 3)
    with pytest.raises(ValueError, match=r"r=-1 must be >= 0"):
        OP.run_reference(x, metric, size, r=-1)
    with pytest.raises(ValueError, match="protect=-1"):
        OP.run_reference(x, metric, size, r=1, protect=-1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        OP.run_reference(x[:, :1], metric[:, :1], size[:, :1], r=0)
    with pytest.raises(ValueError, match="'r' is required"):
        OP.run_reference(x, metric, size)


# ---------------------------------------------------------------- ONNX decomposition


@pytest.mark.parametrize("batch, n, d, c, r, protect", CASES)
def test_decomposition_matches_reference(batch, n, d, c, r, protect):
    rng = np.random.default_rng(n * 7 + r + protect)
    inputs = _inputs(rng, batch, n, d, c)
    got = run_decomposition(OP, list(inputs), r=r, protect=protect)
    want = OP.run_reference(*inputs, r=r, protect=protect)
    _check_against_reference(got, want, batch, n, d, r)


def test_decomposition_default_protect():
    inputs = _inputs(np.random.default_rng(1), 2, 13, 4, 3)
    got = run_decomposition(OP, list(inputs), r=5)
    _check_against_reference(got, OP.run_reference(*inputs, r=5), 2, 13, 4, 5)
    assert got[2][:, 0].tolist() == [0, 0]  # the CLS is kept, first


@pytest.mark.parametrize("batch, n, r, protect, categories", [(2, 17, 8, 1, 1), (3, 20, 5, 1, 3), (2, 33, 10, 0, 4),
                                                               (2, 40, 12, 3, 2), (1, 11, 0, 1, 2)])
def test_decomposition_ties(batch, n, r, protect, categories):
    """Duplicated metrics: ties in best scores and in best matches resolve like the reference."""
    rng = np.random.default_rng(n + categories)
    x, _, size = _inputs(rng, batch, n, 6, 4)
    metric = _tied_metric(rng, batch, n, 4, categories)
    got = run_decomposition(OP, [x, metric, size], r=r, protect=protect)
    _check_against_reference(got, OP.run_reference(x, metric, size, r=r, protect=protect), batch, n, 6, r)


def test_decomposition_r_zero_reorders():
    """r = 0 merges nothing but still orders the tokens A first, then B."""
    x, metric, size = _inputs(np.random.default_rng(2), 2, 7, 3, 4)
    y, size_out, index = run_decomposition(OP, [x, metric, size], r=0, protect=1)
    assert index.tolist() == [[0, 2, 4, 6, 1, 3, 5]] * 2
    np.testing.assert_allclose(y, x[:, [0, 2, 4, 6, 1, 3, 5]], rtol=1e-6)
    np.testing.assert_array_equal(size_out, size[:, [0, 2, 4, 6, 1, 3, 5]])


def test_decomposition_float16():
    """A half-precision model: size may stay float32, outputs follow x."""
    rng = np.random.default_rng(3)
    x, metric, size = _inputs(rng, 2, 21, 8, 4)
    inputs = [x.astype(np.float16), metric, size]
    y, size_out, index = run_decomposition(OP, inputs, r=6, protect=1)
    want = OP.run_reference(*inputs, r=6, protect=1)
    assert y.dtype == size_out.dtype == np.float16
    np.testing.assert_array_equal(index, want[2])
    np.testing.assert_allclose(y.astype(np.float32), want[0].astype(np.float32), rtol=1e-2, atol=1e-2)


def test_decomposition_avoids_scatter_and_nonzero():
    ops = {node.op_type for node in OP.function().node}
    assert not ops & {"NonZero", "ScatterND", "ScatterElements", "Loop"}
    assert {"TopK", "MatMul", "GatherND", "ArgMax"} <= ops


# ------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("batch, n, d, c, r, protect", CASES + [(2, 199, 384, 64, 40, 1), (1, 64, 100, 70, 31, 1)])
def test_kernel_matches_reference(batch, n, d, c, r, protect, device):
    rng = np.random.default_rng(n * 7 + r + protect)
    inputs = _inputs(rng, batch, n, d, c)
    got = run_triton(OP, inputs, device, r=r, protect=protect)
    _check_against_reference(got, OP.run_reference(*inputs, r=r, protect=protect), batch, n, d, r)


@pytest.mark.parametrize("batch, n, r, protect, categories", [(2, 17, 8, 1, 1), (3, 20, 5, 1, 3), (2, 33, 10, 0, 4),
                                                               (2, 70, 12, 3, 2), (1, 101, 49, 1, 4)])
def test_kernel_ties(batch, n, r, protect, categories, device):
    """Ties across B chunks (n = 70, 101) too: the first best B token, the lower A token."""
    rng = np.random.default_rng(n + categories)
    x, _, size = _inputs(rng, batch, n, 6, 4)
    metric = _tied_metric(rng, batch, n, 4, categories)
    got = run_triton(OP, [x, metric, size], device, r=r, protect=protect)
    _check_against_reference(got, OP.run_reference(x, metric, size, r=r, protect=protect), batch, n, 6, r)


def test_kernel_float16_and_strided_inputs(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x, metric, size = _inputs(rng, 2, 30, 40, 8)
    want = OP.run_reference(x.astype(np.float16), metric, size, r=9, protect=1)
    xt = torch.from_numpy(x).to(device).half()
    metric_t = torch.from_numpy(np.ascontiguousarray(metric.transpose(0, 2, 1))).to(device).transpose(1, 2)
    y, size_out, index = OP.run_triton(xt, metric_t, torch.from_numpy(size).to(device), r=9)
    assert y.dtype == size_out.dtype == torch.float16
    np.testing.assert_array_equal(index.cpu().numpy(), want[2])
    np.testing.assert_allclose(y.cpu().float().numpy(), want[0].astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(size_out.cpu().float().numpy(), want[1].astype(np.float32))


def test_kernel_output_buffers_and_no_features(device):
    torch = pytest.importorskip("torch")
    from trimrt.plugins.kernels import token_merge as kernels

    rng = np.random.default_rng(5)
    x, metric, size = _inputs(rng, 2, 11, 3, 4)
    want = OP.run_reference(x, metric, size, r=4, protect=1)
    args = [torch.from_numpy(a).to(device) for a in (x, metric, size)]
    out = (torch.empty((2, 7, 3), device=device), torch.empty((2, 7), device=device),
           torch.empty((2, 7), dtype=torch.int64, device=device))
    result = kernels.run(*args, r=4, protect=1, ratio=0.0, out=out)
    assert all(a is b for a, b in zip(result, out))
    _check_against_reference([t.cpu().numpy() for t in out], want, 2, 11, 3, 4)
    with pytest.raises(ValueError, match="output buffers"):
        kernels.run(*args, r=3, protect=1, ratio=0.0, out=out)
    _, size_out, index = kernels.run(args[0][..., :0], args[1], args[2], r=4, protect=1, ratio=0.0)  # D = 0
    np.testing.assert_array_equal(index.cpu().numpy(), want[2])
    np.testing.assert_allclose(size_out.cpu().numpy(), want[1])


@pytest.mark.parametrize("n, r, protect, match", [(10, -1, 0, "r=-1"),
                                                   (1, 0, 1, "at least 2 tokens"), (8, 1, -2, "protect=-2")])
def test_kernel_rejects_what_the_reference_rejects(n, r, protect, match, device):
    """(An r beyond the mergeable tokens is not an error: both clamp it, see test_max_merged.)"""
    inputs = _inputs(np.random.default_rng(6), 1, n, 2, 3)
    with pytest.raises(ValueError, match=match):
        OP.run_reference(*inputs, r=r, protect=protect)
    with pytest.raises(ValueError, match=match):
        run_triton(OP, inputs, device, r=r, protect=protect)


def test_kernel_rejects_bad_shapes(device):
    x, metric, size = _inputs(np.random.default_rng(7), 1, 8, 2, 3)
    with pytest.raises(ValueError, match="need x"):
        run_triton(OP, [x, metric[:, :6], size], device, r=1)
    with pytest.raises(ValueError, match="at most"):
        run_triton(OP, _inputs(np.random.default_rng(7), 1, 1025, 1, 1), device, r=1)


@pytest.mark.slow
def test_kernel_compiles_to_ptx():
    """The kernel compiles for a real GPU target (sm_80 PTX, what the TensorRT AOT path
    embeds); the interpreter alone does not check that. Needs no GPU."""
    check_compiles_to_ptx("""
        from trimrt.plugins.kernels import token_merge as tm
        target = GPUTarget("cuda", 80, 32)
        for dt in ("fp32", "fp16"):
            k = tm.compile_kernel({"x": dt, "metric": dt, "size": "fp32", "y": dt, "size_out": dt},
                                  n=197, c=64, d=384, target=target)
            assert ".entry token_merge_kernel" in k.asm["ptx"], k.metadata.name
            assert getattr(k.metadata, "global_scratch_size", 0) == 0
        print("ok")
    """, timeout=600)


# ------------------------------------------------------- TensorRT hooks (fake tensorrt)


def test_plugin_signatures_follow_the_schema():
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    spec = glue.spec_for(OP)
    names = ["x", "metric", "size", "r", "protect", "ratio"]
    describe = inspect.signature(glue._descriptor(spec, trt, trtp))
    assert list(describe.parameters) == names
    assert [p.annotation for p in describe.parameters.values()] == [trtp.TensorDesc] * 3 + [int, int, float]
    assert typing.get_args(describe.return_annotation) == (trtp.TensorDesc,) * 3
    assert list(inspect.signature(glue._jit_impl(spec, trtp)).parameters) == names + ["outputs", "stream"]
    assert list(inspect.signature(glue._aot_impl(spec, trtp)).parameters) == names + ["outputs", "tactic"]


@pytest.mark.parametrize("n, r, protect", [(197, 16, 1), (17, 8, 1), (16, 8, 0), (12, 4, 3), (9, 0, 1)])
def test_plugin_shapes_and_launch_args(n, r, protect):
    """Output shapes and AOT scalars as shape expressions (N known at run time only) ==
    the reference's shapes and the kernel's own launch arguments on ints."""
    pytest.importorskip("triton")
    from trimrt.plugins import tensorrt_glue as glue
    from trimrt.plugins.kernels import token_merge as kernels

    trt, trtp = fake_tensorrt()
    b, d, c = 2, 5, 3
    want = OP.run_reference(*_inputs(np.random.default_rng(n), b, n, d, c), r=r, protect=protect)
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    x, metric, size = (Dim(b), Dim(n), Dim(d)), (Dim(b), Dim(n), Dim(c)), (Dim(b), Dim(n))
    described = describe(FakeDesc(x), FakeDesc(metric, "float"), FakeDesc(size, "float"), r=r, protect=protect)
    assert [tuple(value(v) for v in shape) for shape, _ in described] == [w.shape for w in want]
    assert [dtype for _, dtype in described] == ["half", "half", "int64"]  # float outputs follow x
    args = kernels.scalar_args(x, metric, size, r=r, protect=protect, ratio=0.0, sym=trtp)
    ints = kernels.scalar_args((b, n, d), (b, n, c), (b, n), r=r, protect=protect, ratio=0.0)
    assert [value(v) for v in args] == ints
    assert [value(v) for v in kernels.grid(x, metric, size, cdiv=trtp.cdiv, block_d=2)] == [b, 3]
    # a static N: plain ints through the same functions
    attrs = {"r": r, "protect": protect, "ratio": 0.0}
    assert kernels.trt_output_shapes({"x": (b, n, d)}, attrs, trtp)[0] == (b, n - r, d)


def test_plugin_describe_rejects_bad_r():
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    shapes = (Dim(1), Dim(8), Dim(4)), (Dim(1), Dim(8), Dim(4)), (Dim(1), Dim(8))
    with pytest.raises(ValueError, match="r=-1"):
        describe(*(FakeDesc(s) for s in shapes), r=-1)
    # r beyond the mergeable tokens is clamped: 8 tokens with the CLS protected merge at most 3
    assert describe(FakeDesc((1, 8, 4)), FakeDesc((1, 8, 4)), FakeDesc((1, 8)), r=5)[1][0] == (1, 5)
    sym = describe(*(FakeDesc(s) for s in shapes), r=5)[1][0]
    assert value(sym[1]) == 5


# --------------------------------------------------------------------- with TensorRT


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("r, protect", [(0, 1), (16, 1), (34, 1), (20, 0), (10, 3)])
def test_token_merge_plugin(aot, r, protect, rng):
    """One TokenMerge node through TensorRT (the registered plugin) == the reference."""
    pytest.importorskip("tensorrt")
    from trimrt.plugins import tensorrt_glue as glue

    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(OP)
    x, metric, size = _inputs(rng, 3, 69, 40, 16)
    attrs = {"r": r, "protect": protect}
    want = OP.run_reference(x, metric, size, **attrs)
    feeds = {"x": x, "metric": metric, "size": size}
    model = one_node_model(OP, feeds, [w.shape for w in want], attrs, aot)
    out = run_tensorrt(model, feeds, strongly_typed=False)
    got = [out[t.name] for t in OP.outputs]
    _check_against_reference(got, want, 3, 69, 40, r)


def test_op_honours_the_contract():
    """The registry's contract checks, for this op alone (independent of the other ops)."""
    import importlib

    assert OP.name == "TokenMerge" and not onnx.defs.has(OP.name)
    fn = OP.function()
    assert fn.domain == DOMAIN and fn.name == OP.name
    assert sorted(list(fn.attribute) + [a.name for a in fn.attribute_proto]) == ["protect", "r", "ratio"]
    assert {a.name: oh.get_attribute_value(a) for a in fn.attribute_proto} == {"protect": 1, "ratio": 0.0}
    kernels = importlib.import_module(OP.triton.partition(":")[0])
    assert callable(getattr(kernels, OP.triton.partition(":")[2]))
    assert callable(kernels.trt_output_shapes) and callable(kernels.trt_aot)


def test_kernel_clamps_r_like_the_reference(device):
    inputs = _inputs(np.random.default_rng(7), 2, 9, 4, 3)
    want = OP.run_reference(*inputs, r=50, protect=1)
    assert want[0].shape[1] == 9 - 4
    got = run_triton(OP, inputs, device, r=50, protect=1)
    _check_against_reference(got, want, 2, 9, 4, 4)


@pytest.mark.parametrize("n, ratio, protect", [(256, 0.1, 1), (17, 0.25, 1), (40, 0.7, 1), (9, 0.05, 0), (64, 0.3, 2)])
def test_ratio_merges_a_share_of_the_tokens(n, ratio, protect, device):
    """r = 0 with ratio: floor(ratio · N) merged (clamped), same in the reference, the
    decomposition, the kernel and the TensorRT shape expressions."""
    ratio = float(np.float32(ratio))
    inputs = _inputs(np.random.default_rng(n), 2, n, 8, 4)
    merged = min(math.floor(ratio * n), max_merged(n, protect))
    want = OP.run_reference(*inputs, r=0, protect=protect, ratio=ratio)
    assert want[0].shape[1] == n - merged
    np.testing.assert_array_equal(want[2], OP.run_reference(*inputs, r=merged, protect=protect)[2]) if merged else None
    got = run_decomposition(OP, inputs, r=0, protect=protect, ratio=ratio)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    _check_against_reference(run_triton(OP, inputs, device, r=0, protect=protect, ratio=ratio), want, 2, n, 8, merged)
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    shapes = (Dim(2), Dim(n), Dim(8)), (Dim(2), Dim(n), Dim(4)), (Dim(2), Dim(n))
    assert value(describe(*(FakeDesc(s) for s in shapes), r=0, protect=protect, ratio=ratio)[1][0][1]) == n - merged
