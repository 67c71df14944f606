"""Shared pieces of trimrt passes: the report they keep and the tag on nodes they insert."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from ..plugins import DOMAIN

#: metadata key on every inserted node, naming the pass that made it (visible in Netron)
PASS_TAG = "trimrt.pass"


class TrimrtPass(ir.passes.InPlacePass):
    """An in-place onnx_ir pass with a name and a JSON-serialisable report."""

    name = "trimrt"

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] = {}

    def custom_node(self, op_type: str, inputs, attributes: dict, num_outputs: int, name: str) -> ir.Node:
        """A node of the trimrt domain, tagged with this pass."""
        node = ir.node(op_type, inputs, attributes, domain=DOMAIN, num_outputs=num_outputs, name=name)
        return self.tagged(node)

    def std_node(self, op_type: str, inputs, attributes: dict | None = None, name: str = "") -> ir.Node:
        node = ir.node(op_type, inputs, attributes or {}, name=name)
        return self.tagged(node)

    def tagged(self, node: ir.Node) -> ir.Node:
        node.metadata_props[PASS_TAG] = self.name
        for i, out in enumerate(node.outputs):
            if not out.name:
                out.name = f"{node.name}_out{i}" if node.name else None
        return node
