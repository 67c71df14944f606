"""TokenSlim: SiT's Token Slimming Module, N tokens -> M learned convex combinations of them.

Inputs x [B, N, D] and the module's weights: LayerNorm ln_scale, ln_bias [D]; a two-layer
MLP w1 [D, Hd], b1 [Hd], w2 [Hd, M], b2 [M] (weights in MatMul layout, input-major).
Per image:

    logits = scale · (GELU(LN(x) @ w1 + b1) @ w2 + b2)        [N, M]
    y      = softmax over N (logitsᵀ) @ x                      [M, D]

GELU is the exact (erf) one and LN normalises over D with `epsilon`. Every output token
is a convex combination of the N inputs, so y is dense and static: M is fixed by w2's
shape. One op instead of the ~15 nodes the exporters emit lets a GPU build run it as
one fused kernel and hides nothing from ONNX Runtime (the decomposition below is the
same computation).
"""

from __future__ import annotations

import math

import numpy as np

from .base import AttrSpec, OpDef, TensorSpec

NAME = "TokenSlim"
#: LayerNorm's default 1e-5 as an ONNX float attribute holds it (float32)
EPSILON_DEFAULT = float(np.float32(1e-5))


def reference(x: np.ndarray, ln_scale, ln_bias, w1, b1, w2, b2, *, epsilon: float, scale: float):
    if x.ndim != 3 or w1.shape[0] != x.shape[2] or w2.shape[0] != w1.shape[1]:
        raise ValueError(f"TokenSlim: x {x.shape}, w1 {w1.shape}, w2 {w2.shape} do not chain")
    if x.shape[1] == 0:
        raise ValueError("TokenSlim: a softmax over zero tokens is undefined")
    xd = x.astype(np.float64)
    mean = xd.mean(axis=-1, keepdims=True)
    var = ((xd - mean) ** 2).mean(axis=-1, keepdims=True)
    normed = (xd - mean) / np.sqrt(var + epsilon) * ln_scale.astype(np.float64) + ln_bias.astype(np.float64)
    hidden = normed @ w1.astype(np.float64) + b1.astype(np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    gelu = 0.5 * hidden * (1.0 + erf(hidden / math.sqrt(2.0)))
    logits = scale * (gelu @ w2.astype(np.float64) + b2.astype(np.float64))  # [B, N, M]
    t = np.swapaxes(logits, 1, 2)  # [B, M, N]
    weights = np.exp(t - t.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return ((weights @ xd).astype(x.dtype),)


def decompose(b, x, ln_scale, ln_bias, w1, b1, w2, b2):
    # LayerNormalization is opset 17, unchanged in 18
    normed = b.LayerNormalization(x, ln_scale, ln_bias, axis=-1, epsilon=b.ref("epsilon"))
    h = b.Add(b.MatMul(normed, w1), b1)
    # exact GELU with Erf (the Gelu op is opset 20): h · 0.5 · (1 + erf(h / √2))
    sqrt2, one, half = (b.CastLike(b.const(v, np.float32), h) for v in (math.sqrt(2.0), 1.0, 0.5))
    gelu = b.Mul(b.Mul(h, b.Add(b.Erf(b.Div(h, sqrt2)), one)), half)
    l_raw = b.Add(b.MatMul(gelu, w2), b2)  # [B, N, M]
    logits = b.Mul(l_raw, b.CastLike(b.attr("scale"), l_raw))
    # softmax over the N tokens of every output token, then mix the tokens
    weights = b.Softmax(b.Transpose(logits, perm=[0, 2, 1]), axis=-1)  # [B, M, N]
    return b.MatMul(weights, x)  # [B, M, D]


def examples(rng):
    """Two small modules: M < N and M > N output tokens."""
    cases = []
    for (batch, n, d, hd, m), attrs in [((2, 7, 5, 6, 3), {}), ((1, 4, 8, 5, 6), dict(epsilon=1e-6, scale=2.0))]:
        shapes = [(batch, n, d), (d,), (d,), (d, hd), (hd,), (hd, m), (m,)]
        cases.append(([rng.standard_normal(shape).astype(np.float32) * 0.5 for shape in shapes], attrs))
    return cases


OP = OpDef.of_module(
    __name__,
    inputs=(
        TensorSpec("x", "tokens [B, N, D]"),
        TensorSpec("ln_scale", "LayerNorm scale [D]"),
        TensorSpec("ln_bias", "LayerNorm bias [D]"),
        TensorSpec("w1", "first MLP weight [D, Hd] (x @ w1)"),
        TensorSpec("b1", "first MLP bias [Hd]"),
        TensorSpec("w2", "second MLP weight [Hd, M]: one column per output token"),
        TensorSpec("b2", "second MLP bias [M]"),
    ),
    outputs=(TensorSpec("y", "slimmed tokens [B, M, D], each a convex combination of the N inputs"),),
    attributes=(
        AttrSpec("epsilon", float, "LayerNorm epsilon", EPSILON_DEFAULT),
        AttrSpec("scale", float, "factor on the MLP output before the softmax (1 / temperature)", 1.0),
    ),
)
