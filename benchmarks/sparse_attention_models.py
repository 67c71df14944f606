"""Block-sparse attention end to end on long-sequence models, beside token pruning at equal FLOPs.

Three models (two with random weights), each built from its export and timed against it in one
process (alternating rounds after warm-up, medians, 2 threads, spinning off):

- `vit`: the in-tree ViT at DeiT-S width (384, 6 heads of 64) on 1024 × 1024 images in
  16-pixel patches: 64 × 64 = 4096 patches + CLS = 4097 tokens, 4 blocks, made to attend
  like a vision model: fixed 2-D sin-cos position embeddings (MAE's) and a key projection
  equal to the query projection (scaled up), so a patch attends the patches that
  resemble it, nearby ones most. Fidelity: cosine of the logits.
- `llama`: the LLaMA-style prefill model (examples/models/llama_style.py: RMSNorm, rotary
  positions, causal attention, SwiGLU; 4 blocks of width 512, 8 heads of 64) on 8192
  tokens; its causal mask is written into the graph and becomes the op's causal rule.
  Fidelity: cosine of the last token's logits (what generation reads next), over random
  prompts.
- `minilm`: the real, pretrained all-MiniLM-L6-v2 (sentence embeddings, mean pooling in
  the graph) on passages of 256 real tokens in blocks of 32: attention of a trained model
  on real text, where the fidelity of the selection and of the rectification shows (256
  tokens are too few for a speedup: its attention is a small share of the FLOPs).
  Fidelity: cosine of the embeddings.

Builds: dense with ONNX Runtime's attention fusion (its fused MultiHeadAttention where it
matches); block-sparse attention in every block at 25% and 12.5% block density (blocks of
128 tokens; the ViT's patches in tiles of 8 × 16, and once in sequence order), rectified
per token (the default), unrectified, and rectified per block (Rectified SpaAttn's
formula); token pruning after the attention of block 1 (EViT's CLS attention for the ViT,
FastV's last-token attention for the LLaMA, its first and last tokens kept) with `keep`
found by bisection on the manifests' FLOPs to equal the first sparse build's.

    python benchmarks/sparse_attention_models.py --model vit [--rounds 8] [--samples 4]
    python benchmarks/sparse_attention_models.py --model llama --density 0.25 --rounds 5 --samples 2
    python benchmarks/sparse_attention_models.py --model minilm --density 0.5 0.25 --samples 32
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import trimrt
from trimrt.bench import bench_build
from trimrt.compare import mean_cosine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the example models: examples.models

from examples.models.llama_style import llama_style  # noqa: E402
from examples.models.vit import ViTConfig, vit_factory  # noqa: E402

BLOCK = 128
VIT_GRID, VIT_PATCH = 64, 16
VIT = ViTConfig(image_size=VIT_GRID * VIT_PATCH, patch_size=VIT_PATCH, depth=4)
LLAMA_TOKENS = 8192
MINILM_TOKENS = 256


def high_resolution_vit(seed: int = 0, batch: int = 1):
    """The `vit` model of the docstring: 4097 tokens, attention by patch similarity with locality."""
    import torch

    model, example = vit_factory(VIT, seed=seed, batch=batch)
    width = VIT.width
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.from_numpy(_sincos_2d(VIT_GRID, width))
        for block in model.blocks:
            w, bias = block.attn.qkv.weight, block.attn.qkv.bias
            w[:width] *= 4.0
            w[width:2 * width] = w[:width]
            bias[width:2 * width] = bias[:width]
    return model, example


def llama_prefill(seed: int = 0, batch: int = 1):
    """The `llama` model of the docstring at 8192 tokens."""
    return llama_style(seed=seed, batch=batch, tokens=LLAMA_TOKENS)


def _sincos_2d(grid: int, width: int) -> np.ndarray:
    """[grid², width] fixed 2-D sin-cos position embeddings (half the features for rows, half for columns)."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(pos.reshape(-1, 1) * freqs) for pos in (rows, cols) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1).astype(np.float32)


