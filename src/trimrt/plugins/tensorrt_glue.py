"""TensorRT plugin glue, generated from the OpDef schemas (docs/adding_an_op.md, section 2).

`register(op)` registers the op as a TensorRT quickly deployable plugin (`tensorrt.plugin`,
TensorRT >= 10.7) under the id "trimrt::<Name>", version "1", the ONNX node encoding's
name, so the ONNX parser picks it up. The schema gives every callback's signature, the
output dtypes ("int64", or the first float input's type) and the attribute defaults; the
kernel module gives the output shapes and the AOT launch (`trt_output_shapes`, `trt_aot`),
computed by the same functions its `run` uses, so shapes, AOT scalars and the JIT launch
agree. The JIT `impl` runs the kernel module's `run` on the plugin's stream; `aot_impl`
(a node with the ONNX attribute `aot=1`) runs PTX with the attributes baked in, without
Python. Nothing here imports tensorrt, torch or triton at module level; registration is
idempotent and thread-safe.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import typing
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import BackendUnavailableError
from .base import DOMAIN, OP_VERSION, OpDef, _resolve

_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


@dataclass(frozen=True)
class _PluginSpec:
    op: OpDef
    #: (input shapes by name, attributes, tensorrt.plugin) -> one shape tuple per output;
    #: works on ShapeExprs (the module supplies cdiv/max/min) and on plain ints
    output_shapes: Callable[[dict[str, Any], dict[str, Any], Any], list[tuple]]
    #: (trtp, input descs by name, attributes, output descs by name) -> aot_impl result
    aot: Callable[..., tuple]


def spec_for(op: OpDef) -> _PluginSpec:
    """The op's TensorRT hooks: `trt_output_shapes` and `trt_aot` of its kernel module."""
    kernels = importlib.import_module(op.triton.partition(":")[0])
    return _PluginSpec(op, kernels.trt_output_shapes, kernels.trt_aot)


def register(op: OpDef) -> None:
    """Register "trimrt::<op>" with TensorRT (idempotent)."""
    trt, trtp = _tensorrt()  # the clear error first, before importing the kernels
    spec, pid = spec_for(op), f"{DOMAIN}::{op.name}"
    assert OP_VERSION == 1, "tensorrt.plugin registers every plugin as version 1"
    with _LOCK:
        # registered here, or under that id before (tensorrt.plugin keeps it, e.g. across a reload)
        namespace = getattr(getattr(trtp, "op", None), DOMAIN, None)
        if pid in _REGISTERED or hasattr(namespace, op.name):
            _REGISTERED.add(pid)
            return
        trtp.register(pid)(_descriptor(spec, trt, trtp))
        trtp.impl(pid)(_jit_impl(spec, trtp))
        if hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams"):
            trtp.aot_impl(pid)(_aot_impl(spec, trtp))
        _REGISTERED.add(pid)


def register_all() -> None:
    from . import REGISTRY

    for op in REGISTRY.values():
        register(op)


# --------------------------------------------------------------------------- plumbing


def _tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(
            f"the trimrt TensorRT plugins need TensorRT >= 10.7 with `tensorrt.plugin` ({exc}); "
            "install trimrt[trt] on a machine with an NVIDIA GPU"
        ) from None
    return trt, trtp


def _signature(op: OpDef, returns, tensor_type=inspect.Parameter.empty, attr_types: bool = False, extra=()):
    """A callback's signature for tensorrt.plugin: the op's inputs, its attributes, then `extra`."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(t.name, kind, annotation=tensor_type) for t in op.inputs]
    params += [inspect.Parameter(a.name, kind, annotation=a.kind if attr_types else inspect.Parameter.empty)
               for a in op.attributes]
    params += [inspect.Parameter(name, kind) for name in extra]
    return inspect.Signature(params, return_annotation=returns)


def _generated(fn, name: str, signature: inspect.Signature):
    """Give a generic (*args, **kwargs) callback the signature tensorrt.plugin inspects."""
    fn.__signature__ = signature
    fn.__name__ = fn.__qualname__ = name
    return fn


def _bind(signature: inspect.Signature, op: OpDef, args, kwargs):
    """Split a callback's arguments into inputs, attributes (defaults filled in) and the rest."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    inputs = {t.name: bound[t.name] for t in op.inputs}
    attrs = op.attribute_values({a.name: bound[a.name] for a in op.attributes if a.name in bound})
    return inputs, attrs, bound


def _descriptor(spec: _PluginSpec, trt, trtp):
    op = spec.op
    signature = _signature(op, typing.Tuple[tuple([trtp.TensorDesc] * len(op.outputs))], trtp.TensorDesc, attr_types=True)
    float_input = next(t.name for t in op.inputs if t.dtype == "float")

    def describe(*args, **kwargs):
        inputs, attrs, _ = _bind(signature, op, args, kwargs)
        shapes = spec.output_shapes({k: v.shape_expr for k, v in inputs.items()}, attrs, trtp)
        float_type = inputs[float_input].dtype
        return tuple(
            trtp.from_shape_expr(tuple(shape), dtype=trt.int64 if out.dtype == "int64" else float_type)
            for out, shape in zip(op.outputs, shapes)
        )

    return _generated(describe, f"{op.name}_describe", signature)


def _jit_impl(spec: _PluginSpec, trtp):
    op = spec.op
    signature = _signature(op, None, extra=("outputs", "stream"))

    def impl(*args, **kwargs):
        import torch

        inputs, attrs, bound = _bind(signature, op, args, kwargs)
        with torch.cuda.stream(torch.cuda.ExternalStream(int(bound["stream"]))):
            tensors = [torch.as_tensor(inputs[t.name], device="cuda") for t in op.inputs]
            outputs = tuple(torch.as_tensor(o, device="cuda") for o in bound["outputs"])
            _resolve(op.triton)(*tensors, **attrs, out=outputs)

    return _generated(impl, f"{op.name}_impl", signature)


def _aot_impl(spec: _PluginSpec, trtp):
    op = spec.op
    result = typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]
    # all attributes: TensorRT passes every attribute positionally to aot_impl
    signature = _signature(op, result, extra=("outputs", "tactic"))

    def aot_impl(*args, **kwargs):
        inputs, attrs, bound = _bind(signature, op, args, kwargs)
        return spec.aot(trtp, inputs, attrs, dict(zip((t.name for t in op.outputs), bound["outputs"])))

    return _generated(aot_impl, f"{op.name}_aot_impl", signature)
