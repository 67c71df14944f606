"""Tiny random-weight causal LMs of the families users generate with, compiled into decoder
builds once per test run (an export with a KV cache takes about half a minute)."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 200


def make(family: str, layers: int = 2):
    """A small random causal LM; GQA (2 of 4 heads) where the family has it. No end-of-sequence
    id: every generation runs its full length (the stop rules are tested on their own)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=160, eos_token_id=None,
                  bos_token_id=1)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "qwen2":  # the second layer slides over 12 tokens
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=12,
                                                   max_window_layers=1))
    elif family == "mistral":  # every layer slides over 16 tokens
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=16))
    elif family == "phi3":  # Q, K and V from one packed projection
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0))
    elif family == "gpt_neox":  # attention and MLP side by side from one input (parallel blocks)
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                                                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=160,
                                                       eos_token_id=None, bos_token_id=1, use_parallel_residual=True))
    elif family == "gpt2":  # learned positions: a position table of 160
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB,
                                                 n_positions=160, eos_token_id=None, bos_token_id=1))
    else:
        raise ValueError(family)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _built(family: str, layers: int) -> Path:
    import trimrt

    folder = Path(tempfile.mkdtemp(prefix=f"trimrt_lm_{family}_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    trimrt.compile(make(family, layers), None, folder / "build")
    return folder / "build"


def build(family: str, layers: int = 2):
    """(path of the compiled decoder build, a fresh copy of its PyTorch model)."""
    return _built(family, layers), make(family, layers)


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, **options) -> list[list[int]]:
    """Hugging Face generate() on left-padded prompts (pad id 0): each row's new tokens."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0, **options)
    return out[:, longest:].tolist()


def word_tokenizer(path: Path) -> Path:
    """Write a word-level tokenizer.json over the tiny vocabulary to `path` (and its
    tokenizer_config.json beside it): id i is the word 'w<i>'; decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path))
    # what transformers' AutoTokenizer (and ONNX Runtime GenAI's builder) read beside it
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "w1", "eos_token": "w0", "unk_token": "w2"}))
    return path
