"""compile(): source → passes → checks → build directory.

A build is only written when it is right: it must load and run on ONNX Runtime, give
outputs of the original's names and ranks, and — when the recipe changes nothing —
reproduce the original outputs. Otherwise BuildError, and nothing is written.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

from .._version import __version__
from ..compare import sample_cosines
from ..errors import BackendUnavailableError, BuildError, ModelLoadError, RecipeError
from ..passes.base import PipelineContext
from ..plugins import DOMAIN, OP_VERSION
from ..recipe import OpenVINOOptions, load_recipe
from ..registry import TOKEN_PRUNING_METHODS
from ..runtime.backends import OnnxRuntimeBackend
from ..runtime.feeds import DEFAULT_TOKENS, TensorInfo, random_feeds
from ..runtime.kv_cache import updates_in_place
from ..runtime.manifest import EMBEDDING, ENGINE, MODEL, OPENVINO_IR, TOKENIZER, write_manifest
from .artifacts import atomic_build_dir
from .decoder import DECODER_SPEC
from .flops import count_flops
from .input_limits import INPUT_LIMITS, find_input_limits
from .pipeline import TARGETS, build_passes, run_pipeline
from .pipeline import min_tokens as pipeline_min_tokens
from .source import is_factory_spec, load_source, owned_model

log = logging.getLogger(__name__)
REFERENCE = "reference.onnx"
#: a recipe that changes nothing must reproduce the original within this max abs error
NOOP_TOLERANCE = 1e-4


def compile_model(source, recipe=None, out_dir: str | Path = "build", *, example_inputs=None,
                  target: str = "onnxruntime", exporter: str = "auto", save_reference: bool | None = None,
                  progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda msg: log.info(msg))
    started = time.perf_counter()
    recipe = load_recipe(recipe)  # validate before any expensive work
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if target != "onnxruntime" and recipe.onnxruntime is not None and recipe.onnxruntime.fuse:
        raise BuildError("the recipe's [onnxruntime] fuse applies to ONNX Runtime builds only; "
                         f"remove it to build for {target}")
    if target != "openvino" and recipe.openvino is not None:
        raise BuildError(f"the recipe's [openvino] table applies to OpenVINO builds only; remove it to build for "
                         f"{target}, or build with --target openvino")
    if target == "openvino":
        _openvino_ready(recipe)
    if target == "tensorrt":
        from ..runtime.backends import TensorRTBackend

        if not TensorRTBackend.available():
            raise BackendUnavailableError("--target tensorrt needs TensorRT and an NVIDIA GPU on this machine; "
                                          "compile for onnxruntime here and build the engine on the GPU machine")
    # -o is checked (and its temp dir made) before any work: a bad destination fails at once
    with atomic_build_dir(out_dir, inputs=_input_files(source, recipe)) as tmp:
        say(f"loading {source if isinstance(source, (str, Path)) else type(source).__name__}")
        loaded = load_source(source, example_inputs, exporter=exporter,
                             token_input=recipe.decoder.token_input if recipe.decoder else None)
        if loaded.decoder is not None:
            _check_decoder_recipe(recipe, loaded.decoder, target)
        original = ir.serde.serialize_model(loaded.model)  # untouched copy: the baseline of every check
        base_rt = _original_session(original, loaded.description)  # ORT must run the input before we rewrite it
        model = owned_model(original)  # passes work on a copy; the input is never modified
        limits = find_input_limits(original)  # bounds the probes' and the checks' feeds (a small vocabulary / position table)

        passes = build_passes(recipe, target, progress=progress is not None,
                              context=PipelineContext(shared={INPUT_LIMITS: limits, DECODER_SPEC: loaded.decoder}))
        say("running passes: " + " → ".join(p.name for p in passes))
        reports = run_pipeline(model, passes)
        built = ir.serde.serialize_model(model)
        problem = _checker_problem(built)
        if problem and problem != _checker_problem(original):  # the input's own (e.g. ORT-only ops) is not ours
            raise BuildError(f"the rewritten graph is not valid ONNX: {problem}")

        say("checking the build on ONNX Runtime")
        try:
            build_rt = _session(built)
        except Exception as exc:  # noqa: BLE001 - ORT refuses the rewritten graph (e.g. its shape inference)
            raise BuildError(f"ONNX Runtime cannot load the rewritten graph: {_ort_reason(exc)}; "
                             "please report this model with the recipe") from None
        prunes_prompt = loaded.decoder is not None and recipe.span_table is not None
        # a pruned decoder's last prompt token (it predicts the next) must come after the span
        min_tokens = pipeline_min_tokens(recipe) + prunes_prompt
        given = _given_feeds(example_inputs) if loaded.example_feeds is None else None
        hints = {k: v.shape for k, v in (loaded.example_feeds or given or {}).items()}
        wanted = max(DEFAULT_TOKENS, min_tokens + 8)  # the check's token count, past what a span needs
        check_tokens = None if hints else wanted
        max_tokens = (limits.get("tokens") or {}).get("limit")
        if check_tokens is not None and max_tokens is not None:
            check_tokens = min(check_tokens, int(max_tokens))
        if prunes_prompt:  # the pruning runs at prefill: check (and count FLOPs on) a prompt
            given = loaded.decoder.random_feeds(1, new=min(wanted, loaded.decoder.max_positions or wanted), past=0)
        elif given is None and loaded.decoder is not None:  # a decoder: the past and the mask must agree
            given = loaded.example_feeds or loaded.decoder.random_feeds(1)  # batch 1: what every LLM runtime takes
        feeds = given or random_feeds(base_rt.inputs, batch=2, seed=0, hints=hints, tokens=check_tokens, limits=limits)
        try:
            base_out = base_rt.infer(feeds)
        except Exception as exc:  # noqa: BLE001 - the input itself fails on ORT: name it, not a rewrite
            shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in feeds.items())
            raise ModelLoadError(f"{loaded.description} does not run on ONNX Runtime with inputs {shapes}: "
                                 f"{_ort_reason(exc)}") from None
        try:
            build_out = build_rt.infer(feeds)
        except Exception as exc:  # noqa: BLE001 - ORT errors are opaque; name the stage
            raise BuildError(f"the build does not run on ONNX Runtime: {str(exc).splitlines()[0]}") from None
        _check_outputs(base_out, build_out, noop=not any(r.changes_results for r in reports))
        openvino = None
        if target == "openvino":
            say("checking the build on OpenVINO")
            openvino = _check_openvino(built, feeds, build_out, base_out if recipe.quantization is not None else None,
                                       recipe.openvino or OpenVINOOptions())
            if openvino["inference_precision"] != "f32":
                say(f"OpenVINO at {openvino['inference_precision']}: cosine {openvino['precision_cosine']:.5f} "
                    "to f32 on the check inputs (recorded in the manifest)")
        # FLOPs per sample, counted on the check batch (a model may fix its batch axis)
        batch = max(int(next(iter(feeds.values())).shape[0]), 1) if feeds else 1
        flops_before, flops_after = count_flops(original, feeds) // batch, count_flops(built, feeds) // batch

        if save_reference is None:  # the source was PyTorch: keep the export trimrt made
            save_reference = loaded.example_feeds is not None
        structure = next((r.details for r in reports if r.name == "analyse"), {})
        fusion = next((r.details for r in reports if r.name == "ort_fusion"), None)
        _save(built, tmp / MODEL)
        if loaded.tokenizer_file is not None:  # the checkpoint's tokenizer: generation needs no other folder
            shutil.copyfile(loaded.tokenizer_file, tmp / TOKENIZER)
        if loaded.embedding is not None:  # embeds text and generated tokens for an inputs_embeds graph
            _save(ir.serde.serialize_model(loaded.embedding), tmp / EMBEDDING)
        if save_reference:
            _save(original, tmp / REFERENCE)
        if openvino is not None and openvino["ir"]:
            say("storing the OpenVINO IR")
            _save_openvino_ir(built, tmp)
        if target == "tensorrt":
            say("building the TensorRT engine")
            from .tensorrt_target import build_engine, decoder_profile

            build_engine(tmp / MODEL, tmp / ENGINE, hints=hints,
                         ranges=decoder_profile(loaded.decoder) if loaded.decoder is not None else None)
        manifest = write_manifest(tmp, {
            "source": loaded.description,
            "target": target,
            "recipe": recipe.to_dict(),
            # relative paths in the recipe (a calibration source) resolve here
            "recipe_dir": str(recipe.directory) if recipe.directory is not None else None,
            "structure": {k: v for k, v in structure.items() if k != "attention"},
            "passes": [r.to_dict() for r in reports],
            "inputs": [_info(i) for i in build_rt.inputs],
            "outputs": [_info(o) for o in build_rt.outputs],
            "example_shapes": {k: list(v.shape) for k, v in feeds.items()},
            "ops": {op: {"domain": DOMAIN, "version": OP_VERSION} for op in
                    sorted({n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN})},
            # ratio None: the model has no MatMul / Gemm / Conv, so there is no ideal speedup to state
            "flops": {"batch": 1, "before": flops_before, "after": flops_after,
                      "ratio": round(flops_before / max(flops_after, 1), 4) if flops_before else None},
            "reference": REFERENCE if save_reference else None,
            "min_tokens": min_tokens,
            # vocabulary and position-table sizes the runtime checks feeds against
            # the original's: passes keep the inputs' meaning (a padding trim's Slice before the
            # embedding hides the vocabulary from a search on the built graph)
            "input_limits": _limits_for(limits, {i.name for i in build_rt.inputs}),
            "compile_seconds": round(time.perf_counter() - started, 2),
            **({"decoder": decoder_entry(loaded.decoder, reports, build_rt, target, min_tokens)}
               if loaded.decoder is not None else {}),
            # ONNX Runtime session settings the build asks for (trimrt's runtime applies them)
            **({"onnxruntime": fusion["session"]} if fusion else {}),
            # how OpenVINO compiles the build, and what its compile check measured
            **({"openvino": openvino} if openvino is not None else {}),
        }, __version__)
    ratio = manifest["flops"]["ratio"]
    say(f"wrote {out_dir} (FLOPs ratio {'n/a' if ratio is None else f'{ratio:.2f}×'})")
    return manifest


def decoder_entry(spec, reports, build_rt: OnnxRuntimeBackend, target: str, min_tokens: int) -> dict:
    """The manifest's "decoder" entry: the spec, what the token pruning left in each layer's
    cache, and whether the build works on a shared cache buffer (run both ways, on ONNX Runtime)."""
    from dataclasses import replace

    pruning = next((r.details for r in reports if r.name in ("token_pruning", "mixture_of_depths")), None)
    prunes_prompt = pruning is not None
    removed = tuple(pruning.get("cache_tokens_removed") or ()) if pruning else ()
    sparse = any(r.name == "sparse_attention" for r in reports)
    spec = replace(spec, prunes_prompt=prunes_prompt, sparse_prompt=sparse, cache_tokens_removed=removed)
    shared = target == "onnxruntime" and (removed or not prunes_prompt) and \
        updates_in_place(build_rt, spec, prompt=max(3, min_tokens))
    return replace(spec, shared_buffer=bool(shared)).to_dict()


#: recipe tables that do not apply to a KV-cache graph yet (their rewrites assume one pass over all tokens)
_NOT_FOR_DECODERS = ("token_merging", "token_slimming", "padding")


def _check_decoder_recipe(recipe, spec, target: str) -> None:
    tables = [t for t in _NOT_FOR_DECODERS if getattr(recipe, t) is not None]
    if tables:
        verb = "does" if len(tables) == 1 else "do"
        raise BuildError(f"the recipe's [{'], ['.join(tables)}] {verb} not apply to a decoder with a KV cache yet; "
                         "prune a prefill-only export instead (e.g. LlamaModel, or an ONNX decoder without past inputs), "
                         "or keep [token_pruning] / [sparse_attention] / [quantization] / [onnxruntime] for generation "
                         "builds")
    if recipe.sparse_attention is not None:
        _check_sparse_decoder(target)
    pruning = recipe.span_table
    if pruning is None:
        return
    table = "token_pruning" if pruning is recipe.token_pruning else "mixture_of_depths"
    if pruning.prunable is None:
        raise RecipeError(f"[{table}] a decoder reduces a span of its prompt: give prunable = [start, end) (e.g. "
                          "the image tokens); the tokens from end on, the last one included, are always kept")
    if target == "tensorrt":  # onnx-tensorrt's If wants branch outputs of broadcastable shapes
        raise RecipeError(f"[{table}] on a decoder with a KV cache builds for ONNX Runtime only for now: the "
                          "prompt is reduced in an If whose branches give different token counts, which TensorRT "
                          "does not parse; use --target onnxruntime")
    if spec.max_positions is not None and pruning.span_end >= spec.max_positions:
        raise RecipeError(f"[{table}] prunable ends at {pruning.span_end}, but this decoder has "
                          f"{spec.max_positions} positions and a prompt must keep a token after the span")
    if spec.sliding_window is not None:
        raise RecipeError(f"[{table}] this decoder's layers attend over a sliding window of {spec.sliding_window} "
                          "tokens, which reduced layers would not keep; reducing such decoders is not supported yet")
    if table == "mixture_of_depths":
        return
    why = TOKEN_PRUNING_METHODS[pruning.method].no_kv_cache
    if why is not None:
        raise RecipeError(f"[token_pruning] method {pruning.method!r} does not apply to a decoder with a KV cache yet "
                          f"({why}); use last_token_attention (FastV) or divprune")


def _check_sparse_decoder(target: str) -> None:
    """[sparse_attention] on a KV-cache decoder: its prompt's attention, on ONNX Runtime."""
    if target == "tensorrt":
        raise RecipeError("[sparse_attention] on a decoder with a KV cache builds for ONNX Runtime only for now (the "
                          "prompt's attention runs in an If beside the decode steps'); use --target onnxruntime")


