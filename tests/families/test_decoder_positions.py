"""A pruned LLaMA prefill equals FastV computed in PyTorch with the original position ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402

from fastv_reference import fastv_forward  # noqa: E402
from hf_models import make  # noqa: E402


def test_pruned_llama_keeps_original_positions(tmp_path):
    module, inputs = make("llama")
    trimrt.export(module, tmp_path / "llama.onnx", example_inputs=inputs, exporter="dynamo")
    recipe = {"token_pruning": {"method": "last_token_attention", "layers": [1], "keep": 0.25, "prunable": [4, 20]}}
    trimrt.compile(str(tmp_path / "llama.onnx"), recipe, tmp_path / "b")
    ids = inputs["input_ids"]
    got = trimrt.load(tmp_path / "b").run({"input_ids": ids.numpy()})["last_hidden_state"]
    with torch.no_grad():
        want = fastv_forward(module, ids, layer=1, keep=0.25, span=(4, 20)).numpy()
        renumbered = fastv_forward(module, ids, layer=1, keep=0.25, span=(4, 20), renumber_positions=True).numpy()
    assert got.shape == want.shape == (2, 12, 64)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the check is sensitive to positions: renumbering the kept tokens 0..k-1 changes the result
    assert np.abs(renumbered - want).max() > 1e-3
