"""Causal LMs with a KV cache: one exported graph for prefill and decode.

The model is wrapped so that the graph takes and returns flat tensors named as in
`runtime.kv_cache` (ONNX Runtime GenAI's names). The wrapper builds the attention mask
itself — causal over the new tokens, padding from the 2-D `attention_mask`, each layer's
sliding window, plus the optional additive `attention_bias` — and hands the model a
cache holding the past, so the same graph serves any past length and any number of new
tokens (a tree of drafts included). Exported with torch.export (the dynamo exporter):
the TorchScript exporter cannot trace transformers' cache and mask code.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import ModelLoadError
from ..runtime.kv_cache import (
    ATTENTION_BIAS,
    ATTENTION_MASK,
    INPUT_IDS,
    INPUTS_EMBEDS,
    KINDS,
    LOGITS,
    POSITION_IDS,
    DecoderSpec,
    past_name,
    present_name,
)

#: PipelineContext.shared key of the DecoderSpec when the compiled model is a decoder
DECODER_SPEC = "decoder_spec"
#: example sizes of the export: distinct, and none 0 or 1 (torch.export specialises those)
_BATCH, _NEW, _PAST = 2, 5, 7
_BIAS_DIMS = ("attention_bias_batch", 1, "sequence_length", "total_sequence_length")


def is_causal_lm(module) -> bool:
    """A Hugging Face model that generates text (a *ForCausalLM / *LMHeadModel)."""
    can_generate = getattr(module, "can_generate", None)
    return hasattr(module, "config") and callable(can_generate) and bool(can_generate())


def is_checkpoint_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_checkpoint(folder: str | Path):
    """A local Hugging Face checkpoint folder -> its causal LM in fp32, eval mode."""
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("loading a Hugging Face checkpoint needs transformers: pip install 'trimrt[torch]'") from None
    transformers.utils.logging.disable_progress_bar()  # a progress bar per load is noise in a compile
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{folder} is not a causal LM checkpoint transformers can load: {first}") from None
    return model.eval()


def export_causal_lm(module, *, opset: int, token_input: str = INPUT_IDS
                     ) -> tuple[ir.Model, dict[str, np.ndarray], DecoderSpec, ir.Model | None]:
    """(graph with a KV cache, example feeds with a non-empty past, decoder spec, the embedding
    model input_ids -> inputs_embeds when `token_input` is inputs_embeds, else None). The caller
    puts `module` in eval mode."""
    import torch

    with torch.no_grad():
        windows = _layer_windows(module.config)
        spec = replace(_decoder_spec(module), sliding_window=min((w for w in windows if w), default=None))
        embedding = None
        if token_input == INPUTS_EMBEDS:
            embedding = _export_embedding(module, opset)
            width = embedding.graph.outputs[0].shape[-1]
            spec = replace(spec, token_input=INPUTS_EMBEDS, hidden_size=int(width))
        wrapper = _kv_cache_module(module, spec.layers, windows, token_input)
        example = spec.random_feeds(_BATCH, _NEW, _PAST)
        bias = np.zeros((_BATCH, 1, _NEW, _PAST + _NEW), np.float32)
        names = [token_input, ATTENTION_MASK, POSITION_IDS, ATTENTION_BIAS] + [n for n in example if n.startswith("past")]
        example = {n: bias if n == ATTENTION_BIAS else example[n] for n in names}
        outputs = [LOGITS] + [present_name(i, k) for i in range(spec.layers) for k in KINDS]
        dim = torch.export.Dim
        batch, new, past, total = dim("batch"), dim("sequence_length"), dim("past_sequence_length"), dim("total_sequence_length")
        shapes = [{0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new}, {0: batch, 2: new, 3: total},
                  tuple({0: batch, 2: past} for _ in range(2 * spec.layers))]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                program = torch.onnx.export(wrapper, tuple(torch.from_numpy(example[n]) for n in names[:4])
                                            + (tuple(torch.from_numpy(example[n]) for n in names[4:]),),
                                            dynamo=True, opset_version=opset, input_names=names, output_names=outputs,
                                            dynamic_shapes=tuple(shapes), verbose=False)
                program.save(str(Path(tmp) / "model.onnx"))
            except Exception as exc:  # noqa: BLE001 - torch.export raises many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelLoadError(f"exporting {type(module).__name__} with a KV cache failed: "
                                     f"{type(exc).__name__}: {first}") from None
            model = ir.load(str(Path(tmp) / "model.onnx"))
    _make_bias_optional(model, token_input)
    example.pop(ATTENTION_BIAS)  # the checks run the default (no extra mask)
    return model, example, spec, embedding


def _export_embedding(module, opset: int) -> ir.Model:
    """The model's input embedding as its own graph, input_ids [batch, sequence_length] ->
    inputs_embeds [batch, sequence_length, hidden]: what a runtime embeds a prompt's text and
    each generated token with (ONNX Runtime GenAI's multimodal exports have the same split)."""
    import torch

    embed = getattr(module, "get_input_embeddings", lambda: None)()
    if embed is None:
        raise ModelLoadError(f"{type(module).__name__} has no input embedding (get_input_embeddings()); "
                             "an inputs_embeds build needs one to embed generated tokens")
    ids = torch.zeros((_BATCH, _NEW), dtype=torch.long)
    dim = torch.export.Dim
    with tempfile.TemporaryDirectory() as tmp:
        try:
            program = torch.onnx.export(embed, (ids,), dynamo=True, opset_version=opset, input_names=[INPUT_IDS],
                                        output_names=[INPUTS_EMBEDS], verbose=False,
                                        dynamic_shapes=({0: dim("batch"), 1: dim("sequence_length")},))
            program.save(str(Path(tmp) / "embedding.onnx"))
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"exporting the input embedding of {type(module).__name__} failed: "
                                 f"{type(exc).__name__}: {first}") from None
        return ir.load(str(Path(tmp) / "embedding.onnx"))


