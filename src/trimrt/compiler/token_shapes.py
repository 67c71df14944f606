"""Free the token count: rewrite constants that bake in the original sequence length.

An export with a static token count bakes N into shape constants (Reshape targets,
Expand shapes). Downstream of a token-reducing op those constants are wrong. Each such
constant is rewritten to derive the token dimension from the runtime shape: in a
Reshape target, 0 ("copy this input dim", when the input's dim at that position is the
token count) or -1 (infer, when no other -1 is present); in an Expand shape, 1 (keep the
input's dim). A baked N that cannot be rewritten safely makes the build fail with the
node named, rather than emit a graph that silently computes the wrong thing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import BuildError
from .analysis import is_constant

#: op type -> indices of inputs that are shapes / sizes
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Range": (1,)}


def downstream_nodes(graph: ir.Graph, start: list[ir.Value]) -> list[ir.Node]:
    """Nodes that (transitively) consume any of `start`, in graph order."""
    reached: set[ir.Node] = set()
    stack = list(start)
    while stack:
        value = stack.pop()
        for user in value.consumers():
            if user not in reached:
                reached.add(user)
                stack.extend(user.outputs)
    return [n for n in graph if n in reached]


def free_token_count(graph: ir.Graph, pruned: list[ir.Value], n_orig: int, tag) -> int:
    """Rewrite baked token counts downstream of `pruned`; returns the number of constants rewritten."""
    rewritten = 0
    for node in downstream_nodes(graph, pruned):
        for idx in _SHAPE_INPUTS.get(node.op_type, ()):
            if idx >= len(node.inputs) or node.inputs[idx] is None:
                continue
            tensor = ir.convenience.get_const_tensor(node.inputs[idx])
            if tensor is None:
                continue
            arr = tensor.numpy()
            if arr.dtype != np.int64 or n_orig not in arr.reshape(-1):
                continue
            new = _rewrite(node, arr, n_orig)
            value = ir.Value(name=f"{node.name}_tokens_free", const_value=ir.tensor(new, name=f"{node.name}_tokens_free"))
            graph.register_initializer(value)
            node.replace_input_with(idx, value)
            node.metadata_props.setdefault("trimrt.rewritten_by", tag)
            rewritten += 1
    return rewritten


def _rewrite(node: ir.Node, arr: np.ndarray, n_orig: int) -> np.ndarray:
    positions = [i for i, v in enumerate(arr.reshape(-1)) if v == n_orig]
    if arr.ndim != 1 or len(positions) != 1:
        raise BuildError(f"cannot free the token count in {node.op_type} node {node.name!r}: its shape {arr.tolist()} "
                         f"holds the token count {n_orig} {len(positions)} times")
    pos = positions[0]
    in_shape = node.inputs[0].shape
    in_dim = in_shape[pos] if in_shape is not None and pos < len(in_shape) else None
    new = arr.copy()
    if node.op_type == "Reshape":
        if in_dim == n_orig and (node.attributes.get_int("allowzero", 0) == 0 or 0 not in arr):
            # allowzero only changes the meaning of 0 entries; with none in the target it can be reset
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            new[pos] = 0
            return new
        if -1 not in arr:
            new[pos] = -1
            return new
    elif node.op_type == "Expand" and in_dim == n_orig:
        new[pos] = 1
        return new
    raise BuildError(f"cannot free the token count in {node.op_type} node {node.name!r} (shape {arr.tolist()}): "
                     "a token-reducing pass would leave it with the original count; please report this graph")




def side_inputs(region: list[ir.Node], exclude: set[ir.Value]) -> list[ir.Value]:
    """Non-constant values consumed inside `region` but produced outside it (masks, position
    tables, ...), in first-use order."""
    inside = {out for node in region for out in node.outputs}
    seen: dict[ir.Value, None] = {}
    for node in region:
        for value in node.inputs:
            if value is None or value in inside or value in exclude or value in seen:
                continue
            if is_constant(value):
                continue
            seen[value] = None
    return list(seen)


def gather_tokens(value: ir.Value, rank: int, axes: list[int], kept_index: ir.Value, make_node,
                  name: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes gathering `value` (of rank `rank`) along each token axis in `axes` with
    kept_index [B, k] (GatherElements, after broadcasting a size-1 batch axis to B)."""
    nodes = []
    ints = lambda vals, tag: ir.Value(name=f"{name}_{tag}", const_value=ir.tensor(np.array(vals, dtype=np.int64), name=f"{name}_{tag}"))  # noqa: E731
    # broadcast the batch axis: Expand(value, [B, 1, ..., 1])
    batch = make_node("Shape", [kept_index], {"start": 0, "end": 1}, f"{name}_batch")
    ones = ints([1] * (rank - 1), "ones")
    target = make_node("Concat", [batch.outputs[0], ones], {"axis": 0}, f"{name}_bshape")
    current = make_node("Expand", [value, target.outputs[0]], {}, f"{name}_bexpand")
    nodes += [batch, target, current]
    out = current.outputs[0]
    for axis in axes:
        # indices [B, 1.., k, ..1] expanded to the data's shape with k on `axis`
        shape = [0] + [1] * (rank - 1)
        shape[axis] = -1
        idx = make_node("Reshape", [kept_index, ints(shape, f"ishape{axis}")], {}, f"{name}_idx{axis}")
        data_shape = make_node("Shape", [out], {}, f"{name}_dshape{axis}")
        k_dim = make_node("Shape", [kept_index], {"start": 1, "end": 2}, f"{name}_k{axis}")
        parts = []
        if axis > 0:
            parts.append(make_node("Slice", [data_shape.outputs[0], ints([0], f"s0{axis}"), ints([axis], f"e0{axis}")], {}, f"{name}_pre{axis}"))
        parts.append(k_dim)
        if axis < rank - 1:
            parts.append(make_node("Slice", [data_shape.outputs[0], ints([axis + 1], f"s1{axis}"), ints([rank], f"e1{axis}")], {}, f"{name}_post{axis}"))
        full = make_node("Concat", [p.outputs[0] for p in parts], {"axis": 0}, f"{name}_ishape_full{axis}")
        idx_full = make_node("Expand", [idx.outputs[0], full.outputs[0]], {}, f"{name}_iexpand{axis}")
        gathered = make_node("GatherElements", [out, idx_full.outputs[0]], {"axis": axis}, f"{name}_gather{axis}")
        nodes += [idx, data_shape, k_dim, *parts, full, idx_full, gathered]
        out = gathered.outputs[0]
    return nodes, out


