"""Tiny random-weight Hugging Face models of the families users bring (built on the fly)."""

from __future__ import annotations

import torch

B, N = 2, 24  # batch and sequence length of the example inputs (24: not a width or head count)


def make(family: str):
    """(module, example keyword inputs) for a family; small configs so the suite stays fast."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    if family == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=64, vocab_size=200, **small))
        ids = torch.randint(0, 200, (B, N))
        mask = torch.ones(B, N, dtype=torch.long)
        mask[1, 18:] = 0  # the second sample is padded
        return model.eval(), {"input_ids": ids, "attention_mask": mask}
    if family == "vit":
        model = tf.ViTModel(tf.ViTConfig(hidden_size=64, image_size=32, patch_size=8, **small))
        return model.eval(), {"pixel_values": torch.randn(B, 3, 32, 32)}
    if family == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=64, image_size=32, patch_size=8, **small))
        return model.eval(), {"pixel_values": torch.randn(B, 3, 32, 32)}
    if family == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(hidden_size=64, num_key_value_heads=2, vocab_size=200, use_cache=False,
                                             **small))
        return model.eval(), {"input_ids": torch.randint(0, 200, (B, N))}
    if family == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=200, use_cache=False))
        return model.eval(), {"input_ids": torch.randint(0, 200, (B, N))}
    raise ValueError(family)
