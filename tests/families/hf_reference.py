"""Attention-row token pruning (EViT's CLS row, FastV's last row) on Hugging Face models,
written in PyTorch from the papers' description and the models' own sub-modules (not
from trimrt's code): the independent reference for pruned builds of every family.

The model runs block by block with eager attention (so each block returns its
probabilities). After the attention sub-layer of a pruning block, the tokens of the span
[start, end) are scored by the head-mean attention row of `row` (0: CLS, -1: last
token), the top ceil(keep · span) are kept in their original order, and with `fuse`
the dropped ones are summed, weighted by their score, into one token appended after
the kept span (EViT). Masks follow the kept tokens (a fused token stands where the last
kept span token stands) and positions stay the original ones (RoPE, causal order)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG = torch.finfo(torch.float32).min


@dataclass
class Prune:
    layers: list[int]
    keep: float
    row: int  # 0: CLS attention, -1: last-token attention
    start: int  # protected prefix
    end: int | None = None  # span end (None: the last token)
    fuse: bool = False


def _blocks(family: str, model):
    return {"bert": lambda: model.encoder.layer, "roberta": lambda: model.encoder.layer,
            "electra": lambda: model.encoder.layer, "mistral": lambda: model.layers,
            "distilbert": lambda: model.transformer.layer, "vit": lambda: model.layers, "siglip": lambda: model.encoder.layers,
            "albert": lambda: [model.encoder.albert_layer_groups[0].albert_layers[0]] * model.config.num_hidden_layers,
            "deit": lambda: model.layers, "clip": lambda: model.encoder.layers, "gpt2": lambda: model.h,
            "llama": lambda: model.layers, "qwen2": lambda: model.layers}[family]()


def _decoder(family: str) -> bool:
    return family in ("gpt2", "llama", "qwen2", "mistral")


def _mask(family: str, valid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Additive [B, 1, N, N] mask: padded keys blocked; decoders also block keys after the query."""
    blocked = (valid[:, None, :] == 0).expand(-1, pos.shape[1], -1)
    if _decoder(family):
        blocked = blocked | (pos[:, None, :] > pos[:, :, None])
    return torch.where(blocked, NEG, 0.0)[:, None]


def _attention(family: str, model, block, h, mask, pos):
    """(stream after the attention sub-layer, attention probabilities [B, H, N, N])."""
    if family in ("bert", "roberta", "electra"):
        ctx, probs = block.attention.self(h, attention_mask=mask)
        return block.attention.output(ctx, h), probs
    if family == "distilbert":
        ctx, probs = block.attention(h, attention_mask=mask)
        return block.sa_layer_norm(ctx + h), probs
    if family == "albert":  # one layer shared by every block; its attention adds and norms itself
        return block.attention(h, mask)
    if family in ("vit", "deit"):
        out, probs = block.attention(block.layernorm_before(h), mask)
        return h + out, probs
    if family in ("clip", "siglip"):
        out, probs = block.self_attn(block.layer_norm1(h), attention_mask=mask)
        return h + out, probs
    if family == "gpt2":
        out, probs = block.attn(block.ln_1(h), attention_mask=mask)
        return h + out, probs
    # llama, qwen2, mistral: RoPE at the original positions
    cos_sin = model.rotary_emb(h, pos)
    out, probs = block.self_attn(block.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask)
    return h + out, probs


def _mlp(family: str, block, h):
    if family in ("bert", "roberta", "electra"):
        return block.feed_forward_chunk(h)
    if family == "distilbert":
        return block.output_layer_norm(block.ffn(h) + h)
    if family == "albert":
        return block.full_layer_layer_norm(block.ff_chunk(h) + h)
    if family in ("vit", "deit"):
        return h + block.mlp(block.layernorm_after(h))
    if family in ("clip", "siglip"):
        return h + block.mlp(block.layer_norm2(h))
    if family == "gpt2":
        return h + block.mlp(block.ln_2(h))
    return h + block.mlp(block.post_attention_layernorm(h))


