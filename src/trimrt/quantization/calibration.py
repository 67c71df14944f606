"""Calibration: the feeds quantization measures activations on, and the statistics it needs.

`load_calibration_feeds` turns a [calibration] table into feeds of batch 1 (from .npy/.npz
files, a tokenized text file, an image folder or random data); `collect_activation_stats`
runs the float model with the chosen tensors exposed and folds them, one feed at a time
(never the whole set's activations in memory), into `ActivationStats` over their last axis.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..compiler.progress import steps
from ..errors import CalibrationError, InputError
from ..recipe import CalibrationOptions
from ..runtime.feeds import TensorInfo, random_feeds, validate_feeds

log = logging.getLogger(__name__)

FEED_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: tokens per text sample when neither the recipe nor the model fixes a length
DEFAULT_TEXT_LENGTH = 128
#: the inputs a tokenizer makes
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
STATISTICS = frozenset({"absmax", "hessian", "rows", "range"})

Feed = dict[str, np.ndarray]


def model_inputs(model: Any) -> list[TensorInfo]:
    """The inputs (name, numpy dtype, shape with str for dynamic dims) of an ONNX model:
    a path, a ModelProto or an onnx_ir Model."""
    import onnx

    proto = _as_proto(model)
    weights = {t.name for t in proto.graph.initializer}

    def info(value) -> TensorInfo:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        return TensorInfo(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape)

    return [info(value) for value in proto.graph.input if value.name not in weights]


def load_calibration_feeds(options: CalibrationOptions, inputs: Sequence[TensorInfo],
                           recipe_dir: Path | None = None) -> list[Feed]:
    """One feed (input name -> array of batch 1) per calibration sample, at most
    `options.samples`, validated against the model's `inputs`. A decoder with a KV cache is
    calibrated on prefill steps: the samples give its tokens, and the past (empty) and the
    positions are filled in."""
    state = _decoder_state(inputs)
    if state:
        prompts = [i for i in inputs if i.name not in state]
        return [_checked({**feed, **_prefill(feed, state)}, inputs, "calibration sample")
                for feed in load_calibration_feeds(options, prompts, recipe_dir)]
    if options.random:
        return _random(options, inputs)
    path = Path(options.source).expanduser()
    if not path.is_absolute():
        path = (recipe_dir or Path.cwd()) / path
    if not path.exists():
        raise CalibrationError(f"calibration source not found: {path} (a relative source is read from the recipe file's folder)")
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise CalibrationError(f"calibration source {path} is a file but not a .txt text file; give a folder "
                                   "of .npy/.npz feeds, a folder of images, or a .txt file with one sample a line")
        feeds = _text(path, options, inputs, recipe_dir)
    else:
        files = sorted(p for p in path.iterdir() if p.is_file())
        arrays = [p for p in files if p.suffix.lower() in FEED_SUFFIXES]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if arrays and images:
            raise CalibrationError(f"calibration folder {path} mixes .npy/.npz feeds and images; keep one kind")
        if arrays:
            feeds = _feed_files(arrays, options.samples, inputs)
        elif images:
            feeds = _images(images[:options.samples], inputs)
        else:
            raise CalibrationError(f"calibration folder {path} has no usable files: put .npy/.npz feeds or "
                                   ".png/.jpg images in it")
    if len(feeds) < options.samples:
        log.warning("calibration: %s holds %d samples (samples = %d asked)", path, len(feeds), options.samples)
    log.info("calibration: %d samples from %s", len(feeds), path)
    return feeds


def _decoder_state(inputs: Sequence[TensorInfo]) -> dict[str, TensorInfo]:
    """A KV-cache decoder's past and position inputs ({} for other models)."""
    from ..runtime.kv_cache import POSITION_IDS, past_layers

    if not past_layers([i.name for i in inputs]):
        return {}
    return {i.name: i for i in inputs if i.name.startswith("past_key_values.") or i.name == POSITION_IDS}


def _prefill(feed: Feed, state: dict[str, TensorInfo]) -> Feed:
    """The past (length 0) and positions of a prefill step on `feed`'s tokens."""
    tokens = next(v for v in feed.values() if v.ndim >= 2)
    batch, length = tokens.shape[:2]
    mask = feed.get("attention_mask", np.ones((batch, length), np.int64))
    out = {}
    for name, info in state.items():
        if name.startswith("past_key_values."):
            out[name] = np.zeros((batch, info.shape[1], 0, info.shape[3]), info.dtype)
        else:
            out[name] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(info.dtype)
    return out