def _checker_problem(proto: onnx.ModelProto) -> str | None:
    """onnx.checker's first line about `proto`, or None when it is valid (ONNX Runtime's own
    kernels in the standard domain, from its fusion, are checked as Identity)."""
    from ..passes.ort_fusion import ORT_STANDARD_DOMAIN_OPS

    if any(n.op_type in ORT_STANDARD_DOMAIN_OPS and not n.domain for n in proto.graph.node):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        for node in copy.graph.node:
            if node.op_type in ORT_STANDARD_DOMAIN_OPS and not node.domain:
                node.op_type = "Identity"
                del node.input[1:], node.output[1:], node.attribute[:]
        proto = copy
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def _limits_for(limits: dict, inputs: set[str]) -> dict:
    """`limits` (find_input_limits) restricted to the graph inputs in `inputs`."""
    tokens = limits.get("tokens")
    if tokens is not None and not set(tokens.get("inputs") or ()) <= inputs:
        tokens = None
    return {"ids": {k: v for k, v in (limits.get("ids") or {}).items() if k in inputs}, "tokens": tokens}


def _input_files(source, recipe) -> list[Path]:
    """Files the compile reads (the model or factory file, the recipe file): the build must not replace them."""
    files = []
    if isinstance(source, (str, Path)):
        spec = str(source)
        path = Path(spec.rpartition(":")[0]) if is_factory_spec(spec) else Path(spec)
        if path.exists():
            files.append(path)
    if recipe.directory is not None:
        files.append(Path(recipe.source))
    return files


