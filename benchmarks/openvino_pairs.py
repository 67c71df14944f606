"""What token pruning saves on OpenVINO: a pruned INT8 build against the same INT8 build unpruned, both on OpenVINO.

The paired ratios of openvino_minilm.py / openvino_vit.py are each against ONNX Runtime fp32;
this script times the two OpenVINO builds against each other (alternating, after warm-up,
median of paired ratios), so the saving of the pruning itself is read directly and compared
with its FLOPs ideal (from the builds' manifests), both compiled for dynamic shapes and for
the timed batch's static shape (`load(shapes=...)`). It reuses the builds those two scripts
leave in builds/ (run them first):

    python benchmarks/openvino_pairs.py --rounds 30     # ≈ 3 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = ("dynamic", "static")
#: (model, build folder, unpruned build, pruned build): rows of openvino_minilm.py / openvino_vit.py
PAIRS = [
    ("all-MiniLM-L6-v2", "builds/bench_openvino_minilm", "trimrt INT8 smoothquant, bf16",
     "trimrt EViT keep 0.8 @3 + INT8 smoothquant, bf16"),
    ("DeiT-S-geometry ViT", "builds/bench_openvino_vit", "trimrt INT8", "trimrt EViT keep 0.7 + INT8"),
]


def feeds_for(model: str, batch: int) -> dict:
    if model.startswith("all-MiniLM"):
        from examples.models import corpus, minilm

        passages = corpus.passages(minilm.load_tokenizer(), 256, 8)
        return corpus.feeds([p.input_ids for p in passages[:batch]])
    return {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from minilm_quantization import folder_name

    import trimrt
    from trimrt.bench import paired_speedup, time_alternating
    from trimrt.runtime.manifest import read_manifest

    print("| model | pruned build | FLOPs ideal | " + " | ".join(f"b{b} {shapes} shapes: unpruned → pruned ms"
                                                           for b in args.batches for shapes in SHAPES) + " |")
    print("|---|---|---|" + "---|" * len(args.batches) * len(SHAPES))
    for model, folder, unpruned, pruned in PAIRS:
        paths = [Path(folder) / folder_name(unpruned), Path(folder) / folder_name(pruned)]
        if not all(p.is_dir() for p in paths):
            print(f"{model}: builds missing in {folder}: run benchmarks/openvino_"
                  f"{'minilm' if 'MiniLM' in model else 'vit'}.py first", file=sys.stderr)
            return 2
        ideal = read_manifest(paths[1])["flops"]["ratio"] / read_manifest(paths[0])["flops"]["ratio"]
        cells = []
        for batch in args.batches:
            feeds = feeds_for(model, batch)
            for shapes in SHAPES:
                fixed = {name: list(value.shape) for name, value in feeds.items()} if shapes == "static" else {}
                a, b = (trimrt.load(p, backend="openvino", threads=args.threads, shapes=fixed) for p in paths)
                ta, tb = time_alternating(lambda: a.backend.infer(feeds), lambda: b.backend.infer(feeds), warmup=5,
                                          rounds=args.rounds)
                cells.append(f"{1e3 * np.median(ta):.1f} → {1e3 * np.median(tb):.1f}, "
                             f"**{paired_speedup(ta, tb):.2f}×**")
        print(f"| {model} | {pruned} | {ideal:.2f}× | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
