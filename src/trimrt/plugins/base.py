"""The op contract: every custom op module defines one `OpDef`, the only place its schema
(inputs, outputs, attributes and defaults) is written, with its NumPy reference, its
decomposition into standard ops (the model-local function ONNX Runtime inlines), its Triton
kernel and its contract-suite examples. See docs/adding_an_op.md.
"""

from __future__ import annotations

import importlib
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from .builder import DOMAIN, FUNCTION_OPSET, OP_VERSION, build_function  # noqa: F401 - re-exported


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
    decompose: Callable[..., Any]  # (builder, *input values) -> output values
    triton: str = ""  # "module:function" running the Triton kernel on torch tensors
    #: rng -> [(inputs, attributes)]: small cases for the contract suite
    examples: Callable[[np.random.Generator], list[tuple[list[np.ndarray], dict[str, Any]]]] | None = None

    def attribute_values(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults; reject unknown, missing or mistyped attributes (one-line ValueError)."""
        known = {a.name: a for a in self.attributes}
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        values = {}
        for name, spec in known.items():
            if name not in given:
                if spec.default is None:
                    raise ValueError(f"{self.name}: attribute {name!r} is required")
                values[name] = spec.default
                continue
            value = given[name]
            wanted = numbers.Integral if spec.kind is int else numbers.Real
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise ValueError(f"{self.name}: attribute {name!r} must be {spec.kind.__name__}, got {value!r}")
            values[name] = spec.kind(value)
        return values

    def check_call(self, inputs: tuple, attrs: dict[str, Any]) -> dict[str, Any]:
        """The attribute values of a call with `inputs`, after checking both against the schema."""
        if len(inputs) != len(self.inputs):
            names = ", ".join(t.name for t in self.inputs)
            raise ValueError(f"{self.name}: takes {len(self.inputs)} inputs ({names}), got {len(inputs)}")
        return self.attribute_values(attrs)

    def function(self) -> onnx.FunctionProto:
        """The decomposition as a model-local function; attributes with a default in the
        schema are declared with it, the others are required."""
        fn = build_function(DOMAIN, self.name, FUNCTION_OPSET, [t.name for t in self.inputs], [t.name for t in self.outputs],
                            [(a.name, a.kind, a.default) for a in self.attributes], self.decompose, self.doc)
        return ir.serde.serialize_function(fn)

    def run_reference(self, *inputs: np.ndarray, **attrs: Any) -> tuple[np.ndarray, ...]:
        return self.reference(*inputs, **self.check_call(inputs, attrs))

    def run_triton(self, *inputs, **attrs):
        """Run the Triton kernel (torch tensors in and out); needs torch and triton."""
        values = self.check_call(inputs, attrs)
        return _resolve(self.triton)(*inputs, **values)

    @classmethod
    def of_module(cls, module: str, **fields: Any) -> OpDef:
        """The OpDef of the op module named `module` (its `__name__`), by convention: the
        module's `NAME`, docstring, `reference`, `decompose` and `examples`, and the kernel
        `<package>.kernels.<module>:run`; `fields` give the schema and override any of these."""
        found = sys.modules[module]
        package, _, short = module.rpartition(".")
        conventional = dict(name=found.NAME, doc=found.__doc__, reference=found.reference, decompose=found.decompose,
                            examples=found.examples, triton=f"{package}.kernels.{short}:run")
        return cls(**{**conventional, **fields})


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
