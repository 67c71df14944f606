"""Decoder builds generate exactly what Hugging Face generate() does on PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import FAMILIES, build, hf_greedy, word_tokenizer  # noqa: E402
from trimrt.runtime.kv_cache import past_name  # noqa: E402

PROMPTS = [[1, 17, 99, 5, 42, 7, 150, 3, 88, 61, 12], [1, 5], [1, 23, 9, 180, 44, 2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_hugging_face(family):
    path, model = build(family)
    gen = trimrt.load(path).generator()
    single = gen.generate(PROMPTS[0], max_new_tokens=64)
    assert single.tokens == hf_greedy(model, PROMPTS[:1], 64)[0]
    assert len(single.tokens) == 64 and single.finish_reason == "length"
    batch = gen.generate(PROMPTS, max_new_tokens=64)
    assert [r.tokens for r in batch] == hf_greedy(model, PROMPTS, 64)
    assert batch[0].tokens == single.tokens  # left padding changes nothing for the longest prompt


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_cache_in_small_chunks_generates_the_same(family):
    """The build's shared cache buffer (decoder.shared_buffer) in chunks of 8 tokens (reserved
    for the 11 + 64 tokens up front: 80) generates what Hugging Face does, and what the same
    build does with its cache fed back as tensors every step. (Growth by chunks, step by
    step: tests/passes/test_kv_attention.py.)"""
    from dataclasses import replace

    from trimrt.runtime.generation import Generator

    path, model = build(family)
    session = trimrt.load(path)
    grown = Generator(session, kv_chunk=8)
    assert grown.spec.shared_buffer
    out = grown.generate(PROMPTS, max_new_tokens=64)
    assert [r.tokens for r in out] == hf_greedy(model, PROMPTS, 64)
    assert out[0].stats.kv_cache_bytes == 3 * (11 + 63) * grown.spec.kv_bytes_per_token
    fed_back = Generator(session)
    fed_back.spec = replace(fed_back.spec, shared_buffer=False)
    again = fed_back.generate(PROMPTS, max_new_tokens=64)
    assert [r.tokens for r in again] == [r.tokens for r in out]
    assert again[0].stats.kv_cache_bytes == out[0].stats.kv_cache_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_pytorch(family):
    """Prefill of 11 tokens, then a 3-token step on the cache (what speculation verifies)."""
    path, model = build(family)
    session = trimrt.load(path)
    spec = session.generator().spec
    ids = torch.tensor([PROMPTS[0] + [4, 8, 15]])
    with torch.no_grad():
        want = model(ids).logits.numpy()
    first = session.run({"input_ids": ids[:, :11].numpy(), "attention_mask": np.ones((1, 11), np.int64),
                         "position_ids": np.arange(11)[None], **spec.empty_cache(1)})
    np.testing.assert_allclose(first["logits"], want[:, :11], atol=1e-4)
    past = {past_name(i, k): first[f"present.{i}.{k}"] for i in range(spec.layers) for k in ("key", "value")}
    step = session.run({"input_ids": ids[:, 11:].numpy(), "attention_mask": np.ones((1, 14), np.int64),
                        "position_ids": np.arange(11, 14)[None], **past})
    np.testing.assert_allclose(step["logits"], want[:, 11:], atol=1e-4)
    assert step["present.0.key"].shape == (1, spec.kv_heads, 14, spec.head_dim)


def test_attention_bias_masks_like_a_4d_mask():
    """A tree-shaped bias over 3 new tokens (the third sees the prefix and itself only) equals
    Hugging Face run with that 4-D mask."""
    path, model = build("llama")
    session = trimrt.load(path)
    spec = session.generator().spec
    ids = torch.tensor([PROMPTS[0] + [4, 8, 15]])
    allowed = torch.tril(torch.ones(14, 14, dtype=torch.bool))
    allowed[13, 11:13] = False
    bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        want = model(ids, attention_mask=bias).logits.numpy()
    out = session.run({"input_ids": ids.numpy(), "attention_mask": np.ones((1, 14), np.int64),
                       "position_ids": np.arange(14)[None], "attention_bias": bias.numpy(), **spec.empty_cache(1)})
    np.testing.assert_allclose(out["logits"], want, atol=1e-4)
    plain = session.run({"input_ids": ids.numpy(), "attention_mask": np.ones((1, 14), np.int64),
                         "position_ids": np.arange(14)[None], **spec.empty_cache(1)})
    assert np.abs(plain["logits"][0, 13] - out["logits"][0, 13]).max() > 1e-3
    np.testing.assert_allclose(plain["logits"][0, :13], out["logits"][0, :13], atol=1e-5)


def test_repetition_penalty_equals_hugging_face():
    path, model = build("llama")
    got = trimrt.load(path).generator().generate(PROMPTS[0], max_new_tokens=24, repetition_penalty=1.5)
    assert got.tokens == hf_greedy(model, PROMPTS[:1], 24, repetition_penalty=1.5)[0]


def test_checkpoint_folder_and_onnx_decoder_sources(tmp_path):
    """A local checkpoint folder compiles with its tokenizer inside the build; the build's
    model.onnx (an ONNX decoder with past inputs) compiles again into the same generator."""
    _, model = build("llama")
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    manifest = trimrt.compile(str(tmp_path / "ckpt"), None, tmp_path / "b1")
    assert manifest["decoder"]["layers"] == 2 and "tokenizer.json" in manifest["files"]
    text = trimrt.load(tmp_path / "b1").generator().generate("w1 w17 w99", max_new_tokens=8)
    assert text.text.split() == [f"w{t}" for t in text.tokens]
    assert text.tokens == hf_greedy(model, [[1, 17, 99]], 8)[0]
    again = trimrt.compile(str(tmp_path / "b1" / "model.onnx"), None, tmp_path / "b2")
    assert {k: again["decoder"][k] for k in ("layers", "kv_heads", "head_dim", "vocab_size")} == \
        {k: manifest["decoder"][k] for k in ("layers", "kv_heads", "head_dim", "vocab_size")}
    assert trimrt.load(tmp_path / "b2").generator().generate([1, 17, 99], max_new_tokens=8).tokens == text.tokens


def test_verify_and_quantized_decoder_builds(tmp_path):
    """INT8 applies to every linear layer of a decoder build, lm_head included; verify compares
    decode steps (a past and new tokens) with the unmodified export."""
    _, model = build("llama")
    manifest = trimrt.compile(model, {"quantization": {"weights": "int8"}}, tmp_path / "q")
    layers = manifest.pass_report("quantization")["layers"]
    # per block: Q/K/V packed, output, gate/up packed, down; then lm_head
    assert len(layers) == 9 and layers[-1]["shape"] == [64, 200] and layers[0]["shape"] == [64, 128]
    report = trimrt.verify(tmp_path / "q", samples=2)
    assert report.outputs[0].name == "logits" and report.outputs[0].cosine_mean > 0.99
    from trimrt.bench import bench_build

    timed = bench_build(tmp_path / "q", batch=2, tokens=3, warmup=1, rounds=2)  # decode steps of 3 tokens
    assert timed.batch == 2 and timed.build_ms > 0 and timed.baseline_ms > 0
    assert timed.cache_in_place  # timed as generation steps: the past in a buffer the step writes into
    out = trimrt.load(tmp_path / "q").generator().generate(PROMPTS, max_new_tokens=8)
    assert [len(r.tokens) for r in out] == [8, 8, 8]


def test_an_onnxruntime_genai_export_generates_like_hugging_face(tmp_path):
    """ONNX Runtime GenAI's model builder (GroupQueryAttention, no position_ids input, its
    genai_config.json beside the model) compiles into a decoder build that trimrt generates with."""
    import subprocess
    import sys

    pytest.importorskip("onnxruntime_genai")
    _, model = build("llama")
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "ckpt"),
                    "-o", str(tmp_path / "og"), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    manifest = trimrt.compile(str(tmp_path / "og" / "model.onnx"), None, tmp_path / "b")
    assert manifest["decoder"]["position_input"] is False and manifest["decoder"]["head_dim"] == 16
    gen = trimrt.load(tmp_path / "b").generator()
    assert gen.generate(PROMPTS[0], max_new_tokens=24).tokens == hf_greedy(model, PROMPTS[:1], 24)[0]
    with pytest.raises(trimrt.InputError, match="give prompts of one length per batch"):
        gen.generate(PROMPTS, max_new_tokens=4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_onnxruntime_fusion_of_a_decoder_generates_the_same(tmp_path, family):
    """[onnxruntime] fuse on a decoder build: kv_attention made its attention, RMSNorms and
    RoPEs standard ONNX ops already, which ORT runs as kernels, so the ORT fusion finds nothing
    left to fuse (and no attention left unfused); greedy generation is unchanged."""
    path, model = build(family)
    manifest = trimrt.compile(model, {"onnxruntime": {"fuse": True}}, tmp_path / "fused")
    report = manifest.pass_report("ort_fusion")
    assert manifest.pass_report("kv_attention")["attention_ops"] == 2
    assert not report["applied"] and report["reason"] == "no pattern matched" and report["attention_unfused"] == 0
    fused = trimrt.load(tmp_path / "fused").generator().generate(PROMPTS, max_new_tokens=16)
    plain = trimrt.load(path).generator().generate(PROMPTS, max_new_tokens=16)
    assert [r.tokens for r in fused] == [r.tokens for r in plain]


@pytest.mark.parametrize("method, weights", [("awq", "int4"), ("gptq", "int8")])
def test_calibrated_quantization_of_a_decoder(tmp_path, method, weights):
    """AWQ / GPTQ calibrate a decoder build on prefill steps (empty past, positions filled in)
    from text; the build generates, and its first greedy token matches the float build's."""
    path, model = build("llama")
    corpus = tmp_path / "calib.txt"
    corpus.write_text("\n".join(" ".join(f"w{(7 * i + j) % 200}" for j in range(24)) for i in range(8)))
    word_tokenizer(tmp_path / "tokenizer.json")
    recipe = {"quantization": {"weights": weights, "method": method, "group_size": 32},
              "calibration": {"source": str(corpus), "tokenizer": str(tmp_path), "samples": 8}}
    if weights == "int8":
        del recipe["quantization"]["group_size"]
    manifest = trimrt.compile(model, recipe, tmp_path / "q")
    assert manifest.pass_report("quantization")["layers"], manifest.pass_report("quantization")
    out = trimrt.load(tmp_path / "q").generator().generate(PROMPTS[0], max_new_tokens=4)
    want = trimrt.load(path).generator().generate(PROMPTS[0], max_new_tokens=4)
    assert len(out.tokens) == 4 and out.tokens[0] == want.tokens[0]


def test_decoder_graph_has_one_contrib_op_and_static_ranks():
    """An ONNX Runtime decoder build uses one ONNX Runtime contrib op, GroupQueryAttention (as
    ONNX Runtime GenAI's own exports do), and standard ops otherwise; every input and output
    has a static rank. (The TensorRT target's graph is standard ONNX: test_decoder_tensorrt.)"""
    import onnx

    path, _ = build("llama")
    proto = onnx.load(str(path / "model.onnx"))
    assert {(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")} == \
        {("com.microsoft", "GroupQueryAttention")}
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.HasField("shape"), value.name


def test_a_past_of_the_wrong_shape_is_one_line():
    path, _ = build("llama")
    session = trimrt.load(path)
    spec = session.generator().spec
    feeds = spec.random_feeds(1, new=2, past=3)
    feeds["past_key_values.1.value"] = np.zeros((1, spec.kv_heads + 1, 3, spec.head_dim), np.float32)
    with pytest.raises(trimrt.InputError) as err:
        session.run(feeds)
    assert "past_key_values.1.value" in str(err.value) and "axis 1 must be 2" in str(err.value)
    assert "\n" not in str(err.value)
