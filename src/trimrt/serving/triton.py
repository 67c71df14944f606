"""A Triton Inference Server model repository for a build (`trimrt export-triton`).

What is written, per build kind (NAME defaults to the build folder's name):

| build | NAME (stock backend) | NAME_python (python backend, trimrt's runtime) |
|---|---|---|
| encoder, ONNX Runtime / OpenVINO target | `onnxruntime_onnx`: the portable model.onnx | the build run by `Session.run` |
| TensorRT target | `tensorrt_plan`: model.engine as model.plan | the engine run by trimrt (its Python plugins) |
| decoder (KV cache) | none: the stock backends have no generation loop | text in, generated text out |

Inputs and outputs come from the build's signature (manifest): axis 0 is Triton's batch
axis when it is free (`max_batch_size`), symbolic axes (tokens) become -1. Dynamic
batching is on where batching cannot change an answer (`batching.BatchPolicy`), instance
groups run on the CPU (`--instances`) or the GPU (TensorRT). Every config.pbtxt is parsed
with Triton's own protobuf schema (`tritonclient.grpc.model_config_pb2`) before anything is
written, and each model is written into a temporary folder renamed into place, so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildLoadError, ServingError
from ..runtime.manifest import ENGINE, MANIFEST, read_manifest

#: numpy dtype name -> Triton data type (model_config.proto's DataType)
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
#: the python-backend model's file, copied from this package
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
#: the token inputs a text ensemble's tokenizer step gives an encoder build, in this order
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: generation inputs / outputs of a decoder build's python model
GENERATION_INPUTS = [("prompt", "TYPE_STRING", [1], False), ("max_tokens", "TYPE_INT32", [1], True),
                     ("temperature", "TYPE_FP32", [1], True), ("top_p", "TYPE_FP32", [1], True),
                     ("seed", "TYPE_INT64", [1], True)]
GENERATION_OUTPUTS = [("text", "TYPE_STRING", [1]), ("tokens", "TYPE_INT64", [-1])]


@dataclass
class TritonModel:
    """One model of the repository: its folder name, backend / platform and config text."""

    name: str
    kind: str  # onnxruntime_onnx | python | tensorrt_plan
    config: str
    #: files of its version folder "1": name -> source path (a folder is copied whole)
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "files": sorted(self.files), "notes": self.notes}


def export_triton(build_dir: str | Path, repository: str | Path, *, name: str | None = None, max_batch: int = 8,
                  instances: int = 1, queue_delay_us: int = 2000, threads: int | None = None,
                  tokenizer: str | Path | None = None, ensemble_model: str = "stock") -> list[TritonModel]:
    """Write the models of `build_dir` into the model repository `repository` (created if
    missing; other models in it are left alone; ServingError if a model of the same name is
    there). With `tokenizer` (an encoder build taking input_ids: tokenizer.json or a folder
    holding it) also NAME_tokenize and the ensemble NAME_text, text in, the build's outputs
    out, whose model step is the stock model (`ensemble_model="stock"`) or NAME_python.
    Returns the models written."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    name = name or build_dir.resolve().name
    _check_name(name)
    if not (isinstance(max_batch, int) and 0 <= max_batch <= 1 << 16):
        raise ServingError(f"max_batch must be an integer in [0, 65536] (0: no batching), got {max_batch!r}")
    if not (isinstance(instances, int) and 1 <= instances <= 256):
        raise ServingError(f"instances must be an integer in [1, 256], got {instances!r}")
    models = plan_models(build_dir, manifest, name, max_batch=max_batch, instances=instances,
                         queue_delay_us=queue_delay_us, threads=threads)
    if tokenizer is not None:
        models += text_ensemble(manifest, name, models, Path(tokenizer), ensemble_model, instances)
    for model in models:
        validate_config(model.config, model.name)
    repository = Path(repository)
    if repository.is_file():
        raise ServingError(f"{repository} is a file; give the folder of a Triton model repository")
    if (repository / MANIFEST).is_file():
        raise ServingError(f"{repository} is a trimrt build; write the repository elsewhere")
    taken = [m.name for m in models if (repository / m.name).exists()]
    if taken:
        raise ServingError(f"{repository} already has model(s) {taken}; remove them or choose another --name")
    repository.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for model in models:
            written.append(_write_model(repository, model))
    except BaseException:
        for path in written:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return models


