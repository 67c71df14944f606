"""Block-sparse attention end to end on a high-resolution ViT, beside token pruning at equal FLOPs.

The model: the in-tree ViT at DeiT-S width (384, 6 heads of 64) on 1024 × 1024 images in
16-pixel patches, 64 × 64 = 4096 patches + CLS = 4097 tokens, 4 blocks, random weights
made to attend like a vision model: fixed 2-D sin-cos position embeddings (MAE's) and a
key projection equal to the query projection (scaled up), so a patch attends the patches
that resemble it, nearby ones most: attention with locality, not the near-uniform
attention of random weights. Attention is 64% of its FLOPs.

Builds (each timed against the plain export in one process, alternating rounds after
warm-up, medians; fidelity: cosine of the logits against the export on random images):
dense with ONNX Runtime's attention fusion (its fused MultiHeadAttention, the best dense
CPU path); block-sparse attention in every block at 25% and 12.5% block density (blocks
of 128 tokens, patches in tiles of 8 × 16), unrectified (the recipe's default) and
rectified, and in sequence order;
EViT token pruning in block 1 with `keep` chosen (bisection on the manifests' FLOPs) so its
FLOPs equal the first sparse build's.

    python benchmarks/vit_sparse_attention.py [--rounds 8] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import trimrt
from trimrt.bench import bench_build

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

from examples.models.vit import ViTConfig, vit_factory  # noqa: E402

GRID, PATCH, BLOCK = 64, 16, 128
CONFIG = ViTConfig(image_size=GRID * PATCH, patch_size=PATCH, depth=4)
FACTORY = "benchmarks.vit_sparse_attention:high_resolution_vit"


def high_resolution_vit(seed: int = 0, batch: int = 1):
    """The ViT of the docstring: 4097 tokens, attention by patch similarity with locality."""
    import torch

    model, example = vit_factory(CONFIG, seed=seed, batch=batch)
    width = CONFIG.width
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.from_numpy(_sincos_2d(GRID, width))
        for block in model.blocks:
            w, bias = block.attn.qkv.weight, block.attn.qkv.bias
            w[:width] *= 4.0
            w[width:2 * width] = w[:width]
            bias[width:2 * width] = bias[:width]
    return model, example


def _sincos_2d(grid: int, width: int) -> np.ndarray:
    """[grid², width] fixed 2-D sin-cos position embeddings (half the features for rows, half for columns)."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(pos.reshape(-1, 1) * freqs) for pos in (rows, cols) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def matched_pruning(baseline: Path, flops_ratio: float, out: Path, steps: int = 6) -> tuple[float, Path, dict]:
    """(keep, build, manifest) of EViT pruning in block 1 whose FLOPs ratio (the manifest's)
    is closest to `flops_ratio`: bisection on keep (the ratio falls as keep grows)."""
    low, high, best = 0.02, 1.0, None
    for step in range(steps):
        keep = round((low + high) / 2, 3)
        build = out / f"evit_{step}"
        manifest = trimrt.compile(str(baseline), evit(keep), build)
        ratio = manifest["flops"]["ratio"]
        if best is None or abs(ratio - flops_ratio) < abs(best[2]["flops"]["ratio"] - flops_ratio):
            best = (keep, build, manifest)
        low, high = (keep, high) if ratio > flops_ratio else (low, keep)
    return best


def evit(keep: float) -> dict:
    return {"token_pruning": {"method": "cls_attention", "layers": [1], "keep": keep}}


def recipes(densities: list[float]) -> dict[str, dict]:
    blocks = -(-CONFIG.num_tokens // BLOCK)
    out = {"dense, ORT attention fusion": {"onnxruntime": {"fuse": True}}}
    tiled = {"block_size": BLOCK, "order": "tiled", "grid": [GRID, GRID]}
    for density in densities:
        top_k = max(1, round(density * blocks))
        out[f"sparse {top_k}/{blocks} blocks, tiled"] = {"sparse_attention": {"top_k": top_k, **tiled}}
        out[f"sparse {top_k}/{blocks} blocks, tiled, rectified"] = {
            "sparse_attention": {"top_k": top_k, "rectify": True, **tiled}}
    top_k = max(1, round(densities[0] * blocks))
    out[f"sparse {top_k}/{blocks} blocks, sequence order"] = {"sparse_attention": {"top_k": top_k, "block_size": BLOCK}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4, help="random images for the fidelity check")
    ap.add_argument("--out", type=Path, default=Path("builds/bench_vit_sparse"))
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    baseline = args.out / "vit_4097.onnx"
    print(f"exporting {FACTORY} ({CONFIG.num_tokens} tokens) → {baseline}", flush=True)
    trimrt.export(FACTORY, baseline)
    rows = []
    builds = [(name, recipe, None) for name, recipe in recipes(args.density).items()]
    builds.append(("EViT in block 1, FLOPs of the first sparse build", None, None))
    for i, (name, recipe, _) in enumerate(builds):
        if recipe is None:  # token pruning at the FLOPs of the first sparse build
            target = next(r["flops_ratio"] for r in rows if "sparse_attention" in r["recipe"])
            keep, build, manifest = matched_pruning(baseline, target, args.out)
            name, recipe = f"EViT keep {keep} in block 1 (FLOPs of the first sparse build)", evit(keep)
        else:
            build = args.out / f"build{i}"
            manifest = trimrt.compile(str(baseline), recipe, build)
        fidelity = trimrt.verify(build, baseline, samples=args.samples).outputs[0]
        speed = bench_build(build, baseline, batch=1, threads=args.threads, rounds=args.rounds, warmup=args.warmup)
        rows.append({"build": name, "recipe": recipe, "flops_ratio": manifest["flops"]["ratio"],
                     "cosine": fidelity.cosine_mean, "top1": fidelity.top1, **speed.to_dict()})
        print(f"{name}: {speed.baseline_ms:.0f} → {speed.build_ms:.0f} ms, {speed.speedup:.2f}× (FLOPs "
              f"{manifest['flops']['ratio']:.2f}×), cosine {fidelity.cosine_mean:.4f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{CONFIG.num_tokens} tokens, {CONFIG.depth} blocks of width {CONFIG.width}, batch 1, {args.threads} threads; "
          f"speedup over the plain export (explicit softmax attention), medians of {args.rounds} alternating rounds\n")
    print("| build | FLOPs ratio (ideal) | plain → build ms | speedup | cosine of the logits | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['flops_ratio']:.2f}× | {r['baseline_ms']:.0f} → {r['build_ms']:.0f} | "
              f"**{r['speedup']:.2f}×** | {r['cosine']:.4f} | {r['top1']:.2f} |")


if __name__ == "__main__":
    main()
