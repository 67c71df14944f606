"""Block-sparse prompt attention written in PyTorch for Hugging Face decoders: the attention
of the listed layers, on a prompt (no past), is BlockSparseAttention's NumPy reference on
the repeated keys and values (causal, the mask's last query row as the key bias); every
other call is transformers' eager attention. What a decoder build with [sparse_attention]
must generate."""

from __future__ import annotations

import numpy as np
import torch

from trimrt.plugins import REGISTRY

OP = REGISTRY["BlockSparseAttention"]


def sparse_prompt_attention(layers, **attrs):
    """An attention function for transformers' AttentionInterface."""
    import sys

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx not in layers or query.shape[2] != key.shape[2]:  # a decode step: dense, the family's own
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        groups = query.shape[1] // key.shape[1]
        k, v = (x.repeat_interleave(groups, dim=1).numpy() for x in (key, value))  # grouped heads repeated
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        n = query.shape[2]
        # the key bias: the mask's diagonal (a query sees its own key unless it is padding; the last
        # row would not show the keys a sliding window hides from it)
        if attention_mask is None:
            bias = np.zeros((query.shape[0], n), np.float32)
        elif attention_mask.dtype == torch.bool:  # True attends
            bias = np.where(attention_mask[:, 0, :n, :n].diagonal(dim1=-2, dim2=-1).numpy(), 0.0,
                            np.finfo(np.float32).min).astype(np.float32)
        else:
            bias = attention_mask[:, 0, :n, :n].diagonal(dim1=-2, dim2=-1).numpy().astype(np.float32)
        window = kwargs.get("sliding_window") or 0  # the layer's own window (None: full attention)
        (out,) = OP.run_reference(query.numpy(), k, v, bias, causal=1, scale=scaling, window=window, **attrs)
        return torch.from_numpy(out).transpose(1, 2).contiguous(), None

    return attention


def sparse_prompt_model(model, layers, **attrs):
    """`model` (changed) attending its prompts block-sparsely in `layers`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("trimrt_sparse_prompt", sparse_prompt_attention(set(layers), **attrs))
    AttentionMaskInterface.register("trimrt_sparse_prompt", eager_mask)  # the additive causal + padding mask
    model.set_attn_implementation("trimrt_sparse_prompt")
    return model
