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

import functools
import itertools

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import constant_array, is_constant
from ..errors import BuildError
from .base import PASS_TAG, GraphBuilder

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


def free_token_count(b: GraphBuilder, reduced: list[ir.Value], n_orig: int, dims,
                     regions: list[set] | None = None) -> int:
    """Rewrite baked token counts downstream of the reductions `reduced` (their outputs,
    [B, tokens, D], in order; or only inside `regions`, one node set per reduction, where
    the tokens come back after it: a routed block); returns the number of constants rewritten.

    Baked entries are the count itself, or a multiple of it where a Reshape merges the
    token axis with others (GPT-2's Conv1D flattens [B, N, D] to [B·N, D]; found by
    matching the Reshape's input and output axes, `dims` giving the input's token axis).
    A node takes the count of the latest reduction upstream of it. Where a local rewrite
    is safe (Reshape 0 / -1, Expand 1) it is used; otherwise the baked entries become
    that reduction's runtime count, Shape(output)[1], times their multiple. Nodes are
    built with `b` (its pass tags them and names the rewrites)."""
    graph, tag = b.graph, b.pass_name
    regions = regions if regions is not None else [set(downstream_nodes(graph, [out])) for out in reduced]
    counts: dict[int, ir.Value] = {}

    def count_of(node: ir.Node) -> ir.Value:
        i = max(j for j, region in enumerate(regions) if node in region)
        if i not in counts:
            counts[i] = b.op("Shape", [reduced[i]], {"start": 1, "end": 2}, name=f"{tag}_tokens_{i}")
            b.insert_after(reduced[i].producer())
        return counts[i]

    rewritten = 0
    for node in [n for n in graph if any(n in region for region in regions)]:
        if node.metadata_props.get(PASS_TAG):
            continue  # the passes' own shape constants are right by construction
        for idx in _SHAPE_INPUTS.get(node.op_type, ()):
            if idx >= len(node.inputs) or node.inputs[idx] is None:
                continue
            arr = constant_array(node.inputs[idx])
            if arr is None:
                rewritten += _free_concat_pieces(b, node, idx, n_orig, count_of, dims)
                continue
            scaled = _token_entries(node, arr, n_orig, dims) if arr.dtype in (np.int64, np.int32) else {}
            if not scaled:
                continue
            new = _rewrite(node, arr, n_orig, scaled)
            value = (b.const(new, name=f"{node.name}_tokens_free") if new is not None
                     else _runtime_shape(b, node, arr, scaled, count_of(node)))
            node.replace_input_with(idx, value)
            node.metadata_props.setdefault("trimrt.rewritten_by", tag)
            rewritten += 1
    return rewritten


def _free_concat_pieces(b: GraphBuilder, node: ir.Node, idx: int, n_orig: int, count_of, dims) -> int:
    """A shape computed as Concat(runtime dims, constant pieces): the TorchScript exporter's
    form with a dynamic batch (nn.MultiheadAttention's [N, B·H, Dh] views bake N in a
    piece). Pieces holding the count become the runtime count, in a copy of the Concat
    private to `node` (the original may serve nodes before the reduction)."""
    concat = node.inputs[idx].producer()
    if concat is None or concat.op_type != "Concat":
        return 0
    axis = _reshape_token_axis(node, n_orig, dims) if node.op_type == "Reshape" else None
    pieces, changed, offset = [], 0, 0
    for piece in concat.inputs:
        arr = constant_array(piece)
        length = piece.shape[0] if piece is not None and piece.shape is not None and len(piece.shape) == 1 else None
        size = arr.size if arr is not None else length
        if arr is not None and arr.ndim == 1 and arr.dtype in (np.int64, np.int32) and n_orig in arr:
            entries = {i: 1 for i, v in enumerate(arr) if v == n_orig}
            if axis is not None:  # only the entry the tokens land on
                entries = {i: 1 for i in entries if offset is not None and offset + i == axis}
            if entries:
                piece = _runtime_shape(b, node, arr, entries, count_of(node))
                changed += 1
        pieces.append(piece)
        offset = offset + size if offset is not None and isinstance(size, int) else None
    if not changed:
        return 0
    copy = b.op("Concat", pieces, {"axis": concat.attributes.get_int("axis", 0)},
                name=f"{node.name or node.op_type}_tokens_shape")
    b.insert_before(node)
    node.replace_input_with(idx, copy)
    node.metadata_props.setdefault("trimrt.rewritten_by", b.pass_name)
    return changed


