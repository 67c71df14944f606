"""Pruned prompts that stay pruned in the cache: FastV in a KV-cache decoder build prunes
the prompt at prefill, the layers after it cache the kept tokens only, and generation
equals FastV written in PyTorch (tests/families/fastv_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import VOCAB, make  # noqa: E402
from tests.families.fastv_reference import fastv_generate  # noqa: E402
from trimrt.errors import InputError, RecipeError  # noqa: E402
from trimrt.runtime.kv_cache import DecoderSpec  # noqa: E402

LAYERS, KEEP, SPAN, PROMPT = 4, 0.5, (2, 18), 24


def _recipe(layers=(1,), **extra):
    return {"token_pruning": {"method": "last_token_attention", "layers": list(layers), "keep": KEEP,
                              "prunable": list(SPAN), **extra}}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{pruned layers: build path}: one site (the paper's), and two (each prunes the kept span again)."""
    folder = tmp_path_factory.mktemp("fastv_kv")
    out = {}
    for layers in ((1,), (1, 2)):
        out[layers] = folder / "-".join(map(str, layers))
        trimrt.compile(make("llama", LAYERS), _recipe(layers), out[layers])
    return out


def _prompts(batch=2, length=PROMPT, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length))


def _prefill(session, ids):
    spec = DecoderSpec.from_manifest(session.manifest, "build")
    return session.run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "position_ids": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
                        **spec.empty_cache(ids.shape[0])})


@pytest.mark.parametrize("layers", [(1,), (1, 2)])
def test_generation_equals_fastv_in_pytorch(builds, layers):
    ids = _prompts()
    with torch.no_grad():
        want, first = fastv_generate(make("llama", LAYERS), torch.from_numpy(ids), layers, KEEP, SPAN, 8)
    session = trimrt.load(builds[layers])
    results = session.generator().generate([list(row) for row in ids], max_new_tokens=8)
    assert [r.tokens for r in results] == want
    out = _prefill(session, ids)
    np.testing.assert_allclose(out["logits"][:, -1], first.numpy(), atol=1e-4)
    # the span of 16 keeps 8 (then 4): the layers after each pruning cache fewer tokens
    lengths = [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)]
    assert lengths == ([24, 24, 16, 16] if layers == (1,) else [24, 24, 16, 12])
    # the last step's cache: every layer holds its prompt plus 7 generated tokens
    kv = results[0].stats.kv_cache_bytes
    assert kv == 2 * 2 * sum(n + 7 for n in lengths) * 2 * 16 * 4
    assert session.manifest["decoder"]["prunes_prompt"] is True
    # the cache is a shared buffer written in place; each layer knows how many prompt tokens it lacks
    assert session.manifest["decoder"]["shared_buffer"] is True
    assert session.manifest["decoder"]["cache_tokens_removed"] == [PROMPT - n for n in lengths]
    # the blocks after the pruning, whose shapes the token pass dropped, are attention ops too
    report = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "kv_attention")
    assert report["attention_ops"] == LAYERS and report["grouped"] == 0 and report["kv_op"] == "GroupQueryAttention"


