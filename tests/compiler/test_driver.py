"""compile(): build directory contents, manifest, atomic writes, untouched inputs, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import trimrt
from trimrt.errors import BuildError, ModelLoadError, RecipeError

RECIPE = {"token_pruning": {"layers": [1, 2], "keep": 0.5, "fuse_pruned": True}}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_directory_and_manifest(tiny_vit_onnx, tmp_path):
    _, path = tiny_vit_onnx
    before = sha(path)
    manifest = trimrt.compile(str(path), RECIPE, tmp_path / "build")
    assert sha(path) == before  # the input is never modified
    build = tmp_path / "build"
    assert sorted(p.name for p in build.iterdir()) == ["manifest.json", "model.onnx"]
    on_disk = json.loads((build / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format_version"] == 1 and on_disk["trimrt_version"] == trimrt.__version__
    assert on_disk["files"]["model.onnx"] == sha(build / "model.onnx")
    assert on_disk["recipe"] == {"token_pruning": {"method": "cls_attention", "layers": [1, 2], "keep": 0.5,
                                                   "protect": "cls", "fuse_pruned": True}}
    assert [p["pass"] for p in on_disk["passes"]] == ["canonicalize", "analyse", "token_pruning",
                                                      "attach_decompositions", "cleanup", "target"]
    assert on_disk["ops"] == {"AttentionRowScore": {"domain": "trimrt", "version": 1},
                              "TokenPrune": {"domain": "trimrt", "version": 1}}
    flops = on_disk["flops"]
    assert flops["after"] < flops["before"] and flops["ratio"] == pytest.approx(flops["before"] / flops["after"], rel=1e-3)
    assert on_disk["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]


def test_compile_from_factory_saves_reference(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text("from trimrt.models.vit import tiny_vit\n\ndef make():\n    return tiny_vit(seed=3)\n")
    manifest = trimrt.compile(f"{factory}:make", RECIPE, tmp_path / "b")
    assert manifest["reference"] == "reference.onnx"
    assert (tmp_path / "b" / "reference.onnx").is_file()
    report = trimrt.verify(tmp_path / "b", f"{factory}:make", samples=2)  # against PyTorch itself
    assert report.outputs[0].shape == [2, 10] and report.outputs[0].cosine_mean > 0.5


def test_failed_compile_leaves_nothing(tiny_vit_onnx, tmp_path):
    _, path = tiny_vit_onnx
    with pytest.raises(RecipeError, match="do not exist"):
        trimrt.compile(str(path), {"token_pruning": {"layers": [9], "keep": 0.5}}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_build_is_replaced_but_other_dirs_are_refused(tiny_vit_onnx, tmp_path):
    _, path = tiny_vit_onnx
    trimrt.compile(str(path), RECIPE, tmp_path / "b")
    m2 = trimrt.compile(str(path), {"token_pruning": {"layers": [1], "keep": 0.25}}, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["recipe"] == m2["recipe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or backup dirs left
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(BuildError, match="exists and is not a trimrt build"):
        trimrt.compile(str(path), RECIPE, tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"


def test_not_onnx_is_a_model_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff")
    with pytest.raises(ModelLoadError, match="is not an ONNX model"):
        trimrt.compile(str(bad), RECIPE, tmp_path / "b")
    with pytest.raises(ModelLoadError, match="model file not found"):
        trimrt.compile(str(tmp_path / "missing.onnx"), RECIPE, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_empty_recipe_is_identity(tiny_vit_onnx, tmp_path, images):
    _, path = tiny_vit_onnx
    manifest = trimrt.compile(str(path), None, tmp_path / "b")
    assert manifest["ops"] == {} and manifest["flops"]["ratio"] == 1.0
    import onnxruntime as ort

    want = ort.InferenceSession(str(path)).run(None, {"pixel_values": images})[0]
    got = trimrt.load(tmp_path / "b").run({"pixel_values": images})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-6)
