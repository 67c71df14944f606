"""`trimrt export-triton`: model repositories checked against Triton's schema, and served by a
real Triton Inference Server (the python backend of nvidia-pytriton's bundled tritonserver)."""

from __future__ import annotations

import concurrent.futures
import filecmp

import numpy as np
import pytest
from click.testing import CliRunner

import trimrt
from tests.serving.servers import full_triton_missing, triton_missing, triton_server
from trimrt.cli import main
from trimrt.errors import ServingError
from trimrt.serving.triton import export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
text_format = pytest.importorskip("google.protobuf.text_format")

PRUNE = {"token_pruning": {"method": "cls_attention", "layers": [1, 2], "keep": 0.5}}


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def vit_build(tiny_vit_onnx, tmp_path_factory):
    _, onnx_path = tiny_vit_onnx
    out = tmp_path_factory.mktemp("triton") / "vit_pruned"
    trimrt.compile(str(onnx_path), PRUNE, out)
    return out


@pytest.fixture(scope="module")
def bert_text(small_vocab_bert, tmp_path_factory):
    """(the small-vocabulary BERT's build, a word-level tokenizer.json of its 60 ids: [PAD] = 0, w1..w59)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("bert_text")
    trimrt.compile(str(small_vocab_bert), None, root / "bert")
    vocab = {"[PAD]": 0, **{f"w{i}": i for i in range(1, 60)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    return root / "bert", root / "tokenizer.json"


@pytest.fixture(scope="module")
def decoder_build():
    pytest.importorskip("transformers")
    from tests.families.causal_lms import build

    path, _ = build("llama")
    return path


def test_an_encoder_exports_a_stock_onnxruntime_model_and_a_python_model(vit_build, tmp_path):
    models = export_triton(vit_build, tmp_path / "repo", max_batch=16, instances=2)
    assert [(m.name, m.kind) for m in models] == [("vit_pruned", "onnxruntime_onnx"), ("vit_pruned_python", "python")]
    stock = _config(tmp_path / "repo/vit_pruned/config.pbtxt")
    assert stock.platform == "onnxruntime_onnx" and stock.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in stock.input] == [
        ("pixel_values", model_config_pb2.DataType.TYPE_FP32, [3, 32, 32])]
    assert [(o.name, list(o.dims)) for o in stock.output] == [("logits", [10])]
    assert stock.HasField("dynamic_batching") and stock.instance_group[0].count == 2
    assert stock.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert filecmp.cmp(vit_build / "model.onnx", tmp_path / "repo/vit_pruned/1/model.onnx", shallow=False)
    python = _config(tmp_path / "repo/vit_pruned_python/config.pbtxt")
    assert python.backend == "python" and python.parameters["mode"].string_value == "run"
    # the python model carries the sealed build, which loads (hashes checked) from there
    copy = tmp_path / "repo/vit_pruned_python/1/build"
    assert trimrt.load(copy).manifest["files"] == trimrt.load(vit_build).manifest["files"]
    assert (tmp_path / "repo/vit_pruned_python/1/model.py").read_text().startswith('"""model.py of a Triton')


def test_token_axes_are_dynamic_and_dynamic_int8_builds_are_not_batched_by_triton(small_vocab_bert, tmp_path):
    trimrt.compile(str(small_vocab_bert), {"quantization": {"method": "rtn"}}, tmp_path / "bert_int8")
    models = export_triton(tmp_path / "bert_int8", tmp_path / "repo", name="bert")
    stock = _config(tmp_path / "repo/bert/config.pbtxt")
    assert {i.name: list(i.dims) for i in stock.input} == {"input_ids": [-1], "attention_mask": [-1]}
    assert not stock.HasField("dynamic_batching") and stock.max_batch_size == 8
    assert any("DynamicQuantizeLinear" in note for note in models[0].notes)
    # the python model batches too, but its run_requests keeps such a build one request a run
    assert _config(tmp_path / "repo/bert_python/config.pbtxt").HasField("dynamic_batching")


def test_a_decoder_exports_a_generation_model(decoder_build, tmp_path):
    (model,) = export_triton(decoder_build, tmp_path / "repo", name="llm")
    config = _config(tmp_path / "repo/llm/config.pbtxt")
    assert model.kind == "python" and config.parameters["mode"].string_value == "generate"
    assert [i.name for i in config.input][:2] == ["prompt", "max_tokens"] and config.input[1].optional
    assert [o.name for o in config.output] == ["text", "tokens"]


