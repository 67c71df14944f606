"""trimrt: a deployment compiler for transformer models.

    build = trimrt.compile("model.onnx", "recipe.toml", "build/")
    session = trimrt.load("build/")
    outputs = session.run({"pixel_values": x})
    report = trimrt.verify("build/", reference="model.onnx")

The runtime (`load`, `Session`) needs numpy and onnxruntime only; the compiler and
verify import their heavier dependencies when called.
"""

from ._version import __version__  # noqa: E402
from .errors import (  # noqa: E402
    BackendUnavailableError,
    BuildError,
    BuildLoadError,
    CalibrationError,
    InputError,
    ModelLoadError,
    RecipeError,
    RunError,
    ServingError,
    SessionClosedError,
    StructureError,
    TrimrtError,
    TuneError,
)
from .runtime import Session, load  # noqa: E402


def compile(model, recipe=None, out_dir="build", *, example_inputs=None, target="onnxruntime", exporter="auto",
            progress=None):  # noqa: A001
    """Compile `model` (an .onnx path, a 'file.py:factory' spec, or a torch module with
    `example_inputs`, a tuple or a dict of keyword inputs) with `recipe` (TOML path, dict or
    Recipe) into the build directory `out_dir`. Returns the build's manifest (dict)."""
    from .compiler.driver import compile_model

    return compile_model(model, recipe, out_dir, example_inputs=example_inputs, target=target, exporter=exporter,
                         progress=progress)


def export(model, out_path, *, example_inputs=None, exporter="auto", opset=18):
    """Export a PyTorch model (a 'file.py:factory' spec, or a module with `example_inputs`) to
    an ONNX file the way `compile` does (dynamo exporter, TorchScript fallback; dynamic batch
    and token axes). Returns the path."""
    from .compiler.source import export_onnx

    return export_onnx(model, out_path, example_inputs, exporter=exporter, opset=opset)


def verify(build_dir, reference=None, **kwargs):
    """Run a build and its reference (an .onnx path, a factory spec or a torch module) on the
    same inputs (default: the build's reference.onnx); returns a VerifyReport with per-output
    errors, cosine and top-1 agreement (and, with per_pass=True, the drift each pass adds)."""
    from .verification import verify_build

    return verify_build(build_dir, reference, **kwargs)


def tune(model, *, data, eval_data, out_dir, **options):
    """Search the recipes that apply to `model` (an .onnx path or a factory spec) for the
    fastest build meeting `min_cosine` (or `metric`) on `eval_data`, calibrating on `data`;
    writes it to `out_dir` with its recipe and a report. Returns a TuneResult."""
    from .tuning import tune as run

    return run(model, data=data, eval_data=eval_data, out_dir=out_dir, **options)


__all__ = [
    "__version__", "compile", "export", "load", "verify", "tune", "Session", "TrimrtError", "RecipeError", "ModelLoadError",
    "StructureError", "TuneError", "BuildError", "BuildLoadError", "InputError", "BackendUnavailableError", "CalibrationError",
    "RunError", "ServingError", "SessionClosedError",
]