#: ops that compute with shapes (the arithmetic of dynamic Reshape / Expand targets)
_SHAPE_ARITHMETIC = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul",
                     "Div", "Identity", "Constant", "Reshape", "Max", "Min", "Abs", "Neg", "Equal", "Where",
                     "ConstantOfShape", "Range"}
#: metadata mark on the node computing a pruned region's token count
TOKEN_COUNT_MARK = "trimrt.token_count"
#: metadata mark on nodes that must keep computing the ORIGINAL token count (never re-derived)
ORIGINAL_COUNT_MARK = "trimrt.original_token_count"


def rederive_shape_values(graph: ir.Graph, region: list[ir.Node], dims, stream: ir.Value,
                          make_node, name: str) -> int:
    """Re-derive, inside a pruned region, the shape values computed from the original token count.

    Dynamic exports compute Reshape / Expand targets from Shape(some input)[token axis]
    once and reuse them everywhere. Each such value entering `region` is recomputed by a
    clone of its shape arithmetic in which Shape(T) (T with one token axis, as `axes_of`
    tells: a `probe.TokenDims`) reports the pruned count taken from Shape(stream) instead (and an earlier
    layer's marked count is replaced by this one's). Returns the number of values replaced.
    """
    inside = {out for node in region for out in node.outputs}
    count = make_node("Shape", [stream], {"start": 1, "end": 2}, f"{name}_tokens")
    count.metadata_props[TOKEN_COUNT_MARK] = "1"
    new_nodes: list[ir.Node] = [count]
    clones: dict[ir.Value, ir.Value] = {}

    def int_const(vals, tag):
        v = ir.Value(name=f"{name}_{tag}_{len(new_nodes)}", const_value=ir.tensor(np.array(vals, dtype=np.int64)))
        return v

    def leaf_replacement(node: ir.Node) -> ir.Value | None:
        """The pruned-count version of a token-count leaf, or None if `node` is no such leaf."""
        if node.metadata_props.get(TOKEN_COUNT_MARK):
            return count.outputs[0]
        if node.op_type != "Shape":
            return None
        source = node.inputs[0]
        axes = dims.axes(source) if source is not stream else []
        if len(axes) != 1:
            return None
        rank, axis = dims.rank(source), axes[0]
        full = make_node("Shape", [source], {}, f"{name}_shape_{len(new_nodes)}")
        parts = []
        if axis > 0:
            parts.append(make_node("Slice", [full.outputs[0], int_const([0], "s"), int_const([axis], "e")], {},
                                   f"{name}_pre_{len(new_nodes)}"))
        parts.append(None)
        if axis < rank - 1:
            parts.append(make_node("Slice", [full.outputs[0], int_const([axis + 1], "s"), int_const([rank], "e")], {},
                                   f"{name}_post_{len(new_nodes)}"))
        concat = make_node("Concat", [count.outputs[0] if p is None else p.outputs[0] for p in parts], {"axis": 0},
                           f"{name}_newshape_{len(new_nodes)}")
        new_nodes.extend([full, *[p for p in parts if p is not None], concat])
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        if start == 0 and end >= rank:
            return concat.outputs[0]
        sliced = make_node("Slice", [concat.outputs[0], int_const([start], "s"), int_const([end], "e")], {},
                           f"{name}_shape_slice_{len(new_nodes)}")
        new_nodes.append(sliced)
        return sliced.outputs[0]

    def depends_on_tokens(value: ir.Value, seen: dict) -> bool:
        if value in seen:
            return seen[value]
        node = value.producer()
        result = False
        if node is not None and value not in inside and not node.metadata_props.get(ORIGINAL_COUNT_MARK):
            if leaf_replacement_check(node):
                result = True
            elif node.op_type in _SHAPE_ARITHMETIC and node.op_type != "Shape":
                result = any(depends_on_tokens(v, seen) for v in node.inputs if v is not None)
        seen[value] = result
        return result

    def leaf_replacement_check(node: ir.Node) -> bool:
        if node.metadata_props.get(TOKEN_COUNT_MARK):
            return True
        if node.op_type != "Shape" or node.inputs[0] is stream:
            return False
        return len(dims.axes(node.inputs[0])) == 1

    def clone(value: ir.Value) -> ir.Value:
        if value in clones:
            return clones[value]
        node = value.producer()
        if node is None:
            return value
        replacement = leaf_replacement(node) if leaf_replacement_check(node) else None
        if replacement is None:
            if not depends_on_tokens(value, memo):
                return value
            inputs = [clone(v) if v is not None else None for v in node.inputs]
            attrs = {k: a for k, a in node.attributes.items()}
            copy = ir.Node(node.domain, node.op_type, inputs, attrs.values(), num_outputs=len(node.outputs),
                           name=f"{name}_{node.name or node.op_type}_{len(new_nodes)}")
            copy.metadata_props.update({k: v for k, v in count.metadata_props.items() if k != TOKEN_COUNT_MARK})
            new_nodes.append(copy)
            for old, new in zip(node.outputs, copy.outputs):
                clones[old] = new
            return clones[value]
        clones[value] = replacement
        return replacement

    memo: dict = {}
    replaced = 0
    for node in region:
        for i, value in enumerate(node.inputs):
            if value is None or value in inside or value.dtype not in (ir.DataType.INT64, ir.DataType.INT32, None):
                continue
            if value.shape is not None and len(value.shape) > 1:
                continue
            if not depends_on_tokens(value, memo):
                continue
            node.replace_input_with(i, clone(value))
            replaced += 1
    if replaced:
        for node in new_nodes:
            for value in node.inputs:
                if value is not None and value.const_value is not None and value.graph is None and not value.is_initializer():
                    graph.register_initializer(value)
        graph.insert_after(stream.producer(), new_nodes)
    return replaced
