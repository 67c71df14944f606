"""FastV in generation: a LLaVA-like prompt whose 576 image tokens are pruned at prefill.

The prompt: 35 system/prefix tokens, 576 image tokens, 60 text tokens (671 in all). The
FastV recipe keeps 25% of the image span after the attention of layer 2, scored by the
last token's attention row; everything outside the span is kept, positions stay the
originals, and the layers after layer 2 cache only the kept tokens, so every decode step
attends over the smaller cache. The model is the one of decoder_generation.py (a random
LLaMA of about 150 M parameters: width 768, 12 layers, GQA 12/4, vocabulary 32000),
compiled with a KV cache in fp32 and INT4 (MatMulNBits, groups of 128), each with and
without FastV, and run by trimrt's generation loop on ONNX Runtime CPU (what `trimrt
generate` prints: time to first token, decode tokens/s, KV-cache bytes); Hugging Face
`generate()` on PyTorch runs the unpruned model in the same process. Engines take turns
round by round, after a warm-up round; the table shows medians. The FastV build's tokens
are checked against FastV generation written in PyTorch (tests/families/fastv_reference.py).

    python benchmarks/decoder_fastv.py [--new 64] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from decoder_generation import compiled_generators, generation_rounds, hf_times, make_model, print_generation_table

from trimrt.compiler.flops import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.families
from tests.families.fastv_reference import fastv_generate  # noqa: E402

PREFIX, IMAGE, TEXT = 35, 576, 60
INT4 = {"quantization": {"weights": "int4", "group_size": 128}}


def recipes(layer: int, keep: float) -> dict:
    fastv = {"token_pruning": {"method": "last_token_attention", "layers": [layer], "keep": keep,
                               "prunable": [PREFIX, PREFIX + IMAGE]}}
    return {"fp32": None, "fp32 + FastV": fastv, "int4": INT4, "int4 + FastV": {**fastv, **INT4}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--prune-layer", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_fastv"))
    ap.add_argument("--reuse-builds", action="store_true",
                    help="time the trimrt builds already in --out instead of compiling them again")
    args = ap.parse_args()

    model = make_model(args)
    prompt = np.random.default_rng(0).integers(2, 32000, PREFIX + IMAGE + TEXT).tolist()
    print(f"LLaMA {args.layers} layers, width {args.width}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"parameters; prompt {len(prompt)} tokens ({IMAGE} image tokens), {args.new} new tokens, "
          f"{args.threads} threads", flush=True)
    generators = compiled_generators(model, recipes(args.prune_layer, args.keep), args.out, args.threads,
                                     reuse=args.reuse_builds)
    prefill = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
               "position_ids": np.arange(len(prompt))[None], **generators["fp32"].spec.empty_cache(1)}
    flops = {name: count_flops(onnx.load(str(args.out / unpruned / "model.onnx")), prefill)
             / count_flops(onnx.load(str(args.out / name.replace(" + ", "_") / "model.onnx")), prefill)
             for name, unpruned in (("fp32 + FastV", "fp32"), ("int4 + FastV", "int4"))}
    with torch.no_grad():
        reference, _ = fastv_generate(model, torch.tensor([prompt]), (args.prune_layer,), args.keep,
                                      (PREFIX, PREFIX + IMAGE), args.new)
    results, tokens, cache = generation_rounds(generators, prompt, args.new, args.rounds,
                                               lambda: hf_times(model, prompt, args.new, args.threads))
    cache["pytorch"] = cache["fp32"]  # the same cache: every layer holds every token
    print(f"\nFastV build's tokens equal FastV generation in PyTorch: {tokens['fp32 + FastV'] == reference[0]}")
    # each FastV build against its own unpruned build
    print_generation_table(results, cache, lambda name: "int4" if name.startswith("int4") else "fp32", flops,
                           {"pytorch": "Hugging Face generate (PyTorch)"})

if __name__ == "__main__":
    main()
