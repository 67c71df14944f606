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

#: a shape range: (min, opt, max) shapes of one input
ShapeRange = tuple[list[int], list[int], list[int]]
#: longest sequence a decoder engine's profile spans when the model gives no (or a larger) context
DECODER_MAX_TOKENS = 4096


def decoder_profile(spec, max_batch: int = 8, max_tokens: int | None = None) -> dict[str, ShapeRange]:
    """The shape ranges of a KV-cache decoder's inputs (runtime.kv_cache names), so one engine
    serves prefill and decode: batch 1..max_batch, new tokens 1..the context, a past of
    0..context - 1 (prefill has none), a mask over past + new. Optimised for what runs
    most: one new token on a mid-length cache."""
    from ..runtime.kv_cache import ATTENTION_BIAS, ATTENTION_MASK, INPUTS_EMBEDS, KINDS, POSITION_IDS, past_name

    context = min(spec.max_positions or DECODER_MAX_TOKENS, max_tokens or DECODER_MAX_TOKENS)
    opt_past = context // 2
    tokens = ([1, 1], [1, 1], [max_batch, context])
    width = [spec.hidden_size] if spec.token_input == INPUTS_EMBEDS else []
    ranges = {spec.token_input: tuple(shape + width for shape in tokens), ATTENTION_MASK: ([1, 1], [1, opt_past + 1], [max_batch, context]),
              ATTENTION_BIAS: ([1, 1, 1, 1], [1, 1, 1, opt_past + 1], [max_batch, 1, context, context])}
    if spec.position_input:
        ranges[POSITION_IDS] = tokens
    past = ([1, spec.kv_heads, 0, spec.head_dim], [1, spec.kv_heads, opt_past, spec.head_dim],
            [max_batch, spec.kv_heads, context - 1, spec.head_dim])
    ranges.update({past_name(i, kind): past for i in range(spec.layers) for kind in KINDS})
    return ranges


def build_engine(onnx_path: Path, engine_path: Path, *, hints: Mapping[str, Sequence[int]] | None = None,
                 ranges: Mapping[str, ShapeRange] | None = None, max_batch: int = 32, workspace_gib: int = 4) -> None:
    """`ranges` (a decoder's, `decoder_profile`) sets the profile of the inputs it names; the
    others span batch 1..max_batch at their example shapes (`hints`)."""
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
        if ranges and tensor.name in ranges:
            profile.set_shape(tensor.name, *ranges[tensor.name])
            continue
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
