"""Token merging (ToMe): at chosen blocks, between the attention and the MLP, merge r tokens
into their most similar ones with trimrt::TokenMerge (bipartite soft matching on the
head-mean keys; the merge is a one-hot matmul, exact and TensorRT-safe, unlike
scatter-with-reduction). The size vector (how many original tokens each token stands for)
travels from merge to merge; with proportional attention log(size) biases every later
block's logits. Tensors travelling with the tokens (padding masks) follow `index`.
"""

from __future__ import annotations

import onnx_ir as ir

from ..compiler.probe import TokenDims
from ..plugins import REGISTRY
from ..plugins.token_merge import merged_count
from ..recipe import TokenMergingOptions
from .token_graph import TokenGraphPass, head_mean_keys, ones


class TokenMergingPass(TokenGraphPass):
    name = "token_merging"
    recipe_table = "token_merging"
    options: TokenMergingOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        rw = self._rewrite(model, opts.layers)
        schedule = opts.schedule(len(rw.tmap.blocks))
        n = n_orig = rw.tmap.num_tokens
        rw.dims = TokenDims(model, n, self.context.shared)
        protect, size = opts.protected_prefix, None  # size: how many original tokens each token stands for
        layers, merged, biases = [], [], []
        for layer, asked in schedule:
            # as ToMe does, a block merges at most its mergeable tokens (the op clamps at
            # run time too, so dynamic lengths work; a static count is reported exactly)
            r = merged_count(n, asked, protect, ratio=opts.ratio) if isinstance(n, int) else asked
            if r == 0 and (isinstance(n, int) or not opts.ratio):
                continue
            block = rw.tmap.blocks[layer]
            stream = block.stream_mid
            uses = rw.stream_uses(stream, layer)
            prefix = f"trimrt_merge_{layer}"
            b = rw.builder(prefix)
            if size is None:
                size = ones(b, stream, prefix)
            metric = head_mean_keys(b, block.attention, prefix)
            out, size, index = b.emit(REGISTRY["TokenMerge"], [stream, metric, size], name=prefix, r=r,
                                      protect=protect, ratio=opts.ratio)
            if opts.proportional_attention:
                biases.append((layer, b.op("Log", [size], name=f"{prefix}_log_size")))
            rw.replace_stream(b, stream, uses, out)
            rederived = rw.follow_tokens(out, index, layer)
            merged.append(out)
            tokens_out = n - r if isinstance(n, int) else "dynamic"
            merged_text = f"min({r}, mergeable)" if r else f"min(floor({opts.ratio}·tokens), mergeable)"
            layers.append({"block": layer, "tokens_in": n, "merged": r if isinstance(n, int) else merged_text,
                           "r": r, "ratio": opts.ratio, "tokens_out": tokens_out,
                           "shape_values_rederived": rederived, **({"clamped_from": asked} if asked and r != asked else {})})
            n = tokens_out
        if not merged:
            self.record({"layers": [], "tokens_before": n_orig, "tokens_after": n_orig})
            return ir.passes.PassResult(model, modified=False)
        rw.bias_later_attention(biases)
        weighted = rw.weight_pooling(size) if opts.weighted_pooling else []
        self.record({"method": "tome", "layers": layers, "tokens_before": n_orig, "tokens_after": n,
                     "proportional_attention": opts.proportional_attention, "weighted_pooling": weighted,
                     **rw.finish(merged, n_orig, n)}, changes_results=n != n_orig)
        return ir.passes.PassResult(model, modified=True)
