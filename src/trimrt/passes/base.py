"""What every trimrt pass shares: its report, the compile's shared context, and the one
way passes build graph pieces (`GraphBuilder`: trimrt's one graph builder, on onnx-ir's
`tape.Tape`, with the pass's tag, naming, initializers and placement).

A pass keeps no per-call state on `self`: it takes its options at construction, reads
what earlier passes found from the `PipelineContext` (the model's structure, analysed
once per compile) and records what it did as a `PassReport` in that context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from ..plugins.builder import PASS_TAG, Builder  # noqa: F401 - PASS_TAG re-exported


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

    def builder(self, graph: ir.Graph, prefix: str = "") -> GraphBuilder:
        """A GraphBuilder whose nodes are tagged with this pass."""
        return GraphBuilder(graph, self.name, prefix)


class GraphBuilder(Builder):
    """The graph builder (`plugins.builder.Builder`) for pass code: nodes are tagged with
    the pass (`PASS_TAG`) and named `<prefix>_<op>_<n>`, constants become initializers of
    the graph, and custom ops are emitted from their `OpDef` (never by op-name strings).

    The nodes are collected, not yet placed: the pass inserts `builder.nodes` where they
    belong (`insert_after`, `insert_before`), or appends them (`append_to_graph`)."""

    def __init__(self, graph: ir.Graph, pass_name: str, prefix: str = "") -> None:
        super().__init__(prefix=prefix or pass_name, tag=pass_name, graph=graph)
        self.pass_name = pass_name

    def const(self, array, name: str | None = None) -> ir.Value:
        """A constant (numpy array or scalar) as an initializer of the graph."""
        return super().const(array, None, name=name)

    def insert_before(self, anchor: ir.Node) -> None:
        """Place the collected nodes right before `anchor` (in its graph: an If branch's too)."""
        anchor.graph.insert_before(anchor, self._nodes)
        self._nodes = []

    def insert_after(self, anchor: ir.Node | None) -> None:
        """Place the collected nodes right after `anchor` (at the start when None)."""
        if anchor is None:
            self.graph.insert_before(self.graph[0], self._nodes)
        else:
            anchor.graph.insert_after(anchor, self._nodes)
        self._nodes = []

    def append_to_graph(self) -> None:
        """Place the collected nodes at the end of the graph (passes sort topologically later)."""
        self.graph.extend(self._nodes)
        self._nodes = []
