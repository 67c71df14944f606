"""INT8 (and token pruning + INT8) on the real all-MiniLM-L6-v2, beside ONNX Runtime's
`quantize_dynamic` (per-tensor and per-channel), all against the fp32 export.

256-token passages of real text (no padding), batch 1, 2 threads, alternating timing
(median of paired ratios, ORT spinning off); fidelity = embedding cosine on 200
passages and retrieval agreement on 50 held-out queries (helpers of
benchmarks/minilm_token_pruning.py).

    python benchmarks/minilm_int8.py          # ≈ 4 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RECIPES = [
    ("INT8 (trimrt)", {"quantization": {}}),
    ("EViT keep 0.8 @1,3 + INT8", {"token_pruning": {"layers": [1, 3], "keep": 0.8}, "quantization": {}}),
    ("EViT keep 0.7 @1,3 + INT8", {"token_pruning": {"layers": [1, 3], "keep": 0.7}, "quantization": {}}),
    ("EViT keep 0.7 @4 + INT8", {"token_pruning": {"layers": [4], "keep": 0.7}, "quantization": {}}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_minilm_int8"))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import minilm_token_pruning as mtp
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import trimrt
    from trimrt.models import corpus, minilm

    args.out.mkdir(parents=True, exist_ok=True)
    module, example = minilm.minilm_embedder()
    tokenizer = minilm.load_tokenizer()
    baseline = args.out / "minilm.onnx"
    trimrt.export(module, baseline, example_inputs=example)
    passages = {256: corpus.passages(tokenizer, 256, 200)}
    query_ids = [np.asarray(tokenizer(q)["input_ids"], dtype=np.int64) for q in corpus.queries(50)]
    timing = [corpus.feeds(p.input_ids) for p in passages[256][::25][:8]]
    models = []
    for name, recipe in RECIPES:
        build = args.out / "".join(c if c.isalnum() else "_" for c in name)
        trimrt.compile(str(baseline), recipe, build)
        models.append((name, build / "model.onnx"))
    for per_channel in (False, True):
        path = args.out / f"quantize_dynamic_{'per_channel' if per_channel else 'per_tensor'}.onnx"
        quantize_dynamic(str(baseline), str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
        models.append((f"ORT quantize_dynamic ({'per-channel' if per_channel else 'per-tensor'})", path))
    base = mtp.backend(baseline, 2)
    base_emb = {"passages": {256: mtp.embed_passages(base, passages[256])}, "queries": mtp.embed_queries(base, query_ids)}
    rows = []
    for name, path in models:
        b = mtp.backend(path, 2)
        emb = {"passages": {256: mtp.embed_passages(b, passages[256])}, "queries": mtp.embed_queries(b, query_ids)}
        fid = mtp.fidelity(base_emb, emb, 256)
        speed = mtp.speed(base, b, timing, warmup=5, rounds=args.rounds)
        rows.append({"model": name, **fid, **speed})
        print(f"{name}: {speed['speedup']:.2f}×, cosine {fid['cosine_mean']:.4f}, top-1 {fid['top1']:.2f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| model | speedup @256 | baseline → build ms | cosine mean / p5 | retrieval top-1 / top-5 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | **{r['speedup']:.2f}×** | {r['baseline_ms']:.1f} → {r['build_ms']:.1f} | "
              f"{r['cosine_mean']:.4f} / {r['cosine_p5']:.4f} | {r['top1']:.0%} / {r['top5']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
