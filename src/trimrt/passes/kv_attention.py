"""Decoder attention as ONNX `Attention` on the KV cache (decoder builds on ONNX Runtime).

An exported decoder layer runs its attention as ~15 small ops (the past/new Concats,
transformers' `repeat_kv` copying every key / value head for its group of query heads,
a Transpose, two MatMuls, the scale, the mask Add, the Softmax), each RMSNorm as 7 and
each RoPE as 7: at a decode step every one of them is a kernel call on a one-token
tensor, together about as costly as the layer's arithmetic. Opset 23 has all three as
ops, which ONNX Runtime (>= 1.23) runs as CPU kernels. So the model is brought to opset
23 (onnxscript's version converter), each layer's attention becomes one
`Attention(q, k_new, v_new, mask, past_key, past_value)` (grouped heads natively: the cache
is never repeated; it returns the present key / value), and onnxscript's opset-23 rules
fuse RMSNormalization and RotaryEmbedding. Exact up to float rounding, and checked: the
rewritten graph must agree with the exported one on a decode step and on a prompt (as
ort_fusion checks), else only the grouping below is applied.

On ONNX Runtime the attention is then its GroupQueryAttention (the form tried first, checked
the same way): given a cache buffer bound as both past and present it writes a step's keys /
values into it in place; it applies the RoPE itself, from cos / sin tables over the model's
positions (its angle computation run once on 0 … max_positions − 1), reading every row's
position ids (`query_seqlens`, ONNX Runtime >= 1.32, which also lets a batch take several new
tokens on a past); and the packed-projections pass later feeds it Q/K/V as one tensor.

Where the keys do not come from a Concat of past and new (a layer whose attention
probabilities a token pruning op also reads), the query heads are grouped instead of the
cache repeated: q [B, H, S, d] viewed as [B, Hkv, G, S, d] is multiplied with the cache
[B, Hkv, 1, T, d] as it is (MatMul broadcasts the group axis without a copy).

Matched: Softmax(MatMul(q, kᵀ) [· c] + mask) · v, where kᵀ is the (repeated) keys with
their last two axes swapped (through Reshapes that keep those two axes, a Transpose that
swaps them, and constant scalings) and v is the (repeated) values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..runtime.kv_cache import ATTENTION_MASK
from .base import GraphBuilder, TrimrtPass

#: the first opset with Attention, RotaryEmbedding and RMSNormalization ops (ONNX Runtime >= 1.23)
ATTENTION_OPSET = 23
#: ONNX Runtime's contrib-op domain (GroupQueryAttention)
ORT_DOMAIN = "com.microsoft"
#: the fused forms tried in turn, fastest first: ONNX Runtime's GroupQueryAttention (writes a
#: decode step's key / value into the cache buffer in place when past and present share it),
#: then the opset-23 Attention (returns a new present: the cache is copied every step)
FUSED_FORMS = ("group_query", "attention")


@dataclass
class _Site:
    scores: ir.Node  # MatMul(q, kᵀ)
    add: ir.Node  # + mask
    mask: ir.Value  # [B | 1, 1 | H, S, T]
    softmax: ir.Node
    context: ir.Node  # MatMul(p, v)
    keys: ir.Value  # [B, Hkv, T, d]: what the repetition read
    values: ir.Value
    key_scales: list[ir.Value]  # constant factors on the keys' way to kᵀ
    after_scores: list[ir.Node]  # Mul / Div by a constant between the product and the mask
    steps: tuple  # the keys' way from the repetition to kᵀ (ops, permutations, factors)
    heads: int
    group: int
    head_dim: int


class KVAttentionPass(TrimrtPass):
    """Each decoder layer's attention as one ONNX Attention on its cache (RMSNorm and RoPE
    fused too), checked against the graph as exported; grouped query heads where not."""

    name = "kv_attention"

    def __init__(self, tokens: int = 32):
        super().__init__()
        self.tokens = tokens  # prompt length of the check (at least what the build accepts)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from ..compiler.decoder import DECODER_SPEC
        from ..compiler.source import owned_model
        from .ort_fusion import FUSION_TOLERANCE, relative_drift

        before = ir.serde.serialize_model(model)
        decoder = self.context.shared.get(DECODER_SPEC)
        positions = decoder.max_positions if decoder is not None else None  # RoPE tables' length
        drift, mode, failures = None, "grouped", []
        for candidate in FUSED_FORMS:  # the first form that runs and agrees with the export
            trial = owned_model(before)
            if not _rewrite_all(trial, candidate, positions)["attention_ops"]:
                break
            drift = relative_drift(before, ir.serde.serialize_model(trial), self.tokens, None, decoder=decoder)
            if drift is not None and drift <= FUSION_TOLERANCE:
                mode = candidate
                break
            failures.append("the rewritten graph does not run on ONNX Runtime" if drift is None else
                            f"the rewritten graph differs from the exported one (relative error {drift:.2g})")
        counts = _rewrite_all(model, mode, positions)  # the checked rewrite again, in place (or the grouping only)
        builder = self.builder(model.graph)
        for node in model.graph.all_nodes():  # the fused norms and RoPEs (onnxscript's rules made them) carry the pass tag too
            if node.domain in ("", "ai.onnx") and node.op_type in ("RMSNormalization", "RotaryEmbedding"):
                builder.stamp(node)
        details = {**counts, "max_relative_error": None if drift is None or mode == "grouped" else float(f"{drift:.3g}")}
        if failures:  # why a faster form was not kept
            details["reason"] = failures[0]
        self.record(details)
        return ir.passes.PassResult(model, modified=any(v for k, v in counts.items() if k != "opset"))


def _rewrite_all(model: ir.Model, mode: str, max_positions: int | None = None) -> dict:
    """Rewrite the attention sites of `model` in place (mode: one of FUSED_FORMS, or "grouped"):
    as attention ops on the cache, the model at opset 23 with RMSNorm and RoPE fused, else
    by grouping query heads."""
    fuse = mode in FUSED_FORMS
    softmaxes = [n for n in model.graph.all_nodes() if n.op_type == "Softmax"]  # an If branch's too
    sites = [s for s in map(_match, softmaxes) if s is not None]
    if sites:  # blocks a token pass reduced have lost their shapes: matched like a shaped one
        found = {id(s.softmax) for s in sites}
        sites += [s for n in softmaxes if id(n) not in found and (s := _match(n, sites[0])) is not None]
    cached = [s for s in sites if fuse and _cache_concat(s.keys) and _cache_concat(s.values)]
    geometry = {}  # Attention node name -> (heads, KV heads, head size)
    counts = {"opset": model.opset_imports.get("", 0), "attention_ops": len(cached), "grouped": 0}
    if cached:
        from onnxscript import version_converter
        from onnxscript.rewriter.rules.fusion import _rms_normalization, _rotary_embedding

        version_converter.convert_version(model, ATTENTION_OPSET)
        counts["opset"] = ATTENTION_OPSET
    for i, site in enumerate(sites):
        b = GraphBuilder(model.graph, KVAttentionPass.name, f"trimrt_attention_{i}")
        if any(site is c for c in cached):
            geometry[_attention(b, site).name] = (site.heads, site.heads // site.group, site.head_dim)
        elif site.group > 1:
            _grouped(b, site)
            counts["grouped"] += 1
    if cached:
        counts["rms_normalization"] = _rms_normalization.fuse_rms_normalization(model)
        counts["rotary_embedding"] = _rotary_embedding.fuse_rotary_embedding(model)
        # each fused RoPE computes its own Cos / Sin of the same angles: one pair is enough
        ir.passes.common.CommonSubexpressionEliminationPass()(model)
        attentions = [n for n in model.graph.all_nodes() if n.op_type == "Attention" and n.name.startswith("trimrt_attention")]
        group_query = _GroupQuery(max_positions) if mode == "group_query" else None
        counts["token_major"] = 0
        for n in attentions:
            b = GraphBuilder(model.graph, KVAttentionPass.name, f"{n.name}_bsd")
            if _token_major(b, n, group_query):
                counts["token_major"] += 1
            elif group_query is not None:  # heads-major (a pruned block's views lost their shapes): viewed for it
                _group_query_on_heads(b, n, geometry[n.name], group_query)
        if group_query is not None:
            counts["rotary_in_attention"] = group_query.rotary
        counts["kv_op"] = "GroupQueryAttention" if mode == "group_query" else "Attention"
        if counts["kv_op"] == "GroupQueryAttention":
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return counts


def _op(value: ir.Value | None, *types: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type in types and node.domain in ("", "ai.onnx") else None


def _ints(value: ir.Value | None) -> list[int] | None:
    const = None if value is None else value.const_value
    return None if const is None else [int(x) for x in np.asarray(const.numpy()).reshape(-1)]


def _scalar(value: ir.Value) -> bool:
    const = value.const_value
    return const is not None and const.size == 1 and np.issubdtype(const.numpy().dtype, np.floating)


def _scalar_value(value: ir.Value) -> float:
    """The number a `_scalar` constant holds."""
    return float(value.const_value.numpy().reshape(-1)[0])


def _repeated(value: ir.Value, shaped: bool = True) -> tuple[ir.Value, int | None] | None:
    """(the [B, Hkv, T, d] tensor, G) when `value` is Reshape(Expand(Unsqueeze(x, [2]))); G is
    read from the shapes (None when not `shaped`: the caller knows it from a shaped site)."""
    reshape = _op(value, "Reshape")
    expand = _op(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = _op(expand.inputs[0], "Unsqueeze") if expand else None
    if unsqueeze is None or _ints(unsqueeze.inputs[1]) != [2]:
        return None
    source, out = unsqueeze.inputs[0], expand.outputs[0]
    if not shaped:
        return source, None
    if source.shape is None or out.shape is None or len(source.shape) != 4 or len(out.shape) != 5:
        return None
    group = out.shape[2]
    return (source, group) if isinstance(group, int) and group > 1 else None


def _same(a, b) -> bool:
    return a == b if isinstance(a, int) or isinstance(b, int) else str(a) == str(b)


def _transposed_keys(value: ir.Value, shaped: bool) -> tuple[ir.Value, list[ir.Value], tuple] | None:
    """(the keys, constant factors, the steps) when `value` is the keys with the last two
    axes swapped: Reshapes keeping the last two axes (checked on the shapes when `shaped`),
    one Transpose swapping them, constant scalings. The keys are where the chain ends: a
    repetition of KV heads, or any other value once the axes were swapped."""
    scales, steps, swapped = [], [], False
    for _ in range(8):
        node = _op(value, "Reshape", "Transpose", "Mul")
        if node is None or (node.op_type == "Reshape" and _repeated(value, shaped=False) is not None):
            break
        src = node.inputs[0]
        if node.op_type == "Mul":
            if not _scalar(node.inputs[1]):
                return None
            scales.append(node.inputs[1])
            steps.append(("Mul", _scalar_value(node.inputs[1])))
        elif node.op_type == "Transpose":
            perm = list(node.attributes.get_ints("perm", []))
            rank = len(perm)
            if swapped or rank < 2 or perm != [*range(rank - 2), rank - 1, rank - 2]:
                return None
            swapped = True
            steps.append(("Transpose", tuple(perm)))
        else:
            if shaped and (src.shape is None or value.shape is None or len(src.shape) < 2 or len(value.shape) < 2
                           or not all(_same(a, b) for a, b in zip(list(src.shape)[-2:], list(value.shape)[-2:]))):
                return None
            steps.append(("Reshape",))
        value = src
    return (value, scales, tuple(steps)) if swapped else None


def _broadcast_heads(mask: ir.Value) -> bool:
    """The mask has one head (axis 1 of size 1), by its shape or by an Unsqueeze that made the axis."""
    if mask.shape is not None:
        return len(mask.shape) == 4 and mask.shape[1] == 1
    made = _op(mask, "Unsqueeze")
    return made is not None and 1 in (_ints(made.inputs[1]) or [])


def _heads(value: ir.Value, shaped: bool) -> tuple[ir.Value, int | None]:
    """(the [B, Hkv, T, d] tensor, G) of keys or values: what a KV-head repetition read
    (G read from its shape, None when not `shaped`), else `value` itself (G = 1)."""
    return _repeated(value, shaped) or _repeated(value, False) or (value, 1)


def _match(softmax: ir.Node, template: _Site | None = None) -> _Site | None:
    """The attention around `softmax`, its geometry read from the shapes; or, with a
    `template` (a site of the same graph matched on its shapes), one built like it: the
    blocks after a token reduction, whose shapes were dropped, take its geometry."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3) or len(softmax.outputs[0].uses()) != 1:
        return None
    add = _op(softmax.inputs[0], "Add")
    if add is None:
        return None
    for scores_in, mask in (add.inputs, tuple(reversed(add.inputs))):
        after, value = [], scores_in
        while (node := _op(value, "Mul", "Div")) is not None and _scalar(node.inputs[1]):
            after.append(node)
            value = node.inputs[0]
        scores = _op(value, "MatMul")
        if scores is not None:
            break
    else:
        return None
    (context, _), = softmax.outputs[0].uses()
    if context.op_type != "MatMul" or context.inputs[0] is not softmax.outputs[0] or not _broadcast_heads(mask) \
            or not all(len(v.uses()) == 1 for v in (*add.outputs, *scores.outputs)):
        return None
    shaped = template is None
    keys = _transposed_keys(scores.inputs[1], shaped)
    if keys is None:
        return None
    (key_source, group), (_, key_scales, steps) = _heads(keys[0], shaped), keys
    value_source, value_group = _heads(context.inputs[1], shaped)
    common = (scores, add, mask, softmax, context, key_source, value_source, key_scales, after[::-1], steps)
    if template is not None:  # built like the template: its geometry
        if steps != template.steps or [n.op_type for n in after] != [n.op_type for n in template.after_scores] \
                or (group is None) != (template.group > 1):
            return None
        return _Site(*common, template.heads, template.group, template.head_dim)
    q = scores.inputs[0]
    if q.shape is None or len(q.shape) != 4 or key_source.shape is None or value_source.shape is None \
            or len(key_source.shape) != 4 or len(value_source.shape) != 4:
        return None
    heads, head_dim = q.shape[1], q.shape[3]
    if not (isinstance(heads, int) and isinstance(head_dim, int) and value_group == group
            and key_source.shape[1] == value_source.shape[1] and heads == key_source.shape[1] * group):
        return None
    return _Site(*common, heads, group, head_dim)


