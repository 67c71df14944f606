"""OpenVINO GenAI as a peer of the decoder generation benchmark (benchmarks/decoder_generation.py).

The same random-weight LLaMA that decoder_generation.py measures, read from the local checkpoint
folder `genai_engines` writes (`<out>/hf`: config.json, safetensors, a WordLevel tokenizer),
converted to OpenVINO IR in fp32 and INT4 and run by `openvino_genai.LLMPipeline` on CPU.

Conversion path, and why. optimum-intel (`optimum-cli export openvino`), the exporter OpenVINO
documents, is not used: optimum-intel 2.2.0 requires transformers<5.6 and torchvision, so
`pip install optimum-intel` would replace transformers 5.24.0 by 5.5.4 and torch 2.13.0+cpu by
2.14.1 (a CUDA build) in the project's environment (`pip install --dry-run` in a throwaway venv
showed both). What it does for a LLaMA is done here with openvino, openvino-genai,
openvino-tokenizers and nncf alone (they install without touching torch, transformers, onnx,
onnxruntime, onnxscript or numpy), following optimum-intel's stateful export
(optimum/exporters/openvino/stateful.py):

1. the Hugging Face model loaded from the checkpoint is wrapped so that its inputs are
   input_ids, attention_mask (2-D, past + new), position_ids and flat past key/value tensors
   (`past_key_values.{i}.key/value`) and its outputs logits and `present.{i}.key/value`; the
   wrapper builds the causal mask itself (4-D boolean, which transformers takes as given), so no
   mask shortcut of the tracing shapes is baked in; `openvino.convert_model` traces it (PyTorch
   frontend, TorchScript) with dynamic batch and lengths;
2. a `beam_idx` input gathers every past key/value along the batch, then
   `openvino._offline_transformations.apply_make_stateful_transformation` turns the cache
   inputs/outputs into model state (ReadValue/Assign), initialised to empty;
3. saved uncompressed (fp32 weights, `compress_to_fp16=False`) with the checkpoint's
   config.json / generation_config.json and the tokenizer converted by
   `openvino_tokenizers.convert_tokenizer` (LLMPipeline can also run without it, on token ids);
4. INT4: `nncf.compress_weights` of the fp32 IR with optimum-intel's default 4-bit weight config
   (`_DEFAULT_4BIT_WQ_CONFIG`: bits 4, asymmetric, group size 128, ratio 1.0, all_layers unset),
   i.e. mode INT4_ASYM, data-free (no AWQ, scale estimation or GPTQ): every linear layer's
   weights int4 in groups of 128, the embedding and the LM head int8 asymmetric per channel
   (NNCF's backup mode). Weight-only: activations stay fp32 in the graph, and the CPU plugin's
   default dynamic quantization of activations for compressed-weight MatMuls (groups of 32, int8)
   stays on, as ONNX Runtime GenAI's INT4 runs with accuracy level 4.

The pipelines run with OpenVINO GenAI's default attention backend on CPU, paged attention (its continuous
batching scheduler over the stateful model, which it converts itself), with the scheduler settings
LLMPipeline gives it by default (get_latency_oriented_scheduler_config: prompt not split into chunks)
except prefix caching, which LLMPipeline turns on by default and which is turned off here: the
benchmark feeds the same prompt every round, and a cached prefix would leave only the last prompt
token to compute (fp32, 128-token prompt: 61 ms to the first token cached, several hundred without).
CPU properties: INFERENCE_NUM_THREADS=threads,
ENABLE_HYPER_THREADING=False, ENABLE_CPU_PINNING=False (the other engines in the process do not
pin either), INFERENCE_PRECISION_HINT=f32 (bf16 would be the default on CPUs with bf16) and
KV_CACHE_PRECISION=f32 (u8 is the x86 default; the benchmark keeps every engine's cache in fp32).

    python benchmarks/openvino_peer.py [--prompt 128] [--new 64] [--rounds 3] [--threads 2] [--out builds/bench_generation]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import numpy as np

# optimum-intel's default 4-bit weight compression (optimum/intel/openvino/configuration.py)
INT4 = {"mode": "INT4_ASYM", "group_size": 128, "ratio": 1.0}


def save_checkpoint(model, ckpt: Path) -> None:
    """`model` saved as `genai_engines` (decoder_generation.py) saves it: weights, config and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(ckpt)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(model.config.vocab_size)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "eos_token": "w0", "unk_token": "w2"}))