def plan_models(build_dir: Path, manifest: dict, name: str, *, max_batch: int, instances: int, queue_delay_us: int,
                threads: int | None) -> list[TritonModel]:
    """The models (configs and files) a build exports to, without writing anything."""
    from .batching import row_coupling_ops

    decoder = isinstance(manifest.get("decoder"), dict)
    engine = (build_dir / ENGINE).is_file()
    build_files = {"build": build_dir}
    python_kind = "KIND_GPU" if engine else "KIND_CPU"
    thread_param = {"intra_op_threads": str(threads)} if threads else {}
    if decoder:
        config = _config(f"{name}", "python", 0, GENERATION_INPUTS, [(n, t, d, False) for n, t, d in GENERATION_OUTPUTS],
                         instances, python_kind, batching=False, queue_delay_us=queue_delay_us,
                         parameters={"mode": "generate", **thread_param})
        return [TritonModel(name, "python", config, {"model.py": PYTHON_MODEL, **build_files},
                            ["a decoder: text in, generated text out (the generation loop of trimrt's runtime); the "
                             "stock ONNX Runtime / TensorRT backends have no generation loop, so no stock model"])]
    batch = max_batch if max_batch and _batch_axis_free(manifest) else 0
    inputs = [(t["name"], _triton_type(t), _dims(t, manifest, batch > 0, static=engine), False)
              for t in manifest.get("inputs") or []]
    outputs = [(t["name"], _triton_type(t), _dims(t, manifest, batch > 0, static=False), False)
               for t in manifest.get("outputs") or []]
    if not inputs or not outputs:
        raise BuildLoadError(f"{build_dir}: the manifest lists no inputs / outputs; recompile the build with this trimrt")
    import onnx

    proto = onnx.load(str(build_dir / "model.onnx"), load_external_data=False)
    coupled = row_coupling_ops(proto)
    stock_batching = batch > 0 and not coupled
    models = []
    if engine:
        plugins = sorted(op for op, entry in (manifest.get("ops") or {}).items() if entry.get("domain") == "trimrt")
        notes = ["the engine's optimization profile spans batch 1..its max_batch at the example token shapes"]
        if plugins:
            notes.append(f"the engine uses trimrt's plugins {plugins}: Triton's TensorRT backend loads them only from a "
                         "plugin library (--backend-config=tensorrt,plugins=LIB.so, or LD_PRELOAD); without one, serve "
                         f"{name}_python, which registers them")
        config = _config(name, "tensorrt_plan", batch, inputs, outputs, instances, "KIND_GPU",
                         batching=stock_batching, queue_delay_us=queue_delay_us)
        models.append(TritonModel(name, "tensorrt_plan", config, {"model.plan": build_dir / ENGINE}, notes))
    else:
        parameters = {"intra_op_thread_count": str(threads)} if threads else {}
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        notes = [f"the model is ONNX opset {opset}, run by ONNX Runtime {_onnxruntime_version()} here: Triton's ONNX "
                 "Runtime backend must be a release whose ONNX Runtime runs that opset (and the com.microsoft ops it uses)"]
        if coupled:
            notes.append(f"dynamic batching off: {', '.join(coupled)} quantizes each activation with one scale over the "
                         "whole batch, so Triton's batching would change answers")
        disabled = (manifest.get("onnxruntime") or {}).get("disabled_optimizers") or []
        if disabled:
            notes.append(f"Triton's ONNX Runtime backend cannot skip {disabled} (no such parameter): it runs that fusion, "
                         "which the build skips for speed; the python model honours it")
        if manifest.get("target") == "openvino":
            notes.append("an OpenVINO build: the stock model runs its portable model.onnx on ONNX Runtime; the python "
                         "model runs it on OpenVINO, as the build asks")
        config = _config(name, "onnxruntime_onnx", batch, inputs, outputs, instances, "KIND_CPU",
                         batching=stock_batching, queue_delay_us=queue_delay_us, parameters=parameters)
        files = {"model.onnx": build_dir / "model.onnx"}
        if (build_dir / "model.onnx.data").is_file():
            files["model.onnx.data"] = build_dir / "model.onnx.data"
        models.append(TritonModel(name, "onnxruntime_onnx", config, files, notes))
    config = _config(f"{name}_python", "python", batch, inputs, outputs, instances, python_kind,
                     batching=batch > 0, queue_delay_us=queue_delay_us, parameters={"mode": "run", **thread_param})
    models.append(TritonModel(f"{name}_python", "python", config, {"model.py": PYTHON_MODEL, **build_files},
                              ["runs the build with trimrt's runtime: the Python environment of the server needs "
                               "`pip install trimrt` (or an EXECUTION_ENV_PATH environment that has it)"]))
    return models


