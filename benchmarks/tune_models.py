"""`trimrt tune` against the best hand-written recipe of README at the same fidelity, in one run.

    python benchmarks/tune_models.py --model minilm            # budget 20 minutes, cosine >= 0.99
    python benchmarks/tune_models.py --model vit --budget 1200
    python benchmarks/tune_models.py --model llm               # perplexity at most +2%
    python benchmarks/tune_models.py --model minilm --metric retrieval --min-value 0.95

- minilm: all-MiniLM-L6-v2; calibration on the corpus' calibration texts, evaluation on
  NumPy's docstrings (another source), 256 tokens; README's recipe at cosine >= 0.99:
  INT8 RTN + ONNX Runtime fusion (`benchmarks/minilm_quantization.py`).
- vit: the DeiT-S-geometry ViT (random weights); calibration and evaluation on disjoint
  random images; README's recipe: EViT keep 0.7 at blocks 3, 6, 9 + INT8 + fusion
  (`benchmarks/vit_prune_int8.py`).
- llm: the LLaMA-architecture decoder trained here on the standard library's Python
  source (`benchmarks/decoder_quality.py`: 4 layers, width 256, 4096-token BPE; trained
  once into the work folder, about 4 minutes); calibration on training-side source lines,
  evaluation on held-out files' 128-token windows; the budget is perplexity; speed is a
  decode step (one token on a 128-token past); README's recipe: INT4 AWQ at group 32 (the
  most faithful INT4 of `benchmarks/decoder_quality.py`).

tune searches with its default space; then the chosen build and the hand-written one are
scored on the same evaluation samples and timed against the original model (alternating,
`--rounds`) in this process. `--work DIR` keeps the tune state: rerunning resumes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples.models
sys.path.insert(0, str(Path(__file__).resolve().parent))

HAND_WRITTEN = {
    "minilm": ("INT8 RTN + fusion (README)", {"onnxruntime": {"fuse": True}, "quantization": {"method": "rtn"}}),
    "vit": ("EViT keep 0.7 at 3, 6, 9 + INT8 + fusion (README)",
            {"token_pruning": {"layers": [3, 6, 9], "keep": 0.7, "fuse_pruned": True}, "quantization": {},
             "onnxruntime": {"fuse": True}}),
    "llm": ("INT4 AWQ g32 (README)", {"quantization": {"weights": "int4", "method": "awq", "group_size": 32}}),
}


def prepare(model: str, work: Path, samples: int) -> tuple[Path, Path, Path, dict]:
    """(the model's ONNX file, calibration data, evaluation data, tune's text options)."""
    import trimrt
    from examples.models import corpus, minilm

    if model == "minilm":
        from minilm_token_pruning import export_minilm

        onnx_path = work / "minilm.onnx"
        if not onnx_path.is_file():
            onnx_path, _ = export_minilm(work)
        (work / "calibration.txt").write_text("\n".join(corpus.calibration_texts(48)) + "\n")
        (work / "evaluation.txt").write_text("\n".join(corpus.other_source_texts(samples)) + "\n")
        return onnx_path, work / "calibration.txt", work / "evaluation.txt", {
            "tokenizer": str(minilm.model_dir()), "max_length": 256}
    if model == "llm":
        import decoder_quality as dq

        ckpt = dq.train_model(work, 600, 2)
        onnx_path = work / "llm.onnx"
        if not onnx_path.is_file():
            trimrt.export(str(ckpt), str(onnx_path))
        train_text, _ = dq.corpus()
        lines = [line for line in train_text.splitlines() if len(line) > 60]
        (work / "calibration.txt").write_text("\n".join(lines[::max(len(lines) // 64, 1)][:64]) + "\n")
        (work / "evaluation").mkdir(exist_ok=True)
        ids = np.array(dq.held_out_windows(ckpt, samples), np.int64)
        np.savez(work / "evaluation" / "windows.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        return onnx_path, work / "calibration.txt", work / "evaluation", {"tokenizer": str(ckpt), "max_length": 96}
    onnx_path = work / "deit_s.onnx"
    if not onnx_path.is_file():
        trimrt.export(f"{Path(__file__).resolve().parents[1] / 'examples/models/vit.py'}:deit_small", str(onnx_path))
    for name, seed in (("calibration", 1), ("evaluation", 2)):
        (work / name).mkdir(exist_ok=True)
        images = np.random.default_rng(seed).standard_normal((samples, 3, 224, 224)).astype(np.float32)
        np.save(work / name / "images.npy", images)
    return onnx_path, work / "calibration", work / "evaluation", {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(HAND_WRITTEN), default="minilm")
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--max-perplexity-increase", type=float, default=0.02, help="llm: the budget")
    parser.add_argument("--metric", choices=["cosine", "top1", "retrieval"], default="cosine",
                        help="encoders: the fidelity metric (--min-value its budget; cosine's is --min-cosine)")
    parser.add_argument("--min-value", type=float, help="the budget of --metric top1 / retrieval")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds of the final comparison")
    parser.add_argument("--work", type=Path, help="Work folder (default: a new temporary one); reuse it to resume.")
    args = parser.parse_args()

    import trimrt
    from trimrt.bench import bench_build
    from trimrt.tuning.evaluation import Evaluation
    from trimrt.tuning.report import value_text

    work = args.work or Path(tempfile.mkdtemp(prefix="trimrt-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path, data, eval_data, text = prepare(args.model, work, args.samples)
    started = time.perf_counter()
    decoder = args.model == "llm"
    if decoder:
        budget = {"min_value": 1 / (1 + args.max_perplexity_increase)}
    else:
        budget = {"metric": args.metric, "min_cosine": args.min_cosine, "min_value": args.min_value}
    result = trimrt.tune(str(onnx_path), data=data, eval_data=eval_data, out_dir=work / "tuned", budget_s=args.budget,
                         samples=args.samples, progress=lambda m: print(f"  {m}", flush=True), **budget, **text)
    print(f"\ntune: {result.message} ({time.perf_counter() - started:.0f} s)\nreport: {result.report}")
    if result.best is None:
        return 1
    name, recipe = HAND_WRITTEN[args.model]
    if decoder:
        recipe = {**recipe, "calibration": {"source": str(data), "samples": 64, **text}}
    hand = work / "hand_written"
    if not (hand / "manifest.json").is_file():
        trimrt.compile(str(onnx_path), recipe, hand)
    metric = "perplexity" if decoder else args.metric
    evaluation = Evaluation(onnx_path, Path(eval_data), args.samples, text.get("tokenizer"), text.get("max_length"),
                            metric)
    feeds = work / "tuned.tune" / "bench_batch1.npz"  # what tune timed: a decode step for the llm
    print(f"\n| build | speedup over the original (batch 1{', decode step' if decoder else ''}) | "
          f"fidelity on the evaluation data |\n|---|---|---|")
    for label, build in [(f"tune: {result.best.name}", work / "tuned"), (name, hand)]:
        with trimrt.load(build, threads=2, spinning=False) as session:
            fidelity = evaluation.score(session)
        report = bench_build(build, onnx_path, rounds=args.rounds, warmup=5, inputs=[str(feeds)])
        print(f"| {label} | {report.speedup:.2f}× | {value_text(metric, fidelity)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
