"""Model sources: an ONNX file, or a PyTorch factory / module that trimrt exports itself.

A factory is named `path/to/file.py:name` or `package.module:name` and returns
`(torch_module, example_inputs)`. Export uses the torch.onnx dynamo exporter with a
dynamic batch axis (and a dynamic token axis on integer inputs such as token ids and
masks), falling back to the TorchScript exporter when dynamo fails.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir

from ..errors import ModelLoadError
from ..runtime.kv_cache import INPUT_IDS
from . import decoder

log = logging.getLogger(__name__)

#: opset of exported models; the decompositions use standard ops of opset >= 18
EXPORT_OPSET = 18


@dataclass
class LoadedModel:
    model: ir.Model
    #: example feeds (name -> array) when the source provided them (factories do)
    example_feeds: dict[str, np.ndarray] | None
    #: a PyTorch callable reproducing the model, when the source was PyTorch
    torch_module: Any = None
    description: str = ""
    #: a decoder with a KV cache (runtime.kv_cache.DecoderSpec), else None
    decoder: Any = None
    #: a tokenizer.json that came with the source (a checkpoint folder's): copied into the build
    tokenizer_file: Path | None = None
    #: an inputs_embeds decoder's embedding model (input_ids -> inputs_embeds): saved in the build
    embedding: ir.Model | None = None


def is_factory_spec(spec: str) -> bool:
    return ":" in spec and not spec.lower().endswith(".onnx") and not Path(spec).exists()


def load_onnx(path: str | Path) -> ir.Model:
    """Read an ONNX file (with external data) into onnx_ir; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError / various on non-ONNX bytes
        if "points outside the directory" in str(exc):  # onnx refuses external data outside the folder
            found = re.search(r"but '([^']*)' points outside", str(exc))  # the location it names, quoted
            location = f"{found[1]!r} " if found else ""
            raise ModelLoadError(f"{path}: its external data {location}lies outside the model's folder "
                                 f"{path.parent}, which trimrt does not read; keep the weights file beside the model "
                                 "and name it by a relative path inside that folder") from None
        if "external data" in str(exc).lower() or isinstance(exc, FileNotFoundError):
            raise ModelLoadError(f"{path}: cannot read its external data ({_first_line(exc)}); keep the weights file "
                                 "beside the model") from None
        raise ModelLoadError(f"{path} is not an ONNX model ({type(exc).__name__}); pass an .onnx file or a factory 'file.py:function'") from None
    if not proto.graph.node:
        raise ModelLoadError(f"{path} is not an ONNX model with a graph (no nodes found)")
    proto = upgrade_opset(proto, str(path))
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the ONNX graph: {exc}") from None


#: the lowest opset trimrt works on; older models are up-converted on load
MIN_OPSET = 18


def owned_model(proto: onnx.ModelProto) -> ir.Model:
    """`proto` as an onnx_ir model that shares nothing with it. deserialize_model alone wraps
    the proto's own tensors, so a pass that renames a deduplicated initializer in the model
    (onnxscript's optimiser does) would rename it in `proto` too."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return ir.serde.deserialize_model(copy)


def upgrade_opset(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Models below MIN_OPSET (e.g. opset-17 exports) are converted with onnx's version converter."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset >= MIN_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        raise ModelLoadError(f"{where} uses ONNX opset {opset} and could not be converted to opset {MIN_OPSET} "
                             f"({str(exc).splitlines()[0]}); re-export it with opset_version={MIN_OPSET}") from None


def _import_file(path: Path):
    """Import a factory file. A file inside a package (folders with __init__.py) is
    imported as its dotted module, so its relative imports work; any file is run with
    the folder above its package (or its own folder) on sys.path, so it may import the
    modules beside it."""
    root = path.parent
    while (root / "__init__.py").is_file():
        root = root.parent
    dotted = ".".join(path.relative_to(root).with_suffix("").parts)
    sys.path.insert(0, str(root))
    try:
        if root != path.parent and dotted.split(".")[0] not in sys.modules:
            return importlib.import_module(dotted)
        loaded = sys.modules.get(dotted)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        mod_name = f"_trimrt_factory_{abs(hash(str(path)))}"  # a lone file, or its package name is taken
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(root))


def resolve_factory(spec: str) -> Callable[[], Any]:
    """`path/to/file.py:name` or `package.module:name` -> the callable."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ModelLoadError(f"model spec {spec!r} must be an .onnx file or 'file.py:factory' / 'package.module:factory'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"factory file not found: {path}")
        try:
            module = _import_file(path.resolve())
        except Exception as exc:
            raise ModelLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import module {target!r}: {exc}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelLoadError(f"{target} has no callable {name!r}")
    return factory


def call_factory(spec: str):
    factory = resolve_factory(spec)
    try:
        result = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: name it and what it raised
        raise ModelLoadError(f"factory {spec} raised {type(exc).__name__}: {_first_line(exc) or 'no message'}; "
                             "fix it so it returns (torch_module, example_inputs)") from None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelLoadError(f"factory {spec} must return (torch_module, example_inputs), got {type(result).__name__}")
    module, example = result
    if not (hasattr(module, "forward") and hasattr(module, "modules")):
        raise ModelLoadError(f"factory {spec} must return (torch_module, example_inputs); its first item is "
                             f"{type(module).__name__!r}, not a torch.nn.Module")
    return module, tuple(example) if isinstance(example, (tuple, list)) else (example,)


