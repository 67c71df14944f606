"""Quantization of the real all-MiniLM-L6-v2: trimrt's INT8 / INT4 / pruning + INT8 builds
beside ONNX Runtime's `quantize_dynamic` (per-tensor and per-channel), all against the
unmodified fp32 export, measured in one run.

- Speed: 256-token passages of real text (no padding), batch 1 (and `--batches 1 8`),
  2 threads, the build and the fp32 export alternating after warm-up, median of paired
  ratios, ORT intra-op spinning off (trimrt.bench).
- Fidelity on the real corpus: sentence-embedding cosine on 200 passages and retrieval
  agreement (top-1 / top-5) of 50 held-out queries (helpers of
  benchmarks/minilm_token_pruning.py).
- Calibration (SmoothQuant, AWQ, GPTQ, the guard): a text file of 48 other docstrings of
  the same corpus (`corpus.calibration_texts`: never a passage, never a query), tokenized
  by the model's tokenizer, `[calibration] source = "calibration.txt"`. The quantization
  numbers are fitted on three quarters of them and checked on the rest (the longest
  quarter, quantization.holdout); "calib. cos" is the guard's cosine on that held-out
  part / on the fitted part, the table's cosine is on the evaluation passages.
- `+ fusion` = `[onnxruntime] fuse = true` (attention, GELU, skip-LayerNorm as ONNX
  Runtime contrib kernels; a float rewrite, also shown alone).

    python benchmarks/minilm_quantization.py              # ≈ 30 min
    python benchmarks/minilm_quantization.py --only int4  # rows whose name contains "int4"
    python benchmarks/minilm_quantization.py --exact --only "INT8 rtn + fusion" "INT8 smoothquant + fusion"

Prints a Markdown table and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

HERE = Path(__file__).resolve().parent
FUSE = {"onnxruntime": {"fuse": True}}
CALIBRATED = {"calibration": {"source": "calibration.txt", "max_length": 256, "samples": 48}}


def recipes(tokenizer_dir: str) -> list[tuple[str, dict]]:
    cal = {"calibration": {**CALIBRATED["calibration"], "tokenizer": tokenizer_dir}}
    int8 = {"quantization": {}}
    rows = [
        ("fp32 + fusion", {**FUSE}),
        ("INT8 rtn", {**int8}),
        ("INT8 rtn + fusion", {**int8, **FUSE, **cal}),
        ("INT8 smoothquant + fusion", {"quantization": {"method": "smoothquant"}, **FUSE, **cal}),
        ("INT8 gptq + fusion", {"quantization": {"method": "gptq"}, **FUSE, **cal}),
        ("INT8 rtn, guard 0.995 + fusion", {"quantization": {"min_cosine": 0.995}, **FUSE, **cal}),
        ("INT4 rtn g128 + fusion", {"quantization": {"weights": "int4"}, **FUSE, **cal}),
        ("INT4 awq g128 + fusion", {"quantization": {"weights": "int4", "method": "awq"}, **FUSE, **cal}),
        ("INT4 gptq g128 + fusion", {"quantization": {"weights": "int4", "method": "gptq"}, **FUSE, **cal}),
    ]
    for method in ("rtn", "awq", "gptq"):
        rows.append((f"INT4 {method} g32 + fusion", {"quantization": {"weights": "int4", "method": method, "group_size": 32},
                                                    **FUSE, **cal}))
    for method in ("rtn", "awq", "gptq"):
        rows.append((f"INT4 {method} g16 + fusion", {"quantization": {"weights": "int4", "method": method, "group_size": 16},
                                                    **FUSE, **cal}))
    rows.append(("INT4 awq g16, guard 0.985 + fusion", {"quantization": {
        "weights": "int4", "method": "awq", "group_size": 16, "min_cosine": 0.985}, **FUSE, **cal}))
    for label, reduction in [
        ("EViT keep 0.9 @3", {"token_pruning": {"layers": [3], "keep": 0.9}}),
        ("EViT keep 0.8 @4", {"token_pruning": {"layers": [4], "keep": 0.8}}),
        ("EViT keep 0.7 @4", {"token_pruning": {"layers": [4], "keep": 0.7}}),
        ("EViT keep 0.8 @1,3", {"token_pruning": {"layers": [1, 3], "keep": 0.8}}),
        ("ToMe ratio 0.08", {"token_merging": {"ratio": 0.08, "proportional_attention": False}}),
    ]:
        rows.append((f"{label} + INT8 rtn + fusion", {**reduction, **int8, **FUSE, **cal}))
    for label, reduction in [
        ("EViT keep 0.8 @3", {"token_pruning": {"layers": [3], "keep": 0.8}}),
        ("EViT keep 0.8 @2", {"token_pruning": {"layers": [2], "keep": 0.8}}),
        ("EViT keep 0.7 @3", {"token_pruning": {"layers": [3], "keep": 0.7}}),
        ("EViT keep 0.7 @4", {"token_pruning": {"layers": [4], "keep": 0.7}}),
    ]:
        rows.append((f"{label} + INT8 smoothquant + fusion", {**reduction, "quantization": {"method": "smoothquant"},
                                                              **FUSE, **cal}))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--only", nargs="*", default=[], help="rows whose name contains one of these (case-insensitive)")
    ap.add_argument("--exact", action="store_true", help="--only names whole rows (case-insensitive)")
    ap.add_argument("--out", type=Path, default=Path("builds/bench_minilm_quantization"))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import minilm_token_pruning as mtp
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import trimrt
    from examples.models import minilm

    tokenizer, baseline, passages, query_ids, timing = setup(args.out, args.batches)

    def wanted(name: str) -> bool:
        if args.exact:
            return any(o.lower() == name.lower() for o in args.only)
        return not args.only or any(o.lower() in name.lower() for o in args.only)

    models = []
    for per_channel in (False, True):
        name = f"ORT quantize_dynamic ({'per-channel' if per_channel else 'per-tensor'})"
        if wanted(name):
            path = args.out / f"quantize_dynamic_{'per_channel' if per_channel else 'per_tensor'}.onnx"
            quantize_dynamic(str(baseline), str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
            models.append((name, path, None))
    for name, recipe in recipes(str(minilm.model_dir())):
        if not wanted(name):
            continue
        build = args.out / folder_name(name)
        recipe_path = args.out / f"{build.name}.toml"
        recipe_path.write_text(_toml(recipe))  # a recipe file: its relative calibration source resolves here
        print(f"compiling {name}", flush=True)
        manifest = trimrt.compile(str(baseline), str(recipe_path), build)
        report = next((p["report"] for p in manifest["passes"] if p["pass"] == "quantization"), None)
        models.append((name, build / "model.onnx", report))

    base = mtp.backend(baseline, 2)
    base_emb = {"passages": {256: mtp.embed_passages(base, passages)}, "queries": mtp.embed_queries(base, query_ids)}
    weight_bytes = sum(w.nbytes for w in _matmul_weights(baseline))
    rows = []
    for name, path, report in models:
        b = mtp.backend(path, 2)
        emb = {"passages": {256: mtp.embed_passages(b, passages)}, "queries": mtp.embed_queries(b, query_ids)}
        fid = mtp.fidelity(base_emb, emb, 256)
        row = {"model": name, **fid, "speed": {}}
        if report is not None:
            row["weight_mb"] = report["weight_bytes_after"] / 1e6
            row["calib_cosine"] = report.get("fidelity", {}).get("cosine")
            row["calib_cosine_fit"] = report.get("fidelity", {}).get("cosine_fit")
            row["fallback_rtn"] = report.get("matmuls_fallback_rtn", 0)
            row["float_layers"] = report["matmuls_float"]
        elif "quantize_dynamic" in name:
            row["weight_mb"] = None
        else:
            row["weight_mb"] = weight_bytes / 1e6
        for batch in args.batches:
            row["speed"][batch] = mtp.speed(base, b, timing[batch], warmup=5, rounds=args.rounds)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"b{k} {v['speedup']:.2f}×" for k, v in row["speed"].items())
              + f", cosine {fid['cosine_mean']:.4f}, top-1 {fid['top1']:.2f}", flush=True)
        del b
    (args.out / "results.json").write_text(json.dumps({"fp32_weight_mb": weight_bytes / 1e6, "rows": rows}, indent=2))
    print(markdown(rows, args.batches, weight_bytes / 1e6))
    return 0


def setup(out: Path, batches: list[int]):
    """What the MiniLM benchmarks share, in `out`: (tokenizer, the fp32 export, 200 passages of
    256 tokens, 50 query id arrays, {batch: timing feeds}); writes calibration.txt (48 corpus
    texts that are never a passage or a query)."""
    import trimrt
    from examples.models import corpus, minilm

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = minilm.load_tokenizer()
    baseline = out / "minilm.onnx"
    if not baseline.is_file():
        module, example = minilm.minilm_embedder()
        trimrt.export(module, baseline, example_inputs=example)
        del module
    (out / "calibration.txt").write_text("\n".join(corpus.calibration_texts(48)) + "\n")
    passages = corpus.passages(tokenizer, 256, 200)
    query_ids = [np.asarray(tokenizer(q)["input_ids"], dtype=np.int64) for q in corpus.queries(50)]
    # batch 1: 8 passages spread over the corpus; batch b: 2 batches of b consecutive passages
    timing = {b: [corpus.feeds(p.input_ids) for p in passages[::25][:8]] if b == 1 else
              [corpus.feeds([p.input_ids for p in passages[i * b:(i + 1) * b]]) for i in range(2)]
              for b in batches}
    return tokenizer, baseline, passages, query_ids, timing


def markdown(rows: list[dict], batches: list[int], fp32_mb: float) -> str:
    head = ["build"] + [f"b{b} speedup (fp32 → build ms)" for b in batches] + [
        "cosine mean / p5", "retrieval top-1 / top-5", f"linear weights MB (fp32 {fp32_mb:.1f})", "calib. cos held-out / fit (float layers)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]]
        for b in batches:
            s = r["speed"][b]
            cells.append(f"**{s['speedup']:.2f}×** ({s['baseline_ms']:.1f} → {s['build_ms']:.1f})")
        cells += [f"{r['cosine_mean']:.4f} / {r['cosine_p5']:.4f}", f"{r['top1']:.0%} / {r['top5']:.0%}",
                  "n/a" if r.get("weight_mb") is None else f"{r['weight_mb']:.1f}",
                  "" if r.get("calib_cosine") is None else
                  f"{r['calib_cosine']:.4f} / {r.get('calib_cosine_fit') or r['calib_cosine']:.4f} ({r['float_layers']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _matmul_weights(path: Path) -> list[np.ndarray]:
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            out.append(onnx.numpy_helper.to_array(inits[node.input[1]]))
    return out


def folder_name(name: str) -> str:
    """The build folder of a table row's name (what the OpenVINO scripts share)."""
    return "".join(c if c.isalnum() else "_" for c in name)


def _toml(recipe: dict) -> str:
    lines = []
    for table, values in recipe.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