def _checked(feed: Mapping[str, np.ndarray], inputs: Sequence[TensorInfo], where: str) -> Feed:
    try:
        return validate_feeds(inputs, feed)
    except InputError as exc:
        raise CalibrationError(f"{where}: {exc}") from None


def _random(options: CalibrationOptions, inputs: Sequence[TensorInfo]) -> list[Feed]:
    message = ("calibrating on random data: statistics and fidelity numbers from random inputs say little "
               "about real ones; use [calibration] source = \"...\" for a real build")
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    tokens = options.max_length or DEFAULT_TEXT_LENGTH
    return [random_feeds(inputs, batch=1, seed=options.seed + i, tokens=tokens) for i in range(options.samples)]


def _feed_files(files: list[Path], samples: int, inputs: Sequence[TensorInfo]) -> list[Feed]:
    """Each file holds a batch (axis 0) of samples; split into feeds of batch 1."""
    feeds: list[Feed] = []
    for path in files:
        if len(feeds) >= samples:
            break
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
            raise CalibrationError(f"cannot read calibration file {path} as .npy/.npz: {exc}") from None
        if isinstance(data, np.ndarray):
            if len(inputs) != 1:
                raise CalibrationError(f"{path}: a .npy file holds one array but the model takes {len(inputs)} "
                                       f"inputs {[i.name for i in inputs]}; save .npz files keyed by input name")
            arrays = {inputs[0].name: data}
        else:
            with data:
                arrays = {key: data[key] for key in data.files}
        batched = [i.name for i in inputs if len(i.shape) >= 1 and i.name in arrays and arrays[i.name].ndim >= 1]
        sizes = {arrays[name].shape[0] for name in batched}
        if len(sizes) > 1:
            raise CalibrationError(f"{path}: arrays disagree on the batch size (axis 0): "
                                   f"{ {name: arrays[name].shape[0] for name in batched} }")
        for b in range(min(sizes.pop() if sizes else 1, samples - len(feeds))):
            sample = {k: (v[b:b + 1] if k in batched else v) for k, v in arrays.items()}
            feeds.append(_checked(sample, inputs, str(path)))
    return feeds