def text_ensemble(manifest: dict, name: str, models: list[TritonModel], tokenizer: Path, ensemble_model: str,
                  instances: int) -> list[TritonModel]:
    """NAME_tokenize (python: texts -> the build's token inputs, padded to the request's longest
    text, truncated to the model's positions) and NAME_text (an ensemble: text -> tokenize ->
    the model). A request's texts run as one batch (one text: no padding)."""
    if isinstance(manifest.get("decoder"), dict):
        raise ServingError("a decoder's generation model takes text already (its build's tokenizer, or ids); "
                           "--tokenizer is for encoder builds")
    if ensemble_model not in ("stock", "python"):
        raise ServingError(f"ensemble_model must be 'stock' or 'python', got {ensemble_model!r}")
    inputs = {t["name"]: t for t in manifest.get("inputs") or []}
    if "input_ids" not in inputs or set(inputs) - set(TOKEN_INPUTS):
        raise ServingError(f"a text ensemble feeds a model taking {list(TOKEN_INPUTS)}; this build takes "
                           f"{list(inputs)}: export it without --tokenizer")
    file = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    if not file.is_file():
        raise ServingError(f"no tokenizer.json at {tokenizer}: give the file, or the folder holding it")
    target = next(m for m in models if m.kind != "python") if ensemble_model == "stock" else models[-1]
    limit = ((manifest.get("input_limits") or {}).get("tokens") or {}).get("limit")
    token_outputs = [(n, _triton_type(inputs[n]), [-1, -1], False) for n in TOKEN_INPUTS if n in inputs]
    tokenize = _config(f"{name}_tokenize", "python", 0, [("text", "TYPE_STRING", [-1], False)], token_outputs,
                       instances, "KIND_CPU", batching=False, queue_delay_us=0,
                       parameters={"mode": "tokenize", **({"max_tokens": str(limit)} if limit else {})})
    outputs = [(t["name"], _triton_type(t), _dims(t, manifest, batched=False, static=False), False)
               for t in manifest["outputs"]]
    steps = [(f"{name}_tokenize", {"text": "text"}, {n: n for n, *_ in token_outputs}),
             (target.name, {n: n for n, *_ in token_outputs}, {n: n for n, *_ in outputs})]
    ensemble = _config(f"{name}_text", "ensemble", 0, [("text", "TYPE_STRING", [-1], False)], outputs, instances,
                       "KIND_CPU", batching=False, queue_delay_us=0, steps=steps)
    return [TritonModel(f"{name}_tokenize", "python", tokenize, {"model.py": PYTHON_MODEL, "tokenizer.json": file},
                        ["tokenizes a request's texts (the server's Python environment needs `tokenizers`)"]),
            TritonModel(f"{name}_text", "ensemble", ensemble, {},
                        [f"text in: {name}_tokenize, then {target.name}; a request's texts are padded to its longest"])]


