"""TensorRT plugin glue: one-node ONNX networks through TensorRT == NumPy references.

The `gpu` tests need TensorRT >= 10.7 and a CUDA device (conftest.py skips them
otherwise). The others check, without TensorRT, the error when it is missing and the
callback signatures generated from the OpDef schemas.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tests.plugins.op_testing import (
    Dim,
    FakeDesc,
    aot_supported,
    fake_tensorrt,
    one_node_model,
    run_tensorrt,
    value,
)
from trimrt.errors import BackendUnavailableError
from trimrt.plugins import ATTENTION_ROW_SCORE, DOMAIN, REGISTRY, TOKEN_PRUNE
from trimrt.plugins import tensorrt_glue as glue

# ------------------------------------------------------------------- without TensorRT


@pytest.mark.parametrize(
    "register",
    [lambda: glue.register(ATTENTION_ROW_SCORE), glue.register_all,
     lambda: glue.register(TOKEN_PRUNE)],
)
def test_register_without_tensorrt_raises(register, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    with pytest.raises(BackendUnavailableError, match="TensorRT") as info:
        register()
    assert "\n" not in str(info.value)


def test_descriptors_give_output_shapes_and_dtypes():
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(TOKEN_PRUNE), trt, trtp)
    x, score = FakeDesc(("B", "N", "D")), FakeDesc(("B", "N"))
    assert describe(x, score, keep=5) == (  # protect, span_end, keep_ratio from their defaults
        (("B", 5, "D"), "half"), (("B", 5), "int64"), (("B", 1, "D"), "half"))
    assert describe(x, score, 5, 2)[1] == (("B", 7), "int64")  # a static count: no arithmetic on N

    describe = glue._descriptor(glue.spec_for(ATTENTION_ROW_SCORE), trt, trtp)
    q, k_t = FakeDesc(("B", "H", "Nq", "Dh"), "float"), FakeDesc(("B", "H", "Dh", "N"), "float")
    mask = FakeDesc(("B", 1, 1, "N"), "float")
    assert describe(q, k_t, mask, row=-1, scale=0.125) == ((("B", "N"), "float"),)


@pytest.mark.parametrize(
    "n, keep, protect, span_end, ratio",
    [(17, 5, 1, 0, 1.0), (40, 5, 3, 30, 1.0), (23, 0, 1, 0, 0.5), (23, 0, 2, 20, 0.3), (23, 0, 1, 0, 0.001),
     (71, 0, 1, 66, 0.1), (197, 0, 1, 0, 0.7), (577, 0, 0, 0, 1 / 3), (9, 0, 0, 0, 1.0), (30, 0, 4, 0, 1.7)],
)
def test_token_prune_symbolic_shapes_and_launch_args(n, keep, protect, span_end, ratio):
    """Output shapes and AOT scalars as shape expressions (N known only at run time) ==
    the reference's shapes and the kernel's launch arguments on ints."""
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import token_prune as kernels

    ratio = float(np.float32(ratio))  # what an ONNX float attribute holds
    attrs = dict(keep=keep, protect=protect, span_end=span_end, keep_ratio=ratio)
    trt, trtp = fake_tensorrt()
    b, d = 2, 3
    y, kept, fused = TOKEN_PRUNE.run_reference(np.zeros((b, n, d), np.float32), np.zeros((b, n), np.float32), **attrs)
    describe = glue._descriptor(glue.spec_for(TOKEN_PRUNE), trt, trtp)
    sym_x = (Dim(b), Dim(n), Dim(d))
    shapes = [tuple(value(v) for v in shape) for shape, _ in
              describe(FakeDesc(sym_x), FakeDesc(sym_x[:2]), **attrs)]
    assert shapes == [y.shape, kept.shape, fused.shape]
    args = kernels.scalar_args(sym_x, sym_x[:2], **attrs, sym=trtp)
    assert [value(v) for v in args] == kernels.scalar_args((b, n, d), (b, n), **attrs)
    grid = kernels.grid(sym_x, sym_x[:2], cdiv=trtp.cdiv, block_d=2)
    assert [value(v) for v in grid] == [b, 2]


def test_token_prune_describe_rejects_what_the_reference_rejects():
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(TOKEN_PRUNE), trt, trtp)
    x, score = FakeDesc((Dim(1), Dim(8), Dim(4))), FakeDesc((Dim(1), Dim(8)))
    with pytest.raises(ValueError, match="span"):
        describe(x, score, keep=1, protect=5, span_end=5)
    with pytest.raises(ValueError, match="keep=5 must be in"):
        describe(x, score, keep=5, protect=1, span_end=5)
    with pytest.raises(ValueError, match="keep_ratio"):  # no exact int64 form
        describe(x, score, keep=0, keep_ratio=1e-30)


@pytest.mark.parametrize("mask_shape", [(1, 1, 1, 1), ("B", 1, 1, "N"), (1, 1, "Nq", "N"), ("B", 1, "Nq", "N"),
                                        (1, "H", "Nq", 1), ("B", "H", "Nq", "N")])
@pytest.mark.parametrize("row", [0, -1, 2])
def test_attention_row_score_symbolic_launch_args(mask_shape, row):
    """The AOT scalars (mask strides, zero along broadcast dims, and row offset) as shape
    expressions == those of the kernel's own launch on ints."""
    pytest.importorskip("triton")
    from trimrt.plugins.kernels import attention_row_score as kernels

    _, trtp = fake_tensorrt()
    for sizes in [dict(B=2, H=3, Nq=5, Dh=4, N=7), dict(B=1, H=1, Nq=5, Dh=4, N=1)]:
        q, k_t = (sizes[k] for k in ("B", "H", "Nq", "Dh")), (sizes[k] for k in ("B", "H", "Dh", "N"))
        q, k_t = tuple(q), tuple(k_t)
        mask = tuple(sizes[v] if isinstance(v, str) else v for v in mask_shape)
        want = kernels.scalar_args(q, k_t, mask, row=row)
        sym = [tuple(Dim(v) for v in shape) for shape in (q, k_t, mask)]  # constants are ShapeExprs too
        assert [value(v) for v in kernels.scalar_args(*sym, row=row, sym=trtp)] == want
        if sizes["B"] > 1:
            assert want[5:] == [_stride(mask, 0), _stride(mask, 1), _stride(mask, 3),
                                (row % 5 if mask[2] > 1 else 0) * mask[3]]


