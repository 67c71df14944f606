"""inspect: what trimrt sees in a model (transformer structure) or a build (passes, ops).

For builds it also condenses the quantization and ONNX Runtime fusion reports into the
facts a user checks before shipping (what was quantized, how much smaller, how faithful
on the calibration set, what stayed float and why); `compile` prints the same one-line
summaries, so both commands say the same thing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .runtime.manifest import MODEL, Manifest, read_manifest


def inspect_target(target: str) -> dict:
    """A dict describing a build directory or a model (.onnx file or factory spec)."""
    path = Path(target)
    if path.is_dir():  # a folder can only be a build: read_manifest says when it is not one
        return inspect_build(path)
    return inspect_model(target)


def inspect_model(source: str) -> dict:
    """A model's inputs, outputs and structure as the compiler's analysis sees it (a KV-cache
    decoder probed as compile probes it: a prefill on an empty past)."""
    import onnx_ir as ir

    from .compiler.analysis import analyse, infer_shapes
    from .compiler.decoder import DECODER_SPEC
    from .compiler.input_limits import INPUT_LIMITS, find_input_limits
    from .compiler.source import load_source

    loaded = load_source(source)
    infer_shapes(loaded.model)
    shared = {INPUT_LIMITS: find_input_limits(ir.serde.serialize_model(loaded.model)), DECODER_SPEC: loaded.decoder}
    return {"kind": "model", "source": str(source), "inputs": _io(loaded.model.graph.inputs),
            "outputs": _io(loaded.model.graph.outputs), "structure": analyse(loaded.model, shared).summary(),
            "decoder": decoder_summary(loaded.decoder.to_dict()) if loaded.decoder is not None else None}


def inspect_build(build_dir: Path) -> dict:
    import onnx

    manifest = read_manifest(build_dir)
    proto = onnx.load(str(build_dir / MODEL), load_external_data=False)
    quantization, fusion = manifest.pass_report("quantization"), manifest.pass_report("ort_fusion")
    return {
        "kind": "build",
        "path": str(build_dir),
        **{key: manifest.get(key) for key in ("target", "recipe", "structure", "passes")},
        "custom_ops": dict(Counter(n.op_type for n in proto.graph.node if n.domain == "trimrt")),
        "functions": [f.name for f in proto.functions],
        **{key: manifest.get(key) for key in ("inputs", "outputs", "flops")},
        "quantization": quantization_summary(quantization) if quantization else None,
        "onnxruntime_fusion": fusion or None,
        "openvino": manifest.get("openvino"),
        "decoder": decoder_summary(manifest.get("decoder"), manifest.pass_report("token_pruning"),
                                   manifest.pass_report("mixture_of_depths")),
    }


def openvino_line(entry: dict) -> str:
    """'OpenVINO: inference precision bf16 (cosine 0.999512 to f32 at compile), latency hint,
    OpenVINO's threads, IR stored'."""
    precision = entry.get("inference_precision", "f32")
    measured = f" (cosine {entry['precision_cosine']:.6f} to f32 at compile)" if "precision_cosine" in entry else ""
    threads = entry.get("threads") or "OpenVINO's"
    ir = "IR stored" if entry.get("ir") else "converted from model.onnx at load"
    shapes = entry.get("shapes")
    fixed = (", static shapes " + ", ".join(f"{name} {list(dims)}" for name, dims in shapes.items())) if shapes else ""
    return (f"OpenVINO: inference precision {precision}{measured}, {entry.get('performance_hint', 'latency')} hint, "
            f"{threads} threads, {ir}{fixed}")


def decoder_summary(decoder: dict | None, pruning: dict | None = None, routing: dict | None = None) -> dict | None:
    """A decoder build's cache geometry, what one token of context costs in cache, and, when
    it prunes (or routes) its prompts, how many span tokens each group of layers (each routed
    layer) caches and the cache bytes that saves on every prompt."""
    if not decoder:
        return None
    from .runtime.kv_cache import DecoderSpec

    spec = DecoderSpec.from_manifest({"decoder": decoder}, "the build")
    out = {**decoder, "kv_bytes_per_token": spec.kv_bytes_per_token}
    if pruning and decoder.get("prunes_prompt"):
        sites = pruning["layers"]
        span = [sites[0]["protected"], sites[0]["protected"] + sites[0]["span_tokens"]]
        groups, saved = [], 0
        per_layer = spec.kv_bytes_per_token // spec.layers
        for i, site in enumerate(sites):
            first = site["first_block_reduced"]
            last = (sites[i + 1]["first_block_reduced"] if i + 1 < len(sites) else spec.layers) - 1
            if first <= last:
                groups.append({"layers": [first, last], "span_tokens_cached": site["kept"]})
                saved += (last - first + 1) * (sites[0]["span_tokens"] - site["kept"]) * per_layer
        out["prompt_pruning"] = {"span": span, "groups": groups, "kv_bytes_saved_per_prompt": saved}
    if routing and decoder.get("prunes_prompt"):
        per_layer = spec.kv_bytes_per_token // spec.layers
        out["prompt_routing"] = {
            "layers": [{"layer": x["block"], "span_tokens_cached": x["routed"]} for x in routing["layers"]],
            "kv_bytes_saved_per_prompt": per_layer * sum(routing.get("cache_tokens_removed") or ())}
    return out


def quantization_summary(report: dict) -> dict:
    """The quantization pass report with the derived facts (layer counts, size ratio, the
    float layers and why) and each layer's guard sensitivity next to its row."""
    fidelity = report.get("fidelity") or {}
    sensitivity = fidelity.get("sensitivity") or {}
    # cosine_alone: the output cosine with only this layer quantized
    layers = [{**x, "cosine_alone": sensitivity[x["name"]]} if x["name"] in sensitivity else dict(x)
              for x in report.get("layers", [])]
    guard_order = {name: i for i, name in enumerate(report.get("kept_float", []))}  # most sensitive first
    kept = sorted((x for x in layers if x["format"] == "float"), key=lambda x: guard_order.get(x["name"], len(guard_order)))
    before, after = report["weight_bytes_before"], report["weight_bytes_after"]
    summary = {key: report[key] for key in ("weights", "activations", "method", "encoding", "group_size") if key in report}
    summary.update({
        "linear_layers": report["matmuls_quantized"] + report["matmuls_float"],
        "quantized": report["matmuls_quantized"],
        "weight_bytes_before": before,
        "weight_bytes_after": after,
        "weight_ratio": round(before / after, 3) if after else None,
        "calibration": report.get("calibration"),
        "fidelity": {k: v for k, v in fidelity.items() if k != "sensitivity"} or None,
        "kept_float": [{"name": x["name"], "reason": x.get("reason"), **({"cosine_alone": x["cosine_alone"]}
                        if "cosine_alone" in x else {})} for x in kept],
        "layers": layers,
        "attention_products": (report.get("attention_products") or {}).get("quantized", 0),
    })
    return summary


