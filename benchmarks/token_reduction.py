"""The token-reduction family side by side: every method at the same budgets → FLOPs
ratio, measured speed ratio on ONNX Runtime CPU, fidelity to the unmodified model.

Two models:

- `--model vit`: the in-tree ViT with DeiT-S geometry (12 blocks, width 384, 6 heads,
  197 tokens; random weights). Pruning methods at keep 0.7 and 0.5 after blocks 3, 6, 9;
  ToMe at r = 8, 13, 16 in all 12 blocks (the settings whose FLOPs ToMe publishes for
  DeiT-S: 4.6 → 3.4, 2.7, 2.3 GFLOPs). Speed at batch 1 and 8; fidelity = logits of the
  build vs PyTorch on random images (cosine, top-1 agreement), via `trimrt.verify`.
- `--model minilm`: the real all-MiniLM-L6-v2 (mean pooling + L2 norm in the graph) on
  256-token passages of real text (Python docstrings, no padding). Fidelity =
  embedding cosine to the unmodified model and retrieval agreement (top-1 / top-5 of 50
  held-out queries), as in benchmarks/minilm_token_pruning.py, whose helpers it uses.
  Speed at batch 1 and 8 (8 passages of 256 real tokens each).

Speed: the build and the unmodified export in one process, alternating after warm-up,
median of per-round paired ratios (trimrt.bench); ORT intra-op spinning off. The FLOPs
ratio (MatMul/Gemm/Conv FLOPs counted on a real input, trimrt.compiler.flops) is the
ideal speedup; "measured/ideal" is how much of it the build delivers.

    python benchmarks/token_reduction.py --model vit        # ≈ 15 min
    python benchmarks/token_reduction.py --model minilm     # ≈ 10 min
    python benchmarks/token_reduction.py --model vit --only tome --rounds 10   # quick look

Prints a Markdown table and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

HERE = Path(__file__).resolve().parent

VIT_LAYERS = [3, 6, 9]
MINILM_LAYERS = [1, 3]


def vit_recipes() -> list[tuple[str, str, dict]]:
    """(method, budget label, recipe) for the DeiT-S table."""
    rows = []
    for keep in (0.7, 0.5):
        tp = {"layers": VIT_LAYERS, "keep": keep}
        rows += [
            ("cls_attention (EViT, fused)", f"keep {keep}", {"token_pruning": {**tp, "fuse_pruned": True}}),
            ("zero_tprune", f"keep {keep}", {"token_pruning": {**tp, "method": "zero_tprune"}}),
            ("divprune", f"keep {keep}", {"token_pruning": {**tp, "method": "divprune"}}),
            ("recycle (2×2 grid)", f"keep {keep}", {"token_pruning": {**tp, "method": "recycle", "recycle_grid": 2}}),
            ("adaptive (mass 0.9)", f"keep ≤ {keep}", {"token_pruning": {**tp, "method": "adaptive", "mass": 0.9}}),
        ]
    for r in (8, 13, 16):
        rows.append(("tome", f"r = {r}", {"token_merging": {"r": r}}))
    return rows


def minilm_recipes() -> list[tuple[str, str, dict]]:
    """Every pruning method at keep 0.7 / 0.5 after blocks 1 and 3; ToMe by share of tokens
    per block (text varies in length), paired with EViT settings of the same FLOPs."""
    rows = []
    for keep in (0.7, 0.5):
        tp = {"layers": MINILM_LAYERS, "keep": keep}
        rows += [
            ("cls_attention (EViT)", f"keep {keep} @1,3", {"token_pruning": {**tp}}),
            ("zero_tprune", f"keep {keep} @1,3", {"token_pruning": {**tp, "method": "zero_tprune"}}),
            ("divprune", f"keep {keep} @1,3", {"token_pruning": {**tp, "method": "divprune"}}),
            ("adaptive (mass 0.9)", f"keep ≤ {keep} @1,3", {"token_pruning": {**tp, "method": "adaptive", "mass": 0.9}}),
        ]
    # equal-FLOPs pairs: EViT vs ToMe (proportional attention off: it costs fidelity on this model)
    rows += [
        ("cls_attention (EViT)", "keep 0.8 @1,3", {"token_pruning": {"layers": [1, 3], "keep": 0.8}}),
        ("tome", "ratio 0.08, no prop. attn", {"token_merging": {"ratio": 0.08, "proportional_attention": False}}),
        ("cls_attention (EViT)", "keep 0.65 @1", {"token_pruning": {"layers": [1], "keep": 0.65}}),
        ("tome", "ratio 0.1, no prop. attn", {"token_merging": {"ratio": 0.1, "proportional_attention": False}}),
        ("tome", "ratio 0.1", {"token_merging": {"ratio": 0.1}}),
        ("tome", "ratio 0.12, no prop. attn", {"token_merging": {"ratio": 0.12, "proportional_attention": False}}),
        ("tome", "ratio 0.2, no prop. attn", {"token_merging": {"ratio": 0.2, "proportional_attention": False}}),
    ]
    return rows


def tokens_per_stage(report: dict) -> list:
    return [report["tokens_before"]] + [x["tokens_out"] for x in report["layers"]]


def run_vit(args, log) -> list[dict]:
    import trimrt
    from trimrt.bench import bench_build
    from trimrt.errors import TrimrtError

    factory = "examples.models.vit:deit_small"
    baseline = args.out / "deit_s.onnx"
    log(f"exporting {factory} → {baseline}")
    trimrt.export(factory, baseline)
    rows = []
    if not args.only or any(o in "sit slimming" for o in args.only):
        rows.append(sit_row(args, log))
    for method, budget, recipe in selected(vit_recipes(), args.only):
        name = f"{method} {budget}"
        build = args.out / slug(name)
        try:
            manifest = trimrt.compile(str(baseline), recipe, build)
        except TrimrtError as exc:
            log(f"{name}: not built: {exc}")
            rows.append({"method": method, "budget": budget, "error": str(exc)})
            continue
        report = next(p["report"] for p in manifest["passes"] if p["pass"] in ("token_pruning", "token_merging"))
        fid = trimrt.verify(build, factory, samples=args.samples).outputs[0]
        row = {"method": method, "budget": budget, "recipe": recipe, "tokens": tokens_per_stage(report),
               "flops_ratio": manifest["flops"]["ratio"], "cosine": fid.cosine_mean, "top1": fid.top1, "speed": {}}
        for batch in args.batches:
            r = bench_build(build, baseline, batch=batch, threads=args.threads, rounds=args.rounds, warmup=args.warmup)
            row["speed"][batch] = r.to_dict()
        rows.append(row)
        log(f"{name}: FLOPs {row['flops_ratio']:.2f}×, "
            + ", ".join(f"b{b} {row['speed'][b]['speedup']:.2f}×" for b in args.batches)
            + f", cos {row['cosine']:.4f}, top-1 {row['top1']:.2f}")
    return rows


def sit_row(args, log) -> dict:
    """SiT: a model that slims its own tokens (TSMs after blocks 3, 6, 9, random weights);
    the build fuses each TSM into one TokenSlim op. Baseline: the same model's export."""
    import trimrt
    from trimrt.bench import bench_build

    factory = "examples.models.sit:deit_small_sit"
    baseline = args.out / "deit_s_sit.onnx"
    trimrt.export(factory, baseline)
    build = args.out / "sit_slimming"
    manifest = trimrt.compile(str(baseline), {"token_slimming": {"fuse": True}}, build)
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "token_slimming")
    fid = trimrt.verify(build, factory, samples=args.samples).outputs[0]
    tokens = [197] + [1 + m["tokens_out"] for m in report["modules"]]
    row = {"method": "SiT token slimming (fused TSMs)", "budget": f"{report['modules_fused']} TSMs, model's own",
           "tokens": tokens, "flops_ratio": manifest["flops"]["ratio"], "cosine": fid.cosine_mean, "top1": fid.top1,
           "speed": {}}
    from trimrt.errors import InputError

    for batch in args.batches:
        try:
            row["speed"][batch] = bench_build(build, baseline, batch=batch, threads=args.threads, rounds=args.rounds,
                                              warmup=args.warmup).to_dict()
        except InputError as exc:  # the dynamo export of this model fixes its batch axis
            row["speed"][batch] = {"error": str(exc)}
    log(f"SiT: FLOPs {row['flops_ratio']:.2f}×, " + ", ".join(
        f"b{b} {s['speedup']:.2f}×" if "speedup" in s else f"b{b} n/a" for b, s in row["speed"].items()))
    return row


