"""Token pruning on the families users bring, in every export form they bring:
{BERT, ViT, CLIP vision, LLaMA (GQA), GPT-2} × {dynamo, TorchScript} × {dynamic token
axis, static token count}, and RoBERTa, DistilBERT, DeiT (CLS + distillation token
protected) and Qwen2 in two forms each, ALBERT (one layer's weights shared by all blocks), SigLIP
(no CLS; an attention-pooling head), ELECTRA and Mistral in one. In each cell the structure is found, a
keep-everything recipe reproduces the original, and a pruning recipe matches the same
pruning written in PyTorch on the Hugging Face modules (hf_reference); block-sparse
attention over every block reproduces the original too, whatever form the mask takes. Swin's windowed
attention, GPT-NeoX's parallel attention / MLP and BLOOM's head-folded ALiBi attention are
refused, named.

Static exports bake the token count into Reshape targets, Expand shapes, constant
masks and RoPE tables; they are the form most TensorRT-bound exports take. Vision
models' token count follows the image size, so their "dynamic" form has a dynamic
batch only (and the static form fixes the batch too, with dynamo). Decoders take an
attention_mask: without one, transformers 5 builds the causal mask with aten::diff,
which the TorchScript exporter cannot export."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.hf_models import VISION, B, N, export, exported, make, run_onnx  # noqa: E402
from tests.families.hf_reference import Prune, pruned_forward  # noqa: E402
from trimrt.compiler.analysis import analyse, infer_shapes  # noqa: E402
from trimrt.compiler.source import load_onnx  # noqa: E402

FAMILIES = ("bert", "vit", "clip", "llama", "gpt2")
#: more families users bring, each in two export forms (dynamo / TorchScript, dynamic / static)
WIDER = [("roberta", "dynamo", "dynamic"), ("roberta", "torchscript", "static"),
         ("distilbert", "dynamo", "static"), ("distilbert", "torchscript", "dynamic"),
         ("deit", "dynamo", "dynamic"), ("deit", "torchscript", "static"),
         ("qwen2", "dynamo", "static"), ("qwen2", "torchscript", "dynamic"),
         ("albert", "torchscript", "static"), ("siglip", "torchscript", "static"),
         ("electra", "torchscript", "static"), ("mistral", "torchscript", "static")]
CELLS = list(itertools.product(FAMILIES, ("dynamo", "torchscript"), ("dynamic", "static"))) + WIDER
DECODERS = ("llama", "gpt2", "qwen2", "mistral")
POST_NORM = ("bert", "roberta", "distilbert", "albert", "electra")
#: leading tokens never pruned: CLS, and DeiT's distillation token after it
PROTECTED = {"deit": 2}
#: tokens vision models prepend to their 16 patches (SigLIP: none; the recipe protects its first patch)
PREPENDED = {"deit": 2, "siglip": 0}
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
    return 16 + PREPENDED.get(family, 1) if family in VISION else N


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
    path, module, inputs, feeds = exported(family, exporter, shape == "static", layers=2, decoder_mask=True)
    return family, shape, path, module, inputs, feeds




def test_structure_is_found(cell):
    family, shape, path, *_ = cell
    model = load_onnx(path)
    infer_shapes(model)
    tmap = analyse(model)
    assert len(tmap.blocks) == 2 and tmap.token_axis == 1 and tmap.width == 64
    assert all(b.post_norm == (family in POST_NORM) for b in tmap.blocks)
    if shape == "static" or family in VISION:
        assert tmap.num_tokens == tokens_of(family)
    if family == "deit":  # CLS and distillation token: inspect tells the user to protect both
        assert tmap.prepended == 2 and 'protect = "first:2"' in tmap.summary()["protected_tokens"]


def test_keep_everything_reproduces_original(cell, tmp_path):
    family, _, path, _, _, feeds = cell
    recipe, _ = recipe_for(family)
    trimrt.compile(str(path), {"token_pruning": dict(recipe, keep=1.0)}, tmp_path / "b")
    want = run_onnx(path, feeds)
    got = trimrt.load(tmp_path / "b").run(feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=4e-3, err_msg=name)


#: the cells whose masks take each form (the exports are the `cell` fixture's, made once)
SPARSE_CELLS = [c for c in CELLS if c[0] == "llama"] + [
    ("gpt2", "torchscript", "dynamic"), ("gpt2", "dynamo", "static"), ("bert", "torchscript", "dynamic"),
    ("bert", "dynamo", "static"), ("distilbert", "torchscript", "dynamic"), ("albert", "torchscript", "static"),
    ("vit", "dynamo", "dynamic"), ("deit", "torchscript", "static"), ("siglip", "torchscript", "static"),
    ("qwen2", "dynamo", "static"), ("mistral", "torchscript", "static")]


@pytest.mark.parametrize("family, exporter, shape", SPARSE_CELLS, ids=lambda c: str(c))
def test_sparse_attention_with_every_block_reproduces_original(family, exporter, shape, tmp_path):
    """[sparse_attention] over every block (4 of 8 tokens: 24 tokens or 17 patches) in both blocks is the attention as
    exported, whatever form its mask takes there: a padding mask (symbolic shapes in
    TorchScript's), a static export's causal mask folded into a constant, a decoder's causal
    and padding mask in one (-inf where it masks) on a left-padded row."""
    path, _, _, feeds = exported(family, exporter, shape == "static", layers=2, decoder_mask=True)
    real = np.ones(feeds["input_ids"].shape if "input_ids" in feeds else (B, tokens_of(family)), bool)
    if family in DECODERS:
        feeds["attention_mask"][1, :5], real[1, :5] = 0, False
    manifest = trimrt.compile(str(path), {"sparse_attention": {"block_size": 8, "top_k": 4}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "sparse_attention")
    assert [layer["causal"] for layer in report["layers"]] == [family in DECODERS] * 2
    want = run_onnx(path, feeds)
    got = trimrt.load(tmp_path / "b").run(feeds)
    assert list(got) == list(want)
    for name in want:  # a padding query of a decoder sees no key: compared at the real tokens
        rows = real if want[name].shape[:2] == real.shape else np.ones(want[name].shape[:1], bool)
        np.testing.assert_allclose(got[name][rows], want[name][rows], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_sliding_window_longer_than_the_first_probes_is_found(exporter, tmp_path):
    """A Mistral exported without a KV cache (an embedding model's form, e5-mistral's) whose
    window of 24 tokens the first probes (7 and 19 tokens) cannot show: the pass finds it on
    a long probe, and sparse attention over every block is the export's attention on a
    left-padded 40-token prompt (it attended past the window before)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    module = tf.MistralModel(tf.MistralConfig(hidden_size=64, num_key_value_heads=2, vocab_size=200, use_cache=False,
                                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                              sliding_window=24)).eval()
    ids = torch.randint(0, 200, (2, 40))
    path = tmp_path / "mistral.onnx"
    feeds = export(module, {"input_ids": ids, "attention_mask": torch.ones(2, 40, dtype=torch.long)}, exporter, False,
                   path)
    feeds["attention_mask"][1, :5] = 0
    manifest = trimrt.compile(str(path), {"sparse_attention": {"block_size": 8, "top_k": 5}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "sparse_attention")
    assert [(layer["causal"], layer.get("window")) for layer in report["layers"]] == [(True, 24)] * 2
    want = run_onnx(path, feeds)["last_hidden_state"]
    got = trimrt.load(tmp_path / "b").run(feeds)["last_hidden_state"]
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1, 5:], want[1, 5:], atol=1e-5)


