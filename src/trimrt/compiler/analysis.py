"""Structure analysis: find the transformer blocks of an exported graph.

`analyse(model) -> TransformerMap` works from the graph alone. An attention core is a
Softmax whose input comes, through scalar scaling (Mul/Div by a constant) and masking
(Add), from a MatMul of two activations (Q·Kᵀ), and whose output feeds a MatMul with
V. Its block is delimited by the residual Add that joins an ancestor of Q (the stream
entering the block) with the attention output. In pre-norm blocks the stream after
the attention sub-layer is that Add; in post-norm blocks (BERT) it is the
LayerNormalization that follows. The token axis is the axis of the residual stream
whose size equals the number of keys.

When the structure is not there, analysis raises StructureError saying what it
found and what is missing: it never guesses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ..errors import StructureError
from .probe import PROBE_TOKENS, once, probe_shapes, wiring

_PASS_THROUGH = frozenset({"Cast", "Identity", "Dropout"})


@dataclass
class Attention:
    """One attention core: softmax(q·kᵀ·scale + mask)·v, as separate ops or one fused op."""

    core: ir.Node  # the Softmax, or the fused Attention node (opset 23)
    q: ir.Value  # queries [B, H, N, Dh] (possibly pre-scaled)
    k: ir.Value  # keys: transposed [B, H, Dh, N] when k_transposed, else [B, Hkv, N, Dh]
    k_transposed: bool
    output: ir.Value  # the attention's context output
    scale: float  # factor applied to q·kᵀ before the softmax
    mask: ir.Value | None  # additive mask added to the logits, if any
    mask_select: ir.Node | None = None  # or a Where(condition, logits, fill) masking them
    product: ir.Node | None = None  # the q·kᵀ MatMul (the Softmax form; None for a fused op)

    def keys_shape(self, shape_of=lambda value: value.shape):
        """Shape whose last entry is the number of keys; `shape_of(value)`: the graph's shape, or a probed one."""
        if self.core.op_type == "Softmax":
            return shape_of(self.core.inputs[0])
        shape = shape_of(self.k)
        return None if shape is None else list(shape)[:-1]

    @property
    def num_heads(self) -> int | None:
        shape = self.q.shape
        return shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None


@dataclass
class Block:
    index: int
    attention: Attention
    stream_in: ir.Value  # residual stream entering the block
    residual_add: ir.Node  # Add(stream_in, attention output)
    stream_mid: ir.Value  # residual stream after the attention sub-layer (a parallel block's: after both)
    post_norm: bool
    parallel: bool = False  # attention and MLP side by side from one input (GPT-NeoX / GPT-J / Falcon)


@dataclass
class TransformerMap:
    blocks: list[Block]
    token_axis: int
    num_tokens: int | str | None  # static count, or the symbolic name of a dynamic one
    width: int | None
    pooling: str  # "cls" (outputs read token 0), "all" (outputs keep the token axis), "cls+all" or "unknown"
    notes: list[str] = field(default_factory=list)
    prepended: int = 0  # learned tokens concatenated before the inputs' tokens (CLS, DeiT's distillation token)

    def require_serial(self) -> None:
        """Token passes act between a block's attention and its MLP: refuse parallel blocks."""
        block = next((b for b in self.blocks if b.parallel), None)
        if block is not None:
            raise StructureError(
                f"the block of attention {block.attention.core.name!r} runs attention and MLP in parallel on one input "
                "(GPT-NeoX / GPT-J / Falcon style): token pruning and merging act between the attention and the MLP, "
                "which such a block does not have; this model is not supported (block-sparse attention is)")

    def summary(self) -> dict:
        return {
            "blocks": len(self.blocks),
            "tokens": self.num_tokens,
            "token_axis": self.token_axis,
            "width": self.width,
            "heads": self.blocks[0].attention.num_heads if self.blocks else None,
            "norm": "post-norm" if self.blocks and self.blocks[0].post_norm else "pre-norm",
            "parallel_blocks": any(b.parallel for b in self.blocks),
            "pooling": self.pooling,
            "protected_tokens": (f"{self.prepended} prepended tokens (indices 0..{self.prepended - 1}): "
                                 f"protect = \"first:{self.prepended}\"" if self.prepended > 1 else
                                 "cls (index 0)" if self.pooling.startswith("cls") else "none found"),
            "attention": [{"block": b.index,
                           "core": f"{b.attention.core.op_type} {b.attention.core.name}",
                           "scale": round(b.attention.scale, 6),
                           "masked": b.attention.mask is not None or b.attention.mask_select is not None,
                           "stream": b.stream_mid.name} for b in self.blocks],
            "notes": self.notes,
        }


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or Constant output, else None."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a constant with a single element, else None."""
    arr = constant_array(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or (
        value.producer() is not None and value.producer().op_type == "Constant"))


