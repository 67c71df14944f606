"""Shared fixtures: tiny models exported once per session (export takes seconds)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from examples.models.vit import tiny_vit  # noqa: E402
from trimrt.compiler.source import export_torch  # noqa: E402


def _tensorrt_missing() -> str | None:
    """Why `gpu` tests (a TensorRT engine on an NVIDIA GPU) cannot run here, or None if they can."""
    import importlib

    try:
        importlib.import_module("tensorrt.plugin")
    except Exception as exc:  # ImportError, or a broken TensorRT install
        return f"TensorRT >= 10.7 with tensorrt.plugin not importable ({type(exc).__name__})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    reason = _tensorrt_missing() if gpu else None
    if reason:
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """A fixed, wide console for rich and click: no test may depend on the terminal's
    width or on the length of the temporary paths it prints."""
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setenv("LINES", "100")


def _export(tmp_path_factory, fused: bool):
    import onnx_ir as ir

    module, example = tiny_vit(fused_attention=fused)
    model, _ = export_torch(module, example)
    path = tmp_path_factory.mktemp("models") / f"tiny_vit{'_fused' if fused else ''}.onnx"
    ir.save(model, path)
    return module, path


@pytest.fixture(scope="session")
def tiny_vit_onnx(tmp_path_factory):
    """(torch module, path to its ONNX export) of a 4-block ViT with explicit softmax(QKᵀ) attention."""
    return _export(tmp_path_factory, fused=False)


@pytest.fixture(scope="session")
def tiny_vit_sdpa_onnx(tmp_path_factory):
    """The same ViT written with F.scaled_dot_product_attention (a different exported pattern)."""
    return _export(tmp_path_factory, fused=True)


@pytest.fixture(scope="session")
def tiny_vit_torchscript_onnx(tmp_path_factory):
    """The ViT through the TorchScript exporter (the fallback), which emits other patterns."""
    module, example = tiny_vit()
    path = tmp_path_factory.mktemp("models") / "tiny_vit_ts.onnx"
    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=18, input_names=["pixel_values"],
                      output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}})
    return module, path


@pytest.fixture(scope="session")
def tiny_vit_opset23_onnx(tmp_path_factory):
    """The SDPA ViT exported at opset 23, where attention becomes one fused `Attention` op."""
    module, example = tiny_vit(fused_attention=True)
    model, _ = export_torch(module, example, opset=23, exporter="dynamo")
    assert any(n.op_type == "Attention" for n in model.graph)
    path = tmp_path_factory.mktemp("models") / "tiny_vit_opset23.onnx"
    import onnx_ir as ir

    ir.save(model, path)
    return module, path


@pytest.fixture
def images():
    return np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="session")
def small_vocab_bert(tmp_path_factory):
    """An ONNX BERT with 60 token ids and 64 positions (random check feeds used to hold ids < 100); its
    attention adds the padding mask."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60, max_position_embeddings=64)
    module = transformers.BertModel(config).eval()
    example = {"input_ids": torch.randint(0, 60, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    path = tmp_path_factory.mktemp("small_vocab") / "bert.onnx"
    import trimrt

    trimrt.export(module, path, example_inputs=example)
    return path
