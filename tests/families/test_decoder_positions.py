"""A pruned LLaMA prefill equals FastV computed in PyTorch with the original position ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.fastv_reference import fastv_forward  # noqa: E402
from tests.families.hf_models import exported  # noqa: E402


def test_pruned_llama_keeps_original_positions(tmp_path):
    path, module, inputs, _ = exported("llama")
    recipe = {"token_pruning": {"method": "last_token_attention", "layers": [1], "keep": 0.25, "prunable": [4, 20]}}
    trimrt.compile(str(path), recipe, tmp_path / "b")
    ids = inputs["input_ids"]
    got = trimrt.load(tmp_path / "b").run({"input_ids": ids.numpy()})["last_hidden_state"]
    with torch.no_grad():
        want = fastv_forward(module, ids, layer=1, keep=0.25, span=(4, 20)).numpy()
        renumbered = fastv_forward(module, ids, layer=1, keep=0.25, span=(4, 20), renumber_positions=True).numpy()
    assert got.shape == want.shape == (2, 12, 64)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the check is sensitive to positions: renumbering the kept tokens 0..k-1 changes the result
    assert np.abs(renumbered - want).max() > 1e-3


def test_divprune_on_a_decoder_image_span_before_layer_0(tmp_path):
    """DivPrune selects the span's tokens on the embeddings (before layer 0); the build
    equals the LLaMA run on the selected tokens with their original position ids."""
    from trimrt.plugins import REGISTRY

    path, module, inputs, _ = exported("llama")
    recipe = {"token_pruning": {"method": "divprune", "layers": [0], "keep": 0.25, "prunable": [4, 20]}}
    trimrt.compile(str(path), recipe, tmp_path / "b")
    ids = inputs["input_ids"]
    got = trimrt.load(tmp_path / "b").run({"input_ids": ids.numpy()})["last_hidden_state"]
    with torch.no_grad():
        emb = module.embed_tokens(ids)
        (score,) = REGISTRY["DiversityRank"].run_reference(emb.numpy(), keep=4, protect=4, span_end=20)
        _, kept, _ = REGISTRY["TokenPrune"].run_reference(emb.numpy(), score, keep=4, protect=4, span_end=20)
        kept = torch.from_numpy(kept)
        pos = kept
        h = torch.gather(emb, 1, kept[..., None].expand(-1, -1, emb.shape[-1]))
        module.config._attn_implementation = "eager"
        for block in module.layers:
            cos, sin = module.rotary_emb(h, pos)
            mask = torch.where(pos[:, None, :] > pos[:, :, None], torch.finfo(h.dtype).min, 0.0)[:, None]
            h = h + block.self_attn(block.input_layernorm(h), position_embeddings=(cos, sin), attention_mask=mask)[0]
            h = h + block.mlp(block.post_attention_layernorm(h))
        want = module.norm(h).numpy()
    assert got.shape == want.shape == (2, 12, 64)
    np.testing.assert_allclose(got, want, atol=1e-4)
