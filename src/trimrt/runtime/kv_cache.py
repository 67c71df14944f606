"""What a decoder build with a KV cache looks like from outside: its input/output names
(those of ONNX Runtime GenAI, so the graph also runs under other ONNX LLM runtimes) and
the facts the generation loop needs, recorded in the manifest as "decoder".

    input_ids [B, q] | inputs_embeds [B, q, hidden], attention_mask [B, past + q],
    position_ids [B, q], past_key_values.N.key|value [B, kv_heads, past, head_dim],
    attention_bias [B|1, 1, q, past + q] (optional: additive, e.g. a tree mask)
    -> logits [B, q, vocab], present.N.key|value [B, kv_heads, past + q, head_dim]

One graph serves prefill (past length 0) and decode (any past length, any q). A build whose
spec says `shared_buffer` also takes, as ONNX Runtime GenAI's past_present_share_buffer
does, a past buffer longer than the past (attention_mask still as wide as past + q) and
writes the new keys / values into it: bound as both past and present (KVCache), the cache
is never copied by a decode step.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Mapping

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


#: how the names of the present key / value outputs begin
PRESENT_PREFIX = "present."


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def is_past_name(name: str) -> bool:
    return _PAST.match(name) is not None


def _present_of(past: str) -> str:
    """The present output that continues a past input."""
    return present_name(*_PAST.match(past).groups())


def _layer_of(past: str) -> int:
    return int(_PAST.match(past).group(1))


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
    #: the graph's token input: input_ids, or inputs_embeds (multimodal front ends: the build's
    #: embedding model, EMBEDDING, embeds the prompt's text and each generated token)
    token_input: str = INPUT_IDS
    #: the width of inputs_embeds (None for input_ids builds)
    hidden_size: int | None = None
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
    #: some layers attend the prompt block-sparsely (BlockSparseAttention at prefill; a decode
    #: step attends its cache densely, as exported)
    sparse_prompt: bool = False
    #: the graph writes a step's keys / values into a past buffer bound as its present too
    #: (checked when compiled: `updates_in_place`)
    shared_buffer: bool = False
    #: per layer, the tokens its cache holds fewer than the mask once a prompt was pruned
    #: (empty: every layer holds them all)
    cache_tokens_removed: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["cache_tokens_removed"] = list(self.cache_tokens_removed)
        return out

    @classmethod
    def from_manifest(cls, manifest: dict, where: str) -> "DecoderSpec":
        entry = manifest.get("decoder")
        if not isinstance(entry, dict):
            raise BuildLoadError(f"{where} is not a decoder build (its manifest has no 'decoder' entry); "
                                 "compile a causal LM (e.g. a *ForCausalLM) to generate text")
        try:
            return cls(**{**entry, "eos_token_ids": tuple(entry.get("eos_token_ids") or ()),
                          "cache_tokens_removed": tuple(entry.get("cache_tokens_removed") or ())})
        except TypeError as exc:
            raise BuildLoadError(f"{where}: the manifest's 'decoder' entry is malformed ({exc}); recompile the build") from None

    @property
    def prompt_fed(self) -> bool:
        """The prompt runs with its (empty) past fed and returns its presents, which a shared
        cache buffer then holds (KVCache.load): a pruned or block-sparse prompt is computed
        apart from the in-place decode steps."""
        return self.prunes_prompt or self.sparse_prompt

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
        if self.token_input == INPUTS_EMBEDS:  # of the scale of trained embeddings
            tokens = (0.02 * rng.standard_normal((batch, new, self.hidden_size))).astype(np.float32)
        else:
            tokens = rng.integers(0, min(self.vocab_size, 100), (batch, new))
        feeds = {self.token_input: tokens, ATTENTION_MASK: mask}
        if self.position_input:
            feeds[POSITION_IDS] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past:]
        shape = (batch, self.kv_heads, past, self.head_dim)
        for i in range(self.layers):
            for kind in KINDS:
                feeds[past_name(i, kind)] = rng.standard_normal(shape).astype(self.kv_dtype)
        return feeds


class KVCache:
    """The past keys / values of a generation in buffers that a shared-buffer build (spec
    `shared_buffer`) reads as its past and writes as its present: a step adds its tokens in
    place. The buffers are a whole number of `chunk`s of tokens long and grow by chunks (the
    held tokens copied each time), never to the model's whole context up front: the
    Generator reserves what a generation asks for (prompt + max_new_tokens) when it starts."""

    def __init__(self, spec: DecoderSpec, batch: int, chunk: int = 256):
        self.spec, self.batch, self.chunk = spec, batch, chunk
        self.length = 0  # tokens held (the attention mask's width)
        self._arrays: dict[str, np.ndarray] = {}  # the buffers' memory (the OrtValues view it)
        self._values: dict[str, object] = {}
        #: what a backend keeps between steps while the buffers stay (Backend.infer_in_place)
        self.backend_state: dict = {}

    @property
    def capacity(self) -> int:
        return next(iter(self._arrays.values())).shape[2] if self._arrays else 0

    def held(self, layer: int) -> int:
        """Tokens layer `layer` holds (fewer than the mask's when the prompt was pruned)."""
        removed = self.spec.cache_tokens_removed
        return max(self.length - (removed[layer] if removed else 0), 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held (the buffers reserve up to a chunk more)."""
        per_layer = self.spec.kv_bytes_per_token // self.spec.layers
        if not self.spec.cache_tokens_removed:
            return self.batch * per_layer * self.spec.layers * self.length
        return self.batch * per_layer * sum(self.held(i) for i in range(self.spec.layers))

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens (the held ones kept)."""
        if total <= self.capacity:
            return
        import onnxruntime as ort

        spec, capacity = self.spec, math.ceil(total / self.chunk) * self.chunk
        for layer in range(spec.layers):
            for kind in KINDS:
                name = past_name(layer, kind)
                array = np.zeros((self.batch, spec.kv_heads, capacity, spec.head_dim), spec.kv_dtype)
                if self.length:
                    array[:, :, :self.held(layer)] = self._arrays[name][:, :, :self.held(layer)]
                self._arrays[name], self._values[name] = array, ort.OrtValue.ortvalue_from_numpy(array)
        self.backend_state = {}  # new buffers: bound anew

    def bindings(self, row: int | None = None) -> dict[str, tuple[str, object]]:
        """{past name: (present name, buffer)}: what Backend.infer_in_place binds; of one row of
        the batch when `row` is given (a view of the same memory)."""
        if row is None:
            if "bindings" not in self.backend_state:
                self.backend_state["bindings"] = {name: (_present_of(name), v) for name, v in self._values.items()}
            return self.backend_state["bindings"]
        import onnxruntime as ort

        return {name: (_present_of(name), ort.OrtValue.ortvalue_from_numpy(array[row:row + 1]))
                for name, array in self._arrays.items()}

    def views(self) -> dict[str, np.ndarray]:
        """{past name: the held tokens [B, kv_heads, held, head_dim]} (views, no copy)."""
        return {name: array[:, :, :self.held(_layer_of(name))] for name, array in self._arrays.items()}

    def keep(self, start: int, rows: np.ndarray) -> None:
        """After a step that added tokens at mask position `start` on, hold only the added `rows`
        [batch, n] (each sequence's accepted draft path, in order), moved into the slots right
        after the past."""
        rows = np.asarray(rows)
        count = rows.shape[1]
        misplaced = np.flatnonzero((rows != np.arange(count)).any(axis=0))
        moved = int(misplaced[0]) if len(misplaced) else count
        one_path = bool((rows == rows[:1]).all())  # batch 1, or every sequence kept the same slots
        self.length = start
        if moved < count:  # the rows before `moved` are in their slots already
            for name, array in self._arrays.items():
                base = self.held(_layer_of(name))
                if one_path:
                    array[:, :, base + moved:base + count] = array[:, :, base + rows[0, moved:]]  # copied out first
                else:
                    for seq, seq_rows in enumerate(rows):
                        array[seq, :, base + moved:base + count] = array[seq][:, base + seq_rows[moved:]]
        self.length = start + count

    def load(self, presents: Mapping[str, np.ndarray], length: int) -> None:
        """Hold the presents a step returned ({present name: [B, kv_heads, held, head_dim]}),
        the mask `length` tokens wide: what a pruned prompt's prefill gives (it runs with its
        past fed, as its scoring reads the past's length)."""
        self.length = 0
        self.reserve(length)
        self.length = length
        for name, array in self._arrays.items():
            array[:, :, :self.held(_layer_of(name))] = presents[_present_of(name)]


def updates_in_place(backend, spec: DecoderSpec, prompt: int = 3) -> bool:
    """Whether the decoder graph behind `backend` works on a shared past / present buffer:
    a prompt of `prompt` tokens, then a step of two tokens that outgrows the buffer, each run
    both ways (the past fed and the present returned; one buffer bound as both) must give
    the same logits and caches."""
    if not backend.in_place:
        return False
    cache = KVCache(spec, batch=1, chunk=prompt + 1)
    past = spec.empty_cache(1)
    for new in (prompt, 2):
        feeds = {**spec.random_feeds(1, new=new, past=cache.length, seed=new), **past}
        want = backend.infer(feeds)
        if spec.prompt_fed and not cache.length:  # its prompt runs with the past fed (KVCache.load)
            cache.load(want, new)
            past = {name: want[_present_of(name)] for name in past}
            continue
        cache.reserve(cache.length + new)
        try:
            got = backend.infer_in_place({k: v for k, v in feeds.items() if k not in past}, cache.bindings(), [LOGITS])
        except Exception:  # noqa: BLE001 - the graph refuses a buffer longer than its past
            return False
        cache.length += new
        past = {name: want[_present_of(name)] for name in past}
        if not np.allclose(got[LOGITS], want[LOGITS], rtol=1e-4, atol=1e-5) or \
                not all(np.array_equal(view, past[name]) for name, view in cache.views().items()):
            return False
    return True
