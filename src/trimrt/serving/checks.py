"""What `trimrt serve` checks before any Ray process starts (no Ray import here, so a bad
request fails fast, in one line)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ServingError


def check_servable(build_dir: str | Path, *, replicas: int = 1, max_batch: int = 16, batch_wait_ms: float = 5.0,
                   openai: bool = False) -> Path:
    """The build folder, resolved, once it can be served as asked (else a one-line error), before
    any Ray process starts."""
    from ..runtime.manifest import read_manifest

    build_dir = Path(build_dir).resolve()
    manifest = read_manifest(build_dir)  # a bad build fails here, in one line, not in every replica
    if openai and not isinstance(manifest.get("decoder"), dict):
        raise ServingError(f"{build_dir} is not a decoder build: --openai serves text generation; serve it without")
    if not (isinstance(replicas, int) and replicas >= 1):
        raise ServingError(f"replicas must be an integer >= 1, got {replicas!r}")
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ServingError(f"max_batch must be an integer >= 1 (1: no batching), got {max_batch!r}")
    if not batch_wait_ms >= 0:
        raise ServingError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    return build_dir
