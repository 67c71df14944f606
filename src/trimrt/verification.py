"""verify: run a build and its reference on the same inputs and compare the outputs.

The reference is the original ONNX model (run on ONNX Runtime) or a PyTorch callable
(a factory spec 'file.py:name' / 'package.module:name', or an nn.Module). Inputs are
random (seeded) unless given. Per output: max abs / max rel error, cosine similarity
(per sample, then mean and minimum) and, for logits (outputs named *logit*, [batch,
classes]), top-1 agreement. Thresholds turn the report into pass / fail. For a quantized
build the report carries the quantization facts, so its cosines read as the quantized
build's fidelity against the float model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .compare import OutputMetrics, compare_outputs
from .errors import CalibrationError, InputError, ModelLoadError
from .runtime.backends import Backend, OnnxRuntimeBackend, OpenVINOBackend
from .runtime.feeds import build_feeds, load_feed_files, validate_feeds
from .runtime.kv_cache import LOGITS
from .runtime.manifest import Manifest
from .runtime.session import Session


@dataclass
class VerifyReport:
    samples: int
    outputs: list[OutputMetrics]
    min_cosine: float | None = None
    min_top1: float | None = None
    failures: list[str] = field(default_factory=list)
    #: outputs whose shape differs from the reference (token-level outputs after pruning)
    not_compared: list[str] = field(default_factory=list)
    #: adaptive pruning: per layer, the share of its span each input kept visible
    keep_ratios: list[dict] = field(default_factory=list)
    #: with per_pass: the recipe applied one table more at a time, and each output's mean
    #: cosine to the reference after it (how much each feature pass adds to the drift)
    per_pass: list[dict] = field(default_factory=list)
    #: quantized builds: weights / activations / method, layers quantized of all, and the
    #: cosine measured on the calibration set at compile time
    quantization: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class _TorchReference:
    """A PyTorch module run in eval mode; a caller's own train/eval flags are put back after each call.
    A module that rejects the build's inputs is named (InputError)."""

    module: Any
    input_names: list[str]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        from .compiler.source import eval_mode

        with eval_mode(self.module), torch.no_grad():
            try:
                out = self.module(**{n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names})
                if isinstance(out, torch.Tensor):
                    out = (out,)
                elif isinstance(out, Mapping):
                    out = tuple(out.values())
                elif hasattr(out, "to_tuple"):
                    out = out.to_tuple()
                return [o.detach().cpu().numpy() for o in out if isinstance(o, torch.Tensor)]
            except Exception as exc:  # noqa: BLE001 - the user's module: name what it raised
                lines = [line for line in str(exc).splitlines() if line.strip()]
                raise InputError(f"the PyTorch reference fails on the build's inputs {sorted(feeds)} "
                                 f"({type(exc).__name__}: {lines[-1][:200] if lines else ''}); pass the model this "
                                 "build was compiled from") from None


def _reference(reference: Any, session: Session):
    from .compiler.source import call_factory, is_factory_spec

    if isinstance(reference, (str, Path)):
        if not is_factory_spec(str(reference)):
            return load_reference_onnx(str(reference), session.inputs, "reference")
        reference, _ = call_factory(str(reference))  # a torch module (call_factory checks)
    if hasattr(reference, "forward"):
        return _TorchReference(reference, [i.name for i in session.inputs])
    raise ModelLoadError(f"reference must be an .onnx path, a factory spec or a torch module, not {type(reference).__name__}")


def load_reference_onnx(path: str | Path, inputs, what: str, engine: str = "onnxruntime", **backend_options) -> Backend:
    """The original model (verify's reference, bench's baseline) on ONNX Runtime (or OpenVINO:
    `engine`), refused with one line when it is not an ONNX file or takes other inputs than the build."""
    path = Path(path)
    flag = f"--{what}"
    if path.is_dir():
        kind = "a trimrt build" if (path / "manifest.json").is_file() else "a folder"
        raise ModelLoadError(f"{what} {path} is {kind}, not an .onnx file; pass {flag} ORIGINAL.onnx (the model the "
                             "build was compiled from)")
    if not path.is_file():
        raise ModelLoadError(f"{what} model not found: {path}")
    if engine == "openvino":
        backend: Backend = OpenVINOBackend(path, threads=backend_options.get("threads"),
                                           shapes=backend_options.get("shapes"))
    else:
        backend = OnnxRuntimeBackend(path, **backend_options)
    try:
        backend.activate()
    except Exception as exc:  # noqa: BLE001 - the engines raise their own types for bad files
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = lines[0][:200] if lines else type(exc).__name__
        if "protobuf" in reason.lower():  # "Protobuf parsing failed", "No graph was found in the protobuf"
            reason = "not an ONNX model"
        name = "OpenVINO" if engine == "openvino" else "ONNX Runtime"
        raise ModelLoadError(f"{what} {path} cannot be loaded by {name} ({reason}); pass {flag} ORIGINAL.onnx") from None
    want, got = sorted(i.name for i in inputs), sorted(i.name for i in backend.inputs)
    if want != got:
        raise InputError(f"{what} {path} takes inputs {got}, the build {want}: pass the model this build was compiled from")
    theirs = {i.name: i for i in backend.inputs}
    for mine in inputs:
        other = theirs[mine.name]
        if other.dtype != mine.dtype or len(other.shape) != len(mine.shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(other.shape, mine.shape)):
            raise InputError(f"{what} {path} takes {other.describe()}, the build {mine.describe()}: pass the model "
                             "this build was compiled from")
    return backend


