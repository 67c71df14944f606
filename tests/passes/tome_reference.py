"""ToMe written directly in PyTorch on the in-tree ViT, from the paper's formulas (not
from trimrt's code): the independent reference for merged builds.

Per block, between attention and MLP: metric = head-mean keys; bipartite soft matching
(alternate tokens into A/B, cosine scores, CLS never merged); the r best-matched A tokens
are merged into their B match by size-weighted average; proportional attention adds
log(size) to the logits of every later block.
"""

from __future__ import annotations

import torch


def bipartite_merge(x, metric, size, r: int, protect_cls: bool):
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if protect_cls:
        scores[:, 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    src, unm = edge[:, :r], edge[:, r:].sort(dim=-1).values
    dst = node_idx.gather(1, src)
    d = x.shape[-1]
    xs = torch.cat([x * size[..., None], size[..., None]], dim=-1)  # carry the size as a last column
    xa, xb = xs[:, ::2], xs[:, 1::2]
    moved = xa.gather(1, src[..., None].expand(-1, -1, d + 1))
    xb = xb.scatter_reduce(1, dst[..., None].expand(-1, -1, d + 1), moved, reduce="sum")
    out = torch.cat([xa.gather(1, unm[..., None].expand(-1, -1, d + 1)), xb], dim=1)
    new_size = out[..., -1]
    return out[..., :-1] / new_size[..., None], new_size


def tome_forward(model, x: torch.Tensor, r_per_block: dict[int, int], proportional: bool = True) -> torch.Tensor:
    cfg = model.cfg
    h = model.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + model.pos_embed
    size = torch.ones(h.shape[:2])
    for i, block in enumerate(model.blocks):
        att = block.attn
        y = block.norm1(h)
        bsz, n, c = y.shape
        qkv = att.qkv(y).reshape(bsz, n, 3, cfg.heads, c // cfg.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * att.scale
        if proportional:
            logits = logits + size.log()[:, None, None, :]
        h = h + att.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, n, c))
        r = r_per_block.get(i, 0)
        if r > 0:
            h, size = bipartite_merge(h, k.mean(dim=1), size, r, protect_cls=True)
        h = h + block.mlp(block.norm2(h))
    return model.head(model.norm(h)[:, 0])
