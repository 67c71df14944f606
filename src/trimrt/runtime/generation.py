"""Text generation with a decoder build: the loop around the KV-cache graph.

    gen = trimrt.load("llm/").generator(tokenizer="path/")
    for piece in gen.stream("Once upon a time", max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0):
        print(piece, end="")
    results = gen.generate(["a prompt", "another, longer prompt"], max_new_tokens=32)
    gen.generate(inputs_embeds=embeds)  # an inputs_embeds build: [n, hidden] (image features spliced in)

Greedy by default; sampling when `do_sample=True` or any of temperature / top_k / top_p is
given (Hugging Face's order: repetition penalty, temperature, top-k, top-p). Prompts of
different lengths are left-padded into one batch (positions count real tokens only, as in
Hugging Face). The cache is never preallocated to the model's context: a shared-buffer
build (most ONNX Runtime builds) writes each step into buffers that grow by chunks of
tokens (KVCache), others return present tensors, fed back as the next past.
numpy + onnxruntime only; a tokenizer (`tokenizers` / `transformers`) only when given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import BuildLoadError, InputError
from .kv_cache import (
    ATTENTION_BIAS,
    ATTENTION_MASK,
    INPUT_IDS,
    INPUTS_EMBEDS,
    KINDS,
    LOGITS,
    POSITION_IDS,
    DecoderSpec,
    KVCache,
    past_name,
    present_name,
)
from .manifest import EMBEDDING, TOKENIZER
from .speculation import EMPTY, Drafter, DraftTree, make_drafter, one_shape


@dataclass(frozen=True)
class SearchOptions:
    """How the next token is chosen and when generation stops (ONNX Runtime GenAI's and
    Hugging Face's option names)."""

    max_new_tokens: int = 64
    #: None: sample when temperature, top_k or top_p is given, else greedy
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    #: ids that end a sequence besides the model's end-of-sequence ids (kept in `tokens`)
    stop_token_ids: tuple[int, ...] = ()
    #: texts that end a sequence (need a tokenizer); the text is cut before the stop string
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an int >= 1"),
            (self.temperature is None or self.temperature > 0, "temperature must be > 0 (use greedy for 0)"),
            (self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1), "top_k must be an int >= 1"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        strings = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        object.__setattr__(self, "stop_strings", strings)

    @property
    def sampling(self) -> bool:
        if self.do_sample is not None:
            return self.do_sample
        return any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    @classmethod
    def of(cls, options: dict) -> "SearchOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


@dataclass
class GenerationStats:
    """Measured while generating one batch."""

    batch: int = 0
    prompt_tokens: int = 0  # the longest prompt (the prefill length)
    new_tokens: int = 0  # generated tokens, all rows
    time_to_first_token_s: float = 0.0  # prefill and the first token's selection
    decode_s: float = 0.0  # the steps after the first token
    decode_steps: int = 0
    kv_cache_bytes: int = 0  # the cache at the end, all layers, keys and values
    kv_cache_bytes_unpruned: int = 0  # the same cache had no prompt tokens been pruned
    #: speculative decoding: draft tokens fed for verification, and those accepted
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second after the first (per sequence of the batch)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def decode_tokens(self) -> int:
        """Tokens after the first, per sequence: one per decode step, more when drafts are accepted."""
        return self.decode_steps + self.accepted_draft_tokens

    @property
    def tokens_per_step(self) -> float:
        """Tokens each decode step added (1 without speculation)."""
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0


@dataclass
class GenerationResult:
    """One prompt's continuation."""

    tokens: list[int]  # generated ids, the stop token included
    finish_reason: str  # "stop" (end of sequence / stop id / stop string) or "length"
    text: str | None = None  # decoded (special tokens skipped, cut before a stop string) when a tokenizer is set
    stats: GenerationStats = field(default_factory=GenerationStats)


class Generator:
    """Generates with a decoder build's Session (see the module docstring)."""

    def __init__(self, session, tokenizer=None, *, kv_chunk: int = 256, speculation: str | Drafter | None = None):
        self.session = session
        #: the unit of a shared cache buffer's length (spec `shared_buffer`): reserved for the
        #: prompt and max_new_tokens when a generation starts, grown by it past that (drafts)
        self.kv_chunk = kv_chunk
        self.spec = DecoderSpec.from_manifest(session.manifest, str(session.build_dir))
        if tokenizer is None and TOKENIZER in (session.manifest.get("files") or {}):
            tokenizer = session.build_dir / TOKENIZER  # the build's own (hash-checked at load)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        self.embedding = _Embedding(session) if self.spec.token_input == INPUTS_EMBEDS else None
        #: the drafter of speculative decoding (None: one token per step); its state (a token
        #: recycling table) is kept from one generation to the next
        self.speculation = make_drafter(speculation, self.spec.vocab_size)
        #: the dtype of the graph's attention_bias (None: the graph has none, drafts verify as chains)
        self._bias_dtype = next((i.dtype for i in session.inputs if i.name == ATTENTION_BIAS), None)
        self.last_stats: GenerationStats | None = None

    def generate(self, prompts=None, *, inputs_embeds=None, **options) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (a string, or a list of token ids) or a batch of them (a list);
        returns one GenerationResult, or a list in the prompts' order. An inputs_embeds build also
        takes `inputs_embeds` instead: one prompt's embeddings [n, hidden], or a batch ([b, n,
        hidden], or a list of [n_i, hidden])."""
        if inputs_embeds is not None:
            single = isinstance(inputs_embeds, np.ndarray) and inputs_embeds.ndim == 2
            batch = self._embedded_prompts(prompts, inputs_embeds)
        else:
            if isinstance(prompts, np.ndarray):  # token ids: one prompt [n], or a batch [b, n]
                prompts = prompts.tolist()
            single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and _is_int(prompts[0]))
            batch = [prompts] if single else list(prompts or [])
        search = SearchOptions.of(options)
        results = None
        for results in self._steps(batch, search):
            pass
        return results[0] if single else results

    def stream(self, prompt=None, *, inputs_embeds=None, **options) -> Iterator[str | int]:
        """Yield the continuation of one prompt (or of one prompt's `inputs_embeds` [n, hidden])
        as it is generated: text pieces with a tokenizer, token ids without one."""
        search = SearchOptions.of(options)
        emitted = 0
        if inputs_embeds is not None:
            if not (isinstance(inputs_embeds, np.ndarray) and inputs_embeds.ndim == 2):
                raise InputError("stream() takes one prompt: inputs_embeds of shape [tokens, hidden]")
            prompt = self._embedded_prompts(prompt, inputs_embeds)[0]
        for (result,) in self._steps([prompt], search):
            if self.tokenizer is None:
                yield from result.tokens[emitted:]
                emitted = len(result.tokens)
                continue
            text = result.text or ""
            # hold back a piece ending in half a UTF-8 character until the next token completes it
            if len(text) > emitted and (result.finish_reason or not text.endswith("\ufffd")):
                yield text[emitted:]
                emitted = len(text)
        self.last_stats = result.stats

    # -- the loop ---------------------------------------------------------------------------------

    def _steps(self, prompts: list, search: SearchOptions) -> Iterator[list[GenerationResult]]:
        """Run prefill and decode steps; after each step yield the results so far (finish_reason
        is "" until a row is done)."""
        if search.stop_strings and self.tokenizer is None:
            raise InputError("stop_strings need a tokenizer: pass tokenizer= to generator() (or use stop_token_ids)")
        if not prompts:
            raise InputError("no prompt given: pass a string, a list of token ids, or a list of those")
        # a prompt is its token ids, or (an inputs_embeds build) its embeddings [n, hidden]
        ids = [p if _is_embedded(p) else self._encode(p) for p in prompts]
        spec = self.spec
        longest = max(len(i) for i in ids)
        max_new = search.max_new_tokens
        if spec.max_positions is not None:
            if longest >= spec.max_positions:
                raise InputError(f"the prompt has {longest} tokens; this model has {spec.max_positions} positions, "
                                 f"so a prompt can have at most {spec.max_positions - 1}: shorten it")
            max_new = min(max_new, spec.max_positions - longest)
        if len({len(i) for i in ids}) > 1 and (spec.prunes_prompt or not spec.position_input):
            why = ("prunes its prompts, and the pruned layers attend without a padding mask" if spec.prunes_prompt else
                   "takes no position_ids (an ONNX Runtime GenAI export derives them itself), so left-padded "
                   "prompts would get wrong positions")
            raise InputError(f"this build {why}: give prompts of one length per batch (or generate them one by one)")
        stop_ids = set(spec.eos_token_ids) | set(search.stop_token_ids)
        pad = spec.pad_token_id if spec.pad_token_id is not None else (min(stop_ids) if stop_ids else 0)
        batch = len(ids)
        tokens, mask = self._prompt_tokens(ids, pad)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        # the cache in buffers the graph writes in place, when the build can (else fed back each step)
        cache = KVCache(spec, batch, self.kv_chunk) if spec.shared_buffer and self.session.backend.in_place else None
        if cache:  # the prompt and every new token at once: each growth copies the whole cache
            cache.reserve(longest + max_new)
        feeds = {spec.token_input: tokens, ATTENTION_MASK: mask, **({} if cache else spec.empty_cache(batch))}
        # for the repetition penalty (a prompt given as embeddings has no ids: HF counts none either)
        history = [[] if _is_embedded(seq) else list(seq) for seq in ids]
        rng = np.random.default_rng(search.seed)
        stats = GenerationStats(batch=batch, prompt_tokens=longest)
        results = [GenerationResult([], "", stats=stats) for _ in ids]
        drafter = self.speculation
        if drafter is not None:
            self._check_speculation(search)
        started = time.perf_counter()
        step, trees = 0, [EMPTY] * batch  # each row's draft (one shape for all rows)
        feeds_ids = np.zeros((batch, 0), np.int64)  # a decode step's token ids: the last token (and drafts)
        while True:
            if spec.position_input:
                feeds[POSITION_IDS] = positions
            if cache and (cache.length or not spec.prompt_fed):
                held = cache.length
                out = self.session.run_with_cache(feeds, cache, check=step == 0)  # later steps' feeds are ours
            elif cache:  # a pruned / block-sparse prompt runs with its (empty) past fed; the cache holds what it returns
                out = self.session.run({**feeds, **spec.empty_cache(batch)})
                cache.load(out, mask.shape[1])
            else:
                out = self.session.run(feeds)
            drafted = len(trees[0].tokens)
            if drafted:  # verified drafts: keep the accepted paths, as greedy decoding would have made them
                logits = out[LOGITS]
                predicted = logits.argmax(-1)
                live = [row for row, result in enumerate(results) if not result.finish_reason]
                paths = [tree.accepted_path(row_predicted) for tree, row_predicted in zip(trees, predicted)]
                # every row keeps as many drafts as the row that accepted fewest (a path's first
                # nodes are a path too), so the cache stays one length for the batch
                accepted = min(len(paths[row]) for row in live)
                rows = np.array([[0] + [i + 1 for i in path[:accepted]] if len(path) >= accepted else
                                 list(range(accepted + 1)) for path in paths])  # (finished rows: any)
                new_tokens = [[int(tree.tokens[i]) for i in path[:accepted]] + [int(row_predicted[rows_r[-1]])]
                              for tree, path, row_predicted, rows_r in zip(trees, paths, predicted, rows)]
                drafter.update(feeds_ids[live].reshape(-1), logits[live].reshape(-1, logits.shape[-1]))  # one call
                stats.draft_tokens += drafted
                if cache:
                    cache.keep(held, rows)
                else:
                    out = _keep_rows(out, spec, feeds_ids.shape[1], rows)
                mask = mask[:, :mask.shape[1] - drafted + accepted]
                positions = positions[:, :1] + accepted
            else:
                chosen = self._choose(out[LOGITS][:, -1, :], history, search, rng)
                new_tokens = [[token] for token in chosen.tolist()]
                if drafter is not None:  # what the model predicts after each token fed (a prompt: all of them)
                    for row, result in enumerate(results):
                        fed = feeds_ids[row] if step else _prompt_rows(history[row], out[LOGITS].shape[1], longest)
                        if len(fed) and not result.finish_reason:
                            drafter.update(fed, out[LOGITS][row, -len(fed):])
            if drafter is not None:  # each row's tokens in order, until it stops
                added = 0
                for row, result in enumerate(results):
                    before = len(result.tokens)
                    for token in new_tokens[row]:  # the text decoded once a step, unless a stop string may cut it
                        if result.finish_reason:
                            break
                        self._append(result, history[row], token, stop_ids, search,
                                     last=len(result.tokens) + 1 >= max_new, decode=bool(search.stop_strings))
                    if self.tokenizer is not None and not search.stop_strings and len(result.tokens) > before:
                        result.text = self.tokenizer.decode(result.tokens)
                    added = max(added, len(result.tokens) - before)
                if step:  # one token a step is plain decoding; the rest came from accepted drafts
                    stats.accepted_draft_tokens += max(added - 1, 0)
                chosen = np.array([pad if result.finish_reason else result.tokens[-1] for result in results])
            else:
                for row, result in enumerate(results):
                    if not result.finish_reason:
                        self._append(result, history[row], int(chosen[row]), stop_ids, search, last=step == max_new - 1)
                    else:
                        chosen[row] = pad
            now = time.perf_counter()
            if step == 0:
                stats.time_to_first_token_s = now - started
            else:
                stats.decode_s, stats.decode_steps = now - started - stats.time_to_first_token_s, step
            stats.new_tokens = sum(len(r.tokens) for r in results)
            stats.kv_cache_bytes = cache.nbytes if cache else \
                sum(out[present_name(i, k)].nbytes for i in range(spec.layers) for k in KINDS)
            stats.kv_cache_bytes_unpruned = batch * mask.shape[1] * spec.kv_bytes_per_token
            yield results
            if all(r.finish_reason for r in results):
                return
            step += 1
            trees = self._drafts(history, results, positions, max_new, pad) if drafter is not None else [EMPTY] * batch
            feeds_ids = chosen[:, None].astype(np.int64)  # the last token, then the drafts below it
            if len(trees[0].tokens):
                feeds_ids = np.concatenate([feeds_ids, np.stack([tree.tokens for tree in trees])], axis=1)
            q = feeds_ids.shape[1]
            positions = positions[:, -1:] + 1 + np.concatenate([[0], trees[0].depths])[None]
            mask = np.concatenate([mask, np.ones((batch, q), np.int64)], axis=1)
            feeds = {spec.token_input: self.embedding(feeds_ids) if self.embedding else feeds_ids, ATTENTION_MASK: mask}
            if not trees[0].is_chain:
                feeds[ATTENTION_BIAS] = trees[0].bias(mask.shape[1], self._bias_dtype)
            if cache is None:
                feeds.update({past_name(i, k): out[present_name(i, k)] for i in range(spec.layers) for k in KINDS})

    def _drafts(self, history: list[list[int]], results: list[GenerationResult], positions: np.ndarray, max_new: int,
                pad: int) -> list[DraftTree]:
        """The next step's drafts, a tree a row in one shape (`one_shape`), cut to what the build
        can verify and to the tokens still wanted."""
        spec = self.spec
        trees = [self.speculation.draft(context) for context in history]
        if spec.sliding_window is not None or spec.prunes_prompt or self._bias_dtype is None:
            # a chain needs no bias (the causal mask is its mask): windows count cache slots (a
            # chain's slots are its positions), the layers after a prompt pruning attend with a
            # causal mask of their own, and a graph may lack the input
            trees = [tree.spine() for tree in trees]
        trees = one_shape(trees, [row for row, result in enumerate(results) if not result.finish_reason], pad)
        if not len(trees[0].tokens):
            return trees
        # no drafts past the last token wanted (the rows still going have made as many), or the position table
        room = max_new - max(len(result.tokens) for result in results if not result.finish_reason)
        left = None if spec.max_positions is None else spec.max_positions - 2 - int(positions[:, -1].max())
        return [_trimmed(tree, room - 1, left) for tree in trees]

    def _check_speculation(self, search: SearchOptions) -> None:
        if search.sampling or search.repetition_penalty != 1.0:
            raise InputError("speculative decoding here reproduces greedy decoding exactly, so it takes no sampling "
                             "options and no repetition_penalty; drop them, or use a generator without speculation")

    def _prompt_tokens(self, prompts: list, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """The left-padded batch of prompts, as the build's token input, and its attention mask."""
        longest = max(len(p) for p in prompts)
        mask = np.zeros((len(prompts), longest), np.int64)
        ids = np.full((len(prompts), longest), pad, np.int64)
        for row, prompt in enumerate(prompts):
            mask[row, longest - len(prompt):] = 1
            if not _is_embedded(prompt):
                ids[row, longest - len(prompt):] = prompt
        if self.embedding is None:
            return ids, mask
        tokens = self.embedding(ids)  # pad ids embedded too (masked); given embeddings replace their rows
        for row, prompt in enumerate(prompts):
            if _is_embedded(prompt):
                tokens[row, :longest - len(prompt)] = 0
                tokens[row, longest - len(prompt):] = prompt
        return tokens, mask

    def _embedded_prompts(self, prompts, inputs_embeds) -> list[np.ndarray]:
        """inputs_embeds ([n, hidden], [b, n, hidden] or a list of [n_i, hidden]) -> one array a prompt."""
        if self.embedding is None:
            raise InputError("this build takes input_ids: give token ids or text; inputs_embeds need a build compiled "
                             'with [decoder] token_input = "inputs_embeds"')
        if prompts is not None:
            raise InputError("give prompts or inputs_embeds, not both")
        arrays = [inputs_embeds] if isinstance(inputs_embeds, np.ndarray) and inputs_embeds.ndim == 2 else \
            list(inputs_embeds)
        hidden = self.spec.hidden_size
        out = []
        for array in arrays:
            array = np.asarray(array)
            if array.ndim != 2 or array.shape[1] != hidden or not np.issubdtype(array.dtype, np.floating):
                raise InputError(f"inputs_embeds: each prompt must be a float array [tokens, {hidden}], got "
                                 f"{array.dtype}{list(array.shape)}")
            if not len(array):
                raise InputError("a prompt is empty: give at least one token")
            out.append(array.astype(np.float32, copy=False))
        return out

    def _append(self, result: GenerationResult, history: list[int], token: int, stop_ids: set, search: SearchOptions,
                *, last: bool, decode: bool = True) -> None:
        result.tokens.append(token)
        history.append(token)
        if self.tokenizer is not None and decode:
            result.text = self.tokenizer.decode(result.tokens)
            for stop in search.stop_strings:
                cut = result.text.find(stop)
                if cut >= 0:
                    result.text, result.finish_reason = result.text[:cut], "stop"
        if token in stop_ids:
            result.finish_reason = "stop"
        elif last and not result.finish_reason:
            result.finish_reason = "length"

    def _choose(self, logits: np.ndarray, history: list[list[int]], search: SearchOptions,
                rng: np.random.Generator) -> np.ndarray:
        if search.repetition_penalty == 1.0 and not search.sampling:
            return logits.argmax(axis=-1)
        logits = logits.astype(np.float64)
        if search.repetition_penalty != 1.0:
            for row, seen in enumerate(history):
                seen = np.unique(seen)
                values = logits[row, seen]
                logits[row, seen] = np.where(values > 0, values / search.repetition_penalty,
                                             values * search.repetition_penalty)
        if not search.sampling:
            return logits.argmax(axis=-1)
        return np.array([_sample(row, search, rng) for row in logits])

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer: pass tokenizer= to generator() (a folder with "
                                 "tokenizer.json, the file, or a tokenizer object), or give token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt) if isinstance(prompt, Sequence) or isinstance(prompt, np.ndarray) else None
            if ids is None or not all(_is_int(t) for t in ids):
                raise InputError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InputError("a prompt is empty: give at least one token")
        bad = [int(t) for t in ids if not 0 <= int(t) < self.spec.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary of {self.spec.vocab_size}; "
                             "check that the tokenizer matches the model")
        return [int(t) for t in ids]


def _sample(logits: np.ndarray, search: SearchOptions, rng: np.random.Generator) -> int:
    if search.temperature is not None:
        logits = logits / search.temperature
    if search.top_k is not None and search.top_k < logits.size:
        kth = np.partition(logits, -search.top_k)[-search.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if search.top_p is not None and search.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        # the smallest set of most likely tokens whose mass reaches top_p (at least one)
        keep = np.cumsum(probs[order]) - probs[order] < search.top_p
        filtered = np.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        probs = filtered / filtered.sum()
    return int(rng.choice(probs.size, p=probs))


def _is_embedded(prompt) -> bool:
    """A prompt given as its embeddings [n, hidden] (not token ids)."""
    return isinstance(prompt, np.ndarray) and prompt.ndim == 2 and prompt.dtype.kind == "f"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class _Embedding:
    """An inputs_embeds build's embedding model (EMBEDDING): token ids [B, n] -> [B, n, hidden]."""

    def __init__(self, session):
        if EMBEDDING not in (session.manifest.get("files") or {}):
            raise BuildLoadError(f"{session.build_dir}: the build takes inputs_embeds but has no {EMBEDDING}; recompile it")
        from .backends import OnnxRuntimeBackend

        self.backend = OnnxRuntimeBackend(session.build_dir / EMBEDDING, threads=1)
        self.backend.activate()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.backend.infer({INPUT_IDS: ids}, [INPUTS_EMBEDS])[INPUTS_EMBEDS]


class _Tokenizer:
    """encode(text) -> ids and decode(ids) -> text over a `tokenizers` or `transformers` tokenizer."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, text: str) -> list[int]:
        encoded = self.inner.encode(text)
        return list(getattr(encoded, "ids", encoded))

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)


def load_tokenizer(tokenizer) -> _Tokenizer:
    """A tokenizer object (with encode / decode), a tokenizer.json file, or a folder holding one."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"):
        return _Tokenizer(tokenizer)
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"tokenizer {str(tokenizer)!r}: no tokenizer.json there; give the file, a folder holding it, "
                         "or a tokenizer object")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("loading a tokenizer file needs the tokenizers package: pip install tokenizers") from None
    try:
        return _Tokenizer(Tokenizer.from_file(str(file)))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise InputError(f"cannot read tokenizer {file}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def _keep_rows(out: dict, spec: DecoderSpec, fed: int, rows: np.ndarray) -> dict:
    """The step's outputs with each present cut to its past and the fed `rows` kept (an
    accepted draft path a sequence, [batch, n], moved next to the past)."""
    out = dict(out)
    for i in range(spec.layers):
        for kind in KINDS:
            present = out[present_name(i, kind)]
            past = present.shape[2] - fed
            kept = np.stack([seq[:, past + seq_rows] for seq, seq_rows in zip(present, rows)])
            out[present_name(i, kind)] = np.concatenate([present[:, :, :past], kept], axis=2)
    return out


def _prompt_rows(prompt: list[int], rows: int, longest: int) -> np.ndarray:
    """The prompt ids the last of the prefill's `rows` logits belong to (a prompt left-padded to
    `longest`): all of them when there is one row a token, else the last (a pruned prompt's
    logits), none for a prompt given as embeddings."""
    ids = np.asarray(prompt, np.int64)
    return ids if rows == longest else ids[-1:]


def _trimmed(tree: DraftTree, depth: int | None, positions: int | None) -> DraftTree:
    """`tree` without the nodes deeper than `depth` or than the `positions` left."""
    limit = min(d for d in (depth, positions) if d is not None)
    if not len(tree.tokens) or tree.depths[-1] <= limit:  # breadth-first: the last node is the deepest
        return tree
    keep = np.flatnonzero(tree.depths <= max(limit, 0))  # breadth-first: a kept node's parent is kept
    index = {int(old): new for new, old in enumerate(keep)}
    parents = np.array([index.get(int(p), -1) if p >= 0 else -1 for p in tree.parents[keep]], np.int64)
    return DraftTree(tree.tokens[keep], parents)
