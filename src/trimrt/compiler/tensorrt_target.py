"""TensorRT target: parse the finalised ONNX (custom nodes → trimrt plugins) into an engine.

Thin by design: TensorRT ≥ 10.7 picks the registered plugins for the `trimrt` nodes
(plugin_namespace / plugin_version attributes set by the target pass), the network is
strongly typed (precision lives in the graph), and one optimization profile covers
batch 1..max_batch at the example shapes. Imported only when targeting TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..errors import BackendUnavailableError, BuildError


def build_engine(onnx_path: Path, engine_path: Path, *, hints: Mapping[str, Sequence[int]] | None = None,
                 max_batch: int = 32, workspace_gib: int = 4) -> None:
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("building a TensorRT engine needs tensorrt: pip install 'trimrt[trt]'") from None
    from ..plugins.tensorrt_glue import register_all

    register_all()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse the build: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        example = list((hints or {}).get(tensor.name, []))
        opt = [d if d >= 0 else (example[a] if a < len(example) else 1) for a, d in enumerate(shape)]
        batch = bool(shape) and shape[0] < 0  # a dynamic batch axis spans 1..max_batch, the others opt
        profile.set_shape(tensor.name, [1, *opt[1:]] if batch else opt, opt, [max_batch, *opt[1:]] if batch else opt)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
