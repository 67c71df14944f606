"""Trim trailing padding before the first block, pad the token outputs back afterwards.

A batch of short sentences padded to a fixed length spends most of its compute on
padding. At run time the pass computes L = the longest real length in the batch (from
the attention mask), slices every token-aligned input to its first L tokens, and pads
token-level outputs back to the input length with zeros, so the build's interface is
unchanged. Right padding only (what encoders use): real tokens must come first.
Exact: padded keys are masked in every attention, so real tokens never see them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.probe import PROBE_TOKENS, probe_shapes
from .token_shapes import ORIGINAL_COUNT_MARK
from ..errors import StructureError
from .base import TrimrtPass


class TrimPaddingPass(TrimrtPass):
    name = "trim_padding"
    recipe_table = "padding"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        mask = next((v for v in graph.inputs if "mask" in (v.name or "").lower() and v.shape is not None
                     and len(v.shape) == 2 and not isinstance(v.shape[1], int)), None)
        fixed = next((v for v in graph.inputs if "mask" in (v.name or "").lower() and v.shape is not None
                      and len(v.shape) == 2 and isinstance(v.shape[1], int)), None)
        if mask is None and fixed is not None:
            raise StructureError(f"trim_padding needs a dynamic token axis, but this export fixes {fixed.name!r} at "
                                 f"{fixed.shape[1]} tokens; export with a dynamic sequence axis, or leave [padding] out")
        if mask is None:
            raise StructureError("trim_padding needs a dynamic-length attention mask input [batch, tokens] (named '*mask*'); "
                                 f"the model's inputs are {[v.name for v in graph.inputs]}")
        shapes = probe_shapes(model)
        token_inputs = [v for v in graph.inputs if len(shapes.get(v.name, ())) >= 2 and shapes[v.name][1] == PROBE_TOKENS]
        token_outputs = [v for v in graph.outputs if len(shapes.get(v.name, ())) >= 2 and shapes[v.name][1] == PROBE_TOKENS]
        nodes: list[ir.Node] = []
        const = lambda name, vals: self._const(graph, name, vals)  # noqa: E731
        uses_of = {v: list(v.uses()) for v in token_inputs}  # before adding the length computation

        # L = max over the batch of the number of real tokens, as a 1-element int64 tensor
        real = self.std_node("Cast", [mask], {"to": ir.DataType.INT64}, name="trimrt_trim_real")
        lengths = self.std_node("ReduceSum", [real.outputs[0], const("trimrt_trim_ax1", [1])], {"keepdims": 0},
                                name="trimrt_trim_lengths")
        longest = self.std_node("ReduceMax", [lengths.outputs[0], const("trimrt_trim_ax0", [0])], {"keepdims": 1},
                                name="trimrt_trim_longest")
        at_least_one = self.std_node("Max", [longest.outputs[0], const("trimrt_trim_one", [1])], {}, name="trimrt_trim_len")
        length = at_least_one.outputs[0]
        nodes += [real, lengths, longest, at_least_one]
        for value in token_inputs:
            uses = uses_of[value]
            sliced = self.std_node("Slice", [value, const(f"trimrt_trim_start_{value.name}", [0]), length,
                                             const(f"trimrt_trim_axis_{value.name}", [1])], name=f"trimrt_trim_{value.name}")
            nodes.append(sliced)
            for user, i in uses:
                user.replace_input_with(i, sliced.outputs[0])
        # the original length, for padding token outputs back
        full = self.std_node("Shape", [mask], {"start": 1, "end": 2}, name="trimrt_trim_full")
        missing = self.std_node("Sub", [full.outputs[0], length], name="trimrt_trim_missing")
        for node in (full, missing):  # token pruning must not re-derive this from the pruned count
            node.metadata_props[ORIGINAL_COUNT_MARK] = "1"
        nodes += [full, missing]
        graph.extend(nodes)
        padded_names = []
        for i, out in enumerate(list(graph.outputs)):
            if out not in token_outputs:
                continue
            padded_names.append(out.name)
            rank = len(shapes[out.name])
            before = const(f"trimrt_trim_pad_pre_{i}", [0] * (rank + 1))
            after = const(f"trimrt_trim_pad_post_{i}", [0] * (rank - 2))
            pads = self.std_node("Concat", [before, missing.outputs[0], after], {"axis": 0}, name=f"trimrt_trim_pads_{i}")
            name, out_type, out_shape = out.name, out.type, out.shape
            out.name = f"{name}_trimmed"  # stays the producer's output; the graph output becomes the padded copy
            out.shape = None
            padded = self.std_node("Pad", [out, pads.outputs[0]], {"mode": "constant"}, name=f"trimrt_trim_pad_{i}")
            padded.outputs[0].name = name
            padded.outputs[0].type, padded.outputs[0].shape = out_type, out_shape
            graph.outputs[i] = padded.outputs[0]
            graph.extend([pads, padded])
        self.record({"mask": mask.name, "inputs_trimmed": [v.name for v in token_inputs],
                     "outputs_padded": padded_names})
        return ir.passes.PassResult(model, modified=True)

    def _const(self, graph: ir.Graph, name: str, vals) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(np.array(vals, dtype=np.int64), name=name))
        graph.register_initializer(value)
        return value
