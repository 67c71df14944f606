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
    assert [p["pass"] for p in on_disk["passes"]] == ["canonicalize", "unfuse_attention", "analyse", "token_pruning",
                                                      "attach_decompositions", "cleanup", "target"]
    assert on_disk["ops"] == {"AttentionRowScore": {"domain": "trimrt", "version": 1},
                              "TokenPrune": {"domain": "trimrt", "version": 1}}
    flops = on_disk["flops"]
    assert flops["after"] < flops["before"] and flops["ratio"] == pytest.approx(flops["before"] / flops["after"], rel=1e-3)
    assert on_disk["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]


def test_compile_from_factory_saves_reference(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text("from examples.models.vit import tiny_vit\n\ndef make():\n    return tiny_vit(seed=3)\n")
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


# ---- build-directory hygiene (tiny ONNX graphs, no export) ----

def _mlp(tmp_path):
    from tests.test_bad_inputs import mlp_onnx

    path = tmp_path / "mlp.onnx"
    mlp_onnx(path)
    return path


def test_symlinked_output_replaces_what_it_points_to(tmp_path):
    """Decision: `-o link` where link → a build writes the new build where the link points; the
    link stays a link and no temp or backup folder is left beside either."""
    model = _mlp(tmp_path)
    (tmp_path / "builds").mkdir()
    trimrt.compile(str(model), None, tmp_path / "builds" / "v1")
    (tmp_path / "current").symlink_to(tmp_path / "builds" / "v1")
    trimrt.compile(str(model), {"onnxruntime": {"fuse": False}}, tmp_path / "current")
    assert (tmp_path / "current").is_symlink()
    manifest = json.loads((tmp_path / "builds" / "v1" / "manifest.json").read_text())
    assert manifest["recipe"] == {"onnxruntime": {"fuse": False}}  # the new build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds", "current", "mlp.onnx"]
    assert sorted(p.name for p in (tmp_path / "builds").iterdir()) == ["v1"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("mine")
    (tmp_path / "to-data").symlink_to(tmp_path / "data")
    with pytest.raises(BuildError, match="a link to .* exists and is not a trimrt build"):
        trimrt.compile(str(model), None, tmp_path / "to-data")
    assert (tmp_path / "data" / "mine.txt").read_text() == "mine"


def test_stale_leftovers_of_a_killed_compile_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    model = _mlp(tmp_path)
    trimrt.compile(str(model), None, tmp_path / "b")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for name in (f".b.tmp-{dead_pid}-0a1b2c3d", f".b.old-{dead_pid}-123", f".b.tmp-{os.getpid()}-running"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text("half")
    (tmp_path / ".other.tmp-1-x").mkdir()  # another build's: not ours to touch
    trimrt.compile(str(model), None, tmp_path / "b")
    left = sorted(p.name for p in tmp_path.iterdir())
    # a live compile's temp folder (here: this process) stays
    assert left == [".b.tmp-" + f"{os.getpid()}-running", ".other.tmp-1-x", "b", "mlp.onnx"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o027, 0o750)])
def test_build_honours_the_umask(tmp_path, umask, mode):
    import os

    model = _mlp(tmp_path)
    previous = os.umask(umask)
    try:
        trimrt.compile(str(model), None, tmp_path / "b")
    finally:
        os.umask(previous)
    assert (tmp_path / "b").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b" / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_model_without_matmul_has_no_flops_ratio(tmp_path):
    import onnx
    import onnx.helper as oh

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    onnx.save(oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                            opset_imports=[oh.make_opsetid("", 18)]), tmp_path / "relu.onnx")
    manifest = trimrt.compile(str(tmp_path / "relu.onnx"), None, tmp_path / "b")
    assert manifest["flops"] == {"batch": 1, "before": 0, "after": 0, "ratio": None}


EXPORT_SCRIPT = """
import torch, trimrt
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4)).train()
model[2].eval()  # a caller's mixed flags come back as they were
trimrt.compile(model, None, {out!r}, example_inputs=(torch.randn(2, 8),))
print("flags", [m.training for m in model.modules()])
trimrt.verify({out!r}, model, samples=1)  # verify runs it in eval mode, then puts the flags back too
print("after verify", [m.training for m in model.modules()])
"""


def test_pytorch_export_is_quiet_and_keeps_training_flags(tmp_path):
    """In a fresh process (the exporter registry warns once per process): no torchvision notices,
    no FutureWarning from torch internals, and the caller's train/eval flags restored."""
    import subprocess
    import sys

    script = EXPORT_SCRIPT.format(out=str(tmp_path / "b"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "flags [True, True, True, False]" in done.stdout
    assert "after verify [True, True, True, False]" in done.stdout
    assert "torchvision" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr[-2000:]


def test_flops_count_a_matmul_that_makes_a_graph_output():
    """The last linear layer usually writes the graph's output; it counts like any other."""
    import onnx
    import onnx.helper as oh

    from trimrt.compiler.flops import count_flops

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    for node in (oh.make_node("MatMul", ["x", "w"], ["y"]), oh.make_node("Gemm", ["x", "w"], ["y"])):
        model = oh.make_model(oh.make_graph([node], "last", [x], [y], [w]), opset_imports=[oh.make_opsetid("", 18)])
        assert count_flops(model, {"x": np.ones((2, 8), np.float32)}) == 2 * (2 * 4) * 8, node.op_type


def test_flops_count_the_products_of_the_if_branch_taken():
    """A MatMul inside an If counts in the branch the inputs take: [2, 8] × [8, 4] when the
    batch is over 1 (then), [2, 8] × [8, 16] otherwise (else); the other branch never counts."""
    import onnx
    import onnx.helper as oh

    from trimrt.compiler.flops import count_flops

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)

    def branch(name, width):
        w = onnx.numpy_helper.from_array(np.ones((8, width), np.float32), f"w_{name}")
        return oh.make_graph([oh.make_node("Constant", [], [f"w_{name}"], value=w),
                              oh.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"])], name, [],
                             [oh.make_tensor_value_info(f"y_{name}", onnx.TensorProto.FLOAT, None)])

    nodes = [oh.make_node("Shape", ["x"], ["shape"], start=0, end=1),
             oh.make_node("Constant", [], ["one"], value=onnx.numpy_helper.from_array(np.array([1], np.int64))),
             oh.make_node("Greater", ["shape", "one"], ["many"]),
             oh.make_node("Squeeze", ["many"], ["cond"]),
             oh.make_node("If", ["cond"], ["y"], then_branch=branch("then", 4), else_branch=branch("else", 16))]
    model = oh.make_model(oh.make_graph(nodes, "branches", [x], [y]), opset_imports=[oh.make_opsetid("", 18)])
    assert count_flops(model, {"x": np.ones((2, 8), np.float32)}) == 2 * (2 * 4) * 8
    assert count_flops(model, {"x": np.ones((1, 8), np.float32)}) == 2 * (1 * 16) * 8


def test_small_vocabulary_bounds_the_check_feeds(small_vocab_bert, tmp_path):
    """A model with 60 token ids compiles from its ONNX file alone, and verify / bench feed it in range."""
    recipe = {"token_pruning": {"method": "cls_attention", "layers": [1], "keep": 1.0}}
    manifest = trimrt.compile(str(small_vocab_bert), recipe, tmp_path / "build")
    assert manifest["input_limits"]["ids"]["input_ids"]["limit"] == 60
    assert manifest["input_limits"]["tokens"]["limit"] == 64
    report = trimrt.verify(tmp_path / "build", small_vocab_bert, samples=2)
    assert report.passed and report.outputs[0].cosine_mean > 0.9999
    from trimrt.bench import bench_build

    assert bench_build(tmp_path / "build", small_vocab_bert, rounds=2, warmup=1).speedup > 0


def test_a_padding_trim_build_keeps_the_input_limits(small_vocab_bert, tmp_path):
    """Trimming padding puts a Slice between input_ids and the embedding: the build's
    manifest still bounds the ids and the tokens (the limits are the original inputs')."""
    manifest = trimrt.compile(str(small_vocab_bert), {"padding": {"trim_trailing": True}}, tmp_path / "build")
    assert manifest["input_limits"]["ids"]["input_ids"]["limit"] == 60
    assert manifest["input_limits"]["tokens"]["limit"] == 64


def test_a_rewritten_graph_ort_cannot_load_is_a_build_error(tiny_vit_onnx, tmp_path, monkeypatch):
    """ONNX Runtime refusing the rewritten graph at session creation (its shape inference,
    say) is a one-line BuildError, not a traceback; nothing is written."""
    from trimrt.compiler import driver

    real_session, calls = driver._session, []

    def refuse_the_build(proto):  # the first session is the original's, the second the build's
        calls.append(proto)
        if len(calls) == 1:
            return real_session(proto)
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node (n) Op (Mul) [ShapeInferenceError] Incompatible dimensions")

    monkeypatch.setattr(driver, "_session", refuse_the_build)
    _, path = tiny_vit_onnx
    with pytest.raises(BuildError, match=r"ONNX Runtime cannot load the rewritten graph: Node \(n\) Op \(Mul\)"):
        trimrt.compile(str(path), {"token_pruning": {"layers": [1], "keep": 0.5}}, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_fusion_on_a_small_vocabulary_checks_with_ids_in_range(small_vocab_bert, tmp_path):
    """[onnxruntime] fuse compares fused and unfused graphs on random ids: they must lie
    inside the model's vocabulary (60 here) or the check fails and fusion is skipped."""
    manifest = trimrt.compile(str(small_vocab_bert), {"onnxruntime": {"fuse": True}}, tmp_path / "build")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "ort_fusion")
    assert report["applied"], report.get("reason")
