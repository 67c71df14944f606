"""Block-sparse attention (Rectified SpaAttn): the attention of the listed blocks becomes one
BlockSparseAttention op each.

Analysis finds each block's attention (Softmax over q·kᵀ with the PV MatMul after it, or
the opset-23 Attention op); the op takes the same q, k (untransposed) and v, the scale
analysis read, and replaces the attention's output. The selection (`top_k` key blocks per
query block, sink and local blocks among them) and the rectification are the op's; its
decomposition computes the selected blocks' products only, so the saving reaches ONNX
Runtime. Attention with a mask (padding, causal masks written into the graph) is refused
for now: the op knows the causal rule (`causal`, from an Attention op's is_causal) but
not an arbitrary mask.
"""

from __future__ import annotations

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
        done = []
        for layer in layers:
            attn = tmap.blocks[layer].attention
            q, k, v, causal = _operands(attn, layer)
            b = self.builder(model.graph, f"trimrt_sparse_{layer}")
            if attn.k_transposed:
                k = b.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, name=f"trimrt_sparse_{layer}_keys")
            (out,) = b.emit(REGISTRY["BlockSparseAttention"], [q, k, v], name=f"trimrt_sparse_{layer}",
                            block_size=opts.block_size, top_k=opts.top_k, sink=opts.sink, local=opts.local,
                            causal=causal, rectify=int(opts.rectify), scale=float(attn.scale))
            out.dtype, out.shape = attn.output.dtype, attn.output.shape
            b.insert_after(attn.output.producer())
            ir.convenience.replace_all_uses_with(attn.output, out)
            done.append({"block": layer, "causal": bool(causal),
                         "key_blocks": min(opts.top_k, blocks) if blocks else opts.top_k})
        self.record({"tokens": n, "block_size": opts.block_size, "blocks": blocks, "top_k": opts.top_k,
                     "density": round(min(opts.top_k, blocks) / blocks, 4) if blocks else None,
                     "rectify": opts.rectify, "layers": done}, changes_results=True)
        return ir.passes.PassResult(model, modified=True)


def _operands(attn: Attention, layer: int) -> tuple[ir.Value, ir.Value, ir.Value, int]:
    """(q, k or kᵀ, v, causal) of a block's attention; refuses what the op cannot take."""
    if attn.mask is not None or attn.mask_select is not None:
        raise StructureError(f"[sparse_attention] block {layer}'s attention has a mask (padding or causal, written "
                             "into the graph); block-sparse attention takes unmasked attention only so far (e.g. a "
                             "ViT or a DiT): remove the block from layers")
    if attn.core.op_type == "Attention":
        q, k, v = attn.core.inputs[:3]
        causal = attn.core.attributes.get_int("is_causal", 0)
    else:
        context = attn.output.producer()
        q, k, v, causal = attn.q, attn.k, context.inputs[1], 0
    heads = [x.shape[1] if x.shape is not None and len(x.shape) == 4 else None for x in (q, k, v)]
    if all(isinstance(h, int) for h in heads) and len(set(heads)) > 1:
        raise StructureError(f"[sparse_attention] block {layer}'s attention groups its key heads (q, k, v heads "
                             f"{heads}); block-sparse attention needs them repeated to the query heads")
    return q, k, v, causal
