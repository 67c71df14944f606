"""Recipe: the typed, validated compile options, read from a TOML file or a dict.

Each table of the TOML file maps to one frozen dataclass that the matching pass takes
when it is constructed. The dataclass is also the table's schema: each field's `Key`
(in its metadata) says what the key takes, and one reader turns a table into the
dataclass with one-line errors that name the key and what is allowed. Rules joining
several keys stay short checks in the dataclass's `_combine`; method names and the keys
of one method only come from the registries. Structural checks that need the model
(does block 14 exist?) happen when the pass meets the model.

Vocabulary: a recipe's `layers` are block indices (0-based), `keep` is the share of the
prunable span kept (the ops' `keep` attribute is the resulting count, `kept_count`), and
adaptive's `mass` is the MassMask op's `tau`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import RecipeError
from .registry import QUANTIZATION_METHODS, TOKEN_PRUNING_METHODS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Upper bounds of the numbers that cost compile time or memory (a typo of a few zeros must
# fail in the recipe check, not hang the compile or exhaust memory)
#: zero_tprune PageRank iterations per layer (the paper uses at most 30)
MAX_ITERATIONS = 100
#: recycle: the grid × grid cells become extra tokens
MAX_RECYCLE_GRID = 64
#: a token position or count (prunable span, protect = "first:N", ToMe r); the export's token axis allows 65536
MAX_TOKENS = 65536
#: [calibration] samples, each run through the model several times
MAX_CALIBRATION_SAMPLES = 100_000
#: [quantization] int4 group size
MAX_GROUP_SIZE = 65536


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Key:
    """The schema of one recipe key: `checks` are (allowed?, error) pairs tried in order (a
    check may assume the ones before it passed), each error a format string of `key`,
    `value` and `choices`; `convert` makes the field's value from an allowed one."""

    help: str
    checks: tuple[tuple[Callable[[Any], Any], str], ...]
    convert: Callable[[Any], Any] = lambda value: value
    #: a missing key is checked as None (so it fails) instead of taking the default
    required: bool = False
    #: the allowed names, for the error message (a tuple or a registry, listed when it fails)
    choices: Any = ()

    def read(self, name: str, value: Any, where: str) -> Any:
        shown = list(value) if isinstance(value, tuple) else value
        for allowed, error in self.checks:
            if not allowed(value):
                raise RecipeError(f"{where}: " + error.format(key=name, value=shown, choices=list(self.choices)))
        return self.convert(value)


def _key(default: Any, help: str, *checks, convert=lambda value: value, required: bool = False, choices: Any = ()):
    return field(default=default, metadata={"key": Key(help, checks, convert, required, choices)})


def flag(default: bool, help: str):
    return _key(default, help, (lambda v: isinstance(v, bool), "{key} must be true or false, got {value!r}"))


def number(default: float | None, interval: str, help: str, note: str = "", required: bool = False):
    """A number in `interval`, written as the error message shows it: "(0, 1]", "[0, 1]", "(0, 0.5)"."""
    low, high = (float(x) for x in interval[1:-1].split(","))

    def inside(v) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and (low <= v if interval[0] == "[" else low < v)
                and (v <= high if interval[-1] == "]" else v < high))

    return _key(default, help, (inside, f"{{key}} must be a number in {interval}{note}, got {{value!r}}"),
                convert=float, required=required)


def integer(default: int, low: int, high: int, help: str):
    return _key(default, help, (lambda v: _is_int(v) and v >= low, f"{{key}} must be an integer >= {low}, got {{value!r}}"),
                (lambda v: v <= high, f"{{key}} must be at most {high}, got {{value!r}}"))


def choice(default: str, choices, help: str, error: str = "{key} must be one of {choices}, got {value!r}"):
    return _key(default, help, (lambda v: isinstance(v, str) and v in choices, error), choices=choices)


def text(what: str, help: str):
    return _key(None, help, (lambda v: isinstance(v, str) and v.strip(), f"{{key}} must be {what}, got {{value!r}}"))


def blocks(help: str, required: bool = False):
    return _key((), help,
                (lambda v: isinstance(v, (list, tuple)) and v and all(_is_int(i) for i in v),
                 "{key} must be a non-empty list of block indices, e.g. [3, 6, 9]"),
                (lambda v: min(v) >= 0, "{key} must be 0-based block indices >= 0, got {value}"),
                (lambda v: len(set(v)) == len(v), "{key} contains duplicates: {value}"),
                convert=tuple, required=required)


