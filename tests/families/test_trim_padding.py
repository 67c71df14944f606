"""[padding] trim_trailing: exact on real tokens, interface unchanged, clear error without a mask."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from trimrt.errors import StructureError  # noqa: E402

from hf_models import make  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    module, inputs = make("bert")
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    trimrt.export(module, path, example_inputs=inputs)
    return path


@pytest.mark.parametrize("pruning", [None, {"layers": [1], "keep": 1.0, "fuse_pruned": True}])
def test_trimming_is_exact_on_real_tokens(bert, tmp_path, pruning):
    recipe = {"padding": {"trim_trailing": True}}
    if pruning:
        recipe["token_pruning"] = pruning
    manifest = trimrt.compile(str(bert), recipe, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "trim_padding")
    assert report["inputs_trimmed"] == ["input_ids", "attention_mask"] and report["outputs_padded"] == ["last_hidden_state"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[0, 10:], mask[1, 25:], mask[2, 30:] = 0, 0, 0  # longest real length 30 of 40
    feeds = {"input_ids": ids, "attention_mask": mask}
    got = trimrt.load(tmp_path / "b").run(feeds)
    want = dict(zip(["last_hidden_state", "pooler_output"], ort.InferenceSession(str(bert)).run(None, feeds)))
    assert got["last_hidden_state"].shape == (3, 40, 64)  # padded back: same interface
    real = mask.astype(bool)
    np.testing.assert_allclose(got["last_hidden_state"][real], want["last_hidden_state"][real], atol=1e-5)
    np.testing.assert_allclose(got["pooler_output"], want["pooler_output"], atol=1e-5)
    assert np.all(got["last_hidden_state"][:, 30:] == 0)  # beyond the longest sentence: padding, zeros


def test_trimming_needs_a_mask_input(tiny_vit_onnx, tmp_path):
    _, path = tiny_vit_onnx
    with pytest.raises(StructureError, match=r"trim_padding needs a dynamic-length attention mask input"):
        trimrt.compile(str(path), {"padding": {"trim_trailing": True}}, tmp_path / "b")
