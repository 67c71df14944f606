"""Example 1: token pruning (EViT) and merging (ToMe) on a ViT, end to end on ONNX Runtime CPU.

    make demo          # or: python examples/01_vit_token_pruning.py

1. export the in-tree ViT with DeiT-S geometry (random weights) to ONNX,
2. compile it with recipes from examples/recipes/ (EViT keep 0.7 and 0.5, ToMe r = 13,
   EViT keep 0.7 + INT8 + ONNX Runtime fusion),
3. load the build and run it,
4. verify it against the PyTorch model,
5. time it against the unmodified export (alternating runs, medians),
and print one speed / fidelity table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import trimrt
from trimrt.bench import bench_build

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

HERE = Path(__file__).resolve().parent
FACTORY = "examples.models.vit:deit_small"  # returns (torch module, example inputs)
OUT = Path("builds/example_vit")


def main() -> int:
    console = Console(width=max(Console().width, 150))  # keep the table readable when piped
    OUT.mkdir(parents=True, exist_ok=True)
    baseline = OUT / "deit_s.onnx"
    console.log(f"exporting {FACTORY}")
    trimrt.export(FACTORY, baseline)

    table = Table(title="DeiT-S geometry ViT, ONNX Runtime CPU, 2 threads (medians of alternating runs)")
    for col in ("recipe", "tokens", "batch", "baseline ms", "build ms", "speedup", "FLOPs ratio", "cosine", "top-1", "max abs"):
        table.add_column(col, justify="right")
    for recipe in ("deit_s_keep07", "deit_s_keep05", "deit_s_tome_r13", "deit_s_keep07_int8"):
        build = OUT / recipe
        console.log(f"compiling with examples/recipes/{recipe}.toml")
        manifest = trimrt.compile(str(baseline), HERE / "recipes" / f"{recipe}.toml", build)

        session = trimrt.load(build)
        image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        logits = session.run({"pixel_values": image})["logits"]
        console.log(f"ran the build: logits {logits.shape}, class {int(logits.argmax())}")

        console.log("verifying against the PyTorch model")
        fid = trimrt.verify(build, FACTORY, samples=8).outputs[0]
        tp = next(p["report"] for p in manifest["passes"] if p["pass"] in ("token_pruning", "token_merging"))
        counts = [tp["tokens_before"]] + [x["tokens_out"] for x in tp["layers"]]
        tokens = "→".join(map(str, counts)) if len(counts) <= 5 else f"{counts[0]}→…→{counts[-1]}"
        for batch in (1, 8):
            console.log(f"timing batch {batch}")
            r = bench_build(build, baseline, batch=batch, threads=2, rounds=20)
            table.add_row(recipe, tokens, str(batch), f"{r.baseline_ms:.1f}", f"{r.build_ms:.1f}", f"{r.speedup:.2f}×",
                          f"{r.flops_ratio:.2f}×", f"{fid.cosine_mean:.4f}", f"{fid.top1:.2f}", f"{fid.max_abs:.2g}")
    console.print(table)
    console.print("Weights are random, so top-1 agreement is a fidelity check, not accuracy. "
                  "Full benchmarks: python benchmarks/vit_token_pruning.py, python benchmarks/token_reduction.py --model vit, "
                  "python benchmarks/vit_prune_int8.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
