"""inspect: what trimrt sees in a model (transformer structure) or a build (passes, ops)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .runtime.manifest import MANIFEST, MODEL, read_manifest


def inspect_target(target: str) -> dict:
    """A dict describing a build directory or a model (.onnx file or factory spec)."""
    path = Path(target)
    if path.is_dir() and (path / MANIFEST).is_file():
        return inspect_build(path)
    return inspect_model(target)


def inspect_model(source: str) -> dict:
    from .compiler.analysis import analyse, infer_shapes
    from .compiler.source import load_source

    loaded = load_source(source)
    infer_shapes(loaded.model)
    return {"kind": "model", "source": str(source), "inputs": _io(loaded.model.graph.inputs),
            "outputs": _io(loaded.model.graph.outputs), "structure": analyse(loaded.model).summary()}


def inspect_build(build_dir: Path) -> dict:
    import onnx

    manifest = read_manifest(build_dir)
    proto = onnx.load(str(build_dir / MODEL), load_external_data=False)
    custom = Counter(n.op_type for n in proto.graph.node if n.domain == "trimrt")
    return {
        "kind": "build",
        "path": str(build_dir),
        "target": manifest.get("target"),
        "recipe": manifest.get("recipe"),
        "structure": manifest.get("structure"),
        "passes": manifest.get("passes"),
        "custom_ops": dict(custom),
        "functions": [f.name for f in proto.functions],
        "inputs": manifest.get("inputs"),
        "outputs": manifest.get("outputs"),
        "flops": manifest.get("flops"),
    }


def _io(values) -> list[dict]:
    out = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
        out.append({"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None, "shape": shape})
    return out