def run_minilm(args, log) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import minilm_token_pruning as mtp  # the MiniLM measurement helpers

    import trimrt
    from examples.models import corpus, minilm
    from trimrt.errors import TrimrtError

    module, example = minilm.minilm_embedder()
    tokenizer = minilm.load_tokenizer()
    baseline = args.out / "minilm.onnx"
    log(f"exporting all-MiniLM-L6-v2 (+ mean pooling, L2 norm) → {baseline}")
    trimrt.export(module, baseline, example_inputs=example)
    del module
    passages = {256: corpus.passages(tokenizer, 256, args.passages)}
    query_ids = [np.asarray(tokenizer(q)["input_ids"], dtype=np.int64) for q in corpus.queries(args.queries)]
    timing = [corpus.feeds(p.input_ids) for p in passages[256][:: max(1, len(passages[256]) // 8)][:8]]
    # batch b: b real passages of 256 tokens each (no padding), a few different batches
    timing_by_batch = {b: timing if b == 1 else
                       [corpus.feeds([p.input_ids for p in passages[256][i * b:(i + 1) * b]]) for i in range(2)]
                       for b in args.batches}
    base = mtp.backend(baseline, args.threads)
    base_emb = {"passages": {256: mtp.embed_passages(base, passages[256])}, "queries": mtp.embed_queries(base, query_ids)}
    base_flops = mtp.flops(baseline, timing[0])
    rows = []
    for method, budget, recipe in selected(minilm_recipes(), args.only):
        name = f"{method} {budget}"
        build_dir = args.out / slug(name)
        try:
            manifest = trimrt.compile(str(baseline), recipe, build_dir)
        except TrimrtError as exc:
            log(f"{name}: not built: {exc}")
            rows.append({"method": method, "budget": budget, "error": str(exc)})
            continue
        report = next(p["report"] for p in manifest["passes"] if p["pass"] in ("token_pruning", "token_merging"))
        build = mtp.backend(build_dir / "model.onnx", args.threads)
        emb = {"passages": {256: mtp.embed_passages(build, passages[256])}, "queries": mtp.embed_queries(build, query_ids)}
        fid = mtp.fidelity(base_emb, emb, 256)
        row = {"method": method, "budget": budget, "recipe": recipe, "tokens": realised_tokens(report, 256),
               "flops_ratio": base_flops / mtp.flops(build_dir / "model.onnx", timing[0]),
               "cosine": fid["cosine_mean"], "cosine_p5": fid["cosine_p5"], "top1": fid["top1"], "top5": fid["top5"],
               "speed": {}}
        for b in args.batches:
            speed = mtp.speed(base, build, timing_by_batch[b], warmup=args.warmup, rounds=args.rounds)
            row["speed"][b] = {**speed, "efficiency": speed["speedup"] / row["flops_ratio"]}
        rows.append(row)
        log(f"{name}: FLOPs {row['flops_ratio']:.2f}×, "
            + ", ".join(f"b{b} {row['speed'][b]['speedup']:.2f}×" for b in args.batches)
            + f", cos {fid['cosine_mean']:.4f}, top-1 {fid['top1']:.2f}, top-5 {fid['top5']:.2f}")
        del build
    return rows


def realised_tokens(report: dict, n: int) -> list:
    """Token counts per stage at n input tokens (dynamic-length builds report 'dynamic')."""
    out, cur = [n], n
    for layer in report["layers"]:
        if "merged" in layer:
            from trimrt.plugins.token_merge import merged_count

            cur -= merged_count(cur, layer["r"], 1, ratio=layer["ratio"])
        else:
            from trimrt.plugins.token_prune import span_keep

            kept = span_keep(cur - layer["protected"], layer["kept"] if isinstance(layer["kept"], int) else 0,
                             layer["keep_ratio"])
            cur = layer["protected"] + kept + (1 if layer["fused"] else 0) + layer.get("cells", 0)
        out.append(cur)
    return out


def selected(recipes, only):
    return [r for r in recipes if not only or any(o in r[0] for o in only)]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def markdown(rows: list[dict], batches: list[int], model: str) -> str:
    head = ["method", "budget", "tokens per stage", "FLOPs ratio (ideal)"]
    for b in batches:
        head += [f"b{b}: baseline → build ms", f"b{b} speedup", f"b{b} measured/ideal"]
    head += ["cosine", "top-1" if model == "vit" else "retrieval top-1", *(["retrieval top-5"] if model == "minilm" else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append("| " + " | ".join([r["method"], r["budget"], f"not built: {r['error']}"] + [""] * (len(head) - 3)) + " |")
            continue
        cells = [r["method"], r["budget"], " → ".join(map(str, r["tokens"])), f"{r['flops_ratio']:.2f}×"]
        for b in batches:
            s = r["speed"][b]
            if "error" in s:
                cells += ["n/a (batch axis fixed at 1 by the export)", "", ""]
                continue
            cells += [f"{s['baseline_ms']:.1f} → {s['build_ms']:.1f}", f"**{s['speedup']:.2f}×**",
                      f"{100 * s['speedup'] / r['flops_ratio']:.0f}%"]
        cells += [f"{r['cosine']:.4f}", f"{r['top1']:.0%}"]
        if model == "minilm":
            cells.append(f"{r['top5']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["vit", "minilm"], required=True)
    ap.add_argument("--only", nargs="*", default=[], help="methods to run (substring match), e.g. tome divprune")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16, help="ViT: random images for the fidelity check")
    ap.add_argument("--passages", type=int, default=200, help="MiniLM: 256-token passages for the fidelity check")
    ap.add_argument("--queries", type=int, default=50, help="MiniLM: held-out queries for retrieval agreement")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or Path(f"builds/bench_reduction_{args.model}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.batches = args.batches or [1, 8]

    import onnxruntime as ort

    import trimrt

    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    rows = run_vit(args, log) if args.model == "vit" else run_minilm(args, log)
    env = {"python": platform.python_version(), "onnxruntime": ort.__version__, "trimrt": trimrt.__version__,
           "cpu_count": os.cpu_count(), "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
           "seconds": round(time.perf_counter() - started)}
    (args.out / "results.json").write_text(json.dumps({"env": env, "model": args.model, "rows": rows}, indent=2,
                                                      default=float))
    print()
    print(markdown(rows, args.batches, args.model))
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
