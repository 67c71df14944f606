"""Token pruning: after (or before) the attention of chosen blocks, keep the top tokens.

Methods (`[token_pruning] method`), each a score op feeding a selection op:

    cls_attention / last_token_attention   EViT / FastV: AttentionRowScore (CLS row / last row)
                                           → TokenPrune (top-k of the span), optional fusion
    zero_tprune    AttentionPageRank (weighted PageRank per head, head filter, similarity
                   stage) on the block's attention probabilities → TokenPrune
    divprune       DiversityRank (greedy max–min cosine diversity) on the tokens entering
                   the block — before its attention, so `layers = [0]` prunes before layer 0
                   → TokenPrune
    recycle        AttentionRowScore → TokenRecycle: the dropped tokens are merged into one
                   token per cell of a grid over the patch layout (VFlowOpt)
    adaptive       AttentionRowScore → TokenPrune with k = ceil(keep · span) as a static
                   upper bound → MassMask: per input, only the tokens holding `mass` of the
                   attention stay visible; the others are masked out of every later
                   attention (ATP-style; static shapes, a validity mask, no NonZero)

The reduced stream replaces the old one for every later use, so the MLP of that block
(for divprune, the whole block) and all later blocks run on fewer tokens.

Tensors that travel with the tokens — the attention mask (padding, causal), RoPE
cos/sin tables built from the position ids — are found as the inputs of the pruned
region that come from outside it and have a token-sized axis; they are gathered with
the kept indices, so masks follow the kept tokens and positions stay the originals.
Shape constants that baked the original count are rewritten to follow the runtime one.

k is a build-time constant when the token count (or the prunable span) is static,
so TensorRT gets static shapes; for text models whose length is only known at run
time the ops compute k = ceil(keep · span) themselves.
"""

from __future__ import annotations

import onnx_ir as ir

from ..compiler.probe import TokenDims
from ..errors import RecipeError
from ..recipe import TokenPruningOptions
from ..registry import TOKEN_PRUNING_METHODS
from .pruning_methods import Site
from .token_graph import TokenGraphPass, clear_stale_shapes
from .token_shapes import free_token_count


class TokenPruningPass(TokenGraphPass):
    name = "token_pruning"
    recipe_table = "token_pruning"
    exact = False

    def __init__(self, options: TokenPruningOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        rw = self._rewrite(model, opts.layers, "token_pruning")
        tmap = rw.tmap
        n = tmap.num_tokens
        start, end = opts.protected_prefix, opts.span_end
        if isinstance(n, int) and (start >= n or (end is not None and end > n)):
            raise RecipeError(f"[token_pruning] the prunable span [{start}, {end or n}) does not fit the model's {n} tokens")
        rw.dims = TokenDims(model, n, self.context.shared)  # token axes of the original graph's values (probed when dynamic)
        n_orig = n
        layers, pruned = [], []
        span_len = (end - start) if end is not None else (n - start if isinstance(n, int) else None)
        method = TOKEN_PRUNING_METHODS[opts.method](opts, rw)
        method.prepare(n, start, span_len)
        biases = []  # (layer, key bias valid after it)
        for i, layer in enumerate(opts.layers):
            block = tmap.blocks[layer]
            keep = opts.kept_count(span_len) if span_len is not None else 0  # 0: the op computes k at run time
            fuse = opts.fuse_pruned and (keep < span_len if keep else opts.keep < 1.0)
            span_end_attr = (start + span_len) if (end is not None or method.explicit_span_end) else 0
            stream = block.stream_in if method.before_attention else block.stream_mid
            uses = rw.stream_uses(stream, layer)
            prefix = f"trimrt_prune_{layer}"
            site = Site(rw.builder(prefix), block, layer, i, stream, prefix,
                        {"keep": keep, "protect": start, "span_end": span_end_attr, "keep_ratio": float(opts.keep)},
                        fuse)
            out, kept_index = method.prune(site)
            rw.replace_stream(site.b, stream, uses, out)
            rederived = rw.follow_tokens(out, kept_index, layer)
            pruned.append(out)
            new_span = (keep + (1 if fuse else 0)) if keep else None
            added = method.added_tokens()
            tokens_out = (n - span_len + new_span + added) if isinstance(n, int) and new_span is not None else "dynamic"
            entry = {"block": layer, "at": "block input" if method.before_attention else "after attention",
                     "tokens_in": n, "kept": keep if keep else f"ceil({opts.keep}·span)", "keep_ratio": opts.keep,
                     "protected": start,
                     "fused": bool(fuse), "tokens_out": tokens_out, "shape_values_rederived": rederived, **site.extra}
            layers.append(entry)
            if method.key_bias is not None:
                biases.append((layer, method.key_bias))
            n, span_len = tokens_out, new_span
        rw.bias_later_attention(biases)
        graph = model.graph
        rewritten = (free_token_count(self.builder(graph), pruned, n_orig, rw.dims)
                     if isinstance(n_orig, int) else 0)
        clear_stale_shapes(graph, pruned[:1], n_orig, n)
        details = {"method": opts.method, "layers": layers, "tokens_before": n_orig, "tokens_after": n,
                   "travelling_tensors": sorted(v.name for v in rw.aligned), "shape_constants_rewritten": rewritten}
        if tmap.prepended > start:  # DeiT's distillation token after the CLS: pruning it loses its head's input
            details["note"] = (f"the model prepends {tmap.prepended} learned tokens but the recipe protects {start}; "
                               f"protect = \"first:{tmap.prepended}\" keeps them all")
        self.record(details, changes_results=n != n_orig)
        return ir.passes.PassResult(model, modified=True)
