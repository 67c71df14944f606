"""Token slimming (SiT): fuse every Token Slimming Module of the graph into one TokenSlim op.

A TSM (Sense-X/SiT) exports as

    LayerNormalization(x) -> MatMul(w1) -> Add(b1) -> GELU (Erf form) -> MatMul(w2) -> Add(b2)
    -> [Mul / Div by a scalar] -> Transpose(0, 2, 1) -> Softmax(last axis) -> MatMul(·, x)

(or Softmax over axis 1 before the Transpose), with the same x at both ends. An onnxscript
rewrite rule replaces it by y = trimrt::TokenSlim(x, ln_scale, ln_bias, w1, b1, w2, b2,
epsilon, scale), whose decomposition is the same computation: exact on ONNX Runtime, and
one kernel for the softmax and token mixing on a GPU.

The pattern covers both torch exporters at opset >= 18 — dynamo writes GELU as
x · (0.5 · (1 + erf(x / √2))) and Add(matmul, bias), TorchScript (x · (1 + erf(x / √2))) · 0.5
and Add(bias, matmul) — as alternatives (OrValue), with x · (1/√2), a Gelu op (opset >= 20)
and the optional logit scale. Linear layers on a rank-3 tensor always export as MatMul + Add
and LayerNormalization is one op at opset >= 17, so neither needs a variant. `_explain`
accepts a match only with constant weights of chaining shapes, the exact GELU constants and
the softmax over the token axis.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from ..compiler.analysis import constant_array
from ..plugins import DOMAIN, OP_VERSION
from .base import TrimrtPass

OP_NAME = "TokenSlim"
#: TokenSlim's weight inputs after x, as the pattern binds them
_WEIGHTS = ("ln_scale", "ln_bias", "w1", "b1", "w2", "b2")


def _add(op, a, b):
    return pattern.OrValue([op.Add(a, b), op.Add(b, a)])


def _mul(op, a, b, **kw):
    return pattern.OrValue([op.Mul(a, b), op.Mul(b, a)], **kw)


def _gelu(op, h, c_sqrt2, c_one, c_half):
    """Exact GELU h · 0.5 · (1 + erf(h / √2)) in the groupings the exporters emit."""
    erf_arg = pattern.OrValue([op.Div(h, c_sqrt2), op.Mul(h, c_sqrt2), op.Mul(c_sqrt2, h)],
                              tag_var="erf_form", tag_values=["div", "mul", "mul"])
    erf1 = _add(op, op.Erf(erf_arg), c_one)
    return pattern.OrValue([
        _mul(op, h, _mul(op, c_half, erf1)),  # dynamo: h · (0.5 · (1 + erf))
        _mul(op, _mul(op, h, erf1), c_half),  # TorchScript: (h · (1 + erf)) · 0.5
        _mul(op, _mul(op, h, c_half), erf1),  # (0.5 · h) · (1 + erf)
        op.Gelu(h, _outputs=["gelu_op"]),  # opset >= 20
    ], tag_var="gelu_form", tag_values=["erf", "erf", "erf", "op"])


def _target(op, x, ln_scale, ln_bias, w1, b1, w2, b2, c_sqrt2, c_one, c_half, c_scale):
    normed = op.LayerNormalization(x, ln_scale, ln_bias, _outputs=["normed"])
    hidden = _add(op, op.MatMul(normed, w1), b1)
    logits = _add(op, op.MatMul(_gelu(op, hidden, c_sqrt2, c_one, c_half), w2), b2)
    scaled = pattern.OrValue([_mul(op, logits, c_scale), op.Div(logits, c_scale), logits],
                             tag_var="scale_form", tag_values=["mul", "div", "none"])
    weights = pattern.OrValue([
        op.Softmax(op.Transpose(scaled, _outputs=["transposed"]), _outputs=["softmax"]),
        op.Transpose(op.Softmax(scaled, _outputs=["softmax"]), _outputs=["transposed"]),
    ], tag_var="softmax_form", tag_values=["transpose_first", "softmax_first"])
    return op.MatMul(weights, x)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant of the graph: an initializer or Constant node,
    possibly behind Identity nodes (the TorchScript exporter shares equal initializers,
    e.g. every LayerNorm's ones, through Identity)."""
    while value is not None and value.producer() is not None and value.producer().op_type == "Identity":
        value = value.producer().inputs[0]
    if value is None or value.is_graph_input():
        return None
    return constant_array(value)


