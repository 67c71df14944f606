"""Builds on disk: model.onnx + manifest.json (+ model.engine), written atomically.

The build is written into a temporary directory beside the destination and renamed
into place, so a failed compile leaves nothing half-written; an existing build at the
destination is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..errors import BuildError
from ..runtime.manifest import FORMAT_VERSION, MANIFEST, sha256_file


@contextmanager
def atomic_build_dir(out_dir: str | Path):
    """Yield a temp dir; on success it replaces `out_dir`, on error it is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (out_dir / MANIFEST).is_file() or _is_empty_dir(out_dir)):
        raise BuildError(f"output {out_dir} exists and is not a trimrt build; choose another -o path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def write_manifest(build_dir: Path, content: dict) -> dict:
    """Write manifest.json listing the sha256 of every other file in the build."""
    files = {p.name: sha256_file(p) for p in sorted(build_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format_version": FORMAT_VERSION, "trimrt_version": __version__, **content, "files": files}
    (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
    return manifest


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
