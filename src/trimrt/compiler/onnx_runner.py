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
    if replace:
        _keep_only_what_outputs_need(graph)
    return copy


def _keep_only_what_outputs_need(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers no output of `graph` depends on (the inputs stay: the
    callers feed them all)."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed, names = set(), [o.name for o in graph.output]
    while names:
        i = producer.get(names.pop())
        if i is not None and i not in needed:
            needed.add(i)
            names.extend(_reads(graph.node[i]))
    nodes = [graph.node[i] for i in sorted(needed)]
    # (an initializer named as an input is its default: without it the input would be required)
    read = {name for node in nodes for name in _reads(node)} | {x.name for x in [*graph.output, *graph.input]}
    initializers = [t for t in graph.initializer if t.name in read]
    kept_nodes, kept_initializers = [onnx.NodeProto() for _ in nodes], [onnx.TensorProto() for _ in initializers]
    for new, old in [*zip(kept_nodes, nodes), *zip(kept_initializers, initializers)]:
        new.CopyFrom(old)
    del graph.node[:], graph.initializer[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(kept_initializers)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The names `node` reads: its inputs, and those its subgraphs (If / Loop / Scan bodies)
    read (their own values included: a superset is harmless)."""
    names = [x for x in node.input if x]
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            names += [x for inner in body.node for x in _reads(inner)]
    return names


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