@dataclass(frozen=True)
class Model:
    factory: str
    tokens: int
    grid: list[int] | None
    block: int  # tokens per block
    pruning: str  # the token pruning method of the same FLOPs
    feeds: Callable[[np.random.Generator], dict]
    compared: Callable[[np.ndarray], np.ndarray]  # the part of the output the fidelity is measured on
    #: the tokens pruning may drop (None: all but the first); the LLaMA keeps its first token
    #: (the attention sink) and its last (whose logits generation reads, the fidelity's too)
    prunable: list[int] | None = None


MODELS = {
    "vit": Model("benchmarks.sparse_attention_models:high_resolution_vit", VIT.num_tokens, [VIT_GRID, VIT_GRID],
                 BLOCK, "cls_attention",
                 lambda rng: {"pixel_values": rng.standard_normal((1, 3, VIT.image_size, VIT.image_size),
                                                                  dtype=np.float32)},
                 lambda logits: logits),
    "llama": Model("benchmarks.sparse_attention_models:llama_prefill", LLAMA_TOKENS, None, BLOCK,
                   "last_token_attention",
                   lambda rng: {"input_ids": rng.integers(0, 1000, (1, LLAMA_TOKENS), dtype=np.int64)},
                   lambda logits: logits[:, -1], prunable=[1, LLAMA_TOKENS - 1]),
    "minilm": Model("examples.models.minilm:minilm_embedder", MINILM_TOKENS, None, 32, "cls_attention",
                    lambda rng: _minilm_passage(rng), lambda embedding: embedding),
}


def _minilm_passage(rng: np.random.Generator) -> dict:
    """One passage of exactly 256 real tokens (Python standard-library docstrings), chosen by `rng`."""
    from examples.models import corpus

    passages = _minilm_passages()
    return corpus.feeds([passages[int(rng.integers(len(passages)))].input_ids])


@functools.lru_cache(maxsize=None)
def _minilm_passages():
    from examples.models import corpus, minilm

    return corpus.passages(minilm.load_tokenizer(), MINILM_TOKENS, 64)