def format_label(summary: dict) -> str:
    """'int8', 'int4 weight-only', 'int8 weights / fp8 activations'."""
    weights, activations = summary["weights"], summary.get("activations")
    if activations in (None, "none"):
        return f"{weights} weight-only"
    return weights if activations == weights else f"{weights} weights / {activations} activations"


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fidelity_text(summary: dict) -> str:
    """'cosine 0.995100 on 32 held-out calibration samples (0.996000 on 32 fitted ones) (guard:
    min_cosine 0.99, all quantized 0.987000)'
    (6 decimals, as measured: a guard of 0.99999 must not read as 1.00000)."""
    fidelity, calibration = summary.get("fidelity"), summary.get("calibration") or {}
    if not fidelity:
        return "fidelity not measured (no [calibration] data)"
    random = " random" if calibration.get("source") == "random" else ""
    held = " held-out" if fidelity.get("measured_on") == "held-out" else ""  # samples the fit never saw
    text = f"cosine {fidelity['cosine']:.6f} on {fidelity['samples']}{held}{random} calibration samples"
    if held and "cosine_fit" in fidelity:
        text += f" ({fidelity['cosine_fit']:.6f} on {fidelity['samples_fit']} fitted ones)"
    if "min_cosine" in fidelity:
        text += (f" (guard: min_cosine {fidelity['min_cosine']}, all quantized "
                 f"{fidelity['cosine_all_quantized']:.6f})")
    return text


def quantization_line(summary: dict) -> str:
    """One line: what was quantized, size before → after, fidelity, what stayed float."""
    ratio = summary["weight_ratio"]
    line = (f"quantization: {summary['quantized']}/{summary['linear_layers']} linear layers {format_label(summary)} "
            f"({summary['method']}), weights {human_bytes(summary['weight_bytes_before'])} → "
            f"{human_bytes(summary['weight_bytes_after'])}"
            f"{f' ({ratio:.1f}× smaller)' if ratio else ''}, {fidelity_text(summary)}")
    if summary.get("attention_products"):
        line += f"; q·kᵀ in int8 in {summary['attention_products']} attention products"
    if summary["kept_float"]:
        by_reason: dict[str, list[str]] = {}
        for layer in summary["kept_float"]:
            by_reason.setdefault(layer["reason"] or "float", []).append(layer["name"])
        line += "; kept float: " + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
    return line