def input_names_of(module, count: int) -> list[str]:
    names = [p.name for p in inspect.signature(module.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


EXPORTERS = ("auto", "dynamo", "torchscript")


def export_torch(module, example_inputs, *, opset: int = EXPORT_OPSET, exporter: str = "auto") -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Export a torch module to onnx_ir: dynamo exporter first, TorchScript as fallback
    (`exporter` forces one of them).

    `example_inputs` is a tuple of tensors (positional) or a dict name -> tensor (keyword
    arguments, the usual way to call Hugging Face models)."""
    if exporter not in EXPORTERS:
        raise ModelLoadError(f"unknown exporter {exporter!r}; choose one of {list(EXPORTERS)}")
    try:
        import torch  # noqa: F401 - checked here so the message names the extra; used in _export
    except ImportError:
        raise ModelLoadError("exporting a PyTorch model needs torch: pip install 'trimrt[torch]'") from None
    # export in eval mode (the TorchScript exporter restores training flags recursively: set eval on the
    # outermost module)
    with eval_mode(module), _quiet_exporter():
        return _export(module, example_inputs, opset, exporter)


@contextlib.contextmanager
def eval_mode(module):
    """`module` in eval mode; the caller's train/eval flags, module by module, are put back afterwards."""
    training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in training.items():
            m.training = flag


@contextlib.contextmanager
def _quiet_exporter():
    """Silence, for the duration of an export, what the exporter prints that is not the user's
    business: torch.onnx's registry announcing it skips torchvision ops (one line per op), and
    torch's own pytree deprecation inside torch.export."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    quiet = lambda record: "torchvision is not installed" not in record.getMessage()  # noqa: E731
    registry.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(treespec|LeafSpec)", category=FutureWarning)
            # dynamic axes that torch.export proves equal to another (a decoder's batch and lengths)
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registry.removeFilter(quiet)


def _export(module, example_inputs, opset: int, exporter: str) -> tuple[ir.Model, dict[str, np.ndarray]]:
    import torch

    if not isinstance(example_inputs, dict):  # positional tensors, or one dict of keyword arguments
        single = len(example_inputs) == 1 and isinstance(example_inputs[0], dict)
        example_inputs = example_inputs[0] if single else zip(input_names_of(module, len(example_inputs)), example_inputs)
    kwargs = dict(example_inputs)
    for n, t in kwargs.items():  # numpy examples are fine; anything else is named
        if isinstance(t, np.ndarray):
            kwargs[n] = torch.from_numpy(t)
        elif not isinstance(t, torch.Tensor):
            raise ModelLoadError(f"example input {n!r} is a {type(t).__name__}; give torch tensors (or numpy arrays)")
    names = list(kwargs)
    feeds = {n: t.detach().cpu().numpy() for n, t in kwargs.items()}
    batch = torch.export.Dim("batch", min=1, max=4096)
    tokens = torch.export.Dim("tokens", min=2, max=65536)
    dynamic_shapes, dynamic_axes = {}, {}
    for n, t in kwargs.items():
        axes = {0: batch} if t.dim() >= 1 else {}
        if t.dim() == 2 and not t.dtype.is_floating_point:
            axes[1] = tokens
        dynamic_shapes[n] = axes
        dynamic_axes[n] = {a: ("batch" if a == 0 else "tokens") for a in axes}
    output_names = _output_names(module, kwargs)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        if exporter in ("auto", "dynamo"):
            try:
                program = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, opset_version=opset,
                                            input_names=names, output_names=output_names,
                                            dynamic_shapes=dynamic_shapes, verbose=False)
                program.save(str(path))
            except Exception as exc:  # noqa: BLE001 - any exporter failure falls back
                errors.append(f"dynamo: {type(exc).__name__}: {_first_line(exc)}")
                if exporter == "dynamo":
                    raise ModelLoadError("export failed: " + errors[-1]) from None
                log.warning("dynamo export failed (%s); trying the TorchScript exporter", errors[-1])
        if not path.exists():
            try:
                # the tracer calls forward positionally, which Hugging Face models reject
                # ("multiple values for use_cache"): trace a wrapper that calls by keyword
                wrapper = _keyword_call(module, names, output_names)
                torch.onnx.export(wrapper, tuple(kwargs.values()), str(path), dynamo=False, opset_version=opset,
                                  input_names=names, output_names=output_names, dynamic_axes=dynamic_axes)
            except Exception as exc2:  # noqa: BLE001
                errors.append(f"torchscript: {type(exc2).__name__}: {_first_line(exc2)}")
                raise ModelLoadError("export failed: " + " | ".join(errors)) from None
        return load_onnx(path), feeds


def _keyword_call(module, input_names: list[str], output_names: list[str]):
    """`module` wrapped to take positional tensors and call it by keyword (built lazily: torch import)."""
    import torch

    class KeywordCall(torch.nn.Module):
        def forward(self, *tensors):
            out = self.module(**dict(zip(input_names, tensors)))
            if isinstance(out, torch.Tensor):
                return out
            if hasattr(out, "keys"):
                return tuple(out[k] for k in output_names)
            return tuple(out)

    wrapper = KeywordCall()
    wrapper.module = module  # a submodule: its parameters keep their names in the export
    return wrapper.eval()


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _output_names(module, kwargs: dict) -> list[str]:
    """Readable output names: the module's own `output_names` if it declares them, keys of a
    dict / ModelOutput, else output / output_<i>."""
    import torch

    declared = getattr(module, "output_names", None)
    if declared and not isinstance(declared, torch.Tensor):
        return list(declared)
    with torch.no_grad():
        out = module(**kwargs)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if hasattr(out, "keys"):
        return [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [f"output_{i}" for i in range(len(out))]
    return []


def load_source(source: Any, example_inputs: tuple | dict | None = None, *, exporter: str = "auto",
                opset: int = EXPORT_OPSET, token_input: str | None = None) -> LoadedModel:
    """Anything `trimrt.compile` accepts as a model -> LoadedModel. `token_input` (a recipe's
    [decoder] token_input) exports a causal LM with that token input."""
    loaded = _load_source(source, example_inputs, exporter, opset, token_input or INPUT_IDS)
    if token_input is not None and (loaded.decoder is None or loaded.decoder.token_input != token_input):
        raise ModelLoadError(f"the recipe's [decoder] token_input = {token_input!r} applies to causal LMs trimrt exports "
                             "(a Hugging Face checkpoint folder, a *ForCausalLM module or a factory returning one); "
                             f"{loaded.description} is not one: remove the [decoder] table")
    return loaded


def _load_source(source: Any, example_inputs, exporter: str, opset: int, token_input: str) -> LoadedModel:
    if isinstance(source, ir.Model):
        return LoadedModel(source, None, description="onnx_ir model")
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(ir.serde.deserialize_model(upgrade_opset(source, "the model")), None, description="ModelProto")
    if isinstance(source, (str, Path)):
        spec = str(source)
        if decoder.is_checkpoint_folder(spec):
            tokenizer = Path(spec) / "tokenizer.json"
            return _causal_lm(decoder.load_checkpoint(spec), spec, opset, tokenizer if tokenizer.is_file() else None,
                              exporter=exporter, token_input=token_input)
        if is_factory_spec(spec):
            module, example = call_factory(spec)
            if decoder.is_causal_lm(module):
                return _causal_lm(module, spec, opset, exporter=exporter, token_input=token_input)
            model, feeds = export_torch(module, example, exporter=exporter, opset=opset)
            return LoadedModel(model, feeds, module, description=spec)
        model = load_onnx(spec)  # example_inputs, if any, serve as check feeds
        return LoadedModel(model, None, description=spec, decoder=decoder.spec_from_graph(model, Path(spec).parent))
    if decoder.is_causal_lm(source):  # exported with a KV cache: no example inputs needed
        return _causal_lm(source, type(source).__name__, opset, exporter=exporter, token_input=token_input)
    if hasattr(source, "forward") and hasattr(source, "eval"):  # a torch.nn.Module
        if example_inputs is None:
            raise ModelLoadError("compiling a PyTorch module needs example_inputs (a tuple of tensors)")
        if not isinstance(example_inputs, dict):
            example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        model, feeds = export_torch(source, example_inputs, exporter=exporter, opset=opset)
        return LoadedModel(model, feeds, source, description=type(source).__name__)
    raise ModelLoadError(f"cannot compile a {type(source).__name__}: pass an .onnx path, a factory spec or a torch.nn.Module")


def _causal_lm(module, description: str, opset: int, tokenizer_file: Path | None = None, *,
               exporter: str, token_input: str) -> LoadedModel:
    """A causal LM exported with its KV cache (compiler.decoder). Its reference is the
    exported graph: a PyTorch call does not take the flat cache tensors."""
    if exporter == "torchscript":
        raise ModelLoadError("causal LMs export with the dynamo exporter (the TorchScript exporter cannot trace "
                             "transformers' cache): use --exporter auto or dynamo")
    with eval_mode(module), _quiet_exporter():
        model, feeds, spec, embedding = decoder.export_causal_lm(module, opset=opset, token_input=token_input)
    return LoadedModel(model, feeds, None, description=description, decoder=spec, tokenizer_file=tokenizer_file,
                       embedding=embedding)


def export_onnx(source: Any, out_path, example_inputs: tuple | dict | None = None, *, exporter: str = "auto",
                opset: int = EXPORT_OPSET):
    """Write `source` (anything `load_source` takes) as an ONNX file at `out_path` the way
    `compile` exports it; returns the path (trimrt.export, and tune's model)."""
    import onnx_ir as ir

    ir.save(load_source(source, example_inputs, exporter=exporter, opset=opset).model, out_path)
    return out_path
