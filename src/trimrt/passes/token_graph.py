"""What every token-reducing pass does around its op: the shared graph surgery.

A token-reducing pass (pruning, merging) picks, at some blocks, a point on the residual
stream, inserts its op there and routes every later use of the stream to the op's
output. Around that, the same work is always needed, and lives here:

- the attention pieces the ops read: Kᵀ with grouped KV heads repeated, the additive
  mask as the block sees it, head-mean keys (the similarity metric of ToMe and
  Zero-TPrune), the full attention probabilities;
- tensors that travel with the tokens (masks, RoPE tables) gathered with the op's
  index output, and shape arithmetic that baked the original count re-derived;
- per-key biases added to the attention logits of later blocks (ToMe's log(size),
  the validity mask of adaptive pruning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Attention, TransformerMap, structure_of
from ..compiler.decoder import DECODER_SPEC
from ..compiler.probe import TokenDims
from ..errors import RecipeError, StructureError
from ..runtime.kv_cache import ATTENTION_MASK, KINDS, past_name, present_name
from . import token_shapes
from .base import GraphBuilder, TrimrtPass
from .token_shapes import (
    ORIGINAL_COUNT_MARK,
    downstream_nodes,
    gather_tokens,
    rederive_shape_values,
    travelling_values,
)

#: additive bias of a key no query may attend (finite, so sums with other masks stay finite)
BLOCKED = -1e9


class TokenGraphPass(TrimrtPass):
    """Base of the token-reducing passes: the model's structure, read from the pipeline's
    context, and a per-call `TokenRewrite` holding the shared graph surgery."""

    exact = False

    def __init__(self, options):
        super().__init__()
        self.options = options

    def _rewrite(self, model: ir.Model, layers) -> TokenRewrite:
        """The structure (analysed once per compile, see structure_of), checked for a token-level
        rewrite of `layers`: the blocks exist, the stream is [batch, tokens, width], the count
        is known."""
        table = self.recipe_table
        tmap = structure_of(model, self.context.shared)
        tmap.require_serial()
        depth = len(tmap.blocks)
        bad = [i for i in layers if i >= depth]
        if bad:
            raise RecipeError(f"[{table}] layers {bad} do not exist: the model has {depth} blocks (0..{depth - 1})")
        if tmap.token_axis != 1:
            raise StructureError(f"[{table}] needs the residual stream as [batch, tokens, width]; "
                                 f"found token axis {tmap.token_axis}")
        if tmap.num_tokens is None:
            raise StructureError("token count unknown: the residual stream has no shape on its token axis")
        return TokenRewrite(self, model.graph, tmap, decoder=self.context.shared.get(DECODER_SPEC))


@dataclass
class TokenRewrite:
    """One run of a token-reducing pass on one graph: its per-call state (the tensors
    already gathered, the travelling ones) and the surgery around the pass's op."""

    owner: TrimrtPass
    graph: ir.Graph
    tmap: TransformerMap
    #: token axes of the original graph's values (probed when dynamic)
    dims: TokenDims | None = None
    #: tensors that travel with the tokens: {original: (rank, token axes)}; None before the first reduction
    aligned: dict | None = None
    #: each travelling tensor's latest version (gathered by the reductions so far)
    gathered: dict = field(default_factory=dict)
    #: the DecoderSpec of a KV-cache graph (its reductions prune the prompt: see prompt_only)
    decoder: Any = None

    def builder(self, prefix: str) -> GraphBuilder:
        return self.owner.builder(self.graph, prefix)

    def stream_uses(self, stream: ir.Value, layer: int) -> list:
        """The uses of `stream` to reroute, taken before the pass adds its own."""
        if stream.is_graph_output():
            raise StructureError(f"the stream at block {layer} is a graph output; cannot reduce its tokens")
        return list(stream.uses())

    def replace_stream(self, b: GraphBuilder, stream: ir.Value, uses: list, out: ir.Value) -> None:
        """Insert the nodes of `b` after the producer of `stream` and route the earlier `uses` to `out`."""
        b.insert_after(stream.producer())
        for user, idx in uses:
            user.replace_input_with(idx, out)

    def prompt_only(self, b: GraphBuilder, stream: ir.Value, out: ir.Value, index: ir.Value,
                    per_token: ir.Value | None = None) -> tuple[ir.Value, ...]:
        """A KV-cache decoder reduces its prompt only: the nodes `b` collected (the score and
        selection ops) become the then-branch of an If on an empty past; a step with a past
        keeps its new tokens (the stream as it is, positions 0..N-1). Returns the If's
        (stream, kept index), and `per_token` too when given (a [B, N] float of the prompt,
        zeros at a step: what a later site's branch reads, e.g. a router's scores)."""
        then = ir.Graph([], [out, index] + ([per_token] if per_token is not None else []), nodes=b.nodes,
                        name=f"{b.prefix}_prompt")
        b.discard()

        def keep_all(sub, *_):
            positions = sub.Range(sub.Constant(value_int=0), sub.Squeeze(sub.Shape(stream, start=1, end=2)),
                                  sub.Constant(value_int=1))
            rows = sub.Shape(stream, start=0, end=2)
            kept = [sub.Identity(stream), sub.Expand(positions, rows)]
            return kept + ([sub.CastLike(sub.ConstantOfShape(rows), stream)] if per_token is not None else [])

        outputs = [(f"{b.prefix}_step_tokens", stream.dtype, None), (f"{b.prefix}_step_index", ir.DataType.INT64, None)]
        if per_token is not None:
            outputs.append((f"{b.prefix}_step_per_token", stream.dtype, None))
        keep = b.subgraph(f"{b.prefix}_step", [], keep_all, outputs)
        # no past: the mask is as wide as the step's tokens (the past's length would not tell: a
        # shared cache buffer is longer than the past it holds); both full counts, never re-derived
        width = b.op("Shape", [self._graph_input(ATTENTION_MASK)], {"start": 1, "end": 2}, name=f"{b.prefix}_width")
        tokens = b.op("Shape", [self._graph_input(self.decoder.token_input)], {"start": 1, "end": 2},
                      name=f"{b.prefix}_tokens")
        for value in (width, tokens):
            value.producer().metadata_props[ORIGINAL_COUNT_MARK] = "1"
        empty = b.op("Equal", [width, tokens], name=f"{b.prefix}_is_prompt")
        results = b.op_multi_out("If", [empty], {"then_branch": then, "else_branch": keep}, num_outputs=len(outputs),
                                 name=f"{b.prefix}_prompt_only")
        for value, (_, dtype, _) in zip(results, outputs):
            value.dtype = dtype
        return tuple(results)

    def own_lengths(self, first: int, removed: int | None, last: int | None = None) -> None:
        """A KV-cache decoder's blocks from `first` on (to `last`, inclusive, when given: a
        routed block alone) run on the reduced prompt: they attend
        with a causal mask of their own lengths (query i sees the reduced past and the new
        tokens up to itself: the graph's mask over the full past does not travel with the
        tokens, so padding is not supported; the runtime refuses padded prompts for such
        builds), and their past / present caches get their own length symbols. Their past
        holds `removed` tokens fewer than the mask's past (None: not known when compiled);
        fed a shared cache buffer, longer than any past, they count their past so."""
        blocks = self.tmap.blocks
        if first >= len(blocks):
            return
        attn = blocks[first].attention
        current = self.gathered.get(attn.mask, attn.mask)
        if attn.core.op_type != "Softmax" or attn.mask is None:
            raise StructureError("token pruning in a KV-cache decoder needs attention written as "
                                 "Softmax(q·kᵀ·scale + mask); this export fuses it")
        prefix = f"trimrt_{self.owner.name}_causal{first}"
        b = self.builder(prefix)
        queries = b.op("Shape", [attn.q], {"start": 2, "end": 3}, name=f"{prefix}_queries")
        # keys = the block's own past + the new tokens (read from the past input, not from the
        # keys: their repeated GQA heads would stay alive for it)
        own_past = b.op("Shape", [self._graph_input(past_name(first, KINDS[0]))], {"start": 2, "end": 3},
                        name=f"{prefix}_own_past")
        if removed is not None:  # a buffer longer than the mask's past is a shared one: its held tokens count
            width = b.op("Shape", [self._graph_input(ATTENTION_MASK)], {"start": 1, "end": 2}, name=f"{prefix}_width")
            width.producer().metadata_props[ORIGINAL_COUNT_MARK] = "1"  # the full count: never re-derived
            mask_past = b.op("Sub", [width, queries], name=f"{prefix}_mask_past")
            held = b.op("Sub", [mask_past, b.const(np.array([removed]), name=f"{prefix}_removed")],
                        name=f"{prefix}_held")
            own_past = b.op("Where", [b.op("Greater", [own_past, mask_past], name=f"{prefix}_shared"), held, own_past],
                            name=f"{prefix}_own_past_held")
        keys = b.op("Add", [own_past, queries], name=f"{prefix}_keys")
        zero, one = (b.const(np.array(i), name=f"{prefix}_{i}") for i in (0, 1))
        rows = b.op("Range", [zero, b.op("Squeeze", [queries], name=f"{prefix}_nq"), one], name=f"{prefix}_rows")
        cols = b.op("Range", [zero, b.op("Squeeze", [keys], name=f"{prefix}_nk"), one], name=f"{prefix}_cols")
        last_key = b.op("Add", [b.op("Unsqueeze", [rows, b.const(np.array([1]), name=f"{prefix}_ax1")],
                                     name=f"{prefix}_rows_col"), own_past], name=f"{prefix}_last_key")
        allowed = b.op("LessOrEqual", [cols, last_key], name=f"{prefix}_allowed")  # [Nq, Nk]
        mask = _bool_to_additive(b, allowed, prefix, "")
        mask = b.op("Unsqueeze", [mask, b.const(np.array([0, 1]), name=f"{prefix}_ax01")], name=f"{prefix}_mask4")
        mask.producer().metadata_props[CAUSAL_MASK_MARK] = "1"
        b.insert_before(_mask_consumer(attn, current))
        for j in range(first, len(blocks) if last is None else last + 1):
            consumer = _mask_consumer(blocks[j].attention, current)
            consumer.replace_input_with(list(consumer.inputs).index(current), mask)
            for kind in KINDS:
                for value, what in ((self._graph_input(past_name(j, kind)), "past"),
                                    (self._graph_output(present_name(j, kind)), "total")):
                    dims = list(value.shape)
                    dims[2] = ir.SymbolicDim(f"{what}_sequence_length_from_layer{first}")
                    value.shape = ir.Shape(dims)
        self.gathered[attn.mask] = mask  # what the score ops of later reductions read

    def _graph_input(self, name: str) -> ir.Value:
        return next(v for v in self.graph.inputs if v.name == name)

    def _graph_output(self, name: str) -> ir.Value:
        return next(v for v in self.graph.outputs if v.name == name)

    def finish(self, reduced: list[ir.Value], n_orig, n_final, regions: list[set] | None = None) -> dict:
        """After the last of the reductions `reduced`: free the counts baked downstream (in
        `regions`, one per reduction, where the reduced tokens end before the graph does),
        drop the stale shapes; returns the report entries every token pass gives."""
        rewritten = (token_shapes.free_token_count(self.owner.builder(self.graph), reduced, n_orig, self.dims, regions)
                     if isinstance(n_orig, int) else 0)
        clear_stale_shapes(self.graph, reduced[:1], n_orig, n_final)
        return {"travelling_tensors": sorted(v.name for v in self.aligned), "shape_constants_rewritten": rewritten}

    def bias_later_attention(self, biases: list) -> None:
        """biases: (layer, key bias [B, N] valid after that layer's reduction). Each applies to
        the attention of the blocks after its layer, up to and including the next reducing
        layer (whose attention runs before its own reduction)."""
        blocks = self.tmap.blocks
        for i, (layer, bias) in enumerate(biases):
            last = biases[i + 1][0] if i + 1 < len(biases) else len(blocks) - 1
            for b in range(layer + 1, last + 1):
                prefix = f"trimrt_{self.owner.name}_{layer}_bias_block{b}"
                add_key_bias(self.builder(prefix), blocks[b].attention, bias, prefix)

    def weight_pooling(self, size: ir.Value) -> list[str]:
        """Per-token weights that travel with the tokens into a weighted sum — the mask
        of a masked mean pooling, [B, N, 1] — are multiplied by the final size, so the
        pooled mean counts a merged token as the tokens it holds (Σ m·s·x / Σ m·s), as
        proportional attention does inside the blocks. Recognised: a float tensor with
        only the token axis (and batch) non-trivial, used only by Mul / ReduceSum."""
        weighted = []
        for value, (rank, axes) in (self.aligned or {}).items():
            current = self.gathered.get(value)
            if (current is None or axes != [1] or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
                    or value.shape is None or any(d != 1 for d in list(value.shape)[2:])):
                continue
            uses = list(current.uses())
            if not uses or any(user.op_type not in ("Mul", "ReduceSum") for user, _ in uses):
                continue
            prefix = f"trimrt_pool_{len(weighted)}"
            b = self.builder(prefix)
            s = size
            if rank > 2:
                s = b.op("Unsqueeze", [size, b.const(np.arange(2, rank, dtype=np.int64), name=f"{prefix}_axes")],
                         name=f"{prefix}_size")
            like = b.op("CastLike", [s, current], name=f"{prefix}_size_cast")
            mul = b.op("Mul", [current, like], name=f"{prefix}_weighted")
            self.replace_stream(b, current, uses, mul)  # `current` is a gather the pass made
            weighted.append(value.name)
        return weighted

    def follow_tokens(self, out: ir.Value, index: ir.Value, layer: int, first_reduced: int | None = None,
                      region: list[ir.Node] | None = None) -> int:
        """After a reduction at `out` (index: positions kept, into the previous tokens):
        gather the tensors that travel with the tokens for the nodes downstream (or in
        `region`, where the reduced tokens end: a routed block), and re-derive shape
        arithmetic (in a KV-cache decoder, lengths read from the past of blocks before
        `first_reduced` become those of its own past; of every other block, in a `region`,
        which alone has its length). Returns the number of values re-derived."""
        alone = region is not None  # a routed block: the only one at its length
        region = downstream_nodes(self.graph, [out]) if region is None else region
        dims = self.dims
        if self.aligned is None:  # first reduction: find what travels with the tokens
            self.aligned = travelling_values(region, {out}, dims)
        self._gather_side_tensors(region, index, layer)
        name = f"trimrt_reduce_{layer}_shape"
        depth = len(self.tmap.blocks)
        swap = {}
        if self.decoder is not None and first_reduced < depth:
            others = [i for i in range(depth) if i != first_reduced] if alone else range(first_reduced)
            swap = self.own_past(first_reduced, others)
        return rederive_shape_values(self.builder(name), region, dims, out, name, swap)

    def own_past(self, layer: int, others) -> dict[ir.Value, ir.Value]:
        """{each past input of the blocks `others`: block `layer`'s own} in a KV-cache decoder:
        the exporter reads every block's past length from any block's past, and a block
        that caches fewer tokens (or runs after one that does) must read its own."""
        if self.decoder is None:
            return {}
        return {self._graph_input(past_name(i, kind)): self._graph_input(past_name(layer, kind))
                for i in others for kind in KINDS}

    def _gather_side_tensors(self, region: list[ir.Node], kept_index: ir.Value, layer: int) -> None:
        """Gather each travelling tensor (its latest version) with this layer's kept indices,
        for its uses inside `region`."""
        in_region = set(region)
        for value, (rank, axes) in self.aligned.items():
            current = self.gathered.get(value, value)
            uses = [(user, i) for user, i in current.uses() if user in in_region]
            if not uses:
                continue
            name = f"trimrt_reduce_{layer}_" + re.sub(r"\W", "_", value.name or "value")
            b = self.builder(name)
            own = self.dims.rank(value)
            if current is value and own is not None and own < rank:
                # no batch axis (a [N, Dh] RoPE table, an [N, N] causal mask): leading axes of 1 first
                axes_v = b.const(np.arange(rank - own, dtype=np.int64), name=f"{name}_lead_axes")
                current = b.op("Unsqueeze", [current, axes_v], name=f"{name}_lead")
            self.gathered[value] = gather_tokens(b, current, rank, axes, kept_index, name)
            self.replace_stream(b, kept_index, uses, self.gathered[value])


