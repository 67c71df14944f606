"""What every trimrt pass shares: its report, the compile's shared context, and the one
way passes build graph pieces (`GraphBuilder`, on onnx-ir's `tape.Tape`).

A pass keeps no per-call state on `self`: it takes its options at construction, reads
what earlier passes found from the `PipelineContext` (the model's structure, analysed
once per compile) and records what it did as a `PassReport` in that context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from ..plugins import DOMAIN

#: metadata key on every inserted node, naming the pass that made it (visible in Netron)
PASS_TAG = "trimrt.pass"


@dataclass
class PassReport:
    """What one pass did. `details` is JSON-serialisable (it goes into the manifest);
    `changes_results` says whether this run changed the model's outputs beyond float
    rounding (tokens dropped or merged, weights quantized)."""

    name: str
    details: dict[str, Any] = field(default_factory=dict)
    changes_results: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry: {"pass": name, "report": details, "changes_results": bool}."""
        return {"pass": self.name, "report": self.details, "changes_results": self.changes_results}


@dataclass
class PipelineContext:
    """State shared by the passes of one compile: the reports so far, and values
    computed once and read by several passes (e.g. the model's transformer structure)."""

    reports: list[PassReport] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)

    def report_of(self, name: str) -> PassReport | None:
        """The last report of the pass called `name` (None if it did not run)."""
        return next((r for r in reversed(self.reports) if r.name == name), None)


class TrimrtPass(ir.passes.InPlacePass):
    """An in-place onnx_ir pass of trimrt.

    Class attributes: `name` (the pass in reports, tags and progress), `exact` (True:
    the pass never changes results beyond float rounding; False: it may, and its report
    says whether this run did) and `recipe_table` (the recipe table that adds the pass;
    None for the passes every pipeline runs)."""

    name: ClassVar[str] = "trimrt"
    exact: ClassVar[bool] = True
    recipe_table: ClassVar[str | None] = None

    def __init__(self, context: PipelineContext | None = None) -> None:
        super().__init__()
        self.context = context if context is not None else PipelineContext()

    def record(self, details: dict[str, Any], *, changes_results: bool = False) -> PassReport:
        """Record this run's report in the context."""
        if changes_results and self.exact:
            raise AssertionError(f"pass {self.name} is declared exact but reports changed results")
        report = PassReport(self.name, details, changes_results)
        self.context.reports.append(report)
        return report

    @property
    def report(self) -> dict[str, Any]:
        """The details of this pass's last report in its context ({} before it ran)."""
        found = self.context.report_of(self.name)
        return found.details if found is not None else {}

    # transitional helper (to be replaced by GraphBuilder in every pass)
    def tagged(self, node: ir.Node) -> ir.Node:
        node.metadata_props[PASS_TAG] = self.name
        for i, out in enumerate(node.outputs):
            if not out.name:
                out.name = f"{node.name}_out{i}" if node.name else None
        return node

    def builder(self, graph: ir.Graph, prefix: str = "") -> GraphBuilder:
        """A GraphBuilder whose nodes are tagged with this pass."""
        return GraphBuilder(graph, self.name, prefix)


class GraphBuilder(Tape):
    """onnx-ir's Tape for pass code: nodes are tagged with the pass (`PASS_TAG`) and
    named `<prefix>_<op>_<n>`, constants become initializers of the graph, and custom
    ops are emitted from their `OpDef` (never by op-name strings).

    The nodes are collected, not yet placed: the pass inserts `builder.nodes` where they
    belong (`insert_after`), or appends them (`append_to_graph`)."""

    def __init__(self, graph: ir.Graph, pass_name: str, prefix: str = "") -> None:
        super().__init__(None)
        self.graph = graph
        self.pass_name = pass_name
        self.prefix = prefix or pass_name
        self._count = 0

    def _fresh(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}_{what}_{self._count}"

    def _stamp(self, node: ir.Node) -> None:
        node.metadata_props[PASS_TAG] = self.pass_name
        for i, out in enumerate(node.outputs):
            if not out.name:
                out.name = f"{node.name}_out{i}" if len(node.outputs) > 1 else node.name

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None, *,
           domain: str = "", name: str | None = None, **kwargs) -> ir.Value:
        """One node with one output; returns the output."""
        value = super().op(op_type, inputs, attributes, domain=domain, name=name or self._fresh(op_type), **kwargs)
        self._stamp(value.producer())
        return value

    def op_multi_out(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict | None = None, *,
                     num_outputs: int | None = None, domain: str = "", name: str | None = None,
                     **kwargs) -> Sequence[ir.Value]:
        """One node with several outputs; returns them."""
        values = super().op_multi_out(op_type, inputs, attributes, num_outputs=num_outputs, domain=domain,
                                      name=name or self._fresh(op_type), **kwargs)
        self._stamp(values[0].producer())
        return values

    def emit(self, op, inputs: Sequence[ir.Value], *, name: str | None = None, **attributes) -> Sequence[ir.Value]:
        """A node of the trimrt op `op` (an OpDef): attributes are checked against its
        schema (defaults filled, unknown ones refused); returns all its outputs."""
        values = op.attribute_values(attributes)
        return self.op_multi_out(op.name, inputs, values, num_outputs=len(op.outputs), domain=DOMAIN,
                                 name=name or self._fresh(op.name))

    def const(self, array, name: str | None = None) -> ir.Value:
        """A constant (numpy array or scalar) as an initializer of the graph."""
        name = name or self._fresh("const")
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
        self.graph.register_initializer(value)
        return value

    def insert_before(self, anchor: ir.Node) -> None:
        """Place the collected nodes right before `anchor`."""
        self.graph.insert_before(anchor, self._nodes)
        self._nodes = []

    def discard(self) -> None:
        """Forget the collected nodes (built, then found not needed)."""
        self._nodes = []

    def insert_after(self, anchor: ir.Node | None) -> None:
        """Place the collected nodes right after `anchor` (at the start when None)."""
        if anchor is None:
            self.graph.insert_before(self.graph[0], self._nodes)
        else:
            self.graph.insert_after(anchor, self._nodes)
        self._nodes = []

    def append_to_graph(self) -> None:
        """Place the collected nodes at the end of the graph (passes sort topologically later)."""
        self.graph.extend(self._nodes)
        self._nodes = []
