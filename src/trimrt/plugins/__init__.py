"""Custom ops of the `trimrt` domain: one module per op (see base.py for the contract)."""

from __future__ import annotations

from .attention_row_score import OP as ATTENTION_ROW_SCORE
from .base import DOMAIN, OP_VERSION, OpDef
from .token_prune import OP as TOKEN_PRUNE

REGISTRY: dict[str, OpDef] = {op.name: op for op in (ATTENTION_ROW_SCORE, TOKEN_PRUNE)}

__all__ = ["DOMAIN", "OP_VERSION", "OpDef", "REGISTRY", "ATTENTION_ROW_SCORE", "TOKEN_PRUNE"]
