"""Block-sparse attention (Rectified SpaAttn): the attention of the listed blocks becomes one
BlockSparseAttention op each.

Analysis finds each block's attention (Softmax over q·kᵀ with the PV MatMul after it, or
the opset-23 Attention op); the op takes the same q, k (untransposed) and v, the scale
analysis read, and replaces the attention's output. The selection (`top_k` key blocks per
query block, sink and local blocks among them) and the rectification are the op's; its
decomposition computes the selected blocks' products only, so the saving reaches ONNX
Runtime. Masks: the op knows the causal rule (`causal`: an Attention op's is_causal, or
a mask written into the graph that is the causal rule, computed from constants and shapes
only and checked on probe inputs) and a bias of the keys (`key_bias`: a padding mask
[B, 1, 1, N], whose fully masked blocks are never selected), and a decoder's both in one
(below); other masks (windows) are refused.

KV-cache decoders: the op runs on the prompt only (the step whose attention is N × N; a
decode step's few queries attend the cache densely, as exported). Each listed block's
attention over its cache (the past/new Concats that make its present key / value, the
repetition of grouped heads, the scores, softmax and context) moves into the else-branch
of an If on "no past" (the mask as wide as the step's tokens) and more than top_k blocks of
prompt (a shorter one would select them all: dense); the then-branch, with copies
of the nodes from the projections on that the op reads, concatenates the (empty) past and
the new tokens as the present and runs the op on them. The mask of a
Hugging Face decoder is the causal rule and padding in one: the op takes it as causal plus
its last query row as key_bias (checked on a left-padded probe prompt). A decoder with
sliding windows takes the op on prompts no longer than its smallest window (which then
masks nothing the causal rule lets through); longer prompts attend densely, as exported.
The prompt returns its presents (the spec's `sparse_prompt`: a shared cache buffer is
filled from them, as after a pruned prompt), and decode steps write in place as before.
After token pruning or routing in the same build, a reduced block's own causal mask (marked
by the token pass) is taken as causal; a block whose attention the pass's scores read
(its keys, its probabilities) stays dense unless listed, which is refused.

Images and video: blocks of consecutive tokens are rows of patches, whose attention is
spread over the rows above and below. `order` = tiled / hilbert gathers q, k and v into
an order where a block is a compact tile of the grid (the tokens before the grid, e.g. a
CLS token, stay first: they join the sink block), and the output back (4 gathers of the
[B, H, N, Dh] tensors, against the N²·Dh of the products).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import Attention, ancestors, is_constant, structure_of
from ..compiler.decoder import DECODER_SPEC
from ..errors import RecipeError, StructureError
from ..plugins import REGISTRY
from ..plugins.block_sparse_attention import MASKED_BIAS, RECTIFY_BLOCKS, RECTIFY_TOKENS
from ..recipe import SparseAttentionOptions
from ..runtime.kv_cache import ATTENTION_MASK, KINDS, POSITION_IDS, past_name, present_name
from .base import GraphBuilder, TrimrtPass
from .token_graph import CAUSAL_MASK_MARK

#: the recipe's rectify -> the op's
_RECTIFY = {False: 0, True: RECTIFY_TOKENS, "blocks": RECTIFY_BLOCKS}


class SparseAttentionPass(TrimrtPass):
    name = "sparse_attention"
    recipe_table = "sparse_attention"
    exact = False

    def __init__(self, options: SparseAttentionOptions, tokens: int = 32):
        super().__init__()
        self.options = options
        self.tokens = tokens  # a decoder's probe prompt (at least what the build accepts)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        tmap = structure_of(model, self.context.shared)
        depth = len(tmap.blocks)
        missing = [i for i in opts.layers or () if i >= depth]
        if missing:
            raise RecipeError(f"[sparse_attention] layers {missing} do not exist: the model has {depth} blocks "
                              f"(0..{depth - 1})")
        # a block whose attention a token pass scores needs it dense: by default it stays
        # dense; listed, it is refused
        decoder = self.context.shared.get(DECODER_SPEC)
        candidates = opts.layers or range(depth)
        # a decoder block's attention over its cache (what moves into the If), found once
        regions = {i: _cache_region(model.graph, tmap.blocks[i].attention, i) for i in candidates} if decoder else {}
        scored = {i: reader for i in candidates if (reader := _outside_reader(tmap.blocks[i].attention, regions.get(i)))}
        if opts.layers and scored:
            layer, reader = next(iter(scored.items()))
            raise StructureError(f"[sparse_attention] block {layer}'s attention is also read by {reader} (e.g. a "
                                 "token pruning's scores), which needs it dense: remove the block from layers (by "
                                 "default such blocks stay dense)")
        layers = opts.layers or tuple(i for i in range(depth) if i not in scored)
        n = tmap.num_tokens
        blocks = -(-n // opts.block_size) if isinstance(n, int) else None
        grid_tokens = int(np.prod(opts.grid)) if opts.grid else 0
        if opts.grid and isinstance(n, int) and n < grid_tokens:
            raise StructureError(f"[sparse_attention] the grid {list(opts.grid)} has {grid_tokens} patches but the "
                                 f"blocks see {n} tokens: give the model's patch grid")
        top_k = opts.top_k or 0
        masks = _Masks(model, n, decoder, self.tokens)
        done, prompts = [], {}
        for layer in layers:
            attn = tmap.blocks[layer].attention
            q, k, v, causal = _operands(attn, layer, masks)
            window = masks.window(attn)  # None: a sliding window longer than probed (dense past it)
            if decoder is not None:
                limit = decoder.sliding_window if window is None else None
                if limit not in prompts:
                    prompts[limit] = _is_long_prompt(self.builder(model.graph, f"trimrt_sparse_prompt_{limit or 'all'}"),
                                                     model.graph, decoder, opts, limit)
                prompt = prompts[limit]
                region, presents, merge = regions[layer]
            if opts.order != "sequence" and causal:
                raise StructureError(f"[sparse_attention] block {layer}'s attention is causal: its tokens keep their "
                                     "order (order = 'sequence')")
            b = self.builder(model.graph, f"trimrt_sparse_{layer}")
            if len({x.dtype for x in (q, k, v)} - {None}) > 1:  # (fp16 products, fp32 softmax and context: the op's)
                q, k = b.CastLike(q, v), b.CastLike(k, v)
            if attn.k_transposed:
                k = b.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, name=f"trimrt_sparse_{layer}_keys")
            if opts.order != "sequence":
                order, inverse = _orders(b, q, patch_order(opts.grid, opts.order, opts.block_size))
                q, k, v = (b.Gather(x, order, axis=2) for x in (q, k, v))
            bias = masks.key_bias(b, attn, q)
            if opts.order != "sequence":
                bias = b.Gather(bias, order, axis=1)
            (out,) = b.emit(REGISTRY["BlockSparseAttention"], [q, k, v, bias], name=f"trimrt_sparse_{layer}",
                            block_size=opts.block_size, top_k=top_k, tau=float(opts.tau), sink=opts.sink,
                            local=opts.local, causal=causal, rectify=_RECTIFY[opts.rectify], scale=float(attn.scale),
                            window=window or 0)
            if opts.order != "sequence":
                out = b.Gather(out, inverse, axis=2)
            out.dtype, out.shape = attn.output.dtype, attn.output.shape
            if decoder is not None:
                _prompt_only(b, model.graph, prompt, region, presents, merge, attn.output, out)
            else:
                b.insert_after(attn.output.producer())
                ir.convenience.replace_all_uses_with(attn.output, out)
            done.append({"block": layer, "causal": bool(causal), **({"window": window} if window else {}),
                         "key_blocks": min(top_k or blocks, blocks) if blocks else top_k or "all"})
        density = round(min(top_k or blocks, blocks) / blocks, 4) if blocks else None
        self.record({"tokens": n, "prompt_only": decoder is not None, "kept_dense": sorted(scored),
                     "block_size": opts.block_size, "blocks": blocks, "top_k": top_k, "tau": opts.tau,
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
            continue
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


def _is_long_prompt(b: GraphBuilder, graph: ir.Graph, decoder, opts: SparseAttentionOptions, limit: int | None
                    ) -> ir.Value:
    """A decoder step without a past (its attention mask as wide as its tokens: a shared cache
    buffer is longer than the past it holds, so the past's length would not tell) whose tokens
    make more than top_k blocks: a shorter prompt selects every block, which is dense attention
    (unless tau masks some), so it takes the dense path, without the op's selection cost.
    `limit`: a sliding window the op does not apply (longer than its probe): a prompt no longer
    than it (where the window masks nothing the causal rule lets through); a longer one attends
    densely, as exported."""
    inputs = {v.name: v for v in graph.inputs}
    width = b.Shape(inputs[ATTENTION_MASK], start=1, end=2)
    tokens = b.Shape(inputs[decoder.token_input], start=1, end=2)
    prompt = b.Equal(width, tokens)
    if opts.top_k and opts.tau >= 1.0:
        prompt = b.And(prompt, b.Greater(tokens, b.const(np.array([opts.top_k * opts.block_size]))))
    if limit is not None:  # a longer prompt's window masks keys the op would see
        prompt = b.And(prompt, b.LessOrEqual(tokens, b.const(np.array([limit]))))
    b.insert_after(None)
    return prompt


def _cache_region(graph: ir.Graph, attn: Attention, layer: int) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value],
                                                                        list[ir.Node]]:
    """(the nodes of a decoder block's attention over its cache, in graph order: the Concats of
    past and new that are its present key / value, all they feed up to the attention's output,
    then the views that merge its heads; the present key and value; those views). Refused
    when the block does not attend its cache in that form."""
    outputs = {v.name: v for v in graph.outputs}
    inputs = {v.name: v for v in graph.inputs}
    presents = tuple(outputs.get(present_name(layer, kind)) for kind in KINDS)
    concats = [value.producer() if value is not None else None for value in presents]
    if attn.core.op_type != "Softmax" or any(
            c is None or c.op_type != "Concat" or c.inputs[0] is not inputs.get(past_name(layer, kind))
            for c, kind in zip(concats, KINDS)):
        raise StructureError(f"[sparse_attention] block {layer} of this decoder does not attend its cache as "
                             "Softmax(q·kᵀ) over Concat(past, new) keys and values; block-sparse attention on KV-cache "
                             "decoders takes that form (an export of trimrt or torch.onnx) only so far")
    reached, stack = set(), list(concats)
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(user for out in node.outputs for user, _ in out.uses())
    feeding = ancestors(attn.output, set())[0]
    region = [node for node in graph if node in reached and node in feeding]
    merge, end = [], attn.output  # [B, H, S, d] -> [B, S, H·d]: fused with the attention on the cache
    while not end.is_graph_output() and len(end.uses()) == 1:
        user = end.uses()[0][0]
        if user.op_type not in ("Transpose", "Reshape") or user.graph is not graph:
            break
        merge.append(user)
        end = user.outputs[0]
    return region + merge, presents, merge


def _prompt_only(b: GraphBuilder, graph: ir.Graph, prompt: ir.Value, region: list[ir.Node],
                 presents: tuple[ir.Value, ir.Value], merge: list[ir.Node], dense: ir.Value, sparse: ir.Value) -> None:
    """Replace a decoder block's attention (`dense`, computed by `region`, then viewed by `merge`)
    with an If on `prompt`: then the op's output `sparse` (built by `b`, viewed by copies of
    `merge`) with presents of its own, else the region as it was. The then-branch computes
    what it reads from the projections on with copies of its own (the RoPEs, the heads' views
    and repetition, the Concats): the originals then feed the else-branch alone, where
    KVAttentionPass fuses them into the cache attention as in a dense build."""
    own = _attention_cone(graph, [*region, *b.nodes])
    needed = {x for node in b.nodes for x in node.inputs if x is not None and x.producer() in own}
    feeding = set()
    for value in (*needed, *presents):
        feeding |= ancestors(value, set())[0]
    copies = {}
    cloned = [_clone(node, copies, b.prefix) for node in graph if node in own and node in feeding]
    for node in b.nodes:
        for i, x in enumerate(node.inputs):
            if x in copies:
                node.replace_input_with(i, copies[x])
    copies[dense] = sparse
    merged = [_clone(node, copies, b.prefix) for node in merge]
    if merge:
        dense = merge[-1].outputs[0]
    then = ir.Graph([], [copies[dense], *(copies[p] for p in presents)], nodes=[*cloned, *b.nodes, *merged],
                    name=f"{b.prefix}_prompt")
    b.discard()
    results = b.op_multi_out("If", [prompt], {"then_branch": then, "else_branch": ir.Graph([], [], nodes=[])},
                             num_outputs=3, name=f"{b.prefix}_prompt_only")
    b.insert_after(region[-1])
    for old, new in zip((dense, *presents), results):
        new.dtype, new.shape = old.dtype, old.shape
    ir.convenience.replace_all_uses_with(dense, results[0])
    for value, new in zip(presents, results[1:]):
        graph.outputs[graph.outputs.index(value)] = new
        value.name, new.name = f"{value.name}_dense", value.name
    graph.remove(region, safe=False)
    otherwise = ir.Graph([], [dense, *presents], nodes=region, name=f"{b.prefix}_decode")
    results[0].producer().attributes["else_branch"] = ir.AttrGraph("else_branch", otherwise)


def _attention_cone(graph: ir.Graph, readers: list[ir.Node]) -> set[ir.Node]:
    """`readers` and the nodes whose outputs only they read (through one another), back to the
    projections: those that read a weight (a constant of 1024+ values) stay out."""
    cone = set(readers)
    for node in reversed(list(graph)):
        if node in cone or any(x is not None and x.const_value is not None and x.const_value.size >= 1024
                               for x in node.inputs) or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            continue
        users = [user for out in node.outputs for user, _ in out.uses()]
        if users and all(user in cone for user in users) and not any(out.is_graph_output() for out in node.outputs):
            cone.add(node)
    return cone


def _clone(node: ir.Node, copies: dict, prefix: str) -> ir.Node:
    """A copy of `node` reading the copies made so far (`copies`: original -> copy, extended with its outputs)."""
    inputs = [copies.get(x, x) for x in node.inputs]
    twin = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                   overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                   name=f"{prefix}_{node.name}")
    for old, new in zip(node.outputs, twin.outputs):
        new.name, new.type, new.shape = f"{prefix}_{old.name}", old.type, old.shape
        copies[old] = new
    twin.metadata_props.update(node.metadata_props)
    return twin


class _Masks:
    """What a block's mask written into the graph is, for the op: "keys" when it only biases
    keys (a padding mask: its head and query axes are 1, [B, 1, 1, N], or it reads no input
    of more than [B, N] and is the same for every query on probe inputs), whose values become
    the op's key_bias; "causal" when it is
    the causal rule (computed from constants and the inputs' shapes only, and found on probe
    inputs of two lengths to be 0 on and below the diagonal and at most MASKED_BIAS above
    it); "causal_keys" when it is the causal rule and a bias of the keys in one (a KV-cache
    decoder's: on a left-padded probe prompt, what each query sees is what the last one sees,
    up to itself); None for any other (refused). Probed once per mask value (the blocks of a
    model share theirs)."""

    def __init__(self, model: ir.Model, tokens, decoder=None, prompt: int = 32):
        self.model, self.tokens, self.decoder, self.prompt = model, tokens, decoder, prompt
        self.known, self.proto = {}, None
        self.probed = {}  # mask name -> its shape on a probe
        self.windows = {}  # mask name -> its sliding window (0: none; None: a decoder's, too long to probe)

    def kind(self, attn: Attention) -> str | None:
        if attn.mask is None and attn.mask_select is None:
            return "none"
        value, visible = self._pattern(attn)
        if value is None:
            return None
        if _keys_only(value):
            return "keys"
        if value.producer() is not None and value.producer().metadata_props.get(CAUSAL_MASK_MARK):
            return "causal"  # a reduced decoder block's own mask (token pruning, routing)
        if value.name not in self.known:
            classify = self._classify if self.decoder is None else self._classify_prompt
            self.known[value.name] = classify(value, visible)
        return self.known[value.name]

    def window(self, attn: Attention) -> int | None:
        """The sliding window of a block's causal mask: 0 when it has none; None for a decoder's
        window longer than `_LONGEST_WINDOW_PROBE`, or a reduced block's own mask in a decoder with
        windows (the op then runs on prompts no longer than the smallest window)."""
        kind = self.kind(attn)
        if kind == "causal" and self.decoder is not None and self.decoder.sliding_window:
            return None  # a reduced block's own causal mask: the model's windows are not in it
        value = self._pattern(attn)[0] if kind in ("causal", "causal_keys") else None
        return 0 if value is None else self.windows.get(value.name, 0)

    def key_bias(self, b, attn: Attention, q: ir.Value) -> ir.Value:
        """The op's key_bias [B, N]: the mask's values where it biases keys (its last query row,
        which sees every key a causal mask lets through, or with a window its diagonal; a Where mask as 0 / its fill, a boolean
        one as 0 / -inf), or zeros."""
        batch_and_keys = b.Concat(b.Shape(q, start=0, end=1), b.Shape(q, start=2, end=3), axis=0)
        if self.kind(attn) not in ("keys", "causal_keys"):
            return b.CastLike(b.ConstantOfShape(batch_and_keys), q)
        bias, zero = attn.mask, b.CastLike(b.const(np.float32(0.0)), q)
        if _boolean(bias):  # the Attention op's boolean attn_mask: True attends
            bias = b.Where(bias, zero, b.CastLike(b.const(np.float32(-np.inf)), q))
        elif bias is None:
            where = attn.mask_select
            bias = b.Where(where.inputs[0], zero, b.CastLike(where.inputs[2], q)) if self._logits_first(attn) else \
                b.Where(where.inputs[0], b.CastLike(where.inputs[1], q), zero)
        # (a mask a token pass gathered has no shape: the probe's tells)
        shape = bias.shape if bias.shape is not None else self.probed[self._pattern(attn)[0].name]
        rank = len(shape)
        if self.window(attn):  # [B, 1, N, N] with a window: its diagonal (a query sees its own key unless padding)
            width = b.Shape(bias, start=-1)
            flat = b.Reshape(bias, b.Concat(b.Shape(bias, start=0, end=1), b.const([-1]), axis=0))
            diagonal = b.Mul(b.Range(b.const(0), b.Squeeze(width), b.const(1)), b.Add(b.Squeeze(width), b.const(1)))
            return b.CastLike(b.Gather(flat, diagonal, axis=1), q)
        if rank >= 2 and shape[-2] != 1:  # [.., N, N]: its last row
            bias = b.Slice(bias, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([rank - 2]))
        rows = b.Reshape(bias, b.Concat(b.Shape(bias, start=0, end=1) if rank == 4 else b.const([1]), b.const([-1]),
                                        axis=0))
        return b.CastLike(b.Expand(rows, batch_and_keys), q)

    @staticmethod
    def _logits_first(attn: Attention) -> bool:
        """Whether the logits are the Where's kept branch (input 1), the fill input 2."""
        return attn.mask_select.inputs[2].const_value is not None

    def _pattern(self, attn: Attention):
        """(the value that decides visibility, its values -> visible) or (None, None) when the
        masking is not recognised (a Where filling with a value that does not mask)."""
        if _boolean(attn.mask):
            return attn.mask, lambda m: m.astype(bool)
        if attn.mask is not None:
            return attn.mask, lambda m: np.where(m == 0, True, np.where(m <= MASKED_BIAS, False, None))
        where = attn.mask_select
        first = self._logits_first(attn)
        fill = where.inputs[2] if first else where.inputs[1]
        if fill.const_value is None or float(np.max(fill.const_value.numpy())) > MASKED_BIAS:
            return None, None
        return where.inputs[0], (lambda m: m.astype(bool)) if first else (lambda m: ~m.astype(bool))

    def _classify(self, value: ir.Value, visible) -> str | None:
        """"keys" when the mask is the same for every query on probe inputs (integer inputs 1: a
        padding mask then masks nothing, a causal one still shows), "causal" when it is the causal
        rule (within a sliding window or not) and reads no input's values, "causal_keys" when it
        looks causal there and reads [B, N] inputs (a padding mask and the causal rule in one:
        `_causal_keys` decides on a left-padded row), else None. A causal mask of a graph whose
        token count is not fixed is probed once more, on `_LONGEST_WINDOW_PROBE` + 8 tokens, for a
        sliding window longer than the first probes (e5-mistral's 4096)."""
        if value.shape is not None and len(value.shape) == 4 and isinstance(value.shape[1], int) and value.shape[1] != 1:
            return None
        # the graph inputs whose values the mask reads (a shape read does not count)
        read = ancestors(value, set(self.model.graph.inputs), through_shapes=False)[1]
        # a mask that reads a [B, N, N] input could vary by query on other inputs than the probes'
        rows_read = all(x.shape is not None and len(x.shape) <= 2 for x in read)
        same_rows, causal = rows_read, True
        dynamic = not isinstance(self.tokens, int)
        for n in ([7, 19] if dynamic else [self.tokens]):
            mask = self._values(value, self._probe_feeds(n))
            keys = mask.shape[-1] if mask.ndim >= 2 else 0  # (after a token reduction, fewer than n)
            if mask.ndim < 2 or mask.shape[-2] not in (1, keys) or (mask.ndim == 4 and mask.shape[1] != 1):
                return None
            same_rows &= bool((mask == mask[..., :1, :]).all())
            causal &= mask.shape[-2] == 1 or self._causal_keys(value, visible, mask=mask, padding=False) is not None
        if same_rows:
            return "keys"
        if not causal or (read and not rows_read):
            return None
        kind = self._causal_keys(value, visible, self._probe_feeds(n, padded=read)) if read else "causal"
        if kind and dynamic and not self.windows.get(value.name) and not self._long_probe(value, visible):
            return None
        return kind

    def _long_probe(self, value: ir.Value, visible) -> bool:
        """Record the sliding window (if any) of a causal mask on one row of `_LONGEST_WINDOW_PROBE`
        + 8 tokens; False when the mask is not a window's there. A mask the graph cannot compute
        that long (a causal table sliced to the model's positions) has no window the model's
        prompts reach."""
        n, shape = _LONGEST_WINDOW_PROBE + 8, self.probed[value.name]
        try:
            return self._probe_window(value, visible, self._probe_feeds(n, batch=1), n) is not False
        except Exception:  # noqa: BLE001 - ONNX Runtime's errors for a length past the model's tables
            return True
        finally:
            self.probed[value.name] = shape  # (key_bias reads the first probes' shape)

    def _probe_window(self, value: ir.Value, visible, feeds: dict[str, np.ndarray], n: int) -> bool | None:
        """Whether the causal mask on `feeds` (one unpadded row of `n` tokens, longer than the
        first probes) is the causal rule within a sliding window (recorded in `windows`) or
        without one; None when it is not n × n there (a causal table sliced to fewer positions).
        Two query rows are read (the middle and the last one: the first probes saw every row
        of a short prompt), not the [N, N] mask (8200² values by NumPy: seconds)."""
        mask = self._values(value, feeds)
        if mask.ndim < 2 or mask.shape[-2:] != (n, n):
            return None
        rows = np.array([n // 2, n - 1])
        seen = visible(mask.reshape(-1, n, n)[:, rows, :])
        window = None if any(x is None for x in seen.reshape(-1)) else _causal_window(seen.astype(bool), rows, True)
        if window:
            self.windows[value.name] = window
        return window is not None

    def _classify_prompt(self, value: ir.Value, visible) -> str | None:
        """A KV-cache decoder's mask: "causal_keys" when `_causal_keys` finds it on a prompt."""
        n = min(self.prompt, self.decoder.sliding_window or self.prompt)  # (a prompt the window masks nothing of)
        feeds = self.decoder.random_feeds(batch=2, new=n, past=0)
        feeds[ATTENTION_MASK][1, :3] = 0
        if POSITION_IDS in feeds:
            feeds[POSITION_IDS] = np.maximum(np.cumsum(feeds[ATTENTION_MASK], axis=1) - 1, 0)
        kind = self._causal_keys(value, visible, feeds)
        window = self.decoder.sliding_window
        if kind and window:  # the mask's own window (or none), on a prompt longer than the smallest one
            found = window + 8 <= _LONGEST_WINDOW_PROBE and self._probe_window(
                value, visible, self.decoder.random_feeds(batch=1, new=window + 8, past=0), window + 8)
            # not probed, or not a window's pattern: the op runs on prompts no longer than the smallest window
            self.windows[value.name] = self.windows.get(value.name, 0) if found else None
        return kind

    def _probe_feeds(self, n: int, padded: set[ir.Value] = frozenset(), batch: int = 2) -> dict[str, np.ndarray]:
        """Probe inputs of `batch` rows of n tokens: integer inputs 1, others 0, except that the
        last row is left-padded by 3 (0s) in the [B, N] inputs `padded` (a padding mask's)."""
        feeds = {}
        for x in self.model.graph.inputs:
            shape = [d if isinstance(d, int) else (batch if i == 0 else n) for i, d in enumerate(x.shape)]
            feeds[x.name] = np.full(shape, 1 if np.issubdtype(x.dtype.numpy(), np.integer) else 0, x.dtype.numpy())
            if x in padded and len(shape) == 2 and shape[1] > 3:
                feeds[x.name][-1, :3] = 0
        return feeds

    def _causal_keys(self, value: ir.Value, visible, feeds: dict[str, np.ndarray] | None = None,
                     mask: np.ndarray | None = None, padding: bool = True) -> str | None:
        """"causal_keys" when, on `feeds` (a prompt, rows left-padded or not; or the `mask` they
        gave), each query sees the keys up to itself that are not padding (those its own query
        sees; without `padding`, every key is), within a sliding window if the mask has one
        (recorded in `windows`)."""
        mask = self._values(value, feeds) if mask is None else mask
        n = mask.shape[-1]
        if mask.ndim < 2 or mask.shape[-2] != n or (mask.ndim == 4 and mask.shape[1] != 1):
            return None
        seen = visible(mask.reshape(-1, n, n))
        if any(x is None for x in seen.reshape(-1)):
            return None
        seen = seen.astype(bool)
        keys = seen[:, np.arange(n), np.arange(n)][:, None, :]  # [B, 1, N]: the keys that are not padding
        if not padding and not keys.all():
            return None
        window = _causal_window(seen, np.arange(n), keys)
        if window:
            self.windows[value.name] = window
        return None if window is None else "causal_keys"

    def _values(self, value: ir.Value, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The mask's values on `feeds` (a constant's own)."""
        from ..compiler.onnx_runner import OnnxRunner
        from ..plugins import runnable_proto

        constant = ir.convenience.get_const_tensor(value) if is_constant(value) else None
        if constant is not None:
            values = constant.numpy()
        else:
            if self.proto is None:
                self.proto = runnable_proto(ir.serde.serialize_model(self.model))
            values = np.asarray(OnnxRunner(self.proto, [value.name], replace=True).run(feeds)[value.name])
        self.probed[value.name] = values.shape
        return values


def _causal_window(seen: np.ndarray, rows: np.ndarray, keys) -> int | None:
    """The sliding window (0: none) of what query rows `rows` see (`seen` [B, R, N]) when each
    sees the keys up to itself among `keys` (those not padding, [B, 1, N] or True), within
    the window; None when they do not."""
    gap = rows[:, None] - np.arange(seen.shape[-1])[None, :]  # query − key
    hidden = (gap >= 0) & keys & ~seen  # in the past, not padding, yet masked: a window's
    window = int(np.broadcast_to(gap, hidden.shape)[hidden].min()) if hidden.any() else 0
    return window if bool((seen == ((gap >= 0) & keys & ((gap < window) | (window == 0)))).all()) else None


#: the longest sliding window whose mask a decoder's probe computes ([1, 1, W, W] values)
_LONGEST_WINDOW_PROBE = 8192


def _outside_reader(attn: Attention, cache_region: tuple | None = None) -> str | None:
    """The name of a node (or "a graph output") that reads a block's attention other than on
    the way to its output, where the op would not replace what it reads: the probabilities
    (a token pass's scores, output_attentions); in a KV-cache decoder (its `cache_region`),
    any value of the attention over the cache (a FastV score reads its keys), which moves
    into an If branch. None when nothing does (a fused Attention op exposes nothing)."""
    if attn.core.op_type != "Softmax":
        return None
    if cache_region is None:
        watched, inside, ends = [attn.core], ancestors(attn.output, set())[0], {attn.output}
    else:
        nodes, presents, merge = cache_region
        watched = [node for node in nodes if node not in merge]
        inside, ends = set(watched), {attn.output, *presents}
    for node in watched:
        for out in node.outputs:
            if out in ends:
                continue
            if out.is_graph_output():
                return "a graph output"
            reader = next((user for user, _ in out.uses() if user not in inside), None)
            if reader is not None:
                return reader.name or reader.op_type
    return None


def _boolean(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.BOOL


def _keys_only(value: ir.Value) -> bool:
    """A mask value (or Where condition) that broadcasts over heads and queries: [B|1, 1, 1, N]
    or [1, N] (right-aligned to the logits [B, H, Nq, Nk]); its shape must be known."""
    shape = value.shape
    if shape is None or len(shape) not in (2, 3, 4):
        return False
    dims = list(shape)
    return all(d == 1 for d in dims[-3 if len(dims) >= 3 else -2:-1]) and (len(dims) < 4 or dims[1] == 1)


def _operands(attn: Attention, layer: int, masks: _Masks) -> tuple[ir.Value, ir.Value, ir.Value, int]:
    """(q, k or kᵀ, v, causal) of a block's attention; refuses what the op cannot take."""
    kind = masks.kind(attn)
    if kind is None:
        raise StructureError(f"[sparse_attention] block {layer}'s attention has a mask that is neither the causal rule "
                             "nor a bias of the keys alone (nor the two in one, within a sliding window or not); "
                             "block-sparse attention takes those only: remove the block from layers")
    masked = kind in ("causal", "causal_keys")
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