def _cache_concat(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(past, new) when `value` is the present cache: Concat(past, new) on the token axis."""
    node = _op(value, "Concat")
    if node is None or len(node.inputs) != 2 or node.attributes.get_int("axis", 0) not in (2, -2):
        return None
    return node.inputs[0], node.inputs[1]


def _scale(site: _Site) -> float:
    """The product of the constant factors on the keys' way and on the scores."""
    scale = 1.0
    for value in site.key_scales:
        scale *= _scalar_value(value)
    for node in site.after_scores:
        factor = _scalar_value(node.inputs[1])
        scale = scale * factor if node.op_type == "Mul" else scale / factor
    return scale


def _attention(b, site: _Site) -> ir.Node:
    """One Attention on the cache in place of the site; its present key / value replace the
    Concats' (graph outputs keep their names). Returns the node."""
    (past_key, new_key), (past_value, new_value) = _cache_concat(site.keys), _cache_concat(site.values)
    out, present_key, present_value = b.op_multi_out(
        "Attention", [site.scores.inputs[0], new_key, new_value, site.mask, past_key, past_value],
        {"scale": _scale(site)}, num_outputs=3)
    was = site.context.outputs[0]
    out.shape, out.dtype = was.shape, was.dtype
    b.insert_before(site.context)
    ir.convenience.replace_all_uses_with(was, out, replace_graph_outputs=True)  # an If branch's output (sparse_attention)
    for old, new in ((site.keys, present_key), (site.values, present_value)):
        new.shape, new.dtype = old.shape, old.dtype
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = f"{name}_unfused", name
    return out.producer()


def _heads_view(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(x [B, S, heads·d], heads) when `value` is x viewed as heads: Transpose(Reshape(x, [B, S,
    heads, d]), [0, 2, 1, 3]), each step used once."""
    transpose = _op(value, "Transpose")
    reshape = _op(transpose.inputs[0], "Reshape") if transpose is not None else None
    if reshape is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3] \
            or any(len(v.uses()) != 1 for v in (value, reshape.outputs[0])):
        return None
    source, shape = reshape.inputs[0], reshape.outputs[0].shape
    if source.shape is None or len(source.shape) != 3 or shape is None or len(shape) != 4 \
            or not isinstance(shape[2], int) or not isinstance(shape[3], int):
        return None
    width = source.shape[2]
    return (source, shape[2]) if not isinstance(width, int) or width == shape[2] * shape[3] else None


class _GroupQuery:
    """What the GroupQueryAttention rewrites of one model share: the sequence-length inputs
    (made once per mask and graph, see _lengths_for), the RoPE tables (once per angle
    computation), and counts."""

    def __init__(self, max_positions: int | None):
        self.max_positions = max_positions  # RoPE tables' length (None: no table, RoPE stays apart)
        self.lengths: dict = {}
        self.tables: dict = {}
        self.rotary = 0  # layers whose RoPE the attention applies

    def tables_of(self, rope: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value] | None:
        key = (id(rope.inputs[1]), id(rope.inputs[2]))
        if key not in self.tables:
            self.tables[key] = None if self.max_positions is None else _rotary_tables(
                rope, self.max_positions, f"trimrt_rope_table_{len(self.tables)}")
        return self.tables[key]


def _token_major(b, attention: ir.Node, group_query: _GroupQuery | None) -> bool:
    """Run an Attention (and the RoPEs before it) on the projections as they come, [B, S, heads·d],
    instead of viewed as [B, heads, S, d]: the Reshapes and Transposes around every layer's
    attention go (opset-23 Attention and RotaryEmbedding take 3-D inputs given their head
    counts). Given `group_query`, the attention becomes ONNX Runtime's GroupQueryAttention,
    which takes the same inputs and, given a cache buffer shared by past and present, writes
    the new keys / values into it instead of copying the cache, and applies the RoPE itself
    (from tables over the model's positions): no RoPE kernels of their own.
    False, graph unchanged, when the layer is not in that form."""
    q, k, v, mask, past_key, past_value = attention.inputs
    scale = attention.attributes.get_float("scale", 1.0)
    if (mul := _op(q, "Mul")) is not None and _scalar(mul.inputs[1]) and len(q.uses()) == 1:
        scale *= _scalar_value(mul.inputs[1])
        q = mul.inputs[0]
    uses = list(attention.outputs[0].uses())
    after = uses[0].node if len(uses) == 1 else None  # the view back: Transpose, then Reshape to [B, S, H·d]
    if after is None or after.op_type != "Transpose" or list(after.attributes.get_ints("perm", [])) != [0, 2, 1, 3] \
            or len(after.outputs[0].uses()) != 1:
        return False
    merge = list(after.outputs[0].uses())[0].node  # [B, S, H, d] -> [B, S, H·d] (or [B·S, H·d]: GPT-2's Conv1D)
    if merge.op_type != "Reshape" or merge.inputs[0] is not after.outputs[0]:
        return False
    inputs = []
    for value in (q, k, v):
        rope = _op(value, "RotaryEmbedding")
        if rope is not None and (len(value.uses()) != 1 or len(rope.inputs) != 3
                                 or rope.attributes.get_int("interleaved", 0) or rope.attributes.get_int("rotary_embedding_dim", 0)):
            return False
        view = _heads_view(rope.inputs[0] if rope is not None else value)
        if view is None:
            return False
        inputs.append((view, rope))
    (q3, heads), (k3, kv_heads), (v3, _) = (view for view, _ in inputs)
    ropes = [rope for _, rope in inputs]
    if group_query is not None:
        y, present_key, present_value = _group_query(b, (q3, k3, v3), ropes, heads, kv_heads, scale,
                                                     mask, past_key, past_value, group_query, attention.graph)
    else:
        rotated = [b.op("RotaryEmbedding", [x, *rope.inputs[1:]], {"num_heads": n}) if rope is not None else x
                   for (x, n), rope in zip(((q3, heads), (k3, kv_heads), (v3, kv_heads)), ropes)]
        y, present_key, present_value = b.op_multi_out(
            "Attention", [*rotated, mask, past_key, past_value],
            {"scale": scale, "q_num_heads": heads, "kv_num_heads": kv_heads}, num_outputs=3)
    y.shape, y.dtype = ir.Shape([*list(q3.shape)[:2], q3.shape[2]]), q3.dtype
    b.insert_before(attention)
    merge.replace_input_with(0, y)  # the same data in the same order: [B, S, H, d] is [B, S, H·d]
    if _same_shape(merge.outputs[0].shape, y.shape) and not merge.outputs[0].is_graph_output():
        ir.convenience.replace_all_uses_with(merge.outputs[0], y)  # a view of y as itself: no kernel for it
    for old, new in zip(attention.outputs[1:], (present_key, present_value)):
        new.shape, new.dtype = old.shape, old.dtype
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = f"{name}_heads_major", name
    return True


def _group_query(b, qkv: tuple, ropes: list, heads: int, kv_heads: int, scale: float, mask: ir.Value,
                 past_key: ir.Value, past_value: ir.Value, group_query: _GroupQuery, scope: ir.Graph) -> list[ir.Value]:
    """GroupQueryAttention on q, k, v [B, S, heads·d] (each RoPE'd where `ropes` says), with the
    RoPE applied by the op where q and k share one whose tables could be made. Returns its
    three outputs."""
    rotary = None
    q_rope, k_rope, v_rope = ropes
    if q_rope is not None and k_rope is not None and v_rope is None \
            and all(a is c for a, c in zip(q_rope.inputs[1:], k_rope.inputs[1:])):
        rotary = group_query.tables_of(q_rope)
    if rotary is None:  # the RoPEs stay ops of their own
        qkv = tuple(b.op("RotaryEmbedding", [x, *rope.inputs[1:]], {"num_heads": n}) if rope is not None else x
                    for x, n, rope in zip(qkv, (heads, kv_heads, kv_heads), ropes))
    else:
        group_query.rotary += 1
    total, seqlens, new_tokens = _lengths_for(b, mask, qkv[0], past_key, group_query, scope)
    cos, sin, positions = rotary if rotary is not None else (None, None, None)
    return b.op_multi_out(
        "GroupQueryAttention",
        [*qkv, past_key, past_value, seqlens, total, cos, sin,
         positions, mask, None, None, None, None, None, new_tokens],
        {"scale": scale, "num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": int(rotary is not None)},
        num_outputs=3, domain=ORT_DOMAIN)


def _rotary_tables(rope: ir.Node, positions: int, prefix: str) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(cos table, sin table [positions, d/2], the position ids) for a RoPE whose cos / sin are
    computed from one position-id input alone by standard ops: that computation run once on
    0 … positions − 1 (GroupQueryAttention reads its tables by position id). None when the
    angles read anything else (dynamic RoPE scaling reads the sequence length), or do not
    come out one row per position (checked on a few positions out of order)."""
    from ..compiler.onnx_runner import OnnxRunner

    cos, sin = rope.inputs[1], rope.inputs[2]
    nodes, leaves, seen, stack = {}, {}, set(), [cos, sin]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            if value.const_value is None:
                leaves[id(value)] = value
        elif node.domain not in ("", "ai.onnx") or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        else:
            nodes[id(node)] = node
            stack.extend(v for v in node.inputs if v is not None)
    if len(leaves) != 1:
        return None
    (ids,) = leaves.values()
    if not ids.is_graph_input() or ids.dtype != ir.DataType.INT64 or ids.shape is None or len(ids.shape) != 2:
        return None
    graph = rope.graph
    order = [n for n in graph if id(n) in nodes]
    copies = {}

    def copy(value):
        if value is not None and id(value) not in copies:
            copies[id(value)] = ir.Value(name=value.name, type=value.type, shape=value.shape,
                                         const_value=value.const_value if value is not ids else None)
        return None if value is None else copies[id(value)]

    made = []
    for node in order:
        new = ir.Node(node.domain, node.op_type, [copy(v) for v in node.inputs],
                      attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                      num_outputs=len(node.outputs))
        for old, out in zip(node.outputs, new.outputs):
            out.name = old.name
            copies[id(old)] = out
        made.append(new)
    constants = [copies[i] for i in list(copies) if copies[i].const_value is not None and copies[i].producer() is None]
    sub = ir.Model(ir.Graph([copy(ids)], [copies[id(cos)], copies[id(sin)]], nodes=made, initializers=constants,
                            opset_imports=dict(graph.opset_imports)), ir_version=10)
    try:
        runner = OnnxRunner(ir.serde.serialize_model(sub), [cos.name, sin.name], replace=True)
        full = runner.run({ids.name: np.arange(positions, dtype=np.int64)[None]})
        probe = np.array([[positions - 1, 3 % positions, 0, positions // 2]], np.int64)
        some = runner.run({ids.name: probe})
    except Exception:  # noqa: BLE001 - any failure: the RoPE stays apart
        return None
    tables = [full[cos.name], full[sin.name]]
    if any(t.shape[:2] != (1, positions) or t.ndim != 3 for t in tables) \
            or not all(np.allclose(some[v.name][0], t[0][probe[0]], atol=1e-6) for v, t in zip((cos, sin), tables)):
        return None
    b = GraphBuilder(graph, KVAttentionPass.name, prefix)
    return b.const(tables[0][0]), b.const(tables[1][0]), ids


def _group_query_on_heads(b, attention: ir.Node, geometry: tuple[int, int, int], group_query: _GroupQuery) -> None:
    """A heads-major Attention ([B, heads, S, d]) as GroupQueryAttention on views of its inputs
    as [B, S, heads·d] (and of its output back): a few view kernels more than the token-major
    form, but the cache written in place like every other layer's."""
    q, k, v, mask, past_key, past_value = attention.inputs
    heads, kv_heads, head_dim = geometry
    flat = b.const(np.array([0, 0, -1]))
    q3, k3, v3 = (b.op("Reshape", [b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), flat]) for x in (q, k, v))
    y, present_key, present_value = _group_query(b, (q3, k3, v3), [None] * 3, heads, kv_heads,
                                                 attention.attributes.get_float("scale", head_dim ** -0.5),
                                                 mask, past_key, past_value, group_query, attention.graph)
    out = b.op("Transpose", [b.op("Reshape", [y, b.const(np.array([0, 0, heads, head_dim]))])], {"perm": [0, 2, 1, 3]})
    out.shape, out.dtype = attention.outputs[0].shape, attention.outputs[0].dtype
    b.insert_before(attention)
    ir.convenience.replace_all_uses_with(attention.outputs[0], out, replace_graph_outputs=True)
    for old, new in zip(attention.outputs[1:], (present_key, present_value)):
        new.shape, new.dtype = old.shape, old.dtype
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name, new.name = f"{name}_heads_major", name


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Statically equal shapes (same rank, each dimension the same number or symbol)."""
    return a is not None and b is not None and len(a) == len(b) and all(
        _same(x, y) and x is not None for x, y in zip(a, b))


def _lengths_for(b, mask: ir.Value, q: ir.Value, past_key: ir.Value, group_query: _GroupQuery,
                 scope: ir.Graph) -> tuple[ir.Value, ...]:
    """_sequence_lengths for an attention in `scope`. In an If branch of the graph `b` builds in
    (a sparse prompt's decode path) they are made before that If, shared with every layer,
    when all they read comes from outside the branch: made in each branch they cost a
    decode step ~9 small kernels a layer."""
    outer = b.graph
    owner = None if scope is outer else next(
        (n for n in outer if any(a.type == ir.AttributeType.GRAPH and a.value is scope for a in n.attributes.values())),
        None)
    if owner is None or any(v.producer() is not None and v.producer().graph is not outer for v in (mask, q, past_key)):
        return _sequence_lengths(b, mask, q, past_key, group_query.lengths.setdefault(id(scope), {}))
    home = GraphBuilder(outer, KVAttentionPass.name, f"{b.prefix}_lengths")
    made = _sequence_lengths(home, mask, q, past_key, group_query.lengths.setdefault(id(outer), {}))
    if home.nodes:
        home.insert_before(owner)
    return made


def _sequence_lengths(b, mask: ir.Value, q: ir.Value, past_key: ir.Value, made: dict) -> tuple[ir.Value, ...]:
    """GroupQueryAttention's total_sequence_length (int32 scalar), seqlens_k (int32 [B], total - 1
    in every row: the cache keeps the positional layout of the mask, whose additive bias
    masks the padding) and query_seqlens (int32 [B], the step's token count in every row: with
    it the op takes several new tokens on a past for a whole batch, and reads every row's
    position ids in a prompt). The total is the mask's width (past + new tokens, whatever the
    past buffer's length: the cache may be a shared buffer with room to spare); a mask known
    to be broadcast over the keys gives none, and then the past's length plus the new tokens'
    count does (the compile check rejects the form if a mask of unknown shape was broadcast).
    Made once per mask (`made`), for every layer that shares it."""
    from_mask = mask.shape is None or (len(mask.shape) == 4 and mask.shape[3] != 1)
    key = id(mask) if from_mask else (id(mask), id(past_key))
    if key in made:
        return made[key]
    int32 = {"to": ir.DataType.INT32}
    tokens = b.op("Shape", [q], {"start": 1, "end": 2})
    if from_mask:
        width = b.op("Shape", [mask], {"start": 3, "end": 4})
    else:
        width = b.op("Add", [b.op("Shape", [past_key], {"start": 2, "end": 3}), tokens])
    width = b.op("Cast", [width], int32)
    total = b.op("Squeeze", [width, b.const(np.array([0]))])
    # the batch from the graph's attention_mask when it has one (else from this layer's queries)
    batch = b.op("Shape", [next((v for v in b.graph.inputs if v.name == ATTENTION_MASK), q)], {"start": 0, "end": 1})
    seqlens = b.op("Expand", [b.op("Sub", [width, b.const(np.array([1], np.int32))]), batch])
    new_tokens = b.op("Expand", [b.op("Cast", [tokens], int32), batch])
    made[key] = total, seqlens, new_tokens
    return made[key]


def _grouped(b, site: _Site) -> None:
    """Insert the grouped attention before the context product and reroute its uses."""
    kv = site.heads // site.group
    grouped = b.op("Reshape", [site.scores.inputs[0], b.const(np.array([0, kv, site.group, -1, site.head_dim]))])
    axis = b.const(np.array([2]))
    keys = b.op("Transpose", [b.op("Unsqueeze", [site.keys, axis])], {"perm": [0, 1, 2, 4, 3]})
    for scale in site.key_scales:
        keys = b.op("Mul", [keys, scale])
    scores = b.op("MatMul", [grouped, keys])  # [B, Hkv, G, S, T]
    for node in site.after_scores:
        scores = b.op(node.op_type, [scores, node.inputs[1]])
    probs = b.op("Softmax", [b.op("Add", [scores, b.op("Unsqueeze", [site.mask, axis])])], {"axis": -1})
    out = b.op("MatMul", [probs, b.op("Unsqueeze", [site.values, axis])])  # [B, Hkv, G, S, d]
    out = b.op("Reshape", [out, b.const(np.array([0, site.heads, -1, site.head_dim]))])
    was = site.context.outputs[0]
    out.shape, out.dtype = was.shape, was.dtype
    b.insert_before(site.context)
    ir.convenience.replace_all_uses_with(was, out, replace_graph_outputs=True)
