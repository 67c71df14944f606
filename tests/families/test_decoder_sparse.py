"""Block-sparse prompts in KV-cache decoder builds: [sparse_attention] makes the prompt's
attention of the listed layers BlockSparseAttention (decode steps stay dense, writing the
shared cache buffer in place), and generation equals the same attention written in PyTorch
(tests/families/sparse_reference.py), left-padded batches included."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import VOCAB, hf_greedy, make  # noqa: E402
from tests.families.fastv_reference import fastv_generate  # noqa: E402
from tests.families.sparse_reference import sparse_prompt_model  # noqa: E402
from trimrt.errors import RecipeError, StructureError  # noqa: E402
from trimrt.runtime.kv_cache import DecoderSpec  # noqa: E402

LAYERS, SPARSE = 4, {"layers": [1, 2], "block_size": 4, "top_k": 2}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse_kv") / "b"
    trimrt.compile(make("llama", LAYERS), {"sparse_attention": SPARSE}, path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox"])
def test_other_families_generate_as_sparse_prompt_attention_in_pytorch(tmp_path, family):
    """Other families, every layer sparse: GPT-2 (learned positions, no grouped heads, Conv1D
    projections), Phi-3 (Q, K and V from one packed projection), GPT-NeoX (attention and MLP
    side by side: no token pass applies, block-sparse attention does)."""
    trimrt.compile(make(family, 2), {"sparse_attention": {"block_size": 4, "top_k": 2}}, tmp_path / "b")
    reference = sparse_prompt_model(make(family, 2), [0, 1], block_size=4, top_k=2)
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


def test_an_openvino_build_generates_the_same(tmp_path):
    """--target openvino: the same graph without ONNX Runtime's kernels (the If on the prompt,
    the op's decomposition inlined) on OpenVINO."""
    pytest.importorskip("openvino")
    trimrt.compile(make("llama", LAYERS), {"sparse_attention": SPARSE}, tmp_path / "b", target="openvino")
    gen = trimrt.load(tmp_path / "b").generator()
    assert gen.session.backend.name == "openvino"
    prompts = _prompts()
    reference = sparse_prompt_model(make("llama", LAYERS), SPARSE["layers"], block_size=4, top_k=2)
    assert [r.tokens for r in gen.generate(prompts, max_new_tokens=8)] == hf_greedy(reference, prompts, 8)


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


FASTV = {"method": "last_token_attention", "layers": [1], "keep": 0.5, "prunable": [2, 18]}


@pytest.fixture(scope="module")
def fastv_sparse(tmp_path_factory):
    path = tmp_path_factory.mktemp("fastv_sparse_kv") / "b"
    trimrt.compile(make("llama", LAYERS), {"token_pruning": FASTV, "sparse_attention": {"block_size": 4, "top_k": 2}},
                   path)
    return path


def _prefill(session, ids):
    spec = DecoderSpec.from_manifest(session.manifest, "build")
    return session.run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "position_ids": np.tile(np.arange(ids.shape[1]), (len(ids), 1)), **spec.empty_cache(len(ids))})


