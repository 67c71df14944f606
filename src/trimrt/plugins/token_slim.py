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
import onnx
import onnx.helper as oh

from .base import AttrSpec, OpDef, TensorSpec, const, const_from_attr, make_function

NAME = "TokenSlim"
#: LayerNorm's default 1e-5 as an ONNX float attribute holds it (float32)
EPSILON_DEFAULT = float(np.float32(1e-5))


def reference(x: np.ndarray, ln_scale, ln_bias, w1, b1, w2, b2, *, epsilon: float = EPSILON_DEFAULT, scale: float = 1.0):
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


def _ln_with_attr_epsilon() -> onnx.NodeProto:
    """LayerNormalization whose epsilon is the function attribute `epsilon`."""
    node = oh.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["normed"], axis=-1)
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "epsilon", "epsilon", onnx.AttributeProto.FLOAT
    node.attribute.append(ref)
    return node


def build_function():
    nodes = [
        # LayerNormalization is opset 17, unchanged in 18
        _ln_with_attr_epsilon(),
        oh.make_node("MatMul", ["normed", "w1"], ["h_mm"]),
        oh.make_node("Add", ["h_mm", "b1"], ["h"]),
        # exact GELU with Erf (the Gelu op is opset 20): h · 0.5 · (1 + erf(h / √2))
        const("sqrt2_f", np.array(math.sqrt(2.0), dtype=np.float32)),
        const("one_f", np.array(1.0, dtype=np.float32)),
        const("half_f", np.array(0.5, dtype=np.float32)),
        oh.make_node("CastLike", ["sqrt2_f", "h"], ["sqrt2"]),
        oh.make_node("CastLike", ["one_f", "h"], ["one"]),
        oh.make_node("CastLike", ["half_f", "h"], ["half"]),
        oh.make_node("Div", ["h", "sqrt2"], ["h_scaled"]),
        oh.make_node("Erf", ["h_scaled"], ["h_erf"]),
        oh.make_node("Add", ["h_erf", "one"], ["h_erf1"]),
        oh.make_node("Mul", ["h", "h_erf1"], ["h_gate"]),
        oh.make_node("Mul", ["h_gate", "half"], ["gelu"]),
        oh.make_node("MatMul", ["gelu", "w2"], ["l_mm"]),
        oh.make_node("Add", ["l_mm", "b2"], ["l_raw"]),  # [B, N, M]
        const_from_attr("scale_f", "scale", "value_float"),
        oh.make_node("CastLike", ["scale_f", "l_raw"], ["scale_t"]),
        oh.make_node("Mul", ["l_raw", "scale_t"], ["logits"]),
        # softmax over the N tokens of every output token, then mix the tokens
        oh.make_node("Transpose", ["logits"], ["logits_t"], perm=[0, 2, 1]),  # [B, M, N]
        oh.make_node("Softmax", ["logits_t"], ["weights"], axis=-1),
        oh.make_node("MatMul", ["weights", "x"], ["y"]),  # [B, M, D]
    ]
    return make_function(NAME, ["x", "ln_scale", "ln_bias", "w1", "b1", "w2", "b2"], ["y"],
                         ["epsilon", "scale"], nodes, __doc__, defaults={"epsilon": EPSILON_DEFAULT, "scale": 1.0})


OP = OpDef(
    name=NAME,
    doc=__doc__,
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
    reference=reference,
    build_function=build_function,
    triton="trimrt.plugins.kernels.token_slim:run",
)
