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


def span_nodes(tokens: str) -> list[onnx.NodeProto]:
    """The prunable span [protect, end) of an op with attributes protect / span_end, for
    `tokens` [B, N, ...]: defines n_s, end_s, span_s (scalars) and protect, end ([1]).
    Needs the Constants protect_s, span_end_s, zero_s and ax0."""
    make = onnx.helper.make_node
    return [
        make("Shape", [tokens], ["n1"], start=1, end=2),
        make("Squeeze", ["n1"], ["n_s"]),
        make("Greater", ["span_end_s", "zero_s"], ["has_end"]),
        make("Where", ["has_end", "span_end_s", "n_s"], ["end_s"]),  # span_end == 0 means N
        make("Unsqueeze", ["end_s", "ax0"], ["end"]),
        make("Unsqueeze", ["protect_s", "ax0"], ["protect"]),
        make("Sub", ["end_s", "protect_s"], ["span_s"]),
    ]


def kept_count_nodes() -> list[onnx.NodeProto]:
    """k of an op with attributes keep / keep_ratio, after `span_nodes`: keep when > 0,
    else max(1, min(span, ceil(keep_ratio · span - 1e-9))) (in float64); defines k_s
    and k ([1]). Needs the Constants keep_s, ratio_f, zero_s, one_s and ax0."""
    make = onnx.helper.make_node
    return [
        const("k_eps", np.array(1e-9, dtype=np.float64)),
        make("Cast", ["span_s"], ["span_d"], to=onnx.TensorProto.DOUBLE),
        make("Cast", ["ratio_f"], ["ratio_d"], to=onnx.TensorProto.DOUBLE),
        make("Mul", ["span_d", "ratio_d"], ["k_real"]),
        make("Sub", ["k_real", "k_eps"], ["k_real_eps"]),
        make("Ceil", ["k_real_eps"], ["k_ceil"]),
        make("Cast", ["k_ceil"], ["k_ratio_raw"], to=onnx.TensorProto.INT64),
        make("Max", ["k_ratio_raw", "one_s"], ["k_ratio_low"]),
        make("Min", ["k_ratio_low", "span_s"], ["k_ratio"]),
        make("Greater", ["keep_s", "zero_s"], ["static_k"]),
        make("Where", ["static_k", "keep_s", "k_ratio"], ["k_s"]),
        make("Unsqueeze", ["k_s", "ax0"], ["k"]),
    ]


def prefix_suffix_nodes(tokens: str) -> list[onnx.NodeProto]:
    """The always-kept positions outside the span, broadcast over the batch of `tokens`
    [B, N, ...]: prefix = 0..protect-1, suffix = end..N-1 (int64 [B, ·]). After `span_nodes`;
    needs the Constants zero_s, one_s and ax0."""
    make = onnx.helper.make_node
    return [
        make("Shape", [tokens], ["batch"], start=0, end=1),
        make("Range", ["zero_s", "protect_s", "one_s"], ["prefix1"]),
        make("Concat", ["batch", "protect"], ["prefix_shape"], axis=0),
        make("Expand", ["prefix1", "prefix_shape"], ["prefix"]),
        make("Range", ["end_s", "n_s", "one_s"], ["suffix1"]),
        make("Sub", ["n_s", "end_s"], ["n_suffix_s"]),
        make("Unsqueeze", ["n_suffix_s", "ax0"], ["n_suffix"]),
        make("Concat", ["batch", "n_suffix"], ["suffix_shape"], axis=0),
        make("Expand", ["suffix1", "suffix_shape"], ["suffix"]),
    ]


def selection_attributes(verb: str) -> tuple[AttrSpec, ...]:
    """keep / protect / span_end / keep_ratio: how the selection ops (TokenPrune and the
    ops built on its rule) define the span and its k; `verb`: "kept", "picked", ..."""
    return (
        AttrSpec("keep", int, f"span tokens {verb} (build-time constant); 0: use keep_ratio at run time"),
        AttrSpec("protect", int, "start of the span: tokens before it are always kept", 0),
        AttrSpec("span_end", int, "end of the span (exclusive); 0 means N", 0),
        AttrSpec("keep_ratio", float, f"fraction of the span {verb} when keep == 0", 1.0),
    )


def drop_mask_nodes() -> list[onnx.NodeProto]:
    """drop_mask [B, span] (1 where a span token was dropped, 0 where kept) in the type of
    the span scores s_p, from TopK's `order` (ones scattered without reduction at the kept
    positions); also defines one_t (1 in that type). Needs the Constant one_f."""
    make = onnx.helper.make_node
    return [
        make("Shape", ["order"], ["order_shape"]),
        make("CastLike", ["one_f", "s_p"], ["one_t"]),
        make("Expand", ["one_t", "order_shape"], ["ones"]),
        make("Shape", ["s_p"], ["s_p_shape"]),
        make("ConstantOfShape", ["s_p_shape"], ["zeros_f"]),
        make("CastLike", ["zeros_f", "s_p"], ["zeros"]),
        make("ScatterElements", ["zeros", "order", "ones"], ["kept_mask"], axis=1),
        make("Sub", ["one_t", "kept_mask"], ["drop_mask"]),
    ]