def _load_tokenizer(name: str, recipe_dir: Path | None):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CalibrationError('tokenizing text calibration data needs transformers: pip install "trimrt[hf]"') from None
    local = Path(name).expanduser()
    if not local.is_absolute() and recipe_dir is not None and (recipe_dir / local).exists():
        local = recipe_dir / local
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's tokenizer setting
        raise CalibrationError(f"cannot load the tokenizer {name!r}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _text(path: Path, options: CalibrationOptions, inputs: Sequence[TensorInfo], recipe_dir: Path | None) -> list[Feed]:
    """One sample per non-empty line, tokenized, truncated (padded only to a static length)."""
    if options.tokenizer is None:
        raise CalibrationError(f"text calibration data {path.name} needs a tokenizer: add [calibration] "
                               "tokenizer = \"<Hugging Face name or folder>\"")
    not_text = [i.name for i in inputs if i.name not in TEXT_INPUTS]
    if not_text:
        raise CalibrationError(f"text calibration data cannot fill the model's input(s) {not_text} (a tokenizer "
                               f"makes {list(TEXT_INPUTS)}); give a folder of .npz feeds instead")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise CalibrationError(f"calibration text {path} is not UTF-8 text") from None
    lines = [line for line in lines if line][:options.samples]
    if not lines:
        raise CalibrationError(f"calibration text {path} has no non-empty lines")
    static = {i.shape[1] for i in inputs if len(i.shape) == 2 and isinstance(i.shape[1], int)}
    if len(static) > 1:
        raise CalibrationError(f"the model's text inputs have different static lengths {sorted(static)}")
    length = options.max_length or (next(iter(static)) if static else DEFAULT_TEXT_LENGTH)
    if static and length not in static:
        raise CalibrationError(f"[calibration] max_length = {length}, but the model's inputs have a static "
                               f"length of {next(iter(static))}; remove max_length or set it to that")
    tokenizer = _load_tokenizer(options.tokenizer, recipe_dir)
    feeds = []
    for number, line in enumerate(lines, 1):
        encoded = tokenizer(line, truncation=True, max_length=length,
                            padding="max_length" if static else False, return_tensors="np")
        missing = [i.name for i in inputs if i.name not in encoded]
        if missing:
            raise CalibrationError(f"the tokenizer {options.tokenizer!r} does not make the model's input(s) {missing}")
        feed = {i.name: np.asarray(encoded[i.name]).astype(i.dtype) for i in inputs}
        feeds.append(_checked(feed, inputs, f"{path.name} line {number}"))
    return feeds


def _pixel_input(inputs: Sequence[TensorInfo]) -> tuple[TensorInfo, int, int]:
    if len(inputs) != 1:
        raise CalibrationError(f"image calibration data fills one image input, but the model takes "
                               f"{[i.name for i in inputs]}; give a folder of .npz feeds instead")
    info = inputs[0]
    if not np.issubdtype(info.dtype, np.floating) or len(info.shape) != 4:
        raise CalibrationError(f"image calibration data needs a float NCHW image input, but the model takes {info.describe()}")
    channels, height, width = info.shape[1:]
    if isinstance(channels, int) and channels != 3:
        raise CalibrationError(f"image calibration data is RGB, but the model's input has {channels} channels "
                               f"({info.describe()})")
    if not (isinstance(height, int) and isinstance(width, int)):
        raise CalibrationError(f"image calibration data is resized to the model's input size, but "
                               f"{info.describe()} has no static height x width; give .npz feeds instead")
    return info, height, width


def _images(files: list[Path], inputs: Sequence[TensorInfo]) -> list[Feed]:
    """RGB, resized to the input's H x W, scaled to [0, 1], ImageNet-normalised, NCHW."""
    info, height, width = _pixel_input(inputs)
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationError('reading calibration images needs pillow: pip install "trimrt[images]"') from None
    feeds = []
    for path in files:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        except Exception as exc:  # noqa: BLE001 - pillow raises many types for bad files
            raise CalibrationError(f"cannot read calibration image {path}: {exc}") from None
        pixels = (np.asarray(rgb, dtype=np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        feeds.append({info.name: pixels.transpose(2, 0, 1)[None].astype(info.dtype)})
    return feeds


class RowReservoir:
    """A uniform random sample of at most `capacity` rows from a stream of row blocks
    (reservoir sampling, algorithm R): every row seen so far is kept with equal probability."""

    def __init__(self, capacity: int, width: int, rng: np.random.Generator):
        self.rows = np.empty((capacity, width), dtype=np.float32)
        self.capacity, self.seen, self.rng = capacity, 0, rng

    def add(self, block: np.ndarray) -> None:
        fill = min(self.capacity - min(self.seen, self.capacity), len(block))
        self.rows[self.seen:self.seen + fill] = block[:fill]
        rest = block[fill:]
        if len(rest):
            # row t (0-based in the stream) replaces slot j ~ U{0..t} when j < capacity
            positions = np.arange(self.seen + fill, self.seen + len(block)) + 1
            slots = (self.rng.random(len(rest)) * positions).astype(np.int64)
            hit = slots < self.capacity
            slots, chosen = slots[hit], rest[hit]
            # a slot replaced twice in this block keeps the later row, as in the sequential algorithm
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self.rows[slots[last]] = chosen[last]
        self.seen += len(block)

    def sample(self) -> np.ndarray:
        return self.rows[:min(self.seen, self.capacity)].copy()


@dataclass
class ActivationStats:
    """What calibration measured about one tensor, over its last axis K (None: not asked for)."""

    name: str
    #: rows seen (all axes but the last, flattened, summed over samples)
    rows_seen: int = 0
    absmax: np.ndarray | None = None   # [K] float32 max |x| per channel (SmoothQuant's s, AWQ's saliency)
    hessian: np.ndarray | None = None  # [K, K] float64 GPTQ's H = 2 · Σ xᵀx / rows_seen
    rows: np.ndarray | None = None     # [min(rows_seen, max_rows), K] float32, uniform over all samples
    range: tuple[float, float] | None = None  # (min, max) over every element (static fp8 scales)


class _Accumulator:
    def __init__(self, name: str, want: frozenset[str], max_rows: int, rng: np.random.Generator):
        self.name, self.want, self.max_rows, self.rng = name, want, max_rows, rng
        self.width: int | None = None
        self.rows_seen = 0
        self.absmax = self.xtx = self.reservoir = None
        self.low, self.high = np.inf, -np.inf

    def add(self, x: np.ndarray) -> None:
        if self.want == {"range"}:  # per tensor only: any shape (the last axis may be a token axis, as in kᵀ)
            rows = x.reshape(-1, 1)
        else:
            rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
        if self.width is None:
            self.width = width = rows.shape[1]
            self.absmax = np.zeros(width, dtype=np.float32) if "absmax" in self.want else None
            self.xtx = np.zeros((width, width), dtype=np.float64) if "hessian" in self.want else None
            self.reservoir = RowReservoir(self.max_rows, width, self.rng) if "rows" in self.want else None
        elif rows.shape[1] != self.width:
            raise ValueError(f"{self.name}: last axis changed from {self.width} to {rows.shape[1]} between samples")
        if not len(rows):
            return
        self.rows_seen += len(rows)
        if self.absmax is not None:
            np.maximum(self.absmax, np.abs(rows).max(axis=0).astype(np.float32), out=self.absmax)
        if self.xtx is not None:
            wide = rows.astype(np.float64)
            self.xtx += wide.T @ wide
        if self.reservoir is not None:
            self.reservoir.add(rows.astype(np.float32))
        if "range" in self.want:
            self.low, self.high = min(self.low, float(rows.min())), max(self.high, float(rows.max()))

    def result(self) -> ActivationStats:
        return ActivationStats(self.name, self.rows_seen, absmax=self.absmax,
                               hessian=None if self.xtx is None else 2.0 * self.xtx / max(self.rows_seen, 1),
                               rows=None if self.reservoir is None else self.reservoir.sample(),
                               range=(self.low, self.high) if "range" in self.want and self.rows_seen else None)


def _as_proto(model: Any):
    import onnx

    if isinstance(model, (str, Path)):
        return onnx.load(str(model))
    if isinstance(model, onnx.ModelProto):
        return model  # read only: OnnxRunner runs a copy with the exposed outputs
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)  # a new proto; the IR model is untouched
    raise TypeError(f"expected an ONNX path, ModelProto or onnx_ir.Model, got {type(model).__name__}")


def collect_activation_stats(model: Any, feeds: Iterable[Mapping[str, np.ndarray]], value_names: Sequence[str],
                             want: Iterable[str] = STATISTICS, max_rows: int = 4096, progress: bool = True,
                             seed: int = 0, tensor_ranges: Sequence[str] = ()) -> dict[str, ActivationStats]:
    """Run the float `model` (path, ModelProto or onnx_ir Model; never modified) on each
    feed and return, per name in `value_names` (graph inputs or node outputs), the
    statistics in `want` (a subset of absmax, hessian, rows, range), and per name in
    `tensor_ranges` its range alone (of tensors whose last axis may change between samples)."""
    from ..compiler.onnx_runner import OnnxRunner

    want = frozenset(want)
    if want - STATISTICS:
        raise ValueError(f"unknown statistics {sorted(want - STATISTICS)}; known: {sorted(STATISTICS)}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    names = list(dict.fromkeys([*value_names, *tensor_ranges]))
    proto = _as_proto(model)
    graph_inputs = {v.name for v in proto.graph.input}
    fetched = [n for n in names if n not in graph_inputs]
    runner = OnnxRunner(proto, fetched, optimize="basic")
    rng = np.random.default_rng(seed)
    accumulators = {n: _Accumulator(n, want, max_rows, rng) for n in value_names}
    accumulators.update({n: _Accumulator(n, frozenset({"range"}), max_rows, rng)
                         for n in tensor_ranges if n not in accumulators})
    feeds = list(feeds) if not isinstance(feeds, Sequence) else feeds
    with steps("calibrating", len(feeds), enabled=progress) as advance:
        for feed in feeds:
            values = runner.run(feed, fetched) if fetched else {}
            for name in names:
                accumulators[name].add(np.asarray(values[name] if name in values else feed[name]))
            advance()
    return {n: acc.result() for n, acc in accumulators.items()}
