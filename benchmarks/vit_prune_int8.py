"""Token pruning + INT8 on the DeiT-S-geometry ViT: speed and fidelity against the fp32 export.

Builds: INT8 alone ([quantization], weights per output channel, dynamic activations),
EViT keep 0.7 / 0.5 at blocks 3, 6, 9 alone and with INT8, both with `[onnxruntime]
fuse` (attention and GELU as ORT contrib kernels), and ONNX Runtime's own
`quantize_dynamic` (per-tensor and per-channel) of the same export, all timed against
the unmodified fp32 export in one process (alternating, medians of paired ratios, ORT
spinning off), at batch 1 and 8; fidelity = logits vs the fp32 export (cosine, top-1) on
16 random images.

    python benchmarks/vit_prune_int8.py            # ≈ 8 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

FACTORY = "examples.models.vit:deit_small"
EVIT = {"layers": [3, 6, 9], "fuse_pruned": True}
RECIPES = [
    ("INT8 (trimrt)", {"quantization": {}}),
    ("EViT keep 0.7", {"token_pruning": {**EVIT, "keep": 0.7}}),
    ("EViT keep 0.7 + INT8", {"token_pruning": {**EVIT, "keep": 0.7}, "quantization": {}}),
    ("EViT keep 0.5 + INT8", {"token_pruning": {**EVIT, "keep": 0.5}, "quantization": {}}),
    ("INT8 + fusion", {"quantization": {}, "onnxruntime": {"fuse": True}}),
    ("EViT keep 0.7 + INT8 + fusion", {"token_pruning": {**EVIT, "keep": 0.7}, "quantization": {},
                                       "onnxruntime": {"fuse": True}}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_vit_int8"))
    args = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import trimrt
    from trimrt.bench import paired_speedup, time_alternating
    from trimrt.runtime.backends import OnnxRuntimeBackend
    from trimrt.runtime.manifest import onnxruntime_settings

    args.out.mkdir(parents=True, exist_ok=True)
    baseline = args.out / "deit_s.onnx"
    trimrt.export(FACTORY, baseline)
    models = []
    for name, recipe in RECIPES:
        build = args.out / name.replace(" ", "_").replace("+", "plus").replace(".", "")
        manifest = trimrt.compile(str(baseline), recipe, build)
        models.append((name, build / "model.onnx", manifest["flops"]["ratio"], onnxruntime_settings(manifest)))
    for per_channel in (False, True):
        path = args.out / f"ort_quantize_dynamic_{'per_channel' if per_channel else 'per_tensor'}.onnx"
        quantize_dynamic(str(baseline), str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
        models.append((f"ORT quantize_dynamic ({'per-channel' if per_channel else 'per-tensor'})", path, 1.0, {}))

    images = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    base = OnnxRuntimeBackend(baseline, threads=2, spinning=False)
    base.activate()
    ref = np.concatenate([base.infer({"pixel_values": images[i:i + 4]})["logits"] for i in range(0, 16, 4)])
    rows = []
    for name, path, flops, settings in models:
        b = OnnxRuntimeBackend(path, threads=2, spinning=False, **settings)  # as trimrt.load runs the build
        b.activate()
        got = np.concatenate([b.infer({"pixel_values": images[i:i + 4]})["logits"] for i in range(0, 16, 4)])
        cos = float(np.mean(np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)))
        top1 = float(np.mean(got.argmax(1) == ref.argmax(1)))
        row = {"model": name, "flops_ratio_tokens": flops, "cosine": cos, "top1": top1, "speed": {}}
        for batch in args.batches:
            feeds = {"pixel_values": images[:batch] if batch <= 16 else np.repeat(images, batch // 16 + 1, 0)[:batch]}
            ta, tb = time_alternating(lambda: base.infer(feeds), lambda: b.infer(feeds), warmup=5, rounds=args.rounds)
            row["speed"][batch] = paired_speedup(ta, tb)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"b{k} {v:.2f}×" for k, v in row["speed"].items())
              + f", cosine {cos:.4f}, top-1 {top1:.2f}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2))
    print()
    head = ["model", "FLOPs ratio (tokens)"] + [f"b{b} speedup" for b in args.batches] + ["cosine vs fp32", "top-1"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join([r["model"], f"{r['flops_ratio_tokens']:.2f}×"]
                                + [f"**{r['speed'][b]:.2f}×**" for b in args.batches]
                                + [f"{r['cosine']:.4f}", f"{r['top1']:.0%}"]) + " |")


if __name__ == "__main__":
    main()
