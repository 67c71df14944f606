"""Limits on a model's inputs that its graph knows but ONNX Runtime only reports mid-run:
the rows of the embedding tables that integer inputs index (the vocabulary), and the
length of a position-embedding table (the most tokens the model takes).

Found at compile time and written to the manifest (`input_limits`), so the runtime checks
feeds against them with numpy alone:

- ids: an integer graph input that reaches a Gather's indices through value-preserving ops
  only (Cast, Reshape, Squeeze, ...) must hold ids in [0, rows of the gathered table).
- tokens: any other Gather from a constant table whose indices come from the graph inputs is
  probed: its index subgraph alone runs on ONNX Runtime at a few token counts, and where the
  largest index grows one for one with the token count (position ids: arange(n), a slice of
  a position buffer, RoBERTa's cumsum + padding offset), the table's length bounds the tokens.
  Indices that stay put as n grows (token type ids) are not positions.

Anything this cannot read leaves the limit out: the runtime then still wraps ONNX Runtime's
own error. A static token count needs no limit (the feed check fixes the count).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

log = logging.getLogger(__name__)

#: ops that pass index values through unchanged (only their layout changes)
_SAME_VALUES = {"Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
#: token counts the index subgraph is probed at (batch 1)
PROBE_TOKENS = (5, 9, 14)
#: key of the original model's input limits in a compile's shared values (PipelineContext.shared)
INPUT_LIMITS = "input_limits"


def find_input_limits(model: onnx.ModelProto) -> dict:
    """{"ids": {input: {"limit", "node"}}, "tokens": None | {"limit", "node", "inputs"}}; empty
    where the graph does not tell (a limit is a courtesy check: it never fails a compile)."""
    try:
        return _find(model)
    except Exception as exc:  # noqa: BLE001
        log.debug("no input limits: %s", exc)
        return {"ids": {}, "tokens": None}


def _find(proto: onnx.ModelProto) -> dict:
    model = ir.serde.deserialize_model(proto)  # a view: the weights stay in the proto
    inputs = [i for i in model.graph.inputs if i.const_value is None]  # not an initializer
    ids: dict[str, dict] = {}
    direct: set[ir.Node] = set()  # Gathers whose indices are an input's values
    for inp in inputs:
        if inp.dtype is None or not inp.dtype.is_integer():
            continue
        for gather, rows in _gathers_of(inp):
            direct.add(gather)
            if inp.name not in ids or rows < ids[inp.name]["limit"]:
                ids[inp.name] = {"limit": rows, "node": gather.name}
    try:
        tokens = _position_limit(proto, model, inputs, direct, ids)
    except Exception as exc:  # noqa: BLE001 - keep the vocabulary limits found
        log.debug("no position limit: %s", exc)
        tokens = None
    return {"ids": ids, "tokens": tokens}


def _table_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant table: an initializer or Constant output, or a dequantized /
    cast copy of one (a quantized embedding); None for anything else."""
    while value is not None and value.producer() is not None \
            and value.producer().op_type in ("DequantizeLinear", "Cast", "Identity"):
        value = value.producer().inputs[0]
    if value is None:
        return None
    tensor = value.const_value  # not get_const_tensor: it renames a Constant's tensor in the caller's proto
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = None if attr is None else attr.value
    return None if tensor is None else tuple(tensor.shape)


def _rows(gather: ir.Node) -> int | None:
    shape = _table_shape(gather.inputs[0])
    if not shape:
        return None
    axis = gather.attributes.get_int("axis", 0) % len(shape)
    return int(shape[axis]) if shape[axis] > 0 else None


def _gathers_of(value: ir.Value):
    """(Gather, table rows) for each constant-table Gather indexed by `value`'s values."""
    seen, stack = set(), [value]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for node, index in value.uses():
            if node.op_type == "Gather" and index == 1:
                rows = _rows(node)
                if rows is not None:
                    yield node, rows
            elif node.op_type in _SAME_VALUES and index == 0:
                stack.extend(node.outputs)


def _position_limit(proto: onnx.ModelProto, model: ir.Model, inputs: list[ir.Value], direct: set[ir.Node], ids: dict) -> dict | None:
    token_inputs = [i.name for i in inputs if _dynamic_tokens(i)]
    if not token_inputs:
        return None  # a static token count: the feed check already fixes it
    candidates = [n for n in model.graph if n.op_type == "Gather" and n not in direct and len(n.inputs) > 1
                  and _table_shape(n.inputs[1]) is None and _rows(n) is not None]
    if not candidates:
        return None
    indices = list(dict.fromkeys(n.inputs[1].name for n in candidates))
    probe, needed = _subgraph(proto, indices)
    if not needed or any(not _dynamic_tokens(i) and len(i.shape or ()) >= 2 for i in inputs if i.name in needed):
        return None
    from .onnx_runner import OnnxRunner

    runner = OnnxRunner(probe)
    rng = np.random.default_rng(0)
    maxima = []
    for n in PROBE_TOKENS:
        feeds = {i.name: _probe_feed(i, n, ids, rng) for i in inputs if i.name in needed}
        maxima.append(dict(zip(indices, (int(np.max(v)) if v.size else None for v in runner.run(feeds).values()))))
    best = None
    for gather in candidates:
        got = [m[gather.inputs[1].name] for m in maxima]
        offsets = {g - n if g is not None else None for g, n in zip(got, PROBE_TOKENS)}
        if len(offsets) != 1 or None in offsets:
            continue  # does not grow one for one with the token count: not positions
        limit = _rows(gather) - 1 - offsets.pop()  # largest n with n + offset <= rows - 1
        if limit > 0 and (best is None or limit < best["limit"]):
            best = {"limit": limit, "node": gather.name}
    if best is not None:
        best["inputs"] = token_inputs
    return best


def _dynamic_tokens(inp: ir.Value) -> bool:
    """The input has a token axis (1) of no fixed size."""
    return inp.shape is not None and len(inp.shape) > 1 and not isinstance(inp.shape[1], int)


def _probe_feed(inp: ir.Value, n: int, ids: dict, rng) -> np.ndarray:
    """Batch 1, every dynamic non-batch axis n tokens. Integer inputs get ids above the usual
    special ids (0..2: padding, begin, end), so position ids count every token; masks get ones."""
    shape = [d if isinstance(d, int) else (1 if a == 0 else n) for a, d in enumerate(inp.shape)]
    dtype = inp.dtype.numpy()
    if "mask" in inp.name.lower() or dtype == np.bool_:
        return np.ones(shape, dtype)
    if np.issubdtype(dtype, np.integer):
        high = min(ids.get(inp.name, {}).get("limit", 100), 100)
        return rng.integers(min(3, high - 1), high, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _subgraph(proto: onnx.ModelProto, outputs: list[str]) -> tuple[onnx.ModelProto, set[str]]:
    """A model computing `outputs` from the graph inputs with only the nodes they need
    (the embedding stage, not the blocks); and the names of the graph inputs it takes."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    sub = ir.serde.deserialize_model(proto)  # a copy to cut down
    graph = sub.graph
    values = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
    graph.outputs[:] = [values[name] for name in outputs]
    graph.inputs[:] = [v for v in graph.inputs if v.const_value is None]
    RemoveUnusedNodesPass()(sub)  # and the initializers they do not read
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in graph for a in n.attributes.values()):
        raise ValueError("control flow in the index subgraph")
    graph.inputs[:] = [v for v in graph.inputs if v.uses() or v in graph.outputs]
    return ir.serde.serialize_model(sub), {v.name for v in graph.inputs}