def validate_config(text: str, name: str) -> None:
    """Parse `text` with Triton's ModelConfig schema (ServingError naming the problem); skipped
    when tritonclient is not installed (the configs are generated from one template)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ServingError(f"the generated config.pbtxt of {name} does not parse with Triton's schema ({exc}); please "
                           "report this build") from None
    if config.name != name:
        raise ServingError(f"the generated config.pbtxt names {config.name!r}, not {name!r}; please report this build")


def _write_model(repository: Path, model: TritonModel) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=repository))
    try:
        (staging / "config.pbtxt").write_text(model.config)
        version = staging / "1"
        version.mkdir()
        for file, source in model.files.items():
            if source.is_dir():
                _copy_build(source, version / file)
            else:
                shutil.copyfile(source, version / file)
        if model.notes:
            (staging / "NOTES.txt").write_text("".join(f"- {n}\n" for n in model.notes))
        target = repository / model.name
        staging.rename(target)
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_build(build_dir: Path, target: Path) -> None:
    """The build's sealed files only (its manifest and what it lists), hashes intact."""
    target.mkdir()
    manifest = json.loads((build_dir / MANIFEST).read_text())
    for file in [MANIFEST, *manifest["files"]]:
        shutil.copyfile(build_dir / file, target / file)


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "/\\\n\"") or name.startswith("."):
        raise ServingError(f"{name!r} cannot name a Triton model (a folder of the repository); give --name")


def _batch_axis_free(manifest: dict) -> bool:
    return all(t["shape"] and isinstance(t["shape"][0], str) for t in [*manifest["inputs"], *manifest["outputs"]])


def _triton_type(tensor: dict) -> str:
    dtype = tensor.get("dtype")
    if dtype not in TRITON_TYPES:
        raise ServingError(f"tensor {tensor.get('name')!r} has dtype {dtype}, which Triton's model config cannot "
                           f"declare here; supported: {sorted(TRITON_TYPES)}")
    return TRITON_TYPES[dtype]


def _dims(tensor: dict, manifest: dict, batched: bool, *, static: bool) -> list[int]:
    """Triton dims: the batch axis left out when batched, symbolic axes -1 (or, `static`, the
    example's size: an engine's profile covers the example shapes only)."""
    example = (manifest.get("example_shapes") or {}).get(tensor["name"])
    dims = []
    for axis, d in enumerate(tensor["shape"]):
        if axis == 0 and batched:
            continue
        if isinstance(d, int):
            dims.append(d)
        else:
            dims.append(example[axis] if static and example and axis < len(example) else -1)
    return dims


def _tensor_block(tensors, optional_ok: bool) -> str:
    rows = []
    for name, dtype, dims, optional in tensors:
        extra = " optional: true" if optional and optional_ok else ""
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return ",\n".join(rows)


def _config(name: str, kind: str, max_batch: int, inputs, outputs, instances: int, device: str, *, batching: bool,
            queue_delay_us: int, parameters: dict[str, str] | None = None, steps=None) -> str:
    """config.pbtxt text (model_config.proto); `kind`: a platform or the python backend;
    `steps` (an ensemble): (model, {its input: tensor}, {its output: tensor}) in order."""
    engine = 'backend: "python"' if kind == "python" else f'platform: "{kind}"'
    lines = [f'name: "{name}"', engine, f"max_batch_size: {max_batch}",
             f"input [\n{_tensor_block(inputs, True)}\n]", f"output [\n{_tensor_block(outputs, False)}\n]"]
    if batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    if steps:
        def pairs(kind, mapping):
            return " ".join(f'{kind} {{ key: "{k}" value: "{v}" }}' for k, v in mapping.items())

        rows = [f'    {{ model_name: "{m}" model_version: -1 {pairs("input_map", i)} {pairs("output_map", o)} }}'
                for m, i, o in steps]
        lines.append("ensemble_scheduling {\n  step [\n" + ",\n".join(rows) + "\n  ]\n}")
    else:
        lines.append(f"instance_group [ {{ kind: {device} count: {instances} }} ]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"
