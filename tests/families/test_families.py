"""Token pruning on the families users bring, in every export form they bring:
{BERT, ViT, CLIP vision, LLaMA (GQA), GPT-2} × {dynamo, TorchScript} × {dynamic token
axis, static token count}. In each cell the structure is found, a keep-everything
recipe reproduces the original, and a pruning recipe matches the same pruning written
in PyTorch on the Hugging Face modules (hf_reference).

Static exports bake the token count into Reshape targets, Expand shapes, constant
masks and RoPE tables; they are the form most TensorRT-bound exports take. Vision
models' token count follows the image size, so their "dynamic" form has a dynamic
batch only (and the static form fixes the batch too, with dynamo). Decoders take an
attention_mask: without one, transformers 5 builds the causal mask with aten::diff,
which the TorchScript exporter cannot export."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from trimrt.compiler.analysis import analyse, infer_shapes  # noqa: E402
from trimrt.compiler.source import load_onnx  # noqa: E402

from hf_models import B, N, export, make  # noqa: E402
from hf_reference import Prune, pruned_forward  # noqa: E402

FAMILIES = ("bert", "vit", "clip", "llama", "gpt2")
CELLS = list(itertools.product(FAMILIES, ("dynamo", "torchscript"), ("dynamic", "static")))
DECODERS = ("llama", "gpt2", "qwen2")
LAYERS = [0, 1]  # two blocks, both pruning: the second reduction works on the first one's output
ENCODER = {"method": "cls_attention", "layers": LAYERS, "keep": 0.5, "protect": "cls", "fuse_pruned": True}
DECODER = {"method": "last_token_attention", "layers": LAYERS, "keep": 0.25, "prunable": [4, 20]}


def recipe_for(family: str, protect: int = 1) -> tuple[dict, Prune]:
    """The pruning recipe of a family and the same pruning for the PyTorch reference."""
    if family in DECODERS:
        return DECODER, Prune(LAYERS, 0.25, row=-1, start=4, end=20)
    recipe = dict(ENCODER, protect="cls" if protect == 1 else f"first:{protect}")
    return recipe, Prune(LAYERS, 0.5, row=0, start=protect, fuse=True)


@pytest.fixture(scope="module", params=CELLS, ids=lambda c: "-".join(c))
def cell(request, tmp_path_factory):
    family, exporter, shape = request.param
    module, inputs = make(family, layers=2, decoder_mask=True)
    path = tmp_path_factory.mktemp(family) / f"{family}_{exporter}_{shape}.onnx"
    feeds = export(module, inputs, exporter, shape == "static", path)
    return family, shape, path, module, inputs, feeds


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_structure_is_found(cell):
    family, shape, path, *_ = cell
    model = load_onnx(path)
    infer_shapes(model)
    tmap = analyse(model)
    assert len(tmap.blocks) == 2 and tmap.token_axis == 1 and tmap.width == 64
    assert all(b.post_norm == (family == "bert") for b in tmap.blocks)
    if shape == "static":
        assert tmap.num_tokens == (N if family not in ("vit", "clip") else 17)


def test_keep_everything_reproduces_original(cell, tmp_path):
    family, _, path, _, _, feeds = cell
    recipe, _ = recipe_for(family)
    trimrt.compile(str(path), {"token_pruning": dict(recipe, keep=1.0)}, tmp_path / "b")
    want = _run(path, feeds)
    got = trimrt.load(tmp_path / "b").run(feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)


def test_pruning_matches_pytorch(cell, tmp_path):
    family, shape, path, module, inputs, feeds = cell
    recipe, reference = recipe_for(family)
    manifest = trimrt.compile(str(path), {"token_pruning": recipe}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_pruning")
    got = trimrt.load(tmp_path / "b").run(feeds)
    want = pruned_forward(family, module, inputs, reference)
    if family in DECODERS:
        # span [4, 20) of 24 keeps ceil(0.25 · 16) = 4, then ceil(0.25 · 4) = 1: 4 + 1 + 4 tokens
        assert got["last_hidden_state"].shape == (B, 9, 64)
    else:
        # CLS + ceil(0.5 · 23) + fused = 14, then CLS + ceil(0.5 · 13) + fused = 9 (ViT, CLIP: 17 → 10 → 7)
        assert got["last_hidden_state"].shape == (B, 9 if family == "bert" else 7, 64)
    if shape == "static":
        assert report["tokens_after"] == got["last_hidden_state"].shape[1]
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)
