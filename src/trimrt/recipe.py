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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOKEN_PRUNING_METHODS = ("cls_attention", "last_token_attention")


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
class PaddingOptions:
    """[padding]: trim trailing padding before the first block (exact; outputs padded back)."""

    trim_trailing: bool = False


@dataclass(frozen=True)
class Recipe:
    token_pruning: TokenPruningOptions | None = None
    padding: PaddingOptions | None = None
    source: str = field(default="<dict>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.token_pruning is not None:
            tp = dataclasses.asdict(self.token_pruning)
            tp["layers"] = list(tp["layers"])
            if tp["prunable"] is None:
                del tp["prunable"]
            else:
                tp["prunable"] = list(tp["prunable"])
            out["token_pruning"] = tp
        if self.padding is not None:
            out["padding"] = dataclasses.asdict(self.padding)
        return out

    @property
    def is_empty(self) -> bool:
        return self.token_pruning is None and (self.padding is None or not self.padding.trim_trailing)


def load_recipe(recipe: "Recipe | Mapping[str, Any] | str | Path | None") -> Recipe:
    """Accept a Recipe, a dict (as parsed from TOML), a path to a TOML file, or None (no passes)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe {path} is not valid TOML: {exc}") from None
        return _parse(data, str(path))
    if isinstance(recipe, Mapping):
        return _parse(recipe, "<dict>")
    raise RecipeError(f"recipe must be a TOML path, a dict or a Recipe, not {type(recipe).__name__}")


def _parse(data: Mapping[str, Any], source: str) -> Recipe:
    known = {"token_pruning", "padding"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown recipe table(s) {unknown}; known: {sorted(known)}")
    tp = data.get("token_pruning")
    pad = data.get("padding")
    return Recipe(token_pruning=_parse_token_pruning(tp, source) if tp is not None else None,
                  padding=_parse_padding(pad, source) if pad is not None else None, source=source)


def _parse_padding(pad: Any, source: str) -> PaddingOptions:
    where = f"{source}: [padding]"
    if not isinstance(pad, Mapping):
        raise RecipeError(f"{where} must be a table")
    unknown = sorted(set(pad) - {"trim_trailing"})
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: ['trim_trailing']")
    trim = pad.get("trim_trailing", False)
    if not isinstance(trim, bool):
        raise RecipeError(f"{where}: trim_trailing must be true or false, got {trim!r}")
    return PaddingOptions(trim_trailing=trim)


def _parse_token_pruning(tp: Any, source: str) -> TokenPruningOptions:
    where = f"{source}: [token_pruning]"
    if not isinstance(tp, Mapping):
        raise RecipeError(f"{where} must be a table")
    allowed = {f.name for f in dataclasses.fields(TokenPruningOptions)}
    unknown = sorted(set(tp) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    method = tp.get("method", "cls_attention")
    if method not in TOKEN_PRUNING_METHODS:
        raise RecipeError(f"{where}: method {method!r} is not supported; choose one of {list(TOKEN_PRUNING_METHODS)}")
    layers = tp.get("layers")
    if not isinstance(layers, (list, tuple)) or not layers or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise RecipeError(f"{where}: layers must be a non-empty list of block indices, e.g. [3, 6, 9]")
    if any(i < 0 for i in layers):
        raise RecipeError(f"{where}: layers must be 0-based block indices >= 0, got {list(layers)}")
    if len(set(layers)) != len(layers):
        raise RecipeError(f"{where}: layers contains duplicates: {list(layers)}")
    keep = tp.get("keep")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise RecipeError(f"{where}: keep must be a number in (0, 1], got {keep!r}")
    protect = tp.get("protect", "cls")
    if not isinstance(protect, str) or not (protect in ("cls", "none") or re.fullmatch(r"first:[0-9]+", protect)):
        raise RecipeError(f"{where}: protect must be \"cls\", \"none\" or \"first:N\", got {protect!r}")
    fuse = tp.get("fuse_pruned", False)
    if not isinstance(fuse, bool):
        raise RecipeError(f"{where}: fuse_pruned must be true or false, got {fuse!r}")
    prunable = tp.get("prunable")
    if prunable is not None:
        if "protect" in tp:
            raise RecipeError(f"{where}: give either protect or prunable (tokens outside prunable are protected)")
        if (not isinstance(prunable, (list, tuple)) or len(prunable) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in prunable)
                or not 0 <= prunable[0] < prunable[1]):
            raise RecipeError(f"{where}: prunable must be [start, end) with 0 <= start < end, got {prunable!r}")
        prunable = (int(prunable[0]), int(prunable[1]))
    return TokenPruningOptions(method=method, layers=tuple(sorted(layers)), keep=float(keep),
                               protect=protect, fuse_pruned=fuse, prunable=prunable)
