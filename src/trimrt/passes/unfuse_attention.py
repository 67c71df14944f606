"""Fused attention written out in the form analysis reads, for the token-level passes.

A model given already optimised by ONNX Runtime has each block's attention as one contrib
op on [B, S, heads·d] tensors: `com.microsoft.MultiHeadAttention` (queries, keys and values
projected: what its optimizer and OrtFusionPass leave) or `com.microsoft.Attention` (the
input and the packed Q/K/V weights, as its BERT optimizer leaves it). Analysis finds no
Softmax over q·kᵀ there, so no token pass (nor block-sparse attention) could apply. Each
becomes the form an export has: heads viewed [B, heads, S, d], q·kᵀ times the scale, its
masks added (attention_bias; a [B, L] key mask as ONNX Runtime applies it, or the packed
op's [B] key counts; the causal rule when `unidirectional`), Softmax, times v, heads merged
back. Exact up to float
rounding; OrtFusionPass fuses what the token passes leave alone again. The opset-23
Attention on 3-D inputs becomes the same op on 4-D views (the form analysis takes). Forms
that carry more (a past cache, rotary inside the op, other mask layouts) are refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import infer_shapes
from ..errors import StructureError
from .base import GraphBuilder, TrimrtPass

ORT_DOMAIN = "com.microsoft"
#: MultiHeadAttention's inputs by position (ONNX Runtime's contrib-op schema)
_BIAS, _KEY_PADDING_MASK, _ATTENTION_BIAS = 3, 4, 5


class UnfuseAttentionPass(TrimrtPass):
    name = "unfuse_attention"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewrites = {(ORT_DOMAIN, "MultiHeadAttention"): _multi_head, (ORT_DOMAIN, "Attention"): _packed,
                    ("", "Attention"): _heads_major}
        done = 0
        for i, node in enumerate(list(model.graph)):
            rewrite = rewrites.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
            if rewrite is None or (rewrite is _heads_major and not _three_dimensional(node)):
                continue
            if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
                raise StructureError(f"{node.op_type} {node.name!r} returns a present cache; token passes need the "
                                     "attention of one pass over the tokens: give a model without a KV cache")
            b = self.builder(model.graph, f"trimrt_unfused_{i}")
            out = rewrite(b, node)
            if node.outputs[0].dtype is not None:  # (a contrib op's output may carry no type)
                out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
            b.insert_before(node)
            ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
            model.graph.remove(node, safe=True)
            done += 1
        if done:
            infer_shapes(model)  # analysis reads the attention's shapes
        self.record({"unfused": done})
        return ir.passes.PassResult(model, modified=bool(done))


def _refuse(node: ir.Node, why: str) -> StructureError:
    return StructureError(f"ONNX Runtime's {node.op_type} {node.name!r} {why}; token passes need the attention's own "
                          "ops: give the model as exported, before ONNX Runtime's optimizer")


def _multi_head(b: GraphBuilder, node: ir.Node) -> ir.Value:
    """com.microsoft.MultiHeadAttention(query, key, value [, bias, key_padding_mask, attention_bias])."""
    inputs = list(node.inputs) + [None] * 8
    if inputs[1] is None or inputs[2] is None:
        raise _refuse(node, "takes packed query, key and value")
    if any(x is not None for x in inputs[6:8]):
        raise _refuse(node, "attends a past cache")
    if inputs[_BIAS] is not None:
        raise _refuse(node, "adds the Q/K/V projections' bias itself")
    if any(x.shape is not None and len(x.shape) != 3 for x in inputs[:3]):
        raise _refuse(node, "takes packed or head-major keys and values")
    return _explicit(b, node, *inputs[:3], key_mask=inputs[_KEY_PADDING_MASK], bias=inputs[_ATTENTION_BIAS])


def _packed(b: GraphBuilder, node: ir.Node) -> ir.Value:
    """com.microsoft.Attention(input, weights [, bias, mask_index, past, attention_bias]): the
    projections (input · weights + bias, split at qkv_hidden_sizes), then as MultiHeadAttention."""
    inputs = list(node.inputs) + [None] * 7
    if inputs[4] is not None or inputs[6] is not None:
        raise _refuse(node, "attends a past cache")
    if node.attributes.get_int("do_rotary", 0):
        raise _refuse(node, "applies rotary positions itself")
    sizes = list(node.attributes.get_ints("qkv_hidden_sizes", []))
    if not sizes:
        weights = inputs[1].shape
        if weights is None or len(weights) != 2 or not isinstance(weights[1], int):
            raise _refuse(node, "has packed weights of unknown width")
        sizes = [weights[1] // 3] * 3
    qkv = b.MatMul(inputs[0], inputs[1])
    if inputs[2] is not None:
        qkv = b.Add(qkv, inputs[2])
    q, k, v = b.Split(qkv, b.const(np.array(sizes)), axis=-1, _outputs=3)
    mask = inputs[3]
    if mask is not None and mask.shape is not None and len(mask.shape) == 1:  # [B] lengths: the keys before each
        batch = inputs[0].shape[0] if inputs[0].shape is not None else None
        if isinstance(mask.shape[0], int) and isinstance(batch, int) and mask.shape[0] != batch:
            raise _refuse(node, "takes a mask index of end and start positions")
        keys = b.Range(b.const(np.int64(0)), b.Gather(b.Shape(k), b.const(np.int64(1))), b.const(np.int64(1)))
        mask = b.Less(b.Unsqueeze(keys, b.const(np.array([0]))), b.Unsqueeze(b.Cast(mask, to=ir.DataType.INT64),
                                                                           b.const(np.array([1]))))
        mask.shape = ir.Shape([inputs[3].shape[0], k.shape[1] if k.shape is not None else None])
    return _explicit(b, node, q, k, v, key_mask=mask, bias=inputs[5], width=sizes[0])


def _three_dimensional(node: ir.Node) -> bool:
    return node.inputs[0].shape is not None and len(node.inputs[0].shape) == 3


def _heads_major(b: GraphBuilder, node: ir.Node) -> ir.Value:
    """The opset-23 Attention on [B, S, heads·d] inputs as the same op on [B, heads, S, d] views."""
    heads = [node.attributes.get_int(a, 0) for a in ("q_num_heads", "kv_num_heads")]
    if not all(heads):
        raise StructureError(f"Attention {node.name!r} takes 3-D inputs without q_num_heads / kv_num_heads")
    if any(x is not None for x in list(node.inputs)[4:]):
        raise StructureError(f"Attention {node.name!r} attends a past cache; token passes need the attention of one "
                             "pass over the tokens: give a model without a KV cache")
    views = [_heads(b, x, n) for x, n in zip(node.inputs[:3], (heads[0], heads[1], heads[1]))]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    attrs = {name: attr for name, attr in node.attributes.items() if name not in ("q_num_heads", "kv_num_heads")}
    out = b.op("Attention", [*views, mask], attrs)
    return b.Reshape(b.Transpose(out, perm=[0, 2, 1, 3]), b.const(np.array([0, 0, -1])))


def _heads(b: GraphBuilder, x: ir.Value, heads: int) -> ir.Value:
    """[B, S, heads·d] viewed [B, heads, S, d]."""
    return b.Transpose(b.Reshape(x, b.const(np.array([0, 0, heads, -1]))), perm=[0, 2, 1, 3])


def _explicit(b: GraphBuilder, node: ir.Node, q: ir.Value, k: ir.Value, v: ir.Value, *, key_mask: ir.Value | None,
              bias: ir.Value | None, width: int | None = None) -> ir.Value:
    """The attention of `node` (its num_heads, scale, unidirectional, mask_filter_value) on
    projected q, k, v [B, S, heads·d] as ops; returns its output [B, S, heads·d_v]."""
    heads = node.attributes.get_int("num_heads")
    width = width if width is not None else q.shape[2] if q.shape is not None else None
    scale = node.attributes.get_float("scale", 0.0)
    if not scale:
        if not isinstance(width, int):
            raise _refuse(node, "has no scale and a query width unknown")
        scale = (width // heads) ** -0.5
    if key_mask is not None and (key_mask.shape is None or len(key_mask.shape) != 2):
        raise _refuse(node, "takes a key mask other than [batch, keys]")
    q4, v4 = _heads(b, q, heads), _heads(b, v, heads)
    k4t = b.Transpose(b.Reshape(k, b.const(np.array([0, 0, heads, -1]))), perm=[0, 2, 3, 1])  # [B, H, d, L]
    dtype = q.dtype.numpy() if q.dtype is not None else np.float32  # a constant scale: analysis reads it
    scores = b.Mul(b.MatMul(q4, k4t), b.const(np.array(scale, dtype)))
    if bias is not None:
        scores = b.Add(scores, b.CastLike(bias, q))
    if key_mask is not None:  # 1 keeps a key, 0 adds mask_filter_value to its logits
        fill = node.attributes.get_float("mask_filter_value", -10000.0)
        masked = b.Sub(b.CastLike(b.const(np.float32(1.0)), q), b.CastLike(key_mask, q))
        scores = b.Add(scores, b.Unsqueeze(b.Mul(masked, b.CastLike(b.const(np.float32(fill)), q)),
                                           b.const(np.array([1, 2]))))
    if node.attributes.get_int("unidirectional", 0):  # query i sees the keys up to i (no past here)
        rows = b.Range(b.const(np.int64(0)), b.Gather(b.Shape(q), b.const(np.int64(1))), b.const(np.int64(1)))
        after = b.Greater(b.Unsqueeze(rows, b.const(np.array([0]))), b.Unsqueeze(rows, b.const(np.array([1]))))
        scores = b.Add(scores, b.Where(after, b.CastLike(b.const(np.float32(-np.inf)), q),
                                       b.CastLike(b.const(np.float32(0.0)), q)))
    context = b.MatMul(b.Softmax(scores, axis=-1), v4)  # [B, H, S, d_v]
    return b.Reshape(b.Transpose(context, perm=[0, 2, 1, 3]), b.const(np.array([0, 0, -1])))
