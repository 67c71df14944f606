"""Run an ONNX model on ONNX Runtime CPU with intermediate values exposed as outputs, on a
copy (the model given is never modified); docs/architecture.md lists its users.

Polygraphy's OnnxrtRunner was considered: its session loader does not take the
SessionOptions these callers set (log severity for candidate graphs that keep unused
float weights, the optimisation level that keeps exposed values intact), so this is a
thin subclass of the runtime's OnnxRuntimeBackend.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..runtime.backends import OnnxRuntimeBackend


def with_outputs(model: onnx.ModelProto, names: Sequence[str], *, replace: bool = False) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include `names` (node outputs or graph
    inputs); with `replace`, exactly `names`, and only the nodes and initializers they depend
    on (ONNX Runtime runs every node of a graph, used or not: a mask probed on a long prompt
    would otherwise run the whole model on it). Output types come from shape inference where
    it knows them (ONNX Runtime needs none)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    if replace:
        del graph.output[:]
    present = {o.name for o in graph.output}
    added = [n for n in dict.fromkeys(names) if n not in present]
    produced = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    missing = [n for n in added if n not in produced]
    if missing:
        raise ValueError(f"no node of the model produces {missing}")
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in added)
    if not replace:
        return copy
    pruned = ir.serde.deserialize_model(copy)
    RemoveUnusedNodesPass()(pruned)  # (an initializer named as an input, its default, stays)
    return ir.serde.serialize_model(pruned)


class OnnxRunner(OnnxRuntimeBackend):
    """An active OnnxRuntimeBackend (CPU, warnings silenced) on `model` with `expose` added
    as outputs (`replace`: only those). `optimize`: "disable" keeps every exposed value as
    the graph computes it; "basic" / "all" are ONNX Runtime's levels."""

    def __init__(self, model: onnx.ModelProto, expose: Sequence[str] = (), *, replace: bool = False,
                 optimize: str = "all") -> None:
        proto = with_outputs(model, expose, replace=replace) if (expose or replace) else model
        super().__init__(proto.SerializeToString(), optimization=optimize, memory_arena=False,
                         shapes_first=True)
        self.activate()

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The values of `names` (default: every output, exposed ones included)."""
        return self.infer(feeds, list(names) if names is not None else None)

    def run_all(self, feeds: Iterable[Mapping[str, np.ndarray]], names: Sequence[str] | None = None
                ) -> list[dict[str, np.ndarray]]:
        return [self.run(f, names) for f in feeds]
