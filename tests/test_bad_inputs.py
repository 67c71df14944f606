"""Bad inputs a user can give the CLI (and the API): each ends in one line naming the problem,
exit code 2 (a typed TrimrtError in the API), never a traceback, never a half-written build.

The models are tiny graphs made with onnx.helper (no torch), so the table runs in seconds.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner

import trimrt
from trimrt.bench import bench_build
from trimrt.cli import main
from trimrt.errors import BuildError, BuildLoadError, InputError, ModelLoadError, RecipeError
from trimrt.recipe import load_recipe


def mlp_onnx(path, *, opset=18, input_name="x", width=8, custom_op=False, external=None):
    """x[batch, width] → MatMul(eye) → Relu (or an op of an unknown domain) → y."""
    x = oh.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["batch", width])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])
    w = onnx.numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")
    last = oh.make_node("Bar", ["h"], ["y"], domain="com.foo") if custom_op else oh.make_node("Relu", ["h"], ["y"])
    opsets = [oh.make_opsetid("", opset)] + ([oh.make_opsetid("com.foo", 1)] if custom_op else [])
    model = oh.make_model(oh.make_graph([oh.make_node("MatMul", [input_name, "w"], ["h"]), last], "mlp", [x], [y], [w]),
                          opset_imports=opsets)
    if external is not None:  # the weight stored in a file named by a relative location
        from onnx.external_data_helper import set_external_data

        tensor = model.graph.initializer[0]
        (path.parent / external).write_bytes(tensor.raw_data)
        set_external_data(tensor, location=external)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, path)


def _single_node(path, node, elem_type, *initializers):
    x = oh.make_tensor_value_info("x", elem_type, ["batch", 8])
    y = oh.make_tensor_value_info("y", elem_type, None)
    onnx.save(oh.make_model(oh.make_graph([node], "one", [x], [y], list(initializers)),
                            opset_imports=[oh.make_opsetid("", 18)]), path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs every case reads, made once: models, a build, data files, recipes, a factory."""
    tmp = tmp_path_factory.mktemp("bad")
    mlp_onnx(tmp / "model.onnx")
    mlp_onnx(tmp / "other.onnx", input_name="z")
    mlp_onnx(tmp / "wide.onnx", width=16)
    _single_node(tmp / "strings.onnx", oh.make_node("Identity", ["x"], ["y"]), onnx.TensorProto.STRING)
    shape = onnx.numpy_helper.from_array(np.array([3, 5], np.int64), "shape")
    _single_node(tmp / "fails.onnx", oh.make_node("Reshape", ["x", "shape"], ["y"]), onnx.TensorProto.FLOAT, shape)
    mlp_onnx(tmp / "opset30.onnx", opset=30)
    mlp_onnx(tmp / "custom.onnx", custom_op=True)
    (tmp / "sub").mkdir()
    mlp_onnx(tmp / "sub" / "outside.onnx", external="../weights.bin")
    trimrt.compile(str(tmp / "model.onnx"), None, tmp / "build")
    np.save(tmp / "x.npy", np.ones((2, 8), np.float32))
    (tmp / "text.npy").write_text("1 2 3\n")
    (tmp / "notes.txt").write_text("not a model\n")
    (tmp / "folder").mkdir()
    (tmp / "folder" / "mine.txt").write_text("mine")
    (tmp / "factory.py").write_text("def make():\n    raise RuntimeError('weights missing')\n\n\n"
                                    "def numbers():\n    return 1, 2\n\n\n"
                                    "def linear():\n    import torch\n\n"
                                    "    return torch.nn.Linear(8, 8), (torch.randn(1, 8),)\n\n\n"
                                    "def text_example():\n    import torch\n\n"
                                    "    return torch.nn.Linear(8, 8), ('a sentence',)\n")
    (tmp / "deep.toml").write_text("[token_pruning]\nlayers = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp / "iterations.toml").write_text('[token_pruning]\nmethod = "zero_tprune"\nlayers = [0]\nkeep = 0.5\n'
                                         "iterations = [1000000000000]\n")
    (tmp / "grid.toml").write_text('[token_pruning]\nmethod = "recycle"\nlayers = [0]\nkeep = 0.5\n'
                                   "recycle_grid = 100000\n")
    (tmp / "samples.toml").write_text("[quantization]\nmin_cosine = 0.9\n[calibration]\nrandom = true\n"
                                      "samples = 1000000000\n")
    return tmp


