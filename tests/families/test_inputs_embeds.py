"""inputs_embeds decoder builds (multimodal front ends): the graph takes embeddings, the build
carries the model's input embedding as embedding.onnx, and generation from token ids, from
embeddings with "image features" spliced in, and with FastV on that span equals PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import VOCAB, hf_greedy, make  # noqa: E402
from tests.families.fastv_reference import fastv_generate  # noqa: E402
from trimrt.errors import InputError, ModelLoadError, RecipeError  # noqa: E402

EMBEDS = {"decoder": {"token_input": "inputs_embeds"}}
PROMPTS = [[1, 17, 99, 5, 42, 7, 150, 3, 88, 61, 12], [1, 5], [1, 23, 9, 180, 44, 2]]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def embeds_build(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"embeds_{request.param}") / "build"
    manifest = trimrt.compile(make(request.param), EMBEDS, path)
    return request.param, path, manifest


def _spliced(model, ids: list[int], features: np.ndarray, at: int) -> np.ndarray:
    """The prompt's token embeddings with `features` (one row a token) in place of tokens from `at`."""
    with torch.no_grad():
        table = model.get_input_embeddings()(torch.tensor(ids)).numpy()
    return np.concatenate([table[:at], features, table[at:]]).astype(np.float32)


def _hf_from_embeds(model, embeds: np.ndarray, new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(inputs_embeds=torch.from_numpy(embeds)[None], max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return out[0, -new:].tolist()


def test_the_build_takes_embeddings_and_carries_its_embedding_model(embeds_build):
    family, path, manifest = embeds_build
    graph = onnx.load(str(path / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert "inputs_embeds" in names and "input_ids" not in names
    dims = [d.dim_value or d.dim_param for d in next(i for i in graph.input if i.name == "inputs_embeds")
            .type.tensor_type.shape.dim]
    assert dims[2] == 64 and isinstance(dims[1], str)
    assert manifest["decoder"]["token_input"] == "inputs_embeds" and manifest["decoder"]["hidden_size"] == 64
    assert "embedding.onnx" in manifest["files"] and manifest["recipe"] == EMBEDS
    embedding = onnx.load(str(path / "embedding.onnx")).graph
    assert [i.name for i in embedding.input] == ["input_ids"] and [o.name for o in embedding.output] == ["inputs_embeds"]


def test_token_prompts_generate_like_hugging_face(embeds_build):
    family, path, _ = embeds_build
    model = make(family)
    gen = trimrt.load(path).generator()
    out = gen.generate(PROMPTS, max_new_tokens=24)
    assert [r.tokens for r in out] == hf_greedy(model, PROMPTS, 24)


def test_prompts_with_spliced_features_generate_like_hugging_face(embeds_build):
    """Random "image features" (5 and 3 rows) replace tokens inside two prompts of different
    lengths; alone and batched (left-padded), the build generates what HF does from the same
    embeddings."""
    family, path, _ = embeds_build
    model = make(family)
    rng = np.random.default_rng(0)
    prompts = [_spliced(model, PROMPTS[0], 0.05 * rng.standard_normal((5, 64)), 3),
               _spliced(model, PROMPTS[2], 0.05 * rng.standard_normal((3, 64)), 1)]
    gen = trimrt.load(path).generator()
    want = [_hf_from_embeds(model, p, 16) for p in prompts]
    assert gen.generate(inputs_embeds=prompts[0], max_new_tokens=16).tokens == want[0]
    assert [r.tokens for r in gen.generate(inputs_embeds=prompts, max_new_tokens=16)] == want
    assert list(gen.stream(inputs_embeds=prompts[1], max_new_tokens=16)) == want[1]


def test_verify_and_bench_run_an_embeddings_build(embeds_build):
    family, path, _ = embeds_build
    from trimrt.bench import bench_build

    report = trimrt.verify(path, samples=2)
    assert report.outputs[0].name == "logits" and report.outputs[0].max_abs < 1e-4
    timed = bench_build(path, batch=1, tokens=3, warmup=1, rounds=2)
    assert timed.build_ms > 0 and timed.baseline_ms > 0


def test_fastv_on_spliced_features_equals_fastv_in_pytorch(tmp_path):
    """The multimodal case: the pruned span is the spliced features; the build fed embeddings
    generates what FastV in PyTorch does on the same embeddings."""
    span, prompt_len, layers = (2, 18), 24, 4
    model = make("llama", layers)
    recipe = {**EMBEDS, "token_pruning": {"method": "last_token_attention", "layers": [1], "keep": 0.5,
                                          "prunable": list(span)}}
    manifest = trimrt.compile(model, recipe, tmp_path / "b")
    assert manifest["decoder"]["prunes_prompt"] and manifest["decoder"]["token_input"] == "inputs_embeds"
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, prompt_len))
    with torch.no_grad():
        want, _ = fastv_generate(model, torch.from_numpy(ids), (1,), 0.5, span, 8)
        embeds = model.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    gen = trimrt.load(tmp_path / "b").generator()
    assert [r.tokens for r in gen.generate(inputs_embeds=embeds, max_new_tokens=8)] == want
    assert [r.tokens for r in gen.generate(ids, max_new_tokens=8)] == want


def test_what_an_embeddings_build_refuses(embeds_build, tmp_path):
    family, path, _ = embeds_build
    gen = trimrt.load(path).generator()
    with pytest.raises(InputError, match=r"float array \[tokens, 64\], got float32\[3, 32\]"):
        gen.generate(inputs_embeds=np.zeros((3, 32), np.float32))
    with pytest.raises(InputError, match="not both"):
        gen.generate([1, 2], inputs_embeds=np.zeros((3, 64), np.float32))
    with pytest.raises(InputError, match="at least one token"):
        gen.generate(inputs_embeds=[np.zeros((0, 64), np.float32)])
    with pytest.raises(RecipeError, match="token_input must be one of"):
        trimrt.compile(make(family), {"decoder": {"token_input": "embeds"}}, tmp_path / "x")
    with pytest.raises(ModelLoadError, match=r"\[decoder\] token_input = 'inputs_embeds' applies to causal LMs"):
        trimrt.compile(str(path / "embedding.onnx"), EMBEDS, tmp_path / "y")
    with pytest.raises(ModelLoadError, match="takes inputs_embeds: generating needs its embedding model"):
        trimrt.compile(str(path / "model.onnx"), None, tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_input_ids_build_refuses_embeddings():
    from tests.families.causal_lms import build

    path, _ = build("llama")
    with pytest.raises(InputError, match="this build takes input_ids"):
        trimrt.load(path).generator().generate(inputs_embeds=np.zeros((3, 64), np.float32))


def test_cli_generates_from_an_embeddings_file(embeds_build, tmp_path):
    from click.testing import CliRunner

    from trimrt.cli import main

    family, path, _ = embeds_build
    model = make(family)
    prompt = _spliced(model, PROMPTS[0], 0.05 * np.random.default_rng(2).standard_normal((4, 64)), 2)
    np.save(tmp_path / "one.npy", prompt)
    ran = CliRunner().invoke(main, ["generate", str(path), "--inputs-embeds", str(tmp_path / "one.npy"),
                                    "--max-new-tokens", "6"])
    assert ran.exit_code == 0, ran.output
    assert ran.stdout.split() == [str(t) for t in _hf_from_embeds(model, prompt, 6)]
    assert "prompt 15 tokens × 1" in ran.stderr
    np.save(tmp_path / "ids.npy", np.array(PROMPTS[0]))
    bad = CliRunner().invoke(main, ["generate", str(path), "--inputs-embeds", str(tmp_path / "ids.npy")])
    assert bad.exit_code == 2 and "give float embeddings [tokens, hidden]" in bad.output
    both = CliRunner().invoke(main, ["generate", str(path), "--prompt", "1,2", "--inputs-embeds",
                                     str(tmp_path / "one.npy")])
    assert both.exit_code == 2 and "--prompt (repeatable) or --inputs-embeds" in both.output
