"""The one way decompositions are written: a small builder on onnx-ir's `tape.Tape`.

    y = b.Slice(x, start, end, axes)              # any standard op, attributes as keywords
    values, indices = b.TopK(s, k, axis=1, _outputs=2)
    keep = b.attr("keep")                         # scalar Constant reading the function attribute
    eps = b.ref("epsilon")                        # a node attribute referencing it (ir.RefAttr)
    c = b.const(1.0, np.float32)                  # a Constant tensor

Every value gets a unique name (shared with the builders of subgraphs, so a Loop body
never shadows an outer value); the attribute types come from the op's schema.
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

_ATTR_TYPES = {int: ir.AttributeType.INT, float: ir.AttributeType.FLOAT}
_CONSTANT_FIELDS = {int: "value_int", float: "value_float"}


class Builder(tape.Tape):
    def __init__(self, attributes: Mapping[str, type], counter=None):
        super().__init__()
        self._attributes = dict(attributes)  # name -> int or float
        self._counter = counter if counter is not None else itertools.count()

    def __getattr__(self, op_type: str) -> Callable:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, _outputs=1, **attrs: self._node(op_type, inputs, attrs, _outputs)

    def _node(self, op_type: str, inputs, attrs, n_outputs: int):
        values = self.op_multi_out(op_type, list(inputs), attrs, num_outputs=n_outputs)
        for v in values:
            v.name = f"{op_type.lower()}_{next(self._counter)}"
        return values[0] if n_outputs == 1 else tuple(values)

    def const(self, value, dtype=np.int64) -> ir.Value:
        return self.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

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
        sub = Builder(self._attributes, self._counter)
        ins = [_value(*spec) for spec in inputs]
        outs = list(body(sub, *ins))
        for value, (out_name, dtype, shape) in zip(outs, outputs):
            value.name = out_name
            if dtype is not None:
                value.type, value.shape = ir.TensorType(dtype), ir.Shape(shape) if shape is not None else None
        return ir.Graph(ins, outs, nodes=sub.nodes, name=name)


def _value(name: str, dtype: ir.DataType | None, shape: tuple | None) -> ir.Value:
    if dtype is None:
        return ir.Value(name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape) if shape is not None else None)


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
