"""Mixture-of-Depths routing in generation: p-MoD's schedule on a LLaVA-like prompt's 576 image tokens.

The prompt and model are those of benchmarks/decoder_fastv.py (35 prefix tokens, 576 image
tokens, 60 text tokens; a random LLaMA of about 150 M parameters: width 768, 12 layers,
GQA 12/4), compiled with a KV cache in fp32. Builds, each timed against the dense build
by trimrt's generation loop on ONNX Runtime CPU, engines taking turns round by round after
a warm-up round, each round starting one build later (speedups: medians of each round's
ratio to its baseline's run):

- `[mixture_of_depths]` with p-MoD's progressive ratio decay (shifted cosine, dense above
  0.85, floor 0.15; at 12 layers: blocks 0-2 dense, then 0.83 down to 0.15, mean 0.54) and
  the training-free attention router, routing the image span at prefill; a routed block
  caches its routed tokens only;
- FastV (keep 25% of the image span after layer 2) for comparison;
- the same model with p-MoD routers in the schedule's routed layers (examples/models/pmod.py,
  random router weights), exported dense and routed by its own routers (`router =
  "model"`), timed against its own dense build.

Reported: the prefill FLOPs ratio (trimrt.compiler.flops on the prompt: the ideal, next
to p-MoD's published 55.6% of the dense TFLOPs, i.e. 1.80×), the measured time-to-first-
token speedup and its share of the ideal, the decode speed, and the KV cache at the end
(p-MoD: 53.8% of the dense cache). The MoD build's tokens are checked against p-MoD
routing written in PyTorch (tests/families/mod_reference.py), with either router. Random weights: speed and
memory only (fidelity is measured on trained models elsewhere).

    python benchmarks/decoder_mod.py [--new 32] [--rounds 5] [--threads 2] [--reuse-builds]
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
from examples.models.pmod import with_mod_routers  # noqa: E402
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
    ap.add_argument("--reuse-builds", action="store_true",
                    help="time the builds already in --out (made by this code) instead of compiling them again")
    args = ap.parse_args()

    model = make_model(args)
    prompt = np.random.default_rng(0).integers(2, 32000, PREFIX + IMAGE + TEXT).tolist()
    recipes = {"dense": None, "p-MoD schedule": {"mixture_of_depths": {"prunable": SPAN}},
               "FastV keep 0.25 at layer 2": {"token_pruning": {"method": "last_token_attention", "layers": [2],
                                                                "keep": 0.25, "prunable": SPAN}}}
    print(f"LLaMA {args.layers} layers, width {args.width}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"parameters; prompt {len(prompt)} tokens ({IMAGE} image tokens), {args.new} new tokens, "
          f"{args.threads} threads", flush=True)
    from trimrt.recipe import load_recipe

    ratios = load_recipe(recipes["p-MoD schedule"]).mixture_of_depths.block_ratios(args.layers)
    pmod_model = with_mod_routers(make_model(args), [i for i, r in enumerate(ratios) if r < 1.0], tuple(SPAN))
    pmod_recipes = {"p-MoD model, dense": None,
                    "p-MoD model, its routers": {"mixture_of_depths": {"router": "model", "prunable": SPAN}}}
    baseline = {**{name: "dense" for name in recipes}, **{name: "p-MoD model, dense" for name in pmod_recipes}}
    generators = {**compiled_generators(model, recipes, args.out, args.threads, reuse=args.reuse_builds),
                  **compiled_generators(pmod_model, pmod_recipes, args.out, args.threads, reuse=args.reuse_builds)}
    prefill = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
               "position_ids": np.arange(len(prompt))[None], **generators["dense"].spec.empty_cache(1)}

    def model_flops(name: str) -> int:
        return count_flops(onnx.load(str(args.out / name.replace(" + ", "_").replace(" ", "_") / "model.onnx")),
                           prefill)

    flops = {name: model_flops(baseline[name]) / model_flops(name) for name in generators}
    print("p-MoD ratios per layer: " + ", ".join(f"{r:.2f}" for r in ratios) + f" (mean {np.mean(ratios):.3f})")
    with torch.no_grad():
        reference, _, _ = mod_generate(model, torch.tensor([prompt]), ratios, tuple(SPAN), args.new)
        by_routers, _, _ = mod_generate(pmod_model, torch.tensor([prompt]), ratios, tuple(SPAN), args.new,
                                        router="model")
    results = {name: [] for name in generators}
    tokens, cache = {}, {}
    names = list(generators)
    for turn in range(args.rounds + 1):  # the first round warms up; each round starts one build later
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            out = generators[name].generate(prompt, max_new_tokens=args.new)
            tokens[name], cache[name] = out.tokens, out.stats.kv_cache_bytes
            results[name].append((out.stats.time_to_first_token_s, out.stats.decode_tokens_per_s))
    print(f"\nMoD builds' tokens equal p-MoD routing in PyTorch: attention router "
          f"{tokens['p-MoD schedule'] == reference[0]}, the model's routers "
          f"{tokens['p-MoD model, its routers'] == by_routers[0]}")

    def median(name: str, column: int) -> float:
        return statistics.median(row[column] for row in results[name][1:])

    def paired(name: str, base: str, column: int) -> float:
        """Median over rounds of the ratio to the baseline's run of the same round."""
        return statistics.median(b[column] / r[column] for r, b in zip(results[name][1:], results[base][1:]))

    print("\n| build | prefill FLOPs ratio (ideal) | time to first token | TTFT speedup (share of ideal) | "
          "decode tokens/s | decode speedup | KV cache at the end (share of dense) |")
    print("|---|---|---|---|---|---|---|")
    for name in results:
        first, rate, base = median(name, 0), median(name, 1), baseline[name]
        speedup = paired(name, base, 0)
        print(f"| {name} | {flops[name]:.2f}× ({100 / flops[name]:.1f}% of the FLOPs) | {first * 1e3:.0f} ms | "
              f"{speedup:.2f}× ({100 * speedup / flops[name]:.0f}%) | {rate:.1f} | {1 / paired(name, base, 1):.2f}× | "
              f"{cache[name] / 2**20:.1f} MiB ({100 * cache[name] / cache[base]:.1f}%) |")


if __name__ == "__main__":
    main()
