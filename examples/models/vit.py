"""A plain-PyTorch Vision Transformer (timm/DeiT layout), the built-in example model.

Written here rather than taken from timm because torchvision (a timm dependency) does
not import beside the CPU torch wheel used on these machines. The layout matches
DeiT: patch embedding by a strided conv, a CLS token, learned position embeddings,
pre-norm blocks (LayerNorm → MHSA → residual, LayerNorm → MLP → residual) and a
linear head on the final CLS token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_width: int = 1536
    num_classes: int = 1000
    fused_attention: bool = False  # True: F.scaled_dot_product_attention; False: explicit softmax(QKᵀ)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


DEIT_SMALL = ViTConfig()


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.scale = self.head_dim**-0.5
        self.fused = cfg.fused_attention
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_width), nn.GELU(), nn.Linear(cfg.mlp_width, cfg.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    output_names = ("logits",)  # names of the exported outputs

    def __init__(self, cfg: ViTConfig = DEIT_SMALL):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def deit_small(seed: int = 0, batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Factory for `trimrt compile`: DeiT-S geometry (12 blocks, width 384, 6 heads), random weights."""
    return vit_factory(DEIT_SMALL, seed=seed, batch=batch)


def vit_factory(cfg: ViTConfig, seed: int = 0, batch: int = 1):
    torch.manual_seed(seed)
    model = VisionTransformer(cfg).eval()
    example = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed + 1))
    return model, (example,)


def tiny_vit(seed: int = 0, fused_attention: bool = False):
    """A small ViT (4 blocks, 65 tokens) for fast tests."""
    cfg = ViTConfig(image_size=32, patch_size=4, width=64, depth=4, heads=4, mlp_width=128,
                    num_classes=10, fused_attention=fused_attention)
    return vit_factory(cfg, seed=seed, batch=2)
