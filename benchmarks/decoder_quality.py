"""Quality of quantized and FastV-pruned decoder builds on a real (small, trained here) language model.

No pretrained decoder with its weights installs offline, so this script trains one: a
LLaMA-architecture model (4 layers, width 256, GQA 4/2 heads) with a byte-level BPE
tokenizer (4096 tokens), on the Python standard library's own source files, which every
Python installation carries. Files are split by a hash of their path: about 90% train
(and calibrate), 10% are held out; every number below is on held-out files only.

For each build: perplexity on held-out 128-token windows (from the build's prefill
logits) against fp32; the perplexity of 32-token continuations after a 96-token prompt
(the prompt through the build's prefill, which FastV prunes, the continuation through one
decode step on that cache, teacher-forced; 128 tokens in all, the training length); and
greedy-continuation agreement: the share of the first 32 generated tokens equal to the
fp32 build's, from 24 held-out 96-token prompts. FastV keeps 50% or 25% of the prompt's
tokens 8-87 after the attention of layer 1 (of 4); its prefill has no logits for pruned
positions, so only the last two apply. Mixture-of-Depths routes the same span with the
training-free attention router (p-MoD's schedule, and ratios of FastV 50%'s FLOPs); the
prefill FLOPs ratio of the token-reducing rows compares them at equal cost.

    python benchmarks/decoder_quality.py [--size small|base] [--steps N] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

import trimrt
from trimrt.compare import next_token_nll

VOCAB, WINDOW = 4096, 128
#: continuation perplexity: a prompt of PROMPT tokens, then CONTINUATION teacher-forced ones
PROMPT, CONTINUATION = 96, 32  # 128 in all: the length the model was trained on
#: the prompt tokens FastV may prune
SPAN = [8, 88]


def corpus() -> tuple[str, str]:
    """(train text, held-out text): the stdlib's .py files, split by a hash of their path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        bucket = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 10
        (held if bucket == 0 else train).append(text)
    return "\n".join(train), "\n".join(held)


#: model sizes: "small" (5 M parameters, 20 MB: a decode step stays in the CPU's cache, so it is
#: compute-bound; ~4 min of training on 2 cores), "base" (28 M, 111 MB) and "large" (57 M, 226 MB),
#: more and more weight-bound at decode, as the decoders users deploy are (bf16 autocast: ~0.8 and
#: ~1.8 s a training step on 2 AVX512-BF16 cores, ~25 and ~45 min in all)
GEOMETRIES = {
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, lr=3e-3, text=6_000_000, bf16=False),
    "base": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, lr=1.5e-3, text=16_000_000, bf16=True),
    "large": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, lr=1e-3, text=16_000_000, bf16=True),
}


def train_model(out: Path, steps: int, threads: int, size: str = "small") -> Path:
    """Train tokenizer and model once; returns the checkpoint folder (config, weights, tokenizer)."""
    ckpt = out / "ckpt"
    if (ckpt / "config.json").is_file():
        return ckpt
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train_text, _ = corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_text.split("\n\n"), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    geometry = dict(GEOMETRIES[size])
    lr, text, bf16 = geometry.pop("lr"), geometry.pop("text"), geometry.pop("bf16")
    ids = np.array(tok.encode(train_text[:text]).ids, np.int64)
    print(f"corpus: {len(train_text) / 1e6:.1f} MB of train text, {len(ids) / 1e6:.2f} M tokens used", flush=True)

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = tf.LlamaConfig(**geometry, vocab_size=VOCAB, max_position_embeddings=512, eos_token_id=0,
                            bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config)
    print(f"training {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {steps} steps",
          flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(ids) - WINDOW - 1, 16)
        batch = torch.from_numpy(np.stack([ids[s:s + WINDOW] for s in starts]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # fp32 master weights
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval().save_pretrained(ckpt)
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "eos_token": "<eos>", "pad_token": "<eos>"}))
    return ckpt


