"""A p-MoD-style decoder: Hugging Face LLaMA-family layers with Mixture-of-Depths routers
(MCG-NJU/p-MoD), to exercise `[mixture_of_depths] router = "model"`.

A p-MoD layer has a router r = Linear(d, 1) on its input x and the TanhNorm weight
w = 0.2·tanh(r) + 1. Of the span's tokens (the image tokens) the top-k by w run the layer,
and the layer's output is STRing-weighted: h_attn + w·MLP for a routed span token,
h_attn + MLP for a token outside the span, w·x for a skipped span token.

Top-k routing does not export (its counts are data-dependent in PyTorch), so the layer
exports dense: every token runs it, as at ratio 1.0, with the span's tokens gated by w
(g = w inside the span, 1 outside, the span told by the position ids, so decode steps
past the prompt run ungated as in p-MoD). That is the form trimrt recognises: it takes
the router from the gate and routes the layer at the recipe's ratio. Weights are random:
the model is for structure and numerics, not quality.
"""

from __future__ import annotations

import torch
from torch import nn

#: p-MoD's TanhNorm: w = SCALE·tanh(r) + SHIFT, in [0.8, 1.2]
TANH_SCALE, TANH_SHIFT = 0.2, 1.0


class MoDDecoderLayer(nn.Module):
    """A pre-norm decoder layer (LLaMA / Qwen2 / Mistral) with a p-MoD router, exported dense."""

    def __init__(self, layer: nn.Module, hidden: int, span: tuple[int, int]):
        super().__init__()
        # the layer's own modules, under their own names (decoding code reads them as a layer's)
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.router = nn.Linear(hidden, 1)
        self.span = span

    def gate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[B, N, 1]: the TanhNorm weight for the span's tokens, 1 for the others."""
        w = TANH_SCALE * torch.tanh(self.router(x)) + TANH_SHIFT
        start, end = self.span
        inside = ((position_ids >= start) & (position_ids < end)).unsqueeze(-1)
        return torch.where(inside, w, torch.ones_like(w))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        x = hidden_states
        attn, _ = self.self_attn(self.input_layernorm(x), attention_mask=attention_mask,
                                 position_embeddings=position_embeddings, **kwargs)
        h = x + attn
        return h + self.gate(x, position_ids) * self.mlp(self.post_attention_layernorm(h))


def with_mod_routers(lm, layers: list[int], span: tuple[int, int], seed: int = 0):
    """`lm` (a *ForCausalLM of the LLaMA family) with p-MoD routers in `layers`: random
    weights scaled to each layer's input (measured on random token ids), so r is about
    unit-sized and the TanhNorm weights spread over [0.8, 1.2] without saturating
    (saturated weights tie, and a top-k among ties is decided by rounding)."""
    config = lm.config
    generator = torch.Generator().manual_seed(seed)
    routed = {}
    for i in layers:
        layer = MoDDecoderLayer(lm.model.layers[i], config.hidden_size, span)
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(1, config.hidden_size, generator=generator))
            layer.router.bias.zero_()
        lm.model.layers[i] = routed[i] = layer
    ids = torch.randint(0, config.vocab_size, (1, span[1] + 8), generator=generator)
    scale = {}

    def measure(module, args, kwargs):  # the spread of r on the layer's input
        scale[module] = float(module.router(args[0] if args else kwargs["hidden_states"]).std())

    hooks = [layer.register_forward_pre_hook(measure, with_kwargs=True) for layer in routed.values()]
    with torch.no_grad():
        lm.eval()(ids)
        for layer in routed.values():
            layer.router.weight.div_(scale[layer])
    for hook in hooks:
        hook.remove()
    return lm