def test_a_decode_step_keeps_its_tokens(builds):
    """With a past, the pruning branch is not taken: several new tokens (a draft) all stay."""
    session = trimrt.load(builds[(1,)])
    ids = _prompts(batch=1)
    out = _prefill(session, ids)
    new = np.array([[5, 6, 7]])
    feeds = {"input_ids": new, "attention_mask": np.ones((1, PROMPT + 3), np.int64),
             "position_ids": np.arange(PROMPT, PROMPT + 3)[None],
             **{f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(LAYERS) for k in ("key", "value")}}
    step = session.run(feeds)
    assert step["logits"].shape == (1, 3, VOCAB)
    assert [step[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == [27, 27, 19, 19]


def test_cli_reports_the_cache_pruning_saves(builds):
    """inspect: which layers cache how much of the span; generate: the cache against its
    unpruned size; verify: the next-token logits (the pruned token axis is not comparable)."""
    from click.testing import CliRunner

    from trimrt.cli import main

    path = str(builds[(1, 2)])
    shown = CliRunner().invoke(main, ["inspect", path])
    assert shown.exit_code == 0, shown.output
    # 2 (key, value) × 2 KV heads × 16 × 4 bytes = 256 bytes per layer and token: (16 - 8) + (16 - 4) tokens fewer
    assert ("prompt pruning: span [2, 18) of 16 tokens; layer 2 caches 8; layer 3 caches 4: 5.0 KiB less cache "
            "per prompt") in shown.output
    ran = CliRunner().invoke(main, ["generate", path, "--prompt", ",".join(map(str, range(3, 27))),
                                    "--max-new-tokens", "3"])
    assert ran.exit_code == 0, ran.output
    # the end: 26 tokens in layers 0-1, 26 - 8 and 26 - 12 in layers 2 and 3, 1 KiB per token unpruned
    assert "KV cache 0.02 MiB (0.03 MiB unpruned: 19% saved)" in ran.stderr
    report = trimrt.verify(path, samples=2)
    assert [m.name for m in report.outputs][-1] == "logits (last token)"
    assert any(line.startswith("logits:") for line in report.not_compared)


def test_prompts_the_pruned_build_cannot_take(builds):
    gen = trimrt.load(builds[(1,)]).generator()
    with pytest.raises(InputError, match="one length per batch"):
        gen.generate([list(range(3, 27)), list(range(3, 30))], max_new_tokens=2)
    with pytest.raises(InputError, match="needs at least 19"):  # the span and the last token after it
        gen.generate(list(range(3, 13)), max_new_tokens=2)


@pytest.mark.parametrize("recipe, family, message", [
    ({"token_pruning": {"method": "last_token_attention", "layers": [1], "keep": 0.5}}, "llama",
     "give prunable = \\[start, end\\)"),
    (_recipe(method="adaptive"), "llama", "'adaptive' does not apply to a decoder with a KV cache"),
    (_recipe(), "mistral", "sliding window of 16 tokens"),
])
def test_recipes_refused_for_kv_cache_decoders(tmp_path, recipe, family, message):
    with pytest.raises(RecipeError, match=message):
        trimrt.compile(make(family, 2), recipe, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_pruned_decoders_are_refused_for_tensorrt(tmp_path, monkeypatch):
    """onnx-tensorrt parses an If only when its branches' outputs broadcast: the pruned
    prompt's branch gives fewer tokens than the decode step's (checked as on a GPU machine)."""
    from trimrt.runtime.backends import TensorRTBackend

    monkeypatch.setattr(TensorRTBackend, "available", staticmethod(lambda: True))
    with pytest.raises(RecipeError, match="builds for ONNX Runtime only for now.*--target onnxruntime"):
        trimrt.compile(make("llama", 2), _recipe(), tmp_path / "b", target="tensorrt")
    assert not (tmp_path / "b").exists()


def test_pruning_after_the_last_attention_caches_every_token(tmp_path):
    """Pruned after the last block's attention, only its MLP and the head see fewer tokens:
    every layer caches the whole prompt, and generation still equals FastV in PyTorch."""
    recipe = {"token_pruning": {"method": "last_token_attention", "layers": [1], "keep": 0.25, "prunable": [4, 20]}}
    trimrt.compile(make("llama", 2), recipe, tmp_path / "b")
    ids = _prompts()
    with torch.no_grad():
        want, _ = fastv_generate(make("llama", 2), torch.from_numpy(ids), (1,), 0.25, (4, 20), 6)
    session = trimrt.load(tmp_path / "b")
    assert [r.tokens for r in session.generator().generate([list(row) for row in ids], max_new_tokens=6)] == want
    assert [_prefill(session, ids)[f"present.{i}.key"].shape[2] for i in range(2)] == [PROMPT, PROMPT]


def test_fastv_with_int4_and_fusion(tmp_path, builds):
    """The issue's fastv_int4 recipe: FastV, INT4 weights (lm_head included) and ONNX Runtime's
    kernels together; the Attention rewrite is checked on a prompt (the pruning branch) and a
    decode step, and leaves the ORT fusion nothing to do."""
    recipe = {**_recipe(), "quantization": {"weights": "int4", "group_size": 16}, "onnxruntime": {"fuse": True}}
    trimrt.compile(make("llama", LAYERS), recipe, tmp_path / "b")
    session = trimrt.load(tmp_path / "b")
    reports = {p["pass"]: p["report"] for p in session.manifest["passes"]}
    assert reports["kv_attention"]["attention_ops"] == LAYERS and not reports["ort_fusion"]["applied"]
    # per layer: Q/K/V packed, output, gate/up packed, down; and lm_head
    assert reports["packed_projections"]["packed_groups"] == 2 * LAYERS
    assert reports["quantization"]["matmuls_quantized"] == 4 * LAYERS + 1
    ids = _prompts()
    out = _prefill(session, ids)
    assert [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == [24, 24, 16, 16]
    fp32 = _prefill(trimrt.load(builds[(1,)]), ids)["logits"][:, -1]
    got = out["logits"][:, -1]
    cosine = (got * fp32).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cosine.min() > 0.95, cosine  # INT4 in groups of 16 on random weights: 0.975 and 0.987
    results = session.generator().generate([list(row) for row in ids], max_new_tokens=8)
    assert [len(r.tokens) for r in results] == [8, 8]
    assert results[0].stats.kv_cache_bytes < results[0].stats.kv_cache_bytes_unpruned


def test_divprune_before_layer_0_with_a_long_span(tmp_path):
    """DivPrune picks the span's tokens on the embeddings: every layer caches the kept
    tokens; the span ends beyond the compiler's default check length (its check prompt
    grows to fit). The reference picks with the ops' NumPy references (DiversityRank, then
    TokenPrune's top-k) and runs the PyTorch layers on the picked tokens."""
    from trimrt.plugins import REGISTRY

    def choose(embeddings, start, end, k):
        (score,) = REGISTRY["DiversityRank"].run_reference(embeddings.numpy(), keep=k, protect=start, span_end=end)
        _, kept, _ = REGISTRY["TokenPrune"].run_reference(embeddings.numpy(), score, keep=k, protect=start,
                                                          span_end=end)
        return torch.from_numpy(kept[:, start:start + k])

    recipe = {"token_pruning": {"method": "divprune", "layers": [0], "keep": 0.25, "prunable": [30, 70]}}
    trimrt.compile(make("llama", 2), recipe, tmp_path / "b")
    ids = _prompts(length=80)
    with torch.no_grad():
        want, first = fastv_generate(make("llama", 2), torch.from_numpy(ids), (), 0.25, (30, 70), 6, choose_before=choose)
    session = trimrt.load(tmp_path / "b")
    assert [r.tokens for r in session.generator().generate([list(row) for row in ids], max_new_tokens=6)] == want
    out = _prefill(session, ids)
    np.testing.assert_allclose(out["logits"][:, -1], first.numpy(), atol=1e-4)
    assert [out[f"present.{i}.key"].shape[2] for i in range(2)] == [50, 50]  # 30 + 10 of 40 + 10
