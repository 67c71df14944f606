"""Mixture-of-Depths routing in generation: p-MoD's schedule on a LLaVA-like prompt's 576 image tokens.

The prompt and model are those of benchmarks/decoder_fastv.py (35 prefix tokens, 576 image
tokens, 60 text tokens; a random LLaMA of about 150 M parameters: width 768, 12 layers,
GQA 12/4), compiled with a KV cache in fp32. Builds, each timed against the dense build
by trimrt's generation loop on ONNX Runtime CPU, engines taking turns round by round after
a warm-up round (medians):

- `[mixture_of_depths]` with p-MoD's progressive ratio decay (shifted cosine, dense above
  0.85, floor 0.15; at 12 layers: blocks 0-2 dense, then 0.83 down to 0.15, mean 0.54) and
  the training-free attention router, routing the image span at prefill; a routed block
  caches its routed tokens only;
- FastV (keep 25% of the image span after layer 2) for comparison.

Reported: the prefill FLOPs ratio (trimrt.compiler.flops on the prompt: the ideal, next
to p-MoD's published 55.6% of the dense TFLOPs, i.e. 1.80×), the measured time-to-first-
token speedup and its share of the ideal, the decode speed, and the KV cache at the end
(p-MoD: 53.8% of the dense cache). The MoD build's tokens are checked against p-MoD
routing written in PyTorch (tests/families/mod_reference.py). Random weights: speed and
memory only (fidelity is measured on trained models elsewhere).

    python benchmarks/decoder_mod.py [--new 32] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from decoder_fastv import IMAGE, PREFIX, TEXT
from decoder_generation import compiled_generators, make_model

from trimrt.compiler.flops import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.families
from tests.families.mod_reference import mod_generate  # noqa: E402

SPAN = [PREFIX, PREFIX + IMAGE]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=32, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_mod_decoder"))
    args = ap.parse_args()

    model = make_model(args)
    prompt = np.random.default_rng(0).integers(2, 32000, PREFIX + IMAGE + TEXT).tolist()
    recipes = {"dense": None, "p-MoD schedule": {"mixture_of_depths": {"prunable": SPAN}},
               "FastV keep 0.25 at layer 2": {"token_pruning": {"method": "last_token_attention", "layers": [2],
                                                                "keep": 0.25, "prunable": SPAN}}}
    print(f"LLaMA {args.layers} layers, width {args.width}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"parameters; prompt {len(prompt)} tokens ({IMAGE} image tokens), {args.new} new tokens, "
          f"{args.threads} threads", flush=True)
    generators = compiled_generators(model, recipes, args.out, args.threads)
    prefill = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
               "position_ids": np.arange(len(prompt))[None], **generators["dense"].spec.empty_cache(1)}

    def model_flops(name: str) -> int:
        return count_flops(onnx.load(str(args.out / name.replace(" + ", "_").replace(" ", "_") / "model.onnx")),
                           prefill)

    dense_flops = model_flops("dense")
    flops = {name: dense_flops / model_flops(name) for name in recipes}
    from trimrt.recipe import load_recipe

    ratios = load_recipe(recipes["p-MoD schedule"]).mixture_of_depths.block_ratios(args.layers)
    print("p-MoD ratios per layer: " + ", ".join(f"{r:.2f}" for r in ratios) + f" (mean {np.mean(ratios):.3f})")
    with torch.no_grad():
        reference, _, _ = mod_generate(model, torch.tensor([prompt]), ratios, tuple(SPAN), args.new)
    results = {name: [] for name in generators}
    tokens, cache = {}, {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, gen in generators.items():
            out = gen.generate(prompt, max_new_tokens=args.new)
            tokens[name], cache[name] = out.tokens, out.stats.kv_cache_bytes
            results[name].append((out.stats.time_to_first_token_s, out.stats.decode_tokens_per_s))
    print(f"\nMoD build's tokens equal p-MoD routing in PyTorch: {tokens['p-MoD schedule'] == reference[0]}")
    first_dense = statistics.median(f for f, _ in results["dense"][1:])
    rate_dense = statistics.median(r for _, r in results["dense"][1:])
    print("\n| build | prefill FLOPs ratio (ideal) | time to first token | TTFT speedup (share of ideal) | "
          "decode tokens/s | decode speedup | KV cache at the end (share of dense) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        first = statistics.median(f for f, _ in rows[1:])
        rate = statistics.median(r for _, r in rows[1:])
        speedup = first_dense / first
        print(f"| {name} | {flops[name]:.2f}× ({100 / flops[name]:.1f}% of the FLOPs) | {first * 1e3:.0f} ms | "
              f"{speedup:.2f}× ({100 * speedup / flops[name]:.0f}%) | {rate:.1f} | {rate / rate_dense:.2f}× | "
              f"{cache[name] / 2**20:.1f} MiB ({100 * cache[name] / cache['dense']:.1f}%) |")


if __name__ == "__main__":
    main()