class _Table:
    """Base of the tables: the rules joining several keys, and the keys `to_dict` leaves out."""

    @classmethod
    def _combine(cls, values: dict[str, Any], table: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The checked `values` of the keys given, completed and checked together."""
        return values

    def _hidden(self) -> set[str]:
        """Keys that do not apply to these options (left out of `to_dict`)."""
        return set()


def _method_only(table: Mapping[str, Any], where: str, registry, method: str, keys: str) -> None:
    """Refuse a key that belongs to other methods (their class attribute `keys` lists it)."""
    for key in table:
        owners = [name for name in registry if key in getattr(registry[name], keys)]
        if owners and method not in owners:
            names = " or ".join(f'"{name}"' for name in owners)
            raise RecipeError(f"{where}: {key} applies to method = {names} only (method is {method!r}); remove it")


def protect_key(verb: str):
    """`protect`: the leading tokens a span op never touches."""
    return _key("cls", f"leading tokens never {verb}: cls, none or first:N",
                (lambda v: isinstance(v, str) and bool(v in ("cls", "none") or re.fullmatch(r"first:[0-9]{1,9}", v)
                                                        and int(v[6:]) <= MAX_TOKENS),
                 f'{{key}} must be "cls", "none" or "first:N" (N <= {MAX_TOKENS}), got {{value!r}}'))


def span_key(verb: str, example: str):
    """`prunable`: [start, end), the only tokens a span op may touch."""
    return _key(None, f"[start, end): only these tokens may be {verb} ({example})",
                (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(i) for i in v)
                 and 0 <= v[0] < v[1] <= MAX_TOKENS,
                 f"{{key}} must be [start, end) with 0 <= start < end <= {MAX_TOKENS}, got {{value!r}}"),
                convert=tuple)


class _Span:
    """The span of a table with `protect` and `prunable` (the tokens outside it are never touched)."""

    protect: str
    prunable: tuple[int, int] | None

    @staticmethod
    def _check_span(values, table, where) -> None:
        if "prunable" in values and "protect" in table:
            raise RecipeError(f"{where}: give either protect or prunable (tokens outside prunable are protected)")

    @property
    def protected_prefix(self) -> int:
        """Number of leading tokens never touched (the start of the span)."""
        if self.prunable is not None:
            return self.prunable[0]
        named = {"none": 0, "cls": 1}
        return named[self.protect] if self.protect in named else int(self.protect.split(":", 1)[1])

    @property
    def span_end(self) -> int | None:
        """End (exclusive) of the span; None: up to the last token."""
        return self.prunable[1] if self.prunable is not None else None


@dataclass(frozen=True)
class TokenPruningOptions(_Span, _Table):
    """[token_pruning]: drop low-scoring tokens after the attention of some blocks."""

    method: str = choice("cls_attention", TOKEN_PRUNING_METHODS, "how tokens are scored (a registered method)",
                         error="{key} {value!r} is not supported; choose one of {choices}")
    layers: tuple[int, ...] = blocks("blocks (0-based) after whose attention tokens are pruned", required=True)
    keep: float = number(1.0, "(0, 1]", "share of the prunable span kept at each listed block (see keep_ratio)",
                         required=True)
    protect: str = protect_key("pruned")
    fuse_pruned: bool = flag(False, "average the pruned tokens into one extra token")
    prunable: tuple[int, int] | None = span_key("pruned", "e.g. the image tokens of a prompt")
    # the keys of one method only: checked by the method's class (TOKEN_PRUNING_METHODS[name].parse)
    #: zero_tprune: PageRank iterations per listed layer (None: the paper's schedule by depth)
    iterations: tuple[int, ...] | None = None
    #: zero_tprune: heads whose score variance falls outside [low, high] are ignored
    head_variance: tuple[float, float] = (0.01, 0.7)
    #: recycle: dropped tokens are merged into one token per cell of a grid × grid layout
    recycle_grid: int = 2
    #: adaptive: keep the fewest tokens holding this share of the attention mass (the MassMask
    #: op's tau; `keep` is then the static upper bound)
    mass: float = 0.9

    @classmethod
    def _combine(cls, values, table, where):
        cls._check_span(values, table, where)
        name = values.get("method", cls.method)
        _method_only(table, where, TOKEN_PRUNING_METHODS, name, "keys")
        method = TOKEN_PRUNING_METHODS[name]
        values.update(method.parse(table, where, values["layers"]))
        if values.get("fuse_pruned") and method.no_fuse is not None:
            raise RecipeError(f"{where}: fuse_pruned does not apply to method {name!r} ({method.no_fuse})")
        return {**values, "layers": tuple(sorted(values["layers"]))}

    def _hidden(self) -> set[str]:
        other = {key for name in TOKEN_PRUNING_METHODS for key in TOKEN_PRUNING_METHODS[name].keys}
        return other - set(TOKEN_PRUNING_METHODS[self.method].keys)

    @property
    def keep_ratio(self) -> float:
        """The share of the prunable span kept (the recipe's `keep`; the ops' `keep` is a count)."""
        return self.keep

    def kept_count(self, prunable: int) -> int:
        """Prunable tokens kept at one layer: ceil(keep_ratio · prunable), at least 1 (the
        ops' rule, `plugins.span.kept_count`)."""
        from .plugins.span import kept_count

        return kept_count(prunable, keep=0, keep_ratio=self.keep_ratio)


@dataclass(frozen=True)
class TokenMergingOptions(_Table):
    """[token_merging]: ToMe — merge r tokens per block by bipartite soft matching."""

    r: tuple[int, ...] = _key(
        (), "tokens merged away at each listed block (one value: the same at every block)",
        (lambda v: not _is_int(v) or 1 <= v <= MAX_TOKENS, f"{{key}} must be an integer in [1, {MAX_TOKENS}], got {{value!r}}"),
        (lambda v: _is_int(v) or isinstance(v, (list, tuple)) and v and all(_is_int(i) and 0 <= i <= MAX_TOKENS for i in v),
         f"{{key}} must be a positive integer or a list of integers in [0, {MAX_TOKENS}] (one per block), got {{value!r}}"),
        convert=lambda v: (v,) if _is_int(v) else tuple(v))
    ratio: float = number(0.0, "(0, 0.5)", "or: merge floor(ratio · tokens) at each block (inputs of varying length)",
                          note=" (a block can merge at most half of its tokens)")
    layers: tuple[int, ...] = blocks("blocks (0-based) that merge; left out: every block")
    protect: str = choice("cls", ("cls", "none"), "cls: the first token is never merged",
                          error='{key} must be "cls" or "none", got {value!r}')
    proportional_attention: bool = flag(True, "add log(size) to later attention logits, so a merged token weighs "
                                              "as the tokens it holds")
    weighted_pooling: bool = flag(True, "weight a masked mean pooling after the blocks by size too (sentence embedders)")

    @classmethod
    def _combine(cls, values, table, where):
        if ("r" in values) == ("ratio" in values):
            raise RecipeError(f"{where}: give r (tokens merged per block) or ratio (share of the tokens merged per "
                              "block, for inputs of varying length), not both")
        r, layers = values.get("r", ()), values.get("layers")
        if _is_int(table.get("r")):  # one value: the same at every listed block
            r = r * len(layers or (None,))
        elif layers is None:
            layers = tuple(range(len(r)))
        elif r and len(layers) != len(r):
            raise RecipeError(f"{where}: r lists {len(r)} values for {len(layers)} layers")
        if r and layers:  # one r per block: order both by block
            layers, r = zip(*sorted(zip(layers, r)))
        return {**values, "r": tuple(r), "layers": tuple(sorted(layers or ()))}

    def _hidden(self) -> set[str]:
        return {"ratio"} if self.r else {"r"}

    @property
    def protected_prefix(self) -> int:
        return 1 if self.protect == "cls" else 0

    def schedule(self, depth: int) -> list[tuple[int, int]]:
        """(block, r) for a model of `depth` blocks; r = 0 means "use ratio"."""
        layers = self.layers or tuple(range(depth))
        r = self.r if len(self.r) == len(layers) else (self.r[0] if self.r else 0,) * len(layers)
        return list(zip(layers, r))


@dataclass(frozen=True)
class TokenSlimmingOptions(_Table):
    """[token_slimming]: fuse the model's own token slimming modules (SiT) into one op each."""

    fuse: bool = flag(True, "fuse each token slimming module into one op")


#: token orders of [sparse_attention]: as the model has them, a grid's patches tile by tile, or along a
#: Hilbert curve
TOKEN_ORDERS = ("sequence", "tiled", "hilbert")


@dataclass(frozen=True)
class SparseAttentionOptions(_Table):
    """[sparse_attention]: block-sparse attention (Rectified SpaAttn) in some blocks: each query
    block attends the tokens of its top_k key blocks only (by pooled attention, the sink and
    local blocks always among them; with tau, only as many of them as cover that share of
    its pooled mass), with the rectification of what the other blocks held. Images and
    video: `order` puts a grid's patches in tiles first, so a block is a compact patch."""

    layers: tuple[int, ...] = blocks("blocks whose attention becomes block-sparse (default: every block whose "
                                     "attention no token pass's score reads)")
    top_k: int | None = _key(None, "key blocks each query block attends (sink and local blocks included); the "
                             "compute bound (left out: every block, with tau selecting)",
                             (lambda v: _is_int(v) and v >= 1, "{key} must be an integer >= 1, got {value!r}"))
    tau: float = number(1.0, "(0, 1]", "of those, keep the blocks (largest pooled mass first) that cover this share "
                        "of the query block's pooled mass; 1: all top_k")
    block_size: int = integer(128, 1, MAX_TOKENS, "tokens per block (the last one may be shorter)")
    sink: int = integer(1, 0, MAX_TOKENS, "the first blocks every query block keeps")
    local: int = integer(1, 0, MAX_TOKENS, "blocks this close to the diagonal are always kept (1: the diagonal)")
    rectify: bool | str = _key(
        True, "rectify what the skipped blocks held: true, per token (the reliable ones, by GAPR's gain test, join "
        "each query's softmax as one pooled key each); \"blocks\": Rectified SpaAttn's per-block formula (it "
        "underestimates selected blocks whose keys vary: benchmarks/sparse_attention_models.py); false: off",
        (lambda v: isinstance(v, bool) or v == "blocks", "{key} must be true, false or \"blocks\", got {value!r}"))
    order: str = choice("sequence", TOKEN_ORDERS, "the token order the blocks cut: sequence (as the model has "
                        "them), tiled (a grid's patches tile by tile) or hilbert (along a Hilbert curve, 2-D)")
    grid: tuple[int, ...] | None = _key(
        None, "the patch grid [rows, columns] or [frames, rows, columns]: the last tokens of the sequence (those "
        "before it, e.g. a CLS token, stay first)",
        (lambda v: isinstance(v, (list, tuple)) and len(v) in (2, 3) and all(_is_int(x) and x >= 1 for x in v),
         "{key} must be [rows, columns] or [frames, rows, columns] of integers >= 1, got {value!r}"),
        convert=tuple)

    @classmethod
    def _combine(cls, values, table, where):
        if values.get("top_k") is None and values.get("tau", cls.tau) >= 1.0:
            raise RecipeError(f"{where}: give top_k (key blocks per query block) and/or tau (the pooled mass they "
                              "cover, below 1)")
        order, grid = values.get("order", cls.order), values.get("grid")
        if order != "sequence" and grid is None:
            raise RecipeError(f"{where}: order = {order!r} needs grid, the patch grid [rows, columns] (or [frames, "
                              "rows, columns])")
        if order == "sequence" and grid is not None:
            raise RecipeError(f"{where}: grid is the patch layout of order = 'tiled' or 'hilbert'; give one of those "
                              "orders (or leave grid out)")
        if order == "hilbert" and len(grid) != 2:
            raise RecipeError(f"{where}: order = 'hilbert' takes a 2-D grid [rows, columns], got {list(grid)}; use "
                              "order = 'tiled' for video")
        return values

    def _hidden(self) -> set[str]:
        return {"grid"} if self.order == "sequence" else set()


#: Mixture-of-Depths routers: training-free from attention, or the model's own trained routers
MOD_ROUTERS = ("attention", "model")


@dataclass(frozen=True)
class MixtureOfDepthsOptions(_Span, _Table):
    """[mixture_of_depths]: p-MoD routing. In a routed block only the top tokens of the span
    (by the router's score) run the block; the others skip it, keeping their state, and
    re-enter the routing of the next block. Which blocks route how many: p-MoD's progressive
    ratio decay (a shifted cosine over the depth: dense while above max_ratio, floored at
    min_ratio), or one explicit ratio per block."""

    router: str = choice("attention", MOD_ROUTERS, "attention: training-free, a block's tokens are scored by the "
                         "attention row of the CLS (encoders) or the last token, in the block before it; model: "
                         "the routers a p-MoD model was trained with (its layers exported dense, h + g·MLP(h))")
    ratios: tuple[float, ...] | None = _key(
        None, "one routed share per block (1.0: dense); left out: the shifted cosine schedule",
        (lambda v: isinstance(v, (list, tuple)) and v and all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                                and 0 < r <= 1 for r in v),
         "{key} must be a non-empty list of numbers in (0, 1], one per block, got {value!r}"),
        convert=lambda v: tuple(float(r) for r in v))
    max_ratio: float = number(0.85, "(0, 1]", "schedule: blocks whose cosine ratio is above this stay dense")
    min_ratio: float = number(0.15, "(0, 1]", "schedule: the floor of the routed share")
    mean_ratio: float | None = number(None, "(0, 1]", "schedule: shift the cosine so the blocks' mean share is this "
                                      "(left out: p-MoD's unshifted curve, mean 0.54 at 32 blocks)")
    protect: str = protect_key("routed away")
    prunable: tuple[int, int] | None = span_key("routed away", "e.g. the image tokens of a prompt")

    @classmethod
    def _combine(cls, values, table, where):
        cls._check_span(values, table, where)
        if "ratios" in values and any(key in table for key in ("max_ratio", "min_ratio", "mean_ratio")):
            raise RecipeError(f"{where}: give ratios (one per block) or the schedule's max_ratio / min_ratio / "
                              "mean_ratio, not both")
        low, high = values.get("min_ratio", cls.min_ratio), values.get("max_ratio", cls.max_ratio)
        if low > high:
            raise RecipeError(f"{where}: min_ratio {low} is above max_ratio {high}")
        mean = values.get("mean_ratio")
        if mean is not None and not low <= mean <= 1:
            raise RecipeError(f"{where}: mean_ratio {mean} is below min_ratio {low}: no schedule has that mean")
        return values

    def _hidden(self) -> set[str]:
        return {"max_ratio", "min_ratio", "mean_ratio"} if self.ratios is not None else set()

    def block_ratios(self, depth: int) -> list[float]:
        """The routed share of each of `depth` blocks (1.0: dense)."""
        if self.ratios is not None:
            if len(self.ratios) != depth:
                raise RecipeError(f"[mixture_of_depths] ratios lists {len(self.ratios)} values; the model has {depth} "
                                  "blocks: give one per block (1.0 for a dense block)")
            return list(self.ratios)
        curve = [math.cos(i * math.pi / (depth - 1)) / 2 + 0.5 if depth > 1 else 1.0 for i in range(depth)]

        def shifted(shift: float) -> list[float]:
            return [1.0 if c + shift > self.max_ratio else max(c + shift, self.min_ratio) for c in curve]

        if self.mean_ratio is None:
            return shifted(0.0)
        low, high = -1.0, 1.0  # the mean grows with the shift: bisect
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if sum(shifted(mid)) / depth < self.mean_ratio else (low, mid)
        ratios = shifted(high)
        if abs(sum(ratios) / depth - self.mean_ratio) > 0.5 / depth:
            raise RecipeError(f"[mixture_of_depths] no shifted cosine over {depth} blocks has mean_ratio "
                              f"{self.mean_ratio} (the nearest: {sum(ratios) / depth:.3f}); give ratios per block")
        return ratios


def quant_combinations() -> dict[tuple[str, str], tuple[str, ...]]:
    """(weights, activations) -> the methods that build them, as the registered methods declare
    (`formats`), in registration order."""
    table: dict[tuple[str, str], tuple[str, ...]] = {}
    for name in QUANTIZATION_METHODS:
        for formats in QUANTIZATION_METHODS[name].formats:
            table[formats] = (*table.get(formats, ()), name)
    return table


def __getattr__(name: str) -> Any:
    if name == "QUANT_COMBINATIONS":  # derived from the registry, which loads the methods when first asked
        return quant_combinations()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class QuantizationOptions(_Table):
    """[quantization]: weight / activation formats, the method that picks the weights,
    and the fidelity guard. Methods other than rtn (and FP8's static activation scales,
    and the guard) need a [calibration] table."""

    weights: str = choice("int8", ("int8", "int4", "fp8"), "weight format")
    activations: str = choice("int8", ("int8", "fp8", "none"), "activation format (none: weight-only, the float "
                              "activations meet dequantized weights); left out: the one the weights go with")
    method: str = choice("rtn", QUANTIZATION_METHODS, "how the weights are picked (a registered method)")
    group_size: int = _key(128, "int4 only: weights sharing one scale along the input axis",
                           (lambda v: _is_int(v) and v >= 16 and not v & (v - 1),
                            "{key} must be a power of two >= 16 (e.g. 128), got {value!r}"),
                           (lambda v: v <= MAX_GROUP_SIZE, f"{{key}} must be at most {MAX_GROUP_SIZE}, got {{value!r}}"))
    alpha: float | None = number(None, "[0, 1]", "smoothquant: migration strength (None: searched on the calibration "
                                 "set)", note=" (leave it out to search it)")
    min_cosine: float | None = number(None, "(0, 1]", "fidelity guard: keep the most sensitive layers in float until "
                                      "the output cosine on held-out calibration samples is at least this")
    attention: bool | None = _key(None, "int8 q·kᵀ products too: q and k quantized per tensor with calibrated static "
                                  "scales (targets with static activations); left out: on for openvino encoders "
                                  "(NNCF's transformer preset does the same), off for decoders and elsewhere",
                                  (lambda v: isinstance(v, bool), "{key} must be true or false, got {value!r}"))

    @classmethod
    def _combine(cls, values, table, where):
        combinations = quant_combinations()
        weights = values.setdefault("weights", cls.weights)
        activations = values.setdefault("activations", next(a for w, a in combinations if w == weights))
        method = values.setdefault("method", cls.method)
        if method not in combinations.get((weights, activations), ()):
            allowed = "; ".join(f"weights = {w!r}, activations = {a!r}: method in {list(m)}"
                                for (w, a), m in combinations.items())
            raise RecipeError(f"{where}: weights = {weights!r}, activations = {activations!r}, method = {method!r} is "
                              f"not a supported combination; choose one of: {allowed}")
        if values.get("attention") and (weights, activations) != ("int8", "int8"):
            raise RecipeError(f"{where}: attention = true quantizes the q·kᵀ products to int8 and goes with int8 weights "
                              f"and activations (weights is {weights!r}, activations {activations!r})")
        if "group_size" in values and weights != "int4":
            raise RecipeError(f"{where}: group_size applies to int4 weights (weights is {weights!r}); remove it")
        _method_only(table, where, QUANTIZATION_METHODS, method, "recipe_keys")
        return values

    def _hidden(self) -> set[str]:
        return set() if self.weights == "int4" else {"group_size"}

    @property
    def needs_calibration(self) -> bool:
        """True when building it needs activations (statistics, scales or a fidelity check)."""
        return QUANTIZATION_METHODS[self.method].needs_calibration or self.weights == "fp8" or self.min_cosine is not None


@dataclass(frozen=True)
class CalibrationOptions(_Table):
    """[calibration]: the data quantization measures activations on.

    Exactly one of `source` (a folder of .npy/.npz feeds, a .txt file with one sample a
    line, or an image folder; relative to the recipe file) or `random` (a smoke test:
    statistics of random data say little about real inputs)."""

    source: str | None = text("a path (a folder of .npy/.npz feeds, a .txt file, or an image folder)",
                              "the calibration data, relative to the recipe file")
    samples: int = integer(128, 1, MAX_CALIBRATION_SAMPLES, "samples used (the first ones of the source, in sorted "
                           "order), each of batch 1")
    random: bool = flag(False, "random data instead of a source (a smoke test)")
    tokenizer: str | None = text("a Hugging Face tokenizer name or folder", "text sources: AutoTokenizer name or folder")
    max_length: int | None = integer(None, 1, MAX_TOKENS, "text sources: tokens per sample (None: the model's static "
                                     "length, else 128)")
    seed: int = integer(0, 0, 2**32 - 1, "seed of the random data and of the sample order")

    @classmethod
    def _combine(cls, values, table, where):
        if ("source" in values) == values.get("random", False):
            raise RecipeError(f"{where}: give exactly one of source = \"...\" (real calibration data) or "
                              "random = true (a smoke test)")
        return values

    def _hidden(self) -> set[str]:
        return set() if self.random else {"random"}


@dataclass(frozen=True)
class PaddingOptions(_Table):
    """[padding]: trim trailing padding before the first block (exact; outputs padded back)."""

    trim_trailing: bool = flag(False, "trim trailing padding before the first block")


@dataclass(frozen=True)
class OnnxRuntimeOptions(_Table):
    """[onnxruntime]: options of ONNX Runtime builds (the default target)."""

    fuse: bool = flag(False, "fuse attention, GELU and skip-LayerNorm into ONNX Runtime's contrib kernels (checked "
                             "against the unfused graph; TensorRT builds fuse on their own)")


#: [openvino] inference_precision -> the CPU capability OpenVINO needs for it (OPTIMIZATION_CAPABILITIES)
OPENVINO_PRECISIONS = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}


