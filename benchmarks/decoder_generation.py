"""Generation speed of decoder builds: time to first token and decode tokens/s.

A LLaMA-architecture model large enough to be memory-bound at decode (random weights,
about 150 M parameters: width 768, 12 layers, GQA 12/4 heads, SwiGLU 3072, vocabulary
32000), compiled by trimrt with a KV cache in fp32, INT8 (weights and activations,
round to nearest) and INT4 (weight-only MatMulNBits, groups of 128), and run by trimrt's
generation loop on ONNX Runtime CPU (fp32 and INT4 also built `--target openvino` and run on
OpenVINO, unless --no-openvino); Hugging Face `generate()` on PyTorch CPU runs the
same model in the same process, and so do the peers, when installed, from the same
weights saved as a local checkpoint: ONNX Runtime GenAI on the exports of its own model
builder (fp32, and INT4 with its CPU default: MatMulNBits at accuracy level 4, which also
quantizes activations to int8) and OpenVINO GenAI (benchmarks/openvino_peer.py: fp32, and
NNCF's data-free INT4). Every engine generates the same number of tokens greedily from
the same prompt; engines take turns round by round (each round starting one engine
later, each turn after a pause that lets the previous engine's threads go idle) and the
table shows medians. trimrt
runs with ONNX Runtime's spinning off (the project's rule for timing), and its fp32 and
INT4 builds once more with spinning on: ONNX Runtime GenAI spins and offers no setting
to stop it, so those are the rows to compare with it. Random weights: a speed check; quality is measured apart.

    python benchmarks/decoder_generation.py [--prompt 128] [--new 64] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from openvino_peer import openvino_genai_engines, openvino_genai_times, save_checkpoint

import trimrt

#: builds timed a second time with ONNX Runtime's intra-op spinning on, as ONNX Runtime GenAI runs
#: (its session options cannot turn spinning off): the like-for-like rows against it
SPINNING = ("fp32", "int4")
#: pause before each engine's turn: the spinning threads of the one before it (ONNX Runtime
#: GenAI's, PyTorch's OpenMP pool) go idle instead of taking the cores from it
IDLE_S = 0.5
RECIPES = {
    "fp32": None,
    "int8": {"quantization": {"weights": "int8", "activations": "int8"}},
    "int4": {"quantization": {"weights": "int4", "group_size": 128}},
}
#: the same recipes built --target openvino (standard attention, the past fed each step; INT4 as
#: blocked DequantizeLinear, which OpenVINO runs as compressed weights), run on OpenVINO
OPENVINO_RECIPES = {"fp32 on openvino": RECIPES["fp32"], "int4 on openvino": RECIPES["int4"]}


def make_model(args):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.width, intermediate_size=args.width * 4, num_hidden_layers=args.layers,
                            num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                            max_position_embeddings=2048, eos_token_id=0, bos_token_id=1)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits are not near-ties
        model.lm_head.weight.mul_(20)
    return model


def compiled_generators(model, recipes: dict, out: Path, threads: int, spinning: tuple[str, ...] = (),
                        reuse: bool = False, target: str = "onnxruntime") -> dict:
    """{name: trimrt Generator} of `model` compiled with each recipe for `target` (a build found in
    `out` is reused only with `reuse`: a build of older code would time older code), ONNX Runtime
    spinning off; the builds named in `spinning` once more with it on."""
    generators = {}
    for name, recipe in recipes.items():
        build = out / name.replace(" + ", "_").replace(" ", "_")
        if not reuse and build.exists():
            shutil.rmtree(build)
        if not (build / "manifest.json").is_file():
            print(f"compiling {name} ...", flush=True)
            trimrt.compile(model, recipe, build, target=target)
        generators[name] = trimrt.load(build, threads=threads, spinning=False).generator()
        if name in spinning:
            generators[f"{name}, spinning"] = trimrt.load(build, threads=threads, spinning=True).generator()
    return generators


def generation_rounds(generators: dict, prompt: list[int], new: int, rounds: int, pytorch) -> tuple[dict, dict, dict]:
    """The engines take turns, round by round, the first round a warm-up: ({name: [(time to
    first token s, decode tokens/s), ...]}, {name: tokens}, {name: KV-cache bytes at the end});
    `pytorch()` -> (first s, tokens/s, tokens) runs as "pytorch" in each round (no cache size)."""
    results = {name: [] for name in [*generators, "pytorch"]}
    tokens, cache = {}, {}
    for _ in range(rounds + 1):
        for name, gen in generators.items():
            out = gen.generate(prompt, max_new_tokens=new)
            tokens[name], cache[name] = out.tokens, out.stats.kv_cache_bytes
            results[name].append((out.stats.time_to_first_token_s, out.stats.decode_tokens_per_s))
        first, rate, tokens["pytorch"] = pytorch()
        results["pytorch"].append((first, rate))
    return {name: rows[1:] for name, rows in results.items()}, tokens, cache


def print_generation_table(results: dict, cache: dict, baseline, ideal: dict, labels: dict) -> None:
    """The markdown table of `generation_rounds`' results: medians, each engine's speedups against
    `baseline(name)`'s (the engine it is compared with), the prefill FLOPs ideal where `ideal` has
    one, `labels` for engines not named "trimrt <name>"."""
    medians = {name: [statistics.median(row[key] for row in rows) for key in (0, 1)] for name, rows in results.items()}
    print("\n| engine | prefill FLOPs ratio (ideal) | time to first token | TTFT speedup | decode tokens/s | "
          "decode speedup | KV cache at the end |")
    print("|---|---|---|---|---|---|---|")
    for name, (first, rate) in medians.items():
        base_first, base_rate = medians[baseline(name)]
        print(f"| {labels.get(name, f'trimrt {name}')} | {f'{ideal[name]:.2f}×' if ideal.get(name) else '-'} | "
              f"{first * 1e3:.0f} ms | {base_first / first:.2f}× | {rate:.1f} | {rate / base_rate:.2f}× | "
              f"{cache[name] / 2**20:.1f} MiB |")


def hf_times(model, prompt: list[int], new: int, threads: int) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s, tokens) of Hugging Face generate() on PyTorch,
    both from one call: a streamer notes when each new token comes (a second, prefill-only
    call to subtract would carry the prefill's own variation into the decode rate, which
    a long prompt's makes negative)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(threads)
    ids, clock = torch.tensor([prompt]), Clock()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                             streamer=clock)
    start, first, last = clock.times[0], clock.times[1], clock.times[-1]
    return first - start, (new - 1) / max(last - first, 1e-9), out[0, len(prompt):].tolist()


def genai_engines(model, out: Path, threads: int) -> dict:
    """ONNX Runtime GenAI models built by its own builder from `model` saved as a checkpoint
    (with a word-level tokenizer, which the builder needs): {name: og.Model}, or {} with the
    reason printed when it is not installed or fails."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        print("ONNX Runtime GenAI: not installed (pip install onnxruntime-genai); its rows are skipped")
        return {}
    import json
    import subprocess
    import sys

    ckpt = out / "hf"
    if not (ckpt / "config.json").is_file():
        save_checkpoint(model, ckpt)
    engines = {}
    for precision in ("fp32", "int4"):
        folder = out / f"genai_{precision}"
        if not (folder / "genai_config.json").is_file():
            print(f"building ONNX Runtime GenAI {precision} ...", flush=True)
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o",
                                   str(folder), "-p", precision, "-e", "cpu"], capture_output=True, text=True)
            if done.returncode:
                print(f"ONNX Runtime GenAI {precision}: its builder failed: {done.stderr.strip().splitlines()[-1]}")
                continue
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
        (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
        engines[f"onnxruntime-genai {precision}"] = og.Model(str(folder))
    return engines


def genai_times(og_model, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s, tokens) of one ONNX Runtime GenAI generation."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    started = time.perf_counter()
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    gen.generate_next_token()
    first = time.perf_counter() - started
    tokens = [int(gen.get_next_tokens()[0])]
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    whole = time.perf_counter() - started
    return first, (len(tokens) - 1) / max(whole - first, 1e-9), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", type=Path, default=Path("builds/bench_generation"))
    ap.add_argument("--no-openvino", action="store_true", help="leave out trimrt's --target openvino builds")
    ap.add_argument("--reuse-builds", action="store_true",
                    help="time the trimrt builds already in --out instead of compiling them again")
    args = ap.parse_args()

    model = make_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA {args.layers} layers, width {args.width}: {params / 1e6:.0f} M parameters; prompt {args.prompt} "
          f"tokens, {args.new} new tokens, {args.threads} threads", flush=True)
    print(f"KV cache at the end: {2 * args.layers * 4 * (args.width // 12) * (args.prompt + args.new) * 4 / 2**20:.1f} MiB "
          "(fp32, every engine)")
    generators = compiled_generators(model, RECIPES, args.out, args.threads, spinning=SPINNING,
                                     reuse=args.reuse_builds)
    if not args.no_openvino:
        generators.update(compiled_generators(model, OPENVINO_RECIPES, args.out, args.threads, reuse=args.reuse_builds,
                                              target="openvino"))
    peers = genai_engines(model, args.out, args.threads)
    if not (args.out / "hf" / "config.json").is_file():
        save_checkpoint(model, args.out / "hf")
    peers.update(openvino_genai_engines(args.out / "hf", args.out, args.threads))
    prompt = np.random.default_rng(0).integers(2, 32000, args.prompt).tolist()
    results = {name: [] for name in [*generators, *peers, "pytorch"]}
    tokens = {}
    def run(name: str) -> tuple[float, float, list[int]]:
        if name in generators:
            out = generators[name].generate(prompt, max_new_tokens=args.new)
            return out.stats.time_to_first_token_s, out.stats.decode_tokens_per_s, out.tokens
        if name in peers:
            timed = openvino_genai_times if name.startswith("openvino") else genai_times
            return timed(peers[name], prompt, args.new)
        return hf_times(model, prompt, args.new, args.threads)

    order = list(results)
    for round_ in range(args.rounds + 1):  # the first round warms up
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:  # each round starts one engine later
            time.sleep(IDLE_S)
            first, rate, tokens[name] = run(name)
            results[name].append((first, rate))
    base_rate = statistics.median(r for _, r in results["fp32"][1:])
    print("\n| engine | time to first token | decode tokens/s | × trimrt fp32 decode | same tokens as trimrt fp32 |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        first = statistics.median(f for f, _ in rows[1:])
        rate = statistics.median(r for _, r in rows[1:])
        same = "yes" if tokens[name] == tokens["fp32"] else "no"
        label = {"pytorch": "Hugging Face generate (PyTorch)"}.get(name, name if "genai" in name else f"trimrt {name}")
        print(f"| {label} | {first * 1e3:.0f} ms | {rate:.1f} | {rate / base_rate:.2f}× | {same} |")
    paired_against_peers(results)


def paired_against_peers(results: dict) -> None:
    """trimrt's decode rate over ONNX Runtime GenAI's, round by round (the two ran seconds apart in
    each round, so the machine's drift over the run cancels in each ratio): median and range."""
    pairs = [(f"{ours}{spin}", f"onnxruntime-genai {ours}") for ours in ("fp32", "int4") for spin in ("", ", spinning")]
    pairs = [(a, b) for a, b in pairs if a in results and b in results]
    if not pairs:
        return
    print("\n| trimrt / ONNX Runtime GenAI, decode tokens/s, per round | median | range |")
    print("|---|---|---|")
    for ours, theirs in pairs:
        ratios = [a[1] / b[1] for a, b in zip(results[ours][1:], results[theirs][1:])]
        print(f"| {ours} | {statistics.median(ratios):.2f}× | {min(ratios):.2f}–{max(ratios):.2f}× |")


if __name__ == "__main__":
    main()
