"""Recipe: the typed, validated compile options, read from a TOML file or a dict.

Each table of the TOML file maps to one frozen dataclass that the matching pass takes
when it is constructed. Validation happens here, once, with one-line errors that name
the key and what is allowed; structural checks that need the model (does block 14
exist?) happen when the pass meets the model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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


@dataclass(frozen=True)
class TokenPruningOptions:
    """[token_pruning]: drop low-scoring tokens after the attention of some blocks."""

    method: str = "cls_attention"
    layers: tuple[int, ...] = ()
    keep: float = 1.0
    protect: str = "cls"
    fuse_pruned: bool = False
    #: [start, end): only these tokens may be pruned (e.g. the image tokens of a prompt)
    prunable: tuple[int, int] | None = None
    #: zero_tprune: PageRank iterations per listed layer (None: the paper's schedule by depth)
    iterations: tuple[int, ...] | None = None
    #: zero_tprune: heads whose score variance falls outside [low, high] are ignored
    head_variance: tuple[float, float] = (0.01, 0.7)
    #: recycle: dropped tokens are merged into one token per cell of a grid × grid layout
    recycle_grid: int = 2
    #: adaptive: keep the fewest tokens holding this share of the attention mass
    #: (`keep` is then the static upper bound)
    mass: float = 0.9

    @property
    def protected_prefix(self) -> int:
        """Number of leading tokens never pruned (the start of the prunable span)."""
        if self.prunable is not None:
            return self.prunable[0]
        if self.protect == "none":
            return 0
        if self.protect == "cls":
            return 1
        return int(self.protect.split(":", 1)[1])

    @property
    def span_end(self) -> int | None:
        """End (exclusive) of the prunable span; None: up to the last token."""
        return self.prunable[1] if self.prunable is not None else None

    def kept_count(self, prunable: int) -> int:
        """Prunable tokens kept at one layer: ceil(keep · prunable), at least 1."""
        return max(1, min(prunable, math.ceil(self.keep * prunable - 1e-9)))


@dataclass(frozen=True)
class TokenMergingOptions:
    """[token_merging]: ToMe — merge r tokens per block by bipartite soft matching."""

    #: tokens merged away at each listed block (one value: the same at every block)
    r: tuple[int, ...] = ()
    #: or, for inputs whose length varies: merge floor(ratio · tokens) at each block
    ratio: float = 0.0
    #: blocks that merge; empty: every block
    layers: tuple[int, ...] = ()
    protect: str = "cls"
    #: add log(size) to later attention logits, so a merged token weighs as the tokens it holds
    proportional_attention: bool = True
    #: weight a masked mean pooling after the blocks by size too (sentence embedders)
    weighted_pooling: bool = True

    @property
    def protected_prefix(self) -> int:
        return 1 if self.protect == "cls" else 0

    def schedule(self, depth: int) -> list[tuple[int, int]]:
        """(block, r) for a model of `depth` blocks; r = 0 means "use ratio"."""
        layers = self.layers or tuple(range(depth))
        r = self.r if len(self.r) == len(layers) else (self.r[0] if self.r else 0,) * len(layers)
        return list(zip(layers, r))


@dataclass(frozen=True)
class TokenSlimmingOptions:
    """[token_slimming]: fuse the model's own token slimming modules (SiT) into one op each."""

    fuse: bool = True


@dataclass(frozen=True)
class QuantizationOptions:
    """[quantization]: weight / activation formats, the method that picks the weights,
    and the fidelity guard. Methods other than rtn (and FP8's static activation scales,
    and the guard) need a [calibration] table."""

    weights: str = "int8"
    #: "none": weight-only (the float activations meet dequantized weights)
    activations: str = "int8"
    method: str = "rtn"
    #: int4 only: weights sharing one scale along the input axis (a power of two >= 16)
    group_size: int = 128
    #: smoothquant: migration strength in [0, 1]; None: searched on the calibration set
    alpha: float | None = None
    #: fidelity guard: keep the most sensitive layers in float until the output cosine on
    #: the held-out part of the calibration set (samples fitting never saw) is at least
    #: this (None: no guard)
    min_cosine: float | None = None

    @property
    def needs_calibration(self) -> bool:
        """True when building it needs activations (statistics, scales or a fidelity check)."""
        return self.method != "rtn" or self.weights == "fp8" or self.min_cosine is not None