@dataclass(frozen=True)
class OpenVINOOptions(_Table):
    """[openvino]: how OpenVINO builds (--target openvino) are compiled and run. A reduced
    inference precision is measured at compile time, on the compiling CPU, and recorded."""

    inference_precision: str = choice("f32", tuple(OPENVINO_PRECISIONS),
                                      "OpenVINO's INFERENCE_PRECISION_HINT: f32 (exact), or bf16 / f16 where the CPU "
                                      "has them (AMX, AVX512-BF16 / AVX512-FP16): faster, with its cosine to f32 "
                                      "measured at compile and recorded in the manifest")
    min_cosine: float = number(0.99, "(0, 1]", "a reduced inference_precision must keep this cosine (per sample, "
                               "against f32 on OpenVINO) on the compile check, else the compile is refused")
    performance_hint: str = choice("latency", ("latency", "throughput"),
                                   "OpenVINO's PERFORMANCE_HINT: latency (one request uses every core) or "
                                   "throughput (several streams for concurrent callers)")
    threads: int = integer(0, 0, 4096, "inference threads (0: OpenVINO's choice); load(threads=...) overrides it")
    save_ir: bool = flag(False, "store the converted model as OpenVINO IR in the build (openvino_model.xml / .bin), "
                                "so loading skips the ONNX conversion (the weights are stored twice)")
    shapes: dict | None = _key(None, "input name -> the shape OpenVINO compiles for, e.g. { input_ids = [1, 256], "
                               "attention_mask = [1, 256] }: static shapes run faster (shape arithmetic folded, "
                               "kernels for the sizes); other shapes are then refused; load(shapes=...) overrides",
                               (lambda v: isinstance(v, Mapping) and v and all(
                                   isinstance(k, str) and isinstance(d, (list, tuple)) and d
                                   and all(_is_int(i) and i >= 1 for i in d) for k, d in v.items()),
                                "{key} must map input names to shapes of positive integers, e.g. "
                                "{{ input_ids = [1, 256] }}, got {value!r}"),
                               convert=lambda v: {k: [int(i) for i in d] for k, d in v.items()})

    def _hidden(self) -> set[str]:
        return {"min_cosine"} if self.inference_precision == "f32" else set()