#: (lowest, highest) of the counts verify and bench take; the highs keep a typo from allocating
#: gigabytes (batch, tokens), starting a thread per core of a big server many times over
#: (threads) or running for days (samples, rounds, warmup)
COUNT_RANGES = {"samples": (1, 10_000), "tokens": (1, 65_536), "batch": (1, 4096), "threads": (1, 256),
                "rounds": (1, 100_000), "warmup": (0, 10_000)}


def check_counts(**counts: int | None) -> None:
    """Counts of verify / bench (samples, rounds, batch, ...) given through the API: one line when
    one is out of range, as the CLI's ranges say."""
    for name, value in counts.items():
        low, high = COUNT_RANGES[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if value is not None and value > high:
            raise InputError(f"{name} must be at most {high}, got {value}")


#: the output verify adds for decoders that prune their prompt: the last position's logits
NEXT_TOKEN = "logits (last token)"


def verify_build(build_dir: str | Path, reference: Any = None, *, samples: int = 8, inputs: list[str] | None = None,
                 min_cosine: float | None = None, min_top1: float | None = None, seed: int = 0,
                 tokens: int | None = None, per_pass: bool = False, backend: str = "auto") -> VerifyReport:
    """Compare a build, run on `backend` (auto: the engine its target runs on), with its reference (on
    ONNX Runtime); see the module docstring."""
    check_counts(samples=samples, tokens=tokens)
    session = Session(build_dir, backend=backend)
    if reference is None and not session.manifest.get("reference"):
        raise InputError(f"{build_dir} holds no reference model: pass --reference ORIGINAL.onnx or a factory")
    reference = Path(build_dir) / session.manifest["reference"] if reference is None else reference
    ref = _reference(reference, session)
    if inputs:
        batches = [validate_feeds(session.inputs, load_feed_files(inputs))]
    else:
        batches = [build_feeds(session.manifest, session.inputs, batch=1, seed=seed + i, tokens=tokens)
                   for i in range(samples)]
    names = [o.name for o in session.outputs]
    # a decoder that prunes its prompt: its next-token logits, what generation reads, are compared
    next_token = (session.manifest.get("decoder") or {}).get("prunes_prompt") and LOGITS in names
    got_all: dict[str, list] = {n: [] for n in [*names, *[NEXT_TOKEN] * bool(next_token)]}
    ref_all: dict[str, list] = {n: [] for n in got_all}
    for feeds in batches:
        got = session.run(feeds)
        expected = ref.infer(feeds)
        expected = list(expected.values()) if isinstance(expected, dict) else list(expected)
        if len(expected) < len(names):
            raise InputError(f"the reference gives {len(expected)} outputs, the build {len(names)}")
        if next_token:
            got[NEXT_TOKEN], expected = got[LOGITS][:, -1], [*expected, expected[names.index(LOGITS)][:, -1]]
        for n, e in zip(got_all, expected):
            got_all[n].append(got[n])
            ref_all[n].append(e)
    keep_ratios = realised_keep_ratios(Path(build_dir), session.manifest, batches)
    drift = attribute_drift(Path(build_dir), session.manifest, reference, batches, ref_all) if per_pass else []
    compared = _compared(got_all, ref_all)
    report = VerifyReport(samples=sum(next(iter(b.values())).shape[0] for b in batches), outputs=list(compared.values()),
                          min_cosine=min_cosine, min_top1=min_top1,
                          not_compared=[f"{n}: build {list(got_all[n][0].shape)} vs reference {list(ref_all[n][0].shape)}"
                                        for n in names if n not in compared],
                          keep_ratios=keep_ratios, per_pass=drift, quantization=quantization_facts(session.manifest))
    for m in report.outputs:
        if min_cosine is not None and m.cosine_mean < min_cosine:
            report.failures.append(f"{m.name}: mean cosine {m.cosine_mean:.4f} < {min_cosine}")
        if min_top1 is not None and m.top1 is not None and m.top1 < min_top1:
            report.failures.append(f"{m.name}: top-1 agreement {m.top1:.3f} < {min_top1}")
    return report


def _compared(got_all: dict[str, list], ref_all: dict[str, list]) -> dict[str, OutputMetrics]:
    """Each output's metrics over all batches, if every batch has the reference's shape."""
    return {n: compare_outputs(n, np.concatenate(got_all[n]), np.concatenate(refs)) for n, refs in ref_all.items()
            if all(g.shape == r.shape for g, r in zip(got_all[n], refs))}


def quantization_facts(manifest: dict) -> dict | None:
    """What a quantized build is (None when nothing was quantized)."""
    report = Manifest(manifest).pass_report("quantization")
    if not report or not report.get("matmuls_quantized"):
        return None
    facts = {key: report[key] for key in ("weights", "activations", "method") if key in report}
    facts["quantized"] = report["matmuls_quantized"]
    facts["linear_layers"] = report["matmuls_quantized"] + report["matmuls_float"]
    if report.get("fidelity"):
        facts["calibration_cosine"] = report["fidelity"]["cosine"]
    return facts


def realised_keep_ratios(build_dir: Path, manifest: dict, batches: list[dict]) -> list[dict]:
    """For adaptive pruning layers: run the build with each layer's visible-token count
    (MassMask's count) exposed, and report count / span tokens entering the layer."""
    layers = [x for p in manifest.get("passes", []) if p["pass"] == "token_pruning"
              for x in p["report"].get("layers", []) if "visible_count" in x]
    if not layers:
        return []
    import onnx

    from .compiler.onnx_runner import OnnxRunner
    from .runtime.manifest import MODEL

    model = onnx.load(str(build_dir / MODEL))
    mass = {n.output[1]: n for n in model.graph.node if n.op_type == "MassMask"}
    nodes = [mass[layer["visible_count"]] for layer in layers]
    names = [name for node in nodes for name in (node.output[1], node.input[0])]  # count [B], score [B, N] per layer
    runs = OnnxRunner(model, names).run_all(batches, names)
    report = []
    for layer, node in zip(layers, nodes):
        span_end = next((a.i for a in node.attribute if a.name == "span_end"), 0)  # 0: the score's width, the layer's tokens
        r = [ratio for run in runs for ratio in
             run[node.output[1]] / max((span_end or run[node.input[0]].shape[1]) - layer["protected"], 1)]
        report.append({"block": layer["block"], "mean": float(np.mean(r)), "min": float(np.min(r)), "max": float(np.max(r))})
    return report


def attribute_drift(build_dir: Path, manifest: dict, reference: Any, batches: list[dict], ref_all: dict[str, list]) -> list[dict]:
    """Run the build's pass pipeline once on the original, with an instrument after each
    pass of a recipe table: each output's mean cosine to the reference after it (how much
    each feature pass adds to the drift). The last step is the build's own recipe."""
    import onnx_ir as ir

    from .compiler.pipeline import CleanupPass, build_passes, run_pipeline
    from .compiler.source import load_source
    from .plugins import runnable_proto
    from .recipe import load_recipe
    from .runtime.manifest import onnxruntime_settings

    original = Path(reference) if isinstance(reference, (str, Path)) and str(reference).endswith(".onnx") else None
    if original is None and manifest.get("reference"):
        original = build_dir / manifest["reference"]
    if original is None or not original.is_file():
        raise InputError("per-pass drift needs the original ONNX model: pass --reference ORIGINAL.onnx "
                         "(or use a build compiled from PyTorch, which keeps reference.onnx)")
    recipe = dict(manifest.get("recipe") or {})
    if "calibration" in recipe:
        recipe["calibration"] = _absolute_calibration(recipe["calibration"], manifest.get("recipe_dir"))
    model = load_source(str(original)).model
    steps: list[dict] = []
    tables: list[str] = []

    def measure(done, current: ir.Model) -> None:
        if done.recipe_table is None:
            return
        tables.append(done.recipe_table)
        snapshot = ir.serde.deserialize_model(ir.serde.serialize_model(current))  # the pipeline goes on with `current`
        CleanupPass()(snapshot)
        fusion = done.context.report_of("ort_fusion")
        # run as trimrt's Session runs the build (e.g. ORT optimizers a fused build skips)
        settings = onnxruntime_settings({"onnxruntime": fusion.details["session"]} if fusion and "session" in fusion.details
                                        else {})
        backend = OnnxRuntimeBackend(runnable_proto(snapshot).SerializeToString(), **settings)
        backend.activate()
        runs = [backend.infer(feeds) for feeds in batches]
        got_all = {name: [run[name] for run in runs] for name in ref_all}
        cosines = {name: m.cosine_mean for name, m in _compared(got_all, ref_all).items()}
        steps.append({"passes": list(tables), "cosine_mean": cosines})

    run_pipeline(model, build_passes(load_recipe(recipe), manifest.get("target", "onnxruntime")), after_pass=measure)
    return steps


def _absolute_calibration(calibration: dict, recipe_dir: str | None) -> dict:
    """The [calibration] table with its source made absolute for the rebuilds.

    A relative source was read from the recipe file's folder at compile time (the
    manifest's recipe_dir); a recipe given as a dict resolves against the current
    directory, so run `verify --per-pass` from where it was compiled."""
    source = calibration.get("source")
    if source is None or calibration.get("random"):
        return calibration
    path = Path(source).expanduser()
    if not path.is_absolute():
        base = Path(recipe_dir) if recipe_dir else Path.cwd()
        path = base / path
        if not path.exists():
            raise CalibrationError(
                f"per-pass drift rebuilds the quantization with the build's calibration source {source!r}, "
                f"not found relative to {base}: run verify from the folder the build was compiled in")
    return {**calibration, "source": str(path)}
