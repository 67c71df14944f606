"""Speculative decoding in the runtime: prompt lookup and Token Recycling drafts, verified in
one step each with a tree attention mask, give exactly the tokens of plain greedy decoding
of the same build (shared cache buffers, presents fed back, pruned prompts)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import VOCAB, build, make  # noqa: E402
from trimrt.errors import InputError  # noqa: E402
from trimrt.runtime.speculation import DraftTree, PromptLookup, TokenRecycling, tree_template  # noqa: E402


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Random prompts, half of them repeating a phrase (where drafts from the context hit)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 2:
            phrase = rng.integers(3, VOCAB, rng.integers(3, 6)).tolist()
            out.append([1] + phrase * 3 + phrase[:2])
        else:
            out.append([1] + rng.integers(3, VOCAB, rng.integers(2, 12)).tolist())
    return out


def _same_as_greedy(session, speculation, prompts, new=24, **options):
    plain = session.generator()
    fast = session.generator(speculation=speculation)
    accepted = 0
    for prompt in prompts:
        want = plain.generate(prompt, max_new_tokens=new, **options)
        got = fast.generate(prompt, max_new_tokens=new, **options)
        assert got.tokens == want.tokens, (speculation, prompt)
        assert got.finish_reason == want.finish_reason
        accepted += got.stats.accepted_draft_tokens
        assert got.stats.decode_tokens == len(got.tokens) - 1
        assert got.stats.decode_steps + got.stats.accepted_draft_tokens == len(got.tokens) - 1
    return fast, accepted


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("speculation", ["prompt_lookup", "token_recycling"])
def test_speculation_gives_the_tokens_of_greedy_decoding(family, speculation):
    """Shared cache buffers (ONNX Runtime builds); qwen2's second layer slides over 12 tokens,
    gpt2 has a position table of 160 (drafts are cut before its end)."""
    path, _ = build(family)
    session = trimrt.load(path)
    fast, accepted = _same_as_greedy(session, speculation, _prompts(8))
    assert accepted > 0  # drafts were accepted: the tree path was exercised, not only plain steps
    if family == "gpt2":  # up to the last position
        prompt = _prompts(1, seed=3)[0]
        long = session.generator().generate(prompt, max_new_tokens=200)
        assert fast.generate(prompt, max_new_tokens=200).tokens == long.tokens
        assert len(prompt) + len(long.tokens) == 160


def _same_as_batched_greedy(session, speculation, prompts, new=24, **options):
    """A batch with speculation gives each row the tokens of the same batch decoded greedily."""
    want = session.generator().generate(prompts, max_new_tokens=new, **options)
    got = session.generator(speculation=speculation).generate(prompts, max_new_tokens=new, **options)
    assert [r.tokens for r in got] == [r.tokens for r in want], speculation
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    stats = got[0].stats
    assert stats.batch == len(prompts) and stats.new_tokens == sum(len(r.tokens) for r in got)
    assert stats.decode_steps + stats.accepted_draft_tokens == max(len(r.tokens) for r in got) - 1
    return stats


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("speculation", ["prompt_lookup", "token_recycling"])
def test_a_batch_of_prompts_gets_the_tokens_of_batched_greedy_decoding(family, speculation):
    """Prompts of different lengths (left-padded): each row's drafts are verified in one step
    for the batch; every row keeps as many as the row that accepted fewest, so the cache stays
    one length (prompt lookup's chains of different lengths are cut to the shortest)."""
    path, _ = build(family)
    session = trimrt.load(path)
    prompts = _prompts(8, seed=5)
    stats = _same_as_batched_greedy(session, speculation, prompts[:4])
    _same_as_batched_greedy(session, speculation, prompts[4:])
    assert stats.accepted_draft_tokens > 0 or speculation == "prompt_lookup"
    # one prompt repeated fills every row with drafts that hit: the batch then accepts them
    stats = _same_as_batched_greedy(session, speculation, [prompts[1]] * 3)
    assert stats.accepted_draft_tokens > 0
    # rows stopping at different steps: a stop token one row makes early
    early = session.generator().generate(prompts[2], max_new_tokens=24).tokens[5]
    _same_as_batched_greedy(session, speculation, prompts[:4], stop_token_ids=[early])


def test_speculation_with_presents_fed_back_and_a_pruned_prompt(tmp_path):
    """A build whose layers after a FastV pruning cache fewer tokens (the cache keeps each layer's
    accepted rows after its own past) gives the tokens of its own greedy decoding (a routed
    build: tests/families/test_decoder_mod.py)."""
    recipe = {"token_pruning": {"method": "last_token_attention", "layers": [1], "keep": 0.5, "prunable": [2, 10]}}
    trimrt.compile(make("llama", 3), recipe, tmp_path / "fastv")
    session = trimrt.load(tmp_path / "fastv")
    assert session.generator().spec.cache_tokens_removed
    prompts = [p + list(range(3, 3 + max(0, 14 - len(p)))) for p in _prompts(6, seed=1)]
    for speculation in ("prompt_lookup", "token_recycling"):
        _same_as_greedy(session, speculation, prompts)
        _same_as_batched_greedy(session, speculation, [p[:14] for p in prompts[:3]])  # a pruned build: one length


def test_stop_tokens_and_lengths_are_those_of_greedy_decoding():
    path, _ = build("llama")
    session = trimrt.load(path)
    prompts = _prompts(6, seed=2)
    want = session.generator().generate(prompts[1], max_new_tokens=24).tokens
    stop = want[7]  # a token greedy decoding makes: both stop at its first occurrence
    for speculation in ("prompt_lookup", "token_recycling"):
        _same_as_greedy(session, speculation, prompts, new=24, stop_token_ids=[stop])
        for new in (1, 2, 3):
            _same_as_greedy(session, speculation, prompts[:2], new=new)


def test_the_recycling_table_persists_and_reports_its_size(tmp_path):
    path, _ = build("llama")
    gen = trimrt.load(path).generator(speculation="token_recycling")
    assert gen.speculation.table.shape == (VOCAB, 8) and gen.speculation.table.dtype == np.int32
    assert gen.speculation.nbytes == VOCAB * 8 * 4
    prompts = _prompts(6, seed=4)
    cold = [gen.generate(p, max_new_tokens=24).stats.accepted_draft_tokens for p in prompts]
    gen.speculation.save(tmp_path / "table.npy")
    hot = trimrt.load(path).generator(speculation="token_recycling")
    hot.speculation.load(tmp_path / "table.npy")
    np.testing.assert_array_equal(hot.speculation.table, gen.speculation.table)
    assert hot.generate(prompts[0], max_new_tokens=24).stats.accepted_draft_tokens >= cold[0]
    np.save(tmp_path / "bad.npy", np.zeros((VOCAB, 4), np.int32))
    with pytest.raises(InputError, match=r"a token recycling table of this build is an integer array \[200, 8\]"):
        hot.speculation.load(tmp_path / "bad.npy")


def test_what_speculation_refuses():
    path, _ = build("llama")
    gen = trimrt.load(path).generator(speculation="prompt_lookup")
    with pytest.raises(InputError, match="takes no sampling options and no repetition_penalty"):
        gen.generate([1, 2, 3], max_new_tokens=4, temperature=0.7)
    with pytest.raises(InputError, match=r"unknown speculation 'medusa'; choose one of \['prompt_lookup', "):
        trimrt.load(path).generator(speculation="medusa")


# -- the drafters and the tree, without a model ----------------------------------------------


def test_a_draft_tree_masks_and_accepts_like_greedy_decoding():
    # root ─ a(5) ─ c(7)
    #      └ b(6) ─ d(8) ─ e(9)
    tree = DraftTree(np.array([5, 6, 7, 8, 9]), np.array([-1, -1, 0, 1, 3]))
    assert tree.depths.tolist() == [1, 1, 2, 2, 3]
    seen = tree.visible()
    assert seen[4].tolist() == [True, False, True, False, True, False]  # d sees root, b, itself
    assert seen[5].tolist() == [True, False, True, False, True, True]
    # greedy after root is 6 (b), after b is 8 (d), after d is 0: the path b, d
    predicted = np.array([6, 1, 8, 2, 0, 3])
    assert tree.accepted_path(predicted) == [1, 3]
    assert tree.accepted_path(np.array([4, 0, 0, 0, 0, 0])) == []
    assert tree.accepted_path(np.array([5, 7, 0, 0, 0, 0])) == [0, 2]
    # a cold table drafts the same token twice: of equally long paths the first in breadth-first order
    twins = DraftTree(np.array([0, 0, 0, 0]), np.array([-1, -1, 0, 1]))
    assert twins.accepted_path(np.zeros(5, np.int64)) == [0, 2]


def test_the_default_template_is_wide_at_the_top_with_a_spine():
    template = tree_template(24)
    assert len(template) == 24 == len(set(template))
    assert [len(p) for p in template] == sorted(len(p) for p in template)  # breadth-first
    assert all(len(p) == 1 or p[:-1] in template[:template.index(p)] for p in template)
    depth = max(map(len, template))
    assert (0,) * depth in template and depth >= 4
    assert sum(len(p) == 1 for p in template) > sum(len(p) == depth for p in template)


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    drafter = PromptLookup(num_tokens=3, max_ngram=2)
    tree = drafter.draft([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3])
    assert tree.tokens.tolist() == [5, 6, 2] and tree.parents.tolist() == [-1, 0, 1]  # the most recent "2 3"
    assert drafter.draft([7, 8, 9, 8]).tokens.tolist() == [9, 8]  # no bigram: the last unigram
    assert len(drafter.draft([1, 2, 3]).tokens) == 0


def test_token_recycling_fills_the_template_from_its_table():
    drafter = TokenRecycling(vocab_size=10, k=2, template=[(0,), (1,), (0, 0), (0, 1), (1, 0)])
    drafter.table[4] = [7, 8]
    drafter.table[7] = [2, 3]
    drafter.table[8] = [5, 6]
    tree = drafter.draft([1, 4])
    assert tree.tokens.tolist() == [7, 8, 2, 3, 5] and tree.parents.tolist() == [-1, -1, 0, 0, 1]
    logits = np.zeros((2, 10), np.float32)
    logits[0, [3, 9]] = [1.0, 2.0]
    logits[1, [0, 1]] = [5.0, 4.0]
    drafter.update(np.array([4, 7]), logits)
    assert drafter.table[4].tolist() == [9, 3] and drafter.table[7].tolist() == [0, 1]
    drafter.update(np.array([2]), np.zeros((1, 10), np.float16))  # ties: the lower ids; any float type
    assert drafter.table[2].tolist() == [0, 1] and drafter.table.dtype == np.int32


def test_generate_cli_reports_the_speculation(tmp_path):
    from click.testing import CliRunner

    from trimrt.cli import main

    path, _ = build("llama")
    prompt = ",".join(map(str, _prompts(2, seed=5)[1]))
    table = tmp_path / "table.npy"
    args = ["generate", str(path), "--prompt", prompt, "--max-new-tokens", "12"]
    plain = CliRunner().invoke(main, args)
    ran = CliRunner().invoke(main, [*args, "--speculation", "token_recycling", "--recycling-table", str(table)])
    assert plain.exit_code == 0 and ran.exit_code == 0, ran.output
    assert ran.stdout.splitlines()[0] == plain.stdout.splitlines()[0]  # the same tokens
    assert "token_recycling: " in ran.stderr and " tokens per decode step (" in ran.stderr
    assert "decode speedup over plain decoding" in ran.stderr and "; table 6 KiB" in ran.stderr  # 200 × 8 int32
    assert np.load(table).shape == (VOCAB, 8)  # saved, and read back by the next run
    again = CliRunner().invoke(main, [*args, "--speculation", "token_recycling", "--recycling-table", str(table)])
    assert again.exit_code == 0 and again.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    wrong = CliRunner().invoke(main, [*args, "--recycling-table", str(table)])
    assert wrong.exit_code == 2 and "--recycling-table goes with --speculation token_recycling" in wrong.output


def test_bad_templates_are_one_line():
    with pytest.raises(InputError, match=r"must hold each path's parent: \[0, 1, 1\] has no \[0, 1\]"):
        TokenRecycling(10, k=2, template=[(0,), (0, 1, 1)])
    with pytest.raises(InputError, match="child ranks in \\[0, 2\\)"):
        TokenRecycling(10, k=2, template=[(0,), (2,)])
    with pytest.raises(InputError, match="lists a path twice"):
        TokenRecycling(10, k=2, template=[(0,), (0,)])
    with pytest.raises(InputError, match="at most 512 nodes and depth 32, got 33 nodes of depth 33"):
        TokenRecycling(10, k=2, template=[(0,) * d for d in range(1, 34)])
    # given in any order, a template is used breadth-first
    drafter = TokenRecycling(10, k=2, template=[(0, 0), (1,), (0,)])
    assert drafter.template == [(0,), (1,), (0, 0)] and drafter.parents.tolist() == [-1, -1, 0]
