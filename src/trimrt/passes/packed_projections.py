"""Projections of one input packed into one MatMul (decoder builds on ONNX Runtime).

A decoder layer multiplies the same normalised hidden state by the query, key and value
weights (and by the gate and up weights of its MLP): at a decode step each is a matrix-
vector product of its own, a kernel call that streams its weights and, in INT4 builds,
quantizes the same activation again. Packed, the layer makes one call on the weights
side by side ([K, Nq + Nk + Nv]) and splits the result: the same products, fewer calls,
one activation quantization (ONNX Runtime GenAI's builder packs Q/K/V the same way).
Runs before quantization, which then quantizes the packed weights (per output column,
as before; AWQ / GPTQ see one layer with the inputs the three shared).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from .base import TrimrtPass


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
        self.record({"packed_groups": len(packed), "matmuls_packed": sum(map(len, packed))})
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
