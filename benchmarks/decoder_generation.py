"""Generation speed of decoder builds: time to first token and decode tokens/s.

A LLaMA-architecture model large enough to be memory-bound at decode (random weights,
about 150 M parameters: width 768, 12 layers, GQA 12/4 heads, SwiGLU 3072, vocabulary
32000), compiled by trimrt with a KV cache in fp32, INT8 (weights and activations,
round to nearest) and INT4 (weight-only MatMulNBits, groups of 128), and run by trimrt's
generation loop on ONNX Runtime CPU; Hugging Face `generate()` on PyTorch CPU runs the
same model in the same process. Every variant generates the same greedy continuation
length from the same prompt; variants take turns round by round (ONNX Runtime spinning
off) and the table shows medians. Fidelity: share of the first 32 greedy tokens equal to
trimrt fp32's (random weights: a speed check, not a quality one).

    python benchmarks/decoder_generation.py [--prompt 128] [--new 64] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import trimrt

RECIPES = {
    "fp32": None,
    "int8": {"quantization": {"weights": "int8", "activations": "int8"}},
    "int4": {"quantization": {"weights": "int4", "group_size": 128}},
}


def make_model(args):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.width, intermediate_size=args.width * 4, num_hidden_layers=args.layers,
                            num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                            max_position_embeddings=2048, eos_token_id=0, bos_token_id=1)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits are not near-ties
        model.lm_head.weight.mul_(20)
    return model


def hf_times(model, prompt: list[int], new: int, threads: int) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s, tokens) of Hugging Face generate() on PyTorch."""
    torch.set_num_threads(threads)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
        first = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        whole = time.perf_counter() - started
    return first, (new - 1) / max(whole - first, 1e-9), out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_generation"))
    args = ap.parse_args()

    model = make_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA {args.layers} layers, width {args.width}: {params / 1e6:.0f} M parameters; prompt {args.prompt} "
          f"tokens, {args.new} new tokens, {args.threads} threads", flush=True)
    generators = {}
    for name, recipe in RECIPES.items():
        build = args.out / name
        if not (build / "manifest.json").is_file():
            print(f"compiling {name} ...", flush=True)
            trimrt.compile(model, recipe, build)
        session = trimrt.load(build, threads=args.threads, spinning=False)
        generators[name] = session.generator()
    prompt = np.random.default_rng(0).integers(2, 32000, args.prompt).tolist()
    results = {name: [] for name in [*generators, "pytorch"]}
    tokens = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, gen in generators.items():
            out = gen.generate(prompt, max_new_tokens=args.new)
            tokens[name] = out.tokens
            results[name].append((out.stats.time_to_first_token_s, out.stats.decode_tokens_per_s))
        first, rate, tokens["pytorch"] = hf_times(model, prompt, args.new, args.threads)
        results["pytorch"].append((first, rate))
    base_rate = statistics.median(r for _, r in results["fp32"][1:])
    print("\n| engine | time to first token | decode tokens/s | × trimrt fp32 decode | KV cache | greedy agreement |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        first = statistics.median(f for f, _ in rows[1:])
        rate = statistics.median(r for _, r in rows[1:])
        agree = np.mean([a == b for a, b in zip(tokens[name][:32], tokens["fp32"][:32])])
        label = "Hugging Face generate (PyTorch)" if name == "pytorch" else f"trimrt {name}"
        kv = 2 * args.layers * 4 * (args.width // 12) * (args.prompt + args.new - 1) * 4
        print(f"| {label} | {first * 1e3:.0f} ms | {rate:.1f} | {rate / base_rate:.2f}× | {kv / 2**20:.1f} MiB | "
              f"{agree:.2f} |")


if __name__ == "__main__":
    main()