def add_model_arguments(ap: argparse.ArgumentParser, size: str = "small") -> None:
    """The options that choose, and if needed train, the model (shared with decoder_speculation.py)."""
    ap.add_argument("--size", choices=sorted(GEOMETRIES), default=size, help=f"model size (default {size}; "
                    "see GEOMETRIES)")
    ap.add_argument("--steps", type=int, help="training steps of 16 × 128 tokens (default: 600 small, 1800 base, "
                    "1500 large)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="work folder (default: builds/bench_quality, builds/bench_quality_base)")


def trained(args: argparse.Namespace) -> Path:
    """The checkpoint of the model `add_model_arguments` chose, trained the first time."""
    args.out = args.out or Path("builds/bench_quality" + ("" if args.size == "small" else f"_{args.size}"))
    args.out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or {"small": 600, "base": 1800, "large": 1500}[args.size]
    return train_model(args.out, steps, args.threads, args.size)


def held_out_windows(ckpt: Path, count: int, length: int = WINDOW) -> list[list[int]]:
    from tokenizers import Tokenizer

    _, held = corpus()
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(held[:400_000]).ids
    step = max((len(ids) - length) // count, length)
    return [ids[s:s + length] for s in range(0, len(ids) - length, step)][:count]


def _log_probs(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def continuation_perplexity(session, windows: list[list[int]]) -> float:
    """Perplexity of each window's last CONTINUATION tokens given its first PROMPT ones: the
    prompt's prefill (pruned by FastV builds) predicts the first, one decode step of the rest
    on the prefill's cache predicts the others."""
    spec = session.generator().spec
    nll, count = 0.0, 0
    for w in windows:
        prompt, rest = np.array([w[:PROMPT]]), np.array([w[PROMPT:]])
        first = session.run({"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                             "position_ids": np.arange(PROMPT)[None], **spec.empty_cache(1)})
        step = session.run({"input_ids": rest[:, :-1], "attention_mask": np.ones((1, len(w) - 1), np.int64),
                            "position_ids": np.arange(PROMPT, len(w) - 1)[None],
                            **{k.replace("present", "past_key_values"): v for k, v in first.items() if k != "logits"}})
        logp = _log_probs(np.concatenate([first["logits"][0, -1:], step["logits"][0]]))
        nll -= float(logp[np.arange(len(rest[0])), rest[0]].sum())
        count += len(rest[0])
    return math.exp(nll / count)


def perplexity(session, windows: list[list[int]]) -> float:
    spec = session.generator().spec
    nll, count = 0.0, 0
    for w in windows:
        ids = np.array([w], np.int64)
        logits = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                              "position_ids": np.arange(len(w))[None], **spec.empty_cache(1)})["logits"]
        window_nll, window_count = next_token_nll(logits, ids)
        nll, count = nll + window_nll, count + window_count
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap)
    args = ap.parse_args()
    ckpt = trained(args)

    train_text, _ = corpus()
    calib = args.out / "calibration.txt"  # train-side lines only: calibration never sees held-out files
    lines = [line for line in train_text.splitlines() if len(line) > 60]
    calib.write_text("\n".join(lines[::max(len(lines) // 64, 1)][:64]))
    calibration = {"source": str(calib.resolve()), "tokenizer": str(ckpt.resolve()), "samples": 64, "max_length": 96}
    recipes = {
        "fp32": None,
        "int8 rtn": {"quantization": {"weights": "int8"}},
        "int8 smoothquant": {"quantization": {"weights": "int8", "method": "smoothquant"}, "calibration": calibration},
        "int4 rtn g32": {"quantization": {"weights": "int4", "group_size": 32}},
        "int4 awq g32": {"quantization": {"weights": "int4", "method": "awq", "group_size": 32}, "calibration": calibration},
        "int4 gptq g32": {"quantization": {"weights": "int4", "method": "gptq", "group_size": 32}, "calibration": calibration},
        **{f"fastv keep {keep:.0%}": {"token_pruning": {"method": "last_token_attention", "layers": [1], "keep": keep,
                                                        "prunable": SPAN}} for keep in (0.5, 0.25)},
        # Mixture-of-Depths, training-free router: p-MoD's schedule (1, .75, .25, .15) and one of FastV 50%'s FLOPs
        "mod p-MoD schedule": {"mixture_of_depths": {"prunable": SPAN}},
        "mod ratios 1, .5, .5, .5": {"mixture_of_depths": {"ratios": [1, .5, .5, .5], "prunable": SPAN}},
    }
    windows = held_out_windows(ckpt, 48)
    continued = held_out_windows(ckpt, 48, PROMPT + CONTINUATION)
    prompts = [w[:PROMPT] for w in held_out_windows(ckpt, 24, PROMPT)]
    rows, reference = [], None
    for name, recipe in recipes.items():
        build = args.out / name.replace(" ", "_")
        if not (build / "manifest.json").is_file():
            print(f"compiling {name} ...", flush=True)
            trimrt.compile(str(ckpt), recipe, build)
        session = trimrt.load(build, threads=args.threads)
        reduces = bool(recipe) and ("token_pruning" in recipe or "mixture_of_depths" in recipe)
        ppl = None if reduces else perplexity(session, windows)
        after = continuation_perplexity(session, continued)
        # one prompt at a time: a build that prunes its prompts takes batches of one length only
        tokens = [session.generator().generate(p, max_new_tokens=32).tokens for p in prompts]
        reference = reference or tokens
        agree = float(np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(tokens, reference)]))
        flops = prefill_flops(build, session, prompts[0]) if reduces or recipe is None else None
        rows.append((name, ppl, after, agree, flops))
        print(f"{name}: perplexity {ppl}, continuation perplexity {after:.3f}, greedy agreement {agree:.3f}", flush=True)
    base, base_after, base_flops = rows[0][1], rows[0][2], rows[0][4]
    print(f"\n| build | prefill FLOPs ratio ({PROMPT}-token prompt) | held-out perplexity | vs fp32 | perplexity of "
          f"{CONTINUATION} tokens after a {PROMPT}-token prompt | vs fp32 | greedy agreement (first 32 tokens) |")
    print("|---|---|---|---|---|---|---|")
    for name, ppl, after, agree, flops in rows:
        full = "- | -" if ppl is None else f"{ppl:.3f} | {ppl / base - 1:+.2%}"
        ratio = "-" if flops is None else f"{base_flops / flops:.2f}×"
        print(f"| {name} | {ratio} | {full} | {after:.3f} | {after / base_after - 1:+.2%} | {agree:.3f} |")


def prefill_flops(build: Path, session, prompt: list[int]) -> int:
    """FLOPs of the build's prefill of `prompt` (trimrt.compiler.flops, on its model.onnx)."""
    import onnx

    from trimrt.compiler.flops import count_flops
    from trimrt.runtime.kv_cache import DecoderSpec

    spec = DecoderSpec.from_manifest(session.manifest, "build")
    feeds = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
             "position_ids": np.arange(len(prompt))[None], **spec.empty_cache(1)}
    return count_flops(onnx.load(str(build / "model.onnx")), feeds)


if __name__ == "__main__":
    main()
