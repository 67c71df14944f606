"""Custom ops of the `trimrt` domain: one module per op (see base.py for the contract).

Every module here that defines `OP = OpDef(...)` is an op; REGISTRY maps op names to
them, so adding an op is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import DOMAIN, OP_VERSION, OpDef

#: modules of this package that are not ops
_NOT_OPS = {"base", "tensorrt_glue", "kernels"}


def _discover() -> dict[str, OpDef]:
    ops = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_OPS or info.name.startswith("_"):
            continue
        op = getattr(importlib.import_module(f"{__name__}.{info.name}"), "OP", None)
        if isinstance(op, OpDef):
            ops[op.name] = op
    return ops


REGISTRY: dict[str, OpDef] = _discover()
ATTENTION_ROW_SCORE = REGISTRY["AttentionRowScore"]
TOKEN_PRUNE = REGISTRY["TokenPrune"]

__all__ = ["DOMAIN", "OP_VERSION", "OpDef", "REGISTRY", "ATTENTION_ROW_SCORE", "TOKEN_PRUNE"]
