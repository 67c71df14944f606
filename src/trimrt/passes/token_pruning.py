"""Token pruning (EViT, FastV): after the attention of chosen blocks, keep the top tokens.

At each listed block the pass inserts, right after the attention sub-layer's residual
(and its LayerNorm in post-norm blocks):

    score      = trimrt::AttentionRowScore(q, kᵀ, mask, row)   # CLS row (EViT) or last row (FastV)
    y, idx, f  = trimrt::TokenPrune(stream, score, ...)         # top-k of the prunable span
    stream'    = y with f inserted after the kept span tokens   # if fuse_pruned

and routes every later use of the stream to stream'. The MLP of that block and all
later blocks then run on fewer tokens.

Tensors that travel with the tokens — the attention mask (padding, causal), RoPE
cos/sin tables built from the position ids — are found as the inputs of the pruned
region that come from outside it and have a token-sized axis; they are gathered with
the kept indices, so masks follow the kept tokens and positions stay the originals.
Shape constants that baked the original count are rewritten to follow the runtime one.

k is a build-time constant when the token count (or the prunable span) is static,
so TensorRT gets static shapes; for text models whose length is only known at run
time the op computes k = ceil(keep · span) itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Attention, analyse
from ..compiler.probe import TokenDims
from ..compiler.token_shapes import (
    downstream_nodes, free_token_count, gather_tokens, rederive_shape_values, side_inputs,
)
from ..errors import RecipeError, StructureError
from ..recipe import TokenPruningOptions
from .base import TrimrtPass

SCORE_ROW = {"cls_attention": 0, "last_token_attention": -1}


class TokenPruningPass(TrimrtPass):
    name = "token_pruning"

    def __init__(self, options: TokenPruningOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        tmap = analyse(model)
        depth = len(tmap.blocks)
        bad = [i for i in opts.layers if i >= depth]
        if bad:
            raise RecipeError(f"[token_pruning] layers {bad} do not exist: the model has {depth} blocks (0..{depth - 1})")
        if tmap.token_axis != 1:
            raise StructureError(f"token pruning needs the residual stream as [batch, tokens, width]; found token axis {tmap.token_axis}")
        n = tmap.num_tokens
        if n is None:
            raise StructureError("token count unknown: the residual stream has no shape on its token axis")
        start, end = opts.protected_prefix, opts.span_end
        if isinstance(n, int) and (start >= n or (end is not None and end > n)):
            raise RecipeError(f"[token_pruning] the prunable span [{start}, {end or n}) does not fit the model's {n} tokens")
        self.graph = model.graph
        dims = TokenDims(model, n)  # token axes of the original graph's values (probed when dynamic)
        n_orig = n
        layers, pruned, aligned, gathered = [], [], None, {}
        span_len = (end - start) if end is not None else (n - start if isinstance(n, int) else None)
        for layer in opts.layers:
            block = tmap.blocks[layer]
            keep = opts.kept_count(span_len) if span_len is not None else 0  # 0: the op computes k at run time
            fuse = opts.fuse_pruned and (keep < span_len if keep else opts.keep < 1.0)
            out, kept_index = self._prune(block.stream_mid, block.attention, layer, keep, start,
                                          (start + span_len) if end is not None else 0, fuse, gathered)
            region = downstream_nodes(self.graph, [out])
            if aligned is None:  # first prune: find what travels with the tokens
                aligned = {v: (dims.rank(v), dims.axes(v)) for v in side_inputs(region, {out})}
                aligned = {v: ra for v, ra in aligned.items() if ra[1] and ra[0] is not None}
            self._gather_side_tensors(aligned, gathered, region, kept_index, layer)
            rederived = rederive_shape_values(self.graph, region, dims, out,
                                              lambda op, ins, attrs, nm: self._node(op, ins, attrs, nm),
                                              f"trimrt_prune_{layer}_shape")
            pruned.append(out)
            new_span = (keep + (1 if fuse else 0)) if keep else None
            tokens_out = (n - span_len + new_span) if isinstance(n, int) and new_span is not None else "dynamic"
            layers.append({"block": layer, "tokens_in": n, "kept": keep if keep else f"ceil({opts.keep}·span)",
                           "protected": start, "fused": bool(fuse), "tokens_out": tokens_out,
                           "shape_values_rederived": rederived})
            n, span_len = tokens_out, new_span
        rewritten = free_token_count(self.graph, pruned[:1], n_orig, self.name) if isinstance(n_orig, int) else 0
        _clear_stale_shapes(self.graph, pruned[:1], n_orig, n)
        self.report = {"method": opts.method, "layers": layers, "tokens_before": n_orig, "tokens_after": n,
                       "travelling_tensors": sorted(v.name for v in aligned), "shape_constants_rewritten": rewritten}
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------------ pieces

    def _node(self, op_type: str, inputs, attributes: dict, name: str, domain: str = "", num_outputs: int = 1) -> ir.Node:
        for value in inputs:  # register the small constants the pass creates
            if value is not None and value.const_value is not None and value.graph is None and not value.is_initializer():
                self.graph.register_initializer(value)
        if domain:
            return self.custom_node(op_type, inputs, attributes, num_outputs, name)
        return self.std_node(op_type, inputs, attributes, name=name)

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        return ir.Value(name=name, const_value=ir.tensor(array, name=name))

    def _prune(self, stream: ir.Value, attn: Attention, layer: int, keep: int, protect: int, span_end: int,
               fuse: bool, gathered: dict) -> tuple[ir.Value, ir.Value]:
        """Insert scoring + pruning after `stream`; return (new stream, kept indices for side tensors)."""
        if stream.is_graph_output():
            raise StructureError(f"the stream after block {layer} is a graph output; cannot prune it")
        uses = list(stream.uses())
        prefix = f"trimrt_prune_{layer}"
        nodes = []
        mask = self._additive_mask(attn, prefix, nodes, gathered)
        k_t = self._transposed_keys(attn, prefix, nodes)
        score = self._node("AttentionRowScore", [attn.q, k_t, mask],
                           {"row": SCORE_ROW[self.options.method], "scale": float(attn.scale)},
                           f"{prefix}_score", domain="trimrt")
        prune = self._node("TokenPrune", [stream, score.outputs[0]],
                           {"keep": keep, "protect": protect, "span_end": span_end, "keep_ratio": float(self.options.keep)},
                           prefix, domain="trimrt", num_outputs=3)
        nodes += [score, prune]
        y, kept_index, fused = prune.outputs
        out = y
        if fuse:
            out, kept_index = self._insert_fused(y, kept_index, fused, keep, protect, span_end, prefix, nodes)
        self.graph.insert_after(stream.producer(), nodes)
        for user, idx in uses:
            user.replace_input_with(idx, out)
        return out, kept_index

    def _transposed_keys(self, attn: Attention, prefix: str, nodes: list) -> ir.Value:
        """Kᵀ [B, H, Dh, N] for the side branch: transposed for a fused Attention op, with
        grouped KV heads repeated to the query heads."""
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

    def _additive_mask(self, attn: Attention, prefix: str, nodes: list, gathered: dict) -> ir.Value:
        """The block's attention mask as an additive rank-4 tensor, as the block sees it now
        (`gathered`: travelling tensors already gathered by earlier prunes)."""
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
            return self._const(f"{prefix}_no_mask", np.zeros((1, 1, 1, 1), dtype=np.float32))
        if mask.shape is not None and len(mask.shape) != 4:
            raise StructureError(f"attention mask {mask.name!r} has rank {len(mask.shape)}; token pruning expects a rank-4 mask")
        return mask

    def _insert_fused(self, y, kept_index, fused, keep, protect, span_end, prefix, nodes):
        """Place the fused token right after the kept span tokens (at the end when the span
        runs to the last token); for masks and positions it stands where the last kept
        span token stands."""
        if span_end == 0:  # the span reaches the end: append
            concat = self._node("Concat", [y, fused], {"axis": 1}, f"{prefix}_fuse")
            last = self._node("Slice", [kept_index, self._const(f"{prefix}_m1", np.array([-1])),
                                        self._const(f"{prefix}_big", np.array([np.iinfo(np.int64).max])),
                                        self._const(f"{prefix}_ax1", np.array([1]))], {}, f"{prefix}_fuse_pos")
            idx = self._node("Concat", [kept_index, last.outputs[0]], {"axis": 1}, f"{prefix}_fuse_index")
            nodes += [concat, last, idx]
            return concat.outputs[0], idx.outputs[0]
        cut = protect + keep
        cut_v = self._const(f"{prefix}_cut", np.array([cut], dtype=np.int64))
        n_y = self._node("Shape", [y], {"start": 1, "end": 2}, f"{prefix}_ny")
        rest = self._node("Sub", [n_y.outputs[0], cut_v], {}, f"{prefix}_rest")
        sizes = self._node("Concat", [cut_v, rest.outputs[0]], {"axis": 0}, f"{prefix}_sizes")
        y_parts = self.tagged(ir.node("Split", [y, sizes.outputs[0]], {"axis": 1}, num_outputs=2, name=f"{prefix}_y_split"))
        i_parts = self.tagged(ir.node("Split", [kept_index, sizes.outputs[0]], {"axis": 1}, num_outputs=2,
                                      name=f"{prefix}_i_split"))
        last = self._node("Slice", [kept_index, self._const(f"{prefix}_c0", np.array([cut - 1])), cut_v,
                                    self._const(f"{prefix}_ax1", np.array([1]))], {}, f"{prefix}_fuse_pos")
        y_new = self._node("Concat", [y_parts.outputs[0], fused, y_parts.outputs[1]], {"axis": 1}, f"{prefix}_fuse")
        i_new = self._node("Concat", [i_parts.outputs[0], last.outputs[0], i_parts.outputs[1]], {"axis": 1},
                           f"{prefix}_fuse_index")
        nodes += [n_y, rest, sizes, y_parts, i_parts, last, y_new, i_new]
        return y_new.outputs[0], i_new.outputs[0]

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
            name = f"trimrt_prune_{layer}_{_safe(value.name)}"
            nodes, out = gather_tokens(current, rank, axes, kept_index,
                                       lambda op, ins, attrs, nm: self._node(op, ins, attrs, nm), name)
            self.graph.insert_after(kept_index.producer(), nodes)
            for user, i in uses:
                user.replace_input_with(i, out)
            gathered[value] = out


def _safe(name: str | None) -> str:
    return "".join(c if c.isalnum() else "_" for c in (name or "value"))


def _clear_stale_shapes(graph: ir.Graph, start: list[ir.Value], n_orig, n_final) -> None:
    """Shapes inferred before pruning are wrong downstream of it: drop them (re-inferred
    later); graph outputs that keep the token axis get the final token count."""
    for node in downstream_nodes(graph, start):
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
            elif out.shape is not None and len(out.shape) >= 3 and out.shape[1] == n_orig:
                dims = list(out.shape)
                dims[1] = n_final if isinstance(n_final, int) else ir.SymbolicDim("pruned_tokens")
                out.shape = ir.Shape(dims)
