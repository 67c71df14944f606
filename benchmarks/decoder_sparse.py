"""Block-sparse prompts in generation: a long prompt's attention block-sparse at prefill,
decode steps dense on the cache.

A random LLaMA (width 512, 8 heads × 64, GQA 8/2, 4 layers, vocabulary 32000) compiled
with a KV cache in fp32, dense and with [sparse_attention] in every layer (blocks of 128,
causal from the decoder's mask, `--density` of the key blocks, rectified per token), run by
trimrt's generation loop on ONNX Runtime CPU: time to first token (the prompt's prefill),
decode tokens/s and the KV cache, as `trimrt generate` prints them; the dense model on
PyTorch (transformers, SDPA attention, greedy with its own cache) runs in the same process.
With the composition: FastV token pruning alone (the prompt's tokens but its first and last
64 are prunable; `--keep` of them stay after the attention of layer 1, which stays dense:
its scores read it) and FastV with the sparse prompt in the other layers, in one build
(`--no-fastv` leaves them out). Engines take turns round by round after a warm-up round;
the table shows medians. The FLOPs ideal is the prompt's (the op's selection included).
Fidelity: cosine of the prompt's last-token logits against the dense build, and how many
of the generated tokens agree (random weights: neither is discriminating).

With `--window W` the same layers are Mistral's, each sliding over W tokens (the op takes
the window; a dense build masks its [N, N] scores).

    python benchmarks/decoder_sparse.py [--prompt 8192] [--density 0.25] [--new 64] [--rounds 5] [--keep 0.5]
                                        [--window 4096]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from decoder_generation import generation_rounds, print_generation_table

import trimrt
from trimrt.compiler.flops import count_flops


def make_model(args):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=args.width, intermediate_size=args.width * 4, num_hidden_layers=args.layers,
                  num_attention_heads=args.width // 64, num_key_value_heads=2, vocab_size=32000,
                  max_position_embeddings=2 * args.prompt + args.new, eos_token_id=0, bos_token_id=1)
    if args.window:  # Mistral: the same layers, each sliding over the window
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=args.window)).eval()
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits are not near-ties
        model.lm_head.weight.mul_(20)
    return model


def pytorch_times(model, prompt: list[int], new: int, threads: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode tokens/s, tokens) of greedy decoding with the model's own cache on
    PyTorch (the prefill and the steps timed apart: a long prompt's prefill varies more than
    a few steps take)."""
    torch.set_num_threads(threads)
    with torch.no_grad():
        started = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        first = time.perf_counter() - started
        token = out.logits[:, -1:].argmax(-1)
        tokens, started = [int(token)], time.perf_counter()
        for _ in range(new - 1):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        rate = (new - 1) / (time.perf_counter() - started)
    return first, rate, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--density", type=float, default=0.25, help="share of the key blocks each query block attends")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--keep", type=float, default=0.5, help="FastV's share of the prunable tokens kept after layer 1")
    ap.add_argument("--no-fastv", action="store_true", help="leave out the FastV and FastV + sparse builds")
    ap.add_argument("--window", type=int, default=0, help="a Mistral whose layers slide over this many tokens")
    ap.add_argument("--out", type=Path, default=Path("builds/bench_decoder_sparse"))
    args = ap.parse_args()

    model = make_model(args)
    blocks = -(-args.prompt // args.block_size)
    top_k = max(2, round(args.density * blocks))
    sparse = {"block_size": args.block_size, "top_k": top_k}
    recipes = {"dense": None, "sparse": {"sparse_attention": sparse}}
    if not args.no_fastv:
        fastv = {"method": "last_token_attention", "layers": [1], "keep": args.keep, "prunable": [64, args.prompt - 64]}
        recipes.update({"fastv": {"token_pruning": fastv}, "fastv + sparse": {"token_pruning": fastv,
                                                                              "sparse_attention": sparse}})
    folders = {name: args.out / name.replace(" + ", "_") for name in recipes}
    generators = {}
    for name, recipe in recipes.items():
        build = folders[name]
        shutil.rmtree(build, ignore_errors=True)
        print(f"compiling {name} ...", flush=True)
        trimrt.compile(model, recipe, build)
        generators[name] = trimrt.load(build, threads=args.threads, spinning=False).generator()
    prompt = np.random.default_rng(0).integers(2, 32000, args.prompt).tolist()
    spec = generators["dense"].spec
    prefill = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
               "position_ids": np.arange(len(prompt))[None], **spec.empty_cache(1)}
    flops = {name: count_flops(onnx.load(str(folder / "model.onnx")), prefill) for name, folder in folders.items()}
    ideal = {name: flops["dense"] / f for name, f in flops.items() if name != "dense"}
    logits = {name: gen.session.run(prefill)["logits"][0, -1] for name, gen in generators.items()}
    cosine = {name: float(logits["dense"] @ x / np.linalg.norm(logits["dense"]) / np.linalg.norm(x))
              for name, x in logits.items() if name != "dense"}
    family = f"Mistral (window {args.window})" if args.window else "LLaMA"
    print(f"{family} {args.layers} layers, width {args.width}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"parameters; prompt {args.prompt} tokens, {args.new} new tokens, {args.threads} threads; sparse: "
          f"{top_k} of {blocks} key blocks of {args.block_size} in every layer", flush=True)
    results, tokens, cache = generation_rounds(generators, prompt, args.new, args.rounds,
                                               lambda: pytorch_times(model, prompt, args.new, args.threads))
    cache["pytorch"] = cache["dense"]
    print()
    for name, value in cosine.items():
        agree = sum(a == b for a, b in zip(tokens[name], tokens["dense"]))
        print(f"last-token logits of the prompt, {name} against dense: cosine {value:.4f}; generated tokens agreeing: "
              f"{agree} of {args.new}")
    print_generation_table(results, cache, lambda name: "dense", ideal, {"pytorch": "transformers on PyTorch, dense"})

if __name__ == "__main__":
    main()
