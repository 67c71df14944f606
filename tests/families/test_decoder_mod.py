"""Mixture-of-Depths routing in KV-cache decoder builds: the prompt is routed at prefill,
a routed layer caches its routed tokens only, and generation equals p-MoD's routing
written in PyTorch (tests/families/mod_reference.py), with the training-free attention
router and with the routers of a p-MoD model (examples/models/pmod.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from examples.models.pmod import with_mod_routers  # noqa: E402
from tests.families.causal_lms import VOCAB, make  # noqa: E402
from tests.families.mod_reference import mod_generate  # noqa: E402
from trimrt.errors import RecipeError  # noqa: E402
from trimrt.runtime.kv_cache import DecoderSpec  # noqa: E402

LAYERS, SPAN, PROMPT = 4, (2, 18), 24


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Consecutive routed blocks (the second scored on what the first ran), the last one too."""
    ratios = [1.0, 0.5, 0.3, 0.6]
    path = tmp_path_factory.mktemp("mod_kv") / "build"
    trimrt.compile(make("llama", LAYERS), {"mixture_of_depths": {"ratios": ratios, "prunable": list(SPAN)}}, path)
    return ratios, path


#: the p-MoD decoder's layers with a router, and the ratios it is routed at: blocks 0 and 1
#: routed one after the other, block 2 (no router) dense, the last block routed
PMOD_ROUTERS, PMOD_RATIOS = [0, 1, 3], [0.5, 0.4, 1.0, 0.6]


def pmod_model():
    return with_mod_routers(make("llama", LAYERS), PMOD_ROUTERS, SPAN)


@pytest.fixture(scope="module")
def pmod(tmp_path_factory):
    """The p-MoD decoder routed by its own routers."""
    path = tmp_path_factory.mktemp("pmod_kv") / "build"
    recipe = {"mixture_of_depths": {"router": "model", "ratios": PMOD_RATIOS, "prunable": list(SPAN)}}
    trimrt.compile(pmod_model(), recipe, path)
    return PMOD_RATIOS, path


@pytest.mark.parametrize("router", ["attention", "model"])
def test_generation_equals_p_mod_routing_in_pytorch(routed, pmod, router):
    ratios, path = routed if router == "attention" else pmod
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, PROMPT))
    with torch.no_grad():
        lm = make("llama", LAYERS) if router == "attention" else pmod_model()
        want, first, cached = mod_generate(lm, torch.from_numpy(ids), ratios, SPAN, 8, router=router)
    session = trimrt.load(path)
    results = session.generator().generate([list(row) for row in ids], max_new_tokens=8)
    assert [r.tokens for r in results] == want
    spec = DecoderSpec.from_manifest(session.manifest, "build")
    out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                       "position_ids": np.tile(np.arange(PROMPT), (2, 1)), **spec.empty_cache(2)})
    np.testing.assert_allclose(out["logits"][:, -1], first.numpy(), atol=1e-4)
    assert [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == cached
    assert list(spec.cache_tokens_removed) == [PROMPT - c for c in cached]
    assert results[0].stats.kv_cache_bytes < results[0].stats.kv_cache_bytes_unpruned


@pytest.mark.parametrize("speculation, build", [("prompt_lookup", "routed"), ("token_recycling", "routed"),
                                               ("token_recycling", "pmod")])
def test_speculative_decoding_keeps_the_tokens_of_greedy_decoding(speculation, build, request):
    """Routed layers cache fewer tokens; a verification step keeps each layer's accepted rows
    after its own past (draft chains: the routed layers attend with their own causal mask)."""
    session = trimrt.load(request.getfixturevalue(build)[1])
    rng = np.random.default_rng(1)
    for prompt in [rng.integers(3, VOCAB, PROMPT).tolist() + [5, 6, 7] * 3 for _ in range(3)]:
        want = session.generator().generate(prompt, max_new_tokens=16)
        got = session.generator(speculation=speculation).generate(prompt, max_new_tokens=16)
        assert got.tokens == want.tokens
        assert got.stats.decode_steps + got.stats.accepted_draft_tokens == len(got.tokens) - 1


def test_a_decoder_routes_a_span_of_its_prompt(tmp_path):
    with pytest.raises(RecipeError, match=r"\[mixture_of_depths\] a decoder reduces a span of its prompt: give "
                                          r"prunable = \[start, end\)"):
        trimrt.compile(make("llama", 2), {"mixture_of_depths": {"ratios": [1.0, 0.5]}}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_the_model_router_routes_only_the_blocks_trained_with_one(pmod, tmp_path):
    """The build's reference.onnx is the p-MoD model's own export (compiled from ONNX: no
    second export)."""
    export = pmod[1] / "reference.onnx"
    recipe = {"mixture_of_depths": {"router": "model", "ratios": [0.5, 1.0, 0.5, 1.0], "prunable": list(SPAN)}}
    with pytest.raises(RecipeError, match=r'router = "model": blocks \[2\] have no MoD router in the export \(the '
                                          r"blocks with one are \[0, 1, 3\]\); give the others ratio 1.0"):
        trimrt.compile(export, recipe, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("build, router", [
    ("routed", "MoD router: training-free, the last token's attention row in the block before"),
    ("pmod", "MoD router: the model's own (trained with it; blocks with one: [0, 1, 3])")])
def test_inspect_tells_what_each_routed_layer_caches(build, router, request):
    from click.testing import CliRunner

    from trimrt.cli import main

    ratios, path = request.getfixturevalue(build)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    span = SPAN[1] - SPAN[0]
    for layer, ratio in enumerate(ratios):
        if ratio < 1.0:
            kept = int(np.ceil(ratio * span - 1e-9))
            assert f"MoD routing at block {layer}: ratio {ratio}, {kept} of the span's {span} tokens run it" in result.output
            assert f"layer {layer} caches {kept}" in result.output
    assert "prompt routing (MoD)" in result.output and "KiB less cache per prompt" in result.output
    assert router in result.output