def sparse_recipes(model: Model, densities: list[float]) -> dict[str, dict]:
    blocks = -(-model.tokens // model.block)
    layout = {"block_size": model.block, **({"order": "tiled", "grid": model.grid} if model.grid else {})}
    label = ", tiled" if model.grid else ""
    out = {"dense, ORT attention fusion": {"onnxruntime": {"fuse": True}}}
    for density in densities:
        top_k = max(1, round(density * blocks))
        out[f"sparse {top_k}/{blocks} blocks{label}, rectified per token"] = {"sparse_attention": {"top_k": top_k,
                                                                                                   **layout}}
        out[f"sparse {top_k}/{blocks} blocks{label}, unrectified"] = {
            "sparse_attention": {"top_k": top_k, "rectify": False, **layout}}
    top_k = max(1, round(densities[0] * blocks))
    out[f"sparse {top_k}/{blocks} blocks{label}, rectified per block (published formula)"] = {
        "sparse_attention": {"top_k": top_k, "rectify": "blocks", **layout}}
    if model.grid:
        out[f"sparse {top_k}/{blocks} blocks, sequence order, rectified per token"] = {
            "sparse_attention": {"top_k": top_k, "block_size": model.block}}
    return out


def example(model: Model) -> dict:
    """Inputs of the model's full length: the build's checks and FLOPs count run on them."""
    return model.feeds(np.random.default_rng(0))


def pruning(model: Model, keep: float) -> dict:
    span = {"prunable": model.prunable} if model.prunable else {}
    return {"token_pruning": {"method": model.pruning, "layers": [1], "keep": keep, **span}}


def matched_pruning(model: Model, baseline: Path, flops_ratio: float, out: Path, steps: int = 5):
    """(keep, build, manifest) of token pruning in block 1 whose FLOPs ratio (the manifest's) is
    closest to `flops_ratio`: bisection on keep (the ratio falls as keep grows)."""
    low, high, best = 0.02, 1.0, None
    for step in range(steps):
        keep = round((low + high) / 2, 3)
        build = out / f"pruning_{step}"
        manifest = trimrt.compile(str(baseline), pruning(model, keep), build, example_inputs=example(model))
        ratio = manifest["flops"]["ratio"]
        if best is None or abs(ratio - flops_ratio) < abs(best[2]["flops"]["ratio"] - flops_ratio):
            best = (keep, build, manifest)
        low, high = (keep, high) if ratio > flops_ratio else (low, keep)
    return best


def fidelity(model: Model, build: Path, baseline: Path, samples: int) -> float:
    """Mean cosine of the compared outputs, build against the export, on random inputs."""
    import onnxruntime as ort

    reference = ort.InferenceSession(str(baseline), providers=["CPUExecutionProvider"])
    session = trimrt.load(build)
    rng = np.random.default_rng(1)
    got, want = [], []
    for _ in range(samples):
        feeds = model.feeds(rng)
        got.append(model.compared(next(iter(session.run(feeds).values()))))
        want.append(model.compared(reference.run(None, feeds)[0]))
    return mean_cosine([{"out": w} for w in want], [{"out": g} for g in got])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--density", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4, help="random inputs for the fidelity check")
    ap.add_argument("--out", type=Path, default=None, help="default: builds/bench_sparse_<model>")
    args = ap.parse_args()
    model = MODELS[args.model]
    out = args.out or Path(f"builds/bench_sparse_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    baseline = out / "model.onnx"
    print(f"exporting {model.factory} ({model.tokens} tokens) → {baseline}", flush=True)
    trimrt.export(model.factory, baseline)

    rows = []
    builds = list(sparse_recipes(model, args.density).items()) + [("pruning", None)]
    for i, (name, recipe) in enumerate(builds):
        if recipe is None:  # token pruning at the FLOPs of the first sparse build
            target = next(r["flops_ratio"] for r in rows if "sparse_attention" in r["recipe"])
            try:
                keep, build, manifest = matched_pruning(model, baseline, target, out)
            except trimrt.TrimrtError as exc:
                print(f"{model.pruning} pruning: not measured, the model cannot be pruned: {exc}", flush=True)
                continue
            recipe = pruning(model, keep)
            name = f"{model.pruning} pruning, keep {keep} after block 1's attention (FLOPs of the first sparse build)"
        else:
            build = out / f"build{i}"
            manifest = trimrt.compile(str(baseline), recipe, build, example_inputs=example(model))
        cosine = fidelity(model, build, baseline, args.samples)
        speed = bench_build(build, baseline, batch=1, threads=args.threads, rounds=args.rounds, warmup=args.warmup,
                            tokens=model.tokens if model.grid is None else None)
        rows.append({"build": name, "recipe": recipe, "flops_ratio": manifest["flops"]["ratio"], "cosine": cosine,
                     **speed.to_dict()})
        print(f"{name}: {speed.baseline_ms:.0f} → {speed.build_ms:.0f} ms, {speed.speedup:.2f}× (FLOPs "
              f"{manifest['flops']['ratio']:.2f}×), cosine {cosine:.4f}", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    compared = {"vit": "the logits", "llama": "the last token's logits", "minilm": "the embeddings"}[args.model]
    print(f"\n{args.model}: {model.tokens} tokens, batch 1, {args.threads} threads; speedup over the export, medians "
          f"of {args.rounds} alternating rounds; cosine of {compared} on {args.samples} random inputs\n")
    print("| build | FLOPs ratio (ideal) | export → build ms | speedup | cosine |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['flops_ratio']:.2f}× | {r['baseline_ms']:.0f} → {r['build_ms']:.0f} | "
              f"**{r['speedup']:.2f}×** | {r['cosine']:.4f} |")


if __name__ == "__main__":
    main()