def _all_zero(value: ir.Value) -> bool:
    """A constant of zeros only (adding it to the logits masks nothing)."""
    tensor = ir.convenience.get_const_tensor(value) if is_constant(value) else None
    return tensor is not None and not np.any(tensor.numpy())


def ancestors(value: ir.Value, stop: set[ir.Value], *, through_shapes: bool = True
              ) -> tuple[set[ir.Node], set[ir.Value]]:
    """(the nodes `value` is computed by, not walking past the values of `stop`; the values of
    `stop` they read). `through_shapes=False`: a Shape node's input is not walked (its value
    is not read, only its shape)."""
    nodes, reads, stack = set(), set(), [value]
    while stack:
        current = stack.pop()
        if current in stop:
            reads.add(current)
            continue
        node = current.producer()
        if node is None or node in nodes or (not through_shapes and node.op_type == "Shape"):
            continue
        nodes.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    return nodes, reads


def _is_parameter(value: ir.Value | None, depth: int = 4) -> bool:
    """A constant, or one seen through Identity / Cast: the TorchScript exporter hands shared
    weights (ALBERT's layers, tied embeddings) to their users through Identity nodes."""
    if is_constant(value):
        return True
    node = value.producer() if value is not None else None
    return (node is not None and depth > 0 and node.op_type in ("Identity", "Cast") and node.inputs
            and _is_parameter(node.inputs[0], depth - 1))


def _walk_scores(value: ir.Value | None, scale: float = 1.0, mask: ir.Value | None = None, depth: int = 8,
                 through: frozenset[str] = _PASS_THROUGH, masks: int = 1):
    """Walk from the Softmax input back to the Q·Kᵀ MatMul; None if this is no attention.

    Returns (matmul, scale, mask): the product of scalar factors met on the way, and the
    mask if any: an additive tensor (Add of anything but zeros: a static export folds its
    causal mask into a constant) or the Where node that
    selects between the logits and a fill value. `through`: the ops passed through
    unchanged (with a Reshape, the walk finds the heads-folded attention analysis refuses);
    `masks`: how many masking terms may be met (past one, the outer is kept).
    """
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return None
    op = node.op_type
    if op == "MatMul":
        return None if any(is_constant(v) for v in node.inputs) else (node, scale, mask)
    elif op in ("Mul", "Div"):
        a, b = node.inputs
        c = scalar_constant(b)
        if c is None and op == "Mul":  # constant first: Mul(c, scores)
            a, c = b, scalar_constant(a)
        if c is None or c == 0:
            return None
        return _walk_scores(a, scale * c if op == "Mul" else scale / c, mask, depth - 1, through, masks)
    elif op == "Add":
        # scores + mask: whichever input leads to the Q·Kᵀ MatMul is the scores, the other the mask
        for i, candidate in enumerate(node.inputs):
            found = None if is_constant(candidate) else _walk_scores(candidate, scale, mask, depth - 1, through, masks)
            if found is not None:
                other = node.inputs[1 - i]
                if _all_zero(other):
                    return found
                # a constant is a mask too (a static export's causal mask, folded); two masking
                # terms in one attention are not one mask a pass could rewrite
                return None if found[2] is not None and masks < 2 else (found[0], found[1], other)
    elif op == "Where":  # masked_fill(mask, -inf): follow the branch that is not constant
        branch = node.inputs[2] if is_constant(node.inputs[1]) else node.inputs[1]
        return _walk_scores(branch, scale, node, depth - 1, through, masks)
    elif op in through:
        return _walk_scores(node.inputs[0], scale, mask, depth - 1, through, masks)
    return None


def _find_context(softmax: ir.Node) -> ir.Node | None:
    frontier = [softmax.outputs[0]]
    for _ in range(4):
        nxt = []
        for value in frontier:
            for user in value.consumers():
                if user.op_type == "MatMul" and user.inputs[0] is value:
                    return user
                # a Where reading the probabilities: the NaN guard after the softmax (safe softmax)
                if user.op_type in _PASS_THROUGH or user.op_type == "Where" and value in (user.inputs[1], user.inputs[2]):
                    nxt.append(user.outputs[0])
        frontier = nxt
    return None


