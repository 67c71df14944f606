"""Helpers shared by the custom-op tests: a one-op ONNX Runtime runner, a Triton kernel
runner, a fake `tensorrt` / `tensorrt.plugin` with evaluated shape expressions, the
sm_80 PTX compile check and a one-node TensorRT runner (for the `gpu` tests).

Not a test module: the test files import it as tests.plugins.op_testing.
"""

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
import pytest

from trimrt.plugins import DOMAIN, REGISTRY
from trimrt.plugins.base import FUNCTION_OPSET

ONNX_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
              np.dtype(np.int64): onnx.TensorProto.INT64}


def _op(op):
    """An OpDef, given itself or its registry name."""
    return REGISTRY[op] if isinstance(op, str) else op


# ------------------------------------------------------------------ ONNX decomposition


def run_decomposition(op, inputs: list[np.ndarray], engine: str = "onnxruntime", **attrs) -> list[np.ndarray]:
    """One `op` node (an OpDef or its name) with its ONNX function, run on ONNX Runtime's CPU
    provider, or on OpenVINO's CPU plugin (`engine="openvino"`: the function inlined, every
    input dim symbolic as in a build with dynamic shapes). Float outputs get the dtype of the
    first input (float32 or float16)."""
    op = _op(op)
    names = [t.name for t in op.inputs]
    model = decomposition_model(op, inputs, symbolic=engine != "onnxruntime", **attrs)
    if engine == "openvino":
        from trimrt.runtime.backends import OpenVINOBackend

        backend = OpenVINOBackend(model.SerializeToString(), threads=1)
        backend.activate()
        out = backend.infer(dict(zip(names, inputs)))
        return [out[t.name] for t in op.outputs]
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))


def decomposition_model(op, inputs: list[np.ndarray], symbolic: bool = False, **attrs) -> onnx.ModelProto:
    """A model of one `op` node with its ONNX function; inputs typed and shaped as `inputs`
    (`symbolic`: every dim a name)."""
    op = _op(op)
    names = [t.name for t in op.inputs]
    floats = ONNX_TYPES[inputs[0].dtype] if inputs[0].dtype.kind == "f" else onnx.TensorProto.FLOAT
    node = oh.make_node(op.name, names, [t.name for t in op.outputs], domain=DOMAIN, **attrs)
    dims = (lambda n, a: [f"{n}_{axis}" for axis in range(a.ndim)]) if symbolic else (lambda n, a: list(a.shape))
    graph = oh.make_graph(
        [node], "one_op",
        [oh.make_tensor_value_info(n, ONNX_TYPES[a.dtype], dims(n, a)) for n, a in zip(names, inputs)],
        [oh.make_tensor_value_info(t.name, onnx.TensorProto.INT64 if t.dtype == "int64" else floats, None)
         for t in op.outputs],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", FUNCTION_OPSET), oh.make_opsetid(DOMAIN, 1)],
                         functions=[op.function()])


# ------------------------------------------------------------------------ Triton kernel


def to_torch(array: np.ndarray, device: str):
    """A NumPy array as a (contiguous) torch tensor on `device`."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def run_triton(op, inputs: list[np.ndarray], device: str, **attrs) -> tuple[np.ndarray, ...]:
    """op.run_triton on NumPy inputs moved to `device`; the outputs back as NumPy arrays.
    Skips the test when torch or triton is missing."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    got = _op(op).run_triton(*(to_torch(a, device) for a in inputs), **attrs)
    return tuple(t.cpu().numpy() for t in got)


_PTX_PREAMBLE = """\
import sys
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends import backends
except ImportError as exc:
    print(exc); sys.exit(77)
if "nvidia" not in backends:
    print("no nvidia backend"); sys.exit(77)
"""


