"""Tiny random-weight Hugging Face models of the families users bring (built on the fly),
and their ONNX exports in the forms users bring: either torch exporter, with a dynamic
token axis or a static token count."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

B, N = 2, 24  # batch and sequence length of the example inputs (24: not a width or head count)
#: families whose inputs are images: their token count follows the image size, so their
#: "dynamic" export has a dynamic batch only
VISION = ("vit", "clip", "deit", "siglip")


def make(family: str, layers: int = 3, decoder_mask: bool = False):
    """(module, example keyword inputs) for a family; small configs so the suite stays fast.
    `decoder_mask`: decoders also take an attention_mask (all ones), as the TorchScript
    exporter needs (without one, transformers 5 builds the causal mask with aten::diff).
    The model is built before its inputs are drawn, so its weights depend on the seed only."""
    torch.manual_seed(0)
    model, kind = _build(family, layers)
    if kind == "image":
        return model.eval(), {"pixel_values": torch.randn(B, 3, 32, 32)}
    ids = torch.randint(0, 200, (B, N))
    if kind == "decoder":
        return model.eval(), {"input_ids": ids, **({"attention_mask": torch.ones(B, N, dtype=torch.long)}
                                                   if decoder_mask else {})}
    padded = torch.ones(B, N, dtype=torch.long)
    padded[1, 18:] = 0  # the second sample is padded
    return model.eval(), {"input_ids": ids, "attention_mask": padded}


def _build(family: str, layers: int):
    """(random-weight model, input kind: "text" | "image" | "decoder")."""
    import transformers as tf

    small = dict(num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128)
    text = dict(vocab_size=200, max_position_embeddings=64)
    if family == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=64, vocab_size=200, **small)), "text"
    if family == "roberta":  # positions start after the padding index (1)
        return tf.RobertaModel(tf.RobertaConfig(hidden_size=64, **text, **small)), "text"
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=layers, n_heads=4, hidden_dim=128, **text)), "text"
    if family == "electra":  # embeddings narrower than the blocks, projected up
        return tf.ElectraModel(tf.ElectraConfig(hidden_size=64, embedding_size=32, **text, **small)), "text"
    if family == "albert":  # one layer's weights shared by every block
        return tf.AlbertModel(tf.AlbertConfig(hidden_size=64, embedding_size=32, **text, **small)), "text"
    if family in ("vit", "deit"):
        cls, cfg = (tf.ViTModel, tf.ViTConfig) if family == "vit" else (tf.DeiTModel, tf.DeiTConfig)
        model = cls(cfg(hidden_size=64, image_size=32, patch_size=8, **small))
        if family == "deit":  # DeiT initialises its CLS / distillation tokens and positions to zeros, which
            # makes the CLS attention row exactly uniform (ties); a trained model's are not
            with torch.no_grad():
                for p in (model.embeddings.cls_token, model.embeddings.distillation_token,
                          model.embeddings.position_embeddings):
                    p.normal_(std=0.5)
        return model, "image"
    if family == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=64, image_size=32, patch_size=8, **small)), "image"
    if family == "siglip":  # no CLS token; an attention-pooling head after the blocks
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=64, image_size=32, patch_size=8, **small)), "image"
    decoder = dict(hidden_size=64, num_key_value_heads=2, vocab_size=200, use_cache=False, **small)
    if family == "llama":
        return tf.LlamaModel(tf.LlamaConfig(**decoder)), "decoder"
    if family == "mistral":
        return tf.MistralModel(tf.MistralConfig(**decoder)), "decoder"
    if family == "qwen2":
        return tf.Qwen2Model(tf.Qwen2Config(**decoder)), "decoder"
    if family == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=200, use_cache=False,
                                          bos_token_id=0, eos_token_id=0)), "decoder"
    raise ValueError(family)


def export(module, inputs: dict, exporter: str, static: bool, path: Path) -> dict[str, np.ndarray]:
    """Export `module` to `path` as users do; returns the feeds (numpy).

    dynamic: trimrt's own export (dynamic batch, and a dynamic token axis on token ids and
    masks). static: the token count fixed as most TensorRT-bound exports fix it — the
    TorchScript exporter with only the batch axis dynamic, or the dynamo exporter with
    no dynamic shapes at all (the batch fixed too)."""
    import onnx_ir as ir

    from trimrt.compiler.source import _keyword_call, _output_names, export_torch

    module.eval()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    if not static:
        model, _ = export_torch(module, inputs, exporter=exporter)
        ir.save(model, path)
        return feeds
    names, outputs = list(inputs), _output_names(module, inputs)
    if exporter == "dynamo":
        program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, opset_version=18, input_names=names,
                                    output_names=outputs, verbose=False)
        program.save(str(path))
    else:
        wrapper = _keyword_call(module, names, outputs)
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), dynamo=False, opset_version=18,
                          input_names=names, output_names=outputs, dynamic_axes={n: {0: "batch"} for n in names})
    module.eval()
    return feeds


@functools.lru_cache(maxsize=None)
def _exported(family: str, exporter: str, static: bool, layers: int, decoder_mask: bool):
    module, inputs = make(family, layers=layers, decoder_mask=decoder_mask)
    folder = Path(tempfile.mkdtemp(prefix=f"trimrt_hf_{family}_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / f"{family}_{exporter}_{'static' if static else 'dynamic'}.onnx"
    feeds = export(module, inputs, exporter, static, path)
    return path, module, inputs, feeds


def exported(family: str, exporter: str = "dynamo", static: bool = False, layers: int = 3,
             decoder_mask: bool = False):
    """(path, module, example inputs, feeds): `make(family, ...)` exported by `export`, once
    per test run — every test module asking for the same model and form shares the file
    (read it, never write it). Inputs and feeds are fresh copies for each caller."""
    path, module, inputs, feeds = _exported(family, exporter, static, layers, decoder_mask)
    return path, module, {k: v.clone() for k, v in inputs.items()}, {k: v.copy() for k, v in feeds.items()}


def run_onnx(path, feeds) -> dict[str, np.ndarray]:
    """The outputs of the ONNX file at `path` on `feeds`, by name (ONNX Runtime CPU)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
