"""Block-sparse attention (Rectified SpaAttn): the attention of the listed blocks becomes one
BlockSparseAttention op each.

Analysis finds each block's attention (Softmax over q·kᵀ with the PV MatMul after it, or
the opset-23 Attention op); the op takes the same q, k (untransposed) and v, the scale
analysis read, and replaces the attention's output. The selection (`top_k` key blocks per
query block, sink and local blocks among them) and the rectification are the op's; its
decomposition computes the selected blocks' products only, so the saving reaches ONNX
Runtime. The op knows the causal rule (`causal`): from an Attention op's is_causal, or
from a mask written into the graph that is the causal rule (computed from constants and
shapes only, checked on probe inputs); other masks (padding, windows) are refused for now.

Images and video: blocks of consecutive tokens are rows of patches, whose attention is
spread over the rows above and below. `order` = tiled / hilbert gathers q, k and v into
an order where a block is a compact tile of the grid (the tokens before the grid, e.g. a
CLS token, stay first: they join the sink block), and the output back (4 gathers of the
[B, H, N, Dh] tensors, against the N²·Dh of the products).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Attention, structure_of
from ..errors import RecipeError, StructureError
from ..plugins import REGISTRY
from ..recipe import SparseAttentionOptions
from .base import TrimrtPass


class SparseAttentionPass(TrimrtPass):
    name = "sparse_attention"
    recipe_table = "sparse_attention"
    exact = False

    def __init__(self, options: SparseAttentionOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        tmap = structure_of(model, self.context.shared)
        depth = len(tmap.blocks)
        layers = opts.layers or tuple(range(depth))
        missing = [i for i in layers if i >= depth]
        if missing:
            raise RecipeError(f"[sparse_attention] layers {missing} do not exist: the model has {depth} blocks "
                              f"(0..{depth - 1})")
        n = tmap.num_tokens
        blocks = -(-n // opts.block_size) if isinstance(n, int) else None
        grid_tokens = int(np.prod(opts.grid)) if opts.grid else 0
        if opts.grid and isinstance(n, int) and n < grid_tokens:
            raise StructureError(f"[sparse_attention] the grid {list(opts.grid)} has {grid_tokens} patches but the "
                                 f"blocks see {n} tokens: give the model's patch grid")
        top_k = opts.top_k or 0
        masks = _CausalMasks(model, n)
        done = []
        for layer in layers:
            attn = tmap.blocks[layer].attention
            q, k, v, causal = _operands(attn, layer, masks)
            if opts.order != "sequence" and causal:
                raise StructureError(f"[sparse_attention] block {layer}'s attention is causal: its tokens keep their "
                                     "order (order = 'sequence')")
            b = self.builder(model.graph, f"trimrt_sparse_{layer}")
            if attn.k_transposed:
                k = b.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, name=f"trimrt_sparse_{layer}_keys")
            if opts.order != "sequence":
                order, inverse = _orders(b, q, patch_order(opts.grid, opts.order, opts.block_size))
                q, k, v = (b.Gather(x, order, axis=2) for x in (q, k, v))
            (out,) = b.emit(REGISTRY["BlockSparseAttention"], [q, k, v], name=f"trimrt_sparse_{layer}",
                            block_size=opts.block_size, top_k=top_k, tau=float(opts.tau), sink=opts.sink,
                            local=opts.local, causal=causal, rectify=int(opts.rectify), scale=float(attn.scale))
            if opts.order != "sequence":
                out = b.Gather(out, inverse, axis=2)
            out.dtype, out.shape = attn.output.dtype, attn.output.shape
            b.insert_after(attn.output.producer())
            ir.convenience.replace_all_uses_with(attn.output, out)
            done.append({"block": layer, "causal": bool(causal),
                         "key_blocks": min(top_k or blocks, blocks) if blocks else top_k or "all"})
        density = round(min(top_k or blocks, blocks) / blocks, 4) if blocks else None
        self.record({"tokens": n, "block_size": opts.block_size, "blocks": blocks, "top_k": top_k, "tau": opts.tau,
                     "density": density, "rectify": opts.rectify, "order": opts.order,
                     "grid": list(opts.grid) if opts.grid else None, "layers": done}, changes_results=True)
        return ir.passes.PassResult(model, modified=True)


def patch_order(grid: tuple[int, ...], order: str, block_size: int) -> np.ndarray:
    """The row-major indices of a grid's patches in `order`: tiled (tiles of about
    block_size patches, as square / cubic as the grid allows, tile by tile in row-major
    order) or hilbert (a 2-D Hilbert curve over the grid)."""
    if order == "hilbert":
        rows, cols = grid
        side = 1 << max(rows - 1, cols - 1, 0).bit_length()
        points = [_hilbert_point(side, d) for d in range(side * side)]
        return np.array([r * cols + c for r, c in points if r < rows and c < cols], np.int64)
    tile = [1] * len(grid)
    for factor in _prime_factors(block_size)[::-1]:  # largest first, to the axis with the smallest tile that fits
        fits = [a for a in range(len(grid)) if tile[a] * factor <= grid[a]]
        if not fits:
            break
        axis = min(fits, key=lambda a: (tile[a], -a))
        tile[axis] *= factor
    index = np.arange(int(np.prod(grid))).reshape(grid)
    coords = np.indices(grid).reshape(len(grid), -1)  # each patch's coordinates, row-major
    keys = [c // t for c, t in zip(coords, tile)] + [c % t for c, t in zip(coords, tile)]
    return index.reshape(-1)[np.lexsort(keys[::-1])].astype(np.int64)


def _hilbert_point(side: int, d: int) -> tuple[int, int]:
    """(row, column) of the d-th point of the Hilbert curve over a side × side square (side a power of 2)."""
    r = c = 0
    s = 1
    while s < side:
        rx, ry = 1 & (d // 2), 1 & (d ^ (d // 2))
        if ry == 0:
            if rx == 1:
                r, c = s - 1 - r, s - 1 - c
            r, c = c, r
        r, c = r + s * ry, c + s * rx
        d //= 4
        s *= 2
    return r, c


def _prime_factors(x: int) -> list[int]:
    factors, p = [], 2
    while p * p <= x:
        while x % p == 0:
            factors.append(p)
            x //= p
        p += 1
    return factors + ([x] if x > 1 else [])


def _orders(b, q: ir.Value, patches: np.ndarray) -> tuple[ir.Value, ir.Value]:
    """(order, inverse) over the N tokens of q [B, H, N, Dh]: the tokens before the grid first,
    then the grid's patches in `patches`' order; N may be symbolic."""
    prefix = b.Sub(b.Gather(b.Shape(q), b.const(2)), b.const(len(patches)))
    order = b.Concat(b.Range(b.const(0), prefix, b.const(1)), b.Add(b.const(patches), prefix), axis=0)
    inverse = b.Concat(b.Range(b.const(0), prefix, b.const(1)), b.Add(b.const(np.argsort(patches)), prefix), axis=0)
    return order, inverse


class _CausalMasks:
    """Which masks written into the graph are the causal rule: a mask computed from constants
    and the inputs' shapes only (no input's values: no padding), found on probe inputs of
    two lengths to be 0 on and below the diagonal and at most MASKED above it. Evaluated
    once per mask value (the blocks of a model share theirs)."""

    MASKED = -1e4  # a logit this low is no attention after the softmax

    def __init__(self, model: ir.Model, tokens):
        self.model, self.tokens, self.known, self.proto = model, tokens, {}, None

    def is_causal(self, attn: Attention) -> bool:
        if attn.mask is not None:
            value, visible = attn.mask, lambda m: np.where(m == 0, True, np.where(m <= self.MASKED, False, None))
        else:
            where = attn.mask_select
            logits_first = attn.core.inputs[0] is where.outputs[0] and where.inputs[1].producer() is not None \
                and where.inputs[1].const_value is None
            fill = where.inputs[2] if logits_first else where.inputs[1]
            if fill.const_value is None or float(np.max(fill.const_value.numpy())) > self.MASKED:
                return False
            value = where.inputs[0]
            visible = (lambda m: m.astype(bool)) if logits_first else (lambda m: ~m.astype(bool))
        if value.name not in self.known:
            self.known[value.name] = self._evaluate(value, visible)
        return self.known[value.name]

    def _evaluate(self, value: ir.Value, visible) -> bool:
        if _reads_input_values(value, set(self.model.graph.inputs)):
            return False
        from ..compiler.onnx_runner import OnnxRunner
        from ..plugins import runnable_proto

        if self.proto is None:
            self.proto = runnable_proto(ir.serde.serialize_model(self.model))
        for n in ([self.tokens] if isinstance(self.tokens, int) else [7, 19]):
            feeds = {x.name: np.zeros([d if isinstance(d, int) else n for d in x.shape], x.dtype.numpy())
                     for x in self.model.graph.inputs}
            mask = np.asarray(OnnxRunner(self.proto, [value.name], replace=True).run(feeds)[value.name])
            if mask.ndim < 2 or mask.shape[-2:] != (n, n):
                return False
            seen = visible(mask.reshape(-1, n, n))
            if any(x is None for x in seen.reshape(-1)) or not (seen == np.tril(np.ones((n, n), bool))).all():
                return False
        return True


def _reads_input_values(value: ir.Value, inputs: set) -> bool:
    """Whether `value` depends on a graph input's values (its shape only does not count)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in inputs:
            return True
        node = v.producer()
        if node is None or id(node) in seen or node.op_type == "Shape":
            continue
        seen.add(id(node))
        stack.extend(x for x in node.inputs if x is not None)
    return False


