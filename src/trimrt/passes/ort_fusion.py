"""ONNX Runtime kernel fusion: attention and GELU become ORT's contrib ops.

ONNX Runtime's own optimiser does not recognise the attention of dynamo exports; onnxscript's
`ort_fusions` rules (maintained with ONNX Runtime) rewrite it into `com.microsoft`
MultiHeadAttention, keeping the Q/K/V projections separate (no packed QKV), so quantized
projections stay quantized. `_canonicalise` first brings the other export forms
(TorchScript's run-time reshape targets and one-element NaN guard, GPT-2's rows, static GQA)
into the form the rules match; the report counts the blocks left unfused. Skip-LayerNorm is
deliberately not fused, and the build asks ORT not to either (SESSION_SETTINGS): its CPU
kernel took 3.9 ms for MiniLM's 12 residual LayerNorms at 256 tokens, the plain ops 1.5 ms.
Fusion must not change results: it is applied only when the fused copy's outputs agree
with the unfused graph's on random inputs (relative L2 ≤ FUSION_TOLERANCE).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from ..compiler.analysis import is_constant
from ..compiler.decoder import DECODER_SPEC
from ..compiler.input_limits import INPUT_LIMITS, find_input_limits
from ..compiler.probe import PROBE_TOKENS, annotate_unknown_dims, unknown_dim
from ..compiler.source import owned_model
from ..plugins import DOMAIN, attach_decompositions, runnable_proto
from ..quantization.encodings import MS_DOMAIN
from .base import PASS_TAG, TrimrtPass

log = logging.getLogger(__name__)

#: largest relative L2 difference of any output between the fused and unfused graph
FUSION_TOLERANCE = 1e-3
#: ONNX Runtime kernels the fusions emit in the standard domain, which onnx.checker does not know
ORT_STANDARD_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
#: what fused builds ask of the ONNX Runtime session (manifest "onnxruntime" entry)
SESSION_SETTINGS = {"disabled_optimizers": ["SkipLayerNormFusion"]}


def _fusions():
    """The fusion steps, in the order they build on each other (SDPA → MHA → MHA scale;
    an SDPA left over becomes an MHA too, never a function ORT does not know)."""
    from onnxscript.rewriter.ort_fusions import (
        bias_gelu,
        cos_sin_cache,
        erfgelu,
        gelu,
        mha,
        mha_scale,
        rms_normalization,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )

    return [
        ("erf_gelu", erfgelu.fuse_erfgelu, {}),
        # decoders (LLaMA-like): RMSNorm (with the residual Add before it) and RoPE
        ("rms_normalization", rms_normalization.fuse_rms_normalization, {}),
        ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization, {}),
        ("rotary_embedding", rotary_embedding.fuse_rotary_embedding, {}),
        ("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache, {}),
        ("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding, {}),
        ("sdpa", sdpa.fuse_sdpa, {"apply_shape_inference": True}),
        ("mha", mha.fuse_mha1, {}),
        ("mha_no_past", mha.fuse_mha2, {}),
        ("mha_scale", mha_scale.fuse_mha_scale, {}),
        ("gelu", gelu.fuse_gelu, {}),
        ("bias_gelu", bias_gelu.fuse_bias_gelu, {}),
        ("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha, {}),  # SDPAs no MHA pattern took (e.g. no mask)
    ]


def fuse_for_onnxruntime(model: ir.Model, limits: dict | None = None, decoder: bool = False) -> dict[str, int]:
    """Apply the fusions in place; return how often each one matched (`limits`: the
    model's input limits, for its shape probe; `decoder`: a KV-cache graph, not probed).

    trimrt ops' decompositions are attached meanwhile, so shape inference sees through
    them (the fusions need the shapes of pruned blocks), and set aside whenever the
    optimiser runs: it inlines every function, and must inline only the rewriter's own
    intermediates (an SDPA no MHA consumed), never trimrt ops."""
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import shape_optimization

    had = set(model.functions)
    attach_decompositions(model)
    own = {k: f for k, f in model.functions.items() if f.domain == DOMAIN}

    def optimize() -> None:
        for key in own:
            del model.functions[key]
        # a decoder's attention_bias is an initializer that is also an input: the deduplication
        # says it skips it, once per run, which is no news to the user
        dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
        level = dedup.level
        dedup.setLevel(logging.ERROR)
        try:
            optimizer.optimize(model)
            _register_orphan_constants(model)
        finally:
            model.functions.update(own)
            dedup.setLevel(level)

    # ONNX's data propagation fails inside If branches whose shapes read shape values of the
    # outer graph (a decoder's sparse prompt: "existing shape differs in rank"); onnx_ir then
    # keeps the shapes the graph has, which suffice, and logs a traceback the user can do
    # nothing about
    inference = logging.getLogger("onnx_ir.passes.common.shape_inference")
    inference_level = inference.level
    if any(n.op_type == "If" for n in model.graph):
        inference.setLevel(logging.ERROR)
    try:
        ir.passes.common.ShapeInferencePass()(model)
        pruned = any(n.domain == DOMAIN for n in model.graph)
        # a decoder's lengths are tied (past + new = total) in ways the probe's random feeds do not
        # honour; its dynamo export carries the shapes the fusions need
        if not decoder and (pruned or not all(_known(v.shape) for n in model.graph for v in n.outputs)):
            # pruned blocks and TorchScript exports: shape inference leaves the head count
            # unknown and names each token axis apart (unk__N); the fusions check both
            try:
                annotate_unknown_dims(model, limits)
            except Exception as exc:  # noqa: BLE001 - e.g. a position limit below the probe's length
                if pruned:
                    raise
                log.info("shape probe failed (%s); fusing on inferred shapes only", str(exc).splitlines()[0][:200])
            else:
                _name_probed_axes_as_inputs(model)
        optimize()
        shape_optimization.rules.apply_to_model(model)
        if _canonicalise(model):
            ir.passes.common.ShapeInferencePass()(model)  # the shapes of the values it made
        _private_layouts(model)  # after the optimiser: its CSE would merge the copies back
        counts = {name: int(fn(model, **kwargs)) for name, fn, kwargs in _fusions()}
        optimize()  # inlines leftover fusion intermediates, drops dead nodes
    finally:
        inference.setLevel(inference_level)
        for key in set(own) - had:  # AttachDecompositionsPass adds them for good later
            del model.functions[key]
    if any(n.domain == MS_DOMAIN for n in model.graph):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return counts


def _canonicalise_rules():
    """trimrt's rewrites that bring other export forms of attention into the form
    onnxscript's SDPA rule matches (built lazily: onnxscript is imported on use)."""
    from onnxscript.rewriter import pattern

    class ScalarNanGuard(pattern.RewriteRuleClassBase):
        """Softmax's NaN guard `Where(IsNaN(p), [0.0], p)` with a one-element (not scalar)
        zero, as the TorchScript exporter writes it: the SDPA rule wants a scalar."""

        def pattern(self, op, probs, zero):
            return op.Where(op.IsNaN(probs), zero, probs)

        def check(self, context, probs, zero, **_):
            value = zero.const_value
            return (value is not None and value.size == 1 and len(value.shape) >= 1
                    and float(value.numpy().reshape(())) == 0.0 and probs.shape is not None
                    and len(probs.shape) >= len(value.shape))

        def rewrite(self, op, probs, zero, **_):
            scalar = op.Constant(value=ir.tensor(zero.const_value.numpy().reshape(())))
            return op.Where(op.IsNaN(probs), scalar, probs)

    class HeadsToRows(pattern.RewriteRuleClassBase):
        """`Reshape(Transpose(o, [0, 2, 1, 3]), [-1, D])`: the attention output [B, H, S, d]
        flattened straight to rows (GPT-2's Conv1D is a Gemm on [B·S, D]). The attention
        rules replace the last Reshape of their pattern by a [B, S, D] output, so that
        Reshape must be the one to [B, S, D]: go through it, then to rows. (Only the
        Reshape is matched: the replacement goes where it was, after its shape input.)"""

        def pattern(self, op, heads, shape):
            return op.Reshape(heads, shape, _outputs=["rows"])

        def check(self, context, heads, rows, **_):
            step = heads.producer()
            if step is None or step.op_type != "Transpose" or list(step.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
                return False
            dims, out = _dims(heads), _dims(rows)
            return (dims is not None and len(dims) == 4 and isinstance(dims[2], int) and isinstance(dims[3], int)
                    and out is not None and len(out) == 2 and out[1] == dims[2] * dims[3])

        def rewrite(self, op, heads, shape, **_):
            return op.Reshape(op.Reshape(heads, op.Constant(value_ints=[0, 0, -1])), shape)

    class GroupedKeyHeads(pattern.RewriteRuleClassBase):
        """Grouped-query keys expanded to [B, Hkv, G, S, d] and flattened straight to
        [B·H, S, d] for the 3-D transpose to kᵀ (the optimiser folds the [B, H, S, d] view
        away when shapes are static): put the 4-D view back, the key the SDPA rule reads."""

        def pattern(self, op, key, flat):
            return op.Reshape(key, flat, _outputs=["rows"])

        def check(self, context, key, rows, **_):
            dims, out = _dims(key), _dims(_only_use(_only_use(rows, "Transpose", [0, 2, 1]), "Reshape"))
            if dims is None or len(dims) == 4 or out is None or len(out) != 4 \
                    or not all(isinstance(d, int) for d in (*dims, *out)) or math.prod(dims) != math.prod(out):
                return False
            self._view = [out[0], out[1], out[3], out[2]]  # kᵀ is [B, H, d, S]
            return True

        def rewrite(self, op, key, flat, **_):
            return op.Reshape(op.Reshape(key, op.Constant(value_ints=self._view)), flat)

    return pattern.RewriteRuleSet([ScalarNanGuard.rule(), HeadsToRows.rule(), GroupedKeyHeads.rule()])


def _canonicalise(model: ir.Model) -> int:
    """Rewrite attention written in other export forms into the one the fusions match;
    returns the number of rewrites."""
    changed = _drop_noop_reshapes(model) + _sizes_from_inputs(model)
    if changed:  # drop what computed the old sizes: to the rules, a use of q / k / v inside the pattern
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return changed + int(_canonicalise_rules().apply_to_model(model))


def _dims(value: ir.Value) -> list | None:
    """The value's dims (ints or symbols), None when its rank is unknown."""
    return None if value is None or value.shape is None else list(value.shape)


def _only_use(value: ir.Value | None, op_type: str, perm: list[int] | None = None) -> ir.Value | None:
    """The output of `value`'s only consumer when that is an `op_type` (with `perm`)."""
    uses = [] if value is None else list(value.uses())
    if len(uses) != 1:
        return None
    node = uses[0][0]
    if not _is_op(node, op_type) or (perm is not None and list(node.attributes.get_ints("perm", [])) != perm):
        return None
    return node.outputs[0]


def _is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.op_type in op_types and node.domain in ("", "ai.onnx")


def _known(shape) -> bool:
    """Every axis a number or a symbol shape inference / the probe related to others."""
    return shape is not None and not any(unknown_dim(d) for d in shape)


def _name_probed_axes_as_inputs(model: ir.Model) -> None:
    """One name per axis: the probe names the batch and token axes it fills in "batch"
    and "n<probe tokens>_<…>", while shape inference names the axes it could follow after
    the graph inputs' symbols, and the attention rules compare query, key and value axes
    by name. Rename the probe's names to the inputs' (when the inputs agree on one batch
    symbol and one token symbol)."""
    batch = {v.shape[0].value for v in model.graph.inputs if v.shape is not None and len(v.shape) >= 1
             and isinstance(v.shape[0], ir.SymbolicDim) and v.shape[0].value}
    tokens = {d.value for v in model.graph.inputs if v.shape is not None for d in list(v.shape)[1:]
              if isinstance(d, ir.SymbolicDim) and d.value}
    prefix = f"n{PROBE_TOKENS}_"

    def renamed(dim):
        name = getattr(dim, "value", None)
        if name == "batch" and len(batch) == 1:
            return next(iter(batch))
        if isinstance(name, str) and len(tokens) == 1 and name.startswith(prefix) and name[len(prefix):].isdigit():
            return next(iter(tokens))
        return dim

    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None and not all(isinstance(d, int) for d in value.shape):
                value.shape = ir.Shape([renamed(d) for d in value.shape])


def _drop_noop_reshapes(model: ir.Model) -> int:
    """Bypass Reshapes whose output has its input's shape (TorchScript reshapes the
    attention output [B, H, S, d] to [B, H, S, d] through a computed shape): the attention
    patterns expect the transpose right after the product with V."""
    outputs = set(model.graph.outputs)
    noops = [node for node in model.graph if _is_op(node, "Reshape") and node.outputs[0] not in outputs
             and _known(node.inputs[0].shape) and _known(node.outputs[0].shape)
             and list(node.inputs[0].shape) == list(node.outputs[0].shape)]
    for node in noops:
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
    return len(noops)


def _sizes_from_inputs(model: ir.Model) -> int:
    """Read sizes `Gather(Shape(x), i)` from where they come: a constant when the axis
    is static, else the graph input's axis of the same symbol. TorchScript exports take
    the batch and token counts for each reshape from the tensor at hand (GPT-2's
    `x.size()[:-1]` on the heads it merges), a second use of a value inside the attention
    pattern that keeps it from fusing. Returns the number of sizes rerouted."""
    sources = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or []):
            if isinstance(dim, ir.SymbolicDim) and not unknown_dim(dim):
                sources.setdefault(dim.value, (value, axis))
    if not sources:
        return 0
    inputs_shape: dict[str, ir.Value] = {}
    first = next(iter(model.graph), None)
    rerouted = 0
    for node in list(model.graph):
        if not _is_op(node, "Shape") or node.attributes or node.inputs[0] in model.graph.inputs \
                or not _known(node.inputs[0].shape):
            continue
        dims = list(node.inputs[0].shape)
        for gather, _ in list(node.outputs[0].uses()):
            index = gather.inputs[1].const_value if gather.op_type == "Gather" and len(gather.inputs) == 2 else None
            if index is None or len(index.shape) != 0 or gather.attributes.get_int("axis", 0) != 0 \
                    or gather.outputs[0].is_graph_output():
                continue
            dim = dims[int(index.numpy())]
            if isinstance(dim, int):
                new = [_int64_constant(dim)]
            elif dim.value in sources:
                source, axis = sources[dim.value]
                if source.name not in inputs_shape:
                    shape = ir.node("Shape", [source], name=f"{source.name}_shape")
                    model.graph.insert_before(first, shape)
                    inputs_shape[source.name] = shape.outputs[0]
                axis_value = _int64_constant(axis)
                new = [axis_value, ir.node("Gather", [inputs_shape[source.name], axis_value.outputs[0]], {"axis": 0})]
            else:
                continue
            model.graph.insert_before(gather, new)
            size = new[-1].outputs[0]
            size.dtype, size.shape = ir.DataType.INT64, ir.Shape([])
            ir.convenience.replace_all_uses_with(gather.outputs[0], size)
            rerouted += 1
    return rerouted


def _int64_constant(number: int) -> ir.Node:
    return ir.node("Constant", [], {"value": ir.tensor(np.array(number, dtype=np.int64))})


def _register_orphan_constants(model: ir.Model) -> None:
    """Make initializers of constant inputs that belong to no graph: onnxscript's
    optimiser can leave one when it lifts two equal shape constants (GPT-2's [-1, D] row
    reshapes in a static TorchScript export), and the model would not load."""
    graph = model.graph
    orphans = {id(value): value for node in graph for value in node.inputs
               if value is not None and value.producer() is None and value.graph is None
               and value.const_value is not None and value.name not in graph.initializers}
    for value in orphans.values():
        graph.register_initializer(value)


def _layout_step(value: ir.Value) -> ir.Node | None:
    """The producer of `value` if it re-lays out one tensor into heads (Q, Kᵀ, V) or
    scales it by a constant."""
    node = value.producer()
    if _is_op(node, "Reshape", "Transpose") or (_is_op(node, "Mul", "Div") and len(node.inputs) == 2
                                               and is_constant(node.inputs[1]) and not is_constant(node.inputs[0])):
        return node
    return None


def _private_layouts(model: ir.Model) -> None:
    """Give trimrt ops (and the token passes' own nodes) their own copy of the Reshape / Transpose /
    constant-scale chain that makes the q / kᵀ they read from a projection. A score op sharing the
    attention's Kᵀ is a second use of a value inside the attention pattern, which then cannot fuse;
    the copy costs one relayout of [B, N, D]."""
    for node in list(model.graph):
        if node.domain != DOMAIN and node.metadata_props.get(PASS_TAG) in (None, OrtFusionPass.name):
            continue  # only what trimrt ops and the token passes' own nodes (e.g. ToMe's key mean) read
        for index, value in enumerate(node.inputs):
            chain, source = [], value
            while source is not None and (step := _layout_step(source)) is not None:
                chain.append(step)
                source = step.inputs[0]
            if not chain or len(value.uses()) < 2:
                continue
            for original in reversed(chain):  # rebuild from the projection's output outwards
                clone = ir.node(original.op_type, [source, *original.inputs[1:]], dict(original.attributes),
                                name=f"{original.name}_private")
                source, was = clone.outputs[0], original.outputs[0]
                source.name, source.shape, source.dtype = f"{was.name}_private", was.shape, was.dtype
                clone.metadata_props[PASS_TAG] = OrtFusionPass.name
                model.graph.insert_before(node, clone)
            node.replace_input_with(index, source)


class OrtFusionPass(TrimrtPass):
    """Fuse into ONNX Runtime contrib kernels, verified against the unfused graph."""

    name = "ort_fusion"
    recipe_table = "onnxruntime"

    def __init__(self, tokens: int = 32):
        super().__init__()
        self.tokens = tokens  # token count of the check inputs (at least what the build accepts)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        limits = self.context.shared.get(INPUT_LIMITS)  # the original model's, shared by the pipeline
        decoder = self.context.shared.get(DECODER_SPEC)
        before = ir.serde.serialize_model(model)
        trial = owned_model(before)  # the optimiser must not rename initializers inside `before`
        existing = {id(n) for n in trial.graph}
        try:
            counts = fuse_for_onnxruntime(trial, limits=limits, decoder=decoder is not None)
        except Exception as exc:  # noqa: BLE001 - a rewriter failure must not fail the build
            return self._skipped(model, f"the fusion rules failed: {str(exc).splitlines()[0]}")
        if not any(counts.values()):
            return self._skipped(model, "no pattern matched", fused=counts)
        drift = relative_drift(before, ir.serde.serialize_model(trial), self.tokens, limits, decoder)
        if drift is None or drift > FUSION_TOLERANCE:
            why = ("the fused graph does not run on ONNX Runtime" if drift is None
                   else f"the fused graph differs from the unfused one (relative error {drift:.2g})")
            return self._skipped(model, why)
        # the checked trial becomes the model (in place: the model object stays, its graph and
        # functions are the trial's), rather than rewriting the model a second time
        model.graph = trial.graph
        model.functions.clear()
        model.functions.update(trial.functions)
        b = self.builder(model.graph)
        for node in model.graph:
            if id(node) not in existing:
                b.stamp(node)
        left = attention_softmaxes(model)
        if left and decoder is None:  # a decoder's attention is an Attention op or on grouped heads already (kv_attention)
            log.warning("ONNX Runtime fusion: %d attention block(s) kept unfused (no fusion rule matched their form)", left)
        self.record({"fused": {k: v for k, v in counts.items() if v}, "applied": True,
                     "attention_unfused": left, "max_relative_error": float(f"{drift:.3g}"),
                     "contrib_ops": sorted({n.op_type for n in model.graph if n.domain == MS_DOMAIN}),
                     "session": SESSION_SETTINGS})
        return ir.passes.PassResult(model, modified=True)

    def _skipped(self, model: ir.Model, reason: str, **fused) -> ir.passes.PassResult:
        """Leave `model` as it was; warn unless the fusions ran and merely matched nothing (`fused`)."""
        if not fused:
            log.warning("ONNX Runtime fusion skipped: %s", reason)
        self.record({**fused, "applied": False, "reason": reason, "attention_unfused": attention_softmaxes(model),
                     "session": SESSION_SETTINGS})
        return ir.passes.PassResult(model, modified=False)


def attention_softmaxes(model: ir.Model) -> int:
    """How many attention blocks still run as explicit ops: Softmaxes over a MatMul's
    scores (through a scale, a mask Add or Where)."""
    count = 0
    for node in model.graph:
        if not _is_op(node, "Softmax"):
            continue
        value = node.inputs[0]
        for _ in range(4):
            step = value.producer()
            if step is None or step.op_type not in ("Add", "Mul", "Div", "Where", "MatMul"):
                break
            if step.op_type == "MatMul":
                count += 1
                break
            value = step.inputs[-1] if step.op_type == "Where" else step.inputs[0]
    return count


def relative_drift(before, after, tokens: int, limits: dict | None, decoder=None) -> float | None:
    """Largest relative L2 difference over the outputs, on random inputs (batch 2, ids
    inside `limits`, found on `before` if None; for a `decoder`, a decode step on a past and
    a prompt of `tokens`, which a pruned prompt's branch runs on); None when the fused graph
    fails to run."""
    from ..compare import relative_l2
    from ..runtime.backends import OnnxRuntimeBackend
    from ..runtime.feeds import random_feeds

    proto = runnable_proto(before)
    # one session at a time, no arena (which keeps a run's peak for the session's life): a
    # pruned decoder's check runs a prompt as long as its span, its scores N × N per layer
    unfused = OnnxRuntimeBackend(proto.SerializeToString(), memory_arena=False)
    unfused.activate()
    prompt = min(tokens, decoder.max_positions or tokens) if decoder is not None else tokens
    runs = [decoder.random_feeds(2), decoder.random_feeds(2, new=prompt, past=0)] if decoder is not None else \
        [random_feeds(unfused.inputs, batch=2, seed=0, tokens=tokens,
                      limits=find_input_limits(proto) if limits is None else limits)]
    want = [unfused.infer(feeds) for feeds in runs]
    del unfused
    try:
        fused = OnnxRuntimeBackend(runnable_proto(after).SerializeToString(), memory_arena=False)
        fused.activate()
        got = [fused.infer(feeds) for feeds in runs]
    except Exception:  # noqa: BLE001 - ORT errors are opaque; the caller reports the stage
        return None
    drifts = [relative_l2(w, g) for w, g in zip(want, got)]
    return None if None in drifts else max(drifts)