def _activation_ancestors(value: ir.Value, limit: int = 400) -> set[ir.Value]:
    """Non-constant values from which `value` is computed (bounded backward search)."""
    seen, queue = set(), deque([value])
    while queue and len(seen) < limit:
        v = queue.popleft()
        if v in seen or _is_parameter(v):
            continue
        seen.add(v)
        node = v.producer()
        if node is not None:
            queue.extend(i for i in node.inputs if i is not None)
    return seen


def _find_residual_add(attn: Attention) -> tuple[ir.Node, ir.Value, bool] | None:
    """(residual Add, stream entering the block, parallel): `parallel` when the attention
    output meets another activation branch (the MLP of GPT-NeoX / GPT-J / Falcon style
    parallel blocks) before it rejoins the stream."""
    ancestors = _activation_ancestors(attn.q)
    queue, seen = deque([(attn.output, 0, False)]), set()
    while queue:
        value, depth, parallel = queue.popleft()
        if value in seen or depth > 16:
            continue
        seen.add(value)
        for user in value.consumers():
            joined = False
            if user.op_type == "Add":
                other = [v for v in user.inputs if v is not value]
                stream = next((v for v in _cast_chain(other[0]) if v in ancestors), None) if other else None
                if stream is not None:
                    return user, stream, parallel
                joined = bool(other) and not _is_parameter(other[0])
            queue.extend((out, depth + 1, parallel or joined) for out in user.outputs)
    return None


def _cast_chain(value: ir.Value) -> list[ir.Value]:
    """`value` and what it was cast from, back through Casts (an fp16 TorchScript export adds
    the stream to the attention's output through a Cast of it)."""
    chain = [value]
    while chain[-1].producer() is not None and chain[-1].producer().op_type == "Cast" and len(chain) < 4:
        chain.append(chain[-1].producer().inputs[0])
    return chain


def _find_attentions(graph: ir.Graph) -> list[Attention]:
    found = []
    for node in graph:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            found.append(_fused_attention(node))
            continue
        scores = _walk_scores(node.inputs[0]) if node.op_type == "Softmax" else None
        context = _find_context(node) if scores is not None else None
        if context is None:
            continue
        matmul, scale, mask = scores
        q, k_t = matmul.inputs
        select = mask if isinstance(mask, ir.Node) else None
        found.append(Attention(node, q, k_t, True, context.outputs[0], scale, None if select else mask, select,
                               matmul))
    return found


def score_products(graph: ir.Graph) -> list[ir.Node]:
    """The q·kᵀ MatMuls of the graph's attentions written as separate ops (not fused ones)."""
    return [a.product for a in _find_attentions(graph) if a.product is not None]


def _fused_attention(node: ir.Node) -> Attention:
    """The opset-23 Attention op: Q, K, V (4-D), optional additive or boolean mask."""
    q, k = node.inputs[0], node.inputs[1]
    if q.shape is not None and len(q.shape) != 4:
        raise StructureError(f"Attention node {node.name!r} takes 3-D inputs; token passes support the 4-D form "
                             "[batch, heads, tokens, head_dim] only")
    scale = node.attributes.get_float("scale", 0.0)
    if not scale:
        dh = q.shape[3] if q.shape is not None else None
        if not isinstance(dh, int):
            raise StructureError(f"Attention node {node.name!r}: head size unknown, cannot derive the default scale")
        scale = dh ** -0.5
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    return Attention(node, q, k, False, node.outputs[0], scale, mask)


