"""FastV-style pruning of a 576-token image span in a LLaMA-like decoder prefill.

A LLaVA-like prompt: 35 system/prefix tokens, 576 image tokens, 60 text tokens (671 in
all). The recipe keeps 25% of the image span at layer 2, scored by the last token's
attention row (FastV); everything outside the span is kept; position ids stay the
originals (checked here against a PyTorch FastV reference). Random weights, LLaMA
architecture (RoPE, RMSNorm, SwiGLU, grouped-query attention), 16 layers of width 512.
Timed against the unmodified export on ONNX Runtime CPU: alternating rounds, medians.

    python benchmarks/decoder_fastv.py [--rounds 10] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import trimrt
from trimrt.bench import bench_build
from trimrt.compiler.flops import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.families
from tests.families.fastv_reference import fastv_forward  # noqa: E402

PREFIX, IMAGE, TEXT = 35, 576, 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--prune-layer", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_decoder"))
    args = ap.parse_args()

    import onnx
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.width, intermediate_size=args.width * 11 // 4, num_hidden_layers=args.layers,
                            num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, use_cache=False)
    model = tf.LlamaModel(config).eval()
    n = PREFIX + IMAGE + TEXT
    ids = torch.randint(0, 1000, (1, n))
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = args.out / "llama.onnx"
    print(f"exporting a {args.layers}-layer LLaMA (width {args.width}, GQA 8/2) for a {n}-token prompt", flush=True)
    trimrt.export(model, baseline, example_inputs={"input_ids": ids}, exporter="dynamo")
    recipe = {"token_pruning": {"method": "last_token_attention", "layers": [args.prune_layer], "keep": args.keep,
                                "prunable": [PREFIX, PREFIX + IMAGE]}}
    build = args.out / "fastv"
    manifest = trimrt.compile(str(baseline), recipe, build)
    feeds = {"input_ids": ids.numpy()}
    np.save(args.out / "input_ids.npy", feeds["input_ids"])
    got = trimrt.load(build).run(feeds)["last_hidden_state"]
    with torch.no_grad():
        want = fastv_forward(model, ids, args.prune_layer, args.keep, (PREFIX, PREFIX + IMAGE)).numpy()
    err = float(np.abs(got - want).max())
    flops = count_flops(onnx.load(str(baseline)), feeds) / count_flops(onnx.load(str(build / "model.onnx")), feeds)
    r = bench_build(build, baseline, batch=1, threads=args.threads, rounds=args.rounds, warmup=2,
                    inputs=[f"input_ids={args.out / 'input_ids.npy'}"])
    kept = manifest["passes"][2]["report"]["layers"][0]["kept"]
    row = {"tokens": n, "span": IMAGE, "kept": kept, "tokens_after": n - IMAGE + kept, "flops_ratio": flops,
           "baseline_ms": r.baseline_ms, "build_ms": r.build_ms, "speedup": r.speedup,
           "max_abs_vs_fastv_reference": err, "layers": args.layers, "width": args.width}
    (args.out / "results.json").write_text(json.dumps(row, indent=2))
    print()
    print("| prompt tokens | image span → kept | tokens after layer 2 | FLOPs ratio (ideal) | prefill baseline → build ms | speedup | measured/ideal | max abs vs PyTorch FastV (original positions) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {IMAGE} → {kept} | {row['tokens_after']} | {flops:.2f}× | {r.baseline_ms:.0f} → {r.build_ms:.0f} | "
          f"**{r.speedup:.2f}×** | {100 * r.speedup / flops:.0f}% | {err:.1e} |")


if __name__ == "__main__":
    main()
