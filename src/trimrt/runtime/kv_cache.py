"""What a decoder build with a KV cache looks like from outside: its input/output names
(those of ONNX Runtime GenAI, so the graph also runs under other ONNX LLM runtimes) and
the facts the generation loop needs, recorded in the manifest as "decoder".

    input_ids [B, q] | inputs_embeds [B, q, hidden], attention_mask [B, past + q],
    position_ids [B, q], past_key_values.N.key|value [B, kv_heads, past, head_dim],
    attention_bias [B|1, 1, q, past + q] (optional: additive, e.g. a tree mask)
    -> logits [B, q, vocab], present.N.key|value [B, kv_heads, past + q, head_dim]

One graph serves prefill (past length 0) and decode (any past length, any q).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import BuildLoadError

INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
#: optional additive mask over [query, past + query] on top of the causal one; defaults to 0
ATTENTION_BIAS = "attention_bias"
LOGITS = "logits"
KINDS = ("key", "value")
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_layers(input_names) -> int:
    """How many layers' past key/value inputs `input_names` holds (0: not a KV-cache graph)."""
    found = {m.groups() for m in map(_PAST.match, input_names) if m}
    layers = {int(layer) for layer, _ in found}
    return len(layers) if found == {(str(i), k) for i in layers for k in KINDS} and layers == set(range(len(layers))) else 0


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder build's cache geometry and special tokens (manifest "decoder")."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    #: the graph's token input: input_ids, or inputs_embeds (multimodal front ends)
    token_input: str = INPUT_IDS
    #: position table size; None when positions are not bounded by a table (RoPE)
    max_positions: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    kv_dtype: str = "float32"
    #: the graph takes position_ids (ONNX Runtime GenAI's own exports derive them from the mask)
    position_input: bool = True
    #: the smallest attention window of any layer (None: every layer sees its whole past)
    sliding_window: int | None = None
    #: the build prunes prompt tokens at prefill (FastV, DivPrune): the reduced layers cache fewer
    #: tokens and attend without a padding mask, so a batch's prompts must have one length
    prunes_prompt: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_manifest(cls, manifest: dict, where: str) -> "DecoderSpec":
        entry = manifest.get("decoder")
        if not isinstance(entry, dict):
            raise BuildLoadError(f"{where} is not a decoder build (its manifest has no 'decoder' entry); "
                                 "compile a causal LM (e.g. a *ForCausalLM) to generate text")
        try:
            return cls(**{**entry, "eos_token_ids": tuple(entry.get("eos_token_ids") or ())})
        except TypeError as exc:
            raise BuildLoadError(f"{where}: the manifest's 'decoder' entry is malformed ({exc}); recompile the build") from None

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of context costs, all layers, keys and values (without pruning)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Past key/values of length 0: the feeds of a prefill step."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {past_name(i, k): np.zeros(shape, self.kv_dtype) for i in range(self.layers) for k in KINDS}

    def random_feeds(self, batch: int = 2, new: int = 5, past: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
        """Consistent random feeds of a decode step: `new` tokens on a random past of `past`
        (the last row left-padded by two when the past allows): what verify, bench and the
        compiler's checks run a decoder build on (generic random feeds would not agree on the
        past and mask lengths)."""
        rng = np.random.default_rng(seed)
        mask = np.ones((batch, past + new), np.int64)
        if batch > 1 and past >= 2:
            mask[-1, :2] = 0
        feeds = {
            self.token_input: rng.integers(0, min(self.vocab_size, 100), (batch, new)),
            ATTENTION_MASK: mask,
        }
        if self.position_input:
            feeds[POSITION_IDS] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past:]
        shape = (batch, self.kv_heads, past, self.head_dim)
        for i in range(self.layers):
            for kind in KINDS:
                feeds[past_name(i, kind)] = rng.standard_normal(shape).astype(self.kv_dtype)
        return feeds
