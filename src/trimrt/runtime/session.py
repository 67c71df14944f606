"""Session: a loaded build, its inputs/outputs, validated feeds, thread-safe runs.

Nothing ONNX Runtime raises reaches the caller raw: what can be known before running
(names, dtypes, shapes, token ids against the vocabulary, token count against the position
table, outputs asked for) is checked first, and whatever the backend still raises becomes
an InputError / RunError naming the failing node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BackendUnavailableError, BuildLoadError, InputError, RunError, SessionClosedError, TrimrtError
from .backends import Backend, OnnxRuntimeBackend, OpenVINOBackend, TensorRTBackend, one_row_at_a_time, row_feeds
from .feeds import TensorInfo, validate_feeds
from .kv_cache import ATTENTION_MASK, KINDS, PRESENT_PREFIX, KVCache, is_past_name, past_name
from .manifest import ENGINE, MODEL, onnxruntime_settings, openvino_settings, read_manifest

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")


class Session:
    """Run a trimrt build. Safe to call from several threads (the backend session is shared,
    read-only; ONNX Runtime's run is thread-safe). Use it as a context manager, or call
    close(), to release the backend."""

    def __init__(self, build_dir: str | Path, backend: str = "auto", *, threads: int | None = None,
                 check_hashes: bool = True, spinning: bool = True, shapes: Mapping[str, list[int]] | None = None):
        self.build_dir = Path(build_dir)
        self._closed = True  # until the backend is up
        self.manifest = read_manifest(self.build_dir, check_hashes=check_hashes)
        if backend not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        engine = self.build_dir / ENGINE
        if backend == "tensorrt" or (backend == "auto" and engine.is_file() and TensorRTBackend.available()):
            if not engine.is_file():
                raise BackendUnavailableError(f"{self.build_dir} has no {ENGINE}; compile with --target tensorrt on a GPU machine")
            self.backend: Backend = TensorRTBackend(engine)
            file = ENGINE
        elif backend == "openvino" or (backend == "auto" and self.manifest.get("target") == "openvino"
                                        and OpenVINOBackend.available()):
            settings = openvino_settings(self.manifest, self.build_dir)
            settings["threads"] = threads or settings["threads"]
            settings["shapes"] = settings["shapes"] if shapes is None else shapes
            self.backend = OpenVINOBackend(**settings)
            file = settings["model"].name
        else:
            self.backend = OnnxRuntimeBackend(self.build_dir / MODEL, threads=threads, spinning=spinning,
                                              **onnxruntime_settings(self.manifest))
            file = MODEL
        if shapes and self.backend.name != "openvino":
            raise BackendUnavailableError(f"shapes= fixes the input shapes OpenVINO compiles for; this session runs "
                                          f"on {_engine_name(self.backend)} (load with backend='openvino')")
        try:
            self.backend.activate()
        except TrimrtError:
            raise
        except Exception as exc:  # noqa: BLE001 - a listed, hash-consistent file the backend cannot load
            what = ("run it with backend='onnxruntime'" if self.backend.name == "openvino" else "recompile the build")
            raise BuildLoadError(f"{self.build_dir}: {_engine_name(self.backend)} cannot load {file}: "
                                 f"{_backend_message(exc)}; {what}") from None
        self._limits = self.manifest.get("input_limits") or {}
        self._step_inputs: list[TensorInfo] | None = None  # the inputs but the past (run_with_cache)
        self._step_outputs: list[str] = []  # the outputs but the presents (run_with_cache)
        self._closed = False

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self.backend.inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self.backend.outputs)

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, feeds: Mapping[str, object], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Validate `feeds` (names, dtypes, shapes, token ids and counts) and run; returns
        {output name: array} for `output_names` (default: every output)."""
        self._check_open()
        if not isinstance(feeds, Mapping):
            raise InputError(f"feeds must be a mapping {{input name: array}}, got a {type(feeds).__name__}; "
                             f"the model takes {[i.name for i in self.inputs]}")
        names = self._output_names(output_names)
        checked = validate_feeds(self.inputs, feeds)
        self._check_values(checked)
        try:
            return self.backend.infer(checked, names)
        except TrimrtError:
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise their own types; the caller gets ours
            raise _run_error(exc, self.backend) from None

    def run_with_cache(self, feeds: Mapping[str, object], cache: KVCache, *, check: bool = True) -> dict[str, np.ndarray]:
        """A step of a shared-buffer decoder build (spec `shared_buffer`): `feeds` without the
        past, which `cache` holds and takes this step's keys / values into, in place (made room
        for here). Returns the outputs but the present key / values. `check=False` skips the
        feeds' validation: for the generator's decode steps, whose feeds it makes itself from a
        checked prompt (about 0.05 ms of a 5 ms INT4 step)."""
        self._check_open()
        if not self.backend.in_place:
            raise InputError(f"the {self.backend.name} backend cannot share cache buffers; use run() with the past")
        if self._step_inputs is None:
            self._step_inputs = [i for i in self.inputs if not is_past_name(i.name)]
            self._step_outputs = [o.name for o in self.outputs if not o.name.startswith(PRESENT_PREFIX)]
        names = self._step_outputs
        new = np.shape(feeds.get(ATTENTION_MASK))[-1] - cache.length if ATTENTION_MASK in feeds else 0
        cache.reserve(cache.length + max(new, 0))
        if check:  # the past is the cache's own (its geometry is the spec's): the step's feeds are checked
            feeds = validate_feeds(self._step_inputs, feeds)
            self._check_values(feeds, decoding=cache.length > 0)
        try:
            try:
                out = self.backend.infer_in_place(feeds, cache.bindings(), names, cache.backend_state)
            except Exception as exc:  # noqa: BLE001 - ORT's own types
                if not one_row_at_a_time(exc):
                    raise
                rows = [self.backend.infer_in_place(row_feeds(feeds, r), cache.bindings(r), names)
                        for r in range(cache.batch)]
                out = {name: np.concatenate([row[name] for row in rows]) for name in names}
        except TrimrtError:
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise their own types; the caller gets ours
            raise _run_error(exc, self.backend) from None
        cache.length += new
        return out

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        return self.run(feeds)

    def generator(self, tokenizer=None, speculation=None):
        """A Generator over this decoder build (BuildLoadError if the build has no KV cache);
        `tokenizer`: a tokenizer object, a tokenizer.json file or a folder holding one;
        `speculation`: "prompt_lookup", "token_recycling" (or a speculation.Drafter): drafts
        verified in one step each, the same tokens as greedy decoding (greedy only)."""
        from .generation import Generator

        self._check_open()
        return Generator(self, tokenizer, speculation=speculation)

    def close(self) -> None:
        """Release the backend; later runs raise SessionClosedError. Closing twice is fine."""
        self._closed = True
        self.backend.deactivate()

    def __enter__(self) -> "Session":
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"the session of {self.build_dir} is closed; load the build again with trimrt.load()")

    def _output_names(self, output_names) -> list[str] | None:
        if output_names is None:
            return None
        if isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
            raise InputError(f"output_names must be a list of output names, e.g. [{self.outputs[0].name!r}], "
                             f"got {output_names!r}")
        known = [o.name for o in self.outputs]
        unknown = [n for n in output_names if n not in known]
        if unknown:
            raise InputError(f"unknown output(s) {unknown}; the model gives {known}")
        return list(output_names) or None

    def _check_values(self, feeds: dict[str, np.ndarray], decoding: bool = False) -> None:
        """What the graph would fail on (or silently get wrong) but the manifest tells in advance;
        `decoding`: a decoder's step on a past (its prompt is past), also told by a past fed."""
        min_tokens = self.manifest.get("min_tokens") or 0
        past = feeds.get(past_name(0, KINDS[0]))
        if decoding or (past is not None and past.ndim == 4 and past.shape[2] > 0):
            min_tokens = 0
        for info in self.inputs:
            arr = feeds.get(info.name)
            if arr is None:  # an optional input left at its default
                continue
            if arr.ndim and not isinstance(info.shape[0], int) and arr.shape[0] == 0:
                raise InputError(f"axis 0 of input {info.name!r} is empty (shape {list(arr.shape)}); give at least one sample")
            if min_tokens and arr.ndim >= 2 and not isinstance(info.shape[1], int) and arr.shape[1] < min_tokens:
                raise InputError(f"input {info.name!r} has {arr.shape[1]} tokens; this build needs at least {min_tokens} "
                                 "(its recipe prunes a span that must fit in them)")
        tokens = self._limits.get("tokens") or {}
        for name in tokens.get("inputs", []):
            arr = feeds.get(name)
            if arr is not None and arr.ndim >= 2 and arr.shape[1] > tokens["limit"]:
                raise InputError(f"input {name!r} has {arr.shape[1]} tokens; this model has {tokens['limit']} positions "
                                 f"(position table of node {tokens.get('node')!r}): truncate it to at most "
                                 f"{tokens['limit']} tokens")
        for name, entry in (self._limits.get("ids") or {}).items():
            arr = feeds.get(name)
            if arr is None or not arr.size or not np.issubdtype(arr.dtype, np.integer):
                continue
            limit = entry["limit"]
            if arr.min() < 0 or arr.max() >= limit:
                where = np.argwhere((arr < 0) | (arr >= limit))[0]
                raise InputError(f"input {name!r}: token id {arr[tuple(where)]} at {[int(i) for i in where]} is outside "
                                 f"the vocabulary of {limit} (embedding table of node {entry.get('node')!r}); ids must be "
                                 f"in [0, {limit}): check that the tokenizer matches the model")

    def __repr__(self) -> str:
        ins = ", ".join(i.describe() for i in self.inputs)
        return f"Session({str(self.build_dir)!r}, backend={self.backend.name}, inputs=[{ins}])"


