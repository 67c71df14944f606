"""Mixture-of-Depths routing written directly in PyTorch on the in-tree ViT, from p-MoD's
description (not from trimrt's code): the independent reference for the routed builds.

A routed block runs on the top-k tokens of the span (the CLS always), ranked by the
head-mean attention row of the CLS in the block before it (training-free router; a token
the block before skipped keeps the score it had); the others skip the block unchanged."""

from __future__ import annotations

import math

import torch


def mod_forward(model, x: torch.Tensor, ratios: list[float]) -> torch.Tensor:
    cfg = model.cfg
    h = model.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + model.pos_embed
    b, n, c = h.shape
    score = None  # [B, N] the last block's CLS row (tokens it skipped: their earlier score)
    for block, ratio in zip(model.blocks, ratios):
        if ratio < 1.0:
            k = max(1, math.ceil(ratio * (n - 1) - 1e-9))
            top = torch.topk(score[:, 1:], k, dim=1, sorted=True).indices + 1
            index = torch.cat([torch.zeros(b, 1, dtype=torch.long), torch.sort(top, dim=1).values], dim=1)
        else:
            index = torch.arange(n).expand(b, n)
        routed = torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, c))
        y, probs = _block(block, routed, cfg.heads)
        row = probs[:, :, 0, :].mean(dim=1)  # the CLS row over the routed tokens
        score = row if score is None or ratio == 1.0 else score.scatter(1, index, row)
        h = h.scatter(1, index.unsqueeze(-1).expand(-1, -1, c), y)
    return model.head(model.norm(h)[:, 0])


def _block(block, h, heads):
    attn = block.attn
    y = block.norm1(h)
    b, n, c = y.shape
    q, k, v = attn.qkv(y).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    h = h + attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    return h + block.mlp(block.norm2(h)), probs
