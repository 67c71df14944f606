"""EViT pruning + INT8 on OpenVINO against OpenVINO's own fp32 and NNCF INT8, on the DeiT-S-geometry ViT.

Every row runs the same fp32 export (or a trimrt build of it) and is timed against ONNX Runtime
fp32 on that export in the same process (alternating, after warm-up, median of paired ratios,
ONNX Runtime spinning off), 2 threads, at each batch size:

- OpenVINO fp32: the export read by OpenVINO, inference precision f32 and bf16 (OpenVINO's
  default on CPUs with AVX512-BF16 or AMX);
- OpenVINO + NNCF INT8: `nncf.quantize(..., model_type=TRANSFORMER)` on the calibration images,
  at f32 and bf16;
- trimrt builds `--target openvino`: INT8 (static Q/DQ, per-channel weights, calibrated
  per-tensor activations, q·kᵀ in int8), EViT keep 0.7 at blocks 3, 6, 9, and both together,
  at f32 and with `[openvino] inference_precision = "bf16"`;
- trimrt's best ONNX Runtime build of benchmarks/vit_prune_int8.py (EViT keep 0.7 + INT8 +
  fusion) on ONNX Runtime: what the same recipe gives without OpenVINO.

Each OpenVINO engine is timed twice: compiled for the export's dynamic batch, and for the
static shape of the timed batch ([b, 3, 224, 224]: OpenVINO's `reshape`, trimrt's
`load(shapes=...)`), every engine alike.

Random weights and images (a speed check, as vit_prune_int8.py): calibration (NNCF and trimrt
alike) on 32 images, fidelity (logit cosine, top-1 against the fp32 export) on 16 others.

    python benchmarks/openvino_vit.py --batches 1 8     # ≈ 20 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models
sys.path.insert(0, str(Path(__file__).resolve().parent))

FACTORY = "examples.models.vit:deit_small"
EVIT = {"layers": [3, 6, 9], "fuse_pruned": True, "keep": 0.7}
CALIBRATION = {"source": "calibration", "samples": 32}
BF16 = {"openvino": {"inference_precision": "bf16"}}
BUILDS = [  # (name, recipe, target)
    ("trimrt INT8", {"quantization": {}, "calibration": CALIBRATION}, "openvino"),
    ("trimrt EViT keep 0.7", {"token_pruning": EVIT}, "openvino"),
    ("trimrt EViT keep 0.7 + INT8", {"token_pruning": EVIT, "quantization": {}, "calibration": CALIBRATION},
     "openvino"),
    ("trimrt EViT keep 0.7 + INT8, bf16", {"token_pruning": EVIT, "quantization": {}, "calibration": CALIBRATION,
                                           **BF16}, "openvino"),
    ("trimrt EViT keep 0.7 + INT8 + fusion", {"token_pruning": EVIT, "quantization": {},
                                              "onnxruntime": {"fuse": True}}, "onnxruntime"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_openvino_vit"))
    args = ap.parse_args()
    import openvino as ov
    from minilm_quantization import _toml, folder_name
    from openvino_minilm import OpenVINOModel, nncf_int8

    import trimrt
    from trimrt.bench import paired_speedup, time_alternating
    from trimrt.runtime.backends import OnnxRuntimeBackend

    args.out.mkdir(parents=True, exist_ok=True)
    baseline = args.out / "deit_s.onnx"
    trimrt.export(FACTORY, baseline)
    rng = np.random.default_rng(1)
    calibration = [{"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(32)]
    (args.out / "calibration").mkdir(exist_ok=True)
    for i, feeds in enumerate(calibration):
        np.save(args.out / "calibration" / f"{i:03d}.npy", feeds["pixel_values"])
    images = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)

    def static_shapes(make):
        return {b: make([b, 3, 224, 224]) for b in args.batches}

    engines = []  # (name, engine, FLOPs ratio, {batch: the engine compiled for its static shape} or None)
    exported = ov.Core().read_model(str(baseline))
    print("NNCF INT8 ...", flush=True)
    nncf_model = nncf_int8(baseline, calibration)
    for name, model in [("OpenVINO fp32 export", exported), ("OpenVINO + NNCF INT8", nncf_model)]:
        for p in ("f32", "bf16"):
            engines.append((f"{name}, {p}", OpenVINOModel(model, args.threads, p), 1.0,
                            static_shapes(lambda shape, m=model, p=p: OpenVINOModel(m, args.threads, p, shape))))
    for name, recipe, target in BUILDS:
        build = args.out / folder_name(name)
        recipe_path = args.out / f"{build.name}_{target}.toml"
        recipe_path.write_text(_toml(recipe))
        print(f"compiling {name} for {target}", flush=True)
        manifest = trimrt.compile(str(baseline), str(recipe_path), build, target=target)
        session = trimrt.load(build, threads=args.threads, spinning=False)
        label = f"{name} ({'OpenVINO' if target == 'openvino' else 'ONNX Runtime'})"
        static = static_shapes(lambda shape, b=build: trimrt.load(b, threads=args.threads, shapes={
            "pixel_values": shape}).backend) if target == "openvino" else None
        engines.append((label, session.backend, manifest["flops"]["ratio"], static))

    base = OnnxRuntimeBackend(baseline, threads=args.threads, spinning=False)
    base.activate()
    ref = np.concatenate([base.infer({"pixel_values": images[i:i + 4]})["logits"] for i in range(0, 16, 4)])
    rows = []
    for name, engine, flops, static in engines:
        got = np.concatenate([engine.infer({"pixel_values": images[i:i + 4]})["logits"] for i in range(0, 16, 4)])
        cosine = float(np.mean(np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)))
        top1 = float(np.mean(got.argmax(1) == ref.argmax(1)))
        speed = {}
        for batch in args.batches:
            feeds = {"pixel_values": np.resize(images, (batch, *images.shape[1:]))}
            for shapes, run in [("dynamic", engine), ("static", static[batch] if static else None)]:
                if run is None:
                    speed[batch, shapes] = None
                    continue
                ta, tb = time_alternating(lambda: base.infer(feeds), lambda r=run: r.infer(feeds), warmup=5,
                                          rounds=args.rounds)
                speed[batch, shapes] = (paired_speedup(ta, tb), 1e3 * float(np.median(ta)), 1e3 * float(np.median(tb)))
        rows.append((name, flops, cosine, top1, speed))
        print(f"{name}: " + ", ".join(f"b{b} {shapes} {v[0]:.2f}×" for (b, shapes), v in speed.items() if v)
              + f", cosine {cosine:.4f}, top-1 {top1:.0%}", flush=True)
    head = ["engine", "FLOPs ratio"] + [f"b{b} {shapes} shapes: × ORT fp32 (ms)" for b in args.batches
                                        for shapes in ("dynamic", "static")] + ["cosine vs fp32", "top-1"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, flops, cosine, top1, speed in rows:
        cells = [name, f"{flops:.2f}×"] + [f"**{s[0]:.2f}×** ({s[1]:.1f} → {s[2]:.1f})" if s else "—"
                                          for s in speed.values()]
        print("| " + " | ".join(cells + [f"{cosine:.4f}", f"{top1:.0%}"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