def check_compiles_to_ptx(script: str, timeout: float = 300) -> None:
    """Run `script` (after an import of GPUTarget; it prints "ok" at the end) in a fresh
    interpreter without TRITON_INTERPRET, so kernels compile for a real GPU target.
    Skips the test when triton cannot compile for CUDA here."""
    code = _PTX_PREAMBLE + textwrap.dedent(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 77:
        pytest.skip(f"triton cannot compile for CUDA here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------ fake TensorRT


class Dim:
    """Stands for a tensorrt.plugin.ShapeExpr, evaluated: not an int, the same operators
    (+, -, *, //, ==, <; no reflected ones, so an int on the left fails like in TensorRT)."""

    def __init__(self, value: int):
        self.value = int(value)

    def _op(self, other, fn):
        if not isinstance(other, (int, Dim)):
            return NotImplemented
        return Dim(fn(self.value, other.value if isinstance(other, Dim) else other))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    def __eq__(self, other):
        return self._op(other, lambda a, b: int(a == b))

    def __lt__(self, other):
        return self._op(other, lambda a, b: int(a < b))

    __hash__ = None

    def __repr__(self):
        return f"Dim({self.value})"


def value(v):
    """The int a Dim stands for; anything else unchanged."""
    return v.value if isinstance(v, Dim) else v


def _top_level(fn):
    """tensorrt.plugin.cdiv / max / min: at least one operand is a ShapeExpr."""
    def apply(first, second):
        if isinstance(first, int) and isinstance(second, int):
            raise ValueError("Both arguments cannot be 'int's")
        return Dim(fn(value(first), value(second)))
    return apply


def fake_tensorrt():
    """Fresh (trt, trtp) namespaces: what the glue uses of tensorrt and tensorrt.plugin
    (annotation types, from_shape_expr, cdiv / max / min on Dims)."""
    trt = SimpleNamespace(int64="int64")
    trtp = SimpleNamespace(
        TensorDesc=type("TensorDesc", (), {}),
        KernelLaunchParams=type("KernelLaunchParams", (), {}),
        SymExprs=type("SymExprs", (), {}),
        from_shape_expr=lambda shape, dtype: (shape, dtype),
        cdiv=_top_level(lambda a, b: -(-a // b)),
        max=_top_level(max),
        min=_top_level(min),
    )
    return trt, trtp


class FakeDesc:
    """A tensorrt.plugin.TensorDesc: shape_expr and dtype."""

    def __init__(self, shape, dtype="half"):
        self.shape_expr, self.dtype = shape, dtype


def check_plugin_signatures(op) -> None:
    """The schemas tensorrt.plugin validates: inputs, attributes, then outputs/stream/tactic."""
    from trimrt.plugins import tensorrt_glue as glue

    trt, trtp = fake_tensorrt()
    spec = glue.spec_for(op)
    names = [t.name for t in op.inputs] + [a.name for a in op.attributes]

    describe = inspect.signature(glue._descriptor(spec, trt, trtp))
    assert list(describe.parameters) == names
    assert [p.annotation for p in describe.parameters.values()] == \
        [trtp.TensorDesc] * len(op.inputs) + [a.kind for a in op.attributes]
    assert typing.get_origin(describe.return_annotation) is tuple
    assert typing.get_args(describe.return_annotation) == (trtp.TensorDesc,) * len(op.outputs)

    assert list(inspect.signature(glue._jit_impl(spec, trtp)).parameters) == names + ["outputs", "stream"]
    aot = inspect.signature(glue._aot_impl(spec, trtp))
    assert list(aot.parameters) == names + ["outputs", "tactic"]
    assert typing.get_args(aot.return_annotation)[2:] == (trtp.KernelLaunchParams, trtp.SymExprs)


# ------------------------------------------------------------------------ real TensorRT


def one_node_model(op, inputs: dict[str, np.ndarray], output_shapes: list[tuple], attrs: dict, aot: bool) -> bytes:
    """A serialized ONNX model of one plugin node of `op` (JIT or AOT implementation)."""
    elem = onnx.helper.np_dtype_to_tensor_dtype
    node = oh.make_node(
        op.name, [t.name for t in op.inputs], [t.name for t in op.outputs], domain=DOMAIN,
        plugin_namespace=DOMAIN, plugin_version="1", **attrs, **({"aot": 1} if aot else {}),
    )
    graph = oh.make_graph(
        [node], f"one_{op.name}",
        [oh.make_tensor_value_info(name, elem(a.dtype), a.shape) for name, a in inputs.items()],
        [oh.make_tensor_value_info(t.name, onnx.TensorProto.INT64 if t.dtype == "int64" else onnx.TensorProto.FLOAT, s)
         for t, s in zip(op.outputs, output_shapes)],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model.SerializeToString()


def run_tensorrt(model: bytes, feeds: dict[str, np.ndarray], strongly_typed: bool = True) -> dict[str, np.ndarray]:
    """Build `model` with TensorRT (a strongly typed network if asked and supported), run
    it once on CUDA and return its outputs by name."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model):
        raise AssertionError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None, "TensorRT build failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()

    keep_alive, outputs = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            keep_alive.append(tensor)
        else:
            dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            tensor = outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: t.cpu().numpy() for name, t in outputs.items()}


def aot_supported() -> bool:
    """Whether the installed tensorrt.plugin has the AOT implementation API."""
    import tensorrt.plugin as trtp

    return hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")
