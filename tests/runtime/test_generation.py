"""The generation loop: options, streaming, tokenizers, stop conditions and bad input."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import VOCAB, build, word_tokenizer  # noqa: E402
from trimrt.errors import BuildLoadError, InputError  # noqa: E402
from trimrt.runtime.generation import SearchOptions  # noqa: E402

PROMPT = [1, 17, 99, 5, 42, 7]


@pytest.fixture(scope="module")
def gen():
    path, _ = build("llama")
    return trimrt.load(path).generator()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_sampling_is_seeded_and_top_k_1_is_greedy(gen):
    greedy = gen.generate(PROMPT, max_new_tokens=16).tokens
    a = gen.generate(PROMPT, max_new_tokens=16, temperature=1.5, seed=3).tokens
    b = gen.generate(PROMPT, max_new_tokens=16, temperature=1.5, seed=3).tokens
    c = gen.generate(PROMPT, max_new_tokens=16, temperature=1.5, seed=4).tokens
    assert a == b and a != c and a != greedy
    assert gen.generate(PROMPT, max_new_tokens=16, top_k=1, seed=5).tokens == greedy
    assert gen.generate(PROMPT, max_new_tokens=16, top_p=1e-6, seed=5).tokens == greedy


def test_stop_token_ids_end_a_row_and_are_kept(gen):
    greedy = gen.generate(PROMPT, max_new_tokens=16).tokens
    stop = greedy[5]
    first = greedy.index(stop)
    out = gen.generate(PROMPT, max_new_tokens=16, stop_token_ids=[stop])
    assert out.tokens == greedy[:first + 1] and out.finish_reason == "stop"
    # in a batch the other row goes on
    rows = gen.generate([PROMPT, [1, 8, 9]], max_new_tokens=16, stop_token_ids=[stop])
    assert rows[0].tokens == out.tokens


def test_stats_report_time_and_cache(gen):
    out = gen.generate(PROMPT, max_new_tokens=8)
    stats = out.stats
    spec = gen.spec
    assert stats.prompt_tokens == 6 and stats.new_tokens == 8 and stats.decode_steps == 7
    assert stats.time_to_first_token_s > 0 and stats.decode_tokens_per_s > 0
    # the cache after the last step holds the prompt and all but the last new token
    assert stats.kv_cache_bytes == 2 * spec.layers * spec.kv_heads * spec.head_dim * (6 + 7) * 4


def test_text_in_text_out_streaming_and_stop_strings(tokenizer_file):
    path, _ = build("llama")
    gen = trimrt.load(path).generator(tokenizer=tokenizer_file.parent)
    prompt = " ".join(f"w{i}" for i in PROMPT)
    ids = gen.generate(PROMPT, max_new_tokens=10).tokens
    out = gen.generate(prompt, max_new_tokens=10)
    assert out.tokens == ids
    assert out.text == " ".join(f"w{i}" for i in ids)
    assert "".join(gen.stream(prompt, max_new_tokens=10)) == out.text
    stop = f"w{ids[3]}"
    cut = gen.generate(prompt, max_new_tokens=10, stop_strings=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert out.text.startswith(cut.text)


def test_numpy_prompts(gen):
    one = gen.generate(np.array(PROMPT), max_new_tokens=4)
    assert one.tokens == gen.generate(PROMPT, max_new_tokens=4).tokens
    two = gen.generate(np.array([PROMPT, PROMPT]), max_new_tokens=4)
    assert [r.tokens for r in two] == [one.tokens, one.tokens]


def test_token_ids_stream_without_a_tokenizer(gen):
    assert list(gen.stream(PROMPT, max_new_tokens=5)) == gen.generate(PROMPT, max_new_tokens=5).tokens


@pytest.mark.parametrize("prompt, options, message", [
    ("some text", {}, "a text prompt needs a tokenizer"),
    (PROMPT, {"stop_strings": ["x"]}, "stop_strings need a tokenizer"),
    ([], {}, "no prompt given"),
    ([[1, 2], []], {}, "a prompt is empty"),
    ([1, VOCAB + 5], {}, f"token id {VOCAB + 5} is outside the vocabulary of {VOCAB}"),
    (list(range(1, 161)), {}, "the prompt has 160 tokens; this model has 160 positions"),
    (PROMPT, {"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
    (PROMPT, {"top_p": 1.5}, "top_p must be in (0, 1]"),
    (PROMPT, {"beams": 4}, "unknown generation option(s) ['beams']"),
])
def test_bad_input_is_one_line(gen, prompt, options, message):
    with pytest.raises(InputError) as err:
        gen.generate(prompt, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_generation_stops_at_the_position_table():
    path, _ = build("gpt2")
    out = trimrt.load(path).generator().generate(list(range(1, 151)), max_new_tokens=64)
    assert len(out.tokens) == 10 and out.finish_reason == "length"


def test_an_encoder_build_has_no_generator(tmp_path, tiny_vit_onnx):
    trimrt.compile(str(tiny_vit_onnx[1]), None, tmp_path / "b")
    with pytest.raises(BuildLoadError, match="is not a decoder build"):
        trimrt.load(tmp_path / "b").generator()


def test_options_are_checked_once():
    assert SearchOptions(temperature=0.7).sampling and not SearchOptions().sampling
    assert not SearchOptions(temperature=0.7, do_sample=False).sampling


def test_cli_generate_streams_ids_and_prints_stats(tmp_path):
    from click.testing import CliRunner

    from trimrt.cli import main

    path, _ = build("llama")
    want = trimrt.load(path).generator().generate(PROMPT, max_new_tokens=6).tokens
    result = CliRunner().invoke(main, ["generate", str(path), "--prompt", ",".join(map(str, PROMPT)),
                                       "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(t) for t in want]
    assert "time to first token" in result.stderr and "tokens/s" in result.stderr
    bad = CliRunner().invoke(main, ["generate", str(path), "--prompt", "hello"])
    assert bad.exit_code == 2 and "is not a list of token ids" in bad.output


def test_inspect_reports_the_cache_per_token():
    from click.testing import CliRunner

    from trimrt.cli import main

    path, _ = build("llama")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    # 2 (key, value) × 2 layers × 2 KV heads × 16 × 4 bytes = 512 bytes
    assert "decoder: 2 layers, KV cache 2 heads × 16 (float32): 0.5 KiB per token of context" in result.output
