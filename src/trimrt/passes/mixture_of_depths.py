"""Mixture-of-Depths routing (p-MoD): in a routed block only the top-k tokens of the span
run the block; the others skip it with their state unchanged and re-enter the routing
of the next block. Unlike pruning, no token is lost: every token reaches the output.

Per routed block L:

1. router score [B, N]: `router = "attention"` (training-free) scores the tokens by the
   attention row of the CLS (an encoder protecting it) or of the last token, in block
   L-1, as a side branch (AttentionRowScore); where block L-1 was routed itself, the
   tokens it skipped keep the score they had (TokenRejoin on the scores).
   `router = "model"` takes the routers a p-MoD model was trained with. Top-k routing
   does not export, so such a layer exports dense, h + g·MLP(h), its gate g [B, N, 1]
   computed from the layer's input x by a Linear(d, 1) and the TanhNorm (g = 0.2·tanh(r)
   + 1 on the span, 1 elsewhere). The gate's nodes keep reading every token: g is the
   score, travels with the routed tokens into the block (their STRing weight), and the
   skipped tokens leave the block as g·x;
2. TokenPrune (k = the block's ratio of the span, the selection ops' rule; the tokens
   outside the span always run) gathers the routed tokens entering the block;
3. the block runs on them: its every use of the stream reads the gathered tokens, the
   tensors that travel with the tokens (masks, RoPE tables) are gathered for the
   block's nodes only, shape arithmetic is re-derived inside the block;
4. TokenRejoin writes the block's outputs back at their positions in the stream that
   entered the block (times g with a model's router); everything after the block sees all
   N tokens again.

In a KV-cache decoder the routing runs at prefill only (the score and the selection in
an If on an empty past, as token pruning's); a routed block caches its routed tokens
only (p-MoD: skipped tokens write no K/V there) and attends with a causal mask of its own
lengths; decode steps run every block on their new tokens, over what each block cached.
The manifest records each block's missing tokens (`cache_tokens_removed`).

Which blocks route what share: `MixtureOfDepthsOptions.block_ratios` (p-MoD's shifted
cosine, or explicit ratios); a block at 1.0 is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import ancestors, constant_array, structure_of
from ..compiler.probe import TokenDims
from ..errors import RecipeError, StructureError
from ..plugins import REGISTRY
from ..plugins.span import Span
from ..recipe import MixtureOfDepthsOptions
from .token_graph import TokenGraphPass, additive_mask, transposed_keys
from .token_shapes import downstream_nodes, rederive_shape_values


class MixtureOfDepthsPass(TokenGraphPass):
    name = "mixture_of_depths"
    recipe_table = "mixture_of_depths"
    options: MixtureOfDepthsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        tmap = structure_of(model, self.context.shared)
        tmap.require_serial()
        depth = len(tmap.blocks)
        ratios = opts.block_ratios(depth)
        routed = [i for i, r in enumerate(ratios) if r < 1.0]
        if not routed:
            raise RecipeError(f"[mixture_of_depths] routes no block: every block's ratio is 1.0 at {depth} blocks "
                              "(dense); lower max_ratio, give ratios below 1.0, or remove the table")
        rw = self._rewrite(model, routed)
        decoder = rw.decoder is not None
        gates = _model_gates(tmap, routed) if opts.router == "model" else {}
        if opts.router == "attention" and routed[0] == 0:
            raise RecipeError('[mixture_of_depths] router = "attention" scores a block\'s tokens with the attention of '
                              "the block before it, so block 0 cannot be routed: give it ratio 1.0")
        n = tmap.num_tokens
        start, end = opts.protected_prefix, opts.span_end
        if isinstance(n, int) and (start >= n or (end is not None and end > n)):
            raise RecipeError(f"[mixture_of_depths] the routed span [{start}, {end or n}) does not fit the model's "
                              f"{n} tokens")
        rw.dims = TokenDims(model, n, self.context.shared)
        span_len = (end - start) if end is not None else (n - start if isinstance(n, int) else None)
        # the scoring row: the CLS when an encoder protects it and routes to the end, else the last token
        row = 0 if opts.prunable is None and start > 0 else -1
        layers, reduced, regions = [], [], []
        cache_removed = [0] * depth  # per block: the prompt tokens its cache holds fewer than the mask
        rejoined: dict[ir.Value, ir.Value] = {}  # a routed block's output -> the stream with every token
        score = index = None  # the full score the last routed block was routed by, and its routed positions
        for layer in routed:
            after_routed = bool(layers) and layers[-1]["block"] == layer - 1
            block = tmap.blocks[layer]
            prefix = f"trimrt_mod_{layer}"
            b = rw.builder(prefix)
            stream = rejoined.get(block.stream_in, block.stream_in)  # after a routed block: all tokens again
            gate, gate_nodes = gates.get(layer, (None, set()))
            if gate is not None:  # the model's router: its gate, over every token, is the score
                score = b.op("Squeeze", [gate, b.const(np.array([-1]), name=f"{prefix}_gate_axis")],
                             name=f"{prefix}_gate_score")
            else:
                score = self._score(rw, b, layer, row, score, index if after_routed else None, prefix)
            ratio = ratios[layer]
            keep = Span(keep=0, keep_ratio=ratio).kept(span_len) if span_len is not None else 0
            select = {"keep": keep, "protect": start, "span_end": (start + span_len) if end is not None else 0,
                      "keep_ratio": float(ratio)}
            uses = [(user, i) for user, i in rw.stream_uses(stream, layer) if user not in gate_nodes]
            routed_in, index, _ = b.emit(REGISTRY["TokenPrune"], [stream, score], name=f"{prefix}_route", **select)
            if decoder and gate is not None:  # the prompt is routed; a decode step's new tokens run every block
                routed_in, index = rw.prompt_only(b, stream, routed_in, index)
            elif decoder:  # ... and the next routed block reads the prompt's attention scores
                routed_in, index, score = rw.prompt_only(b, stream, routed_in, index, per_token=score)
            rw.replace_stream(b, stream, uses, routed_in)
            out = self._block_output(tmap, layer)
            region = _between(rw.graph, routed_in, out)
            rw.aligned, rw.gathered = None, {}  # what travels is gathered for this block's nodes only
            if decoder:  # this block caches its routed tokens only, and attends with their causal mask
                cache_removed[layer] = span_len - keep
                rw.own_lengths(layer, cache_removed[layer], last=layer)
            rederived = rw.follow_tokens(routed_in, index, layer, first_reduced=layer, region=region)
            rejoined[out] = self._rejoin(rw, stream, out, index, set(region), f"{prefix}_rejoin", gate)
            reduced.append(routed_in)
            regions.append(set(region))
            tokens = (n - span_len + keep) if isinstance(n, int) and keep else "dynamic"
            layers.append({"block": layer, "ratio": round(ratio, 4), "span_tokens": span_len,
                           "routed": keep if keep else f"ceil({ratio:.4g}·span)", "tokens_run": tokens,
                           "shape_values_rederived": rederived})
        if decoder:  # a dense block reads its own past length, not a routed block's
            for layer in (i for i in range(depth) if i not in routed):
                stream = rejoined.get(tmap.blocks[layer].stream_in, tmap.blocks[layer].stream_in)
                name = f"trimrt_mod_{layer}_own_past"
                rederive_shape_values(rw.builder(name), _between(rw.graph, stream, self._block_output(tmap, layer)),
                                      rw.dims, stream, name, rw.own_past(layer, [i for i in routed if i != layer]))
        details = {"router": opts.router, "blocks": depth,
                   "ratios": [round(r, 4) for r in ratios], "mean_ratio": round(sum(ratios) / depth, 4),
                   "layers": layers, "tokens": n}
        if opts.router == "attention":
            details["scoring_row"] = "cls" if row == 0 else "last"
        else:
            details["model_routers"] = sorted(gates)
        if decoder:
            details["cache_tokens_removed"] = cache_removed
        details.update(rw.finish(reduced, n, n, regions))
        for region in regions:  # a routed block's shapes (a decoder's If hides it from "downstream")
            for node in region:
                for value in node.outputs:
                    if not value.is_graph_output():
                        value.shape = None
        self.record(details, changes_results=True)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _score(rw, b, layer: int, row: int, previous, previous_index, prefix: str) -> ir.Value:
        """The router score [B, N] of block `layer`: the attention row of block layer-1 (as
        it ran: on its routed tokens when it was routed, whose skipped tokens then keep
        their `previous` score)."""
        attn = rw.tmap.blocks[layer - 1].attention
        mask = additive_mask(b, attn, prefix, rw.gathered if previous_index is not None else {})
        (scores,) = b.emit(REGISTRY["AttentionRowScore"], [attn.q, transposed_keys(b, attn, prefix), mask],
                           name=f"{prefix}_score", row=row, scale=float(attn.scale))
        if previous_index is None:
            return scores
        last = b.const(np.array([-1]), name=f"{prefix}_last_axis")
        (full,) = b.emit(REGISTRY["TokenRejoin"], [b.op("Unsqueeze", [previous, last], name=f"{prefix}_prev3"),
                                                   b.op("Unsqueeze", [scores, last], name=f"{prefix}_routed3"),
                                                   previous_index], name=f"{prefix}_score_rejoin")
        return b.op("Squeeze", [full, last], name=f"{prefix}_score_full")

    @staticmethod
    def _block_output(tmap, layer: int) -> ir.Value:
        """The stream leaving block `layer`: the next block's input; after the last block, the
        MLP's residual sum (and its norm in a post-norm model)."""
        if layer + 1 < len(tmap.blocks):
            return tmap.blocks[layer + 1].stream_in
        block = tmap.blocks[layer]
        for user, _ in block.stream_mid.uses():
            if user.op_type == "Add" and user is not block.residual_add:  # the MLP's residual sum
                out = user.outputs[0]
                if block.post_norm:
                    norms = [u for u, _ in out.uses() if u.op_type in ("LayerNormalization", "SimplifiedLayerNormalization")]
                    if len(norms) != 1:
                        break
                    out = norms[0].outputs[0]
                return out
        raise StructureError(f"[mixture_of_depths] the output of the last block ({layer}) was not found (the MLP's "
                             "residual Add); route the blocks before it only (ratio 1.0 for the last)")

    @staticmethod
    def _rejoin(rw, stream: ir.Value, out: ir.Value, index: ir.Value, region: set, name: str,
                gate: ir.Value | None) -> ir.Value:
        """Put the routed tokens' block outputs back among the skipped ones (weighted by the
        model router's `gate`: p-MoD's STRing): every use of `out` after the block (and the
        graph output it may be) reads the rejoined stream."""
        b = rw.builder(name)
        skipped = stream if gate is None else b.op("Mul", [stream, gate], name=f"{name}_string")
        (full,) = b.emit(REGISTRY["TokenRejoin"], [skipped, out, index], name=name)
        full.dtype = stream.dtype if stream.dtype is not None else out.dtype
        later = [(user, i) for user, i in out.uses() if user not in region and user is not full.producer()]
        b.insert_after(out.producer())
        for user, i in later:
            user.replace_input_with(i, full)
        graph = rw.graph
        if out.is_graph_output():
            position = list(graph.outputs).index(out)
            full.name, out.name = out.name, f"{out.name}_routed"
            full.shape = out.shape
            graph.outputs[position] = full
        return full


