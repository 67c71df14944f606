"""The one way trimrt builds graphs: a small builder on onnx-ir's `tape.Tape`, shared by
the decompositions (function bodies) and the passes (`passes.base.GraphBuilder`).

    y = b.Slice(x, start, end, axes)              # any standard op, attributes as keywords
    values, indices = b.TopK(s, k, axis=1, _outputs=2)
    (score,) = b.emit(ATTENTION_ROW_SCORE, [q, k_t, mask], row=-1)  # a trimrt op, from its OpDef
    c = b.const(1.0, np.float32)                  # a constant tensor
    keep = b.attr("keep")                         # in a function: scalar Constant reading its attribute

Nodes are named `<prefix>_<op>_<n>`, with a counter shared with the builders of subgraphs
(a Loop body never shadows an outer value); `tag` stamps each node with the pass that made
it, and with a `graph` constants become its initializers (else Constant nodes). The nodes
are collected, not placed: the caller puts `builder.nodes` where they belong.
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

#: the domain of trimrt's custom ops, and its version (the ONNX node encoding and TensorRT plugin ids use them)
DOMAIN = "trimrt"
OP_VERSION = 1
#: opset of the standard ops used inside the decompositions
FUNCTION_OPSET = 18

#: metadata key on every node a pass inserts, naming the pass that made it (visible in Netron)
PASS_TAG = "trimrt.pass"

_ATTR_TYPES = {int: ir.AttributeType.INT, float: ir.AttributeType.FLOAT}
_CONSTANT_FIELDS = {int: "value_int", float: "value_float"}


class Builder(tape.Tape):
    def __init__(self, attributes: Mapping[str, type] | None = None, counter=None, *, prefix: str = "",
                 tag: str | None = None, graph: ir.Graph | None = None) -> None:
        super().__init__(None)
        self._attributes = dict(attributes or {})  # function attribute name -> int or float
        self._counter = counter if counter is not None else itertools.count(1)
        self.prefix, self.tag, self.graph = prefix, tag, graph

    def _fresh(self, what: str) -> str:
        n = next(self._counter)
        return f"{self.prefix}_{what}_{n}" if self.prefix else f"{what}_{n}"

    def stamp(self, node: ir.Node) -> None:
        """Tag `node` with this builder's pass and name its unnamed outputs after it (also
        for nodes another tool made, e.g. an onnxscript rewrite rule)."""
        if self.tag is not None:
            node.metadata_props[PASS_TAG] = self.tag
        for i, out in enumerate(node.outputs):
            if not out.name:
                out.name = f"{node.name}_out{i}" if len(node.outputs) > 1 else node.name

    def __getattr__(self, op_type: str) -> Callable:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def node(*inputs, _outputs: int = 1, **attrs):
            values = self.op_multi_out(op_type, list(inputs), attrs, num_outputs=_outputs)
            return values[0] if _outputs == 1 else tuple(values)

        return node

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None, *,
           domain: str = "", name: str | None = None, **kwargs) -> ir.Value:
        """One node with one output; returns the output."""
        value = super().op(op_type, inputs, attributes, domain=domain, name=name or self._fresh(op_type), **kwargs)
        self.stamp(value.producer())
        return value

    def op_multi_out(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None, *,
                     num_outputs: int | None = None, domain: str = "", name: str | None = None,
                     **kwargs) -> Sequence[ir.Value]:
        """One node with several outputs; returns them."""
        values = super().op_multi_out(op_type, inputs, attributes, num_outputs=num_outputs, domain=domain,
                                      name=name or self._fresh(op_type), **kwargs)
        self.stamp(values[0].producer())
        return values

    def emit(self, op, inputs: Sequence[ir.Value], *, name: str | None = None, **attributes) -> Sequence[ir.Value]:
        """A node of the trimrt op `op` (an OpDef): attributes are checked against its
        schema (defaults filled, unknown ones refused); returns all its outputs."""
        values = op.attribute_values(attributes)
        return self.op_multi_out(op.name, inputs, values, num_outputs=len(op.outputs), domain=DOMAIN, name=name)

    def const(self, value, dtype=np.int64, *, name: str | None = None) -> ir.Value:
        """A constant tensor (`dtype` None: the array's own): an initializer of `graph`
        (named `name`, else a fresh name) when the builder has one, else a Constant node."""
        array = np.asarray(value, dtype=dtype)
        if self.graph is None:
            return self.Constant(value=ir.tensor(array))
        name = name or self._fresh("const")
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def discard(self) -> None:
        """Forget the collected nodes (built, then found not needed)."""
        self._nodes = []

    # ----------------------------------------------------- inside a function body

    def ref(self, name: str, field: str | None = None) -> ir.Attr:
        """A node attribute `field` (default: `name`) whose value is the function attribute `name`."""
        return ir.RefAttr(field or name, name, _ATTR_TYPES[self._attributes[name]])

    def attr(self, name: str) -> ir.Value:
        """The function attribute `name` as a scalar tensor (int64 or float32)."""
        field = _CONSTANT_FIELDS[self._attributes[name]]
        return self.Constant(**{field: self.ref(name, field)})

    def subgraph(self, name: str, inputs: Sequence[tuple[str, ir.DataType | None, tuple | None]],
                 body: Callable, outputs: Sequence[tuple[str, ir.DataType | None, tuple | None]]) -> ir.Graph:
        """A graph attribute (a Loop body): `body(builder, *inputs)` returns its outputs;
        each input / output is (name, dtype or None, shape or None)."""
        sub = Builder(self._attributes, self._counter, prefix=self.prefix, tag=self.tag)
        ins = [_typed(ir.Value(), *spec) for spec in inputs]
        outs = list(body(sub, *ins))
        for value, spec in zip(outs, outputs):
            _typed(value, *spec)
        return ir.Graph(ins, outs, nodes=sub.nodes, name=name)


def _typed(value: ir.Value, name: str, dtype: ir.DataType | None, shape: tuple | None) -> ir.Value:
    """`value` named `name`, with the type and shape given (dtype None: left as they are)."""
    value.name = name
    if dtype is not None:
        value.type, value.shape = ir.TensorType(dtype), ir.Shape(shape) if shape is not None else None
    return value


def build_function(domain: str, name: str, opset: int, inputs: Sequence[str], outputs: Sequence[str],
                   attributes: Sequence[tuple[str, type, object]], body: Callable, doc: str = "") -> ir.Function:
    """The function `domain`::`name` whose body `body(builder, *inputs)` returns the outputs;
    `attributes`: (name, int or float, default or None for a required one)."""
    b = Builder({a_name: kind for a_name, kind, _ in attributes})
    ins = [ir.Value(name=n) for n in inputs]
    outs = body(b, *ins)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    for value, out_name in zip(outs, outputs, strict=True):
        value.name = out_name
    graph = ir.Graph(ins, outs, nodes=b.nodes, opset_imports={"": opset}, name=name)
    attrs = [ir.Attr(a_name, _ATTR_TYPES[kind], default) for a_name, kind, default in attributes]
    fn = ir.Function(domain, name, graph=graph, attributes=attrs)
    fn.doc_string = doc
    return fn
