"""Session: a loaded build, its inputs/outputs, validated feeds, thread-safe runs."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BackendUnavailableError, InputError
from .backends import Backend, OnnxRuntimeBackend, TensorRTBackend
from .feeds import TensorInfo, validate_feeds
from .manifest import ENGINE, MODEL, onnxruntime_settings, read_manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class Session:
    """Run a trimrt build. Safe to call from several threads (the backend session is shared,
    read-only; ONNX Runtime's run is thread-safe)."""

    def __init__(self, build_dir: str | Path, backend: str = "auto", *, threads: int | None = None,
                 check_hashes: bool = True, spinning: bool = True):
        self.build_dir = Path(build_dir)
        self.manifest = read_manifest(self.build_dir, check_hashes=check_hashes)
        if backend not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        engine = self.build_dir / ENGINE
        if backend == "tensorrt" or (backend == "auto" and engine.is_file() and TensorRTBackend.available()):
            if not engine.is_file():
                raise BackendUnavailableError(f"{self.build_dir} has no {ENGINE}; compile with --target tensorrt on a GPU machine")
            self.backend: Backend = TensorRTBackend(engine)
        else:
            self.backend = OnnxRuntimeBackend(self.build_dir / MODEL, threads=threads, spinning=spinning,
                                              **onnxruntime_settings(self.manifest))
        self.backend.activate()

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self.backend.inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self.backend.outputs)

    def run(self, feeds: Mapping[str, object], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Validate `feeds` (name, dtype, rank, static dims) and run; returns {output name: array}."""
        checked = validate_feeds(self.inputs, feeds)
        min_tokens = self.manifest.get("min_tokens") or 0
        for info in self.inputs:
            arr = checked[info.name]
            if min_tokens and arr.ndim >= 2 and not isinstance(info.shape[1], int) and arr.shape[1] < min_tokens:
                raise InputError(f"input {info.name!r} has {arr.shape[1]} tokens; this build needs at least {min_tokens} "
                                 "(its recipe prunes a span ending there)")
        return self.backend.infer(checked, output_names)

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        return self.run(feeds)

    def close(self) -> None:
        self.backend.deactivate()

    def __repr__(self) -> str:
        ins = ", ".join(i.describe() for i in self.inputs)
        return f"Session({str(self.build_dir)!r}, backend={self.backend.name}, inputs=[{ins}])"


def load(build_dir: str | Path, backend: str = "auto", *, threads: int | None = None, spinning: bool = True) -> Session:
    """Load a build directory (checks the manifest's format version and file hashes).
    `spinning=False` turns off ONNX Runtime's busy-waiting threads (when several sessions
    share few cores, e.g. when timing two models in one process)."""
    return Session(build_dir, backend, threads=threads, spinning=spinning)
