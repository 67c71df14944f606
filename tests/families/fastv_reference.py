"""FastV on a Hugging Face LlamaModel, written in PyTorch from the paper's description (not
from trimrt's code): the independent reference for pruned decoder builds.

After the attention of `layer`, score the tokens of the span [start, end) by the
head-mean attention row of the last token, keep the top ceil(keep · span), keep their
ORIGINAL position ids for RoPE, and restrict the causal mask to the kept tokens."""

from __future__ import annotations

import math

import torch


def fastv_forward(model, input_ids: torch.Tensor, layer: int, keep: float, span: tuple[int, int],
                  renumber_positions: bool = False) -> torch.Tensor:
    return model.norm(_prefill(model, input_ids, (layer,), keep, span, renumber_positions=renumber_positions))


def _prefill(model, input_ids: torch.Tensor, layers: tuple[int, ...], keep: float, span: tuple[int, int], *,
             cache=None, renumber_positions: bool = False, choose_before=None, attention: str = "eager"
             ) -> torch.Tensor:
    """The hidden states after the last layer, the span pruned after the attention of each of
    `layers` (the span is then the kept tokens) or, by `choose_before(embeddings, start, end,
    k)` (ascending positions), before layer 0; `cache`: a transformers cache the layers fill;
    `attention`: the transformers attention implementation (one that returns the weights of
    `layers`)."""
    model.config._attn_implementation = attention  # eager: so the attention returns its weights
    b, n = input_ids.shape
    h = model.embed_tokens(input_ids)
    pos = torch.arange(n).expand(b, n)
    start, end = span

    if choose_before is not None:
        h, pos = _keep(h, pos, choose_before(h, start, end, max(1, math.ceil(keep * (end - start) - 1e-9))),
                       start, end)
    for i, block in enumerate(model.layers):
        cos, sin = model.rotary_emb(h, torch.arange(h.shape[1]).expand(b, -1) if renumber_positions else pos)
        future = pos[:, None, :] > pos[:, :, None]  # key after query: masked
        mask = torch.where(future, torch.finfo(h.dtype).min, 0.0)[:, None]
        attn, weights = block.self_attn(block.input_layernorm(h), position_embeddings=(cos, sin), attention_mask=mask,
                                        cache=cache)
        h = h + attn
        if i in layers:
            score = weights[:, :, -1, start:end].mean(dim=1)
            k = max(1, math.ceil(keep * (end - start) - 1e-9))
            h, pos = _keep(h, pos, torch.sort(torch.topk(score, k, dim=1).indices, dim=1).values + start, start, end)
            end = start + k
        h = h + block.mlp(block.post_attention_layernorm(h))
    return h


def _keep(h: torch.Tensor, pos: torch.Tensor, chosen: torch.Tensor, start: int, end: int):
    """(h, pos) of the tokens before the span, the `chosen` positions of it (ascending) and
    those after it."""
    b = h.shape[0]
    kept = torch.cat([torch.arange(start).expand(b, -1), chosen, torch.arange(end, h.shape[1]).expand(b, -1)], 1)
    return torch.gather(h, 1, kept[..., None].expand(-1, -1, h.shape[-1])), torch.gather(pos, 1, kept)


def fastv_generate(lm, input_ids: torch.Tensor, layers: tuple[int, ...], keep: float, span: tuple[int, int],
                   max_new_tokens: int, choose_before=None, attention: str = "eager"
                   ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy generation with FastV on the prompt: the prefill prunes the span after the
    attention of each of `layers` (as fastv_forward; the span is then the kept tokens),
    every later layer caches the kept tokens only, and each decode step attends over what
    each layer cached. `choose_before(embeddings, start, end, k)`: instead, pick the span's
    tokens (ascending positions) on the embeddings, before layer 0 (DivPrune); `attention`:
    as _prefill's. Returns (new tokens per row, the prefill's last-token logits)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    h = _prefill(lm.model, input_ids, layers, keep, span, cache=cache, choose_before=choose_before, attention=attention)
    return decode_greedily(lm, h, cache, input_ids.shape[1], max_new_tokens)


def decode_greedily(lm, h: torch.Tensor, cache, prompt_length: int, max_new_tokens: int
                    ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding after a prefill that left the hidden states `h` and filled `cache` (each
    layer what it cached): every step runs each layer on the new token over its own cache,
    at positions continuing from `prompt_length`. Returns (new tokens per row, the prefill's
    last-token logits)."""
    model, b = lm.model, h.shape[0]
    logits = first = lm.lm_head(model.norm(h))[:, -1]
    tokens = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        tokens.append(token)
        h = model.embed_tokens(token[:, None])
        cos, sin = model.rotary_emb(h, torch.full((b, 1), prompt_length + step))
        for block in model.layers:  # one new token sees every cached key: no mask
            h = h + block.self_attn(block.input_layernorm(h), position_embeddings=(cos, sin), cache=cache)[0]
            h = h + block.mlp(block.post_attention_layernorm(h))
        logits = lm.lm_head(model.norm(h))[:, -1]
    return torch.stack(tokens, 1).tolist(), first


def fastv_llama_style(module, input_ids: torch.Tensor, layer: int, keep: float, span: tuple[int, int]) -> torch.Tensor:
    """FastV on examples/models/llama_style.py's LlamaStyleLM (no KV cache): the logits of the
    kept tokens; the span pruned after the attention of `layer` as in `_prefill`, each kept
    token keeping its original position (its rotary angle) and the causal mask restricted to
    the kept tokens."""
    from examples.models.llama_style import _rotate

    cfg, (b, n) = module.cfg, input_ids.shape
    head_dim = cfg.width // cfg.heads
    freqs = cfg.rope_base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    h, pos = module.embed(input_ids), torch.arange(n).expand(b, n)
    start, end = span
    for i, block in enumerate(module.blocks):
        angles = torch.cat([pos[..., None].float() * freqs] * 2, dim=-1)[:, None]  # [B, 1, N, Dh]
        att, y = block.attn, block.norm1(h)
        q, k, v = (p(y).reshape(b, -1, cfg.heads, head_dim).transpose(1, 2) for p in (att.q, att.k, att.v))
        q, k = (_rotate(t, angles.cos(), angles.sin()) for t in (q, k))
        future = pos[:, None, :] > pos[:, :, None]
        logits = q @ k.transpose(-2, -1) * head_dim ** -0.5 + torch.where(future, -1e9, 0.0)[:, None]
        probs = logits.softmax(dim=-1)
        h = h + att.o((probs @ v).transpose(1, 2).reshape(b, -1, cfg.width))
        if i == layer:
            count = max(1, math.ceil(keep * (end - start) - 1e-9))
            chosen = torch.sort(torch.topk(probs[:, :, -1, start:end].mean(dim=1), count, dim=1).indices, dim=1).values
            h, pos = _keep(h, pos, chosen + start, start, end)
            end = start + count
        y = block.norm2(h)
        h = h + block.down(torch.nn.functional.silu(block.gate(y)) * block.up(y))
    return module.head(module.norm(h))
