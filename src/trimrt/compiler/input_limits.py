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
from collections import defaultdict

import numpy as np
import onnx

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


def _find(model: onnx.ModelProto) -> dict:
    graph = model.graph
    tables = _constant_tables(graph)
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    ids: dict[str, dict] = {}
    direct: set[str] = set()  # Gathers whose indices are an input's values
    for inp in inputs:
        if inp.type.tensor_type.elem_type not in _INTEGER:
            continue
        for gather, rows in _gathers_of(inp.name, consumers, tables):
            direct.add(gather.name)
            if inp.name not in ids or rows < ids[inp.name]["limit"]:
                ids[inp.name] = {"limit": rows, "node": gather.name}
    try:
        tokens = _position_limit(model, inputs, tables, direct, ids)
    except Exception as exc:  # noqa: BLE001 - keep the vocabulary limits found
        log.debug("no position limit: %s", exc)
        tokens = None
    return {"ids": ids, "tokens": tokens}


_INTEGER = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
            onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _constant_tables(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the values that are constant tables: initializers, Constant outputs, and
    dequantized / cast copies of them (a quantized embedding)."""
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:  # topological order: a copy's source is seen first
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                shapes[node.output[0]] = tuple(value.t.dims)
        elif node.op_type in ("DequantizeLinear", "Cast", "Identity") and node.input and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
    return shapes


def _rows(gather: onnx.NodeProto, tables: dict[str, tuple[int, ...]]) -> int | None:
    shape = tables.get(gather.input[0])
    if not shape:
        return None
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    return int(shape[axis % len(shape)]) if shape[axis % len(shape)] > 0 else None


def _gathers_of(name: str, consumers, tables):
    """(Gather, table rows) for each constant-table Gather indexed by `name`'s values."""
    seen, stack = set(), [name]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for node in consumers.get(value, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value:
                rows = _rows(node, tables)
                if rows is not None:
                    yield node, rows
            elif node.op_type in _SAME_VALUES and node.input[0] == value:
                stack.extend(node.output)


def _position_limit(model: onnx.ModelProto, inputs, tables, direct: set[str], ids: dict) -> dict | None:
    graph = model.graph
    token_inputs = [i.name for i in inputs if _dynamic_axis(i, 1)]
    if not token_inputs:
        return None  # a static token count: the feed check already fixes it
    candidates = [n for n in graph.node if n.op_type == "Gather" and n.name not in direct
                  and len(n.input) > 1 and n.input[1] not in tables and _rows(n, tables) is not None]
    if not candidates:
        return None
    indices = list(dict.fromkeys(n.input[1] for n in candidates))
    probe, needed = _subgraph(model, indices)
    if not needed or any(not _dynamic_axis(i, 1) and _rank(i) >= 2 for i in inputs if i.name in needed):
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
        got = [m[gather.input[1]] for m in maxima]
        offsets = {g - n if g is not None else None for g, n in zip(got, PROBE_TOKENS)}
        if len(offsets) != 1 or None in offsets:
            continue  # does not grow one for one with the token count: not positions
        limit = _rows(gather, tables) - 1 - offsets.pop()  # largest n with n + offset <= rows - 1
        if limit > 0 and (best is None or limit < best["limit"]):
            best = {"limit": limit, "node": gather.name}
    if best is not None:
        best["inputs"] = token_inputs
    return best


def _dims(inp: onnx.ValueInfoProto):
    return list(inp.type.tensor_type.shape.dim) if inp.type.tensor_type.HasField("shape") else None


def _rank(inp: onnx.ValueInfoProto) -> int:
    dims = _dims(inp)
    return -1 if dims is None else len(dims)


def _dynamic_axis(inp: onnx.ValueInfoProto, axis: int) -> bool:
    dims = _dims(inp)
    return dims is not None and len(dims) > axis and not dims[axis].HasField("dim_value")


def _probe_feed(inp: onnx.ValueInfoProto, n: int, ids: dict, rng) -> np.ndarray:
    """Batch 1, every dynamic non-batch axis n tokens. Integer inputs get ids above the usual
    special ids (0..2: padding, begin, end), so position ids count every token; masks get ones."""
    shape = [d.dim_value if d.HasField("dim_value") else (1 if a == 0 else n) for a, d in enumerate(_dims(inp))]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    if "mask" in inp.name.lower() or dtype == np.bool_:
        return np.ones(shape, dtype)
    if np.issubdtype(dtype, np.integer):
        high = min(ids.get(inp.name, {}).get("limit", 100), 100)
        return rng.integers(min(3, high - 1), high, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _subgraph(model: onnx.ModelProto, outputs: list[str]) -> tuple[onnx.ModelProto, set[str]]:
    """A model computing `outputs` from the graph inputs with only the nodes they need
    (the embedding stage, not the blocks); and the names of the graph inputs it takes."""
    graph = model.graph
    producer = {o: k for k, node in enumerate(graph.node) for o in node.output}
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input if i.name not in inits}
    keep, used_inits, used_inputs = set(), set(), set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in inits:
            used_inits.add(name)
        elif name in graph_inputs:
            used_inputs.add(name)
        elif name in producer and producer[name] not in keep:
            node = graph.node[producer[name]]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"control flow ({node.op_type}) in the index subgraph")
            keep.add(producer[name])
            stack.extend(i for i in node.input if i)
    nodes = [n for k, n in enumerate(graph.node) if k in keep]
    sub = onnx.helper.make_graph(
        nodes, "input_limits_probe", [graph_inputs[n] for n in graph_inputs if n in used_inputs],
        [onnx.ValueInfoProto(name=o) for o in outputs], [inits[n] for n in inits if n in used_inits])
    probe = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    return probe, used_inputs