#: ONNX Runtime's words for an opset newer than it supports, and for an op it does not know
_ORT_OPSET = re.compile(r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S)
_ORT_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")


def _original_session(proto: onnx.ModelProto, description: str) -> OnnxRuntimeBackend:
    """The input model on ONNX Runtime, with one-line errors for what ORT refuses (an opset
    newer than it supports, an op of an unknown domain): every check compares against it."""
    numeric = set(onnx.helper.get_all_tensor_dtypes()) - {onnx.TensorProto.STRING}
    for value in proto.graph.input:
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else None
        if elem not in numeric:
            kind = "a string tensor" if elem == onnx.TensorProto.STRING else "not a numeric tensor"
            raise ModelLoadError(f"{description}: input {value.name!r} is {kind}; trimrt compiles models whose "
                                 "inputs are numeric tensors (tokenize or decode before the model)")
    try:
        return _session(proto)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail / InvalidGraph types
        text = str(exc)
        import onnxruntime

        opset = _ORT_OPSET.search(text)
        if opset:
            raise ModelLoadError(f"{description} uses ONNX opset {opset[1]}, newer than ONNX Runtime "
                                 f"{onnxruntime.__version__} supports (up to {opset[3]}); re-export it with "
                                 f"opset_version between 18 and {opset[3]}") from None
        unknown = _ORT_UNKNOWN_OP.search(text)
        if unknown:
            domain = unknown[1] or "ai.onnx"
            raise ModelLoadError(f"{description} uses op {unknown[2]} of domain {domain!r}, which ONNX Runtime does "
                                 "not know and the model defines no function for; export it with standard ONNX ops")
        raise ModelLoadError(f"ONNX Runtime cannot load {description}: {_ort_reason(exc)}") from None


