"""Token pruning: after (or before) the attention of chosen blocks, keep the top tokens.

Each method (`[token_pruning] method`, a class of `pruning_methods`) is a score op feeding
a selection op. The reduced stream replaces the old one for every later use, so the MLP
of that block (for divprune, which scores the tokens entering the block, the whole block:
`layers = [0]` prunes before layer 0) and all later blocks run on fewer tokens. Tensors
that travel with the tokens (masks, RoPE tables: see token_graph) are gathered with the
kept indices, so masks follow the kept tokens and positions stay the originals.

k is a build-time constant when the token count (or the prunable span) is static, so
TensorRT gets static shapes; for text models whose length is only known at run time the
ops compute k = ceil(keep · span) themselves.
"""

from __future__ import annotations

import onnx_ir as ir

from ..compiler.probe import TokenDims
from ..errors import RecipeError
from ..recipe import TokenPruningOptions
from ..registry import TOKEN_PRUNING_METHODS
from .pruning_methods import Site
from .token_graph import TokenGraphPass


class TokenPruningPass(TokenGraphPass):
    name = "token_pruning"
    recipe_table = "token_pruning"
    options: TokenPruningOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        rw = self._rewrite(model, opts.layers)
        tmap = rw.tmap
        n = n_orig = tmap.num_tokens
        start, end = opts.protected_prefix, opts.span_end
        if isinstance(n, int) and (start >= n or (end is not None and end > n)):
            raise RecipeError(f"[token_pruning] the prunable span [{start}, {end or n}) does not fit the model's {n} tokens")
        rw.dims = TokenDims(model, n, self.context.shared)  # token axes of the original graph's values (probed when dynamic)
        layers, pruned = [], []
        span_len = (end - start) if end is not None else (n - start if isinstance(n, int) else None)
        method = TOKEN_PRUNING_METHODS[opts.method](opts, rw)
        method.prepare(n, start, span_len)
        biases = []  # (layer, key bias valid after it)
        removed = 0  # a decoder's prompt tokens pruned so far (None: not known when compiled)
        cache_removed = [0] * len(tmap.blocks)  # per layer: tokens its cache holds fewer than the mask
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
            out, kept_index = method.select(site, method.score(site))
            if rw.decoder is not None:  # prune the prompt; decode steps keep their tokens
                out, kept_index = rw.prompt_only(site.b, stream, out, kept_index)
            rw.replace_stream(site.b, stream, uses, out)
            first_reduced = layer if method.before_attention else layer + 1
            new_span = (keep + (1 if fuse else 0)) if keep else None
            if rw.decoder is not None:
                removed = removed + span_len - new_span - method.added_tokens \
                    if None not in (removed, span_len, new_span) else None
                rw.own_lengths(first_reduced, removed)
                for j in range(first_reduced, len(cache_removed)):
                    cache_removed[j] = removed
            rederived = rw.follow_tokens(out, kept_index, layer, first_reduced)
            pruned.append(out)
            tokens_out = (n - span_len + new_span + method.added_tokens) if isinstance(n, int) and new_span is not None else "dynamic"
            layers.append({"block": layer, "at": "block input" if method.before_attention else "after attention",
                           "tokens_in": n, "kept": keep if keep else f"ceil({opts.keep}·span)", "keep_ratio": opts.keep,
                           "protected": start, "span_tokens": span_len, "first_block_reduced": first_reduced,
                           "fused": bool(fuse), "tokens_out": tokens_out,
                           "shape_values_rederived": rederived, **site.extra})
            if method.key_bias is not None:
                biases.append((layer, method.key_bias))
            n, span_len = tokens_out, new_span
        rw.bias_later_attention(biases)
        details = {"method": opts.method, "layers": layers, "tokens_before": n_orig, "tokens_after": n, **rw.finish(pruned, n_orig, n)}
        if rw.decoder is not None and removed is not None:
            details["cache_tokens_removed"] = cache_removed
        if tmap.prepended > start:  # DeiT's distillation token after the CLS: pruning it loses its head's input
            details["note"] = (f"the model prepends {tmap.prepended} learned tokens but the recipe protects {start}; "
                               f"protect = \"first:{tmap.prepended}\" keeps them all")
        self.record(details, changes_results=n != n_orig)
        return ir.passes.PassResult(model, modified=True)
