"""The OpenVINO backend: every build trimrt makes for CPU (token pruning of every method,
merging, Mixture-of-Depths routing, INT8) runs on OpenVINO's CPU plugin, its custom ops inlined into their
decompositions, and gives what ONNX Runtime gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("openvino")

import trimrt  # noqa: E402
from examples.models.vit import tiny_vit  # noqa: E402
from trimrt.errors import BuildLoadError  # noqa: E402

RECIPES = {
    "cls_attention": {"token_pruning": {"method": "cls_attention", "layers": [1, 2], "keep": 0.5}},
    "zero_tprune": {"token_pruning": {"method": "zero_tprune", "layers": [1, 2], "keep": 0.5}},
    "divprune": {"token_pruning": {"method": "divprune", "layers": [1], "keep": 0.5}},
    "adaptive": {"token_pruning": {"method": "adaptive", "layers": [1, 2], "keep": 0.5}},
    "recycle": {"token_pruning": {"method": "recycle", "layers": [1], "keep": 0.5}},
    "tome": {"token_merging": {"r": 4}},
    "mixture_of_depths": {"mixture_of_depths": {"ratios": [1.0, 0.5, 0.5, 0.3]}},
    "int8": {"quantization": {"weights": "int8"}},
    "keep_all": {"token_pruning": {"method": "cls_attention", "layers": [1], "keep": 1.0}},
}


@pytest.fixture(scope="module")
def vit():
    model, (example,) = tiny_vit()
    return model, example


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_build_runs_on_openvino_as_on_onnx_runtime(vit, tmp_path, name):
    model, example = vit
    trimrt.compile(model, RECIPES[name], tmp_path / "b", example_inputs=(example,))
    feeds = {"pixel_values": np.concatenate([example.numpy(), -example.numpy()])}
    want = trimrt.load(tmp_path / "b", backend="onnxruntime").run(feeds)
    session = trimrt.load(tmp_path / "b", backend="openvino", threads=2)
    assert session.backend.name == "openvino"
    got = session.run(feeds)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_threads_share_one_compiled_model(vit, tmp_path):
    model, example = vit
    trimrt.compile(model, RECIPES["cls_attention"], tmp_path / "b", example_inputs=(example,))
    session = trimrt.load(tmp_path / "b", backend="openvino")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(example.shape).astype(np.float32) for _ in range(8)]
    want = [session.run({"pixel_values": x})["logits"] for x in batches]
    got = [None] * len(batches)

    def work(i):
        for _ in range(3):
            got[i] = session.run({"pixel_values": batches[i]})["logits"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_what_openvino_cannot_load_is_one_line(tmp_path):
    """A decoder build uses ONNX Runtime's GroupQueryAttention, which OpenVINO does not convert."""
    from tests.families.causal_lms import build

    path, _ = build("llama")
    with pytest.raises(BuildLoadError, match=r"OpenVINO cannot load model.onnx: its ONNX front end does not convert "
                       r"com.microsoft.GroupQueryAttention; run it with backend='onnxruntime'") as err:
        trimrt.load(path, backend="openvino")
    assert "\n" not in str(err.value)


def test_verify_and_bench_on_openvino(vit, tmp_path):
    """verify runs the build on OpenVINO against the reference on ONNX Runtime; bench times the
    build and its baseline both on OpenVINO; the CLI takes --backend openvino."""
    from click.testing import CliRunner

    from trimrt.bench import bench_build
    from trimrt.cli import main

    model, example = vit
    trimrt.compile(model, RECIPES["keep_all"], tmp_path / "same", example_inputs=(example,))
    report = trimrt.verify(tmp_path / "same", samples=2, backend="openvino")
    assert report.outputs[0].max_abs < 1e-4 and report.passed  # keep = 1.0 reproduces the original on OpenVINO
    trimrt.compile(model, RECIPES["cls_attention"], tmp_path / "pruned", example_inputs=(example,))
    timed = bench_build(tmp_path / "pruned", batch=2, warmup=1, rounds=3, backend="openvino")
    assert timed.batch == 2 and timed.build_ms > 0 and timed.baseline_ms > 0 and not timed.cache_in_place
    ran = CliRunner().invoke(main, ["bench", str(tmp_path / "pruned"), "--backend", "openvino", "--rounds", "2",
                                    "--warmup", "1"])
    assert ran.exit_code == 0, ran.output
    assert ran.output.startswith("openvino, batch 1, 2 threads, 2 alternating rounds")
    checked = CliRunner().invoke(main, ["verify", str(tmp_path / "pruned"), "--backend", "openvino", "--samples", "2"])
    assert checked.exit_code == 0, checked.output