def test_a_float16_torchscript_decoder_is_pruned_and_attends_sparsely(tmp_path):
    """LLaMA in float16 through the TorchScript exporter (TensorRT-bound exports' form): its
    residual Add reads the stream through a Cast, its products are float16 and its softmax and
    context float32. Keep-everything pruning and sparse attention over every block reproduce
    the export; the family's pruning matches the same pruning in PyTorch (float16 tolerance)."""
    import torch

    module, inputs = make("llama", layers=2, decoder_mask=True)
    module = module.half()
    feeds = export(module, inputs, "torchscript", False, tmp_path / "llama.onnx")
    want = run_onnx(tmp_path / "llama.onnx", feeds)["last_hidden_state"]
    recipe, reference = recipe_for("llama")
    for name, table in [("keep", {"token_pruning": dict(recipe, keep=1.0)}),
                        ("sparse", {"sparse_attention": {"block_size": 8, "top_k": 3}})]:
        trimrt.compile(str(tmp_path / "llama.onnx"), table, tmp_path / name)
        got = trimrt.load(tmp_path / name).run(feeds)["last_hidden_state"]
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=4e-3, err_msg=name)
    trimrt.compile(str(tmp_path / "llama.onnx"), {"token_pruning": recipe}, tmp_path / "pruned")
    got = trimrt.load(tmp_path / "pruned").run(feeds)["last_hidden_state"]
    with torch.no_grad():
        expected = pruned_forward("llama", module, inputs, reference)["last_hidden_state"]
    assert got.shape == expected.shape == (B, pruned_tokens("llama"), 64)
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=4e-3)


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
        np.testing.assert_allclose(got[name], want[name], atol=4e-3, err_msg=name)
    assert "note" not in report  # the recipe protects every prepended token


