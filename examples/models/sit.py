"""A small ViT with SiT token slimming (Sense-X/SiT), to exercise the token-slimming pass.

A Token Slimming Module (TSM) turns N patch tokens into M < N by learned convex
combinations: weights = softmax over the N tokens of scale · MLP(LN(x)), an [M, N]
matrix per image, and x' = weights @ x. It is dense and static (no selection), so a
model with TSMs exports to plain ONNX; trimrt recognises the sub-graph and fuses it
into one `trimrt::TokenSlim` op. The CLS token passes a TSM untouched, as in SiT.

The blocks, patch embedding and head are those of `examples.models.vit`; only the
stage structure differs (a TSM after chosen blocks). Weights are random: the model
is for structure and numerics, not accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .vit import VisionTransformer, ViTConfig


@dataclass(frozen=True)
class SiTConfig(ViTConfig):
    #: (block index, patch tokens kept): a TSM after that block reduces the patches to that count
    slimming: tuple[tuple[int, int], ...] = ((0, 8), (2, 4))
    slim_hidden: int = 32  # hidden width of the TSM's MLP
    slim_scale: float = 0.5  # multiplies the logits before the softmax (1 / temperature)


class TokenSlimming(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear(hidden -> M) -> softmax over tokens -> @ tokens."""

    def __init__(self, width: int, hidden: int, tokens_out: int, scale: float = 1.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, tokens_out))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, D] -> [B, M, D]
        logits = self.mlp(self.norm(x)) * self.scale  # [B, N, M]
        weights = logits.transpose(1, 2).softmax(dim=-1)  # [B, M, N]: each output token mixes all N
        return weights @ x


class SlimmedViT(VisionTransformer):
    """VisionTransformer whose patch tokens are slimmed after the blocks of `cfg.slimming`."""

    output_names = ("logits",)

    def __init__(self, cfg: SiTConfig):
        super().__init__(cfg)
        self.slims = nn.ModuleDict({
            str(block): TokenSlimming(cfg.width, cfg.slim_hidden, tokens, cfg.slim_scale)
            for block, tokens in cfg.slimming
        })
        for slim in self.slims.values():  # random but not degenerate: spread the softmax weights
            for m in slim.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.5)
                    nn.init.normal_(m.bias, std=0.1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for i, block in enumerate(self.blocks):
            x = block(x)
            if str(i) in self.slims:
                x = torch.cat([x[:, :1], self.slims[str(i)](x[:, 1:])], dim=1)
        return self.head(self.norm(x)[:, 0])


TINY_SIT = SiTConfig(image_size=32, patch_size=8, width=64, depth=4, heads=2, mlp_width=128, num_classes=10)


def tiny_sit(seed: int = 0, batch: int = 2, cfg: SiTConfig = TINY_SIT):
    """Factory: 4 blocks, 16 patches + CLS, slimmed 16 -> 8 after block 0 and 8 -> 4 after block 2."""
    torch.manual_seed(seed)
    model = SlimmedViT(cfg).eval()
    example = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed + 1))
    return model, (example,)


#: DeiT-S geometry with TSMs after blocks 3, 6 and 9 keeping ~70% of the patches each time
DEIT_SMALL_SIT = SiTConfig(slimming=((3, 137), (6, 96), (9, 67)), slim_hidden=384, slim_scale=1.0)


def deit_small_sit(seed: int = 0, batch: int = 1):
    """Factory: the DeiT-S-geometry ViT with three token slimming modules (random weights)."""
    torch.manual_seed(seed)
    model = SlimmedViT(DEIT_SMALL_SIT).eval()
    cfg = DEIT_SMALL_SIT
    example = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed + 1))
    return model, (example,)
