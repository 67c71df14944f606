"""Mixture-of-Depths routing vs token pruning at equal FLOPs on the real all-MiniLM-L6-v2.

The question of the MoD issue for encoders: routing keeps every token (a skipped token
keeps its state and reaches the output), pruning drops them; with the same training-free
score (the CLS attention row of the block before), at the same FLOPs, which keeps the
sentence embedding closer to the original? Mean-pooled embedders are where pruning hurts
most (every dropped token is a term missing from the mean).

Rows: `[mixture_of_depths]` with p-MoD's shifted-cosine schedule (default and shifted to a
mean share) and explicit per-block ratios; `[token_pruning]` EViT (CLS attention, no
fusion) at blocks and keeps of similar FLOPs. For each, against the unmodified export in
one process (the helpers of benchmarks/minilm_token_pruning.py): the FLOPs ratio at 256
tokens (the ideal), the measured speedup at 256 real tokens, batch 1 (alternating,
medians, spinning off), embedding cosine on --passages real passages (mean, 5th
percentile) and retrieval top-1 agreement over --queries queries. Pareto: no other row
has both more FLOPs saved and a higher mean cosine.

    python benchmarks/minilm_mod.py [--passages 100] [--queries 30] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the corpus and model: examples.models

import minilm_token_pruning as mt  # noqa: E402

ROUTINGS = {  # label -> [mixture_of_depths] table
    "p-MoD schedule (ratios 1, 1, .65, .35, .15, .15)": {},
    "p-MoD schedule, mean_ratio 0.8": {"mean_ratio": 0.8},
    "ratios 1, .5, 1, 1, 1, 1": {"ratios": [1, .5, 1, 1, 1, 1]},
    "ratios 1, .5, .5, 1, 1, 1": {"ratios": [1, .5, .5, 1, 1, 1]},
    "ratios 1, .3, .3, .3, 1, 1": {"ratios": [1, .3, .3, .3, 1, 1]},
    "ratios 1, 1, 1, 1, .5, 1": {"ratios": [1, 1, 1, 1, .5, 1]},
}
PRUNINGS = [([4], 0.5), ([3], 0.5), ([2], 0.5), ([1], 0.5), ([1], 0.3)]  # EViT (layers, keep), no fusion


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=100)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_minilm_mod"))
    args = ap.parse_args()

    import trimrt
    from examples.models import corpus
    from trimrt.errors import TrimrtError

    started = time.perf_counter()
    try:
        baseline_path, tokenizer = mt.export_minilm(args.out)
    except TrimrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passages = corpus.passages(tokenizer, 256, args.passages)
    query_ids = [np.asarray(tokenizer(q)["input_ids"], dtype=np.int64) for q in corpus.queries(args.queries)]
    timing = [corpus.feeds(p.input_ids) for p in passages[:: max(1, len(passages) // 4)][:4]]
    base = mt.backend(baseline_path, args.threads)
    base_emb = {"passages": {256: mt.embed_passages(base, passages)}, "queries": mt.embed_queries(base, query_ids)}
    base_flops = mt.flops(baseline_path, timing[0])
    recipes = {f"MoD: {label}": {"mixture_of_depths": table} for label, table in ROUTINGS.items()}
    recipes.update({f"pruning: EViT at block {layers[0]}, keep {keep}": mt.recipe_dict(layers, keep, fuse=False)
                    for layers, keep in PRUNINGS})
    rows = []
    for i, (label, recipe) in enumerate(recipes.items()):
        build = args.out / f"build_{i}"
        trimrt.compile(str(baseline_path), recipe, build)
        session = mt.backend(build / "model.onnx", args.threads)
        emb = {"passages": {256: mt.embed_passages(session, passages)}, "queries": mt.embed_queries(session, query_ids)}
        row = {"recipe": label, "flops_ratio_256": base_flops / mt.flops(build / "model.onnx", timing[0]),
               "fidelity": {256: mt.fidelity(base_emb, emb, 256)},
               "speed": {256: mt.speed(base, session, timing, warmup=3, rounds=args.rounds)}}
        rows.append(row)
        f = row["fidelity"][256]
        print(f"[{time.perf_counter() - started:4.0f}s] {label}: FLOPs {row['flops_ratio_256']:.2f}×, "
              f"{row['speed'][256]['speedup']:.2f}×, cosine {f['cosine_mean']:.4f}", flush=True)
    front = mt.pareto(rows)
    print(f"\n{args.passages} passages of 256 tokens, {args.queries} queries, batch 1, {args.threads} threads\n")
    print("| recipe | FLOPs ratio (ideal) | measured speedup | mean cosine | p5 cosine | top-1 agreement | Pareto |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: r["flops_ratio_256"]):
        f = row["fidelity"][256]
        print(f"| {row['recipe']} | {row['flops_ratio_256']:.2f}× | {row['speed'][256]['speedup']:.2f}× | "
              f"{f['cosine_mean']:.4f} | {f['cosine_p5']:.4f} | {f['top1']:.0%} | "
              f"{'yes' if row['recipe'] in front else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
