"""A LLaMA-style causal language model in plain PyTorch, for long-context prefill.

Pre-norm blocks of RMSNorm → attention with rotary position embeddings and the causal
rule (scaled_dot_product_attention(is_causal=True): the exporter writes the causal mask
into the graph) → residual, RMSNorm → SwiGLU MLP → residual; logits for every token. No
KV cache: the model is the prefill of a prompt (scoring, embedding, the first step of
generation), the stage whose attention grows with the square of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaStyleConfig:
    vocab: int = 1000
    width: int = 512
    heads: int = 8
    mlp_width: int = 1408
    depth: int = 4
    rope_base: float = 10000.0


class Attention(nn.Module):
    def __init__(self, cfg: LlamaStyleConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.width, cfg.width, bias=False) for _ in range(4))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√d + causal mask)·v on [B, H, N, Dh] (tests swap in other attention)."""
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = self.attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: LlamaStyleConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.width, eps=1e-6), nn.RMSNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.gate = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        self.up = nn.Linear(cfg.width, cfg.mlp_width, bias=False)
        self.down = nn.Linear(cfg.mlp_width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        y = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))


class LlamaStyleLM(nn.Module):
    output_names = ("logits",)

    def __init__(self, cfg: LlamaStyleConfig = LlamaStyleConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head_dim = self.cfg.width // self.cfg.heads
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32)[:, None]
        freqs = self.cfg.rope_base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.cat([positions * freqs] * 2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def llama_style(seed: int = 0, batch: int = 1, tokens: int = 64, cfg: LlamaStyleConfig = LlamaStyleConfig()):
    """(model, (input_ids,)): random weights, random token ids."""
    torch.manual_seed(seed)
    model = LlamaStyleLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed + 1))
    return model, (ids,)
