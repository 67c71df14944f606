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

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Attention, Block, analyse
from .token_shapes import (downstream_nodes, gather_tokens, rederive_shape_values, side_inputs,
                                     travelling_constants)
from ..errors import RecipeError, StructureError
from .base import TrimrtPass

#: additive bias of a key no query may attend (finite, so sums with other masks stay finite)
BLOCKED = -1e9


class TokenGraphPass(TrimrtPass):
    """Base of the token-reducing passes: node helpers and the shared graph surgery."""

    graph: ir.Graph

    def _structure(self, model: ir.Model, layers, table: str):
        """analyse(model), checked for a token-level rewrite of `layers` (recipe table
        `table`): the blocks exist, the stream is [batch, tokens, width], the count is known."""
        tmap = analyse(model)
        depth = len(tmap.blocks)
        bad = [i for i in layers if i >= depth]
        if bad:
            raise RecipeError(f"[{table}] layers {bad} do not exist: the model has {depth} blocks (0..{depth - 1})")
        if tmap.token_axis != 1:
            raise StructureError(f"[{table}] needs the residual stream as [batch, tokens, width]; "
                                 f"found token axis {tmap.token_axis}")
        if tmap.num_tokens is None:
            raise StructureError("token count unknown: the residual stream has no shape on its token axis")
        self.graph = model.graph
        return tmap

    # ------------------------------------------------------------------ nodes

    def _node(self, op_type: str, inputs, attributes: dict, name: str, domain: str = "", num_outputs: int = 1) -> ir.Node:
        for value in inputs:  # register the small constants the pass creates
            if value is not None and value.const_value is not None and value.graph is None and not value.is_initializer():
                self.graph.register_initializer(value)
        if domain:
            return self.custom_node(op_type, inputs, attributes, num_outputs, name)
        return self.std_node(op_type, inputs, attributes, name=name)

    def _make(self, op_type: str, inputs, attributes: dict, name: str) -> ir.Node:
        """_node for the shape helpers, which take a plain (op, inputs, attributes, name) builder."""
        return self._node(op_type, inputs, attributes, name)

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        return ir.Value(name=name, const_value=ir.tensor(array, name=name))

    def _stream_uses(self, stream: ir.Value, layer: int) -> list:
        """The uses of `stream` to reroute, taken before the pass adds its own."""
        if stream.is_graph_output():
            raise StructureError(f"the stream at block {layer} is a graph output; cannot reduce its tokens")
        return list(stream.uses())

    def _replace_stream(self, stream: ir.Value, uses: list, nodes: list[ir.Node], out: ir.Value) -> None:
        """Insert `nodes` after the producer of `stream` and route its earlier `uses` to `out`."""
        self.graph.insert_after(stream.producer(), nodes)
        for user, idx in uses:
            user.replace_input_with(idx, out)

    # ------------------------------------------------------------------ attention pieces

    def _transposed_keys(self, attn: Attention, prefix: str, nodes: list) -> ir.Value:
        """Kᵀ [B, H, Dh, N]: transposed for a fused Attention op, with grouped KV heads
        repeated to the query heads."""
        if attn.k_transposed:
            return attn.k
        k_t = self._node("Transpose", [attn.k], {"perm": [0, 1, 3, 2]}, f"{prefix}_kt")
        nodes.append(k_t)
        hq = attn.q.shape[1] if attn.q.shape is not None else None
        hk = attn.k.shape[1] if attn.k.shape is not None else None
        if isinstance(hq, int) and isinstance(hk, int) and hq != hk:
            group = hq // hk
            unsq = self._node("Unsqueeze", [k_t.outputs[0], self._const(f"{prefix}_ax2", np.array([2]))], {}, f"{prefix}_kt_u")
            shape = self._node("Shape", [unsq.outputs[0]], {}, f"{prefix}_kt_s")
            target = self._node("Mul", [shape.outputs[0], self._const(f"{prefix}_rep", np.array([1, 1, group, 1, 1]))], {},
                                f"{prefix}_kt_t")
            rep = self._node("Expand", [unsq.outputs[0], target.outputs[0]], {}, f"{prefix}_kt_rep")
            dh = attn.k.shape[3]
            if not isinstance(dh, int):
                raise StructureError(f"attention {attn.core.name!r}: grouped KV heads with an unknown head size")
            merged = self._node("Reshape", [rep.outputs[0], self._const(f"{prefix}_kt_shape", np.array([0, hq, dh, -1]))],
                                {}, f"{prefix}_kt_gqa")
            nodes += [unsq, shape, target, rep, merged]
            return merged.outputs[0]
        return k_t.outputs[0]

    def _head_mean_keys(self, attn: Attention, prefix: str, nodes: list) -> ir.Value:
        """The keys averaged over heads, [B, N, Dh]: ToMe's and Zero-TPrune's similarity metric."""
        mean = self._node("ReduceMean", [attn.k, self._const(f"{prefix}_heads_ax", np.array([1]))], {"keepdims": 0},
                          f"{prefix}_metric")
        nodes.append(mean)
        if not attn.k_transposed:
            return mean.outputs[0]
        tr = self._node("Transpose", [mean.outputs[0]], {"perm": [0, 2, 1]}, f"{prefix}_metric_t")
        nodes.append(tr)
        return tr.outputs[0]

    def _attention_probs(self, attn: Attention, prefix: str, nodes: list, gathered: dict) -> ir.Value:
        """softmax(q·kᵀ·scale + mask) [B, H, N, N]: the Softmax's own output when the model
        has one; recomputed beside a fused Attention op."""
        if attn.core.op_type == "Softmax":
            return attn.core.outputs[0]
        k_t = self._transposed_keys(attn, prefix, nodes)
        mask = self._additive_mask(attn, prefix, nodes, gathered)
        logits = self._node("MatMul", [attn.q, k_t], {}, f"{prefix}_logits")
        scaled = self._node("Mul", [logits.outputs[0], self._const(f"{prefix}_scale", np.array(attn.scale, np.float32))],
                            {}, f"{prefix}_scaled")
        masked = self._node("Add", [scaled.outputs[0], mask], {}, f"{prefix}_masked")
        probs = self._node("Softmax", [masked.outputs[0]], {"axis": -1}, f"{prefix}_probs")
        nodes += [logits, scaled, masked, probs]
        return probs.outputs[0]

    def _additive_mask(self, attn: Attention, prefix: str, nodes: list, gathered: dict,
                       key_bias: ir.Value | None = None) -> ir.Value:
        """The block's attention mask as an additive rank-4 tensor, as the block sees it now
        (`gathered`: travelling tensors already gathered by earlier reductions), plus
        `key_bias` [B, N] when given."""
        if attn.mask is not None and attn.mask.dtype == ir.DataType.BOOL:  # True = attend (Attention op)
            cond = gathered.get(attn.mask, attn.mask)
            zero = self._const(f"{prefix}_mask_zero", np.array(0.0, dtype=np.float32))
            fill = self._const(f"{prefix}_mask_fill", np.array(np.finfo(np.float32).min, dtype=np.float32))
            where = self._node("Where", [cond, zero, fill], {}, f"{prefix}_mask")
            nodes.append(where)
            mask = where.outputs[0]
        elif attn.mask is not None:
            mask = gathered.get(attn.mask, attn.mask)
        elif attn.mask_select is not None:
            cond, when_true, when_false = attn.mask_select.inputs
            cond = gathered.get(cond, cond)
            zero = self._const(f"{prefix}_mask_zero", np.array(0.0, dtype=np.float32))
            fill_is_false = when_true.const_value is None  # Where(cond, logits, fill)
            fill = when_false if fill_is_false else when_true
            fill_f = self._node("Cast", [fill], {"to": ir.DataType.FLOAT}, f"{prefix}_mask_fill")
            where = self._node("Where", [cond, zero, fill_f.outputs[0]] if fill_is_false else [cond, fill_f.outputs[0], zero],
                               {}, f"{prefix}_mask")
            nodes += [fill_f, where]
            mask = where.outputs[0]
        else:
            mask = self._const(f"{prefix}_no_mask", np.zeros((1, 1, 1, 1), dtype=np.float32))
        if mask.shape is not None and len(mask.shape) != 4:
            raise StructureError(f"attention mask {mask.name!r} has rank {len(mask.shape)}; token reduction expects a rank-4 mask")
        if key_bias is None:
            return mask
        bias4 = self._node("Unsqueeze", [key_bias, self._const(f"{prefix}_bias_axes", np.array([1, 2]))], {},
                           f"{prefix}_bias4")
        total = self._node("Add", [mask, bias4.outputs[0]], {}, f"{prefix}_mask_biased")
        nodes += [bias4, total]
        return total.outputs[0]

    def _add_key_bias(self, attn: Attention, key_bias: ir.Value, prefix: str) -> None:
        """Add key_bias [B, N] to this attention's logits, for every query row."""
        nodes: list[ir.Node] = []
        bias4 = self._node("Unsqueeze", [key_bias, self._const(f"{prefix}_axes", np.array([1, 2]))], {}, f"{prefix}_b4")
        nodes.append(bias4)
        core = attn.core
        if core.op_type == "Softmax":
            logits = core.inputs[0]
            add = self._node("Add", [logits, bias4.outputs[0]], {}, f"{prefix}_add")
            nodes.append(add)
            self.graph.insert_before(core, nodes)
            core.replace_input_with(0, add.outputs[0])
            return
        # fused Attention op (opset 23): the bias joins its attn_mask input (index 3), which
        # ONNX Runtime wants with the query rows spelled out: [B, 1, Nq, N]
        rows = self._node("Shape", [attn.q], {"start": 2, "end": 3}, f"{prefix}_rows")
        ones = self._const(f"{prefix}_ones", np.array([1, 1], np.int64))
        one = self._const(f"{prefix}_one", np.array([1], np.int64))
        target = self._node("Concat", [ones, rows.outputs[0], one], {"axis": 0}, f"{prefix}_target")
        full = self._node("Expand", [bias4.outputs[0], target.outputs[0]], {}, f"{prefix}_rows_bias")
        nodes += [rows, target, full]
        bias4 = full
        mask = core.inputs[3] if len(core.inputs) > 3 else None
        if mask is None:
            new_mask = bias4.outputs[0]
        else:
            if mask.dtype == ir.DataType.BOOL:
                zero = self._const(f"{prefix}_zero", np.array(0.0, dtype=np.float32))
                fill = self._const(f"{prefix}_fill", np.array(np.finfo(np.float32).min, dtype=np.float32))
                where = self._node("Where", [mask, zero, fill], {}, f"{prefix}_mask")
                nodes.append(where)
                mask = where.outputs[0]
            add = self._node("Add", [mask, bias4.outputs[0]], {}, f"{prefix}_add")
            nodes.append(add)
            new_mask = add.outputs[0]
        self.graph.insert_before(core, nodes)
        if len(core.inputs) <= 3:
            core.resize_inputs(4)
        core.replace_input_with(3, new_mask)

    def _bias_later_attention(self, blocks: list[Block], biases: list) -> None:
        """biases: (layer, key bias [B, N] valid after that layer's reduction). Each applies to
        the attention of the blocks after its layer, up to and including the next reducing
        layer (whose attention runs before its own reduction)."""
        for i, (layer, bias) in enumerate(biases):
            last = biases[i + 1][0] if i + 1 < len(biases) else len(blocks) - 1
            for b in range(layer + 1, last + 1):
                self._add_key_bias(blocks[b].attention, bias, f"trimrt_{self.name}_{layer}_bias_block{b}")


    # ------------------------------------------------------------------ token sizes

    def _weight_pooling(self, aligned: dict, gathered: dict, size: ir.Value) -> list[str]:
        """Per-token weights that travel with the tokens into a weighted sum — the mask
        of a masked mean pooling, [B, N, 1] — are multiplied by the final size, so the
        pooled mean counts a merged token as the tokens it holds (Σ m·s·x / Σ m·s), as
        proportional attention does inside the blocks. Recognised: a float tensor with
        only the token axis (and batch) non-trivial, used only by Mul / ReduceSum."""
        weighted = []
        for value, (rank, axes) in aligned.items():
            current = gathered.get(value)
            if current is None or axes != [1] or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            shape = value.shape
            if shape is None or any(d != 1 for d in list(shape)[2:]):
                continue
            uses = list(current.uses())
            if not uses or any(user.op_type not in ("Mul", "ReduceSum") for user, _ in uses):
                continue
            prefix = f"trimrt_pool_{len(weighted)}"
            nodes = []
            s = size
            if rank > 2:
                unsq = self._node("Unsqueeze", [size, self._const(f"{prefix}_axes", np.arange(2, rank, dtype=np.int64))],
                                  {}, f"{prefix}_size")
                nodes.append(unsq)
                s = unsq.outputs[0]
            like = self._node("CastLike", [s, current], {}, f"{prefix}_size_cast")
            mul = self._node("Mul", [current, like.outputs[0]], {}, f"{prefix}_weighted")
            nodes += [like, mul]
            self.graph.insert_after(current.producer(), nodes)  # `current` is a gather the pass made
            for user, i in uses:
                user.replace_input_with(i, mul.outputs[0])
            weighted.append(value.name)
        return weighted

    def _ones(self, stream: ir.Value, prefix: str, nodes: list) -> ir.Value:
        """size = 1 for every token, [B, N]."""
        shape = self._node("Shape", [stream], {"start": 0, "end": 2}, f"{prefix}_size_shape")
        one = ir.tensor(np.array([1.0], np.float32), name=f"{prefix}_one")
        ones = self._node("ConstantOfShape", [shape.outputs[0]], {"value": one}, f"{prefix}_size")
        nodes += [shape, ones]
        return ones.outputs[0]

    # ------------------------------------------------------------------ travelling tensors

    def _follow_tokens(self, out: ir.Value, index: ir.Value, layer: int, dims, aligned: dict | None,
                       gathered: dict) -> tuple[dict, list[ir.Node], int]:
        """After a reduction at `out` (index: positions kept, into the previous tokens):
        gather the tensors that travel with the tokens for the nodes downstream, and
        re-derive shape arithmetic. Returns (aligned, region, number of values re-derived)."""
        region = downstream_nodes(self.graph, [out])
        if aligned is None:  # first reduction: find what travels with the tokens
            aligned = {v: (dims.rank(v), dims.axes(v)) for v in side_inputs(region, {out})}
            aligned = {v: ra for v, ra in aligned.items() if ra[1] and ra[0] is not None}
            aligned.update(travelling_constants(region, dims))
        self._gather_side_tensors(aligned, gathered, region, index, layer)
        rederived = rederive_shape_values(self.graph, region, dims, out,
                                          self._make,
                                          f"trimrt_reduce_{layer}_shape")
        return aligned, region, rederived

    def _gather_side_tensors(self, aligned: dict, gathered: dict, region: list[ir.Node], kept_index: ir.Value,
                             layer: int) -> None:
        """Gather each travelling tensor (its latest version) with this layer's kept indices,
        for its uses inside `region`; `gathered` maps each original to its latest version."""
        in_region = set(region)
        for value, (rank, axes) in aligned.items():
            current = gathered.get(value, value)
            uses = [(user, i) for user, i in current.uses() if user in in_region]
            if not uses:
                continue
            name = f"trimrt_reduce_{layer}_{_safe(value.name)}"
            if current is value and value.shape is not None and len(value.shape) < rank:
                # a constant of lower rank (a [N, Dh] RoPE table): leading axes of 1 first
                axes_v = self._const(f"{name}_lead", np.arange(rank - len(value.shape), dtype=np.int64))
                lead = [self._node("Unsqueeze", [current, axes_v], {}, f"{name}_lead")]
                current = lead[0].outputs[0]
            else:
                lead = []
            nodes, out = gather_tokens(current, rank, axes, kept_index,
                                       self._make, name)
            nodes = lead + nodes
            self.graph.insert_after(kept_index.producer(), nodes)
            for user, i in uses:
                user.replace_input_with(i, out)
            gathered[value] = out


def _safe(name: str | None) -> str:
    return "".join(c if c.isalnum() else "_" for c in (name or "value"))


def clear_stale_shapes(graph: ir.Graph, start: list[ir.Value], n_orig, n_final) -> None:
    """Shapes inferred before a reduction are wrong downstream of it: drop them (re-inferred
    later); graph outputs that keep the token axis get the final token count."""
    for node in downstream_nodes(graph, start):
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
            elif out.shape is not None and len(out.shape) >= 3 and out.shape[1] == n_orig:
                dims = list(out.shape)
                dims[1] = n_final if isinstance(n_final, int) else ir.SymbolicDim("reduced_tokens")
                out.shape = ir.Shape(dims)