def test_the_openvino_target(vit, tmp_path):
    """--target openvino: INT8 in the static Q/DQ form (OpenVINO runs it on its INT8 kernels) with
    token pruning; checked on OpenVINO at compile time; load, verify and bench pick OpenVINO."""
    from trimrt.bench import bench_build
    from trimrt.errors import BuildError

    model, example = vit
    recipe = {**RECIPES["cls_attention"], "quantization": {"weights": "int8"},
              "calibration": {"random": True, "samples": 4}}
    with pytest.warns(UserWarning, match="calibrating on random data"):
        manifest = trimrt.compile(model, recipe, tmp_path / "b", example_inputs=(example,), target="openvino")
    assert manifest["target"] == "openvino"
    quant = manifest.pass_report("quantization")
    assert "QuantizeLinear/DequantizeLinear INT8" in quant["encoding"]
    assert quant["attention_products"]["quantized"] == 4  # q·kᵀ in int8 in every block, as NNCF does
    from trimrt.inspect import quantization_line, quantization_summary

    assert quantization_line(quantization_summary(quant)).endswith("; q·kᵀ in int8 in 4 attention products")
    # the int8 grid sits before the head split's layout ops in the scoring blocks too, whose
    # pruning score reads the same q and k on the side (else OpenVINO leaves that attention unfused)
    import onnx_ir as ir

    from trimrt.passes.quantization import product_sources

    built = ir.load(tmp_path / "b" / "model.onnx")
    found = product_sources(built.graph)
    assert [value.producer().op_type for value, *_ in found] == ["DequantizeLinear"] * 8
    assert [reader.op_type for _, reader, *_ in found[1::2]] == ["Transpose"] * 4  # each k: before its transpose
    session = trimrt.load(tmp_path / "b")
    assert session.backend.name == "openvino"
    feeds = {"pixel_values": example.numpy()}
    got, want = session.run(feeds)["logits"], trimrt.load(tmp_path / "b", backend="onnxruntime").run(feeds)["logits"]
    assert float(np.dot(got[0], want[0]) / np.linalg.norm(got[0]) / np.linalg.norm(want[0])) > 0.999
    # the fidelity verify reports (4 random calibration samples: low) is the build's, whichever engine runs it
    on_openvino = trimrt.verify(tmp_path / "b", samples=2).outputs[0]
    on_onnxruntime = trimrt.verify(tmp_path / "b", samples=2, backend="onnxruntime").outputs[0]
    assert abs(on_openvino.cosine_mean - on_onnxruntime.cosine_mean) < 0.005 and on_openvino.top1 == 1.0
    assert bench_build(tmp_path / "b", warmup=1, rounds=2).engine == "openvino"
    with pytest.raises(BuildError, match="no quantized encoding writes fp8 weights for target 'openvino'"):
        trimrt.compile(model, {"quantization": {"weights": "fp8"}, "calibration": {"random": True, "samples": 2}},
                       tmp_path / "c", example_inputs=(example,), target="openvino")
    with pytest.raises(trimrt.errors.RecipeError, match="INT8 builds for openvino need static activation scales"):
        trimrt.compile(model, {"quantization": {"weights": "int8"}}, tmp_path / "d", example_inputs=(example,),
                       target="openvino")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_the_openvino_recipe_table(vit, tmp_path):
    """[openvino]: the stored IR is what loads (a pruning build: its TopKs stay stable through
    the IR), with the recorded threads and hint; inspect names them; the table is refused for
    other targets, and a reduced precision this CPU lacks is refused before any work."""
    from click.testing import CliRunner

    from trimrt.cli import main
    from trimrt.errors import BuildError

    model, example = vit
    recipe = {**RECIPES["zero_tprune"], "openvino": {"save_ir": True, "threads": 2, "performance_hint": "throughput"}}
    manifest = trimrt.compile(model, recipe, tmp_path / "b", example_inputs=(example,), target="openvino")
    entry = manifest["openvino"]
    assert entry["ir"] == "openvino_model.xml" and entry["threads"] == 2 and entry["inference_precision"] == "f32"
    assert entry["max_abs_to_onnxruntime"] < 1e-4 and "precision_cosine" not in entry
    assert {"openvino_model.xml", "openvino_model.bin"} <= set(manifest["files"])
    session = trimrt.load(tmp_path / "b")
    assert session.backend.model.endswith("openvino_model.xml") and session.backend.hint == "throughput"
    assert session.backend.threads == 2 and trimrt.load(tmp_path / "b", threads=1).backend.threads == 1
    feeds = {"pixel_values": np.concatenate([example.numpy(), -example.numpy()])}
    want = trimrt.load(tmp_path / "b", backend="onnxruntime").run(feeds)["logits"]
    np.testing.assert_allclose(session.run(feeds)["logits"], want, rtol=1e-4, atol=1e-4)
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "b")])
    assert "OpenVINO: inference precision f32, throughput hint, 2 threads, IR stored" in shown.output
    # the IR is sealed like the model: a changed byte is refused
    (tmp_path / "b" / "openvino_model.bin").write_bytes(b"0" + (tmp_path / "b" / "openvino_model.bin").read_bytes()[1:])
    with pytest.raises(BuildLoadError, match="openvino_model.bin does not match its sha256"):
        trimrt.load(tmp_path / "b")

    with pytest.raises(BuildError, match=r"the recipe's \[openvino\] table applies to OpenVINO builds only"):
        trimrt.compile(model, {"openvino": {}}, tmp_path / "c", example_inputs=(example,))
    with pytest.raises(trimrt.errors.RecipeError, match="performance_hint must be one of"):
        trimrt.compile(model, {"openvino": {"performance_hint": "fast"}}, tmp_path / "c", example_inputs=(example,),
                       target="openvino")
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(BuildError, match="inference_precision = 'bf16' is measured when compiling, on this CPU: "
                                             "this CPU has no bf16 support in OpenVINO"):
            trimrt.compile(model, {"openvino": {"inference_precision": "bf16"}}, tmp_path / "c",
                           example_inputs=(example,), target="openvino")
    assert not (tmp_path / "c").exists()


