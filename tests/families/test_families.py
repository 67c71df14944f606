"""Token pruning on the families users bring, in every export form they bring:
{BERT, ViT, CLIP vision, LLaMA (GQA), GPT-2} × {dynamo, TorchScript} × {dynamic token
axis, static token count}, and RoBERTa, DistilBERT, DeiT (CLS + distillation token
protected) and Qwen2 in two forms each. In each cell the structure is found, a
keep-everything recipe reproduces the original, and a pruning recipe matches the same
pruning written in PyTorch on the Hugging Face modules (hf_reference). Swin's windowed
attention is refused, named.

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

from hf_models import B, N, VISION, export, make  # noqa: E402
from hf_reference import Prune, pruned_forward  # noqa: E402

FAMILIES = ("bert", "vit", "clip", "llama", "gpt2")
#: more families users bring, each in two export forms (dynamo / TorchScript, dynamic / static)
WIDER = [("roberta", "dynamo", "dynamic"), ("roberta", "torchscript", "static"),
         ("distilbert", "dynamo", "static"), ("distilbert", "torchscript", "dynamic"),
         ("deit", "dynamo", "dynamic"), ("deit", "torchscript", "static"),
         ("qwen2", "dynamo", "static"), ("qwen2", "torchscript", "dynamic")]
CELLS = list(itertools.product(FAMILIES, ("dynamo", "torchscript"), ("dynamic", "static"))) + WIDER
DECODERS = ("llama", "gpt2", "qwen2")
POST_NORM = ("bert", "roberta", "distilbert")
#: leading tokens never pruned: CLS, and DeiT's distillation token after it
PROTECTED = {"deit": 2}
LAYERS = [0, 1]  # two blocks, both pruning: the second reduction works on the first one's output
ENCODER = {"method": "cls_attention", "layers": LAYERS, "keep": 0.5, "protect": "cls", "fuse_pruned": True}
DECODER = {"method": "last_token_attention", "layers": LAYERS, "keep": 0.25, "prunable": [4, 20]}


def recipe_for(family: str) -> tuple[dict, Prune]:
    """The pruning recipe of a family and the same pruning for the PyTorch reference."""
    if family in DECODERS:
        return DECODER, Prune(LAYERS, 0.25, row=-1, start=4, end=20)
    protect = PROTECTED.get(family, 1)
    recipe = dict(ENCODER, protect="cls" if protect == 1 else f"first:{protect}")
    return recipe, Prune(LAYERS, 0.5, row=0, start=protect, fuse=True)


def tokens_of(family: str) -> int:
    """Tokens entering the blocks: text N; images 16 patches + CLS (+ DeiT's distillation token)."""
    return 16 + PROTECTED.get(family, 1) if family in VISION else N


def pruned_tokens(family: str) -> int:
    """Tokens after the recipe's two pruning blocks."""
    n = tokens_of(family)
    if family in DECODERS:  # span [4, 20) keeps ceil(0.25 · 16) = 4, then ceil(0.25 · 4) = 1
        return n - 16 + 1
    protect = PROTECTED.get(family, 1)
    for _ in LAYERS:  # the protected tokens, ceil(0.5 · span) of the span, the fused token
        n = protect + -(-(n - protect) // 2) + 1
    return n


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
    assert all(b.post_norm == (family in POST_NORM) for b in tmap.blocks)
    if shape == "static" or family in VISION:
        assert tmap.num_tokens == tokens_of(family)


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
    assert got["last_hidden_state"].shape == (B, pruned_tokens(family), 64)
    if shape == "static":
        assert report["tokens_after"] == got["last_hidden_state"].shape[1]
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)


def test_windowed_attention_is_refused_naming_it(tmp_path):
    """Swin attends within windows of the patch grid: no attention over the whole stream
    to prune or merge by. The compile refuses in one line that says so."""
    import torch
    import transformers as tf

    from trimrt.errors import StructureError

    torch.manual_seed(0)
    config = tf.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    module = tf.SwinModel(config).eval()
    export(module, {"pixel_values": torch.randn(B, 3, 32, 32)}, "torchscript", True, tmp_path / "swin.onnx")
    with pytest.raises(StructureError) as err:
        trimrt.compile(str(tmp_path / "swin.onnx"), {"token_pruning": {"method": "cls_attention", "layers": [0], "keep": 0.5}},
                       tmp_path / "b")
    message = str(err.value)
    assert "\n" not in message
    assert "windowed attention" in message and "windows of 16 tokens" in message and "256" in message
    assert not (tmp_path / "b").exists()