@dataclass(frozen=True)
class DecoderOptions(_Table):
    """[decoder]: how a causal LM is exported with its KV cache."""

    token_input: str = choice("input_ids", ("input_ids", "inputs_embeds"),
                              "the graph's token input: input_ids, or inputs_embeds for multimodal front ends that "
                              "splice image features into the prompt (the build then carries an embedding model "
                              "for text and generated tokens)")


def _table(cls: type):
    return field(default=None, metadata={"table": cls})


@dataclass(frozen=True)
class Recipe:
    token_pruning: TokenPruningOptions | None = _table(TokenPruningOptions)
    token_merging: TokenMergingOptions | None = _table(TokenMergingOptions)
    mixture_of_depths: MixtureOfDepthsOptions | None = _table(MixtureOfDepthsOptions)
    token_slimming: TokenSlimmingOptions | None = _table(TokenSlimmingOptions)
    sparse_attention: SparseAttentionOptions | None = _table(SparseAttentionOptions)
    quantization: QuantizationOptions | None = _table(QuantizationOptions)
    padding: PaddingOptions | None = _table(PaddingOptions)
    calibration: CalibrationOptions | None = _table(CalibrationOptions)
    onnxruntime: OnnxRuntimeOptions | None = _table(OnnxRuntimeOptions)
    openvino: OpenVINOOptions | None = _table(OpenVINOOptions)
    decoder: DecoderOptions | None = _table(DecoderOptions)
    source: str = field(default="<dict>", compare=False)

    @property
    def directory(self) -> Path | None:
        """Folder of the recipe file (relative paths in it resolve there); None for a dict."""
        return None if self.source == "<dict>" else Path(self.source).resolve().parent

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a TOML-like dict (what build manifests record): keys that do not
        apply and unset ones left out."""
        out: dict[str, Any] = {}
        for name in _TABLES:
            options = getattr(self, name)
            if options is not None:
                hidden = options._hidden()
                out[name] = {key: list(value) if isinstance(value, tuple) else value
                             for key, value in dataclasses.asdict(options).items()
                             if value is not None and key not in hidden}
        return out

    @property
    def span_table(self) -> TokenPruningOptions | MixtureOfDepthsOptions | None:
        """The table that reduces a span of the tokens ([token_pruning] or [mixture_of_depths];
        they are not combined): what a decoder's prompt reduction and the fewest tokens a build
        takes are read from."""
        return self.token_pruning or self.mixture_of_depths

    @property
    def is_empty(self) -> bool:
        return (self.token_pruning is None and self.token_merging is None and self.quantization is None
                and self.mixture_of_depths is None and self.sparse_attention is None
                and (self.token_slimming is None or not self.token_slimming.fuse)
                and (self.padding is None or not self.padding.trim_trailing)
                and (self.onnxruntime is None or not self.onnxruntime.fuse))


#: table name -> its options class
_TABLES = {f.name: f.metadata["table"] for f in dataclasses.fields(Recipe) if "table" in f.metadata}


def load_recipe(recipe: "Recipe | Mapping[str, Any] | str | Path | None") -> Recipe:
    """Accept a Recipe, a dict (as parsed from TOML), a path to a TOML file, or None (no passes)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if path.is_dir():
            raise RecipeError(f"recipe {path} is a folder; pass the recipe's .toml file")
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe {path} is not valid TOML: {exc}") from None
        except RecursionError:  # the parser recurses once per nesting level
            raise RecipeError(f"recipe {path} nests arrays or tables too deeply to read; a recipe needs at most "
                              "two levels") from None
        return _parse(data, str(path))
    if isinstance(recipe, Mapping):
        return _parse(recipe, "<dict>")
    raise RecipeError(f"recipe must be a TOML path, a dict or a Recipe, not {type(recipe).__name__}")