def test_a_reduced_precision_is_measured_and_recorded(vit, tmp_path, monkeypatch):
    """inference_precision = "bf16": the compile runs the build at bf16 and records its cosine to
    f32 (on a CPU without bf16, OpenVINO runs f32 instead, so this checks the recording and the
    guard's plumbing: cosine 1; a CPU with bf16 measures the real loss)."""
    import openvino as ov

    from trimrt.runtime import backends

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        monkeypatch.setattr(backends, "missing_precision", lambda core, precision: None)
    model, example = vit
    manifest = trimrt.compile(model, {"openvino": {"inference_precision": "bf16", "min_cosine": 0.98}},
                              tmp_path / "b", example_inputs=(example,), target="openvino")
    entry = manifest["openvino"]
    assert entry["inference_precision"] == "bf16" and 0.98 <= entry["precision_cosine"] <= 1.0
    assert manifest["recipe"]["openvino"]["min_cosine"] == 0.98
    session = trimrt.load(tmp_path / "b")
    assert session.backend.precision == "bf16"
    want = trimrt.load(tmp_path / "b", backend="onnxruntime").run({"pixel_values": example.numpy()})["logits"]
    got = session.run({"pixel_values": example.numpy()})["logits"]
    assert float(np.dot(got[0], want[0]) / np.linalg.norm(got[0]) / np.linalg.norm(want[0])) > 0.98