def _embed(family: str, model, inputs: dict):
    if family in ("vit", "deit"):
        return model.embeddings(inputs["pixel_values"])
    if family == "clip":
        return model.pre_layrnorm(model.embeddings(inputs["pixel_values"]))
    if family == "siglip":
        return model.embeddings(inputs["pixel_values"])
    ids = inputs["input_ids"]
    if family in ("bert", "roberta", "distilbert"):
        return model.embeddings(input_ids=ids)
    if family == "electra":  # embeddings narrower than the blocks, projected up
        return model.embeddings_project(model.embeddings(input_ids=ids))
    if family == "albert":
        return model.encoder.embedding_hidden_mapping_in(model.embeddings(input_ids=ids))
    if family == "gpt2":
        return model.wte(ids) + model.wpe(torch.arange(ids.shape[1])[None])
    return model.embed_tokens(ids)


def _outputs(family: str, model, h) -> dict:
    if family in ("bert", "roberta"):
        out = {"last_hidden_state": h}
        if getattr(model, "pooler", None) is not None:
            out["pooler_output"] = model.pooler(h)
        return out
    if family in ("distilbert", "electra"):
        return {"last_hidden_state": h}
    if family in ("vit", "deit"):
        h = model.layernorm(h)
        out = {"last_hidden_state": h}
        if getattr(model, "pooler", None) is not None:
            out["pooler_output"] = model.pooler(h)
        return out
    if family == "clip":
        return {"last_hidden_state": h, "pooler_output": model.post_layernorm(h[:, 0])}
    if family == "siglip":  # the attention-pooling head reads however many tokens are left
        h = model.post_layernorm(h)
        return {"last_hidden_state": h, "pooler_output": model.head(h)}
    if family == "albert":
        return {"last_hidden_state": h, "pooler_output": model.pooler_activation(model.pooler(h[:, 0]))}
    if family == "gpt2":
        return {"last_hidden_state": model.ln_f(h)}
    return {"last_hidden_state": model.norm(h)}


def _select(h, probs, valid, pos, cfg: Prune):
    """The pruning step: (h, valid, pos) restricted to the kept tokens (+ the fused one)."""
    b, n, _ = h.shape
    start, end = cfg.start, (cfg.end if cfg.end is not None else n)
    score = probs[:, :, cfg.row, :].mean(dim=1)  # [B, N] head-mean attention row
    k = max(1, math.ceil(cfg.keep * (end - start) - 1e-9))
    chosen = torch.sort(torch.topk(score[:, start:end], k, dim=1).indices, dim=1).values + start
    kept = torch.cat([torch.arange(start).expand(b, -1), chosen, torch.arange(end, n).expand(b, -1)], dim=1)
    take = lambda t: torch.gather(t, 1, kept if t.dim() == 2 else kept[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    new_h, new_valid, new_pos = take(h), take(valid), take(pos)
    if cfg.fuse:
        dropped = torch.zeros(b, n, dtype=torch.bool)
        dropped[:, start:end] = True
        dropped.scatter_(1, kept, False)
        fused = ((score * dropped)[..., None] * h).sum(dim=1, keepdim=True)
        at = start + k  # after the kept span tokens; masks / positions of the last kept one
        new_h = torch.cat([new_h[:, :at], fused, new_h[:, at:]], dim=1)
        new_valid = torch.cat([new_valid[:, :at], new_valid[:, at - 1:at], new_valid[:, at:]], dim=1)
        new_pos = torch.cat([new_pos[:, :at], new_pos[:, at - 1:at], new_pos[:, at:]], dim=1)
    return new_h, new_valid, new_pos


@torch.no_grad()
def pruned_forward(family: str, model, inputs: dict, cfg: Prune | None) -> dict:
    """The model's outputs (numpy) with the pruning `cfg` applied (None: the unpruned model)."""
    model.config._attn_implementation = "eager"  # so every attention returns its probabilities
    h = _embed(family, model, inputs)
    b, n, _ = h.shape
    valid = inputs.get("attention_mask", torch.ones(b, n, dtype=torch.long)).to(torch.long)
    pos = torch.arange(n).expand(b, n)
    for i, block in enumerate(_blocks(family, model)):
        h, probs = _attention(family, model, block, h, _mask(family, valid, pos), pos)
        if cfg is not None and i in cfg.layers:
            h, valid, pos = _select(h, probs, valid, pos, cfg)
            if cfg.end is not None:  # the span now ends where its kept tokens end
                cfg = Prune(cfg.layers, cfg.keep, cfg.row, cfg.start, h.shape[1] - (n - cfg.end), cfg.fuse)
            n = h.shape[1]
        h = _mlp(family, block, h)
    return {k: v.numpy() for k, v in _outputs(family, model, h).items()}
