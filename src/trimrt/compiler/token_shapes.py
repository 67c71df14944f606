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