@pytest.mark.parametrize("weights", [None, "int4"])
def test_a_decoder_generates_on_openvino(tmp_path, weights):
    """A decoder built for OpenVINO keeps standard attention (OpenVINO does not convert
    GroupQueryAttention) and generates on OpenVINO, with past key / values fed each step; INT4
    weight-only in the blocked DequantizeLinear form, which OpenVINO runs as compressed weights.
    Same tokens as the build on ONNX Runtime (and, in float, as Hugging Face)."""
    from tests.families.causal_lms import hf_greedy, make

    model = make("llama")
    recipe = {"quantization": {"weights": "int4", "group_size": 32}} if weights else None
    manifest = trimrt.compile(model, recipe, tmp_path / "b", target="openvino")
    assert "GroupQueryAttention" not in str(manifest["passes"]) and not manifest["decoder"]["shared_buffer"]
    if weights:
        assert manifest.pass_report("quantization")["encoding"] == "INT4 initializers + blocked DequantizeLinear (opset 21)"
    session = trimrt.load(tmp_path / "b")
    assert session.backend.name == "openvino"
    prompts = [[1, 5, 7, 9, 11, 13], [1, 3, 4]]
    got = [r.tokens for r in session.generator().generate(prompts, max_new_tokens=10)]
    on_onnxruntime = trimrt.load(tmp_path / "b", backend="onnxruntime").generator().generate(prompts, max_new_tokens=10)
    assert got == [r.tokens for r in on_onnxruntime]
    if not weights:
        assert got == hf_greedy(model, prompts, 10)
    # speculation on presents fed back, trees through attention_bias (an input with a default, which
    # OpenVINO would freeze: the backend makes it a plain input and feeds its default when not given)
    assert any(i.name == "attention_bias" and i.optional for i in session.inputs)
    fast = session.generator(speculation="token_recycling")
    for prompt in prompts + [[1, 5, 7, 9, 5, 7, 9, 5, 7]]:
        want = session.generator().generate(prompt, max_new_tokens=16).tokens
        for _ in range(2):  # the second time with the table the first filled
            assert fast.generate(prompt, max_new_tokens=16).tokens == want



def test_a_selection_needs_no_stable_sort_on_openvino():
    """TokenPrune's "top k, then their positions ascending" TopK pair runs on OpenVINO without
    its (slow) stable sort: the same tokens, ties to the lower index, as the reference; a
    TopK pair that sorts fewer than it selected is another computation and stays as it is."""
    import onnx

    from tests.plugins.op_testing import decomposition_model
    from trimrt.plugins import token_prune
    from trimrt.runtime.backends import OpenVINOBackend, openvino_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 3)).astype(np.float32)
    score = (rng.integers(0, 3, (2, 12)) / 3).astype(np.float32)  # many ties
    attrs = dict(keep=5, protect=1)
    model = decomposition_model("TokenPrune", [x, score], symbolic=True, **attrs)
    topks = [op for op in openvino_model(model.SerializeToString()).get_ops() if op.get_type_name() == "TopK"]
    assert not any(op.get_attributes()["stable"] for op in topks)
    for keep in (attrs["keep"], 11):  # ties across the k-th score; the whole span
        attrs["keep"] = keep
        backend = OpenVINOBackend(decomposition_model("TokenPrune", [x, score], symbolic=True, **attrs)
                                  .SerializeToString(), threads=1)
        backend.activate()
        got = backend.infer({"x": x, "score": score})
        y, kept, _ = token_prune.reference(x, score, span_end=0, keep_ratio=1.0, **attrs)
        np.testing.assert_array_equal(got["kept_index"], kept)
        np.testing.assert_array_equal(got["y"], y)
    # a second TopK keeping fewer than the first selected is a different selection: left alone
    graph = model.functions[0]
    sort = next(n for n in graph.node if n.op_type == "TopK" and n.input[0] != "score" and "Slice" not in n.input[0])
    smaller = onnx.helper.make_node("Constant", [], ["k_smaller"], value_ints=[2])
    graph.node.insert(list(graph.node).index(sort), smaller)
    sort.input[1] = "k_smaller"
    topks = [op for op in openvino_model(model.SerializeToString()).get_ops() if op.get_type_name() == "TopK"]
    assert [(op.get_attributes()["sort"], op.get_attributes()["stable"]) for op in topks] == [("value", True)] * 2


