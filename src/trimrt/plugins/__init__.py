"""Custom ops of the `trimrt` domain: one module per op (see base.py for the contract).

Every module here that defines an OpDef `OP` is an op; REGISTRY maps op names to them,
so adding an op is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil

import onnx_ir as ir

from .base import DOMAIN, OP_VERSION, OpDef


def _discover() -> dict[str, OpDef]:
    ops = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        op = getattr(importlib.import_module(f"{__name__}.{info.name}"), "OP", None)
        if isinstance(op, OpDef):
            ops[op.name] = op
    return ops


REGISTRY: dict[str, OpDef] = _discover()


def attach_decompositions(model) -> list[str]:
    """Attach to an onnx_ir model, for every trimrt op it uses, its decomposition as a
    model-local function (so ONNX Runtime can run it); return the ops' names."""
    used = sorted({n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN})
    opset = model.opset_imports.get("", 18)
    for op_type in used:
        proto = REGISTRY[op_type].function()
        # the bodies use ops unchanged from opset 18 on: declare the model's own opset
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = max(imp.version, opset)
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[DOMAIN] = OP_VERSION
    return used


def runnable_proto(model):
    """A ModelProto of an onnx_ir model (or of a ModelProto: a copy) with every trimrt op's
    decomposition attached, for passes that run the graph on ONNX Runtime mid-pipeline.
    An onnx_ir model given is changed (its functions attached)."""
    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)
    attach_decompositions(model)
    return ir.serde.serialize_model(model)
ATTENTION_ROW_SCORE = REGISTRY["AttentionRowScore"]
TOKEN_PRUNE = REGISTRY["TokenPrune"]

__all__ = ["attach_decompositions", "runnable_proto", "DOMAIN", "OP_VERSION", "OpDef", "REGISTRY", "ATTENTION_ROW_SCORE", "TOKEN_PRUNE"]