def _ort_reason(exc: Exception) -> str:
    """The telling part of an ONNX Runtime error: its status message, without the C++ source location."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ [^)]*\) ", "", text)  # "/path/file.h:91 void f(args) "
    return text[:300] or type(exc).__name__


def _given_feeds(example_inputs) -> dict[str, np.ndarray] | None:
    """Example inputs given with an ONNX source: a dict of arrays, used for the checks."""
    if isinstance(example_inputs, dict):
        return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in example_inputs.items()}
    return None


#: a quantized build on OpenVINO may lose this much more cosine to the float model (mean over
#: the check samples) than the same build on ONNX Runtime: the engines round activations at
#: their own points (OpenVINO moves the dequantization after the integer product), so a value
#: on a rounding boundary moves by one step
OPENVINO_COSINE_SLACK = 0.002


def _openvino_ready(recipe) -> None:
    """OpenVINO is installed, and the CPU has the inference precision the recipe asks for (a
    reduced precision is measured at compile time, so it is checked before any work)."""
    from ..runtime.backends import OpenVINOBackend, missing_precision

    if not OpenVINOBackend.available():
        raise BackendUnavailableError("--target openvino needs OpenVINO: pip install 'trimrt[openvino]'")
    precision = (recipe.openvino or OpenVINOOptions()).inference_precision
    if precision != "f32":
        import openvino as ov

        missing = missing_precision(ov.Core(), precision)
        if missing:
            raise BuildError(f"[openvino] inference_precision = {precision!r} is measured when compiling, on this "
                             f"CPU: {missing}, or compile on the CPU you deploy on")


def _run_openvino(built: onnx.ModelProto, feeds: dict, precision: str) -> dict:
    from ..runtime.backends import OpenVINOBackend
    from ..runtime.session import _backend_message

    backend = OpenVINOBackend(built.SerializeToString(), precision=precision)
    try:
        backend.activate()
        return backend.infer(feeds)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        raise BuildError(f"OpenVINO cannot run this build: {_backend_message(exc)}; build for --target onnxruntime") \
            from None
    finally:
        backend.deactivate()


def _check_openvino(built: onnx.ModelProto, feeds: dict, want: dict, original: dict | None,
                    options: OpenVINOOptions) -> dict:
    """An OpenVINO build must load on OpenVINO and give (at f32) what ONNX Runtime gives on the
    check feeds; a quantized one (`original`: the float model's outputs) must be as close to the
    float model as on ONNX Runtime, within OPENVINO_COSINE_SLACK. A reduced inference precision
    must keep `options.min_cosine` to f32. Returns the manifest's "openvino" entry: the options
    and what was measured."""
    got = _run_openvino(built, feeds, "f32")
    _check_openvino_outputs(got, want, original)
    floats = [name for name, value in want.items() if value.dtype.kind == "f" and value.size]
    entry = {"inference_precision": options.inference_precision, "performance_hint": options.performance_hint,
             "threads": options.threads, "ir": OPENVINO_IR if options.save_ir else None,
             "max_abs_to_onnxruntime": max((float(np.abs(got[n] - want[n]).max()) for n in floats), default=0.0)}
    if options.shapes:
        _check_openvino_shapes(built, options.shapes)
        entry["shapes"] = options.shapes
    if options.inference_precision != "f32":
        reduced = _run_openvino(built, feeds, options.inference_precision)
        cosine = min((float(sample_cosines(reduced[n], got[n]).min()) for n in floats), default=1.0)
        if not cosine >= options.min_cosine:  # NaN fails too
            raise BuildError(f"OpenVINO at inference precision {options.inference_precision} keeps cosine "
                             f"{cosine:.5f} to f32 on the check inputs, under [openvino] min_cosine = "
                             f"{options.min_cosine}; use inference_precision = \"f32\" or lower min_cosine")
        entry["precision_cosine"] = round(cosine, 6)
    return entry


def _check_openvino_shapes(built: onnx.ModelProto, shapes: dict) -> None:
    """[openvino] shapes must name inputs of the build and fit its graph, and OpenVINO must
    compile it for them (what loading does). The compile runs in a child process: OpenVINO
    has crashed the whole process (SIGFPE) folding a static graph, which must be a one-line
    refusal here, not a crash of the user's app at load. The child reports shapes the model
    cannot take (fix_shapes' one line) with exit code 2: a recipe error."""
    import json
    import subprocess
    import sys
    import tempfile

    child = ("import json, sys\n"
             "from trimrt.errors import BackendUnavailableError\n"
             "from trimrt.runtime.backends import OpenVINOBackend\n"
             "try:\n"
             "    OpenVINOBackend(sys.argv[1], threads=1, shapes=json.loads(sys.argv[2])).activate()\n"
             "except BackendUnavailableError as exc:\n"
             "    print(exc, file=sys.stderr)\n"
             "    sys.exit(2)\n")
    with tempfile.TemporaryDirectory(prefix="trimrt_openvino_") as folder:
        path = Path(folder) / MODEL
        path.write_bytes(built.SerializeToString())
        done = subprocess.run([sys.executable, "-c", child, str(path), json.dumps(shapes)], capture_output=True,
                              text=True)
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 2 and lines:
        raise RecipeError(f"[openvino] {lines[-1]}")
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else (lines[-1][:200] if lines else "no message")
        raise BuildError(f"OpenVINO cannot compile this build for [openvino] shapes {shapes} ({why}); leave shapes "
                         "out to run it with dynamic shapes")


def _save_openvino_ir(built: onnx.ModelProto, folder: Path) -> None:
    """Store the build as OpenVINO IR (weights as they are: no compression to f16)."""
    import openvino as ov

    from ..runtime.backends import openvino_model

    ov.save_model(openvino_model(built.SerializeToString()), str(folder / OPENVINO_IR), compress_to_fp16=False)


def _check_openvino_outputs(got: dict, want: dict, original: dict | None) -> None:
    for name, expected in want.items():
        value = got[name]
        if value.shape == expected.shape and np.allclose(value, expected, rtol=1e-3, atol=1e-3):
            continue
        if value.shape == expected.shape and original is not None and value.dtype.kind == "f":
            # the mean over the check samples: a token selection may flip on one near-tied sample
            # between the engines (a legitimate difference); a misrun conversion moves them all
            on_openvino = float(sample_cosines(value, original[name]).mean())
            on_onnxruntime = float(sample_cosines(expected, original[name]).mean())
            if on_openvino >= on_onnxruntime - OPENVINO_COSINE_SLACK:
                continue
            raise BuildError(f"the build's output {name!r} on OpenVINO is further from the float model (mean cosine "
                             f"{on_openvino:.5f}) than on ONNX Runtime ({on_onnxruntime:.5f}); please report this model "
                             "with the recipe, and build for --target onnxruntime")
        worst = float(np.abs(value - expected).max()) if value.shape == expected.shape else float("nan")
        raise BuildError(f"the build's output {name!r} on OpenVINO differs from ONNX Runtime's (max abs {worst:.3g}); "
                         "please report this model with the recipe, and build for --target onnxruntime")


def _session(proto: onnx.ModelProto) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(proto.SerializeToString(), memory_arena=False)
    backend.activate()
    return backend


def _check_outputs(base: dict, build: dict, *, noop: bool) -> None:
    if list(base) != list(build):
        raise BuildError(f"the build's outputs {list(build)} differ from the original's {list(base)}")
    for name, ref in base.items():
        got = build[name]
        if got.ndim != ref.ndim or got.dtype != ref.dtype:
            raise BuildError(f"output {name!r}: build gives {got.dtype}{list(got.shape)}, original {ref.dtype}{list(ref.shape)}")
        if np.isfinite(ref).all() and not np.isfinite(got).all():
            raise BuildError(f"output {name!r} of the build has NaN/inf where the original has finite values")
        if noop:
            err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
            if got.shape != ref.shape or err > NOOP_TOLERANCE:
                raise BuildError(f"output {name!r}: a recipe that keeps every token must reproduce the original, "
                                 f"but max abs error is {err:.3g}; please report this model")


def _save(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() > 1_900_000_000:
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))


def _info(info: TensorInfo) -> dict:
    return {"name": info.name, "dtype": info.dtype.name, "shape": list(info.shape)}
