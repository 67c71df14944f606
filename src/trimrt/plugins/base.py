"""The op contract: what every custom op module defines, in one place.

A custom op module creates one `OpDef` holding

1. its schema (inputs, outputs, attributes; domain `trimrt`),
2. a NumPy reference implementation (the ground truth for tests),
3. a decomposition into standard ONNX ops, built as a model-local `FunctionProto`
   that ONNX Runtime inlines, so every build runs anywhere without a custom-op library,
4. the name of a function running its Triton kernel (imported lazily: GPU path),
5. its TensorRT plugin hooks: `trt_output_shapes` and `trt_aot` in the same kernel
   module, from which `tensorrt_glue` generates the plugin (imported lazily).

Every module of `trimrt.plugins` that defines `OP = OpDef(...)` is registered in
`trimrt.plugins.REGISTRY` (found by listing the package).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

DOMAIN = "trimrt"
OP_VERSION = 1
#: opset of the standard ops used inside the decompositions
FUNCTION_OPSET = 18


@dataclass(frozen=True)
class TensorSpec:
    name: str
    doc: str
    dtype: str = "float"  # "float" (the model's float type) or "int64"


@dataclass(frozen=True)
class AttrSpec:
    name: str
    kind: type  # int or float
    doc: str
    default: Any = None  # None: required


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...]
    reference: Callable[..., tuple[np.ndarray, ...]]
    build_function: Callable[[], onnx.FunctionProto]
    triton: str = ""  # "module:function" running the Triton kernel on torch tensors

    def attribute_values(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and reject unknown or missing attributes."""
        known = {a.name: a for a in self.attributes}
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        values = {}
        for name, spec in known.items():
            if name in given:
                values[name] = spec.kind(given[name])
            elif spec.default is not None:
                values[name] = spec.default
            else:
                raise ValueError(f"{self.name}: attribute {name!r} is required")
        return values

    def function(self) -> onnx.FunctionProto:
        """The decomposition; attributes with a default in the schema are declared with it."""
        fn = self.build_function()
        assert fn.name == self.name and fn.domain == DOMAIN
        return fn

    def run_reference(self, *inputs: np.ndarray, **attrs: Any) -> tuple[np.ndarray, ...]:
        return self.reference(*inputs, **self.attribute_values(attrs))

    def run_triton(self, *inputs, **attrs):
        """Run the Triton kernel (torch tensors in and out); needs torch and triton."""
        return _resolve(self.triton)(*inputs, **self.attribute_values(attrs))

    def register_tensorrt(self) -> None:
        """Register the TensorRT plugin; needs tensorrt >= 10.7 with `tensorrt.plugin`."""
        from .tensorrt_glue import register

        register(self)


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def make_function(name: str, inputs: list[str], outputs: list[str], attributes: list[str],
                  nodes: list[onnx.NodeProto], doc: str, defaults: dict[str, Any] | None = None) -> onnx.FunctionProto:
    """A model-local function in the trimrt domain, body in standard ops (FUNCTION_OPSET).

    Attributes in `defaults` are declared with their default value (used when a node
    omits them); the others are required."""
    defaults = defaults or {}
    return onnx.helper.make_function(
        DOMAIN, name, inputs, outputs, nodes,
        opset_imports=[onnx.helper.make_opsetid("", FUNCTION_OPSET)],
        attributes=[a for a in attributes if a not in defaults],
        attribute_protos=[onnx.helper.make_attribute(k, v) for k, v in defaults.items()],
        doc_string=doc,
    )


def const_from_attr(output: str, attr: str, kind: str = "value_int") -> onnx.NodeProto:
    """Constant node whose value is the function attribute `attr` (a reference)."""
    node = onnx.helper.make_node("Constant", [], [output])
    ref = onnx.AttributeProto()
    ref.name = kind
    ref.ref_attr_name = attr
    ref.type = {"value_int": onnx.AttributeProto.INT, "value_float": onnx.AttributeProto.FLOAT}[kind]
    node.attribute.append(ref)
    return node


def const(output: str, value) -> onnx.NodeProto:
    arr = np.asarray(value)
    return onnx.helper.make_node("Constant", [], [output], value=onnx.numpy_helper.from_array(arr, output))