def _stateful_ir(ckpt: Path):
    """The checkpoint's causal LM as a stateful OpenVINO model (KV cache as state, `beam_idx` input)."""
    import inspect

    import openvino as ov
    import torch
    import transformers as tf
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x

    class Export(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = tf.DynamicCache(config=self.lm.config)
            for i, layer in enumerate(cache.layers):  # set the past directly: update() on an empty layer traces a rank-1 constant
                layer.lazy_initialization(past[2 * i], past[2 * i + 1])
                layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            new, total = input_ids.shape[1], attention_mask.shape[1]
            rows = torch.arange(new)[:, None] + (total - new)
            mask = (torch.arange(total)[None, :] <= rows)[None, None] & attention_mask[:, None, None, :].bool()
            out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                          **{cache_arg: cache})
            return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])

    past_len, new = 3, 4  # traced with a past and several new tokens: no length-1 shortcut
    example = (torch.randint(2, config.vocab_size, (1, new)), torch.ones(1, past_len + new, dtype=torch.int64),
               torch.arange(past_len, past_len + new)[None],
               *[torch.zeros(1, kv_heads, past_len, head_dim) for _ in range(2 * layers)])
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    shapes = [([-1, -1], ov.Type.i64)] * 3 + [([-1, kv_heads, -1, head_dim], ov.Type.f32)] * (2 * layers)
    with torch.no_grad():
        ir = ov.convert_model(Export(model), example_input=example, input=[(ov.PartialShape(s), t) for s, t in shapes])
    for port, name in zip(ir.inputs, ["input_ids", "attention_mask", "position_ids", *past_names]):
        port.get_tensor().set_names({name})
    for port, name in zip(ir.outputs, ["logits", *present_names]):
        port.get_tensor().set_names({name})

    # optimum-intel's fuse_cache_reorder: beam_idx gathers the past along the batch
    beam_idx = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([-1]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    ir.add_parameters([beam_idx])
    for name in past_names:
        port = ir.input(name)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    ir.validate_nodes_and_infer_types()
    # make_stateful + build_state_initializer: the cache becomes state, initialised to [batch, heads, 0, head_dim]
    apply_make_stateful_transformation(ir, dict(zip(past_names, present_names)))
    batch = opset13.gather(opset13.shape_of(ir.input("input_ids"), output_type="i64"), opset13.constant([0]),
                           opset13.constant(0))
    for op in ir.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [d.min_length for d in op.get_output_partial_shape(0)]
            dims[0] = batch
            dims = [opset13.constant(np.array([d], np.int64)) if isinstance(d, int) else d for d in dims]
            zero = opset13.constant(0.0, dtype=op.get_output_element_type(0))
            op.set_arguments([opset13.broadcast(zero, opset13.concat(dims, axis=0))])
    ir.validate_nodes_and_infer_types()
    return ir


def _build(ckpt: Path, out: Path) -> dict[str, Path]:
    """{precision: folder} of the fp32 and INT4 OpenVINO GenAI models of `ckpt` under `out` (built once)."""
    import openvino as ov

    folders = {precision: out / f"openvino_{precision}" for precision in ("fp32", "int4")}
    files = [f for f in ("config.json", "generation_config.json") if (ckpt / f).is_file()]
    if not (folders["fp32"] / "openvino_model.xml").is_file():
        print("building OpenVINO GenAI fp32 ...", flush=True)
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer

        tmp = folders["fp32"].with_name(folders["fp32"].name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ov.save_model(_stateful_ir(ckpt), tmp / "openvino_model.xml", compress_to_fp16=False)
        tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(ckpt), with_detokenizer=True)
        ov.save_model(tokenizer, tmp / "openvino_tokenizer.xml")
        ov.save_model(detokenizer, tmp / "openvino_detokenizer.xml")
        for f in files:
            shutil.copy(ckpt / f, tmp / f)
        tmp.rename(folders["fp32"])
    if not (folders["int4"] / "openvino_model.xml").is_file():
        print("building OpenVINO GenAI int4 ...", flush=True)
        import nncf

        tmp = folders["int4"].with_name(folders["int4"].name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ir = ov.Core().read_model(folders["fp32"] / "openvino_model.xml")
        ir = nncf.compress_weights(ir, mode=nncf.CompressWeightsMode[INT4["mode"]], group_size=INT4["group_size"],
                                   ratio=INT4["ratio"])
        ov.save_model(ir, tmp / "openvino_model.xml", compress_to_fp16=False)
        for f in [*files, "openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
                  "openvino_detokenizer.bin"]:
            if (folders["fp32"] / f).is_file():
                shutil.copy(folders["fp32"] / f, tmp / f)
        tmp.rename(folders["int4"])
    return folders


def openvino_genai_engines(ckpt: Path, out: Path, threads: int) -> dict[str, object]:
    """{"openvino-genai fp32": LLMPipeline, "openvino-genai int4": LLMPipeline} on CPU with `threads` inference
    threads, built from the Hugging Face checkpoint folder `ckpt` into `out/openvino_{fp32,int4}` (reused when
    there); or {} with the reason printed when openvino-genai is not installed or the conversion fails."""
    try:
        import openvino_genai
    except ImportError:
        print("OpenVINO GenAI: not installed (pip install openvino-genai openvino-tokenizers nncf); its rows are skipped")
        return {}
    try:
        folders = _build(Path(ckpt), Path(out))
    except Exception as e:  # noqa: BLE001 - the benchmark goes on without this peer
        print(f"OpenVINO GenAI: conversion failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}); "
              "its rows are skipped")
        return {}
    engines = {}
    for precision, folder in folders.items():
        scheduler = openvino_genai.SchedulerConfig()  # LLMPipeline's default for paged attention, less prefix caching
        scheduler.max_num_batched_tokens = 2**63 - 1
        scheduler.enable_prefix_caching = False
        properties = {"scheduler_config": scheduler, "INFERENCE_NUM_THREADS": threads, "ENABLE_HYPER_THREADING": False,
                      "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
        engines[f"openvino-genai {precision}"] = openvino_genai.LLMPipeline(str(folder), "CPU", **properties)
    return engines


def openvino_genai_times(pipe, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s, tokens) of one greedy generation of exactly `new` tokens from the
    token ids `prompt` (fed as an int64 tensor, no tokenizer; EOS ignored). Both times are OpenVINO GenAI's own
    perf_metrics: get_ttft() (ms, to s) and 1000 / get_tpot() (its mean time per output token after the first, ms)."""
    import openvino as ov
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = new
    config.ignore_eos = True
    config.do_sample = False
    result = pipe.generate(ov.Tensor(np.array([prompt], np.int64)), config)
    metrics = result.perf_metrics
    return metrics.get_ttft().mean / 1e3, 1e3 / metrics.get_tpot().mean, [int(t) for t in result.tokens[0]]


def main() -> None:
    import torch
    from decoder_generation import hf_times, make_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_generation"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = make_model(args)
    ckpt = args.out / "hf"
    if not (ckpt / "config.json").is_file():
        save_checkpoint(model, ckpt)
    engines = openvino_genai_engines(ckpt, args.out, args.threads)
    prompt = np.random.default_rng(0).integers(2, 32000, args.prompt).tolist()
    results = {name: [] for name in [*engines, "pytorch"]}
    tokens = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, pipe in engines.items():
            first, rate, tokens[name] = openvino_genai_times(pipe, prompt, args.new)
            results[name].append((first, rate))
        first, rate, tokens["pytorch"] = hf_times(model, prompt, args.new, args.threads)
        results["pytorch"].append((first, rate))
    print(f"\nprompt {args.prompt} tokens, {args.new} new tokens, {args.threads} threads, median of {args.rounds} rounds")
    print("| engine | time to first token | decode tokens/s | tokens equal to Hugging Face greedy |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        first = statistics.median(f for f, _ in rows[1:])
        rate = statistics.median(r for _, r in rows[1:])
        agree = sum(a == b for a, b in zip(tokens[name], tokens["pytorch"]))
        prefix = next((i for i, (a, b) in enumerate(zip(tokens[name], tokens["pytorch"])) if a != b), len(tokens[name]))
        label = "Hugging Face generate (PyTorch)" if name == "pytorch" else name
        print(f"| {label} | {first * 1e3:.0f} ms | {rate:.1f} | {agree}/{len(tokens[name])} (first {prefix} identical) |")


if __name__ == "__main__":
    main()