def load(build_dir: str | Path, backend: str = "auto", *, threads: int | None = None, spinning: bool = True,
         shapes: Mapping[str, list[int]] | None = None) -> Session:
    """Load a build directory (checks the manifest's format version and file hashes).
    `spinning=False` turns off ONNX Runtime's busy-waiting threads (when several sessions
    share few cores, e.g. when timing two models in one process). On OpenVINO, `shapes`
    (input name -> dims) compiles for those static shapes, `{}` for the model's own
    (dynamic) ones; None: what the build's [openvino] shapes recorded."""
    return Session(build_dir, backend, threads=threads, spinning=spinning, shapes=shapes)


# "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Gather node.
#  Name:'node_embedding' Status Message: indices element out of data bounds, ..."
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")
_ORT_NODE = re.compile(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", re.S)
# OpenVINO: "... Failed operations detailed log: -- com.microsoft.GroupQueryAttention with a message: ..."
_OV_UNCONVERTED = re.compile(r"-- (\S+) with a message:")
# ORT's C++ check failures start "/onnxruntime_src/...h:84 onnxruntime::F(...) cond was false. "
_ORT_CHECK = re.compile(r"^\S+:\d+ .*? was false\. ")


def _engine_name(backend: Backend) -> str:
    return {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(backend.name, "TensorRT")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _backend_message(exc: Exception) -> str:
    """The useful part of a backend exception's message, on one line."""
    text = str(exc).strip() or type(exc).__name__
    unconverted = list(dict.fromkeys(_OV_UNCONVERTED.findall(text)))  # OpenVINO's front end, op by op
    if unconverted:
        return f"its ONNX front end does not convert {', '.join(unconverted)}"
    return _one_line(_ORT_PREFIX.sub("", text))


def _run_error(exc: Exception, backend: Backend) -> TrimrtError:
    """InputError when the backend says the inputs are invalid (ORT's INVALID_ARGUMENT), else RunError;
    one line naming the failing node when the message names it."""
    text = str(exc).strip()
    code = _ORT_PREFIX.match(text)
    node = _ORT_NODE.search(text)
    if node:
        op, name, status = node.groups()
        detail = f"{op} node {name!r} failed: {_one_line(_ORT_CHECK.sub('', status.strip()))}"
    else:
        detail = _backend_message(exc)
    if code and code.group(1) == "INVALID_ARGUMENT":
        return InputError(f"{_engine_name(backend)} refused the inputs: {detail}; check the inputs' values and shapes")
    return RunError(f"{_engine_name(backend)} failed to run the build: {detail}; if these inputs suit the original "
                    "model, please report this build")
