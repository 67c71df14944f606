"""The build manifest: format version, contents and sha256 of every file of a build.

A build is sealed by its manifest: every file the runtime reads (model.onnx, its external
data, model.engine, the reference model) must be listed with its sha256, and every listed
path must stay inside the build directory, so a tampered manifest can neither smuggle in a
modified model nor make `load()` read files elsewhere on the machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import BuildLoadError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
ENGINE = "model.engine"
#: a decoder build's tokenizer, when its source came with one
TOKENIZER = "tokenizer.json"
#: an inputs_embeds decoder build's embedding model: input_ids -> inputs_embeds
EMBEDDING = "embedding.onnx"
#: an OpenVINO build's converted model, when its recipe asks to store it ([openvino] save_ir)
OPENVINO_IR = "openvino_model.xml"
OPENVINO_WEIGHTS = "openvino_model.bin"
#: where the compiler puts the weights of models over protobuf's 2 GB limit
EXTERNAL_DATA = MODEL + ".data"

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class Manifest(dict):
    """A build's manifest: the JSON object as read or written, with typed accessors for
    what several readers need (runtime, verify, inspect, bench, the CLI)."""

    def pass_report(self, name: str) -> dict | None:
        """The report of the pass called `name` (None if it did not run)."""
        return next((p["report"] for p in self.get("passes") or [] if p.get("pass") == name), None)

    @property
    def pass_names(self) -> list[str]:
        return [p["pass"] for p in self.get("passes") or []]


def write_manifest(build_dir: Path, content: dict, version: str) -> Manifest:
    """Seal a build: write manifest.json with `content`, the format and trimrt `version`,
    and the sha256 of every other file in `build_dir`."""
    files = {p.name: sha256_file(p) for p in sorted(build_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = Manifest({"format_version": FORMAT_VERSION, "trimrt_version": version, **content, "files": files})
    (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
    return manifest


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(build_dir: Path, name: str) -> Path:
    """`build_dir / name`, refused (BuildLoadError) unless it resolves inside the build:
    no absolute paths, no `..`, no symbolic link leading out."""
    root = build_dir.resolve()
    path = (build_dir / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root) or path == root:
        raise BuildLoadError(f"{build_dir}: {name!r} lies outside the build directory (an absolute path, '..' or a "
                             "link leading out); the build is damaged or tampered with, recompile it")
    return path


def read_manifest(build_dir: str | Path, *, check_hashes: bool = True) -> Manifest:
    """Read and check a build's manifest: a JSON object of a supported format version whose
    `files` (name → sha256) covers every file the build needs, all inside the build, each
    matching its hash (unless check_hashes=False)."""
    build_dir = Path(build_dir)
    if build_dir.is_file():
        hint = f"compile it first: trimrt compile {build_dir} -o BUILD_DIR" if build_dir.suffix == ".onnx" else \
            "give the folder `trimrt compile` wrote"
        raise BuildLoadError(f"{build_dir} is a file, not a build directory; {hint}")
    if not build_dir.is_dir():
        raise BuildLoadError(f"build directory not found: {build_dir}")
    if not (build_dir / MANIFEST).is_file():
        raise BuildLoadError(f"{build_dir} is not a trimrt build (no {MANIFEST}); create one with `trimrt compile`")
    path = inside(build_dir, MANIFEST)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BuildLoadError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}; recompile the build") from None
    if not isinstance(manifest, dict):
        raise BuildLoadError(f"{path} is not a JSON object (got a {type(manifest).__name__}); recompile the build")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BuildLoadError(f"{build_dir}: build format version {version!r} is not supported (expected {FORMAT_VERSION}); recompile it")
    files = _check_files(build_dir, manifest)
    _check_runtime_entries(build_dir, manifest)
    if check_hashes:
        for name, digest in files.items():
            file = inside(build_dir, name)
            if not file.is_file():
                raise BuildLoadError(f"{build_dir}: file {name} listed in the manifest is missing; recompile the build")
            if sha256_file(file) != digest.lower():
                raise BuildLoadError(f"{build_dir}: {name} does not match its sha256 in the manifest (modified or corrupted); recompile the build")
    return Manifest(manifest)


def _check_files(build_dir: Path, manifest: dict) -> dict[str, str]:
    """The `files` entry: an object of sha256 hex digests, inside the build, naming every needed file."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BuildLoadError(f"{build_dir}: the manifest's 'files' must be an object {{file name: sha256}}, "
                             f"got {type(files).__name__}; recompile the build")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BuildLoadError(f"{build_dir}: the manifest's hash for {name!r} is not a sha256 hex digest; recompile the build")
        inside(build_dir, name)
    needed = [MODEL] + [n for n in (ENGINE, EXTERNAL_DATA) if (build_dir / n).exists() or (build_dir / n).is_symlink()]
    if isinstance(manifest.get("openvino"), dict) and manifest["openvino"].get("ir"):
        needed += [OPENVINO_IR, OPENVINO_WEIGHTS]
    reference = manifest.get("reference")
    if reference is not None:
        if not isinstance(reference, str):
            raise BuildLoadError(f"{build_dir}: the manifest's 'reference' must be a file name, got {type(reference).__name__}")
        inside(build_dir, reference)
        needed.append(reference)
    for name in needed:
        if name not in files:
            raise BuildLoadError(f"{build_dir}: {name} is not listed in the manifest's files, so it cannot be checked; "
                                 "the build is damaged or tampered with, recompile it")
    return files


