"""Mixture-of-Depths routing in a Hugging Face LlamaForCausalLM with a KV cache, written in
PyTorch from p-MoD's description (not from trimrt's code): the independent reference for
routed decoder builds.

At prefill a routed layer runs on the top-k tokens of the span [start, end) (ranked by the
head-mean attention row of the last token in the layer before; tokens that layer skipped
keep the score they had) and on every token outside the span, with their original
positions and a causal mask among them; the other tokens skip the layer unchanged and
write no K/V there. Decode steps run every layer on the new token over what it cached.

With `router="model"` (p-MoD's trained routers, examples/models/pmod.py) a layer's tokens
are ranked by its own TanhNorm weight w = 0.2·tanh(x·W_r + b_r) + 1 of its input; its
output is h_attn + w·MLP for a routed span token, h_attn + MLP outside the span, and w·x
for a skipped one (STRing); decode steps (past the span) run the plain layer."""

from __future__ import annotations

import math

import torch

from tests.families.fastv_reference import decode_greedily


def mod_generate(lm, input_ids: torch.Tensor, ratios: list[float], span: tuple[int, int],
                 max_new_tokens: int, router: str = "attention", attention: str = "eager"
                 ) -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """(new tokens per row, the prefill's last-token logits, tokens each layer cached);
    `attention`: the transformers attention implementation (one that returns the weights of
    the layers an attention router reads)."""
    from transformers import DynamicCache

    model, cache = lm.model, DynamicCache()
    model.config._attn_implementation = attention  # eager: so the attention returns its weights
    b, n = input_ids.shape
    start, end = span
    h = model.embed_tokens(input_ids)
    positions = torch.arange(n).expand(b, n)
    score = None
    cached = []
    in_span = ((positions >= start) & (positions < end))[..., None]
    for block, ratio in zip(model.layers, ratios):
        gate = None
        if router == "model" and hasattr(block, "router"):  # p-MoD's TanhNorm, 1 outside the span
            w = 0.2 * torch.tanh(h @ block.router.weight.T + block.router.bias) + 1.0
            gate = torch.where(in_span, w, torch.ones_like(w))
            score = gate[..., 0]
        if ratio < 1.0:
            k = max(1, math.ceil(ratio * (end - start) - 1e-9))
            chosen = torch.sort(torch.topk(score[:, start:end], k, dim=1).indices, dim=1).values + start
            index = torch.cat([torch.arange(start).expand(b, -1), chosen, torch.arange(end, n).expand(b, -1)], 1)
        else:
            index = positions
        x = torch.gather(h, 1, index[..., None].expand(-1, -1, h.shape[-1]))
        pos = torch.gather(positions, 1, index)
        cos, sin = model.rotary_emb(x, pos)
        mask = torch.where(pos[:, None, :] > pos[:, :, None], torch.finfo(x.dtype).min, 0.0)[:, None]
        attn, weights = block.self_attn(block.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=mask,
                                        cache=cache)
        x = x + attn
        g = 1.0 if gate is None else torch.gather(gate, 1, index[..., None])
        x = x + g * block.mlp(block.post_attention_layernorm(x))
        if router == "attention" and block is not model.layers[-1]:  # what the next layer is routed by
            row = weights[:, :, -1, :].mean(dim=1)  # the last token's row over the tokens this layer ran
            score = row if ratio == 1.0 else score.scatter(1, index, row)
        skipped = h if gate is None else gate * h
        h = skipped.scatter(1, index[..., None].expand(-1, -1, h.shape[-1]), x)
        cached.append(index.shape[1])
    tokens, first = decode_greedily(lm, h, cache, n, max_new_tokens)
    return tokens, first, cached