def _between(graph: ir.Graph, start: ir.Value, end: ir.Value) -> list[ir.Node]:
    """Nodes downstream of `start` that `end` depends on (a routed block's nodes), in graph order."""
    downstream = downstream_nodes(graph, [start])
    inside, between = set(downstream), set()
    stack = [end.producer()]
    while stack:  # back from `end`, never past the nodes downstream of `start`
        node = stack.pop()
        if node not in inside or node in between:
            continue
        between.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return [node for node in downstream if node in between]


def _model_gates(tmap, routed: list[int]) -> dict[int, tuple[ir.Value, set[ir.Node]]]:
    """{block: (its router's gate g, the nodes computing g)} of the blocks with a p-MoD router;
    refuses routed blocks without one (a router is trained with the model: none can be made up)."""
    gates = {}
    for block in tmap.blocks:
        found = _router_gate(block)
        if found is not None:
            gates[block.index] = found
    if not gates:
        raise RecipeError('[mixture_of_depths] router = "model" found no MoD router in the export (a layer exported '
                          "as h + g·MLP(h), its gate g computed from the layer's input by a Linear(d, 1), as p-MoD's "
                          'TanhNorm router); for a model not trained with MoD use router = "attention"')
    bad = [i for i in routed if i not in gates]
    if bad:
        raise RecipeError(f'[mixture_of_depths] router = "model": blocks {bad} have no MoD router in the export (the '
                          f"blocks with one are {sorted(gates)}); give the others ratio 1.0")
    return gates


