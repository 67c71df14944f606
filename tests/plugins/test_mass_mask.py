"""MassMask: reference semantics; decomposition on ORT, Triton kernel (interpreter on CPU,
see conftest.py) and TensorRT plugin (`gpu`) == the NumPy reference; the plugin hooks
against a fake tensorrt."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import typing
from types import SimpleNamespace

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins import tensorrt_glue as glue
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


def _triton_run(score, kept_index, device, **attrs):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    got = OP.run_triton(torch.from_numpy(np.ascontiguousarray(score)).to(device),
                        torch.from_numpy(np.ascontiguousarray(kept_index)).to(device), **attrs)
    return tuple(t.cpu().numpy() for t in got)


def _check_kernel(score, kept_index, device, **attrs):
    valid, count = _triton_run(score, kept_index, device, **attrs)
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
    valid, count = _triton_run(score[:0], np.zeros((0, 9), np.int64), device, tau=0.5)
    assert valid.shape == (0, 9) and count.shape == (0,)
    from trimrt.plugins.kernels import mass_mask as kernels

    s = torch.from_numpy(score.astype(np.float32)).to(device)
    idx = torch.from_numpy(select(score, 9, 1, 20)).to(device)
    out = (torch.empty((2, 10), device=device), torch.empty((2,), dtype=torch.int64, device=device))
    kernels.run(s, idx, tau=0.5, protect=1, out=out)
    want = OP.run_reference(score.astype(np.float32), idx.cpu().numpy(), tau=0.5, protect=1)
    np.testing.assert_array_equal(out[0].cpu().numpy(), want[0])
    np.testing.assert_array_equal(out[1].cpu().numpy(), want[1])
    with pytest.raises(ValueError, match="output buffers"):
        kernels.run(s, idx, tau=0.5, protect=1, out=(out[0][:, :3], out[1]))


@pytest.mark.parametrize("attrs, match", [(dict(tau=0.0), "tau"), (dict(tau=1.5), "tau"),
                                          (dict(tau=0.5, protect=8), "span"), (dict(tau=0.5, span_end=9), "span")])
def test_kernel_rejects_what_the_reference_rejects(attrs, match, device):
    s, idx = np.ones((1, 8), np.float32), np.zeros((1, 3), np.int64)
    with pytest.raises(ValueError, match=match):
        OP.run_reference(s, idx, **attrs)
    with pytest.raises(ValueError, match=match):
        _triton_run(s, idx, device, **attrs)


def test_kernel_compiles_to_ptx():
    """The kernel (float64 sums, tau baked in) compiles for a real GPU target (sm_80 PTX)."""
    code = textwrap.dedent("""
        import sys
        try:
            from triton.backends.compiler import GPUTarget
            from triton.backends import backends
        except ImportError as exc:
            print(exc); sys.exit(77)
        if "nvidia" not in backends:
            print("no nvidia backend"); sys.exit(77)
        from trimrt.plugins.kernels import mass_mask
        for dt in ("fp32", "fp16"):
            k = mass_mask.compile_kernel({"score": dt, "valid": dt}, n=197, tau=0.9, target=GPUTarget("cuda", 80, 32))
            assert ".entry mass_mask_kernel" in k.asm["ptx"] and not getattr(k.metadata, "global_scratch_size", 0)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(f"triton cannot compile for CUDA here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# ------------------------------------------------------- TensorRT hooks (fake tensorrt)


class _Dim:
    """An evaluated stand-in for a tensorrt.plugin ShapeExpr: not an int, no reflected ops."""

    def __init__(self, value):
        self.value = int(value)

    def __sub__(self, other):
        return _Dim(self.value - (other.value if isinstance(other, _Dim) else other))


def _fakes():
    trt = SimpleNamespace(int64="int64")
    trtp = SimpleNamespace(TensorDesc=type("TensorDesc", (), {}), KernelLaunchParams=type("KernelLaunchParams", (), {}),
                           SymExprs=type("SymExprs", (), {}), from_shape_expr=lambda shape, dtype: (shape, dtype),
                           cdiv=lambda a, b: _Dim(-(-a.value // b)))
    return trt, trtp


class _Desc:
    def __init__(self, shape, dtype="half"):
        self.shape_expr, self.dtype = shape, dtype


def test_generated_plugin_signatures_follow_the_schema():
    trt, trtp = _fakes()
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

    trt, trtp = _fakes()
    describe = glue._descriptor(glue.spec_for(OP), trt, trtp)
    score, kept = _Desc(("B", "N")), _Desc(("B", "M"), "int64")
    assert describe(score, kept, tau=0.5) == ((("B", "M"), "half"), (("B",), "int64"))
    with pytest.raises(ValueError, match="tau"):
        describe(score, kept, tau=0.0)
    with pytest.raises(ValueError, match="span"):
        describe(score, kept, tau=0.5, protect=4, span_end=3)
    for span_end in (0, 30):
        sym = kernels.scalar_args((_Dim(2), _Dim(40)), (_Dim(2), _Dim(17)), tau=0.5, protect=3, span_end=span_end,
                                  sym=trtp)
        assert [v.value if isinstance(v, _Dim) else v for v in sym] == \
            kernels.scalar_args((2, 40), (2, 17), tau=0.5, protect=3, span_end=span_end) == [40, 17, 3, span_end or 40]
    assert kernels.grid((_Dim(3), _Dim(40)))[0].value == 3


# ---------------------------------------------------------------------- with TensorRT


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("tau, protect, span_end", [(0.5, 1, 0), (0.9, 1, 0), (1.0, 2, 150), (1e-4, 0, 0)])
def test_tensorrt_plugin(aot, tau, protect, span_end):
    trt = pytest.importorskip("tensorrt")
    import tensorrt.plugin as trtp
    import torch

    if aot and not (hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")):
        pytest.skip("this TensorRT has no aot_impl")
    OP.register_tensorrt()
    rng = np.random.default_rng(protect)
    score = (rng.random((3, 197)) ** 3).astype(np.float32)
    score[1, 50:] = 0.0
    feeds = {"score": score, "kept_index": select(score, 120, protect, span_end or 197)}
    attrs = dict(tau=f32(tau), protect=protect, span_end=span_end)
    expected = OP.run_reference(*feeds.values(), **attrs)
    node = oh.make_node(OP.name, list(feeds), [t.name for t in OP.outputs], domain=DOMAIN, plugin_namespace=DOMAIN,
                        plugin_version="1", **attrs, **({"aot": 1} if aot else {}))
    graph = oh.make_graph([node], "one", [oh.make_tensor_value_info(k, _ONNX_TYPES[v.dtype], v.shape)
                                          for k, v in feeds.items()],
                          [oh.make_tensor_value_info(t.name, _ONNX_TYPES[e.dtype], e.shape)
                           for t, e in zip(OP.outputs, expected)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    engine = trt.Runtime(logger).deserialize_cuda_engine(
        builder.build_serialized_network(network, builder.create_builder_config()))
    context = engine.create_execution_context()
    tensors = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    tensors.update({t.name: torch.empty(e.shape, dtype=torch.from_numpy(e).dtype, device="cuda")
                    for t, e in zip(OP.outputs, expected)})
    for name, tensor in tensors.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    np.testing.assert_array_equal(tensors["count"].cpu().numpy(), expected[1])
    np.testing.assert_array_equal(tensors["valid"].cpu().numpy(), expected[0])