def _kv_cache_module(model, layers: int, windows: list[int | None], token_input: str = INPUT_IDS):
    """The model wrapped for export (a class made on first use: torch is an optional dependency)."""
    import torch

    class KVCacheModule(torch.nn.Module):
        """Flat tensors in, flat tensors out: the shape an ONNX decoder graph has."""

        def __init__(self, model, layers: int, windows: list[int | None]):
            super().__init__()
            self.model, self.layers, self.windows = model, layers, windows
            params = inspect.signature(model.forward).parameters
            self.cache_arg = "cache" if "cache" in params else "past_key_values"

        def forward(self, tokens, attention_mask, position_ids, attention_bias, past):
            """`tokens`: input_ids [B, q], or inputs_embeds [B, q, hidden] (`token_input`)."""
            from transformers import DynamicCache

            # no config: every layer keeps its whole past (a sliding window is applied by the mask)
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            masks = {w: _additive_mask(attention_mask, tokens.shape[1], w) + attention_bias for w in set(self.windows)}
            if len(masks) == 1:
                mask = masks[self.windows[0]]
            else:  # layers of two kinds (full / sliding): transformers takes one mask per kind
                mask = {"full_attention": masks[None], "sliding_attention": masks[next(w for w in self.windows if w)]}
            out = self.model(**{token_input: tokens}, attention_mask=mask, position_ids=position_ids,
                             use_cache=True, **{self.cache_arg: cache})
            presents = []
            for layer in cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVCacheModule(model, layers, windows).eval()


def _additive_mask(attention_mask, new: int, window: int | None):
    """[B, 1, new, total] float: 0 where query i (at position past + i) may see key j, else the
    dtype's minimum (finite, so a row with nothing allowed gives a uniform softmax, not NaN)."""
    import torch

    total = attention_mask.shape[1]
    key = torch.arange(total).view(1, 1, 1, total)
    query = (torch.arange(new) + (total - new)).view(1, 1, new, 1)
    allowed = (key <= query) & attention_mask.bool()[:, None, None, :]
    if window is not None:
        allowed = allowed & (key > query - window)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _layer_windows(config) -> list[int | None]:
    """Each layer's sliding-window length (None: full attention), as transformers applies them."""
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    return [window] * layers


def _decoder_spec(module) -> DecoderSpec:
    """Cache geometry from one tiny run of the model (every family names its config differently)."""
    import torch

    params = inspect.signature(module.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    out = module(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    cache = getattr(out, cache_arg, None) or getattr(out, "past_key_values", None)
    if cache is None or not getattr(cache, "layers", None):
        raise ModelLoadError(f"{type(module).__name__} returned no KV cache (use_cache=True); "
                             "trimrt exports Hugging Face causal LMs with transformers' Cache")
    keys = cache.layers[0].keys
    config, gen = module.config, getattr(module, "generation_config", None)
    eos = _first(getattr(gen, "eos_token_id", None), getattr(config, "eos_token_id", None))
    return DecoderSpec(
        layers=len(cache.layers), kv_heads=int(keys.shape[1]), head_dim=int(keys.shape[3]),
        vocab_size=int(out.logits.shape[-1]),
        max_positions=_first(getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)),
        eos_token_ids=tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]),
        pad_token_id=_first(getattr(gen, "pad_token_id", None), getattr(config, "pad_token_id", None)),
        bos_token_id=_first(getattr(gen, "bos_token_id", None), getattr(config, "bos_token_id", None)),
    )


