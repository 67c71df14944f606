"""Token pruning on the DeiT-S-geometry ViT: speed and fidelity of trimrt builds.

Exports the in-tree ViT (12 blocks, width 384, 6 heads, 197 tokens; random weights),
compiles it with each recipe, verifies every build against the PyTorch model, and
times each build against the unmodified export on ONNX Runtime CPU: same process,
same threads, alternating rounds after warm-up, medians (see trimrt.bench).

    python benchmarks/vit_token_pruning.py                 # the table in docs/results.md
    python benchmarks/vit_token_pruning.py --rounds 60 --batches 1 8 16

Prints a Markdown table and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import trimrt
from trimrt.bench import bench_build

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "examples" / "recipes"
FACTORY = "examples.models.vit:deit_small"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["deit_s_keep10", "deit_s_keep07", "deit_s_keep05"],
                    help="recipe names from examples/recipes")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16, help="random images for the fidelity check")
    ap.add_argument("--out", type=Path, default=Path("builds/bench_vit"))
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    baseline = args.out / "deit_s.onnx"
    print(f"exporting {FACTORY} → {baseline}", flush=True)
    trimrt.export(FACTORY, baseline)
    rows = []
    for name in args.recipes:
        build = args.out / name
        manifest = trimrt.compile(str(baseline), RECIPES / f"{name}.toml", build)
        tp = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_pruning")
        fidelity = trimrt.verify(build, FACTORY, samples=args.samples).outputs[0]
        row = {"recipe": name, "tokens": [tp["tokens_before"]] + [x["tokens_out"] for x in tp["layers"]],
               "flops_ratio": manifest["flops"]["ratio"], "cosine": fidelity.cosine_mean, "top1": fidelity.top1,
               "max_abs": fidelity.max_abs, "speed": {}}
        for batch in args.batches:
            r = bench_build(build, baseline, batch=batch, threads=args.threads, rounds=args.rounds, warmup=args.warmup)
            row["speed"][batch] = r.to_dict()
            print(f"{name} batch {batch}: {r.baseline_ms:.1f} → {r.build_ms:.1f} ms, {r.speedup:.2f}× "
                  f"(ideal {r.flops_ratio:.2f}×)", flush=True)
        rows.append(row)

    env = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "threads": args.threads, "rounds": args.rounds}
    (args.out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print()
    print(markdown(rows, args.batches))


def markdown(rows: list[dict], batches: list[int]) -> str:
    head = ["recipe", "tokens per stage", "FLOPs ratio (ideal)"]
    for b in batches:
        head += [f"batch {b}: baseline → build ms", f"batch {b} speedup", f"b{b} measured/ideal"]
    head += ["cosine vs PyTorch", "top-1 agreement", "max abs err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["recipe"], " → ".join(map(str, r["tokens"])), f"{r['flops_ratio']:.2f}×"]
        for b in batches:
            s = r["speed"][b]
            cells += [f"{s['baseline_ms']:.1f} → {s['build_ms']:.1f}", f"**{s['speedup']:.2f}×**", f"{100 * s['efficiency']:.0f}%"]
        cells += [f"{r['cosine']:.4f}", f"{r['top1']:.2f}", f"{r['max_abs']:.2g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