def _parse(data: Mapping[str, Any], source: str) -> Recipe:
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise RecipeError(f"{source}: unknown recipe table(s) {unknown}; known: {sorted(_TABLES)}")
    given = {name: table for name, table in data.items() if table is not None}
    token_tables = [name for name in ("token_pruning", "token_merging", "mixture_of_depths") if name in given]
    if len(token_tables) > 1:
        raise RecipeError(f"{source}: [{'] and ['.join(token_tables)}] cannot be combined yet; choose one")
    if "calibration" in given and "quantization" not in given:
        raise RecipeError(f"{source}: [calibration] without [quantization]; calibration data is only used "
                          "by quantization (add a [quantization] table or remove [calibration])")
    recipe = Recipe(**{name: read_table(_TABLES[name], table, f"{source}: [{name}]") for name, table in given.items()},
                    source=source)
    quant = recipe.quantization
    if quant is not None and recipe.calibration is None and quant.needs_calibration:
        if QUANTIZATION_METHODS[quant.method].needs_calibration:
            what = f'method = "{quant.method}"'
        elif quant.weights == "fp8":
            what = 'weights = "fp8" (static activation scales)'
        else:
            what = "min_cosine (the fidelity guard)"
        raise RecipeError(f'{source}: [quantization] {what} needs calibration data: add [calibration] source = "..." '
                          "(a folder of .npy/.npz feeds, a text file, or an image folder), or random = true "
                          "for a smoke test")
    return recipe


def read_table(cls: type, table: Any, where: str):
    """The options `cls` from one recipe table, checked against the `Key`s of its fields (a
    key left out, or None in a dict, takes the field's default) and its `_combine` rules."""
    if not isinstance(table, Mapping):
        raise RecipeError(f"{where} must be a table")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(table) - {f.name for f in fields})
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(f.name for f in fields)}")
    values = {f.name: f.metadata["key"].read(f.name, table.get(f.name), where) for f in fields
              if "key" in f.metadata and (table.get(f.name) is not None or f.metadata["key"].required)}
    return cls(**cls._combine(values, table, where))
