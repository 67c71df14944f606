"""The op contract (DESIGN.md, plugins/base.py), checked for every op of the registry.

A new op module is picked up here with no edit: its `OP.examples(rng)` cases run through
the NumPy reference, the ONNX decomposition on ONNX Runtime (and on OpenVINO where it is
installed), the Triton kernel under the
interpreter and the generated TensorRT descriptor (a fake tensorrt, no GPU). The per-op
test files hold the op-specific value tests.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import onnx
import pytest

from tests.plugins.op_testing import Dim, FakeDesc, check_plugin_signatures, fake_tensorrt, run_decomposition, run_triton, value
from trimrt.errors import BackendUnavailableError
from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins import tensorrt_glue as glue
from trimrt.plugins.base import FUNCTION_OPSET

OPS = sorted(REGISTRY)


def _cases(op):
    cases = op.examples(np.random.default_rng(sum(map(ord, op.name))))
    assert cases, f"{op.name}: examples() gives no case"
    return cases


def _assert_outputs_match(op, got, want, rtol=1e-4, atol=1e-5):
    assert len(got) == len(want) == len(op.outputs)
    for spec, g, w in zip(op.outputs, got, want):
        assert g.shape == w.shape, spec.name
        if spec.dtype == "int64":
            np.testing.assert_array_equal(g, w, err_msg=spec.name)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=spec.name)


@pytest.mark.parametrize("name", OPS)
def test_schema(name):
    op = REGISTRY[name]
    assert op.name == name and not name.startswith("TRT_")
    assert onnx.defs.has(name) is False, f"{name} collides with a standard ONNX op"
    assert len({t.name for t in op.inputs + op.outputs}) == len(op.inputs) + len(op.outputs)
    assert all(a.kind in (int, float) for a in op.attributes)
    assert op.doc and op.triton and op.examples is not None


@pytest.mark.parametrize("name", OPS)
def test_function_is_derived_from_the_schema(name):
    op = REGISTRY[name]
    fn = op.function()
    assert fn.domain == DOMAIN and fn.name == name
    assert list(fn.input) == [t.name for t in op.inputs] and list(fn.output) == [t.name for t in op.outputs]
    assert [i.version for i in fn.opset_import if i.domain == ""] == [FUNCTION_OPSET]
    declared = list(fn.attribute) + [a.name for a in fn.attribute_proto]
    assert sorted(declared) == sorted(a.name for a in op.attributes)
    defaults = {a.name: onnx.helper.get_attribute_value(a) for a in fn.attribute_proto}
    assert defaults == {a.name: a.default for a in op.attributes if a.default is not None}
    assert set(fn.attribute) == {a.name for a in op.attributes if a.default is None}


@pytest.mark.parametrize("name", OPS)
def test_decomposition_matches_reference(name):
    op = REGISTRY[name]
    for inputs, attrs in _cases(op):
        got = run_decomposition(op, inputs, **attrs)
        _assert_outputs_match(op, got, op.run_reference(*inputs, **attrs))


@pytest.mark.parametrize("name", OPS)
def test_decomposition_on_openvino_matches_reference(name):
    """The OpenVINO column: the same decomposition, inlined, on OpenVINO's CPU plugin with
    dynamic input dims (as builds have them); skipped where OpenVINO is not installed."""
    pytest.importorskip("openvino")
    op = REGISTRY[name]
    for inputs, attrs in _cases(op):
        got = run_decomposition(op, inputs, engine="openvino", **attrs)
        _assert_outputs_match(op, got, op.run_reference(*inputs, **attrs))


@pytest.mark.parametrize("name", OPS)
def test_kernel_matches_reference(name, device):
    op = REGISTRY[name]
    for inputs, attrs in _cases(op):
        got = run_triton(op, inputs, device, **attrs)
        _assert_outputs_match(op, got, op.run_reference(*inputs, **attrs))


@pytest.mark.parametrize("name", OPS)
def test_calls_are_checked_against_the_schema(name):
    op = REGISTRY[name]
    inputs, attrs = _cases(op)[0]
    calls = [(inputs[:-1], attrs, "inputs"), ((*inputs, inputs[0]), attrs, "inputs"),
             (inputs, {**attrs, "no_such_attribute": 1}, "unknown attribute")]
    if op.attributes:  # an op may have none (TokenRejoin)
        first = op.attributes[0]
        calls.append((inputs, {**attrs, first.name: "1" if first.kind is int else None},
                      f"attribute '{first.name}' must be"))
    for run in (op.run_reference, op.run_triton):  # refused before the kernel module is imported
        for args, kwargs, match in calls:
            with pytest.raises(ValueError, match=match) as info:
                run(*args, **kwargs)
            assert "\n" not in str(info.value) and str(info.value).startswith(f"{name}: ")
    required = [a.name for a in op.attributes if a.default is None]
    if required:
        with pytest.raises(ValueError, match=f"attribute '{required[0]}' is required"):
            op.run_reference(*inputs, **{k: v for k, v in attrs.items() if k != required[0]})


@pytest.mark.parametrize("name", OPS)
def test_tensorrt_glue_without_tensorrt(name, monkeypatch):
    """The generated plugin callbacks follow the schema, and the descriptor gives the
    reference's output shapes from shape expressions; registering without TensorRT is
    a one-line BackendUnavailableError."""
    op = REGISTRY[name]
    pytest.importorskip("triton")  # the kernel module holds the TensorRT hooks
    kernels = importlib.import_module(op.triton.partition(":")[0])
    assert callable(getattr(kernels, op.triton.partition(":")[2]))
    assert callable(kernels.trt_output_shapes) and callable(kernels.trt_aot)
    check_plugin_signatures(op)
    trt, trtp = fake_tensorrt()
    describe = glue._descriptor(glue.spec_for(op), trt, trtp)
    for inputs, attrs in _cases(op):
        descs = [FakeDesc(tuple(Dim(d) for d in a.shape), "int64" if spec.dtype == "int64" else "half")
                 for spec, a in zip(op.inputs, inputs)]
        described = describe(*descs, **attrs)
        want = op.run_reference(*inputs, **attrs)
        assert [tuple(value(d) for d in shape) for shape, _ in described] == [w.shape for w in want]
        assert [dtype for _, dtype in described] == ["int64" if t.dtype == "int64" else "half" for t in op.outputs]
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    with pytest.raises(BackendUnavailableError, match="TensorRT") as info:
        glue.register(op)
    assert "\n" not in str(info.value)