def test_static_shapes_on_openvino(vit, tmp_path):
    """[openvino] shapes compiles for static input shapes: recorded, shown by inspect, what a
    Session validates feeds against (another shape is one line), the same outputs as ONNX
    Runtime; load(shapes={}) runs the model's own dynamic shapes; a name the model lacks or
    a shape it cannot take is refused at compile time, and shapes= on ONNX Runtime at load."""
    from click.testing import CliRunner

    from trimrt.cli import main
    from trimrt.errors import BackendUnavailableError, InputError, RecipeError
    from trimrt.recipe import load_recipe

    model, example = vit
    recipe = {**RECIPES["cls_attention"], "openvino": {"shapes": {"pixel_values": [1, 3, 32, 32]}}}
    manifest = trimrt.compile(model, recipe, tmp_path / "b", example_inputs=(example,), target="openvino")
    assert manifest["openvino"]["shapes"] == {"pixel_values": [1, 3, 32, 32]}
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "b")])
    assert "static shapes pixel_values [1, 3, 32, 32]" in shown.output
    session = trimrt.load(tmp_path / "b")
    assert session.inputs[0].shape == (1, 3, 32, 32)
    one = {"pixel_values": example.numpy()[:1]}
    want = trimrt.load(tmp_path / "b", backend="onnxruntime").run(one)["logits"]
    np.testing.assert_allclose(session.run(one)["logits"], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError) as err:
        session.run({"pixel_values": example.numpy()})
    assert "pixel_values" in str(err.value) and "\n" not in str(err.value)
    two = trimrt.load(tmp_path / "b", shapes={}).run({"pixel_values": example.numpy()})["logits"]
    assert two.shape[0] == 2
    with pytest.raises(BackendUnavailableError, match="shapes= fixes the input shapes OpenVINO compiles for; this "
                       "session runs on ONNX Runtime"):
        trimrt.load(tmp_path / "b", backend="onnxruntime", shapes={"pixel_values": [1, 3, 32, 32]})
    for shapes, message in [({"pixels": [1, 3, 32, 32]}, r"\[openvino\] shapes names 'pixels', which is not an input"),
                            ({"pixel_values": [1, 32, 32]}, r"gives pixel_values the shape \[1, 32, 32\], which its "
                                                           r"shape .* does not allow")]:
        with pytest.raises(RecipeError, match=message):
            trimrt.compile(model, {**RECIPES["cls_attention"], "openvino": {"shapes": shapes}}, tmp_path / "c",
                           example_inputs=(example,), target="openvino")
    assert not (tmp_path / "c").exists()
    with pytest.raises(RecipeError, match=r"shapes must map input names to shapes of positive integers, e\.g\. "
                       r"\{ input_ids = \[1, 256\] \}, got \{'x': \[0, 2\]\}"):
        load_recipe({"openvino": {"shapes": {"x": [0, 2]}}})


def test_an_openvino_crash_on_static_shapes_is_one_line(vit, tmp_path, monkeypatch):
    """The compile for [openvino] shapes runs in a child process: a crash of OpenVINO there
    (it has died of SIGFPE folding a static graph) is a one-line BuildError, and no build."""
    import subprocess

    from trimrt.errors import BuildError

    model, example = vit
    real = subprocess.run

    def crashing(args, **kwargs):
        if "OpenVINOBackend" in " ".join(map(str, args)):
            return subprocess.CompletedProcess(args, -8, "", "")
        return real(args, **kwargs)

    monkeypatch.setattr(subprocess, "run", crashing)
    recipe = {**RECIPES["cls_attention"], "openvino": {"shapes": {"pixel_values": [1, 3, 32, 32]}}}
    with pytest.raises(BuildError, match=r"^OpenVINO cannot compile this build for \[openvino\] shapes "
                       r"\{'pixel_values': \[1, 3, 32, 32\]\} \(signal 8\); leave shapes out") as err:
        trimrt.compile(model, recipe, tmp_path / "b", example_inputs=(example,), target="openvino")
    assert "\n" not in str(err.value) and not (tmp_path / "b").exists()


def test_load_time_shapes_are_checked(vit, tmp_path):
    """load(shapes=...) on OpenVINO: a name the build lacks is one line, before any run."""
    from trimrt.errors import BackendUnavailableError

    model, example = vit
    trimrt.compile(model, RECIPES["cls_attention"], tmp_path / "b", example_inputs=(example,))
    with pytest.raises(BackendUnavailableError, match=r"^shapes names 'pixels', which is not an input of the model "
                       r"\(its inputs: \['pixel_values'\]\)$"):
        trimrt.load(tmp_path / "b", backend="openvino", shapes={"pixels": [1, 3, 32, 32]})
    session = trimrt.load(tmp_path / "b", backend="openvino", shapes={"pixel_values": [2, 3, 32, 32]})
    assert session.inputs[0].shape == (2, 3, 32, 32)
    feeds = {"pixel_values": example.numpy()}
    np.testing.assert_allclose(session.run(feeds)["logits"], trimrt.load(tmp_path / "b").run(feeds)["logits"],
                               rtol=1e-4, atol=1e-4)
