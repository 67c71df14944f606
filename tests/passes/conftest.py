"""Fixtures of the pass tests."""

from __future__ import annotations

import onnx_ir as ir
import pytest


@pytest.fixture(params=["tiny_vit_onnx", "tiny_vit_sdpa_onnx", "tiny_vit_torchscript_onnx", "tiny_vit_opset23_onnx"])
def vit(request):
    """(module, export path) of the tiny ViT in every export form: explicit attention and
    SDPA through the dynamo exporter; the TorchScript exporter; the fused opset-23 Attention op."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory):
    """(module, export path) of a 2-block LLaMA-style prefill model, a plain PyTorch export:
    its causal mask is written into the graph as an [N, N] tensor (Trilu → Where → Add) and
    its rotary tables are [N, Dh], neither with a batch axis."""
    return _small_llama(tmp_path_factory, opset=18)


@pytest.fixture(scope="session")
def small_llama_opset23(tmp_path_factory):
    """The same model exported at opset 23: its attention is one `Attention` op (is_causal)."""
    return _small_llama(tmp_path_factory, opset=23)


def _small_llama(tmp_path_factory, opset: int):
    from examples.models.llama_style import LlamaStyleConfig, llama_style
    from trimrt.compiler.source import export_torch

    module, example = llama_style(tokens=40, cfg=LlamaStyleConfig(vocab=100, width=64, heads=4, mlp_width=96,
                                                                  depth=2))
    model, _ = export_torch(module, example, opset=opset, exporter="dynamo")
    path = tmp_path_factory.mktemp("models") / f"llama_style_{opset}.onnx"
    ir.save(model, path)
    return module, path
