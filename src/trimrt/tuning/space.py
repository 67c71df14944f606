"""The recipes `trimrt tune` tries on a model, from its analysed structure.

Every candidate runs ONNX Runtime fusion (never slower on the models measured here). The
axes: token pruning (EViT's CLS attention, after one block three quarters in, the last half
or every quarter of the blocks, keep 0.9 … 0.5), ToMe merging (CLS-pooled models: a quarter, a half and three quarters of the
tokens merged over the blocks), and INT8 (round-to-nearest; SmoothQuant with the user's
calibration data), each alone and pruning × INT8. Decoders are not searched yet.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import TuneError

KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)
FUSE = {"onnxruntime": {"fuse": True}}


@dataclass(frozen=True)
class Candidate:
    """One recipe to try: a short name for tables, and the recipe (a dict of TOML tables)."""

    name: str
    recipe: dict

    @property
    def key(self) -> str:
        """A stable id of the recipe (its folder and its entry in the saved state)."""
        return hashlib.sha256(json.dumps(self.recipe, sort_keys=True).encode()).hexdigest()[:12]


def schedules(blocks: int) -> dict[str, list[int]]:
    """Blocks after which tokens are pruned: last (one, three quarters in: the lightest),
    late (the last half) and even (quarters); duplicates dropped."""
    out: dict[str, list[int]] = {}
    for label, layers in [("last", [(3 * blocks) // 4]), ("late", [blocks // 2, (3 * blocks) // 4]),
                          ("even", [blocks // 4, blocks // 2, (3 * blocks) // 4])]:
        layers = sorted(set(layers) - {0})
        if layers and layers not in out.values():
            out[label] = layers
    return out


def candidates(structure: dict, calibration: dict | None) -> list[Candidate]:
    """The candidate recipes for a model of `structure` (the compiler's analysis); with
    `calibration` (a [calibration] table of the user's data) SmoothQuant is tried too."""
    if structure.get("decoder"):
        raise TuneError("tune searches encoders (ViTs, BERT-like models) for now; tune a decoder's recipe by hand")
    blocks, tokens = int(structure.get("blocks") or 0), structure.get("tokens")
    if blocks < 2:
        raise TuneError(f"the model has {blocks} transformer block(s) found; tune needs an encoder of 2 or more")
    int8 = [("INT8 RTN", {"quantization": {"method": "rtn"}})]
    if calibration:
        int8.append(("INT8 SmoothQuant", {"quantization": {"method": "smoothquant"}, "calibration": calibration}))
    reductions: list[tuple[str, dict]] = []
    for label, layers in schedules(blocks).items():
        for keep in KEEPS:
            reductions.append((f"EViT {label} {'+'.join(map(str, layers))} keep {keep}",
                               {"token_pruning": {"method": "cls_attention", "layers": layers, "keep": keep,
                                                  "protect": "cls", "fuse_pruned": True}}))
    if structure.get("pooling") == "cls" and isinstance(tokens, int) and tokens > blocks:
        for share in (0.25, 0.5, 0.75):
            r = max(1, int(share * tokens / blocks))
            reductions.append((f"ToMe r {r}", {"token_merging": {"r": r, "protect": "cls"}}))
    out = [Candidate("fusion only", dict(FUSE))]
    out += [Candidate(name, {**FUSE, **q}) for name, q in int8]
    out += [Candidate(name, {**FUSE, **r}) for name, r in reductions]
    out += [Candidate(f"{name} + {qname}", {**FUSE, **r, **q}) for name, r in reductions for qname, q in int8]
    return out