def _stride(shape, axis):
    return 0 if shape[axis] == 1 else int(np.prod(shape[axis + 1:]))


def test_registration_is_idempotent(monkeypatch):
    """register -> impl -> aot_impl once per op, whatever the number of calls (fake tensorrt)."""
    trt, trtp = fake_tensorrt()
    calls = []
    namespace = SimpleNamespace()

    def decorator(kind):
        def for_id(plugin_id):
            def record(fn):
                calls.append((kind, plugin_id, fn.__name__))
                if kind == "register":
                    setattr(namespace, plugin_id.split("::")[1], fn)
                return fn
            return record
        return for_id

    trtp.register, trtp.impl, trtp.aot_impl = decorator("register"), decorator("impl"), decorator("aot_impl")
    trtp.op = SimpleNamespace(**{DOMAIN: namespace})
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(glue, "_REGISTERED", set())
    for _ in range(2):
        glue.register(ATTENTION_ROW_SCORE)
        glue.register(TOKEN_PRUNE)
    assert calls == [(kind, f"{DOMAIN}::{op.name}", f"{op.name}_{suffix}")
                     for op in (ATTENTION_ROW_SCORE, TOKEN_PRUNE)
                     for kind, suffix in [("register", "describe"), ("impl", "impl"), ("aot_impl", "aot_impl")]]
    monkeypatch.setattr(glue, "_REGISTERED", set())  # e.g. a module reload: TensorRT already has it
    glue.register_all()  # registers the other ops, each once
    assert len(calls) == 3 * len(REGISTRY)
    assert {pid for kind, pid, _ in calls if kind == "register"} == {f"{DOMAIN}::{name}" for name in REGISTRY}


# ---------------------------------------------------------------------- with TensorRT


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
@pytest.mark.parametrize("row", [0, -1])
def test_attention_row_score_plugin(aot, row, mask_kind, rng):
    pytest.importorskip("tensorrt")
    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(ATTENTION_ROW_SCORE)
    glue.register(ATTENTION_ROW_SCORE)  # idempotent
    q = rng.standard_normal((2, 3, 45, 24)).astype(np.float32)
    k_t = rng.standard_normal((2, 3, 24, 45)).astype(np.float32)
    f32_min = np.finfo(np.float32).min
    if mask_kind == "none":
        mask = np.zeros((1, 1, 1, 1), np.float32)
    elif mask_kind == "padding":
        mask = np.zeros((2, 1, 1, 45), np.float32)
        mask[0, ..., 40:] = f32_min
    else:
        mask = np.triu(np.full((45, 45), f32_min, np.float32), k=1)[None, None]
    attrs = {"row": row, "scale": 24**-0.5}
    (expected,) = ATTENTION_ROW_SCORE.run_reference(q, k_t, mask, **attrs)
    feeds = {"q": q, "k_t": k_t, "mask": mask}
    model = one_node_model(ATTENTION_ROW_SCORE, feeds, [expected.shape], attrs, aot)
    got = run_tensorrt(model, feeds)
    np.testing.assert_allclose(got["score"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True], ids=["jit", "aot"])
@pytest.mark.parametrize("keep, protect, span_end, keep_ratio",
                         [(1, 0, 0, 1.0), (20, 1, 0, 1.0), (68, 2, 0, 1.0), (5, 3, 60, 1.0),
                          (0, 1, 0, 0.5), (0, 2, 64, 0.3)])
def test_token_prune_plugin(aot, keep, protect, span_end, keep_ratio, rng):
    pytest.importorskip("tensorrt")
    if aot and not aot_supported():
        pytest.skip("this TensorRT has no aot_impl")
    glue.register(TOKEN_PRUNE)
    glue.register(TOKEN_PRUNE)  # idempotent
    x = rng.standard_normal((3, 70, 40)).astype(np.float32)
    score = (rng.integers(0, 8, size=(3, 70)) / 8).astype(np.float32)  # with ties
    attrs = {"keep": keep, "protect": protect, "span_end": span_end, "keep_ratio": keep_ratio}
    # the node stores keep_ratio as float32: the reference gets that value
    expected = TOKEN_PRUNE.run_reference(x, score, **{**attrs, "keep_ratio": float(np.float32(keep_ratio))})
    model = one_node_model(TOKEN_PRUNE, {"x": x, "score": score}, [e.shape for e in expected], attrs, aot)
    got = run_tensorrt(model, {"x": x, "score": score})
    np.testing.assert_array_equal(got["kept_index"], expected[1])
    np.testing.assert_array_equal(got["y"], expected[0])
    np.testing.assert_allclose(got["fused"], expected[2], rtol=1e-5, atol=1e-5)