def _check_runtime_entries(build_dir: Path, manifest: dict) -> None:
    """The entries Session acts on have the types it expects (else BuildLoadError, not a crash later)."""
    for key, (valid, want) in _RUNTIME_ENTRIES.items():
        if manifest.get(key) is not None and not valid(manifest[key]):
            raise BuildLoadError(f"{build_dir}: the manifest's {key!r} must be {want}; recompile the build")


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def _valid_limits(limits) -> bool:
    def limit(entry) -> bool:
        return (isinstance(entry, dict) and isinstance(entry.get("limit"), int) and not isinstance(entry["limit"], bool)
                and entry["limit"] > 0 and isinstance(entry.get("node", ""), str))

    if not isinstance(limits, dict) or not isinstance(limits.get("ids", {}), dict):
        return False
    if not all(isinstance(k, str) and limit(v) for k, v in limits.get("ids", {}).items()):
        return False
    tokens = limits.get("tokens")
    return tokens is None or (limit(tokens) and _names(tokens.get("inputs")))


#: entry -> (its check, what it must be)
_RUNTIME_ENTRIES = {
    "onnxruntime": (lambda s: isinstance(s, dict) and _names(s.get("disabled_optimizers", [])),
                    "an object whose disabled_optimizers is a list of names"),
    "openvino": (lambda s: isinstance(s, dict) and s.get("inference_precision", "f32") in ("f32", "bf16", "f16")
                 and s.get("performance_hint", "latency") in ("latency", "throughput")
                 and isinstance(s.get("threads", 0), int) and s.get("ir") in (None, OPENVINO_IR),
                 'an object of inference_precision (f32, bf16, f16), performance_hint (latency, throughput), threads '
                 f'(an integer) and ir (null or "{OPENVINO_IR}")'),
    "min_tokens": (lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 0, "a non-negative integer"),
    "input_limits": (_valid_limits, 'an object {"ids": {input: {"limit": int, "node": str}}, '
                                    '"tokens": null | {"limit": int, "node": str, "inputs": [names]}}'),
}


def onnxruntime_settings(manifest: dict) -> dict:
    """Keyword arguments for OnnxRuntimeBackend that a build asks for (e.g. graph
    optimizers to skip, recorded by the [onnxruntime] fuse pass)."""
    settings = manifest.get("onnxruntime") or {}
    quantization = (manifest.get("recipe") or {}).get("quantization") or {}
    # INT8 weights are stored for ORT's U8U8 kernels; the backend runs them as int8 where that is exact
    return {"disabled_optimizers": list(settings.get("disabled_optimizers", [])),
            "signed_int8": bool(quantization) and quantization.get("weights", "int8") == "int8"}


def openvino_settings(manifest: dict, build_dir: Path) -> dict:
    """Keyword arguments for OpenVINOBackend that a build records (its [openvino] table): the
    model to read (the stored IR when there is one) and how to compile it."""
    settings = manifest.get("openvino") or {}
    model = build_dir / (OPENVINO_IR if settings.get("ir") else MODEL)
    return {"model": model, "precision": settings.get("inference_precision", "f32"),
            "hint": settings.get("performance_hint", "latency"), "threads": settings.get("threads") or None,
            "shapes": settings.get("shapes")}
