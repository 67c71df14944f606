"""trimrt builds on OpenVINO beside OpenVINO's own fp32 and NNCF INT8, on the real all-MiniLM-L6-v2.

Every row runs the same fp32 export (or a trimrt build of it) and is timed against ONNX Runtime
fp32 on that export in the same process (alternating, after warm-up, median of paired ratios,
ONNX Runtime spinning off), on 256-token passages of real text, 2 threads:

- OpenVINO fp32: the export read by OpenVINO, inference precision f32 and bf16 (OpenVINO's
  own default on CPUs with AVX512-BF16 or AMX);
- OpenVINO + NNCF INT8: `nncf.quantize(..., model_type=TRANSFORMER)` on the calibration texts,
  at f32 and bf16;
- trimrt INT8 SmoothQuant (`--target openvino`: static Q/DQ, per-channel weights, calibrated
  per-tensor activations, the q·kᵀ inputs in int8 too unless `attention = false`), at f32 and
  with `[openvino] inference_precision = "bf16"`;
- trimrt EViT pruning + the same INT8, on OpenVINO (light, early-enough settings that keep
  cosine >= 0.99 on this mean-pooled embedder).

Each engine is timed twice: compiled for dynamic shapes (the export's own) and for the static
shape of the timed batch ([b, 256]: OpenVINO's `reshape`, trimrt's `[openvino] shapes` /
`load(shapes=...)`), every engine alike. ONNX Runtime fp32 stays the baseline of both.

Calibration (NNCF and trimrt alike): 48 docstrings of the corpus that are never a passage or a
query (`corpus.calibration_texts`). Fidelity: sentence-embedding cosine on 200 passages and
retrieval agreement of 50 queries against the fp32 model (benchmarks/minilm_token_pruning.py),
measured with the dynamic-shape engine (the static one runs the same graph).

    python benchmarks/openvino_minilm.py --batches 1 8     # ≈ 25 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

HERE = Path(__file__).resolve().parent
CAL = {"source": "calibration.txt", "max_length": 256, "samples": 48}
#: the export's inputs (each [batch, tokens])
INPUTS = ("input_ids", "attention_mask")


def recipes(tokenizer_dir: str) -> list[tuple[str, dict]]:
    cal = {"calibration": {**CAL, "tokenizer": tokenizer_dir}}
    sq = {"quantization": {"method": "smoothquant"}, **cal}
    bf16 = {"openvino": {"inference_precision": "bf16"}}
    def evit(layer: int, keep: float) -> dict:
        return {"token_pruning": {"layers": [layer], "keep": keep}, **sq, **bf16}

    return [
        ("trimrt INT8 smoothquant, q·kᵀ float", {"quantization": {"method": "smoothquant", "attention": False}, **cal}),
        ("trimrt INT8 smoothquant", sq),
        ("trimrt INT8 smoothquant, bf16", {**sq, **bf16}),
        ("trimrt EViT keep 0.8 @4 + INT8 smoothquant, bf16", evit(4, 0.8)),
        ("trimrt EViT keep 0.85 @3 + INT8 smoothquant, bf16", evit(3, 0.85)),
        ("trimrt EViT keep 0.8 @3 + INT8 smoothquant, bf16", evit(3, 0.8)),
    ]


class OpenVINOModel:
    """An OpenVINO model (an ov.Model, e.g. NNCF's) with the Backend interface the helpers call;
    `shape`: compiled for that static shape of every input (OpenVINO's reshape)."""

    def __init__(self, model, threads: int, precision: str = "f32", shape: list[int] | None = None):
        import openvino as ov

        if shape is not None:
            model = model.clone()
            model.reshape({port.get_any_name(): ov.PartialShape(shape) for port in model.inputs})
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                "INFERENCE_PRECISION_HINT": precision,
                                                                "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.names = [port.get_any_name() for port in self.compiled.outputs]

    def infer(self, feeds, output_names=None):
        results = self.request.infer(feeds)
        return {name: np.array(results[i]) for i, name in enumerate(self.names)}


def nncf_int8(baseline: Path, calibration: list[dict]):
    """NNCF's post-training INT8 of the fp32 export (an ov.Model)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(baseline))
    return nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(calibration))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_openvino_minilm"))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import minilm_token_pruning as mtp
    from minilm_quantization import _toml, folder_name, setup

    import trimrt
    from examples.models import corpus, minilm

    tokenizer, baseline, passages, query_ids, timing = setup(args.out, args.batches)
    texts = corpus.calibration_texts(48)  # what setup() wrote to calibration.txt, for NNCF
    calibration = [corpus.feeds(np.asarray(tokenizer(t, truncation=True, max_length=256)["input_ids"])) for t in texts]

    import openvino as ov

    # name -> (fidelity engine: dynamic shapes, {batch: static-shape engine})
    exported = ov.Core().read_model(str(baseline))
    print("NNCF INT8 ...", flush=True)
    nncf_model = nncf_int8(baseline, calibration)
    engines = {}
    for name, model in [("OpenVINO fp32 export", exported), ("OpenVINO + NNCF INT8", nncf_model)]:
        for p in ("f32", "bf16"):
            engines[f"{name}, {p}"] = (OpenVINOModel(model, args.threads, p),
                                       {b: OpenVINOModel(model, args.threads, p, [b, 256]) for b in args.batches})
    for name, recipe in recipes(str(minilm.model_dir())):
        build = args.out / folder_name(name)
        recipe_path = args.out / f"{build.name}.toml"
        recipe_path.write_text(_toml(recipe))
        print(f"compiling {name}", flush=True)
        trimrt.compile(str(baseline), str(recipe_path), build, target="openvino")
        static = {b: trimrt.load(build, threads=args.threads, shapes={i: [b, 256] for i in INPUTS}).backend
                  for b in args.batches}
        engines[f"{name} (OpenVINO)"] = (trimrt.load(build, threads=args.threads).backend, static)

    base = mtp.backend(baseline, args.threads)
    base_emb = {"passages": {256: mtp.embed_passages(base, passages)}, "queries": mtp.embed_queries(base, query_ids)}
    rows = []
    for name, (engine, static) in engines.items():
        emb = {"passages": {256: mtp.embed_passages(engine, passages)}, "queries": mtp.embed_queries(engine, query_ids)}
        fid = mtp.fidelity(base_emb, emb, 256)
        speed = {(b, shapes): mtp.speed(base, engine if shapes == "dynamic" else static[b], timing[b], warmup=5,
                                        rounds=args.rounds)
                 for b in args.batches for shapes in ("dynamic", "static")}
        rows.append((name, fid, speed))
        print(f"{name}: " + ", ".join(f"b{b} {shapes} {s['speedup']:.2f}×" for (b, shapes), s in speed.items())
              + f", cosine {fid['cosine_mean']:.4f}", flush=True)
    head = ["engine"] + [f"b{b} {shapes} shapes: × ORT fp32 (ms)" for b in args.batches
                         for shapes in ("dynamic", "static")] + ["cosine mean / p5", "retrieval top-1 / top-5"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, fid, speed in rows:
        cells = [name] + [f"**{s['speedup']:.2f}×** ({s['baseline_ms']:.1f} → {s['build_ms']:.1f})"
                          for s in speed.values()]
        cells += [f"{fid['cosine_mean']:.4f} / {fid['cosine_p5']:.4f}", f"{fid['top1']:.0%} / {fid['top5']:.0%}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
