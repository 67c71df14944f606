"""`trimrt tune` on all-MiniLM-L6-v2 against the best hand-written recipe, in one run.

    python benchmarks/tune_minilm.py                   # budget 20 minutes, cosine >= 0.99
    python benchmarks/tune_minilm.py --budget 600 --min-cosine 0.98

Calibration: the corpus' calibration texts; evaluation: NumPy's docstrings (another source),
256 tokens each (the tokenizer pads shorter texts). tune searches with its default space;
then the chosen build and the hand-written recipe of README at this fidelity (INT8 RTN +
ONNX Runtime fusion: `benchmarks/minilm_quantization.py`) are compiled, verified on the same
evaluation texts and timed against the original model, alternating, in this process.
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

HAND_WRITTEN = ("INT8 RTN + fusion (README)", {"onnxruntime": {"fuse": True}, "quantization": {"method": "rtn"}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1200.0, help="seconds")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds of the final comparison")
    parser.add_argument("--work", type=Path, help="Work folder (default: a new temporary one); reuse it to resume.")
    args = parser.parse_args()

    from minilm_token_pruning import export_minilm

    import trimrt
    from examples.models import corpus, minilm
    from trimrt.bench import bench_build

    work = args.work or Path(tempfile.mkdtemp(prefix="trimrt-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "minilm.onnx"
    if not onnx_path.is_file():
        onnx_path, _ = export_minilm(work)
    (work / "calibration.txt").write_text("\n".join(corpus.calibration_texts(48)) + "\n")
    (work / "evaluation.txt").write_text("\n".join(corpus.other_source_texts(args.samples)) + "\n")
    tokenizer = str(minilm.model_dir())
    started = time.perf_counter()
    result = trimrt.tune(str(onnx_path), data=work / "calibration.txt", eval_data=work / "evaluation.txt",
                         out_dir=work / "tuned", min_cosine=args.min_cosine, budget_s=args.budget, samples=args.samples,
                         tokenizer=tokenizer, max_length=256, progress=lambda m: print(f"  {m}", flush=True))
    print(f"\ntune: {result.message} ({time.perf_counter() - started:.0f} s)\nreport: {result.report}")
    if result.best is None:
        return 1
    hand = work / "hand_written"
    if not (hand / "manifest.json").is_file():
        trimrt.compile(str(onnx_path), HAND_WRITTEN[1], hand)
    feeds = {k: v for k, v in np.load(work / "tuned.tune" / "bench_batch1.npz").items()}
    np.savez(work / "feeds.npz", **feeds)
    print("\n| build | speedup over the original (batch 1, 256 tokens) | cosine on the evaluation texts |")
    print("|---|---|---|")
    for name, build, fidelity in [(f"tune: {result.best.name}", work / "tuned", result.best.fidelity),
                                  (HAND_WRITTEN[0], hand, _fidelity(result, hand))]:
        report = bench_build(build, onnx_path, rounds=args.rounds, warmup=5, inputs=[str(work / "feeds.npz")])
        print(f"| {name} | {report.speedup:.2f}× | {fidelity:.4f} |", flush=True)
    return 0


def _fidelity(result, build: Path) -> float:
    """The hand-written build's cosine on the same evaluation samples (the tune state holds
    its measurement when tune tried the same recipe)."""
    recipe = HAND_WRITTEN[1]
    same = [m for m in result.measurements if m.recipe == recipe and m.fidelity is not None]
    if same:
        return same[0].fidelity
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
