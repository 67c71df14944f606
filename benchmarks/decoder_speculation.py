"""Speculative decoding on CPU: prompt lookup and Token Recycling against plain greedy decoding.

The model is a LLaMA-architecture language model that benchmarks/decoder_quality.py trains
on the Python standard library's own source (reused when already trained): the decoders
here whose drafts can be right for a reason. `--size base` (the default: 8 layers, width
512, 28 M parameters, 111 MB of fp32 weights, which do not fit the CPU's caches, so a decode
step is weight-bound as in the decoders users deploy; about 30 min of training on 2 cores
the first time) or `--size small` (4 layers, width 256: its weights sit in the cache, a
step costs well under a millisecond and is mostly fixed cost, so wide trees lose; with it
the script also times one decode step of the 153 M-parameter LLaMA of
benchmarks/decoder_generation.py, random weights, at each tree size, and prints the speedup
those step costs would give: a projection, labelled so).

Prompts of two kinds, 96 tokens each: code (held-out files of the standard library) and
prose (NumPy's docstrings, which the model never saw: English with some code); 64 new
tokens each, greedy; every engine generates the same tokens in fp32 (counted: INT4's
MatMulNBits quantizes activations per row with a kernel that differs between one and
several rows, so near-ties can break the other way; the last column counts them), so the
rows differ in speed only. Per prompt, the engines take turns (plain decoding first, then
each speculation); the table of Token Recycling persists from prompt to prompt (hot start),
as it would in an application. Decode speed is tokens after the first per second (per
sequence); tokens per step counts what each verification forward added. Rows: fp32 and
INT4 builds, Token Recycling with draft trees of several sizes (the `tree_template` shape),
prompt lookup (Hugging Face's `prompt_lookup_num_tokens = 10`, n-grams of 3 down to 1), and
the same for batches of `--batch` prompts against plain batched decoding.

    python benchmarks/decoder_speculation.py [--size base|small] [--prompts 24] [--new 64] [--trees 2 4 8 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the corpus: examples.models

import trimrt  # noqa: E402
from trimrt.runtime.speculation import PromptLookup, TokenRecycling  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--builds", nargs="+", choices=["fp32", "int4"], default=["fp32", "int4"])
    ap.add_argument("--batch", type=int, default=4, help="also time batches of this many prompts (1: none)")
    ap.add_argument("--trees", type=int, nargs="+", default=[8, 16, 24, 40, 80], help="Token Recycling tree sizes")
    import decoder_quality as quality

    quality.add_model_arguments(ap, size="base")
    args = ap.parse_args()
    ckpt = quality.trained(args)
    from tokenizers import Tokenizer

    from examples.models import corpus

    code = [w[:96] for w in quality.held_out_windows(ckpt, args.prompts + 1, 96)]
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prose = [ids[:96] for ids in (tokenizer.encode(t).ids for t in corpus.other_source_texts(4 * args.prompts))
             if len(ids) >= 96][:args.prompts]
    warm, kinds = code[0], {"code": code[1:], "prose": prose}
    builds = {label: recipe for label, recipe in {"fp32": None, "int4": {"quantization": {"weights": "int4",
              "group_size": 32}}}.items() if label in args.builds}
    print(f"{len(code) - 1} code and {len(prose)} prose prompts of 96 tokens, {args.new} new tokens, "
          f"{args.threads} threads", flush=True)
    table = []
    for label, recipe in builds.items():
        build = args.out / f"speculation_{label}"
        if not (build / "manifest.json").is_file():
            print(f"compiling {label} ...", flush=True)
            trimrt.compile(str(ckpt), recipe, build)
        session = trimrt.load(build, threads=args.threads, spinning=False)
        vocab = session.generator().spec.vocab_size
        engines = {"plain": session.generator(), "prompt lookup": session.generator(speculation=PromptLookup())}
        for size in args.trees:
            engines[f"token recycling, tree {size}"] = session.generator(speculation=TokenRecycling(vocab,
                                                                                                     tree_size=size))
        for gen in engines.values():  # warm-up (and the first row of each table)
            gen.generate(warm, max_new_tokens=args.new)
        batched = {f"{kind}, batch {args.batch}": [prompts[i:i + args.batch] for i in range(0, len(prompts) -
                                                                                         args.batch + 1, args.batch)]
                   for kind, prompts in kinds.items()} if args.batch > 1 else {}
        for kind, units in {**kinds, **batched}.items():  # a unit: one prompt, or a batch of them
            rates = {name: [] for name in engines}
            per_step = {name: [] for name in engines}
            same = {name: 0 for name in engines}
            for unit in units:
                want = None
                for name, gen in engines.items():
                    out = gen.generate(unit, max_new_tokens=args.new)
                    tokens = [r.tokens for r in out] if isinstance(out, list) else out.tokens
                    want = want or tokens
                    same[name] += tokens == want
                    stats = out[0].stats if isinstance(out, list) else out.stats
                    rates[name].append(stats.decode_tokens_per_s)
                    per_step[name].append(stats.tokens_per_step)
            for name in engines:
                ratios = [a / b for a, b in zip(rates[name], rates["plain"])]
                table.append((label, kind, name, statistics.median(rates[name]), statistics.mean(per_step[name]),
                              statistics.median(ratios), min(ratios), max(ratios), f"{same[name]}/{len(units)}"))
                print(f"{label} {kind} {name}: {table[-1][3]:.1f} tokens/s, {table[-1][4]:.2f} tokens/step, "
                      f"{table[-1][5]:.2f}× plain", flush=True)
        recycled = engines[f"token recycling, tree {args.trees[0]}"].speculation
        print(f"token recycling table: {recycled.table.shape[0]} × {recycled.k} int32 = {recycled.nbytes / 2**10:.0f} KiB")
    costs = step_costs(args) if args.size == "small" else {}
    print("\n| build | prompts | decoding | decode tokens/s (median) | tokens per step (mean) | "
          "× plain, per prompt (median, range) | prompts with the tokens of plain decoding |")
    print("|---|---|---|---|---|---|---|")
    for label, kind, name, rate, steps, ratio, low, high, same in table:
        print(f"| {label} | {kind} | {name} | {rate:.1f} | {steps:.2f} | **{ratio:.2f}×** ({low:.2f}–{high:.2f}) | "
              f"{same} |")
    if not costs:
        return
    print("\n| 153 M LLaMA build | fed tokens (root + tree) | decode step, ms (median) | × one token | projected "
          "decode speedup, code / prose (tokens per step of the trained model's build ÷ step cost) |")
    print("|---|---|---|---|---|")
    for label, by_q in costs.items():
        one = by_q[1]
        for q, ms in by_q.items():
            name = "plain" if q == 1 else f"token recycling, tree {q - 1}"
            gains = [next(r[4] for r in table if r[0] == label and r[1] == kind and r[2] == name) * one / ms
                     for kind in ("code", "prose")]
            print(f"| {label} | {q} | {ms:.2f} | {ms / one:.2f}× | {gains[0]:.2f}× / {gains[1]:.2f}× |")


def step_costs(args) -> dict[str, dict[int, float]]:
    """{build: {tokens fed: ms}}: one decode step of the 153 M-parameter LLaMA on a past of 160
    tokens, the cache in place, a tree mask of each template size (the sizes taking turns;
    median of 20 rounds)."""
    import time

    from decoder_generation import make_model

    from trimrt.runtime.kv_cache import ATTENTION_BIAS, KVCache
    from trimrt.runtime.speculation import tree_template

    class Geometry:  # decoder_generation's defaults
        layers, width = 12, 768

    model, out = make_model(Geometry), Path("builds/bench_generation")
    costs = {}
    for label, recipe in {"fp32": None, "int4": {"quantization": {"weights": "int4", "group_size": 128}}}.items():
        build = out / f"speculation_{label}"
        if not (build / "manifest.json").is_file():
            print(f"compiling the 153 M LLaMA, {label} ...", flush=True)
            trimrt.compile(model, recipe, build)
        session = trimrt.load(build, threads=args.threads, spinning=False)
        spec = session.generator().spec
        rng = np.random.default_rng(0)
        cache, past = KVCache(spec, 1), 160
        session.run_with_cache({"input_ids": rng.integers(2, 32000, (1, past)), "attention_mask": np.ones((1, past),
                                np.int64), "position_ids": np.arange(past)[None]}, cache)
        steps = {}
        for size in [0, *args.trees]:
            tree = TokenRecycling(spec.vocab_size, template=tree_template(size)).draft([5]) if size else None
            q = size + 1
            feeds = {"input_ids": rng.integers(2, 32000, (1, q)), "attention_mask": np.ones((1, past + q), np.int64),
                     "position_ids": past + np.concatenate([[0], tree.depths if tree else []]).astype(np.int64)[None]}
            if tree is not None:
                feeds[ATTENTION_BIAS] = tree.bias(past + q)
            steps[q] = feeds
        times = {q: [] for q in steps}
        for round_ in range(23):  # the sizes take turns, so the machine's drift spreads over all of them
            for q, feeds in steps.items():
                started = time.perf_counter()
                session.run_with_cache(feeds, cache, check=False)
                times[q].append(time.perf_counter() - started)
                cache.length = past  # the step's tokens dropped: the next run writes the same slots
        costs[label] = {q: 1e3 * statistics.median(t[3:]) for q, t in times.items()}
        print(f"153 M {label}: " + ", ".join(f"{q} tokens {ms:.2f} ms" for q, ms in costs[label].items()), flush=True)
    return costs


if __name__ == "__main__":
    main()
