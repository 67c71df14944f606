"""The pass pipeline: one visible, ordered list.

    canonicalize → analyse → feature passes (token pruning, …) → attach decompositions
    → cleanup → target finalisation

`build_passes(recipe, target)` returns that list; `run_pipeline` runs it with onnx_ir's
PassManager and collects each pass's report for the build manifest. An `after_pass`
instrument may inspect the model after every pass (how verify attributes drift).
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, TopologicalSortPass

from ..errors import BuildError, ModelLoadError, TrimrtError
from ..passes import (
    KVAttentionPass,
    MixtureOfDepthsPass,
    OrtFusionPass,
    PackedProjectionsPass,
    QuantizationPass,
    SparseAttentionPass,
    TokenMergingPass,
    TokenPruningPass,
    TokenSlimmingPass,
    TrimPaddingPass,
    TrimrtPass,
    UnfuseAttentionPass,
)
from ..passes.base import PassReport, PipelineContext
from ..plugins import DOMAIN, OP_VERSION, attach_decompositions
from ..recipe import Recipe
from .analysis import infer_shapes, structure_of
from .decoder import DECODER_SPEC
from .input_limits import INPUT_LIMITS, find_input_limits
from .source import MIN_OPSET

TARGETS = ("onnxruntime", "openvino", "tensorrt")


class CanonicalizePass(TrimrtPass):
    """Bring the graph to the form passes expect: opset ≥ 18 and shapes annotated. The
    input limits of the model as given are shared with the passes that run it (shape
    probes, the fusion check), unless the caller found them already."""

    name = "canonicalize"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 0)
        if opset < MIN_OPSET:  # load_source up-converts older models; this guards other entry points
            raise ModelLoadError(f"the model uses ONNX opset {opset}; trimrt needs opset >= {MIN_OPSET}")
        infer_shapes(model)
        if INPUT_LIMITS not in self.context.shared:
            self.context.shared[INPUT_LIMITS] = find_input_limits(ir.serde.serialize_model(model))
        self.record({"opset": opset, "nodes": len(model.graph)})
        return ir.passes.PassResult(model, modified=False)


class AnalysePass(TrimrtPass):
    """Analyse the transformer structure once for the compile: recorded, and shared with
    the token passes through the context (does not change the graph)."""

    name = "analyse"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.record(structure_of(model, self.context.shared).summary())
        return ir.passes.PassResult(model, modified=False)


class AttachDecompositionsPass(TrimrtPass):
    """Attach, for every trimrt op used, its decomposition as a model-local function."""

    name = "attach_decompositions"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        used = attach_decompositions(model)
        self.record({"functions": used})
        return ir.passes.PassResult(model, modified=bool(used))


class CleanupPass(TrimrtPass):
    """Drop dead nodes and opsets, sort topologically, re-infer shapes."""

    name = "cleanup"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        RemoveUnusedNodesPass()(model)
        sunk = _sink_into_branches(model.graph)  # once the dead nodes, which count as users, are gone
        TopologicalSortPass()(model)
        RemoveUnusedOpsetsPass()(model)
        if any(n.domain == DOMAIN for n in model.graph.all_nodes()):
            model.opset_imports[DOMAIN] = OP_VERSION
        infer_shapes(model)
        self.record({"nodes_removed": before - len(model.graph) - sunk, "nodes_moved_into_branches": sunk})
        return ir.passes.PassResult(model, modified=True)


def _sink_into_branches(graph: ir.Graph) -> int:
    """Move the nodes whose every output is read only inside one If branch into that branch:
    ONNX Runtime computes outer values before the If runs, whichever branch it takes (a
    pruned decoder's scoring inputs at every decode step, say). Returns the nodes moved."""
    branches = {id(a.value) for n in graph if n.op_type == "If" for a in n.attributes.values()
                if a.type == ir.AttributeType.GRAPH}
    moved = 0
    for node in reversed(list(graph)):
        users = {id(user.graph): user.graph for out in node.outputs for user, _ in out.uses()}
        if (len(users) != 1 or node.op_type == "If" or any(out.is_graph_output() for out in node.outputs)
                or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values())):
            continue
        (branch,) = users.values()
        if id(branch) not in branches:
            continue
        graph.remove(node)
        if len(branch):
            branch.insert_before(branch[0], node)
        else:
            branch.append(node)
        moved += 1
    return moved


