"""The CLI end to end through click's runner: compile → run → verify → bench → inspect."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.cli_compile import compile_with_recipe
from trimrt.cli import main

RECIPE = """
[token_pruning]
method = "cls_attention"
layers = [1, 2]
keep = 0.5
protect = "cls"
fuse_pruned = true
"""


@pytest.fixture(scope="module")
def cli_build(tiny_vit_onnx, tmp_path_factory):
    _, model = tiny_vit_onnx
    tmp = tmp_path_factory.mktemp("cli")
    result = compile_with_recipe(model, RECIPE, tmp)
    assert "build written" in result.output and "block 1: 65→34" in result.output
    return model, tmp


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    for cmd in ("compile", "run", "verify", "bench", "inspect"):
        assert cmd in result.output


def test_run_writes_outputs(cli_build, tmp_path):
    _, tmp = cli_build
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(main, ["run", str(tmp / "build"), "--input", f"pixel_values={tmp_path / 'x.npy'}",
                                       "--output", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    out = np.load(tmp_path / "out.npz")
    assert out["logits"].shape == (2, 10)
    import trimrt

    np.testing.assert_array_equal(out["logits"], trimrt.load(tmp / "build").run({"pixel_values": x})["logits"])


def test_verify_thresholds_set_exit_code(cli_build):
    model, tmp = cli_build
    ok = CliRunner().invoke(main, ["verify", str(tmp / "build"), "--reference", str(model), "--samples", "4",
                                   "--min-cosine", "0.5", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["passed"] and report["samples"] == 4
    (out,) = report["outputs"]
    assert out["name"] == "logits" and 0.5 < out["cosine_mean"] <= 1.0 and out["top1"] is not None
    strict = CliRunner().invoke(main, ["verify", str(tmp / "build"), "--reference", str(model), "--samples", "4",
                                       "--min-cosine", "0.999999"])
    assert strict.exit_code == 1
    assert "FAIL" in strict.output and "mean cosine" in strict.output


def test_bench_prints_ratios(cli_build):
    model, tmp = cli_build
    result = CliRunner().invoke(main, ["bench", str(tmp / "build"), "--baseline", str(model), "--rounds", "3",
                                       "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["batch"] == 1 and r["rounds"] == 3 and r["baseline_ms"] > 0 and r["build_ms"] > 0
    assert r["speedup"] > 0 and r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
    assert r["flops_ratio"] > 1.3


def test_inspect_model_and_build(cli_build):
    model, tmp = cli_build
    m = CliRunner().invoke(main, ["inspect", str(model)])
    assert m.exit_code == 0, m.output
    assert "blocks: 4  tokens: 65 (axis 1)" in m.output and "protected tokens: cls (index 0)" in m.output
    b = CliRunner().invoke(main, ["inspect", str(tmp / "build")])
    assert b.exit_code == 0, b.output
    assert "token pruning at block 1: 65 → 34 tokens" in b.output
    assert "'AttentionRowScore': 2" in b.output and "'TokenPrune': 2" in b.output


@pytest.mark.parametrize("args,message", [
    (["compile", "{tmp}/nope.onnx", "-o", "{tmp}/b"], "error: model file not found"),
    (["compile", "{tmp}/notonnx.onnx", "-o", "{tmp}/b"], "is not an ONNX model"),
    (["compile", "{model}", "-o", "{tmp}/b", "--recipe", "{tmp}/badlayer.toml"], "layers [12] do not exist"),
    (["compile", "{model}", "-o", "{tmp}/b", "--recipe", "{tmp}/badkeep.toml"], "keep must be a number in (0, 1]"),
    (["run", "{build}", "--input", "pixel_values={tmp}/missing.npy"], "error: input file not found"),
    (["run", "{tmp}/b", "--input", "x=y.npy"], "build directory not found"),
    (["verify", "{build}", "--reference", "{tmp}/nope.onnx"], "reference model not found"),
    (["bench", "{build}", "--baseline", "{tmp}/nope.onnx"], "baseline model not found"),
])
def test_bad_input_one_line_exit_2(cli_build, tmp_path, args, message):
    model, tmp = cli_build
    (tmp_path / "notonnx.onnx").write_text("hello")
    (tmp_path / "badlayer.toml").write_text("[token_pruning]\nlayers = [1, 12]\nkeep = 0.5\n")
    (tmp_path / "badkeep.toml").write_text("[token_pruning]\nlayers = [1]\nkeep = 2\n")
    args = [a.format(tmp=tmp_path, model=model, build=tmp / "build") for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_tensorrt_target_without_tensorrt_is_refused_cleanly(cli_build, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    model, _ = cli_build
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "b"), "--target", "tensorrt"])
    assert result.exit_code == 2
    assert "error: --target tensorrt needs TensorRT and an NVIDIA GPU" in result.output
    assert not (tmp_path / "b").exists()


def test_graph_without_transformer_blocks_is_refused(tmp_path):
    import onnx
    import onnx.helper as oh

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    w = onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
                          "mlp", [x], [y], [w])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), tmp_path / "mlp.onnx")
    (tmp_path / "r.toml").write_text("[token_pruning]\nlayers = [0]\nkeep = 0.5\n")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "b"),
                                       "--recipe", str(tmp_path / "r.toml")])
    assert result.exit_code == 2
    assert "error: no transformer blocks found" in result.output and "0 Softmax node(s)" in result.output
    assert not (tmp_path / "b").exists()
    inspect = CliRunner().invoke(main, ["inspect", str(tmp_path / "mlp.onnx")])
    assert inspect.exit_code == 2 and "no transformer blocks found" in inspect.output


def test_verify_per_pass_prints_each_step(cli_build):
    model, tmp = cli_build
    result = CliRunner().invoke(main, ["verify", str(tmp / "build"), "--reference", str(model), "--samples", "2",
                                       "--per-pass"])
    assert result.exit_code == 0, result.output
    assert "after token_pruning: mean cosine logits" in result.output


def test_run_output_reports_the_file_it_writes(cli_build, tmp_path):
    """numpy adds .npz to a name without it: the message names the file actually written."""
    _, tmp = cli_build
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    result = CliRunner().invoke(main, ["run", str(tmp / "build"), "--input", f"pixel_values={tmp_path / 'x.npy'}",
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"to {tmp_path / 'out.npz'}\n" in result.output and (tmp_path / "out.npz").is_file()
    assert not (tmp_path / "out").exists()


def test_tome_build_shows_tokens_per_stage(tiny_vit_onnx, tmp_path):
    """A ToMe build reports its tokens per block at compile and in inspect, as pruning builds do."""
    _, model = tiny_vit_onnx
    result = compile_with_recipe(model, "[token_merging]\nr = 8\nlayers = [0, 1]\n", tmp_path)
    assert "token merging: block 0: 65→57, block 1: 57→49" in result.output
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "build")])
    assert shown.exit_code == 0, shown.output
    assert "token merging at block 0: 65 → 57 tokens (merged 8)" in shown.output
    assert "token merging at block 1: 57 → 49 tokens" in shown.output


def test_model_without_matmul_says_there_is_no_flops_ratio(tmp_path):
    import onnx
    import onnx.helper as oh

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    onnx.save(oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                            opset_imports=[oh.make_opsetid("", 18)]), tmp_path / "relu.onnx")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "0.00×" not in result.output and "no ideal speedup (the model has no MatMul" in result.output
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "b")])
    assert "0.00×" not in shown.output and "no ideal speedup" in shown.output


def test_lines_with_long_paths_are_never_wrapped(tmp_path):
    """rich wraps at the console width (80 under the test runner): lines naming a path must not."""
    from tests.test_bad_inputs import mlp_onnx

    folder = tmp_path / ("a-long-folder-name-" * 8)
    folder.mkdir()
    mlp_onnx(folder / "model.onnx")
    build = folder / "build"
    compiled = CliRunner().invoke(main, ["compile", str(folder / "model.onnx"), "-o", str(build)])
    assert compiled.exit_code == 0, compiled.output
    assert f"build written: {build}  (FLOPs " in compiled.output
    verified = CliRunner().invoke(main, ["verify", str(build), "--reference", str(folder / "model.onnx"),
                                         "--samples", "2"])
    assert verified.exit_code == 0, verified.output
    assert f"verify {build} (2 samples)\n" in verified.output


def test_inspect_analyses_an_exported_decoder_as_compile_does(tmp_path):
    """A KV-cache decoder's ONNX file is probed on a prefill (an empty past), as compile does."""
    import trimrt
    from tests.families.causal_lms import make

    onnx_path = trimrt.export(make("llama", 2), tmp_path / "llama.onnx")
    result = CliRunner().invoke(main, ["inspect", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert "blocks: 2" in result.output and "block  1: attention" in result.output
    assert "decoder: 2 layers, KV cache 2 heads × 16 (float32)" in result.output
