"""Block-sparse prompts in KV-cache decoder builds: [sparse_attention] makes the prompt's
attention of the listed layers BlockSparseAttention (decode steps stay dense, writing the
shared cache buffer in place), and generation equals the same attention written in PyTorch
(tests/families/sparse_reference.py), left-padded batches included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import VOCAB, hf_greedy, make  # noqa: E402
from tests.families.sparse_reference import sparse_prompt_model  # noqa: E402
from trimrt.errors import RecipeError  # noqa: E402
from trimrt.runtime.kv_cache import DecoderSpec  # noqa: E402

LAYERS, SPARSE = 4, {"layers": [1, 2], "block_size": 4, "top_k": 2}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse_kv") / "b"
    trimrt.compile(make("llama", LAYERS), {"sparse_attention": SPARSE}, path)
    return path


def test_gpt2_generation_equals_sparse_prompt_attention_in_pytorch(tmp_path):
    """Another family (learned positions, no grouped heads, Conv1D projections), every layer sparse."""
    trimrt.compile(make("gpt2", 2), {"sparse_attention": {"block_size": 4, "top_k": 2}}, tmp_path / "b")
    reference = sparse_prompt_model(make("gpt2", 2), [0, 1], block_size=4, top_k=2)
    gen = trimrt.load(tmp_path / "b").generator()
    prompts = _prompts()
    assert [r.tokens for r in gen.generate(prompts, max_new_tokens=6)] == hf_greedy(reference, prompts, 6)


def _prompts():
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, VOCAB, 23)), list(rng.integers(3, VOCAB, 17))]


def test_generation_equals_sparse_prompt_attention_in_pytorch(build):
    prompts = _prompts()
    reference = sparse_prompt_model(make("llama", LAYERS), SPARSE["layers"], block_size=4, top_k=2)
    session = trimrt.load(build)
    gen = session.generator()
    # a left-padded batch (row 1: 6 padding tokens, a whole block of them) and each prompt alone
    assert [r.tokens for r in gen.generate(prompts, max_new_tokens=8)] == hf_greedy(reference, prompts, 8)
    for prompt in prompts:
        assert gen.generate([prompt], max_new_tokens=8)[0].tokens == hf_greedy(reference, [prompt], 8)[0]
    # the sparse prompt changes what a dense model generates (6 blocks, 2 attended)
    assert hf_greedy(make("llama", LAYERS), prompts, 8) != hf_greedy(reference, prompts, 8)
    # the prompt's logits
    ids = np.array([prompts[0]])
    spec = DecoderSpec.from_manifest(session.manifest, "build")
    out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(23)[None],
                       **spec.empty_cache(1)})
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(out["logits"], want, atol=1e-5)


def test_decode_steps_stay_dense_and_in_place(build):
    """Every layer's decode attention is ONNX Runtime's GroupQueryAttention in the form a dense
    build has, on a shared cache buffer filled from the prompt's presents; the sparse layers'
    prompt is an If branch."""
    manifest = trimrt.load(build).manifest
    assert manifest["decoder"]["sparse_prompt"] is True and manifest["decoder"]["shared_buffer"] is True
    report = {p["pass"]: p["report"] for p in manifest["passes"]}
    kv = report["kv_attention"]
    assert kv["attention_ops"] == LAYERS and kv["kv_op"] == "GroupQueryAttention"
    # as in a dense build: on the projections as they come, the RoPE in the op, Q/K/V packed
    assert kv["token_major"] == kv["rotary_in_attention"] == report["packed_projections"]["attention_fed_packed"] == LAYERS
    sparse = next(p["report"] for p in manifest["passes"] if p["pass"] == "sparse_attention")
    assert sparse["prompt_only"] is True and [layer["block"] for layer in sparse["layers"]] == [1, 2]
    from click.testing import CliRunner

    from trimrt.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(build)])
    assert shown.exit_code == 0, shown.output
    assert ("block-sparse attention at block 1: 2 key blocks of ceil(N / 4) per query block (blocks of 4 tokens, "
            "causal, rectified; the prompt only: decode steps attend the cache densely)") in shown.output
    report = trimrt.verify(build, samples=2, tokens=12)  # prompts: what the build changes
    assert report.outputs[0].shape == [2, 12, VOCAB]  # two samples


@pytest.mark.parametrize("family, recipe, message", [
    ("mistral", {"sparse_attention": SPARSE}, "sliding window of 16 tokens"),
    ("llama", {"sparse_attention": SPARSE, "token_pruning": {"method": "last_token_attention", "layers": [1],
                                                             "keep": 0.5, "prunable": [2, 18]}},
     "\\[sparse_attention\\] and \\[token_pruning\\] in one decoder build"),
])
def test_sparse_recipes_refused_for_kv_cache_decoders(tmp_path, family, recipe, message):
    with pytest.raises(RecipeError, match=message):
        trimrt.compile(make(family, 2), recipe, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_prompt_of_at_most_top_k_blocks_takes_the_dense_path(build, tmp_path):
    """Every block of such a prompt would be selected (dense attention): the op does not run
    (ONNX Runtime's profile of the step); one block more, and it does."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling, opts.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(str(build / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    spec = DecoderSpec.from_manifest(trimrt.load(build).manifest, "build")
    ran = {}
    for tokens in (8, 9):  # blocks of 4, top_k 2: 8 tokens fill 2 blocks, 9 make 3
        session.run(None, spec.random_feeds(1, new=tokens, past=0))
    events = json.loads(open(session.end_profiling()).read())
    runs = [e for e in events if e.get("name") == "model_run"]
    for run, tokens in zip(runs, (8, 9)):
        ran[tokens] = any("BlockSparseAttention" in e.get("name", "") for e in events if e.get("cat") == "Node"
                          and run["ts"] <= e["ts"] <= run["ts"] + run["dur"])
    assert ran == {8: False, 9: True}