def _operands(attn: Attention, layer: int, masks: _CausalMasks) -> tuple[ir.Value, ir.Value, ir.Value, int]:
    """(q, k or kᵀ, v, causal) of a block's attention; refuses what the op cannot take."""
    masked = attn.mask is not None or attn.mask_select is not None
    if masked and not masks.is_causal(attn):
        raise StructureError(f"[sparse_attention] block {layer}'s attention has a mask that is not the causal rule "
                             "(padding, a window, or one computed from the inputs' values); block-sparse attention "
                             "takes unmasked or causal attention only so far: remove the block from layers")
    if attn.core.op_type == "Attention":
        q, k, v = attn.core.inputs[:3]
        causal = max(attn.core.attributes.get_int("is_causal", 0), int(masked))
    else:
        context = attn.output.producer()
        q, k, v, causal = attn.q, attn.k, context.inputs[1], int(masked)
    heads = [x.shape[1] if x.shape is not None and len(x.shape) == 4 else None for x in (q, k, v)]
    if all(isinstance(h, int) for h in heads) and len(set(heads)) > 1:
        raise StructureError(f"[sparse_attention] block {layer}'s attention groups its key heads (q, k, v heads "
                             f"{heads}); block-sparse attention needs them repeated to the query heads")
    return q, k, v, causal
