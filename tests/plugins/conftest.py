"""Fixtures and collection rules of the custom-op tests.

Triton kernels are defined when their module is imported, so the interpreter must be
chosen first: without a CUDA device we set TRITON_INTERPRET=1 here, before any test
module imports `trimrt.plugins.kernels.*` (on a GPU machine the kernels compile for
real, which the TensorRT AOT path needs). An explicit TRITON_INTERPRET is respected.

Tests marked `gpu` are skipped unless TensorRT imports and a CUDA device is present.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


CUDA = _cuda_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _tensorrt_missing() -> str | None:
    """Why TensorRT plugin tests cannot run here, or None if they can."""
    try:
        importlib.import_module("tensorrt.plugin")
    except Exception as exc:  # ImportError, or a broken TensorRT install
        return f"TensorRT >= 10.7 with tensorrt.plugin not importable ({type(exc).__name__})"
    if not CUDA:
        return "no CUDA device"
    return None


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if item.get_closest_marker("gpu") and _HERE in Path(str(item.path)).resolve().parents]
    if not mine:
        return
    reason = _tensorrt_missing()
    if reason:
        skip = pytest.mark.skip(reason=f"gpu test: {reason}")
        for item in mine:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: CUDA if present, else CPU (Triton interpreter)."""
    return "cuda" if CUDA else "cpu"


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20240611)
