"""`trimrt tune` against the best hand-written recipe of README at the same fidelity, in one run.

    python benchmarks/tune_models.py --model minilm            # budget 20 minutes, cosine >= 0.99
    python benchmarks/tune_models.py --model vit --budget 1200

- minilm: all-MiniLM-L6-v2; calibration on the corpus' calibration texts, evaluation on
  NumPy's docstrings (another source), 256 tokens; README's recipe at cosine >= 0.99:
  INT8 RTN + ONNX Runtime fusion (`benchmarks/minilm_quantization.py`).
- vit: the DeiT-S-geometry ViT (random weights); calibration and evaluation on disjoint
  random images; README's recipe: EViT keep 0.7 at blocks 3, 6, 9 + INT8 + fusion
  (`benchmarks/vit_prune_int8.py`).

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
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds of the final comparison")
    parser.add_argument("--work", type=Path, help="Work folder (default: a new temporary one); reuse it to resume.")
    args = parser.parse_args()

    import trimrt
    from trimrt.bench import bench_build
    from trimrt.tuning.search import Evaluation

    work = args.work or Path(tempfile.mkdtemp(prefix="trimrt-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path, data, eval_data, text = prepare(args.model, work, args.samples)
    started = time.perf_counter()
    result = trimrt.tune(str(onnx_path), data=data, eval_data=eval_data, out_dir=work / "tuned",
                         min_cosine=args.min_cosine, budget_s=args.budget, samples=args.samples,
                         progress=lambda m: print(f"  {m}", flush=True), **text)
    print(f"\ntune: {result.message} ({time.perf_counter() - started:.0f} s)\nreport: {result.report}")
    if result.best is None:
        return 1
    name, recipe = HAND_WRITTEN[args.model]
    hand = work / "hand_written"
    if not (hand / "manifest.json").is_file():
        trimrt.compile(str(onnx_path), recipe, hand)
    evaluation = Evaluation(onnx_path, Path(eval_data), args.samples, text.get("tokenizer"), text.get("max_length"),
                            "cosine")
    feeds = work / "tuned.tune" / "bench_batch1.npz"
    print("\n| build | speedup over the original (batch 1) | cosine on the evaluation data |\n|---|---|---|")
    for label, build in [(f"tune: {result.best.name}", work / "tuned"), (name, hand)]:
        with trimrt.load(build, threads=2, spinning=False) as session:
            fidelity = evaluation.score(session)
        report = bench_build(build, onnx_path, rounds=args.rounds, warmup=5, inputs=[str(feeds)])
        print(f"| {label} | {report.speedup:.2f}× | {fidelity:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