def test_a_tokenizer_adds_a_text_ensemble_in_front_of_the_stock_model(bert_text, vit_build, tmp_path):
    build, tokenizer = bert_text
    models = export_triton(build, tmp_path / "repo", name="bert", tokenizer=tokenizer.parent)
    assert [m.name for m in models] == ["bert", "bert_python", "bert_tokenize", "bert_text"]
    ensemble = _config(tmp_path / "repo/bert_text/config.pbtxt")
    assert ensemble.platform == "ensemble" and [i.name for i in ensemble.input] == ["text"]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["bert_tokenize", "bert"]
    assert dict(steps[1].input_map) == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    assert {o.name: list(o.dims) for o in ensemble.output}["last_hidden_state"] == [-1, -1, 32]
    tokenize = _config(tmp_path / "repo/bert_tokenize/config.pbtxt")
    assert [o.name for o in tokenize.output] == ["input_ids", "attention_mask"]
    assert tokenize.parameters["max_tokens"].string_value == "64"  # the model's position table
    with pytest.raises(ServingError, match="this build takes \\['pixel_values'\\]"):
        export_triton(vit_build, tmp_path / "repo2", tokenizer=tokenizer)
    with pytest.raises(ServingError, match="no tokenizer.json"):
        export_triton(build, tmp_path / "repo3", tokenizer=tmp_path)