def _scalar(value) -> float | None:
    array = _constant(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def _near(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-4)


def _explain(normed, transposed, softmax, erf_form, gelu_form, scale_form, softmax_form, c_sqrt2=None,
             c_one=None, c_half=None, c_scale=None, gelu_op=None, **weights) -> tuple[str | None, dict]:
    """(why this is no TSM, or None; the TokenSlim attributes)."""
    arrays = {name: _constant(weights[name]) for name in _WEIGHTS}
    missing = [k for k, a in arrays.items() if a is None]
    if missing:
        return f"{missing} are not constants", {}
    if any(a.dtype.kind != "f" for a in arrays.values()):
        return "the weights are not floating point", {}
    w1_a, w2_a = arrays["w1"], arrays["w2"]
    if w1_a.ndim != 2 or w2_a.ndim != 2:
        return f"w1 {w1_a.shape} and w2 {w2_a.shape} are not matrices", {}
    (d, hd), m = w1_a.shape, w2_a.shape[1]
    want = {"ln_scale": (d,), "ln_bias": (d,), "w1": (d, hd), "b1": (hd,), "w2": (hd, m), "b2": (m,)}
    bad = {k: arrays[k].shape for k in want if arrays[k].shape != want[k]}
    if bad:
        return f"weight shapes {bad} do not chain as {want}", {}
    ln = normed.producer()
    if ln.attributes.get_int("axis", -1) not in (-1, 2):
        return "the LayerNorm does not normalise the last axis", {}
    if gelu_form == "op" and gelu_op.producer().attributes.get_string("approximate", "none") != "none":
        return "the GELU is the tanh approximation", {}
    sqrt2 = math.sqrt(2.0) if erf_form == "div" else 1 / math.sqrt(2.0)
    if gelu_form != "op" and not (_near(_scalar(c_sqrt2), sqrt2) and _near(_scalar(c_one), 1.0)
                                  and _near(_scalar(c_half), 0.5)):
        return "the GELU constants are not √2 (or 1/√2), 1 and 0.5", {}
    scale = 1.0 if scale_form == "none" else _scalar(c_scale)
    if scale is None or (scale_form == "div" and scale == 0.0):
        return "the logit scale is not a constant scalar", {}
    if scale_form == "div":
        scale = 1.0 / scale
    if tuple(transposed.producer().attributes.get_ints("perm", ())) != (0, 2, 1):
        return "the transpose is not (0, 2, 1)", {}
    axis = softmax.producer().attributes.get_int("axis", -1)
    token_axes = (-1, 2) if softmax_form == "transpose_first" else (1, -2)
    if axis not in token_axes:
        return f"the softmax runs over axis {axis}, not the token axis", {}
    return None, {"epsilon": ln.attributes.get_float("epsilon", 1e-5), "scale": float(scale)}


def _check(context, **bindings):
    reason, _ = _explain(**bindings)
    return reason is None or pattern.MatchResult().fail(f"not a token slimming module: {reason}")


def _rewrite(op, x, **bindings):
    _, attrs = _explain(**bindings)
    return op.TokenSlim(x, *(bindings[name] for name in _WEIGHTS), **attrs, _domain=DOMAIN, _version=OP_VERSION)


RULE = pattern.RewriteRule(_target, _rewrite, _check, name="token_slimming")


class TokenSlimmingPass(TrimrtPass):
    """Replace every SiT Token Slimming Module by one trimrt::TokenSlim node."""

    name = "token_slimming"
    recipe_table = "token_slimming"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = {id(n) for n in model.graph.all_nodes()}
        used_constants = {n for n in model.graph if n.op_type == "Constant" and _used(n)}
        # apply_to_model first annotates every Constant node's output with its value, shape
        # and type (for patterns that test constants); undo that afterwards so that a graph
        # without a TSM is left exactly as it was
        unmarked = [(n.outputs[0], n.outputs[0].type, n.outputs[0].shape) for n in model.graph.all_nodes()
                    if n.op_type == "Constant" and n.outputs[0].const_value is None]
        count = pattern.RewriteRuleSet([RULE]).apply_to_model(model)
        for value, type_, shape in unmarked:
            value.const_value, value.type, value.shape = None, type_, shape
        model.graph.remove([n for n in used_constants if not _used(n)], safe=True)  # fused modules' GELU / scale constants
        fused = [n for n in model.graph.all_nodes()
                 if n.domain == DOMAIN and n.op_type == OP_NAME and id(n) not in before]
        modules = []
        b = self.builder(model.graph)
        for i, node in enumerate(fused):
            node.name = node.name or f"trimrt_token_slim_{i}"
            b.stamp(node)
            w1, w2 = (ir.convenience.get_const_tensor(node.inputs[k]) for k in (3, 5))
            modules.append({"node": node.name, "input": node.inputs[0].name, "hidden": int(w1.shape[1]),
                            "tokens_out": int(w2.shape[1]), "epsilon": node.attributes["epsilon"].value,
                            "scale": node.attributes["scale"].value})
        if fused:
            model.opset_imports[DOMAIN] = OP_VERSION
        self.record({"modules_fused": len(fused), "modules": modules})
        assert count == len(fused), (count, len(fused))
        return ir.passes.PassResult(model, modified=bool(fused))


def _used(node: ir.Node) -> bool:
    return any(out.uses() or out.is_graph_output() for out in node.outputs)
