"""The token-pruning methods: one registered class each (`[token_pruning] method = "..."`).

A method says what the recipe needs to know about it — its own recipe keys (and how
they are checked), whether `fuse_pruned` applies, whether it reads the stream entering
the block or the stream after the attention — and builds, at one pruning site, the
scoring op and the selection that follows it. TokenPruningPass does the rest (the
span, travelling tensors, shape constants, the report); adding a method is adding one
class here, registered with `@TOKEN_PRUNING_METHODS.register("name")`.

An instance lives for one run of the pass (state that carries from one pruned layer
to the next, such as recycle's patch positions or adaptive's key bias, is kept on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Block
from ..errors import RecipeError, StructureError
from ..plugins import REGISTRY
from ..registry import TOKEN_PRUNING_METHODS
from .base import GraphBuilder
from .token_graph import BLOCKED, TokenRewrite, additive_mask, attention_probs, head_mean_keys, transposed_keys


@dataclass
class Site:
    """One pruning site: the block, the stream the method reads, the builder collecting
    the nodes (placed after the stream's producer), the TokenPrune-style selection
    attributes, and the extra report entries the method adds."""

    b: GraphBuilder
    block: Block
    layer: int
    step: int  # position of the layer in the recipe's list
    stream: ir.Value
    prefix: str
    select: dict[str, Any]  # keep, protect, span_end, keep_ratio
    fuse: bool
    extra: dict[str, Any] = field(default_factory=dict)


class PruningMethod:
    """Base of the methods: a score op, then TokenPrune (top-k of the span) with the
    optional fused token."""

    #: recipe keys that belong to this method only
    keys: ClassVar[tuple[str, ...]] = ()
    #: why `fuse_pruned` does not apply to this method (None: it does)
    no_fuse: ClassVar[str | None] = None
    #: the method reads the stream entering the block (before its attention), not after it
    before_attention: ClassVar[bool] = False
    #: the ops always get the span's end (not 0 for "to the last token")
    explicit_span_end: ClassVar[bool] = False
    #: tokens a site adds beyond the kept ones (and the fused one)
    added_tokens = 0
    #: why the method cannot prune the prompt of a KV-cache decoder (None: it can; each
    #: site's ops then run in an If branch taken at prefill only, so no state may cross sites)
    no_kv_cache: ClassVar[str | None] = None

    @classmethod
    def parse(cls, table: Mapping[str, Any], where: str, layers: tuple[int, ...]) -> dict[str, Any]:
        """The checked values of this method's own keys present in the recipe table."""
        return {}

    def __init__(self, options, rewrite: TokenRewrite) -> None:
        self.options = options
        self.rewrite = rewrite
        #: 0 / BLOCKED per token, for the attention of later blocks (adaptive), else None
        self.key_bias: ir.Value | None = None

    def prepare(self, n, protect: int, span_len) -> None:
        """Check the model's token layout before any site (raise StructureError / RecipeError)."""

    def score(self, site: Site) -> ir.Value:
        raise NotImplementedError

    def select(self, site: Site, score: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(new stream, kept indices into the previous tokens)."""
        norm = self._norm_to_sink(site)
        tokens = site.stream if norm is None else norm.inputs[0]
        out, kept_index, fused = site.b.emit(REGISTRY["TokenPrune"], [tokens, score], name=site.prefix, **site.select)
        if norm is not None:
            out = site.b.op(norm.op_type, [out, *norm.inputs[1:]], dict(norm.attributes), name=f"{site.prefix}_norm")
        if site.fuse:
            out, kept_index = _insert_fused(site, out, kept_index, fused)
        return out, kept_index

    def _norm_to_sink(self, site: Site) -> ir.Node | None:
        """The LayerNormalization producing the stream (a post-LN block's), when the selection
        can gather its input instead and normalise the kept tokens only: the same values
        (LayerNorm is per token), the norm on fewer tokens, and on OpenVINO the norm still
        writes the next INT8 MatMul's input (a gather after it cost a reorder). Only where
        nothing else reads the full stream (the pruning score, a decoder's keep-all branch)
        and no fused token is made (EViT's fusion sums the normalised tokens)."""
        norm = site.stream.producer()
        if (site.fuse or self.rewrite.decoder is not None or norm is None or norm.op_type != "LayerNormalization"
                or norm.domain not in ("", "ai.onnx") or any(out.uses() for out in norm.outputs[1:])
                or any(user in site.b.nodes for user, _ in site.stream.uses())):
            return None
        axis, rank = norm.attributes.get_int("axis", -1), norm.inputs[0].shape and len(norm.inputs[0].shape)
        return norm if axis == -1 or (rank and axis == rank - 1) else None


def _insert_fused(site: Site, y, kept_index, fused) -> tuple[ir.Value, ir.Value]:
    """Place the fused token right after the kept span tokens (at the end when the span
    runs to the last token); for masks and positions it stands where the last kept
    span token stands."""
    b, prefix = site.b, site.prefix
    if site.select["span_end"] == 0:  # the span reaches the end: append
        concat = b.op("Concat", [y, fused], {"axis": 1}, name=f"{prefix}_fuse")
        last = b.op("Slice", [kept_index, b.const(np.array([-1]), name=f"{prefix}_m1"),
                              b.const(np.array([np.iinfo(np.int64).max]), name=f"{prefix}_big"),
                              b.const(np.array([1]), name=f"{prefix}_ax1")], name=f"{prefix}_fuse_pos")
        return concat, b.op("Concat", [kept_index, last], {"axis": 1}, name=f"{prefix}_fuse_index")
    cut = site.select["protect"] + site.select["keep"]
    cut_v = b.const(np.array([cut], dtype=np.int64), name=f"{prefix}_cut")
    n_y = b.op("Shape", [y], {"start": 1, "end": 2}, name=f"{prefix}_ny")
    rest = b.op("Sub", [n_y, cut_v], name=f"{prefix}_rest")
    sizes = b.op("Concat", [cut_v, rest], {"axis": 0}, name=f"{prefix}_sizes")
    y_parts = b.op_multi_out("Split", [y, sizes], {"axis": 1}, num_outputs=2, name=f"{prefix}_y_split")
    i_parts = b.op_multi_out("Split", [kept_index, sizes], {"axis": 1}, num_outputs=2, name=f"{prefix}_i_split")
    last = b.op("Slice", [kept_index, b.const(np.array([cut - 1]), name=f"{prefix}_c0"), cut_v,
                          b.const(np.array([1]), name=f"{prefix}_ax1")], name=f"{prefix}_fuse_pos")
    y_new = b.op("Concat", [y_parts[0], fused, y_parts[1]], {"axis": 1}, name=f"{prefix}_fuse")
    i_new = b.op("Concat", [i_parts[0], last, i_parts[1]], {"axis": 1}, name=f"{prefix}_fuse_index")
    return y_new, i_new


class RowScoreMethod(PruningMethod):
    """Score = the attention one query row pays each key (AttentionRowScore)."""

    #: the scoring row: 0 (CLS), -1 (last token); None: the CLS when one is protected and
    #: the span runs to the end, else the last token
    row: ClassVar[int | None] = None

    def score(self, site: Site) -> ir.Value:
        b, attn, prefix = site.b, site.block.attention, site.prefix
        row = self.row if self.row is not None else (0 if self.options.prunable is None and site.select["protect"] > 0 else -1)
        mask = additive_mask(b, attn, prefix, self.rewrite.gathered, self.key_bias)
        k_t = transposed_keys(b, attn, prefix)
        (score,) = b.emit(REGISTRY["AttentionRowScore"], [attn.q, k_t, mask], name=f"{prefix}_score", row=row,
                          scale=float(attn.scale))
        return score


@TOKEN_PRUNING_METHODS.register("cls_attention")
class ClsAttention(RowScoreMethod):
    """EViT: the CLS token's attention row."""

    row = 0


@TOKEN_PRUNING_METHODS.register("last_token_attention")
class LastTokenAttention(RowScoreMethod):
    """FastV: the last token's attention row."""

    row = -1


def page_rank_iterations(layer: int, depth: int) -> int:
    """Zero-TPrune's default schedule: many iterations early, one in the last layers."""
    return 1 if layer >= depth - 3 else (30 if layer < 3 else 5)


@TOKEN_PRUNING_METHODS.register("zero_tprune")
class ZeroTPrune(PruningMethod):
    """AttentionPageRank (weighted PageRank per head, head filter, similarity stage) on
    the block's attention probabilities."""

    keys = ("iterations", "head_variance")

    @classmethod
    def parse(cls, table, where, layers):
        from ..recipe import MAX_ITERATIONS, _is_int

        extra: dict[str, Any] = {}
        if "iterations" in table:
            its = table["iterations"]
            if not isinstance(its, (list, tuple)) or len(its) != len(layers) or not all(_is_int(i) and i >= 1 for i in its):
                raise RecipeError(f"{where}: iterations must list one integer >= 1 per layer ({len(layers)}), got {its!r}")
            if max(its) > MAX_ITERATIONS:
                raise RecipeError(f"{where}: iterations must be at most {MAX_ITERATIONS} (PageRank converges in tens; "
                                  f"the paper uses up to 30), got {max(its)}")
            extra["iterations"] = tuple(i for _, i in sorted(zip(layers, its)))
        if "head_variance" in table:
            hv = table["head_variance"]
            if (not isinstance(hv, (list, tuple)) or len(hv) != 2 or not all(isinstance(v, (int, float)) for v in hv)
                    or not 0 <= hv[0] <= hv[1]):
                raise RecipeError(f"{where}: head_variance must be [low, high] with 0 <= low <= high, got {hv!r}")
            extra["head_variance"] = (float(hv[0]), float(hv[1]))
        return extra

    def score(self, site: Site) -> ir.Value:
        b, attn, prefix, opts = site.b, site.block.attention, site.prefix, self.options
        probs = attention_probs(b, attn, prefix, self.rewrite.gathered)
        metric = head_mean_keys(b, attn, prefix)
        its = (opts.iterations[site.step] if opts.iterations is not None
               else page_rank_iterations(site.layer, len(self.rewrite.tmap.blocks)))
        low, high = opts.head_variance
        (score,) = b.emit(REGISTRY["AttentionPageRank"], [probs, metric], name=f"{prefix}_score", iterations=its,
                          var_min=low, var_max=high, protect=site.select["protect"], span_end=site.select["span_end"])
        site.extra["iterations"] = its
        return score


@TOKEN_PRUNING_METHODS.register("divprune")
class DivPrune(PruningMethod):
    """DiversityRank (greedy max–min cosine diversity) on the tokens entering the block."""

    before_attention = True

    def score(self, site: Site) -> ir.Value:
        (score,) = site.b.emit(REGISTRY["DiversityRank"], [site.stream], name=f"{site.prefix}_score", **site.select)
        return score


@TOKEN_PRUNING_METHODS.register("recycle")
class Recycle(RowScoreMethod):
    """VFlowOpt: the dropped tokens are merged into one token per cell of a grid over the
    patch layout (TokenRecycle)."""

    keys = ("recycle_grid",)
    no_fuse = "recycle merges the dropped tokens itself"
    no_kv_cache = "its patch positions carry from one pruned layer to the next"
    explicit_span_end = True

    @classmethod
    def parse(cls, table, where, layers):
        from ..recipe import MAX_RECYCLE_GRID, _is_int

        if "recycle_grid" not in table:
            return {}
        grid = table["recycle_grid"]
        if not _is_int(grid) or not 1 <= grid <= MAX_RECYCLE_GRID:
            raise RecipeError(f"{where}: recycle_grid must be an integer in [1, {MAX_RECYCLE_GRID}], got {grid!r}")
        return {"recycle_grid": grid}

    #: original patch index of each token, [B, N] (made at the first site); the layout (set by prepare)
    position: ir.Value | None = None
    patch_side = first_patch = 0

    def prepare(self, n, protect: int, span_len) -> None:
        if not isinstance(span_len, int):
            raise StructureError("recycle needs a static token count (its grid is laid over the image patches)")
        side = math.isqrt(span_len)
        if side * side != span_len:
            raise StructureError(f"recycle lays its grid over a square patch layout; the prunable span has {span_len} "
                                 "tokens, not a square number (set prunable = [start, end) to the patch tokens)")
        if self.options.recycle_grid > side:
            raise RecipeError(f"[token_pruning] recycle_grid = {self.options.recycle_grid} is larger than the "
                              f"{side}×{side} patch layout")
        self.patch_side, self.first_patch = side, protect
        self.added_tokens = self.options.recycle_grid ** 2

    def select(self, site: Site, score: ir.Value) -> tuple[ir.Value, ir.Value]:
        b, prefix, stream = site.b, site.prefix, site.stream
        if self.position is None:  # original index of every token, [B, N]
            shape = b.op("Shape", [stream], {"start": 0, "end": 2}, name=f"{prefix}_pos_shape")
            count = b.op("Shape", [stream], {"start": 1, "end": 2}, name=f"{prefix}_pos_n")
            zero = b.const(np.array(0, np.int64), name=f"{prefix}_pos_zero")
            one = b.const(np.array(1, np.int64), name=f"{prefix}_pos_one")
            rng = b.op("Range", [zero, b.op("Squeeze", [count], name=f"{prefix}_pos_ns"), one], name=f"{prefix}_pos_range")
            self.position = b.op("Expand", [rng, shape], name=f"{prefix}_pos")
        grid = self.options.recycle_grid
        out, kept_index = b.emit(REGISTRY["TokenRecycle"], [stream, score, self.position], name=prefix,
                                 **site.select, grid=grid, patch_rows=self.patch_side, patch_cols=self.patch_side,
                                 first_patch=self.first_patch)
        self.position = b.op("GatherElements", [self.position, kept_index], {"axis": 1}, name=f"{prefix}_pos_kept")
        site.extra["cells"] = grid ** 2
        return out, kept_index


@TOKEN_PRUNING_METHODS.register("adaptive")
class Adaptive(RowScoreMethod):
    """ATP-style: TokenPrune with k = ceil(keep · span) as a static upper bound, then
    MassMask: only the tokens holding `mass` of the attention stay visible; the others
    are masked out of every later attention (static shapes, a validity mask, no NonZero)."""

    keys = ("mass",)
    no_fuse = "adaptive masks the dropped tokens"
    no_kv_cache = "its validity mask would have to travel with the cache"

    @classmethod
    def parse(cls, table, where, layers):
        if "mass" not in table:
            return {}
        mass = table["mass"]
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < mass <= 1.0:
            raise RecipeError(f"{where}: mass must be a number in (0, 1], got {mass!r}")
        return {"mass": float(mass)}

    def select(self, site: Site, score: ir.Value) -> tuple[ir.Value, ir.Value]:
        """MassMask after the static top-k: tokens outside the input's attention mass get a
        blocking key bias in every later attention (the previous bias, gathered, joins it)."""
        out, kept_index = super().select(site, score)
        b, prefix = site.b, site.prefix
        valid, count = b.emit(REGISTRY["MassMask"], [score, kept_index], name=f"{prefix}_mass",
                              tau=float(self.options.mass), protect=site.select["protect"], span_end=site.select["span_end"])
        count.name = f"{prefix}_visible_count"
        zero = b.const(np.array(0.0, np.float32), name=f"{prefix}_bias_zero")
        blocked = b.const(np.array(BLOCKED, np.float32), name=f"{prefix}_bias_blocked")
        is_valid = b.op("Cast", [valid], {"to": ir.DataType.BOOL}, name=f"{prefix}_valid")
        bias = b.op("Where", [is_valid, zero, blocked], name=f"{prefix}_bias")
        if self.key_bias is not None:
            old = b.op("GatherElements", [self.key_bias, kept_index], {"axis": 1}, name=f"{prefix}_bias_prev")
            bias = b.op("Min", [old, bias], name=f"{prefix}_bias_all")
        self.key_bias = bias
        site.extra["visible_count"] = count.name
        return out, kept_index
