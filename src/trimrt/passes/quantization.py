"""Quantization of the linear layers: every MatMul of an activation by a constant 2-D
weight W [K, N] (and every Gemm that is one, plus a bias), after the token passes; MatMuls
inside trimrt op functions (activation × activation) stay float. The pass calibrates on
the float graph when the recipe needs data, lets the method (quantization.methods) fit on
the fit part of the samples and check on the held-out part (quantization.holdout), runs
the fidelity guard with `min_cosine` (quantization.guard), and writes each MatMul in its
target's encoding (quantization.encodings; README's "What runs where"). SmoothQuant's and
AWQ's input scale s becomes one Mul by 1/s, folded into the LayerNormalization that makes
x when nothing else reads it. With `attention` (the default for encoders on OpenVINO),
the two inputs of each attention's q·kᵀ product are put on the int8 grid too (one
calibrated scale per tensor), which OpenVINO runs as an INT8 attention kernel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..compare import mean_cosine
from ..compiler.analysis import constant_array, is_constant, score_products
from ..compiler.onnx_runner import OnnxRunner
from ..compiler.progress import steps
from ..errors import BuildError, RecipeError
from ..plugins import DOMAIN, runnable_proto
from ..quantization.encodings import SharedQuantized, constant, encoding_for, fake_quantized
from ..quantization.guard import choose_float_layers
from ..quantization.holdout import Split, split_samples
from ..quantization.methods import Linear, QuantizedLinear, Skipped, quantize_linears
from ..quantization.numerics import int8_scale
from ..recipe import CalibrationOptions, QuantizationOptions
from ..registry import QUANTIZATION_METHODS, QUANTIZED_ENCODINGS
from .base import GraphBuilder, PipelineContext, TrimrtPass

log = logging.getLogger(__name__)

#: held-out calibration samples the guard evaluates candidate builds on (the first ones),
#: and fitted samples the final build's `cosine_fit` is measured on
GUARD_SAMPLES = 32
#: (graph, prefix) -> a GraphBuilder tagging its nodes with the pass (TrimrtPass.builder)
Builder = Callable[[ir.Graph, str], GraphBuilder]

class QuantizationPass(TrimrtPass):
    name = "quantization"
    recipe_table = "quantization"
    exact = False

    def __init__(self, options: QuantizationOptions, calibration: CalibrationOptions | None = None,
                 recipe_dir: Path | None = None, target: str = "onnxruntime", progress: bool = True,
                 context: PipelineContext | None = None, decoder: bool = False):
        super().__init__(context)
        self.options, self.calibration, self.recipe_dir = options, calibration, recipe_dir
        self.target, self.progress = target, progress
        self.method = QUANTIZATION_METHODS[options.method]
        self.encoding = QUANTIZED_ENCODINGS[encoding_for(options.weights, target)]
        self.attention = options.attention
        if self.attention is None:  # the target's default; a decoder's cached keys are not calibrated: kept float
            self.attention = (target == "openvino" and not decoder and self.encoding.static_activations
                              and options.weights == "int8")
        if self.attention and not self.encoding.static_activations:
            raise RecipeError(f"[quantization] attention = true needs static activation scales, which {target} builds "
                              "of these weights do not use: build --target openvino or tensorrt, or remove it")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_linears(model.graph)
        for i, (_, x, _) in enumerate(sites):
            x.name = x.name or f"trimrt_quant_input_{i}"
        product_inputs = []
        for i, (value, *_) in enumerate(product_sources(model.graph) if self.attention else []):
            value.name = value.name or f"trimrt_attention_input_{i}"
            product_inputs.append(value.name)
        linears = [Linear(node.name or f"MatMul_{i}", x.name, w) for i, (node, x, w) in enumerate(sites)]
        # calibration data given is always used: at least to measure the build's fidelity
        needs_data = self.options.needs_calibration or self.encoding.static_activations or self.calibration is not None
        if needs_data and self.calibration is None:
            raise RecipeError(f"INT8 builds for {self.target} need static activation scales: add a [calibration] "
                              "table (source = ..., or random = true for a smoke test)")
        split, stats, held_stats, original = Split([], []), {}, None, None
        if needs_data and linears:
            original = ir.serde.serialize_model(model)  # the float graph, for calibration and the guard
            split, stats, held_stats = self._calibrate(original, linears, product_inputs)
        attention_scales = {name: _tensor_scale(stats[name]) for name in product_inputs if name in stats}
        plan = quantize_linears(self.options, linears, stats, static_activations=self.encoding.static_activations,
                                held_out=held_stats)
        candidates = [i for i, q in enumerate(plan) if isinstance(q, QuantizedLinear)]
        fidelity, kept_float = None, []
        if (split.fit or split.held_out) and candidates:
            fidelity, kept_float = self._guard(original, linears, plan, candidates, split, attention_scales)
        chosen = frozenset(candidates) - set(kept_float)
        apply_plan(model, sites, plan, chosen, self.builder, self.target)
        quantized_products = quantize_products(model.graph, attention_scales, self.builder)
        report = self._report(linears, plan, chosen, kept_float, fidelity, split)
        if self.attention:
            report["attention_products"] = {"quantized": quantized_products, "encoding": "int8 q and k, "
                                            "static scale per tensor (QuantizeLinear/DequantizeLinear)"}
        modified = bool(chosen) or bool(quantized_products)
        self.record(report, changes_results=modified)
        return ir.passes.PassResult(model, modified=modified)

    def _guard(self, original, linears: list[Linear], plan, candidates: list[int], split: Split,
               attention_scales: dict[str, float]):
        """(the fidelity report, the layers kept float): the output cosine of the build on the
        held-out samples (the guard's, with `min_cosine`) and on fitted ones (`cosine_fit`);
        quantized attention products count in every evaluation (the guard keeps linears only)."""
        evaluate = _Evaluator(original, plan, self.builder, self.target, (split.held_out or split.fit)[:GUARD_SAMPLES],
                              attention_scales)
        fidelity = {"measured_on": split.measured_on, "samples": len(evaluate.feeds)}
        floor = self.options.min_cosine
        with steps("fidelity guard", 2 + 2 * len(candidates), enabled=self.progress and floor is not None) as advance:
            result = choose_float_layers(candidates, evaluate, floor, advance)
            cosine_fit = result.cosine
            if split.held_out and result.quantized:
                cosine_fit = _Evaluator(original, plan, self.builder, self.target, split.fit[:GUARD_SAMPLES],
                                        attention_scales)(result.quantized)
            advance()
        fidelity.update({"cosine": round(result.cosine, 6), "cosine_fit": round(cosine_fit, 6)})
        if floor is not None:
            fidelity.update({"cosine_all_quantized": round(result.cosine_all_quantized, 6), "min_cosine": floor,
                             "sensitivity": {linears[i].name: round(c, 6) for i, c in result.sensitivity.items()}})
        fidelity["samples_fit"] = min(len(split.fit), GUARD_SAMPLES)
        return fidelity, result.kept_float

    def _calibrate(self, original, linears: list[Linear], product_inputs: list[str]):
        """(the split feeds, statistics of the fit part, statistics of the held-out part for
        checking the method's choices or None); the fit part's statistics include the range
        of each attention product input."""
        from ..quantization.calibration import collect_activation_stats, load_calibration_feeds, model_inputs

        runnable = runnable_proto(original)
        feeds = load_calibration_feeds(self.calibration, model_inputs(runnable), self.recipe_dir)
        if not feeds:
            raise BuildError("the calibration source gave no samples: check [calibration] source")
        split = split_samples(feeds)
        want = set(self.method.statistics)
        if self.encoding.static_activations:
            want.add("absmax")  # the per-tensor activation scales
        names = sorted({lin.activation for lin in linears})
        stats = collect_activation_stats(runnable, split.fit, names, want=want, progress=self.progress,
                                         seed=self.calibration.seed, tensor_ranges=product_inputs)
        held_stats, check = None, self.method.held_out_statistics
        if split.held_out and check:
            held_stats = collect_activation_stats(runnable, split.held_out, names, want=check,
                                                  progress=self.progress, seed=self.calibration.seed + 1)
        return split, stats, held_stats

    def _report(self, linears, plan, chosen, kept_float, fidelity, split: Split) -> dict:
        layers = []
        for i, (linear, q) in enumerate(zip(linears, plan)):
            entry = {"name": linear.name, "shape": list(linear.weight.shape)}
            if i in chosen:
                # "method": the held-out check rejected the recipe's method here
                method = q.method if q.method != self.options.method else None
                extra = {"alpha": q.alpha, "method": method, "held_out_vs_rtn": q.held_out_vs_rtn, "damping": q.damping}
                entry.update({"format": q.format, **{k: v for k, v in extra.items() if v is not None}})
            else:
                entry["format"] = "float"
                entry["reason"] = str(q) if isinstance(q, Skipped) else "fidelity guard"
            layers.append(entry)
        before = sum(linear.weight.nbytes for linear in linears)
        after = sum(q.nbytes if i in chosen else linear.weight.nbytes
                    for i, (linear, q) in enumerate(zip(linears, plan)))
        o = self.options
        report = {"weights": o.weights, "activations": o.activations, "method": o.method,
                  "encoding": self.encoding.describe(),
                  "matmuls_quantized": len(chosen), "matmuls_float": len(linears) - len(chosen),
                  "weight_bytes_before": before, "weight_bytes_after": after, "layers": layers}
        if o.weights == "int4":
            report["group_size"] = o.group_size
        samples = len(split.fit) + len(split.held_out)
        if samples:
            report["calibration"] = {"samples": samples, "source": "random" if self.calibration.random
                                     else self.calibration.source}
            if split.held_out:
                report["calibration"].update({"fit": len(split.fit), "held_out": len(split.held_out)})
        optional = {"matmuls_fallback_rtn": sum("method" in layer for layer in layers), "fidelity": fidelity,
                    "kept_float": [linears[i].name for i in kept_float]}
        return {**report, **{key: value for key, value in optional.items() if value}}


def find_linears(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value, np.ndarray]]:
    """(node, activation, weight [K, N] float32) of every MatMul of an activation by a
    constant 2-D float32 weight, and every Gemm that is one plus a bias (alpha 1, A not
    transposed; GPT-2's Conv1D, classifier heads), in graph order."""
    sites = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0
                                       or node.attributes.get_int("transA", 0)):
            continue
        x, w = node.inputs[0], node.inputs[1]
        weight = constant_array(w)
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or is_constant(x):
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        sites.append((node, x, weight))
    return sites


def _gemm_bias(b: GraphBuilder, node: ir.Node, out: ir.Value) -> ir.Value:
    """Gemm's + beta · C after its quantized product (`out` itself for a MatMul or no C)."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return out
    bias, beta = node.inputs[2], node.attributes.get_float("beta", 1.0)
    if beta != 1.0:
        bias = b.op("Mul", [bias, constant(b, f"{b.prefix}_beta", np.array(beta, np.float32))],
                    name=f"{b.prefix}_beta_bias")
    return b.op("Add", [out, bias], name=f"{b.prefix}_bias")


def apply_plan(model: ir.Model, sites, plan: list, chosen: frozenset[int], builder: Builder, target: str) -> None:
    """Replace the chosen MatMuls (indices into `sites`) by their encodings, in place;
    `builder(graph, prefix)` makes the pass's GraphBuilder (TrimrtPass.builder)."""
    graph = model.graph
    shared: SharedQuantized = {}
    scaled_inputs: dict[tuple[str, int], ir.Value] = {}
    for i in sorted(chosen):
        node, x, _ = sites[i]
        q: QuantizedLinear = plan[i]
        b = builder(graph, f"trimrt_quant_{i}")
        if q.input_scale is not None:
            key = (x.name, id(q.input_scale))
            if key not in scaled_inputs:
                scaled_inputs[key] = _divide_input(b, x, q.input_scale, sites, plan, chosen)
            x = scaled_inputs[key]
        encoding = QUANTIZED_ENCODINGS[encoding_for(q.format, target)]
        out = _gemm_bias(b, node, encoding.build(b, x, q, shared))
        for domain, version in encoding.opsets.items():
            # raising the default opset only adds types to the ops exporters emit (18 → 19 / 21)
            if model.opset_imports.get(domain, 0) < version:
                model.opset_imports[domain] = version
        b.insert_before(node)
        old = node.outputs[0]
        out.name, old.name = old.name, f"{old.name}_float"
        out.shape = old.shape if old.shape is not None else out.shape
        out.dtype = old.dtype if old.dtype is not None else out.dtype
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)


def _divide_input(b: GraphBuilder, x: ir.Value, s: np.ndarray, sites, plan, chosen) -> ir.Value:
    """x / s for the MatMuls sharing `s`: folded into x's LayerNormalization when only
    they read x, else one Mul by 1/s."""
    readers = {id(n) for n, _ in x.uses()}
    group = {id(sites[j][0]) for j in chosen if sites[j][1] is x and plan[j].input_scale is s}
    producer = x.producer()
    if producer is not None and readers == group and _fold_into_layer_norm(b, producer, s):
        return x
    inverse = constant(b, f"{b.prefix}_input_scale", (1.0 / s).astype(np.float32))
    smoothed = b.op("Mul", [x, inverse], name=f"{b.prefix}_smooth")
    smoothed.name, smoothed.shape = f"{b.prefix}_smoothed", x.shape
    smoothed.dtype = x.dtype or ir.DataType.FLOAT  # a linear's input is float32 (find_linears), typed or not
    return smoothed


def _fold_into_layer_norm(b: GraphBuilder, node: ir.Node, s: np.ndarray) -> bool:
    """LayerNormalization(x, γ, β) / s == LayerNormalization(x, γ/s, β/s) (new initializers)."""
    if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    gamma = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    beta = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if gamma is None or gamma.shape != s.shape:
        return False
    node.replace_input_with(1, constant(b, f"{b.prefix}_ln_scale", (gamma / s).astype(np.float32)))
    if beta is not None:
        node.replace_input_with(2, constant(b, f"{b.prefix}_ln_bias", (beta / s).astype(np.float32)))
    return True


def _tensor_scale(stat) -> float:
    """Symmetric int8 scale of a tensor from its calibrated range."""
    return int8_scale(max(abs(stat.range[0]), abs(stat.range[1])) if stat.range is not None else 0.0)


#: ops that only move or relabel elements: a per-tensor scale commutes with them
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def product_sources(graph: ir.Graph) -> list[tuple[ir.Value, ir.Node, int, ir.Node]]:
    """(value, reader, input index, product) to put on the int8 grid for each input of each attention
    q·kᵀ MatMul: the input followed back through the layout ops that only it reads (the head
    split's Reshape / Transpose), so those move int8 data, as OpenVINO's INT8 attention expects.
    A trimrt op reading the same q or k on the side (a pruning score: AttentionRowScore) does
    not stop the walk: it reads the int8-grid values too, and the attention stays one INT8
    kernel on OpenVINO (with the score's reader in between, its Transposes ran in bf16 and
    the layer's attention unfused)."""
    sources = []
    for node in score_products(graph):
        for j, value in enumerate(node.inputs):
            reader, index = node, j
            while (value.producer() is not None and value.producer().op_type in _LAYOUT_OPS
                   and value.producer().domain in ("", "ai.onnx")
                   and all(user is reader or user.domain == DOMAIN for user, _ in value.uses())
                   and not value.is_graph_output()):
                reader, index = value.producer(), 0
                value = reader.inputs[0]
            sources.append((value, reader, index, node))
    return sources


def quantize_products(graph: ir.Graph, scales: dict[str, float], builder: Builder) -> int:
    """Put the attention q·kᵀ inputs (`product_sources`) named in `scales` (value name -> int8
    scale) on the int8 grid, in place; returns how many products changed. A value read by several
    products is quantized once; its other readers keep the float value."""
    done: dict[str, ir.Value] = {}
    changed = set()
    for i, (value, reader, index, product) in enumerate(product_sources(graph) if scales else []):
        if value.name not in scales:
            continue
        changed.add(product)
        if value.name not in done:
            b = builder(graph, f"trimrt_attention_{i}")
            done[value.name] = fake_quantized(b, value, scales[value.name])
            b.insert_before(reader)
        reader.replace_input_with(index, done[value.name])
    return len(changed)


class _Evaluator:
    """Output cosine of the graph with a subset of the plan applied, vs the float graph,
    on the given calibration feeds (min over float outputs of the mean over samples)."""

    def __init__(self, original, plan, builder: Builder, target: str, feeds, attention_scales: dict[str, float]):
        self.original, self.plan, self.builder, self.target, self.feeds = original, plan, builder, target, feeds
        self.attention_scales = attention_scales
        self.reference = OnnxRunner(runnable_proto(original)).run_all(feeds)

    def __call__(self, quantized: frozenset[int]) -> float:
        model = ir.serde.deserialize_model(self.original)
        apply_plan(model, find_linears(model.graph), self.plan, quantized, self.builder, self.target)
        quantize_products(model.graph, self.attention_scales, self.builder)
        return mean_cosine(self.reference, OnnxRunner(runnable_proto(model)).run_all(self.feeds))
