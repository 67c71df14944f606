"""Token pruning on the families users bring, from both exporters: structure found, a
keep-everything recipe reproduces the original, a pruning recipe gives the right shapes.

The TorchScript exporter cannot export LlamaModel / GPT2Model of transformers 5 (their
mask code uses aten::diff, unsupported there), so decoders run through dynamo only."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from trimrt.compiler.analysis import analyse, infer_shapes  # noqa: E402
from trimrt.compiler.source import export_torch  # noqa: E402

from hf_models import B, N, make  # noqa: E402

CASES = [("bert", "dynamo"), ("bert", "torchscript"), ("vit", "dynamo"), ("vit", "torchscript"),
         ("clip", "dynamo"), ("clip", "torchscript"), ("llama", "dynamo"), ("gpt2", "dynamo")]
ENCODER_RECIPE = {"method": "cls_attention", "layers": [1, 2], "keep": 0.5, "protect": "cls", "fuse_pruned": True}
DECODER_RECIPE = {"method": "last_token_attention", "layers": [1], "keep": 0.25, "prunable": [4, 20]}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def exported(request, tmp_path_factory):
    family, exporter = request.param
    module, inputs = make(family)
    model, feeds = export_torch(module, inputs, exporter=exporter)
    path = tmp_path_factory.mktemp(family) / f"{family}_{exporter}.onnx"
    import onnx_ir as ir

    ir.save(model, path)
    return family, exporter, path, feeds, model


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_structure_is_found(exported):
    family, _, _, _, model = exported
    infer_shapes(model)
    tmap = analyse(model)
    assert len(tmap.blocks) == 3 and tmap.token_axis == 1 and tmap.width == 64
    assert all(b.post_norm == (family == "bert") for b in tmap.blocks)


def test_keep_everything_reproduces_original(exported, tmp_path):
    family, _, path, feeds, _ = exported
    recipe = dict(DECODER_RECIPE if family in ("llama", "gpt2") else ENCODER_RECIPE, keep=1.0)
    trimrt.compile(str(path), {"token_pruning": recipe}, tmp_path / "b")
    want = _run(path, feeds)
    got = trimrt.load(tmp_path / "b").run(feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)


def test_pruning_recipe_gives_right_shapes(exported, tmp_path):
    family, _, path, feeds, _ = exported
    decoder = family in ("llama", "gpt2")
    manifest = trimrt.compile(str(path), {"token_pruning": DECODER_RECIPE if decoder else ENCODER_RECIPE}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_pruning")
    got = trimrt.load(tmp_path / "b").run(feeds)
    want = _run(path, feeds)
    hidden = next(v for k, v in got.items() if v.ndim == 3)
    if decoder:
        # span [4, 20) of 24 tokens keeps ceil(0.25 · 16) = 4: 4 + 4 + 4 = 12 tokens
        assert hidden.shape == (B, 12, 64)
        assert report["layers"][0]["kept"] == 4
        assert report["travelling_tensors"], "the causal mask / RoPE tables must travel with the tokens"
    else:
        tokens = N if family == "bert" else 17
        first = 1 + int(np.ceil(0.5 * (tokens - 1))) + 1
        second = 1 + int(np.ceil(0.5 * (first - 1))) + 1
        assert hidden.shape == (B, second, 64)
        pooled = [k for k, v in got.items() if v.ndim == 2]
        for name in pooled:  # pooled outputs keep their shape and stay close to the original
            assert got[name].shape == want[name].shape
            cos = (got[name] * want[name]).sum(-1) / np.linalg.norm(got[name], axis=-1) / np.linalg.norm(want[name], axis=-1)
            assert cos.min() > 0.5
    assert all(np.isfinite(v).all() for v in got.values())