def test_protecting_fewer_tokens_than_the_model_prepends_is_reported(tmp_path):
    """DeiT with protect = "cls" may prune its distillation token: the build says so."""
    module, inputs = make("deit", layers=2)
    export(module, inputs, "torchscript", True, tmp_path / "deit.onnx")
    manifest = trimrt.compile(str(tmp_path / "deit.onnx"), {"token_pruning": dict(ENCODER, layers=[1])}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_pruning")
    assert report["note"] == ('the model prepends 2 learned tokens but the recipe protects 1; '
                              'protect = "first:2" keeps them all')


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_token_merging_on_a_static_export_equals_the_dynamic_one(family, tmp_path):
    """ToMe on the static-count export of a model gives what it gives on the dynamic one:
    the baked counts, the constant masks and RoPE tables all follow the merged tokens."""
    module, inputs = make(family, layers=2, decoder_mask=True)
    feeds = export(module, inputs, "torchscript", False, tmp_path / "dynamic.onnx")
    export(module, inputs, "torchscript", True, tmp_path / "static.onnx")
    outs = {}
    for form in ("dynamic", "static"):
        manifest = trimrt.compile(str(tmp_path / f"{form}.onnx"), {"token_merging": {"r": 4, "layers": [0, 1]}},
                                  tmp_path / form)
        outs[form] = trimrt.load(tmp_path / form).run(feeds)
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_merging")
    assert report["tokens_after"] == N - 8 and report["travelling_tensors"]  # the mask (and RoPE tables)
    assert outs["static"]["last_hidden_state"].shape == (B, N - 8, 64)
    for name, want in outs["dynamic"].items():
        np.testing.assert_allclose(outs["static"][name], want, atol=1e-5, err_msg=name)


def _swin():
    import transformers as tf

    config = tf.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    return tf.SwinModel(config), {"pixel_values": __import__("torch").randn(B, 3, 32, 32)}


def _gpt_neox():
    import torch
    import transformers as tf

    config = tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              vocab_size=200, use_cache=False)
    return tf.GPTNeoXModel(config), {"input_ids": torch.randint(0, 200, (B, N)),
                                     "attention_mask": torch.ones(B, N, dtype=torch.long)}


def _bloom():
    import torch
    import transformers as tf

    config = tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=200, use_cache=False)
    return tf.BloomModel(config), {"input_ids": torch.randint(0, 200, (B, N)),
                                   "attention_mask": torch.ones(B, N, dtype=torch.long)}


REFUSED = [
    # Swin attends within windows of the patch grid: no attention over the whole stream
    (_swin, {"method": "cls_attention", "layers": [0], "keep": 0.5},
     ["windowed attention", "windows of 16 tokens", "256"]),
    # GPT-NeoX runs attention and MLP side by side from one input: no point between them
    (_gpt_neox, {"method": "last_token_attention", "layers": [0], "keep": 0.5, "prunable": [4, 20]},
     ["in parallel", "GPT-NeoX"]),
    # BLOOM folds the heads into the batch axis to add ALiBi: no [B, H, N, Dh] queries and keys
    (_bloom, {"method": "last_token_attention", "layers": [0], "keep": 0.5, "prunable": [4, 20]},
     ["[batch·heads, tokens, tokens]", "ALiBi"]),
]


@pytest.mark.parametrize("build, recipe, words", REFUSED, ids=["swin", "gpt_neox", "bloom"])
def test_unsupported_constructs_are_refused_naming_them(build, recipe, words, tmp_path):
    """Families whose blocks token reduction cannot act on end in one line naming the
    construct, and no build."""
    import torch

    from trimrt.errors import StructureError

    torch.manual_seed(0)
    module, inputs = build()
    export(module.eval(), inputs, "torchscript", True, tmp_path / "m.onnx")
    with pytest.raises(StructureError) as err:
        trimrt.compile(str(tmp_path / "m.onnx"), {"token_pruning": recipe}, tmp_path / "b")
    message = str(err.value)
    assert "\n" not in message
    assert all(w in message for w in words), message
    assert not (tmp_path / "b").exists()
