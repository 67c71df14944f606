"""Feeds: validation against a model's inputs, and random feeds for verify / bench."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of a model: name, numpy dtype and shape (ints or symbolic names)."""

    name: str
    dtype: np.dtype
    shape: tuple
    #: an input with a default value in the model (an overridable initializer): feed it or not
    optional: bool = False

    @classmethod
    def from_ort(cls, arg, optional: bool = False) -> "TensorInfo":
        dtype = np.dtype(_ORT_TYPES.get(arg.type, np.float32))
        return cls(arg.name, dtype, tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape), optional)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype.name}[{', '.join(str(d) for d in self.shape)}]"


def validate_feeds(inputs: Sequence[TensorInfo], feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Check names, dtypes, ranks and static dims; one-line InputError naming the problem."""
    expected = {i.name: i for i in inputs}
    unknown = sorted(set(feeds) - set(expected), key=str)
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the model takes {sorted(expected)}")
    missing = sorted(n for n, i in expected.items() if n not in feeds and not i.optional)
    if missing:
        raise InputError(f"missing input(s) {missing}; expected {', '.join(i.describe() for i in inputs)}")
    out = {}
    for name, info in expected.items():
        if name not in feeds:  # an optional input left at its default
            continue
        try:
            arr = np.asarray(feeds[name])
        except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot convert
            raise InputError(f"input {name!r} is not an array ({str(exc).splitlines()[0]}); "
                             f"pass a numpy array {info.describe()}") from None
        if arr.dtype != info.dtype:
            raise InputError(f"input {name!r} must be {info.dtype.name}, got {arr.dtype.name} (cast it with .astype(np.{info.dtype.name}))")
        if arr.ndim != len(info.shape):
            raise InputError(f"input {name!r} must have rank {len(info.shape)} ({info.describe()}), got shape {list(arr.shape)}")
        for axis, (want, got) in enumerate(zip(info.shape, arr.shape)):
            if isinstance(want, int) and want != got:
                raise InputError(f"input {name!r} axis {axis} must be {want} ({info.describe()}), got shape {list(arr.shape)}")
        out[name] = arr
    return out


#: size given to dynamic non-batch axes (tokens) when neither hints nor a length are given
DEFAULT_TOKENS = 32


def concrete_shape(info: TensorInfo, batch: int, hints: Mapping[str, Sequence[int]] | None = None,
                   tokens: int | None = None) -> tuple[int, ...]:
    """A concrete shape for `info`: symbolic axis 0 -> batch; other symbolic axes -> `tokens`,
    else the size in `hints` (e.g. the example shapes of the manifest), else DEFAULT_TOKENS."""
    hint = (hints or {}).get(info.name)

    def size(axis: int, d) -> int:
        if isinstance(d, int):
            return d
        if axis == 0:
            return batch
        if tokens is not None:
            return int(tokens)
        return int(hint[axis]) if hint is not None and axis < len(hint) else DEFAULT_TOKENS

    return tuple(size(axis, d) for axis, d in enumerate(info.shape))


def random_feeds(inputs: Sequence[TensorInfo], *, batch: int = 1, seed: int = 0,
                 hints: Mapping[str, Sequence[int]] | None = None, tokens: int | None = None,
                 limits: Mapping | None = None) -> dict[str, np.ndarray]:
    """Random inputs: standard normal floats; integers in [0, 100) (token ids), ones for masks.

    `limits` (a manifest's `input_limits`) keeps token ids inside a smaller vocabulary and,
    when neither `tokens` nor a hint sets the length, the default length within the
    position table: tiny models (vocabulary 99, 16 positions) get feeds they can run."""
    limits = limits or {}
    id_limits = {name: int(v["limit"]) for name, v in (limits.get("ids") or {}).items()}
    max_tokens = (limits.get("tokens") or {}).get("limit")
    if tokens is None and max_tokens is not None:
        tokens = min(DEFAULT_TOKENS, int(max_tokens)) if not hints else None
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in inputs:
        if info.optional:  # its default is the meaningful value
            continue
        shape = concrete_shape(info, batch, hints, tokens)
        if np.issubdtype(info.dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
        elif "mask" in info.name.lower() or info.dtype == np.bool_:
            feeds[info.name] = np.ones(shape, dtype=info.dtype)
        else:
            high = max(1, min(100, id_limits.get(info.name, 100)))
            feeds[info.name] = rng.integers(0, high, size=shape).astype(info.dtype)
    return feeds


def build_feeds(manifest: Mapping, inputs: Sequence[TensorInfo], *, batch: int = 1, seed: int = 0,
                tokens: int | None = None) -> dict[str, np.ndarray]:
    """Random feeds for a build (verify, bench): a decoder's consistent decode step (`tokens`
    new tokens on a random past; a prompt of the example's length on an empty past when the
    build prunes prompts), else `random_feeds` within the build's example shapes and input limits."""
    if manifest.get("decoder"):
        from .kv_cache import DecoderSpec

        spec = DecoderSpec.from_manifest(manifest, "the build")
        if spec.prompt_fed:  # what the build changes is its prompt
            prompt = tokens or manifest["example_shapes"][spec.token_input][1]
            return spec.random_feeds(batch, new=max(prompt, manifest.get("min_tokens") or 0), past=0, seed=seed)
        return spec.random_feeds(batch, new=tokens or 5, seed=seed)
    return random_feeds(inputs, batch=batch, seed=seed, hints=manifest.get("example_shapes"), tokens=tokens,
                        limits=manifest.get("input_limits"))


def load_feed_files(specs: Sequence[str]) -> dict[str, np.ndarray]:
    """`NAME=FILE.npy` items, or `FILE.npz` holding arrays by input name.

    The file's first bytes say what it is (numpy's magic, or a zip for .npz): anything else is
    refused by name, rather than with numpy's advice to unpickle it."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if sep and not file:
            raise InputError(f"--input {spec} names no file: give NAME=FILE.npy")
        path = Path(file if sep else name)
        if not path.is_file():
            raise InputError(f"input file not found: {path}")
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
            raise InputError(f"{path} is not a .npy or .npz file (write inputs with numpy.save or numpy.savez)")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.ndarray):
                data = {k: data[k] for k in data.files}
        except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
            reason = "it holds Python objects, not plain arrays" if "pickle" in str(exc) else str(exc).splitlines()[0]
            raise InputError(f"cannot read {path} as .npy/.npz: {reason}") from None
        if isinstance(data, np.ndarray):
            if not sep:
                raise InputError(f"{path}: a .npy file needs a name: --input NAME={path}")
            data = {name: data}
        twice = sorted(set(data) & set(feeds))
        if twice:
            raise InputError(f"input(s) {twice} given twice (again in {path}); give each input once")
        feeds.update(data)
    return feeds