def _dim_matches(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a is not None and b is not None and str(a) == str(b) and not isinstance(a, int)


def _pooling(graph: ir.Graph, last_stream: ir.Value, token_axis: int) -> str:
    """'cls' when the outputs read token 0 of the final stream, 'all' when they keep every token."""
    queue, seen, kinds = deque([last_stream]), set(), set()
    while queue:
        v = queue.popleft()
        if v in seen:
            continue
        seen.add(v)
        if v.is_graph_output():
            kinds.add("all")
        for user in v.consumers():
            reads_first_token = user.inputs[0] is v and (
                user.op_type == "Gather" and user.attributes.get_int("axis", 0) == token_axis
                and scalar_constant(user.inputs[1]) == 0
                or user.op_type == "Slice" and (scalar_constant(user.inputs[1]), scalar_constant(user.inputs[2])) == (0, 1))
            if reads_first_token:
                kinds.add("cls")
            else:
                queue.extend(user.outputs)
    # "cls+all", e.g. BERT: a pooler on token 0 and the full hidden states
    return "+".join(kind for kind in ("cls", "all") if kind in kinds) or "unknown"


def _prepended_tokens(value: ir.Value | None, token_axis: int, depth: int = 8) -> int:
    """Learned tokens concatenated before the inputs' tokens (CLS, DeiT's distillation
    token): the Concat on the token axis that builds the first block's input (called with
    it), through the position-embedding Add, dropout and norms; 0 when there is none."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return 0
    if node.op_type == "Concat":
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else 3
        sizes = [_learned_size(piece, token_axis) for piece in node.inputs[:-1]]
        return 0 if node.attributes.get_int("axis", 0) % rank != token_axis or None in sizes else sum(sizes)
    if node.op_type not in ("Add", "Dropout", "Identity", "LayerNormalization", "Cast"):
        return 0
    return max((_prepended_tokens(v, token_axis, depth - 1) for v in node.inputs
                if v is not None and not _is_parameter(v)), default=0)


def _learned_size(value: ir.Value, axis: int, depth: int = 4) -> int | None:
    """Tokens a learned piece holds on `axis`: a parameter, possibly broadcast over the batch
    (Expand / Tile; the exporter may leave their shapes unknown); None for anything else."""
    shape = value.shape
    size = shape[axis] if shape is not None and len(shape) > axis and isinstance(shape[axis], int) else None
    if _is_parameter(value):
        return size
    node = value.producer()
    if node is None or depth == 0 or node.op_type not in ("Expand", "Tile", "Cast", "Identity"):
        return None
    inner = _learned_size(node.inputs[0], axis, depth - 1)
    return size if size is not None and inner is not None else inner


def _probe_token_axis(model: ir.Model, block: Block, shared: dict | None) -> tuple[list[int], int | None]:
    """Token axis by running the model once (symbolic dims that shape inference could not
    relate), and the token count when it is static (the model ran at its own length, not
    at PROBE_TOKENS)."""
    shapes = probe_shapes(model, shared)
    stream = shapes.get(block.stream_mid.name)
    keys = block.attention.keys_shape(lambda value: shapes.get(value.name))
    if stream is None or keys is None:
        return [], None
    # a dynamic count runs at PROBE_TOKENS; a static one (a TorchScript export shape
    # inference could not follow) at its own length: the axis as long as the keys
    static = keys[-1] if keys[-1] != PROBE_TOKENS else None
    return [a for a in range(1, len(stream) - 1) if stream[a] == keys[-1]], static


def analyse(model: ir.Model, shared: dict | None = None) -> TransformerMap:
    """Find blocks, residual stream, attention and token axis; StructureError when missing.
    `shared` (a compile's shared values) lends its input limits to a shape probe, and
    keeps the probe for the passes that read the same graph."""
    graph = model.graph
    attentions = _find_attentions(graph)
    if not attentions:
        summed = next((n for n in graph if n.op_type == "Softmax" and _walk_scores(n.inputs[0], masks=2) is not None),
                      None)
        if summed is not None:
            raise StructureError(
                f"attention at {summed.name!r} adds more than one term to its logits (e.g. a position bias and a mask, "
                "added one after the other); token passes and sparse attention rewrite one mask; this model is not "
                "supported")
        # logits from Q·Kᵀ through a Reshape: heads folded into the batch axis
        folded = next((n for n in graph if n.op_type == "Softmax" and _walk_scores(n.inputs[0]) is None
                       and _walk_scores(n.inputs[0], through=_PASS_THROUGH | {"Reshape"}, masks=2) is not None), None)
        if folded is not None:
            raise StructureError(
                f"attention at {folded.name!r} computes its scores on [batch·heads, tokens, tokens] tensors, reshaped "
                "before the Softmax (as BLOOM's ALiBi attention does); token passes need queries and keys as "
                "[batch, heads, tokens, head_dim]; this model is not supported")
        fused = sorted({n.op_type for n in graph if n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention")})
        found = f"{sum(n.op_type == 'Softmax' for n in graph)} Softmax node(s)" + (f" and fused {fused} op(s)" if fused else "")
        raise StructureError(
            f"no transformer blocks found: no attention (Softmax over a MatMul of Q and Kᵀ, followed by a MatMul with V) "
            f"among {len(graph)} nodes ({found}); token passes need the attention sub-graph")
    blocks, notes = [], []
    for i, attn in enumerate(attentions):
        res = _find_residual_add(attn)
        if res is None and blocks and all(_find_residual_add(a) is None for a in attentions[i + 1:]):
            # after the last block: an attention-pooling head (SigLIP's probe query attends over
            # the final tokens); it reads however many tokens reach it
            notes.append(f"attention at {attn.core.name!r} after the last block has no residual stream: "
                         "taken as an attention-pooling head, not a block")
            continue
        if res is None:
            raise StructureError(
                f"attention at {attn.core.name!r} has no residual Add joining its output with the stream that feeds Q; "
                "cannot locate the residual stream of this block")
        add, stream_in, parallel = res
        users = list(add.outputs[0].consumers())
        post_norm = len(users) == 1 and users[0].op_type in ("LayerNormalization", "SimplifiedLayerNormalization")
        stream_mid = users[0].outputs[0] if post_norm else add.outputs[0]
        blocks.append(Block(len(blocks), attn, stream_in, add, stream_mid, post_norm, parallel))

    keys = blocks[0].attention.keys_shape()
    stream_shape = blocks[0].stream_mid.shape
    if _decoder(shared) is not None and (stream_shape is None or len(stream_shape) == 3):
        # a KV-cache decoder's stream is [batch, tokens, width] (its keys count the past too, and
        # a token pass may have dropped the shapes): no probe, which would run a prunable span
        # of any length, every value exposed
        tokens, width = (stream_shape[1], stream_shape[2]) if stream_shape is not None else (None, None)
        return TransformerMap(blocks, 1, tokens if isinstance(tokens, int) or tokens is None else str(tokens),
                              width if isinstance(width, int) else None, _pooling(graph, blocks[-1].stream_mid, 1),
                              notes, _prepended_tokens(blocks[0].stream_in, 1))
    if keys is None or stream_shape is None:
        raise StructureError("token axis unknown: the graph carries no shapes for the attention and the residual stream "
                             "(run shape inference or export with shapes)")
    n_keys = keys[len(keys) - 1]
    candidates = [a for a in range(len(stream_shape) - 1) if _dim_matches(stream_shape[a], n_keys)]
    probed_count = None
    if len(candidates) != 1 and not isinstance(n_keys, int):
        candidates, probed_count = _probe_token_axis(model, blocks[0], shared)
    windows = [d for d in list(stream_shape)[1:-1] if isinstance(d, int) and isinstance(n_keys, int)
               and d > n_keys and d % n_keys == 0]
    if not candidates and windows:
        raise StructureError(
            f"attention at {blocks[0].attention.core.name!r} runs over windows of {n_keys} tokens while the residual "
            f"stream holds {windows[0]} (windowed attention, as in Swin): token pruning and merging need attention "
            "over all tokens of the stream; this model is not supported")
    if len(candidates) != 1:
        raise StructureError(
            f"token axis ambiguous: residual stream shape {list(stream_shape)} has {len(candidates)} axes matching "
            f"the {n_keys} attention keys")
    token_axis = candidates[0]
    width = stream_shape[len(stream_shape) - 1]
    tokens = stream_shape[token_axis] if probed_count is None else probed_count
    num_tokens = tokens if isinstance(tokens, int) else (str(tokens) if tokens is not None else None)
    return TransformerMap(blocks, token_axis, num_tokens, width if isinstance(width, int) else None,
                          _pooling(graph, blocks[-1].stream_mid, token_axis), notes, _prepended_tokens(blocks[0].stream_in, token_axis))


def _decoder(shared: dict | None):
    """The KV-cache decoder's DecoderSpec a compile shares, or None."""
    from .decoder import DECODER_SPEC

    return (shared or {}).get(DECODER_SPEC)


#: key of the analysed structure in a compile's shared values (PipelineContext.shared)
STRUCTURE = "structure"


def structure_of(model: ir.Model, shared: dict) -> TransformerMap:
    """analyse(model), once per graph: the map kept in `shared` (a compile's shared values)
    is reused while the graph is wired as when it was analysed (the same nodes reading the
    same values); a pass that rewired it since (padding trim, token slimming, a token
    pass) gets a fresh analysis of the graph as it is now."""
    return once(shared, STRUCTURE, wiring(model.graph), lambda: analyse(model, shared))


def infer_shapes(model: ir.Model) -> None:
    """Annotate values with shapes (onnx shape inference with data propagation), in place."""
    ShapeInferencePass(strict_mode=False)(model)
