"""EViT token pruning written directly in PyTorch on the in-tree ViT, from the paper's
formulas (not from trimrt's code): the independent reference for the pruned builds."""

from __future__ import annotations

import math

import torch


def evit_forward(model, x: torch.Tensor, layers: list[int], keep: float, fuse: bool) -> torch.Tensor:
    cfg = model.cfg
    h = model.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + model.pos_embed
    for i, block in enumerate(model.blocks):
        attn_mod = block.attn
        y = block.norm1(h)
        b, n, c = y.shape
        qkv = attn_mod.qkv(y).reshape(b, n, 3, cfg.heads, c // cfg.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = ((q @ k.transpose(-2, -1)) * attn_mod.scale).softmax(dim=-1)
        h = h + attn_mod.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        if i in layers:
            cls_attn = probs[:, :, 0, 1:].mean(dim=1)  # [B, N-1] head-mean CLS row over patches
            prunable = n - 1
            k_keep = max(1, math.ceil(keep * prunable - 1e-9))
            if k_keep < prunable:
                _, idx = torch.topk(cls_attn, k_keep, dim=1)
                idx, _ = torch.sort(idx, dim=1)
                kept = torch.gather(h[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, c))
                parts = [h[:, :1], kept]
                if fuse:
                    dropped = torch.ones_like(cls_attn, dtype=torch.bool)
                    dropped.scatter_(1, idx, False)
                    weights = cls_attn * dropped
                    parts.append((weights.unsqueeze(-1) * h[:, 1:]).sum(dim=1, keepdim=True))
                h = torch.cat(parts, dim=1)
        h = h + block.mlp(block.norm2(h))
    return model.head(model.norm(h)[:, 0])