@dataclass(frozen=True)
class CalibrationOptions:
    """[calibration]: the data quantization measures activations on.

    Exactly one of `source` (a folder of .npy/.npz feeds, a .txt file with one sample a
    line, or an image folder; relative to the recipe file) or `random` (a smoke test:
    statistics of random data say little about real inputs)."""

    source: str | None = None
    #: samples used (the first ones of the source, in sorted order), each of batch 1
    samples: int = 128
    random: bool = False
    #: text sources: AutoTokenizer name or folder
    tokenizer: str | None = None
    #: text sources: tokens per sample (default: the model's static length, else 128)
    max_length: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class PaddingOptions:
    """[padding]: trim trailing padding before the first block (exact; outputs padded back)."""

    trim_trailing: bool = False


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """[onnxruntime]: options of ONNX Runtime builds (the default target)."""

    #: fuse attention, GELU and skip-LayerNorm into ONNX Runtime's contrib kernels
    #: (checked against the unfused graph; TensorRT builds fuse on their own)
    fuse: bool = False


@dataclass(frozen=True)
class Recipe:
    token_pruning: TokenPruningOptions | None = None
    token_merging: TokenMergingOptions | None = None
    token_slimming: TokenSlimmingOptions | None = None
    quantization: QuantizationOptions | None = None
    padding: PaddingOptions | None = None
    calibration: CalibrationOptions | None = None
    onnxruntime: OnnxRuntimeOptions | None = None
    source: str = field(default="<dict>", compare=False)

    @property
    def directory(self) -> Path | None:
        """Folder of the recipe file (relative paths in it resolve there); None for a dict."""
        return None if self.source == "<dict>" else Path(self.source).resolve().parent

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.token_pruning is not None:
            tp = dataclasses.asdict(self.token_pruning)
            tp["layers"] = list(tp["layers"])
            if tp["prunable"] is None:
                del tp["prunable"]
            else:
                tp["prunable"] = list(tp["prunable"])
            owners = _method_keys()
            for key, value in list(tp.items()):
                if key in owners and owners[key] != tp["method"]:
                    del tp[key]
                elif isinstance(value, tuple):
                    tp[key] = list(value)
            if tp.get("iterations") is None:
                tp.pop("iterations", None)
            out["token_pruning"] = tp
        if self.token_merging is not None:
            tm = dataclasses.asdict(self.token_merging)
            tm["r"], tm["layers"] = list(tm["r"]), list(tm["layers"])
            if not tm["r"]:
                del tm["r"]
            else:
                del tm["ratio"]
            out["token_merging"] = tm
        if self.token_slimming is not None:
            out["token_slimming"] = dataclasses.asdict(self.token_slimming)
        if self.quantization is not None:
            q = {k: v for k, v in dataclasses.asdict(self.quantization).items() if v is not None}
            if q["weights"] != "int4":
                del q["group_size"]
            out["quantization"] = q
        if self.calibration is not None:
            cal = {k: v for k, v in dataclasses.asdict(self.calibration).items() if v is not None}
            if not cal["random"]:
                del cal["random"]
            out["calibration"] = cal
        if self.padding is not None:
            out["padding"] = dataclasses.asdict(self.padding)
        if self.onnxruntime is not None:
            out["onnxruntime"] = dataclasses.asdict(self.onnxruntime)
        return out

    @property
    def is_empty(self) -> bool:
        return (self.token_pruning is None and self.token_merging is None and self.quantization is None
                and (self.token_slimming is None or not self.token_slimming.fuse)
                and (self.padding is None or not self.padding.trim_trailing)
                and (self.onnxruntime is None or not self.onnxruntime.fuse))


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
    known = {"token_pruning", "token_merging", "token_slimming", "quantization", "padding", "calibration", "onnxruntime"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown recipe table(s) {unknown}; known: {sorted(known)}")
    tp = data.get("token_pruning")
    pad = data.get("padding")
    tm = data.get("token_merging")
    ts = data.get("token_slimming")
    if tp is not None and tm is not None:
        raise RecipeError(f"{source}: [token_pruning] and [token_merging] cannot be combined yet; choose one")
    quant, cal = _parse_quantization_and_calibration(data.get("quantization"), data.get("calibration"), source)
    return Recipe(token_pruning=_parse_token_pruning(tp, source) if tp is not None else None,
                  token_merging=_parse_token_merging(tm, source) if tm is not None else None,
                  token_slimming=_parse_token_slimming(ts, source) if ts is not None else None,
                  quantization=quant, calibration=cal,
                  padding=_parse_padding(pad, source) if pad is not None else None,
                  onnxruntime=_parse_onnxruntime(data["onnxruntime"], source) if "onnxruntime" in data else None,
                  source=source)


def _table(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where} must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def _flag(table: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_list(value: Any, where: str, key: str = "layers") -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(i) for i in value):
        raise RecipeError(f"{where}: {key} must be a non-empty list of block indices, e.g. [3, 6, 9]")
    if any(i < 0 for i in value):
        raise RecipeError(f"{where}: {key} must be 0-based block indices >= 0, got {list(value)}")
    if len(set(value)) != len(value):
        raise RecipeError(f"{where}: {key} contains duplicates: {list(value)}")
    return tuple(value)


def _parse_token_merging(tm: Any, source: str) -> TokenMergingOptions:
    where = f"{source}: [token_merging]"
    tm = _table(tm, where, {f.name for f in dataclasses.fields(TokenMergingOptions)})
    r, ratio = tm.get("r"), tm.get("ratio")
    layers = _block_list(tm["layers"], where) if "layers" in tm else None
    if (r is None) == (ratio is None):
        raise RecipeError(f"{where}: give r (tokens merged per block) or ratio (share of the tokens merged per "
                          "block, for inputs of varying length), not both")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 0.5:
            raise RecipeError(f"{where}: ratio must be a number in (0, 0.5) (a block can merge at most half "
                              f"of its tokens), got {ratio!r}")
        r = ()
    elif _is_int(r):
        if not 1 <= r <= MAX_TOKENS:
            raise RecipeError(f"{where}: r must be an integer in [1, {MAX_TOKENS}], got {r}")
        r = (r,) * len(layers) if layers is not None else (r,)
    elif isinstance(r, (list, tuple)) and r and all(_is_int(i) and 0 <= i <= MAX_TOKENS for i in r):
        r = tuple(r)
        if layers is None:
            layers = tuple(range(len(r)))
        elif len(layers) != len(r):
            raise RecipeError(f"{where}: r lists {len(r)} values for {len(layers)} layers")
    else:
        raise RecipeError(f"{where}: r must be a positive integer or a list of integers in [0, {MAX_TOKENS}] "
                          f"(one per block), got {r!r}")
    protect = tm.get("protect", "cls")
    if protect not in ("cls", "none"):
        raise RecipeError(f"{where}: protect must be \"cls\" or \"none\", got {protect!r}")
    prop = _flag(tm, "proportional_attention", True, where)
    weighted = _flag(tm, "weighted_pooling", True, where)
    if layers is not None and len(r) == len(layers):
        pairs = sorted(zip(layers, r))
        layers, r = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return TokenMergingOptions(r=tuple(r), ratio=float(ratio or 0.0), layers=tuple(sorted(layers or ())),
                               protect=protect, proportional_attention=prop, weighted_pooling=weighted)


#: (weights, activations) -> the methods that build them
QUANT_COMBINATIONS = {("int8", "int8"): ("rtn", "smoothquant", "gptq"),
                      ("int4", "none"): ("rtn", "awq", "gptq"),
                      ("fp8", "fp8"): ("rtn", "smoothquant")}
_QUANT_VALUES = {"weights": ("int8", "int4", "fp8"), "activations": ("int8", "fp8", "none"),
                 "method": ("rtn", "smoothquant", "awq", "gptq")}
#: activations when the recipe names only the weights
_DEFAULT_ACTIVATIONS = {"int8": "int8", "int4": "none", "fp8": "fp8"}


def _number(table: Mapping[str, Any], key: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan  # rejected by the caller's range check
    return float(value)


def _parse_quantization_and_calibration(q: Any, cal: Any, source: str
                                        ) -> tuple[QuantizationOptions | None, CalibrationOptions | None]:
    if cal is not None and q is None:
        raise RecipeError(f"{source}: [calibration] without [quantization]; calibration data is only used "
                          "by quantization (add a [quantization] table or remove [calibration])")
    quant = _parse_quantization(q, source) if q is not None else None
    calibration = _parse_calibration(cal, source) if cal is not None else None
    if quant is not None and calibration is None and quant.needs_calibration:
        if quant.method != "rtn":
            what = f'method = "{quant.method}"'
        elif quant.weights == "fp8":
            what = 'weights = "fp8" (static activation scales)'
        else:
            what = "min_cosine (the fidelity guard)"
        raise RecipeError(f'{source}: [quantization] {what} needs calibration data: add [calibration] source = "..." '
                          "(a folder of .npy/.npz feeds, a text file, or an image folder), or random = true "
                          "for a smoke test")
    return quant, calibration


def _parse_quantization(q: Any, source: str) -> QuantizationOptions:
    where = f"{source}: [quantization]"
    q = _table(q, where, {f.name for f in dataclasses.fields(QuantizationOptions)})
    chosen = {}
    for key, allowed in _QUANT_VALUES.items():
        default = _DEFAULT_ACTIVATIONS.get(chosen.get("weights")) if key == "activations" else allowed[0]
        value = q.get(key, default)
        if value not in allowed:
            raise RecipeError(f"{where}: {key} must be one of {list(allowed)}, got {value!r}")
        chosen[key] = value
    if chosen["method"] not in QUANT_COMBINATIONS.get((chosen["weights"], chosen["activations"]), ()):
        allowed = "; ".join(f"weights = {w!r}, activations = {a!r}: method in {list(m)}"
                            for (w, a), m in QUANT_COMBINATIONS.items())
        raise RecipeError(f"{where}: weights = {chosen['weights']!r}, activations = {chosen['activations']!r}, "
                          f"method = {chosen['method']!r} is not a supported combination; choose one of: {allowed}")
    if "group_size" in q:
        group = q["group_size"]
        if chosen["weights"] != "int4":
            raise RecipeError(f"{where}: group_size applies to int4 weights (weights is {chosen['weights']!r}); "
                              "remove it")
        if not _is_int(group) or group < 16 or group & (group - 1):
            raise RecipeError(f"{where}: group_size must be a power of two >= 16 (e.g. 128), got {group!r}")
        if group > MAX_GROUP_SIZE:
            raise RecipeError(f"{where}: group_size must be at most {MAX_GROUP_SIZE}, got {group}")
        chosen["group_size"] = group
    if "alpha" in q:
        if "alpha" not in QUANTIZATION_METHODS[chosen["method"]].recipe_keys:
            owners = " or ".join(f'"{m}"' for m in QUANTIZATION_METHODS if "alpha" in QUANTIZATION_METHODS[m].recipe_keys)
            raise RecipeError(f"{where}: alpha applies to method = {owners} only "
                              f"(method is {chosen['method']!r}); remove it")
        alpha = _number(q, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise RecipeError(f"{where}: alpha must be a number in [0, 1] (leave it out to search it), "
                              f"got {q['alpha']!r}")
        chosen["alpha"] = alpha
    if "min_cosine" in q:
        floor = _number(q, "min_cosine")
        if not 0.0 < floor <= 1.0:
            raise RecipeError(f"{where}: min_cosine must be a number in (0, 1], got {q['min_cosine']!r}")
        chosen["min_cosine"] = floor
    return QuantizationOptions(**chosen)


def _parse_calibration(cal: Any, source: str) -> CalibrationOptions:
    where = f"{source}: [calibration]"
    cal = _table(cal, where, {f.name for f in dataclasses.fields(CalibrationOptions)})
    random = _flag(cal, "random", False, where)
    data = cal.get("source")
    if data is not None and (not isinstance(data, str) or not data.strip()):
        raise RecipeError(f"{where}: source must be a path (a folder of .npy/.npz feeds, a .txt file, "
                          f"or an image folder), got {data!r}")
    if (data is None) == (not random):
        raise RecipeError(f"{where}: give exactly one of source = \"...\" (real calibration data) or "
                          "random = true (a smoke test)")
    ints = {}
    for key, low, high in (("samples", 1, MAX_CALIBRATION_SAMPLES), ("max_length", 1, MAX_TOKENS), ("seed", 0, 2**32 - 1)):
        if key in cal:
            value = cal[key]
            if not _is_int(value) or value < low:
                raise RecipeError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
            if value > high:
                raise RecipeError(f"{where}: {key} must be at most {high}, got {value}")
            ints[key] = value
    tokenizer = cal.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer.strip()):
        raise RecipeError(f"{where}: tokenizer must be a Hugging Face tokenizer name or folder, got {tokenizer!r}")
    return CalibrationOptions(source=data, random=random, tokenizer=tokenizer, **ints)


def _parse_token_slimming(ts: Any, source: str) -> TokenSlimmingOptions:
    where = f"{source}: [token_slimming]"
    ts = _table(ts, where, {"fuse"})
    return TokenSlimmingOptions(fuse=_flag(ts, "fuse", True, where))


def _parse_padding(pad: Any, source: str) -> PaddingOptions:
    where = f"{source}: [padding]"
    pad = _table(pad, where, {"trim_trailing"})
    return PaddingOptions(trim_trailing=_flag(pad, "trim_trailing", False, where))


def _parse_onnxruntime(table: Any, source: str) -> OnnxRuntimeOptions:
    where = f"{source}: [onnxruntime]"
    table = _table(table, where, {"fuse"})
    return OnnxRuntimeOptions(fuse=_flag(table, "fuse", False, where))


def _method_keys() -> dict[str, str]:
    """recipe key -> the token-pruning method it belongs to (keys of one method only)."""
    return {key: name for name in TOKEN_PRUNING_METHODS for key in TOKEN_PRUNING_METHODS[name].keys}


def _parse_token_pruning(tp: Any, source: str) -> TokenPruningOptions:
    where = f"{source}: [token_pruning]"
    tp = _table(tp, where, {f.name for f in dataclasses.fields(TokenPruningOptions)})
    method = tp.get("method", "cls_attention")
    if method not in TOKEN_PRUNING_METHODS:
        raise RecipeError(f"{where}: method {method!r} is not supported; choose one of {list(TOKEN_PRUNING_METHODS)}")
    layers = _block_list(tp.get("layers"), where)
    keep = tp.get("keep")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise RecipeError(f"{where}: keep must be a number in (0, 1], got {keep!r}")
    protect = tp.get("protect", "cls")
    if (not isinstance(protect, str) or not (protect in ("cls", "none") or re.fullmatch(r"first:[0-9]{1,9}", protect))
            or protect.startswith("first:") and int(protect[6:]) > MAX_TOKENS):
        raise RecipeError(f"{where}: protect must be \"cls\", \"none\" or \"first:N\" (N <= {MAX_TOKENS}), "
                          f"got {protect!r}")
    fuse = _flag(tp, "fuse_pruned", False, where)
    prunable = tp.get("prunable")
    if prunable is not None:
        if "protect" in tp:
            raise RecipeError(f"{where}: give either protect or prunable (tokens outside prunable are protected)")
        if (not isinstance(prunable, (list, tuple)) or len(prunable) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in prunable)
                or not 0 <= prunable[0] < prunable[1] <= MAX_TOKENS):
            raise RecipeError(f"{where}: prunable must be [start, end) with 0 <= start < end <= {MAX_TOKENS}, "
                              f"got {prunable!r}")
        prunable = (int(prunable[0]), int(prunable[1]))
    for key, owner in _method_keys().items():
        if key in tp and method != owner:
            raise RecipeError(f"{where}: {key} applies to method = \"{owner}\" only (method is {method!r})")
    chosen = TOKEN_PRUNING_METHODS[method]
    extra = chosen.parse(tp, where, layers)
    if fuse and chosen.no_fuse is not None:
        raise RecipeError(f"{where}: fuse_pruned does not apply to method {method!r} ({chosen.no_fuse})")
    return TokenPruningOptions(method=method, layers=tuple(sorted(layers)), keep=float(keep),
                               protect=protect, fuse_pruned=fuse, prunable=prunable, **extra)
