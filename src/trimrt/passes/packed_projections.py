"""Projections of one input packed into one MatMul (decoder builds on ONNX Runtime).

A decoder layer multiplies the same normalised hidden state by the query, key and value
weights (and by the gate and up weights of its MLP): at a decode step each is a matrix-
vector product of its own, a kernel call that streams its weights and, in INT4 builds,
quantizes the same activation again. Packed, the layer makes one call on the weights
side by side ([K, Nq + Nk + Nv]) and splits the result: the same products, fewer calls,
one activation quantization (ONNX Runtime GenAI's builder packs Q/K/V the same way).
Runs before quantization, which then quantizes the packed weights (per output column,
as before; AWQ / GPTQ see one layer with the inputs the three shared).

Where the packed Q/K/V feed ONNX Runtime's GroupQueryAttention (kv_attention made it), the
op takes the packed tensor as it is ([B, S, (heads + 2·kv_heads)·d]): no Split kernel.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from .base import TrimrtPass
from .kv_attention import ORT_DOMAIN


class PackedProjectionsPass(TrimrtPass):
    """MatMuls of one input by constant 2-D weights become one MatMul and a Split."""

    name = "packed_projections"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups: dict[int, list[ir.Node]] = defaultdict(list)
        for node in model.graph:
            if _packable(node):
                groups[id(node.inputs[0])].append(node)
        packed = [g for g in groups.values() if len(g) > 1 and len({_weight(n).dtype for n in g}) == 1]
        for i, group in enumerate(packed):
            _pack(self.builder(model.graph, f"trimrt_packed_{i}"), group)
        attentions = [n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention" and n.domain == ORT_DOMAIN]
        fed = sum(_feed_packed(self.builder(model.graph, f"trimrt_packed_qkv_{i}"), n) for i, n in enumerate(attentions))
        self.record({"packed_groups": len(packed), "matmuls_packed": sum(map(len, packed)), "attention_fed_packed": fed})
        return ir.passes.PassResult(model, modified=bool(packed))


def _weight(node: ir.Node) -> np.ndarray:
    return node.inputs[1].const_value.numpy()


def _packable(node: ir.Node) -> bool:
    """A MatMul by a float weight [K, N] that only it uses (a shared weight would be copied)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None \
            or node.outputs[0].is_graph_output():
        return False
    weight = node.inputs[1]
    if weight.const_value is None or not weight.is_initializer() or len(weight.uses()) != 1 or weight.is_graph_input():
        return False
    array = weight.const_value
    return len(array.shape) == 2 and array.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _pack(b, group: list[ir.Node]) -> None:
    """One MatMul on the concatenated weights before the group's first node, a Split of its
    result into the original outputs' places."""
    weights = [_weight(n) for n in group]
    packed = b.op("MatMul", [group[0].inputs[0], b.const(np.concatenate(weights, axis=1))])
    parts = b.op_multi_out("Split", [packed, b.const(np.array([w.shape[1] for w in weights]))], {"axis": -1},
                           num_outputs=len(group))
    b.insert_before(group[0])
    for node, part in zip(group, parts):
        was = node.outputs[0]
        if was.dtype is not None:  # shapes are known in the pipeline (canonicalize inferred them)
            part.shape, part.dtype = was.shape, was.dtype
        ir.convenience.replace_all_uses_with(was, part)
        weight = node.inputs[1]
        b.graph.remove(node, safe=True)  # now, not at cleanup: quantization must not see the old MatMuls
        b.graph.initializers.pop(weight.name)


def _feed_packed(b, attention: ir.Node) -> bool:
    """Give a GroupQueryAttention the one tensor its query, key and value were split from (on the
    last axis, in that order, each part used only by it; a constant bias added to each part is
    added to the whole instead) as its packed query. False, graph unchanged, where they were not."""
    parts, biases, adds = [], [], []
    for value in attention.inputs[:3]:
        add = value.producer() if value is not None else None
        bias = add.inputs[1] if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") else None
        if bias is not None and bias.const_value is not None and len(bias.const_value.shape) == 1 \
                and len(_data_uses(value)) == 1:
            parts.append(add.inputs[0])
            biases.append(bias.const_value.numpy())
            adds.append(add)
        else:
            parts.append(value)
            biases.append(None)
    split = parts[0].producer() if parts[0] is not None else None
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") \
            or list(split.outputs) != parts or not all(_read_by(v, attention, split, bias is None)
                                                        for v, bias in zip(parts, biases)):
        return False
    whole = split.inputs[0]
    sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
    heads, kv_heads = (attention.attributes.get_int(a, 0) for a in ("num_heads", "kv_num_heads"))
    widths = [v.shape[-1] if v.shape is not None and len(v.shape) == 3 else None for v in parts]
    sizes = [int(x) for x in sizes.numpy()] if sizes is not None else widths if all(
        isinstance(w, int) for w in widths) else None  # an even Split: the parts' widths
    if parts[0].shape is None or len(parts[0].shape) != 3 or split.attributes.get_int("axis", 0) not in (-1, 2) \
            or sizes is None or not heads or sizes[0] % heads \
            or sizes != [sizes[0], sizes[0] // heads * kv_heads, sizes[0] // heads * kv_heads]:
        return False
    if any(bias is not None for bias in biases):
        dtype = next(bias for bias in biases if bias is not None).dtype
        whole = b.op("Add", [whole, b.const(np.concatenate(
            [bias if bias is not None else np.zeros(size, dtype) for bias, size in zip(biases, sizes)]))])
        b.insert_before(attention)
    for i, value in enumerate((whole, None, None)):
        attention.replace_input_with(i, value)
    for value in [*parts, *(add.outputs[0] for add in adds)]:  # a read of [B, S] reads the packed tensor's
        for use in list(value.uses()):
            if use not in _data_uses(value):
                use.node.replace_input_with(use.idx, whole)
    if all(use.node in adds for value in parts for use in value.uses()):  # else read in an If branch beside it
        b.graph.remove([*adds, split], safe=True)
    return True


def _read_by(value: ir.Value, attention: ir.Node, split: ir.Node, alone: bool) -> bool:
    """Whether the attention is the one data reader of `value` (a part of the Split, or its
    bias Add's output), besides, when `alone`, readers in If branches beside both (a block-sparse
    prompt's branch computes its own attention from the same projections)."""
    others = [u.node for u in _data_uses(value) if u.node is not attention]
    if not alone or len(others) == len(_data_uses(value)):
        return len(_data_uses(value)) == 1
    return all(node.graph not in (attention.graph, split.graph) for node in others)


def _data_uses(value: ir.Value) -> list:
    """The uses of `value` other than reads of its batch and token axes (Shape with end <= 2),
    which the packed tensor answers the same."""
    return [u for u in value.uses() if not (u.node.op_type == "Shape" and u.node.domain in ("", "ai.onnx")
                                            and 0 < u.node.attributes.get_int("end", 99) <= 2)]