class TargetPass(TrimrtPass):
    """Target finalisation. TensorRT: mark custom nodes as plugins (namespace, version)."""

    name = "target"

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        marked = 0
        if self.target == "tensorrt":
            for node in model.graph.all_nodes():
                if node.domain == DOMAIN:
                    node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", DOMAIN)
                    node.attributes["plugin_version"] = ir.AttrString("plugin_version", str(OP_VERSION))
                    marked += 1
        self.record({"target": self.target, "plugin_nodes": marked})
        return ir.passes.PassResult(model, modified=bool(marked))


def min_tokens(recipe: Recipe) -> int:
    """Fewest tokens a build of `recipe` accepts (a prunable span must fit; merging needs
    two tokens to match)."""
    if recipe.token_merging is not None:
        return 2
    tp = recipe.span_table
    if tp is None:
        return 0
    return tp.span_end if tp.span_end is not None else tp.protected_prefix + 1


def build_passes(recipe: Recipe, target: str = "onnxruntime", progress: bool = False,
                 context: PipelineContext | None = None) -> list[TrimrtPass]:
    """The ordered pass list for a recipe and target (`progress`: long passes draw bars),
    sharing one PipelineContext (a new one unless given)."""
    feature: list[TrimrtPass] = []
    if recipe.token_slimming is not None and recipe.token_slimming.fuse:
        feature.append(TokenSlimmingPass())  # first: it matches the model's own modules, as exported
    if recipe.padding is not None and recipe.padding.trim_trailing:
        feature.append(TrimPaddingPass())  # it probes the graph on ONNX Runtime, before token ops appear
    if recipe.token_pruning is not None:
        feature.append(TokenPruningPass(recipe.token_pruning))
    if recipe.token_merging is not None:
        feature.append(TokenMergingPass(recipe.token_merging))
    if recipe.mixture_of_depths is not None:
        feature.append(MixtureOfDepthsPass(recipe.mixture_of_depths))
    if recipe.sparse_attention is not None:  # after the token passes: the attention of the tokens they leave
        feature.append(SparseAttentionPass(recipe.sparse_attention, tokens=max(32, min_tokens(recipe) + 8)))
    decoder = target == "onnxruntime" and context is not None and context.shared.get(DECODER_SPEC) is not None
    if decoder:
        # exact (checked); before quantization, which calibrates on the graph that runs
        feature.append(KVAttentionPass(tokens=max(32, min_tokens(recipe) + 8)))
    if target == "onnxruntime" and recipe.onnxruntime is not None and recipe.onnxruntime.fuse:
        # a float rewrite of the reduced graph, checked float against float; quantization then
        # calibrates and quantizes the graph that will run (its projections stay MatMuls)
        feature.append(OrtFusionPass(tokens=max(32, min_tokens(recipe) + 8)))
    if decoder:
        feature.append(PackedProjectionsPass())  # after the fusion (its rules match Q, K, V apart), before quantization
    if recipe.quantization is not None:
        feature.append(QuantizationPass(recipe.quantization, recipe.calibration, recipe.directory, target,
                                        progress=progress, decoder=decoder))  # last: the pruned / merged graph
    token_level = any(t is not None for t in (recipe.token_pruning, recipe.token_merging, recipe.mixture_of_depths,
                                              recipe.sparse_attention))
    # needed by token-level passes only (an ONNX Runtime-optimised model's fused attention written out first)
    analysis = [UnfuseAttentionPass(), AnalysePass()] if token_level else []
    passes = [CanonicalizePass(), *analysis, *feature, AttachDecompositionsPass(), CleanupPass(), TargetPass(target)]
    context = context if context is not None else PipelineContext()
    for p in passes:
        p.context = context
    return passes


def run_pipeline(model: ir.Model, passes: list[TrimrtPass],
                 after_pass: Callable[[TrimrtPass, ir.Model], None] | None = None) -> list[PassReport]:
    """Run the passes in order (in place); return their reports, in order. `after_pass`
    (an instrument, e.g. verify --per-pass) sees the model after every pass."""
    try:
        if after_pass is None:
            ir.passes.PassManager(passes)(model)
        else:
            for p in passes:
                p(model)
                after_pass(p, model)
    except ir.passes.PassError as exc:
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, TrimrtError):
            cause = cause.__cause__
        if isinstance(cause, TrimrtError):
            raise cause from None
        raise BuildError(f"a compiler pass failed: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
                         "; please report this model with the recipe") from exc
    return list(passes[0].context.reports) if passes else []