# (case id, CLI arguments, words the one-line error must hold); {t} is the fixture's folder
CASES = [
    # inputs ONNX Runtime refuses, named before any rewrite
    ("opset-too-new", "compile {t}/opset30.onnx -o {t}/out", ["opset 30", "newer than ONNX Runtime"]),
    ("unknown-custom-op", "compile {t}/custom.onnx -o {t}/out", ["op Bar of domain 'com.foo'"]),
    ("external-data-outside", "compile {t}/sub/outside.onnx -o {t}/out", ["external data", "outside the model's folder"]),
    ("string-input", "compile {t}/strings.onnx -o {t}/out", ["input 'x' is a string tensor"]),
    ("model-fails-on-ort", "compile {t}/fails.onnx -o {t}/out",
     ["fails.onnx does not run on ONNX Runtime with inputs x float32[2, 8]", "cannot be reshaped"]),
    ("factory-example-not-a-tensor", "compile {t}/factory.py:text_example -o {t}/out",
     ["example input 'input' is a str"]),
    ("factory-raises", "compile {t}/factory.py:make -o {t}/out", ["factory", "raised RuntimeError: weights missing"]),
    ("factory-returns-no-module", "compile {t}/factory.py:numbers -o {t}/out", ["its first item is 'int', not a torch.nn.Module"]),
    ("recipe-is-a-folder", "compile {t}/model.onnx -o {t}/out --recipe {t}/folder", ["is a folder", ".toml"]),
    # -o: checked before the work starts (the factory would raise if it ran)
    ("o-not-a-build-checked-first", "compile {t}/factory.py:make -o {t}/folder", ["exists and is not a trimrt build"]),
    ("o-below-a-file", "compile {t}/model.onnx -o {t}/notes.txt/out", ["notes.txt is a file, not a folder"]),
    ("o-read-only", "compile {t}/model.onnx -o /sys/trimrt-test-build", ["cannot write the build"]),
    ("input-inside-o", "compile {t}/build/model.onnx -o {t}/build", ["lies inside the output", "choose another -o"]),
    # recipes: numbers that cost time or memory are bounded; nesting cannot crash the parser
    ("recipe-nested-100000-deep", "compile {t}/model.onnx -o {t}/out --recipe {t}/deep.toml", ["nests", "too deeply"]),
    ("recipe-iterations-huge", "compile {t}/model.onnx -o {t}/out --recipe {t}/iterations.toml",
     ["iterations must be at most 100"]),
    ("recipe-recycle-grid-huge", "compile {t}/model.onnx -o {t}/out --recipe {t}/grid.toml",
     ["recycle_grid must be an integer in [1, 64]"]),
    ("recipe-samples-huge", "compile {t}/model.onnx -o {t}/out --recipe {t}/samples.toml",
     ["samples must be at most 100000"]),
    # counts: click ranges (with the original as reference, so only the count is wrong); {v} / {b} below
    ("verify-samples-0", "verify {t}/build --samples 0 {v}", ["'--samples'", "0 is not in the range 1<=x<=10000"]),
    ("verify-tokens-negative", "verify {t}/build --tokens -3 {v}", ["'--tokens'", "-3 is not in the range"]),
    ("verify-min-cosine-above-1", "verify {t}/build --min-cosine 2 {v}", ["'--min-cosine'", "2.0 is not in the range"]),
    ("bench-tokens-negative", "bench {t}/build --tokens -3 {b}", ["'--tokens'", "-3 is not in the range"]),
    ("bench-rounds-0", "bench {t}/build --rounds 0 {b}", ["'--rounds'", "0 is not in the range"]),
    ("bench-batch-negative", "bench {t}/build --batch -1 {b}", ["'--batch'", "-1 is not in the range"]),
    ("bench-batch-0", "bench {t}/build --batch 0 {b}", ["'--batch'", "0 is not in the range"]),
    ("bench-threads-negative", "bench {t}/build --threads -1 {b}", ["'--threads'", "-1 is not in the range"]),
    ("bench-warmup-negative", "bench {t}/build --warmup -1 {b}", ["'--warmup'", "-1 is not in the range 0<=x<=10000"]),
    # ... and bounded above: a typo must not allocate gigabytes, start 100000 threads or run for days
    ("verify-samples-huge", "verify {t}/build --samples 100000000 {v}", ["'--samples'", "1<=x<=10000"]),
    ("bench-batch-huge", "bench {t}/build --batch 100000000 {b}", ["'--batch'", "1<=x<=4096"]),
    ("bench-threads-huge", "bench {t}/build --threads 100000 {b}", ["'--threads'", "1<=x<=256"]),
    ("bench-rounds-huge", "bench {t}/build --rounds 1000000000 {b}", ["'--rounds'", "1<=x<=100000"]),
    # references and baselines that are not the build's original
    ("verify-reference-other-inputs", "verify {t}/build --reference {t}/other.onnx --samples 1",
     ["takes inputs ['z']", "the build ['x']"]),
    ("bench-baseline-other-inputs", "bench {t}/build --baseline {t}/other.onnx --rounds 1",
     ["takes inputs ['z']", "the build ['x']"]),
    ("verify-torch-reference-other-inputs", "verify {t}/build --reference {t}/factory.py:linear --samples 1",
     ["the PyTorch reference fails on the build's inputs ['x']", "TypeError"]),
    ("verify-reference-other-shape", "verify {t}/build --reference {t}/wide.onnx --samples 1",
     ["takes x: float32[batch, 16], the build x: float32[batch, 8]"]),
    ("bench-baseline-other-shape", "bench {t}/build --baseline {t}/wide.onnx --rounds 1",
     ["takes x: float32[batch, 16], the build x: float32[batch, 8]"]),
    ("bench-baseline-not-onnx", "bench {t}/build --baseline {t}/notes.txt --rounds 1", ["not an ONNX model"]),
    ("bench-baseline-is-a-build", "bench {t}/build --baseline {t}/build --rounds 1",
     ["baseline", "is a trimrt build, not an .onnx file"]),
    ("verify-reference-is-a-build", "verify {t}/build --reference {t}/build --samples 1",
     ["reference", "is a trimrt build, not an .onnx file"]),
    # files named for what they are
    ("run-a-model-file", "run {t}/model.onnx --input x={t}/x.npy", ["model.onnx is a file, not a build directory"]),
    ("bench-a-model-file", "bench {t}/model.onnx", ["model.onnx is a file, not a build directory"]),
    ("inspect-folder-without-manifest", "inspect {t}/folder", ["is not a trimrt build (no manifest.json)"]),
    ("text-file-as-npy", "run {t}/build --input x={t}/text.npy", ["text.npy is not a .npy or .npz file"]),
    ("run-output-missing-folder", "run {t}/build --input x={t}/x.npy --output {t}/missing/out.npz",
     ["'--output'", "does not exist"]),
    ("run-output-into-a-build", "run {t}/build --input x={t}/x.npy --output {t}/build/out.npz",
     ["'--output'", "would be written into the build"]),
    ("run-input-without-file", "run {t}/build --input x=", ["--input x= names no file"]),
    ("run-input-twice", "run {t}/build --input x={t}/x.npy --input x={t}/x.npy", ["input(s) ['x'] given twice"]),
    ("run-output-a-folder", "run {t}/build --input x={t}/x.npy --output {t}/folder", ["'--output'", "is a folder"]),
]


