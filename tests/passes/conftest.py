"""Fixtures of the pass tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["tiny_vit_onnx", "tiny_vit_sdpa_onnx", "tiny_vit_torchscript_onnx", "tiny_vit_opset23_onnx"])
def vit(request):
    """(module, export path) of the tiny ViT in every export form: explicit attention and
    SDPA through the dynamo exporter; the TorchScript exporter; the fused opset-23 Attention op."""
    return request.getfixturevalue(request.param)