def test_existing_models_and_bad_names_are_refused_and_nothing_is_half_written(vit_build, tmp_path):
    repo = tmp_path / "repo"
    (repo / "vit_pruned_python").mkdir(parents=True)
    with pytest.raises(ServingError, match=r"already has model\(s\) \['vit_pruned_python'\]"):
        export_triton(vit_build, repo)
    assert sorted(p.name for p in repo.iterdir()) == ["vit_pruned_python"]
    with pytest.raises(ServingError, match="cannot name a Triton model"):
        export_triton(vit_build, repo, name="../x")
    result = CliRunner().invoke(main, ["export-triton", str(vit_build), "-o", str(repo)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    result = CliRunner().invoke(main, ["export-triton", str(tmp_path / "nope"), "-o", str(repo)])
    assert result.exit_code == 2 and "build directory not found" in result.stderr


def test_the_cli_writes_a_repository_and_says_how_to_serve_it(vit_build, tmp_path):
    result = CliRunner().invoke(main, ["export-triton", str(vit_build), "-o", str(tmp_path / "repo"), "--name", "vit",
                                       "--max-batch", "0"])
    assert result.exit_code == 0, result.output
    assert "vit (onnxruntime_onnx)" in result.output and "tritonserver --model-repository" in result.output
    config = _config(tmp_path / "repo/vit/config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, 3, 32, 32]


@pytest.mark.slow
def test_a_real_triton_server_serves_what_session_run_returns(vit_build, decoder_build, bert_text, tmp_path):
    reason = triton_missing()
    if reason:
        pytest.skip(reason)
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    export_triton(vit_build, tmp_path / "repo", name="vit", max_batch=8)
    export_triton(decoder_build, tmp_path / "repo", name="llm")
    export_triton(bert_text[0], tmp_path / "repo", name="bert", tokenizer=bert_text[1], ensemble_model="python")
    session = trimrt.load(vit_build)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((rows, 3, 32, 32)).astype(np.float32) for rows in (1, 3, 2, 1, 4, 1, 2, 1)]

    def infer(x):
        client = http.InferenceServerClient(address)
        try:
            tensor = http.InferInput("pixel_values", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return client.infer("vit_python", [tensor]).as_numpy("logits")
        finally:
            client.close()

    models = ["vit_python", "llm", "bert_python", "bert_tokenize", "bert_text"]
    with triton_server(tmp_path / "repo", models, tmp_path) as address:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: Triton batches them dynamically
            answers = list(pool.map(infer, batches))
        for x, answer in zip(batches, answers):
            np.testing.assert_allclose(answer, session.run({"pixel_values": x})["logits"], rtol=0, atol=1e-6)
        client = http.InferenceServerClient(address)
        bad = http.InferInput("pixel_values", [1, 3, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        with pytest.raises(InferenceServerException, match="unexpected shape"):
            client.infer("vit_python", [bad])
        # the decoder's generation model: token ids in (no tokenizer in this build), the same tokens as the runtime
        prompt = http.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"1,17,99,5,42,7"], dtype=np.object_))
        max_tokens = http.InferInput("max_tokens", [1], "INT32")
        max_tokens.set_data_from_numpy(np.array([12], np.int32))
        tokens = client.infer("llm", [prompt, max_tokens]).as_numpy("tokens").tolist()
        # the text ensemble: a request's texts tokenized (padded to its longest), then the model
        texts = http.InferInput("text", [2], "BYTES")
        texts.set_data_from_numpy(np.array([b"w5 w17 w9 w33", b"w2 w8"], dtype=np.object_))
        hidden = client.infer("bert_text", [texts]).as_numpy("last_hidden_state")
        client.close()
    ids = np.array([[5, 17, 9, 33], [2, 8, 0, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    np.testing.assert_allclose(hidden, trimrt.load(bert_text[0]).run(feeds)["last_hidden_state"], rtol=0, atol=1e-6)
    expected = trimrt.load(decoder_build).generator().generate([1, 17, 99, 5, 42, 7], max_new_tokens=12).tokens
    assert tokens == expected


def test_a_tensorrt_build_exports_a_plan_model_and_says_how_to_load_its_plugins(vit_build, tmp_path):
    import json
    import shutil

    from trimrt.runtime.manifest import sha256_file

    engine_build = tmp_path / "vit_trt"
    shutil.copytree(vit_build, engine_build)
    (engine_build / "model.engine").write_bytes(b"a serialized engine")  # what --target tensorrt writes
    manifest = json.loads((engine_build / "manifest.json").read_text())
    manifest["target"] = "tensorrt"
    manifest["files"]["model.engine"] = sha256_file(engine_build / "model.engine")
    (engine_build / "manifest.json").write_text(json.dumps(manifest))
    plan, python = export_triton(engine_build, tmp_path / "repo", name="vit")
    config = _config(tmp_path / "repo/vit/config.pbtxt")
    assert plan.kind == "tensorrt_plan" and config.platform == "tensorrt_plan"
    assert (tmp_path / "repo/vit/1/model.plan").read_bytes() == b"a serialized engine"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert any("--backend-config=tensorrt,plugins=" in note for note in plan.notes)
    assert "AttentionRowScore" in (tmp_path / "repo/vit/NOTES.txt").read_text()
    assert _config(tmp_path / "repo/vit_python/config.pbtxt").instance_group[0].kind == \
        model_config_pb2.ModelInstanceGroup.KIND_GPU


@pytest.mark.full_triton
def test_a_full_triton_serves_the_stock_onnxruntime_model(vit_build, bert_text, tmp_path):
    """The stock `onnxruntime_onnx` models (and the ensemble in front of one), on a Triton with that
    backend: skipped here (nvidia-pytriton's server has only the python backend)."""
    reason = full_triton_missing()
    if reason:
        pytest.skip(reason)
    import tritonclient.http as http

    export_triton(vit_build, tmp_path / "repo", name="vit", max_batch=8)
    export_triton(bert_text[0], tmp_path / "repo", name="bert", tokenizer=bert_text[1])
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with triton_server(tmp_path / "repo", ["vit", "bert", "bert_tokenize", "bert_text"], tmp_path, full=True) as address:
        client = http.InferenceServerClient(address)
        tensor = http.InferInput("pixel_values", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        logits = client.infer("vit", [tensor]).as_numpy("logits")
        texts = http.InferInput("text", [1], "BYTES")
        texts.set_data_from_numpy(np.array([b"w5 w17 w9 w33"], dtype=np.object_))
        hidden = client.infer("bert_text", [texts]).as_numpy("last_hidden_state")
        client.close()
    # another ONNX Runtime release, maybe other fusions: equal up to float rounding
    np.testing.assert_allclose(logits, trimrt.load(vit_build).run({"pixel_values": x})["logits"], rtol=0, atol=1e-4)
    ids = np.array([[5, 17, 9, 33]], np.int64)
    expected = trimrt.load(bert_text[0]).run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(hidden, expected["last_hidden_state"], rtol=0, atol=1e-4)
