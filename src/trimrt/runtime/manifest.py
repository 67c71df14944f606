"""The build manifest: format version, contents and sha256 of every file of a build."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import BuildLoadError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
ENGINE = "model.engine"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(build_dir: str | Path, *, check_hashes: bool = True) -> dict:
    """Read and check a build's manifest: format version and the hash of every listed file."""
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST
    if not build_dir.is_dir():
        raise BuildLoadError(f"build directory not found: {build_dir}")
    if not path.is_file():
        raise BuildLoadError(f"{build_dir} is not a trimrt build (no {MANIFEST}); create one with `trimrt compile`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BuildLoadError(f"{path} is not valid JSON: {exc}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BuildLoadError(f"{build_dir}: build format version {version!r} is not supported (expected {FORMAT_VERSION}); recompile it")
    if check_hashes:
        for name, digest in manifest.get("files", {}).items():
            file = build_dir / name
            if not file.is_file():
                raise BuildLoadError(f"{build_dir}: file {name} listed in the manifest is missing; recompile the build")
            if sha256_file(file) != digest:
                raise BuildLoadError(f"{build_dir}: {name} does not match its sha256 in the manifest (modified or corrupted); recompile the build")
    return manifest


def onnxruntime_settings(manifest: dict) -> dict:
    """Keyword arguments for OnnxRuntimeBackend that a build asks for (e.g. graph
    optimizers to skip, recorded by the [onnxruntime] fuse pass)."""
    settings = manifest.get("onnxruntime") or {}
    return {"disabled_optimizers": list(settings.get("disabled_optimizers", []))}
