"""Token pruning (EViT-style): after the attention of chosen blocks, keep the top tokens.

At each listed block the pass inserts, right after the residual Add of the attention
sub-layer:

    score      = trimrt::AttentionRowScore(q, kᵀ, row=0)      # CLS row, a side branch
    y, idx, f  = trimrt::TokenPrune(stream, score, keep=k, protect=p)
    stream'    = Concat(y, f)  if fuse_pruned (and tokens were dropped) else y

and routes every later use of the stream to stream'. The MLP of that block and all
later blocks then run on fewer tokens. k = ceil(keep · prunable) is fixed at compile
time from the static token count, so the build has static shapes (TensorRT needs them).
Shape constants that baked the original count are rewritten to follow the runtime one.
"""

from __future__ import annotations

import onnx_ir as ir

from ..compiler.analysis import analyse
from ..compiler.token_shapes import downstream_nodes, free_token_count
from ..errors import RecipeError, StructureError
from ..recipe import TokenPruningOptions
from .base import TrimrtPass

SCORE_ROW = {"cls_attention": 0}


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
        if not isinstance(n, int):
            raise StructureError(f"token pruning needs a static token count per build; the graph has a dynamic one ({n!r}). "
                                 "Export with a fixed sequence length")
        protect = opts.protected_prefix
        if protect >= n:
            raise RecipeError(f"[token_pruning] protect={opts.protect!r} protects {protect} tokens but the model has only {n}")
        graph = model.graph
        n_orig, layers, pruned_streams = n, [], []
        for layer in opts.layers:
            block = tmap.blocks[layer]
            attn = block.attention
            prunable = n - protect
            keep = opts.kept_count(prunable)
            fuse = opts.fuse_pruned and keep < prunable
            stream = block.stream_mid
            uses = list(stream.uses())
            prefix = f"trimrt_prune_{layer}"
            score = self.custom_node("AttentionRowScore", [attn.q, attn.k_t],
                                     {"row": SCORE_ROW[opts.method], "scale": float(attn.scale)}, 1, f"{prefix}_score")
            prune = self.custom_node("TokenPrune", [stream, score.outputs[0]], {"keep": keep, "protect": protect}, 3, prefix)
            new_nodes = [score, prune]
            out = prune.outputs[0]
            if fuse:
                concat = self.std_node("Concat", [out, prune.outputs[2]], {"axis": 1}, name=f"{prefix}_fuse")
                new_nodes.append(concat)
                out = concat.outputs[0]
            graph.insert_after(stream.producer(), new_nodes)
            for user, idx in uses:
                user.replace_input_with(idx, out)
            if stream.is_graph_output():
                raise StructureError(f"the stream after block {layer} is a graph output; cannot prune it")
            pruned_streams.append(out)
            new_n = protect + keep + (1 if fuse else 0)
            layers.append({"block": layer, "tokens_in": n, "kept": keep, "protected": protect,
                           "fused": bool(fuse), "tokens_out": new_n})
            n = new_n
        rewritten = free_token_count(graph, pruned_streams[:1], n_orig, self.name)
        _clear_stale_shapes(graph, pruned_streams[:1], n_orig, n)
        self.report = {"method": opts.method, "layers": layers, "tokens_before": n_orig, "tokens_after": n,
                       "shape_constants_rewritten": rewritten}
        return ir.passes.PassResult(model, modified=True)


def _clear_stale_shapes(graph: ir.Graph, start: list[ir.Value], n_orig: int, n_final: int) -> None:
    """Shapes inferred before pruning are wrong downstream of it: drop them (re-inferred
    later); graph outputs that keep the token axis get the final token count."""
    for node in downstream_nodes(graph, start):
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
            elif out.shape is not None and len(out.shape) >= 3 and out.shape[1] == n_orig:
                dims = list(out.shape)
                dims[1] = n_final
                out.shape = ir.Shape(dims)
