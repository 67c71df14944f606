"""Fixtures of the custom-op tests.

Triton kernels are defined when their module is imported, so the interpreter must be
chosen first: without a CUDA device we set TRITON_INTERPRET=1 here, before any test
module imports `trimrt.plugins.kernels.*` (on a GPU machine the kernels compile for
real, which the TensorRT AOT path needs). An explicit TRITON_INTERPRET is respected.

Tests marked `gpu` are skipped unless TensorRT imports and a CUDA device is present
(tests/conftest.py).
"""

from __future__ import annotations

import os

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


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: CUDA if present, else CPU (Triton interpreter)."""
    return "cuda" if CUDA else "cpu"


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20240611)