def _first(*values):
    return next((v for v in values if v is not None), None)


def _make_bias_optional(model: ir.Model, token_input: str = INPUT_IDS) -> None:
    """attention_bias gets a default, zeros broadcast over everything, so a runtime that does
    not know the input (ONNX Runtime GenAI, trimrt's plain generation) need not feed it. The
    exporter reads sizes off the bias (Shape nodes), so its uses get it expanded to the full
    [batch, 1, new, total] first: any broadcastable bias then means the same."""
    graph = model.graph
    bias = next(v for v in graph.inputs if v.name == ATTENTION_BIAS)
    uses = list(bias.uses())
    tokens, mask = (next(v for v in graph.inputs if v.name == n) for n in (token_input, ATTENTION_MASK))
    one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))}, num_outputs=1)
    pieces = [ir.node("Shape", [tokens], attributes={"end": 1}), one,
              ir.node("Shape", [tokens], attributes={"start": 1, "end": 2}), ir.node("Shape", [mask], attributes={"start": 1})]
    full = ir.node("Concat", [p.outputs[0] for p in pieces], attributes={"axis": 0})
    expand = ir.node("Expand", [bias, full.outputs[0]], name="attention_bias_expand")
    for i, node in enumerate([*pieces, full, expand]):  # named: later passes name unnamed values val_N too
        node.name = node.name or f"attention_bias_{i}"
        node.outputs[0].name = f"{node.name}_out"
    graph.insert_before(graph[0], [*pieces, full, expand])
    for use in uses:
        use.node.replace_input_with(use.idx, expand.outputs[0])
    bias.shape = ir.Shape(list(_BIAS_DIMS))
    bias.const_value = ir.tensor(np.zeros((1, 1, 1, 1), np.float32), name=ATTENTION_BIAS)
    graph.register_initializer(bias)


def spec_from_graph(model: ir.Model, folder: Path | None = None) -> DecoderSpec | None:
    """The decoder spec of an ONNX decoder that already has past key/value inputs (None if it
    has none): geometry from the past inputs' static dims and the logits' vocabulary axis, or,
    where those are symbolic, from an ONNX Runtime GenAI `genai_config.json` beside the model
    (which also gives the special tokens and the context length)."""
    from ..runtime.kv_cache import past_layers

    inputs = {v.name: v for v in model.graph.inputs}
    layers = past_layers(inputs)
    if not layers:
        return None
    if INPUTS_EMBEDS in inputs and INPUT_IDS not in inputs:
        raise ModelLoadError("the decoder takes inputs_embeds: generating needs its embedding model too, which an ONNX "
                             "file does not carry; compile the PyTorch model (a checkpoint folder or a factory) with "
                             '[decoder] token_input = "inputs_embeds", or export the decoder with input_ids')
    missing = [n for n in (INPUT_IDS, ATTENTION_MASK) if n not in inputs]
    if missing:
        raise ModelLoadError(f"the decoder has past_key_values inputs but no {missing}; trimrt generates with "
                             "ONNX Runtime GenAI's input names (input_ids, attention_mask, position_ids)")
    shape = inputs[past_name(0, "key")].shape
    logits = next((v for v in model.graph.outputs if v.name == LOGITS), None)
    dims = [shape[1] if shape else None, shape[3] if shape else None,
            logits.shape[-1] if logits is not None and logits.shape else None]
    config = _genai_config(folder)
    fill = [config.get("decoder", {}).get("num_key_value_heads"), config.get("decoder", {}).get("head_size"),
            config.get("vocab_size")]
    dims = [d if isinstance(d, int) else f for d, f in zip(dims, fill)]
    if not all(isinstance(d, int) for d in dims):
        raise ModelLoadError("the decoder's past_key_values inputs need static head counts and head sizes, and a "
                             "'logits' output with a static vocabulary axis (or a genai_config.json beside the model "
                             "that gives them); re-export it with those axes fixed")
    eos = config.get("eos_token_id")
    return DecoderSpec(layers=layers, kv_heads=dims[0], head_dim=dims[1], vocab_size=dims[2],
                       max_positions=config.get("context_length"),
                       eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                       pad_token_id=config.get("pad_token_id"), bos_token_id=config.get("bos_token_id"),
                       position_input=POSITION_IDS in inputs)


def _genai_config(folder: Path | None) -> dict:
    """The "model" section of an ONNX Runtime GenAI genai_config.json in `folder` ({} if none)."""
    path = folder / "genai_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("model") or {}
    except (ValueError, AttributeError):
        raise ModelLoadError(f"{path} is not a valid genai_config.json; fix or remove it") from None