#: metadata of the node that makes a reduced decoder block's own causal mask (the causal
#: rule, no padding: what [sparse_attention] takes as `causal` without probing it)
CAUSAL_MASK_MARK = "trimrt.causal_mask"


def _mask_consumer(attn: Attention, mask: ir.Value) -> ir.Node:
    """The node adding `mask` to the logits of `attn` (on the Softmax's input path)."""
    value = attn.core.inputs[0]
    for _ in range(3):
        node = value.producer()
        if node is None:
            break
        if mask in node.inputs:
            return node
        value = node.inputs[0]
    raise StructureError(f"attention {attn.core.name!r}: the node adding its mask was not found")


def transposed_keys(b: GraphBuilder, attn: Attention, prefix: str) -> ir.Value:
    """Kᵀ [B, H, Dh, N]: transposed for a fused Attention op, with grouped KV heads
    repeated to the query heads."""
    if attn.k_transposed:
        return attn.k
    k_t = b.op("Transpose", [attn.k], {"perm": [0, 1, 3, 2]}, name=f"{prefix}_kt")
    hq, hk = (v.shape[1] if v.shape is not None else None for v in (attn.q, attn.k))
    if not (isinstance(hq, int) and isinstance(hk, int) and hq != hk):
        return k_t
    unsq = b.op("Unsqueeze", [k_t, b.const(np.array([2]), name=f"{prefix}_ax2")], name=f"{prefix}_kt_u")
    shape = b.op("Shape", [unsq], name=f"{prefix}_kt_s")
    target = b.op("Mul", [shape, b.const(np.array([1, 1, hq // hk, 1, 1]), name=f"{prefix}_rep")], name=f"{prefix}_kt_t")
    rep = b.op("Expand", [unsq, target], name=f"{prefix}_kt_rep")
    dh = attn.k.shape[3]
    if not isinstance(dh, int):
        raise StructureError(f"attention {attn.core.name!r}: grouped KV heads with an unknown head size")
    return b.op("Reshape", [rep, b.const(np.array([0, hq, dh, -1]), name=f"{prefix}_kt_shape")], name=f"{prefix}_kt_gqa")


def head_mean_keys(b: GraphBuilder, attn: Attention, prefix: str) -> ir.Value:
    """The keys averaged over heads, [B, N, Dh]: ToMe's and Zero-TPrune's similarity metric."""
    mean = b.op("ReduceMean", [attn.k, b.const(np.array([1]), name=f"{prefix}_heads_ax")], {"keepdims": 0},
                name=f"{prefix}_metric")
    if not attn.k_transposed:
        return mean
    return b.op("Transpose", [mean], {"perm": [0, 2, 1]}, name=f"{prefix}_metric_t")


def attention_probs(b: GraphBuilder, attn: Attention, prefix: str, gathered: dict) -> ir.Value:
    """softmax(q·kᵀ·scale + mask) [B, H, N, N]: the Softmax's own output when the model
    has one; recomputed beside a fused Attention op."""
    if attn.core.op_type == "Softmax":
        return attn.core.outputs[0]
    k_t = transposed_keys(b, attn, prefix)
    mask = additive_mask(b, attn, prefix, gathered)
    logits = b.op("MatMul", [attn.q, k_t], name=f"{prefix}_logits")
    scaled = b.op("Mul", [logits, b.const(np.array(attn.scale, np.float32), name=f"{prefix}_scale")], name=f"{prefix}_scaled")
    masked = b.op("Add", [scaled, mask], name=f"{prefix}_masked")
    return b.op("Softmax", [masked], {"axis": -1}, name=f"{prefix}_probs")


def _bool_to_additive(b: GraphBuilder, cond: ir.Value, prefix: str, name: str) -> ir.Value:
    """Where(cond, 0, float32 min): a boolean mask (True = attend) as an additive one."""
    zero = b.const(np.array(0.0, dtype=np.float32), name=f"{prefix}_{name}zero")
    fill = b.const(np.array(np.finfo(np.float32).min, dtype=np.float32), name=f"{prefix}_{name}fill")
    return b.op("Where", [cond, zero, fill], name=f"{prefix}_mask")


def additive_mask(b: GraphBuilder, attn: Attention, prefix: str, gathered: dict, key_bias: ir.Value | None = None) -> ir.Value:
    """The block's attention mask as an additive rank-4 tensor, as the block sees it now
    (`gathered`: travelling tensors already gathered by earlier reductions), plus
    `key_bias` [B, N] when given."""
    if attn.mask is not None and attn.mask.dtype == ir.DataType.BOOL:  # True = attend (Attention op)
        mask = _bool_to_additive(b, gathered.get(attn.mask, attn.mask), prefix, "mask_")
    elif attn.mask is not None:
        mask = gathered.get(attn.mask, attn.mask)
    elif attn.mask_select is not None:
        cond, when_true, when_false = attn.mask_select.inputs
        cond = gathered.get(cond, cond)
        zero = b.const(np.array(0.0, dtype=np.float32), name=f"{prefix}_mask_zero")
        fill_is_false = when_true.const_value is None  # Where(cond, logits, fill)
        fill_f = b.op("Cast", [when_false if fill_is_false else when_true], {"to": ir.DataType.FLOAT}, name=f"{prefix}_mask_fill")
        mask = b.op("Where", [cond, zero, fill_f] if fill_is_false else [cond, fill_f, zero], name=f"{prefix}_mask")
    else:
        mask = b.const(np.zeros((1, 1, 1, 1), dtype=np.float32), name=f"{prefix}_no_mask")
    if mask.shape is not None and len(mask.shape) < 4:  # no batch axis ([N, N]): broadcast from the right
        lead = b.const(np.arange(4 - len(mask.shape), dtype=np.int64), name=f"{prefix}_mask_lead")
        mask = b.op("Unsqueeze", [mask, lead], name=f"{prefix}_mask4")
    elif mask.shape is not None and len(mask.shape) != 4:
        raise StructureError(f"attention mask {mask.name!r} has rank {len(mask.shape)}; token reduction expects a "
                             "mask of rank 4 at most")
    if key_bias is None:
        return mask
    bias4 = b.op("Unsqueeze", [key_bias, b.const(np.array([1, 2]), name=f"{prefix}_bias_axes")], name=f"{prefix}_bias4")
    return b.op("Add", [mask, bias4], name=f"{prefix}_mask_biased")


def add_key_bias(b: GraphBuilder, attn: Attention, key_bias: ir.Value, prefix: str) -> None:
    """Add key_bias [B, N] to this attention's logits, for every query row (the nodes of
    `b` are placed before the attention)."""
    bias4 = b.op("Unsqueeze", [key_bias, b.const(np.array([1, 2]), name=f"{prefix}_axes")], name=f"{prefix}_b4")
    core = attn.core
    if core.op_type == "Softmax":
        add = b.op("Add", [core.inputs[0], bias4], name=f"{prefix}_add")
        b.insert_before(core)
        core.replace_input_with(0, add)
        return
    # fused Attention op (opset 23): the bias joins its attn_mask input (index 3), which
    # ONNX Runtime wants with the query rows spelled out: [B, 1, Nq, N]
    rows = b.op("Shape", [attn.q], {"start": 2, "end": 3}, name=f"{prefix}_rows")
    ones = b.const(np.array([1, 1], np.int64), name=f"{prefix}_ones")
    one = b.const(np.array([1], np.int64), name=f"{prefix}_one")
    target = b.op("Concat", [ones, rows, one], {"axis": 0}, name=f"{prefix}_target")
    bias4 = b.op("Expand", [bias4, target], name=f"{prefix}_rows_bias")
    mask = core.inputs[3] if len(core.inputs) > 3 else None
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        mask = _bool_to_additive(b, mask, prefix, "")
    new_mask = bias4 if mask is None else b.op("Add", [mask, bias4], name=f"{prefix}_add")
    b.insert_before(core)
    if len(core.inputs) <= 3:
        core.resize_inputs(4)
    core.replace_input_with(3, new_mask)


def ones(b: GraphBuilder, stream: ir.Value, prefix: str) -> ir.Value:
    """size = 1 for every token, [B, N]."""
    shape = b.op("Shape", [stream], {"start": 0, "end": 2}, name=f"{prefix}_size_shape")
    one = ir.tensor(np.array([1.0], np.float32), name=f"{prefix}_one")
    return b.op("ConstantOfShape", [shape], {"value": one}, name=f"{prefix}_size")


def clear_stale_shapes(graph: ir.Graph, start: list[ir.Value], n_orig, n_final) -> None:
    """Shapes inferred before a reduction are wrong downstream of it: drop them (re-inferred
    later); graph outputs that keep the token axis get the final token count."""
    for node in downstream_nodes(graph, start):
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
            elif out.shape is not None and len(out.shape) >= 3 and out.shape[1] == n_orig:
                tokens = n_final if isinstance(n_final, int) else ir.SymbolicDim("reduced_tokens")
                out.shape = ir.Shape([out.shape[0], tokens, *out.shape[2:]])