def fusion_line(report: dict) -> str:
    """One line: which ONNX Runtime fusions were applied, or why none was, and the session
    settings the build asks of ONNX Runtime (optimizers it must skip)."""
    disabled = (report.get("session") or {}).get("disabled_optimizers")
    session = f"; the build disables ONNX Runtime's {', '.join(disabled)}" if disabled else ""
    if not report.get("applied"):
        return f"ONNX Runtime fusion: not applied ({report.get('reason', 'no reason recorded')}){session}"
    counts = ", ".join(f"{name} ×{n}" for name, n in report.get("fused", {}).items())
    ops = ", ".join(report.get("contrib_ops", []))
    error = report.get("max_relative_error")
    return (f"ONNX Runtime fusion: {counts} → {ops or 'contrib ops'}"
            f"{f' (max relative error vs unfused {error:.2g})' if error is not None else ''}{session}")


def _io(values) -> list[dict]:
    return [{"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None,
             "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None}
            for v in values]


#: the token passes: label, and the details of one block's row of their report
_TOKEN_PASSES = {"token_pruning": ("token pruning", lambda x: f"kept {x['kept']}, protected {x['protected']}"
                                                              f"{', +1 fused' if x['fused'] else ''}"),
                 "token_merging": ("token merging", lambda x: f"merged {x['merged']}")}


def token_stages(manifest: Manifest) -> list[tuple[str, str]]:
    """(pass label, 'block 1: 65→34, block 2: 34→18') for each token pass of a build: pruning and
    merging read the same, so a user compares them at a glance."""
    return [(label, ", ".join(f"block {x['block']}: {x['tokens_in']}→{x['tokens_out']}" for x in report["layers"]))
            for name, (label, _) in _TOKEN_PASSES.items() if (report := manifest.pass_report(name) or {}).get("layers")]


def pass_lines(manifest: Manifest) -> list[str]:
    """What `inspect` says of the passes that change tokens: one line per block, the tensors
    travelling with the tokens, the trimmed padding."""
    lines = []
    for name in manifest.pass_names:
        report = manifest.pass_report(name)
        if name in _TOKEN_PASSES:
            label, details = _TOKEN_PASSES[name]
            lines += [f"{label} at block {x['block']}: {x['tokens_in']} → {x['tokens_out']} tokens ({details(x)})"
                      for x in report["layers"]]
        if name == "mixture_of_depths":
            lines.append("MoD router: the model's own (trained with it; blocks with one: "
                         f"{report['model_routers']})" if report["router"] == "model" else
                         f"MoD router: training-free, the {report['scoring_row']} token's attention row in the "
                         "block before")
            lines += [f"MoD routing at block {x['block']}: ratio {x['ratio']}, {x['routed']} of the span's "
                      f"{x['span_tokens']} tokens run it"
                      + (f" ({x['tokens_run']} tokens in all)" if isinstance(x["tokens_run"], int) else "")
                      for x in report["layers"]]
        if name == "sparse_attention":
            lines += [f"block-sparse attention at block {x['block']}: {x['key_blocks']} key blocks of "
                      f"{report['blocks'] or 'ceil(N / ' + str(report['block_size']) + ')'} per query block "
                      f"(blocks of {report['block_size']} tokens{', causal' if x['causal'] else ''}"
                      f"{', rectified per block' if report['rectify'] == 'blocks' else ', rectified' if report['rectify'] else ''}"
                      + (f", those covering {report['tau']:g} of the pooled mass" if report.get("tau", 1.0) < 1 else "")
                      + (f", {report['order']} order of the {'×'.join(map(str, report['grid']))} grid"
                         if report.get("order", "sequence") != "sequence" else "")
                      + ("; the prompt only: decode steps attend the cache densely" if report.get("prompt_only") else "")
                      + ")" for x in report["layers"]]
            lines += [f"block {b} keeps dense attention: a token pass's score (or an output) reads it"
                      for b in report.get("kept_dense") or ()]
        if report.get("travelling_tensors"):
            lines.append(f"travelling with the tokens: {', '.join(report['travelling_tensors'])}")
        if name == "trim_padding":
            lines.append(f"trailing padding trimmed from {', '.join(report['inputs_trimmed'])} (mask {report['mask']})")
    return lines


def flops_text(flops: dict, digits: int = 2) -> str:
    """'0.12 → 0.06 G, ideal speedup 2.00×', or why there is no ratio (no MatMul / Gemm / Conv)."""
    before, after = f"{flops['before'] / 1e9:.{digits}f}", f"{flops['after'] / 1e9:.{digits}f}"
    if not flops.get("ratio"):
        return f"{before} → {after} G, no ideal speedup (the model has no MatMul, Gemm or Conv to count)"
    return f"{before} → {after} G, ideal speedup {flops['ratio']:.2f}×"
