"""Quantization on the families users bring (dynamo exports of tiny HF models): INT8 and
INT4 builds run, quantize every linear layer, and stay close to the float model; with
[onnxruntime] fuse on top the outputs are those of the unfused quantized build."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.hf_models import exported as export_once  # noqa: E402
from tests.families.hf_models import run_onnx

FAMILIES = ["bert", "vit", "llama", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    path, _, _, feeds = export_once(request.param)
    return request.param, path, feeds




def _cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _constant_matmuls(path) -> int:
    """MatMuls and Gemms by a constant 2-D weight (GPT-2's Conv1D exports as Gemm)."""
    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer if len(t.dims) == 2}
    return sum(1 for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights)


@pytest.mark.parametrize("quantization, floor", [({}, 0.995), ({"weights": "int4", "group_size": 32}, 0.95)],
                         ids=["int8", "int4"])
def test_quantized_family_builds(exported, tmp_path, quantization, floor):
    family, path, feeds = exported
    linear = _constant_matmuls(path)
    manifest = trimrt.compile(str(path), {"quantization": quantization}, tmp_path / "q")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
    assert report["matmuls_quantized"] == linear > 0 and _constant_matmuls(tmp_path / "q" / "model.onnx") == 0
    want, got = run_onnx(path, feeds), run_onnx(tmp_path / "q" / "model.onnx", feeds)
    for name, ref in want.items():
        if np.issubdtype(ref.dtype, np.floating):
            assert _cosine(got[name], ref) > floor, (family, name)


def test_fusion_on_a_quantized_family_build_changes_nothing(exported, tmp_path):
    family, path, feeds = exported
    trimrt.compile(str(path), {"quantization": {}}, tmp_path / "q")
    manifest = trimrt.compile(str(path), {"quantization": {}, "onnxruntime": {"fuse": True}}, tmp_path / "qf")
    fusion = next(p["report"] for p in manifest["passes"] if p["pass"] == "ort_fusion")
    assert fusion["applied"] or "reason" in fusion
    want = run_onnx(tmp_path / "q" / "model.onnx", feeds)
    got = trimrt.load(tmp_path / "qf").run(feeds)
    for name, ref in want.items():
        if np.issubdtype(ref.dtype, np.floating):
            assert _cosine(got[name], ref) > 0.999, (family, name)
