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
from ..errors import StructureError
from .base import TrimrtPass
from .token_shapes import ORIGINAL_COUNT_MARK


class TrimPaddingPass(TrimrtPass):
    name = "trim_padding"
    recipe_table = "padding"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        masks = [v for v in graph.inputs if "mask" in (v.name or "").lower() and v.shape is not None and len(v.shape) == 2]
        mask = next((v for v in masks if not isinstance(v.shape[1], int)), None)
        fixed = next((v for v in masks if isinstance(v.shape[1], int)), None)
        if mask is None and fixed is not None:
            raise StructureError(f"trim_padding needs a dynamic token axis, but this export fixes {fixed.name!r} at "
                                 f"{fixed.shape[1]} tokens; export with a dynamic sequence axis, or leave [padding] out")
        if mask is None:
            raise StructureError("trim_padding needs a dynamic-length attention mask input [batch, tokens] (named '*mask*'); "
                                 f"the model's inputs are {[v.name for v in graph.inputs]}")
        shapes = probe_shapes(model, self.context.shared)
        token_inputs = [v for v in graph.inputs if len(shapes.get(v.name, ())) >= 2 and shapes[v.name][1] == PROBE_TOKENS]
        token_outputs = [v for v in graph.outputs if len(shapes.get(v.name, ())) >= 2 and shapes[v.name][1] == PROBE_TOKENS]
        b = self.builder(graph, "trimrt_trim")

        def const(name, vals):
            return b.const(np.array(vals, dtype=np.int64), name=name)

        uses_of = {v: list(v.uses()) for v in token_inputs}  # before adding the length computation

        # L = max over the batch of the number of real tokens, as a 1-element int64 tensor
        real = b.op("Cast", [mask], {"to": ir.DataType.INT64}, name="trimrt_trim_real")
        lengths = b.op("ReduceSum", [real, const("trimrt_trim_ax1", [1])], {"keepdims": 0}, name="trimrt_trim_lengths")
        longest = b.op("ReduceMax", [lengths, const("trimrt_trim_ax0", [0])], {"keepdims": 1}, name="trimrt_trim_longest")
        length = b.op("Max", [longest, const("trimrt_trim_one", [1])], name="trimrt_trim_len")
        for value in token_inputs:
            sliced = b.op("Slice", [value, const(f"trimrt_trim_start_{value.name}", [0]), length,
                                    const(f"trimrt_trim_axis_{value.name}", [1])], name=f"trimrt_trim_{value.name}")
            for user, i in uses_of[value]:
                user.replace_input_with(i, sliced)
        # the original length, for padding token outputs back
        full = b.op("Shape", [mask], {"start": 1, "end": 2}, name="trimrt_trim_full")
        missing = b.op("Sub", [full, length], name="trimrt_trim_missing")
        for value in (full, missing):  # token pruning must not re-derive this from the pruned count
            value.producer().metadata_props[ORIGINAL_COUNT_MARK] = "1"
        padded_names = []
        for i, out in enumerate(list(graph.outputs)):
            if out not in token_outputs:
                continue
            padded_names.append(out.name)
            rank = len(shapes[out.name])
            before = const(f"trimrt_trim_pad_pre_{i}", [0] * (rank + 1))
            after = const(f"trimrt_trim_pad_post_{i}", [0] * (rank - 2))
            pads = b.op("Concat", [before, missing, after], {"axis": 0}, name=f"trimrt_trim_pads_{i}")
            padded = ir.Value(name=out.name, type=out.type, shape=out.shape)
            # `out` stays the producer's output; the graph output becomes the padded copy
            out.name, out.shape = f"{out.name}_trimmed", None
            graph.outputs[i] = b.op("Pad", [out, pads], {"mode": "constant"}, output=padded, name=f"trimrt_trim_pad_{i}")
        b.append_to_graph()
        self.record({"mask": mask.name, "inputs_trimmed": [v.name for v in token_inputs],
                     "outputs_padded": padded_names})
        return ir.passes.PassResult(model, modified=True)