def _token_entries(node: ir.Node, arr: np.ndarray, n_orig: int, dims) -> dict[int, int]:
    """{position in the flattened shape constant: multiple of the token count it holds}."""
    flat = arr.reshape(-1)
    axis = _reshape_token_axis(node, n_orig, dims) if node.op_type == "Reshape" and arr.ndim == 1 else None
    if axis is None:  # not a Reshape target, or shapes unknown: every entry equal to the count is taken as the count
        return {i: 1 for i, v in enumerate(flat) if v == n_orig}
    if axis < 0 or axis >= len(flat) or flat[axis] <= 0 or flat[axis] % n_orig:
        return {}  # the tokens land on a 0 / -1 entry (already free), or the entries bake something else
    return {axis: int(flat[axis]) // n_orig}


def _reshape_token_axis(node: ir.Node, n_orig: int, dims) -> int | None:
    """The output axis of a Reshape holding the input's token axis (merged with neighbours
    or alone), from the original static or probed shapes: so an entry that only happens
    to equal the count (a head size) is left alone. -1 when the token axis is split or
    not found; None when the shapes are unknown."""
    in_shape, out_shape = dims.shape(node.inputs[0]), dims.shape(node.outputs[0])  # static, else probed
    if in_shape is None or out_shape is None:
        return None
    axes = [a for a in range(1, len(in_shape)) if in_shape[a] == n_orig]
    if len(axes) != 1:
        return None
    found = _merged_axis(in_shape, out_shape, axes[0])
    return -1 if found is None else found


def _merged_axis(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The output axis of a Reshape that holds input `axis` merged with its neighbours
    (None when the axis is split across several output axes)."""
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        first_in, first_out = i, j  # the group: input axes first_in..i, output axes first_out..j
        a, b = in_shape[i], out_shape[j]
        while a != b:
            if a < b and i + 1 < len(in_shape):
                i += 1
                a *= in_shape[i]
            elif b < a and j + 1 < len(out_shape):
                j += 1
                b *= out_shape[j]
            else:
                return None
        if first_in <= axis <= i:
            sized = [o for o in range(first_out, j + 1) if out_shape[o] != 1]  # axes of 1 ride along ([B, N] -> [B, 1, 1, N])
            return sized[0] if len(sized) == 1 else None
        i, j = i + 1, j + 1
    return None


def _rewrite(node: ir.Node, arr: np.ndarray, n_orig: int, scaled: dict[int, int]) -> np.ndarray | None:
    """A constant that no longer bakes the count, or None when only the runtime count will do."""
    if arr.ndim != 1 or len(scaled) != 1:
        return None
    pos, multiple = next(iter(scaled.items()))
    in_shape = node.inputs[0].shape if node.inputs else None
    in_dim = in_shape[pos] if in_shape is not None and pos < len(in_shape) else None
    reshape = node.op_type == "Reshape"
    if reshape and multiple == 1 and in_dim == n_orig and (node.attributes.get_int("allowzero", 0) == 0 or 0 not in arr):
        # allowzero only changes the meaning of 0 entries; with none in the target it can be reset
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        entry = 0
    elif reshape and -1 not in arr:
        entry = -1
    elif node.op_type == "Expand" and in_dim == n_orig and len(in_shape) == len(arr):
        entry = 1
    else:
        return None
    new = arr.copy()
    new[pos] = entry
    return new


def _runtime_shape(b: GraphBuilder, node: ir.Node, arr: np.ndarray, scaled: dict[int, int], count: ir.Value | None) -> ir.Value:
    """`arr` with its token entries computed from the runtime `count` ([1] int64)."""
    if count is None or arr.ndim > 1:
        raise BuildError(f"cannot free the token count in {node.op_type} node {node.name!r} (shape {arr.tolist()}): "
                         "a token-reducing pass would leave it with the original count; please report this graph")
    name = f"{node.name or node.op_type}_tokens_free"
    parts = []

    def const(vals, tag):
        return b.const(np.array(vals, np.int64), name=f"{name}_{tag}{len(parts)}")

    for is_count, run in itertools.groupby(enumerate(arr.reshape(-1)), key=lambda entry: entry[0] in scaled):
        if not is_count:  # a run of kept entries: one constant
            parts.append(const([int(v) for _, v in run], "c"))
            continue
        for i, _ in run:
            parts.append(count if scaled[i] == 1 else b.op("Mul", [count, const([scaled[i]], "m")], name=f"{name}_x{i}"))
    out = b.op("Concat", parts, {"axis": 0}, name=name)
    if arr.ndim == 0:  # a scalar size (Range's limit)
        out = b.op("Squeeze", [out], name=f"{name}_scalar")
    if arr.dtype != np.int64:
        out = b.op("Cast", [out], {"to": ir.DataType.INT32}, name=f"{name}_int32")
    b.insert_before(node)
    return out


def side_inputs(region: list[ir.Node], exclude: set[ir.Value]) -> list[ir.Value]:
    """Non-constant values consumed inside `region` but produced outside it (masks, position
    tables, ...), in first-use order."""
    inside = {out for node in region for out in node.outputs}
    return list(dict.fromkeys(value for node in region for value in node.inputs
                              if not (value is None or value in inside or value in exclude or is_constant(value))))


#: element-wise ops whose operands broadcast against the tokens (masks, RoPE tables)
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Where", "And", "Or", "Equal", "Less", "Greater", "LessOrEqual",
                 "GreaterOrEqual", "Max", "Min"}


def travelling_values(region: list[ir.Node], exclude: set[ir.Value], dims) -> dict[ir.Value, tuple[int, list[int]]]:
    """The values from outside `region` that travel with its tokens: {value: (rank, token
    axes)}, `rank` being the rank the value is gathered at (`dims`: a probe.TokenDims).

    - A side input (side_inputs) with the batch axis first travels along its own token axes.
    - A value of lower rank than the element-wise result it broadcasts against has no batch
      axis (ONNX aligns shapes from the right): a [N, Dh] RoPE table or an [N, N] causal mask
      of a plain PyTorch export, and the constants a static-count export folds (its causal
      mask, RoPE tables, position slices). It travels aligned from the right into that result
      (unsqueezed to its rank when gathered), along the result's token axes it spans.
    Weights (MatMul, norms) never qualify, whatever their sizes; neither does a value whose
    readers disagree on the rank (element-wise ones of two ranks, or another op)."""
    found: dict[ir.Value, tuple[int, list[int]]] = {}
    for value in side_inputs(region, exclude):
        rank = dims.rank(value)
        if rank is not None:
            found[value] = (rank, dims.axes(value))
    static = isinstance(dims.n_tokens, int)  # only then can a constant span the tokens
    lifted: dict[ir.Value, set[tuple[int, tuple[int, ...]]]] = {}
    for node in region:
        if node.op_type not in _BROADCASTING or node.domain not in ("", "ai.onnx"):
            continue
        out_rank, out_axes = dims.rank(node.outputs[0]), dims.axes(node.outputs[0])
        if not out_axes or out_rank is None:
            continue
        for value in node.inputs:
            if value is None or value in exclude or not (value in found or (static and is_constant(value))):
                continue
            if value in found:
                shape = dims.shape(value)
            else:
                tensor = ir.convenience.get_const_tensor(value)
                shape = None if tensor is None else tuple(tensor.shape)
            if shape is None or len(shape) > out_rank or (value in found and len(shape) == out_rank):
                continue
            full = (1,) * (out_rank - len(shape)) + shape
            lifted.setdefault(value, set()).add((out_rank, tuple(a for a in out_axes if full[a] == dims.token_size)))
    in_region = set(region)
    for value, ways in lifted.items():
        readers = {user.op_type for user, _ in value.uses() if user in in_region}
        if len(ways) == 1 and readers <= _BROADCASTING:
            rank, axes = next(iter(ways))
            found[value] = (rank, list(axes))
        else:  # gathered at one rank, it would no longer fit all its readers
            found.pop(value, None)
    return {value: (rank, axes) for value, (rank, axes) in found.items() if axes}


def gather_tokens(b: GraphBuilder, value: ir.Value, rank: int, axes: list[int], kept_index: ir.Value, name: str) -> ir.Value:
    """Gather `value` (of rank `rank`) along each token axis in `axes` with kept_index
    [B, k] (after broadcasting a size-1 batch axis to B); the nodes are collected in `b`.

    Each axis is gathered as whole slabs by GatherND with batch_dims=1, the axis moved next
    to the batch for it (a Transpose, none for axis 1): row copies, where GatherElements
    would read an index per element through an expanded [B, .., k, ..] index tensor (on a
    [B, 1, N, N] mask, OpenVINO spent 100 µs of a 5 ms MiniLM run expanding and gathering)."""
    def ints(vals, tag):
        return b.const(np.array(vals, dtype=np.int64), name=f"{name}_{tag}")

    # broadcast the batch axis: Expand(value, [B, 1, ..., 1])
    batch = b.op("Shape", [kept_index], {"start": 0, "end": 1}, name=f"{name}_batch")
    target = b.op("Concat", [batch, ints([1] * (rank - 1), "ones")], {"axis": 0}, name=f"{name}_bshape")
    out = b.op("Expand", [value, target], name=f"{name}_bexpand")
    index = b.op("Unsqueeze", [kept_index, ints([-1], "last")], name=f"{name}_index")  # [B, k, 1]
    for axis in axes:
        perm = [0, axis, *(a for a in range(1, rank) if a != axis)]  # the token axis next to the batch
        moved = out if axis == 1 else b.op("Transpose", [out], {"perm": perm}, name=f"{name}_front{axis}")
        out = b.op("GatherND", [moved, index], {"batch_dims": 1}, name=f"{name}_gather{axis}")
        if axis != 1:
            out = b.op("Transpose", [out], {"perm": [perm.index(a) for a in range(rank)]}, name=f"{name}_back{axis}")
    return out


def _with_size(b: GraphBuilder, shape: ir.Value, size: ir.Value, axis: int, rank: int, bound, names) -> ir.Value:
    """Concat(shape[:axis], size, shape[axis + 1:]): the shape of a rank-`rank` tensor with
    `size` on `axis`. `bound(values, tag)` makes the Slice bounds (tagged s0, e0, s1, e1);
    `names`: of the Slice before the axis, the Slice after it and the Concat."""
    pre = [b.op("Slice", [shape, bound([0], "s0"), bound([axis], "e0")], name=names[0])] if axis > 0 else []
    post = [b.op("Slice", [shape, bound([axis + 1], "s1"), bound([rank], "e1")], name=names[1])] if axis < rank - 1 else []
    return b.op("Concat", [*pre, size, *post], {"axis": 0}, name=names[2])


#: ops that compute with shapes (the arithmetic of dynamic Reshape / Expand targets)
_SHAPE_ARITHMETIC = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul",
                     "Div", "Identity", "Constant", "Reshape", "Max", "Min", "Abs", "Neg", "Equal", "Where",
                     "ConstantOfShape", "Range"}
#: metadata mark on the node computing a pruned region's token count
TOKEN_COUNT_MARK = "trimrt.token_count"
#: metadata mark on nodes that must keep computing the ORIGINAL token count (never re-derived)
ORIGINAL_COUNT_MARK = "trimrt.original_token_count"


def rederive_shape_values(b: GraphBuilder, region: list[ir.Node], dims, stream: ir.Value, name: str,
                          swap: dict[ir.Value, ir.Value] | None = None) -> int:
    """Re-derive, inside a pruned region, the shape values computed from the original token count.

    Dynamic exports compute Reshape / Expand targets from Shape(some input)[token axis]
    once and reuse them everywhere. Each such value entering `region` is recomputed by a
    clone of its shape arithmetic in which Shape(T) (T with one token axis, as `dims`, a
    probe.TokenDims, tells) reports the pruned count, Shape(stream), instead (and an earlier
    layer's marked count is replaced by this one's; and Shape(S) of a tensor S in `swap`
    reads its stand-in instead: a KV-cache decoder's past length, which the exporter reads
    from any layer's past, is the reduced layers' own). Returns the number of values replaced;
    the new nodes are placed after the producer of `stream` when there are any (their
    names are numbered by the nodes made before them)."""
    inside = {out for node in region for out in node.outputs}
    count = b.op("Shape", [stream], {"start": 1, "end": 2}, name=f"{name}_tokens")
    count.producer().metadata_props[TOKEN_COUNT_MARK] = "1"
    clones: dict[ir.Value, ir.Value] = {}
    swap = swap or {}
    made = itertools.count()  # unique constant names (several are made per node)

    def int_const(vals, tag):
        return b.const(np.array(vals, dtype=np.int64), name=f"{name}_{tag}_{next(made)}")

    def is_leaf(node: ir.Node) -> bool:
        """A token-count leaf: a marked count, or Shape(T) of a T with one token axis."""
        return bool(node.metadata_props.get(TOKEN_COUNT_MARK)) or (node.op_type == "Shape" and (
            node.inputs[0] in swap or (node.inputs[0] is not stream and len(dims.axes(node.inputs[0])) == 1)))

    def leaf_replacement(node: ir.Node) -> ir.Value:
        """The pruned-count version of a token-count leaf."""
        if node.metadata_props.get(TOKEN_COUNT_MARK):
            return count
        if node.inputs[0] in swap:
            return b.op("Shape", [swap[node.inputs[0]]], dict(node.attributes), name=f"{name}_own_shape_{len(b.nodes)}")
        source, n = node.inputs[0], len(b.nodes)
        rank, axis = dims.rank(source), dims.axes(source)[0]
        full = b.op("Shape", [source], name=f"{name}_shape_{n}")
        concat = _with_size(b, full, count, axis, rank, lambda vals, tag: int_const(vals, tag[0]),
                            [f"{name}_{part}_{n}" for part in ("pre", "post", "newshape")])
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        if start == 0 and end >= rank:
            return concat
        return b.op("Slice", [concat, int_const([start], "s"), int_const([end], "e")],
                    name=f"{name}_shape_slice_{len(b.nodes)}")

    @functools.cache
    def depends_on_tokens(value: ir.Value) -> bool:
        node = value.producer()
        if node is None or value in inside or node.metadata_props.get(ORIGINAL_COUNT_MARK):
            return False
        if is_leaf(node):
            return True
        return (node.op_type in _SHAPE_ARITHMETIC and node.op_type != "Shape"
                and any(depends_on_tokens(v) for v in node.inputs if v is not None))

    def clone(value: ir.Value) -> ir.Value:
        if value in clones:
            return clones[value]
        node = value.producer()
        if node is not None and is_leaf(node):
            clones[value] = leaf_replacement(node)
            return clones[value]
        if not depends_on_tokens(value):  # (nor when it has no producer)
            return value
        inputs = [clone(v) if v is not None else None for v in node.inputs]
        copies = b.op_multi_out(node.op_type, inputs, dict(node.attributes), domain=node.domain,
                                num_outputs=len(node.outputs),
                                name=f"{name}_{node.name or node.op_type}_{len(b.nodes)}")
        clones.update(zip(node.outputs, copies))
        return clones[value]

    replaced = 0
    for node in region:
        for i, value in enumerate(node.inputs):
            if (value is None or value in inside or value.dtype not in (ir.DataType.INT64, ir.DataType.INT32, None)
                    or (value.shape is not None and len(value.shape) > 1) or not depends_on_tokens(value)):
                continue
            node.replace_input_with(i, clone(value))
            replaced += 1
    if replaced:
        b.insert_after(stream.producer())
    else:
        b.discard()
    return replaced
