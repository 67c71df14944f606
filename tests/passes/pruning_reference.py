"""Token-pruning methods applied to the in-tree ViT in PyTorch, choosing tokens with the
ops' NumPy references: checks that the pass wires each op to the right tensors (the
block's probabilities, head-mean keys, the stream before or after attention) and
masks, not the ops themselves (tests/plugins does that)."""

from __future__ import annotations

import math

import numpy as np
import torch

from trimrt.plugins import REGISTRY

BLOCKED = -1e9


def _attend(block, h, cfg, key_bias):
    att = block.attn
    y = block.norm1(h)
    b, n, c = y.shape
    qkv = att.qkv(y).reshape(b, n, 3, cfg.heads, c // cfg.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * att.scale
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    probs = logits.softmax(dim=-1)
    return h + att.proj((probs @ v).transpose(1, 2).reshape(b, n, c)), probs, k


def _np(t):
    return t.detach().numpy()


def pruned_forward(model, x: torch.Tensor, method: str, layers: list[int], keep: float, *,
                   iterations=None, grid: int = 2, mass: float = 0.9) -> torch.Tensor:
    cfg = model.cfg
    h = model.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + model.pos_embed
    span = h.shape[1] - 1
    side = math.isqrt(span)
    position = torch.arange(h.shape[1]).expand(h.shape[0], -1)
    key_bias = None
    for i, block in enumerate(model.blocks):
        prune_here = i in layers
        k_keep = max(1, math.ceil(keep * span - 1e-9))
        if prune_here and method == "divprune":  # before the block, on its input tokens
            (score,) = REGISTRY["DiversityRank"].run_reference(_np(h), keep=k_keep, protect=1)
            y, idx, _ = REGISTRY["TokenPrune"].run_reference(_np(h), score, keep=k_keep, protect=1)
            h, span = torch.from_numpy(y), k_keep
        h, probs, k = _attend(block, h, cfg, key_bias)
        if prune_here and method != "divprune":
            end = 1 + span
            if method == "zero_tprune":
                (score,) = REGISTRY["AttentionPageRank"].run_reference(
                    _np(probs), _np(k.mean(dim=1)), iterations=iterations[layers.index(i)], protect=1, span_end=0)
            else:  # CLS attention row, with the key bias the block saw
                score = _np(probs[:, :, 0, :].mean(dim=1))
            if method == "recycle":
                y, idx = REGISTRY["TokenRecycle"].run_reference(
                    _np(h), score, _np(position), keep=k_keep, protect=1, span_end=end, grid=grid,
                    patch_rows=side, patch_cols=side, first_patch=1)
                position = torch.from_numpy(np.take_along_axis(_np(position), idx, axis=1))
            else:
                y, idx, _ = REGISTRY["TokenPrune"].run_reference(_np(h), score, keep=k_keep, protect=1)
            if method == "adaptive":
                valid, _ = REGISTRY["MassMask"].run_reference(score, idx, tau=mass, protect=1)
                bias = np.where(valid > 0, 0.0, BLOCKED).astype(np.float32)
                if key_bias is not None:
                    bias = np.minimum(np.take_along_axis(_np(key_bias), idx, axis=1), bias)
                key_bias = torch.from_numpy(bias)
            h, span = torch.from_numpy(y), k_keep
        h = h + block.mlp(block.norm2(h))
    return model.head(model.norm(h)[:, 0])