def test_sparse_prompts_with_fastv_equal_both_in_pytorch(fastv_sparse, tmp_path):
    """FastV prunes the prompt after block 1's attention (which its score reads: by default it
    stays dense); the other blocks attend block-sparsely, the later ones over the kept tokens
    (16 of 24: four blocks, two attended) with the causal mask of their own."""
    session = trimrt.load(fastv_sparse)
    sparse = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "sparse_attention")
    assert [layer["block"] for layer in sparse["layers"]] == [0, 2, 3] and sparse["kept_dense"] == [1]
    from click.testing import CliRunner

    from trimrt.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(fastv_sparse)])
    assert "block 1 keeps dense attention: a token pass's score (or an output) reads it" in shown.output
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 24))
    reference = sparse_prompt_model(make("llama", LAYERS), [0, 2, 3], block_size=4, top_k=2)
    span = tuple(FASTV["prunable"])
    with torch.no_grad():
        want, first = fastv_generate(reference, torch.from_numpy(ids), (1,), 0.5, span, 8,
                                     attention="trimrt_sparse_prompt")
        fastv_alone = fastv_generate(make("llama", LAYERS), torch.from_numpy(ids), (1,), 0.5, span, 8)[0]
    assert want != fastv_alone  # the sparse blocks change what FastV alone generates
    assert [r.tokens for r in session.generator().generate([list(row) for row in ids], max_new_tokens=8)] == want
    out = _prefill(session, ids)
    np.testing.assert_allclose(out["logits"][:, -1], first.numpy(), atol=1e-4)
    assert [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == [24, 24, 16, 16]  # the pruned cache
    # listed, the scored block is refused
    with pytest.raises(StructureError, match=r"\[sparse_attention\] block 1's attention is also read by "
                                             r"trimrt_prune_1_\w+ \(e.g. a token pruning's scores\), which needs it dense"):
        trimrt.compile(make("llama", LAYERS), {"token_pruning": FASTV, "sparse_attention": SPARSE}, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_prunable_span_longer_than_the_shape_probes(tmp_path):
    """A span ending past the 37 tokens the compile's shape probes feed by default: the probes
    of the pruned graph (analysis for the sparse pass) feed prompts the span fits in."""
    span, recipe = (4, 90), {"token_pruning": {**FASTV, "prunable": [4, 90]}, "sparse_attention": {"block_size": 8,
                                                                                                  "top_k": 3}}
    trimrt.compile(make("llama", LAYERS), recipe, tmp_path / "b")
    ids = np.random.default_rng(1).integers(3, VOCAB, (1, 100))
    reference = sparse_prompt_model(make("llama", LAYERS), [0, 2, 3], block_size=8, top_k=3)
    with torch.no_grad():
        want, first = fastv_generate(reference, torch.from_numpy(ids), (1,), 0.5, span, 6,
                                     attention="trimrt_sparse_prompt")
    session = trimrt.load(tmp_path / "b")
    assert [session.generator().generate(list(ids[0]), max_new_tokens=6).tokens] == want
    np.testing.assert_allclose(_prefill(session, ids)["logits"][:, -1], first.numpy(), atol=1e-4)


def test_sparse_prompts_with_fastv_int4_and_fusion(fastv_sparse, tmp_path, caplog):
    """Block-sparse prompts, FastV, INT4 weights and ONNX Runtime's kernels in one decoder
    build: the quantized build stays close to the float one, and compiles without warnings."""
    recipe = {"token_pruning": FASTV, "sparse_attention": {"block_size": 4, "top_k": 2},
              "quantization": {"weights": "int4", "group_size": 16}, "onnxruntime": {"fuse": True}}
    trimrt.compile(make("llama", LAYERS), recipe, tmp_path / "b")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    session = trimrt.load(tmp_path / "b")
    reports = {p["pass"]: p["report"] for p in session.manifest["passes"]}
    assert [layer["block"] for layer in reports["sparse_attention"]["layers"]] == [0, 2, 3]
    assert reports["quantization"]["matmuls_quantized"] == 4 * LAYERS + 1  # lm_head included
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 24))
    out = _prefill(session, ids)
    assert [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == [24, 24, 16, 16]
    got, fp32 = out["logits"][:, -1], _prefill(trimrt.load(fastv_sparse), ids)["logits"][:, -1]
    cosine = (got * fp32).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cosine.min() > 0.95, cosine  # INT4 in groups of 16 on random weights
    assert [len(r.tokens) for r in session.generator().generate([list(row) for row in ids], max_new_tokens=8)] == [8, 8]


@pytest.mark.parametrize("router", ["attention", "model"])
def test_sparse_prompts_with_mod_routing_equal_both_in_pytorch(tmp_path, router):
    """Routed blocks attend block-sparsely over the tokens routed to them, with a causal mask
    of their own: with p-MoD's routers every block (routed 0, 1, 3 and dense 2); routed by the
    attention of the block before, the blocks it reads stay dense (3 alone)."""
    from examples.models.pmod import with_mod_routers
    from tests.families.mod_reference import mod_generate

    span = (2, 18)
    ratios = [0.5, 0.4, 1.0, 0.6] if router == "model" else [1.0, 0.5, 0.3, 0.6]
    sparse_layers = [0, 1, 2, 3] if router == "model" else [3]

    def model():
        return with_mod_routers(make("llama", LAYERS), [0, 1, 3], span) if router == "model" else make("llama", LAYERS)

    recipe = {"mixture_of_depths": {"router": router, "ratios": ratios, "prunable": list(span)},
              "sparse_attention": {"block_size": 4, "top_k": 2}}
    trimrt.compile(model(), recipe, tmp_path / "b")
    session = trimrt.load(tmp_path / "b")
    sparse = next(p["report"] for p in session.manifest["passes"] if p["pass"] == "sparse_attention")
    assert [layer["block"] for layer in sparse["layers"]] == sparse_layers
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 24))
    with torch.no_grad():
        want, first, cached = mod_generate(sparse_prompt_model(model(), sparse_layers, block_size=4, top_k=2),
                                           torch.from_numpy(ids), ratios, span, 8, router=router,
                                           attention="trimrt_sparse_prompt")
        assert want != mod_generate(model(), torch.from_numpy(ids), ratios, span, 8, router=router)[0]
    assert [r.tokens for r in session.generator().generate([list(row) for row in ids], max_new_tokens=8)] == want
    spec = DecoderSpec.from_manifest(session.manifest, "build")
    out = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(24), (2, 1)),
                       **spec.empty_cache(2)})
    np.testing.assert_allclose(out["logits"][:, -1], first.numpy(), atol=1e-4)
    assert [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == cached


def test_sparse_decoders_are_refused_for_tensorrt(tmp_path, monkeypatch):
    """The prompt's attention runs in an If beside the decode steps' (checked as on a GPU machine)."""
    from trimrt.runtime.backends import TensorRTBackend

    monkeypatch.setattr(TensorRTBackend, "available", staticmethod(lambda: True))
    with pytest.raises(RecipeError, match=r"\[sparse_attention\] on a decoder with a KV cache builds for ONNX Runtime "
                                          r"only for now.*--target onnxruntime"):
        trimrt.compile(make("llama", 2), {"sparse_attention": SPARSE}, tmp_path / "b", target="tensorrt")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("family, windows", [("mistral", [16, 16]), ("qwen2", [None, 12])])
def test_a_sliding_window_decoder_attends_sparsely_within_its_window(family, windows, tmp_path):
    """Mistral's layers slide over 16 tokens, Qwen2's second over 12: each layer's window is
    found on its mask and goes into the op, so prompts shorter and longer than the window
    (left-padded too) generate as the same block-sparse attention within the window does."""
    manifest = trimrt.compile(make(family, 2), {"sparse_attention": {"block_size": 4, "top_k": 2}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "sparse_attention")
    assert [layer.get("window") for layer in report["layers"]] == windows
    gen = trimrt.load(tmp_path / "b").generator()
    rng = np.random.default_rng(0)
    reference = sparse_prompt_model(make(family, 2), [0, 1], block_size=4, top_k=2)
    for length in (15, 23, 40):
        prompts = [list(rng.integers(3, VOCAB, length)), list(rng.integers(3, VOCAB, length - 5))]
        want = hf_greedy(reference, prompts, 6)
        assert [r.tokens for r in gen.generate(prompts, max_new_tokens=6)] == want
        if length > 16:  # the sparse prompt changes what the dense model generates
            assert want != hf_greedy(make(family, 2), prompts, 6)


def test_a_window_too_long_to_probe_keeps_longer_prompts_dense(tmp_path, monkeypatch):
    """A window past the longest probe: the op runs on prompts no longer than it (where the
    window masks nothing), a longer prompt attends densely, as exported."""
    from trimrt.passes import sparse_attention

    monkeypatch.setattr(sparse_attention, "_LONGEST_WINDOW_PROBE", 20)
    manifest = trimrt.compile(make("mistral", 2), {"sparse_attention": {"block_size": 4, "top_k": 2}}, tmp_path / "b")
    report = next(p["report"] for p in manifest["passes"] if p["pass"] == "sparse_attention")
    assert all("window" not in layer for layer in report["layers"])
    gen = trimrt.load(tmp_path / "b").generator()
    rng = np.random.default_rng(0)
    short = [list(rng.integers(3, VOCAB, 15)), list(rng.integers(3, VOCAB, 12))]
    reference = sparse_prompt_model(make("mistral", 2), [0, 1], block_size=4, top_k=2)
    want = hf_greedy(reference, short, 6)
    assert want != hf_greedy(make("mistral", 2), short, 6)  # the sparse prompt changes what the dense model generates
    assert [r.tokens for r in gen.generate(short, max_new_tokens=6)] == want
    long = [list(rng.integers(3, VOCAB, 23))]
    assert [gen.generate(long, max_new_tokens=6)[0].tokens] == hf_greedy(make("mistral", 2), long, 6)


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
