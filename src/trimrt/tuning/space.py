"""The recipes `trimrt tune` tries on a model, from its analysed structure.

Every candidate runs ONNX Runtime fusion (never slower on the models measured here).
Encoders: token pruning (EViT's CLS attention, after one block three quarters in, the last
half or every quarter of the blocks, keep 0.9 … 0.5; DivPrune and Zero-TPrune on the same
schedules, from the strongest keep EViT met the budget at); ToMe merging (CLS-pooled models: a
quarter, a half and three quarters of the tokens merged over the blocks); Mixture-of-Depths
routing (the training-free attention router, the late half's blocks at 0.75 and 0.5);
block-sparse attention where the evaluation samples are long (8 attention blocks of 128
tokens or more: every block at a half, a quarter and an eighth of the key blocks,
rectified); INT8 (round-to-nearest; SmoothQuant with the user's calibration data; with the
cosine metric, a method that misses the budget is retried with the fidelity guard, which
keeps the most sensitive layers float); each reduction alone and with each INT8 method.
KV-cache decoders: the weight formats and methods (INT8 W8A8 RTN / SmoothQuant / GPTQ; INT4
weight-only RTN at two group sizes, AWQ, GPTQ), since token reduction of a decoder depends
on the prompt's layout (FastV's image span, p-MoD's routed span), which tune does not know.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import TuneError

KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)
#: the other pruning methods, tried on an EViT schedule around the strongest keep it met the
#: budget at (their speed is EViT's at equal keep; their fidelity may be higher: docs/results.md)
OTHER_PRUNING = (("divprune", "DivPrune"), ("zero_tprune", "Zero-TPrune"))
#: Mixture-of-Depths: the shares of the tokens a routed block runs on
MOD_RATIOS = (0.75, 0.5)
#: block-sparse attention: the tokens of a block, the fewest blocks worth it, and the shares of
#: the key blocks each query block attends
SPARSE_BLOCK, SPARSE_MIN_BLOCKS, SPARSE_DENSITIES = 128, 8, (0.5, 0.25, 0.125)
FUSE = {"onnxruntime": {"fuse": True}}


#: what a candidate does, for the search's order and cuts
BASE, QUANTIZATION, REDUCTION, COMBINED = "base", "quantization", "reduction", "combined"


@dataclass(frozen=True)
class Candidate:
    """One recipe to try: a short name for tables, the recipe (a dict of TOML tables), its
    kind, and for a reduction its family: the candidates of one family are listed from the
    lightest to the strongest, and the search stops a family at its first miss."""

    name: str
    recipe: dict
    kind: str = BASE
    family: str = ""
    #: a guarded quantization: tried only when this plain one missed the budget
    fallback_for: str = ""
    #: another pruning method on the schedule of this EViT family: tried from the strongest
    #: keep that family met the budget at
    refines: str = ""

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


def candidates(structure: dict, calibration: dict | None, sequence: int | None = None,
               guard: float | None = None) -> list[Candidate]:
    """The candidate recipes for a model of `structure` (the compiler's analysis); with
    `calibration` (a [calibration] table of the user's data) the calibrated methods too;
    `sequence`: the tokens of an evaluation sample (long ones get sparse attention); `guard`
    (with calibration): each INT8 method also with the fidelity guard at this output cosine,
    the fallback when the method alone misses the budget."""
    if structure.get("decoder"):
        return decoder_candidates(calibration)
    blocks, tokens = int(structure.get("blocks") or 0), structure.get("tokens")
    if blocks < 2:
        raise TuneError(f"the model has {blocks} transformer block(s) found; tune needs an encoder of 2 or more")
    int8 = [("INT8 RTN", {"quantization": {"method": "rtn"}})]
    if calibration:
        int8.append(("INT8 SmoothQuant", {"quantization": {"method": "smoothquant"}, "calibration": calibration}))
    guarded = [(f"{name} guarded {guard}", name, {"quantization": {**q["quantization"], "min_cosine": guard},
                                                   "calibration": calibration})
               for name, q in int8] if guard is not None and calibration else []
    reductions: list[tuple[str, str, dict]] = []
    refinements: list[tuple[str, str, dict, str]] = []
    for label, layers in schedules(blocks).items():
        where = f"{label} {'+'.join(map(str, layers))}"
        for method, title in (("cls_attention", "EViT"), *OTHER_PRUNING):
            for keep in KEEPS:
                recipe = {"token_pruning": {"method": method, "layers": layers, "keep": keep, "protect": "cls",
                                            "fuse_pruned": True}}
                if method == "cls_attention":
                    reductions.append((f"EViT {where} keep {keep}", f"EViT {where}", recipe))
                else:
                    refinements.append((f"{title} {where} keep {keep}", f"{title} {where}", recipe, f"EViT {where}"))
    # Mixture-of-Depths with the training-free router: the late half's blocks run on a share
    # of the tokens, the others skip them (on MiniLM it lost to pruning at every FLOPs budget,
    # docs/results.md; the family costs one compile when its lightest setting misses)
    late = schedules(blocks).get("late") or schedules(blocks)["last"]
    for ratio in MOD_RATIOS:
        ratios = [ratio if block in late else 1.0 for block in range(blocks)]
        reductions.append((f"MoD {'+'.join(map(str, late))} ratio {ratio}", "MoD",
                           {"mixture_of_depths": {"router": "attention", "ratios": ratios, "protect": "cls"}}))
    if structure.get("pooling") == "cls" and isinstance(tokens, int) and tokens > blocks:
        for share in (0.25, 0.5, 0.75):
            r = max(1, int(share * tokens / blocks))
            reductions.append((f"ToMe r {r}", "ToMe", {"token_merging": {"r": r, "protect": "cls"}}))
    key_blocks = -(-(sequence or 0) // SPARSE_BLOCK)
    if key_blocks >= SPARSE_MIN_BLOCKS:
        # at least the sink, the diagonal and one chosen block; each top_k once
        for top_k in dict.fromkeys(max(3, round(d * key_blocks)) for d in SPARSE_DENSITIES):
            reductions.append((f"sparse attention {top_k}/{key_blocks} blocks", "sparse attention",
                               {"sparse_attention": {"top_k": top_k, "block_size": SPARSE_BLOCK}}))
    out = [Candidate("fusion only", dict(FUSE))]
    out += [Candidate(name, {**FUSE, **q}, QUANTIZATION) for name, q in int8]
    out += [Candidate(name, {**FUSE, **q}, QUANTIZATION, fallback_for=plain) for name, plain, q in guarded]
    out += [Candidate(name, {**FUSE, **r}, REDUCTION, family) for name, family, r in reductions]
    out += [Candidate(name, {**FUSE, **r}, REDUCTION, family, refines=base) for name, family, r, base in refinements]
    out += [Candidate(f"{name} + {qname}", {**FUSE, **r, **q}, COMBINED)
            for name, _, r, *_ in [*reductions, *refinements] for qname, q in [*int8, *((n, q) for n, _, q in guarded)]]
    return out


def decoder_candidates(calibration: dict | None) -> list[Candidate]:
    """A KV-cache decoder's candidates: fusion, and each weight format and method."""
    methods = [("INT8 RTN", {"method": "rtn"}), ("INT4 RTN g128", {"weights": "int4", "method": "rtn"}),
               ("INT4 RTN g32", {"weights": "int4", "method": "rtn", "group_size": 32})]
    if calibration:
        methods += [("INT8 SmoothQuant", {"method": "smoothquant"}), ("INT8 GPTQ", {"method": "gptq"}),
                    ("INT4 AWQ g128", {"weights": "int4", "method": "awq"}),
                    ("INT4 GPTQ g128", {"weights": "int4", "method": "gptq"})]
    out = [Candidate("fusion only", dict(FUSE))]
    for name, quantization in methods:
        recipe = {**FUSE, "quantization": quantization}
        if quantization["method"] != "rtn":
            recipe["calibration"] = calibration
        out.append(Candidate(name, recipe, QUANTIZATION))
    return out