@pytest.mark.parametrize("args,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(files, args, words):
    before = sorted(files.rglob("*"))
    words_of = {"{v}": ["--reference", str(files / "model.onnx")], "{b}": ["--baseline", str(files / "model.onnx")]}
    argv = [a for token in args.split()  # split before the paths go in: they may hold spaces
            for a in (words_of[token] if token in words_of else [token.format(t=files)])]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(files.rglob("*")) == before  # no build, temp folder or output file added anywhere
    assert (files / "folder" / "mine.txt").read_text() == "mine"


def _corrupt_build(tmp):
    """A copy of the build whose model.onnx is garbage with a matching hash in the manifest."""
    import json
    import shutil

    from trimrt.runtime.manifest import sha256_file

    corrupt = tmp / "corrupt_build"
    if not corrupt.exists():
        shutil.copytree(tmp / "build", corrupt)
        (corrupt / "model.onnx").write_bytes(b"not a model")
        manifest = json.loads((corrupt / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = sha256_file(corrupt / "model.onnx")
        (corrupt / "manifest.json").write_text(json.dumps(manifest))
    return corrupt


# the same refusals through the Python API: typed errors
API_CASES = [
    ("bench-corrupt-model", lambda t: bench_build(_corrupt_build(t), t / "model.onnx"), BuildLoadError,
     "cannot load model.onnx"),
    ("verify-samples-0", lambda t: trimrt.verify(t / "build", t / "model.onnx", samples=0), InputError, "samples must be an integer >= 1"),
    ("bench-rounds-0", lambda t: bench_build(t / "build", t / "model.onnx", rounds=0), InputError,
     "rounds must be an integer >= 1"),
    ("bench-threads-negative", lambda t: bench_build(t / "build", t / "model.onnx", threads=-1), InputError,
     "threads must be an integer >= 1"),
    ("bench-threads-huge", lambda t: bench_build(t / "build", t / "model.onnx", threads=100_000), InputError,
     "threads must be at most 256"),
    ("factory-raises", lambda t: trimrt.compile(f"{t}/factory.py:make", None, t / "out"), ModelLoadError,
     "raised RuntimeError"),
    ("recipe-nested", lambda t: load_recipe(t / "deep.toml"), RecipeError, "too deeply"),
    ("recipe-iterations", lambda t: load_recipe(t / "iterations.toml"), RecipeError, "at most 100"),
    ("input-inside-o", lambda t: trimrt.compile(str(t / "build" / "model.onnx"), None, t / "build"), BuildError,
     "lies inside the output"),
]


@pytest.mark.parametrize("call,error,words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_input_is_a_typed_error(files, call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        call(files)
