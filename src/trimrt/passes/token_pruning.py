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

import math

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Block
from ..compiler.probe import TokenDims
from .token_shapes import free_token_count
from ..errors import RecipeError, StructureError
from ..recipe import TokenPruningOptions
from .token_graph import BLOCKED, TokenGraphPass, clear_stale_shapes

SCORE_ROW = {"cls_attention": 0, "last_token_attention": -1}


def page_rank_iterations(layer: int, depth: int) -> int:
    """Zero-TPrune's default schedule: many iterations early, one in the last layers."""
    if layer >= depth - 3:
        return 1
    return 30 if layer < 3 else 5


class TokenPruningPass(TokenGraphPass):
    name = "token_pruning"
    recipe_table = "token_pruning"
    exact = False

    def __init__(self, options: TokenPruningOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        tmap = self._structure(model, opts.layers, "token_pruning")
        depth = len(tmap.blocks)
        n = tmap.num_tokens
        start, end = opts.protected_prefix, opts.span_end
        if isinstance(n, int) and (start >= n or (end is not None and end > n)):
            raise RecipeError(f"[token_pruning] the prunable span [{start}, {end or n}) does not fit the model's {n} tokens")
        self.depth = depth
        dims = TokenDims(model, n)  # token axes of the original graph's values (probed when dynamic)
        n_orig = n
        layers, pruned, aligned, gathered = [], [], None, {}
        span_len = (end - start) if end is not None else (n - start if isinstance(n, int) else None)
        self._recycle_setup(n, start, span_len)
        self.position = None  # recycle: original patch index of each token
        self.key_bias = None  # adaptive: 0 / BLOCKED per token, for the attention of later blocks
        biases = []  # (layer, key bias valid after it)
        for i, layer in enumerate(opts.layers):
            block = tmap.blocks[layer]
            keep = opts.kept_count(span_len) if span_len is not None else 0  # 0: the op computes k at run time
            fuse = opts.fuse_pruned and (keep < span_len if keep else opts.keep < 1.0)
            span_end_attr = (start + span_len) if (end is not None or opts.method == "recycle") else 0
            out, kept_index, extra = self._prune(block, layer, keep, start, span_end_attr, fuse, gathered, i)
            aligned, _, rederived = self._follow_tokens(out, kept_index, layer, dims, aligned, gathered)
            pruned.append(out)
            new_span = (keep + (1 if fuse else 0)) if keep else None
            added = self.options.recycle_grid ** 2 if opts.method == "recycle" else 0
            tokens_out = (n - span_len + new_span + added) if isinstance(n, int) and new_span is not None else "dynamic"
            entry = {"block": layer, "at": "block input" if opts.method == "divprune" else "after attention",
                     "tokens_in": n, "kept": keep if keep else f"ceil({opts.keep}·span)", "keep_ratio": opts.keep,
                     "protected": start,
                     "fused": bool(fuse), "tokens_out": tokens_out, "shape_values_rederived": rederived, **extra}
            layers.append(entry)
            if self.key_bias is not None:
                biases.append((layer, self.key_bias))
            n, span_len = tokens_out, new_span
        self._bias_later_attention(tmap.blocks, biases)
        rewritten = free_token_count(self.graph, pruned, n_orig, self.name, self._make, dims) if isinstance(n_orig, int) else 0
        clear_stale_shapes(self.graph, pruned[:1], n_orig, n)
        details = {"method": opts.method, "layers": layers, "tokens_before": n_orig, "tokens_after": n,
                   "travelling_tensors": sorted(v.name for v in aligned), "shape_constants_rewritten": rewritten}
        if tmap.prepended > start:  # DeiT's distillation token after the CLS: pruning it loses its head's input
            details["note"] = (f"the model prepends {tmap.prepended} learned tokens but the recipe protects {start}; "
                                   f"protect = \"first:{tmap.prepended}\" keeps them all")
        self.record(details, changes_results=n != n_orig)
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------------ methods

    def _prune(self, block: Block, layer: int, keep: int, protect: int, span_end: int, fuse: bool, gathered: dict,
               step: int) -> tuple[ir.Value, ir.Value, dict]:
        """Insert scoring + selection at this block; return (new stream, kept indices into
        the previous tokens, extra report entries)."""
        method = self.options.method
        attn = block.attention
        stream = block.stream_in if method == "divprune" else block.stream_mid
        uses = self._stream_uses(stream, layer)
        prefix = f"trimrt_prune_{layer}"
        nodes: list[ir.Node] = []
        select = {"keep": keep, "protect": protect, "span_end": span_end, "keep_ratio": float(self.options.keep)}
        extra: dict = {}
        if method in SCORE_ROW or method in ("recycle", "adaptive"):
            row = SCORE_ROW.get(method, 0 if self.options.prunable is None and protect > 0 else -1)
            mask = self._additive_mask(attn, prefix, nodes, gathered, self.key_bias)
            k_t = self._transposed_keys(attn, prefix, nodes)
            score = self._node("AttentionRowScore", [attn.q, k_t, mask], {"row": row, "scale": float(attn.scale)},
                               f"{prefix}_score", domain="trimrt")
        elif method == "zero_tprune":
            probs = self._attention_probs(attn, prefix, nodes, gathered)
            metric = self._head_mean_keys(attn, prefix, nodes)
            its = (self.options.iterations[step] if self.options.iterations is not None
                   else page_rank_iterations(layer, self.depth))
            low, high = self.options.head_variance
            score = self._node("AttentionPageRank", [probs, metric],
                               {"iterations": its, "var_min": low, "var_max": high, "protect": protect,
                                "span_end": span_end}, f"{prefix}_score", domain="trimrt")
            extra["iterations"] = its
        elif method == "divprune":
            score = self._node("DiversityRank", [stream], select, f"{prefix}_score", domain="trimrt")
        else:  # pragma: no cover - the recipe validates methods
            raise RecipeError(f"[token_pruning] unknown method {method!r}")
        nodes.append(score)
        if method == "recycle":
            out, kept_index = self._recycle(stream, score.outputs[0], select, prefix, nodes)
            extra["cells"] = self.options.recycle_grid ** 2
        else:
            prune = self._node("TokenPrune", [stream, score.outputs[0]], select, prefix, domain="trimrt", num_outputs=3)
            nodes.append(prune)
            out, kept_index, fused = prune.outputs
            if fuse:
                out, kept_index = self._insert_fused(out, kept_index, fused, keep, protect, span_end, prefix, nodes)
            if method == "adaptive":
                extra["visible_count"] = self._adaptive_mask(score.outputs[0], kept_index, protect, span_end, prefix,
                                                             nodes)
        self._replace_stream(stream, uses, nodes, out)
        return out, kept_index, extra

    def _adaptive_mask(self, score, kept_index, protect, span_end, prefix, nodes) -> str:
        """MassMask after the static top-k: tokens outside the input's attention mass get a
        blocking key bias in every later attention (the previous bias, gathered, joins it)."""
        mass = self._node("MassMask", [score, kept_index], {"tau": float(self.options.mass), "protect": protect,
                                                             "span_end": span_end}, f"{prefix}_mass", domain="trimrt",
                          num_outputs=2)
        valid, count = mass.outputs
        count.name = f"{prefix}_visible_count"
        zero = self._const(f"{prefix}_bias_zero", np.array(0.0, np.float32))
        blocked = self._const(f"{prefix}_bias_blocked", np.array(BLOCKED, np.float32))
        is_valid = self._node("Cast", [valid], {"to": ir.DataType.BOOL}, f"{prefix}_valid")
        bias = self._node("Where", [is_valid.outputs[0], zero, blocked], {}, f"{prefix}_bias")
        nodes += [mass, is_valid, bias]
        new_bias = bias.outputs[0]
        if self.key_bias is not None:
            old = self._node("GatherElements", [self.key_bias, kept_index], {"axis": 1}, f"{prefix}_bias_prev")
            both = self._node("Min", [old.outputs[0], new_bias], {}, f"{prefix}_bias_all")
            nodes += [old, both]
            new_bias = both.outputs[0]
        self.key_bias = new_bias
        return count.name

    def _recycle_setup(self, n, protect: int, span_len) -> None:
        if self.options.method != "recycle":
            return
        if not isinstance(span_len, int):
            raise StructureError("recycle needs a static token count (its grid is laid over the image patches)")
        side = math.isqrt(span_len)
        if side * side != span_len:
            raise StructureError(f"recycle lays its grid over a square patch layout; the prunable span has {span_len} "
                                 "tokens, not a square number (set prunable = [start, end) to the patch tokens)")
        if self.options.recycle_grid > side:
            raise RecipeError(f"[token_pruning] recycle_grid = {self.options.recycle_grid} is larger than the "
                              f"{side}×{side} patch layout")
        self.patch_side = side
        self.first_patch = protect

    def _recycle(self, stream, score, select, prefix, nodes) -> tuple[ir.Value, ir.Value]:
        if self.position is None:  # original index of every token, [B, N]
            shape = self._node("Shape", [stream], {"start": 0, "end": 2}, f"{prefix}_pos_shape")
            count = self._node("Shape", [stream], {"start": 1, "end": 2}, f"{prefix}_pos_n")
            zero = self._const(f"{prefix}_pos_zero", np.array(0, np.int64))
            one = self._const(f"{prefix}_pos_one", np.array(1, np.int64))
            n_s = self._node("Squeeze", [count.outputs[0]], {}, f"{prefix}_pos_ns")
            rng = self._node("Range", [zero, n_s.outputs[0], one], {}, f"{prefix}_pos_range")
            pos = self._node("Expand", [rng.outputs[0], shape.outputs[0]], {}, f"{prefix}_pos")
            nodes += [shape, count, n_s, rng, pos]
            self.position = pos.outputs[0]
        grid = self.options.recycle_grid
        recycle = self._node("TokenRecycle", [stream, score, self.position],
                             {**select, "grid": grid, "patch_rows": self.patch_side, "patch_cols": self.patch_side,
                              "first_patch": self.first_patch}, prefix, domain="trimrt", num_outputs=2)
        out, kept_index = recycle.outputs
        new_pos = self._node("GatherElements", [self.position, kept_index], {"axis": 1}, f"{prefix}_pos_kept")
        nodes += [recycle, new_pos]
        self.position = new_pos.outputs[0]
        return out, kept_index

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