def _router_gate(block) -> tuple[ir.Value, set[ir.Node]] | None:
    """(g, its nodes) when the block's MLP residual is h + g·MLP(h) with g [B, N, 1] computed
    from the block's input through a Linear(d, 1) (a constant [d, 1] MatMul weight) and not
    from h; else None."""
    mid = block.stream_mid
    width = block.stream_in.shape[-1] if block.stream_in.shape is not None else None
    for user, _ in mid.uses():
        if user.op_type != "Add" or user is block.residual_add or len(user.inputs) != 2:
            continue
        branch = user.inputs[1] if user.inputs[0] is mid else user.inputs[0]
        mul = branch.producer() if branch is not None else None
        if mul is None or mul.op_type != "Mul":
            return None
        for gate, other in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            nodes, reads = ancestors(gate, stop={block.stream_in, mid})
            if block.stream_in not in reads or mid in reads or mid not in ancestors(other, stop={mid, block.stream_in})[1]:
                continue
            weights = [constant_array(v) for node in nodes if node.op_type in ("MatMul", "Gemm") for v in node.inputs]
            if any(w is not None and w.ndim == 2 and 1 in w.shape and (width is None or width in w.shape)
                   for w in weights) and gate.shape is not None and len(gate.shape) == 3 and gate.shape[-1] == 1:
                return gate, nodes
        return None
    return None


