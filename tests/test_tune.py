"""`trimrt tune`: the search meets the budget on the evaluation data, writes the build, its
recipe and the report, resumes, and says clearly what it cannot do."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import trimrt
from trimrt.cli import main
from trimrt.errors import TuneError
from trimrt.recipe import load_recipe
from trimrt.tuning.report import pareto_front
from trimrt.tuning.search import Measurement
from trimrt.tuning.space import candidates, schedules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_data")
    rng = np.random.default_rng(0)
    (root / "cal").mkdir()
    (root / "eval").mkdir()
    np.save(root / "cal" / "x.npy", rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    np.save(root / "eval" / "x.npy", rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    return root


def test_the_space_follows_the_structure():
    assert schedules(12) == {"last": [9], "late": [6, 9], "even": [3, 6, 9]}
    assert schedules(2) == {"last": [1]}
    cls_vit = candidates({"blocks": 12, "tokens": 197, "pooling": "cls"}, {"source": "cal/"})
    names = [c.name for c in cls_vit]
    assert names[:3] == ["fusion only", "INT8 RTN", "INT8 SmoothQuant"]
    assert "ToMe r 4" in names and "EViT even 3+6+9 keep 0.7 + INT8 SmoothQuant" in names
    mod = next(c for c in cls_vit if c.name == "MoD 6+9 ratio 0.5")
    assert mod.recipe["mixture_of_depths"]["ratios"] == [1.0] * 6 + [0.5, 1.0, 1.0, 0.5, 1.0, 1.0]
    assert len({c.key for c in cls_vit}) == len(cls_vit)
    mean_pooled = [c.name for c in candidates({"blocks": 6, "tokens": None, "pooling": "mean"}, None)]
    assert not any(n.startswith("ToMe") or "SmoothQuant" in n for n in mean_pooled)
    # a decoder: the weight formats and methods, the calibrated ones only with data
    assert [c.name for c in candidates({"blocks": 4, "decoder": True}, None)] == [
        "fusion only", "INT8 RTN", "INT4 RTN g128", "INT4 RTN g32"]
    calibrated = candidates({"blocks": 4, "decoder": True}, {"source": "cal/"})
    assert all(c.recipe.get("calibration") == {"source": "cal/"} for c in calibrated
               if c.recipe.get("quantization", {}).get("method", "rtn") != "rtn")
    assert len(calibrated) == 8
    with pytest.raises(TuneError, match="2 or more"):
        candidates({"blocks": 1, "tokens": 10}, None)
    # long samples: block-sparse attention at a half, a quarter and an eighth of 32 key blocks
    long = candidates({"blocks": 6, "tokens": None, "pooling": "mean"}, {"source": "cal/"}, sequence=4000)
    assert [c.recipe["sparse_attention"]["top_k"] for c in long if c.kind == "reduction" and "sparse_attention"
            in c.recipe] == [16, 8, 4]
    assert not any("sparse_attention" in c.recipe for c in candidates({"blocks": 6}, None, sequence=512))
    # with a guard: each INT8 method's guarded fallback, alone and with each reduction
    with_guard = candidates({"blocks": 12, "tokens": 197, "pooling": "cls"}, {"source": "cal/"}, guard=0.995)
    fallbacks = {c.name: c.fallback_for for c in with_guard if c.fallback_for}
    assert fallbacks == {"INT8 RTN guarded 0.995": "INT8 RTN", "INT8 SmoothQuant guarded 0.995": "INT8 SmoothQuant"}
    assert "EViT even 3+6+9 keep 0.7 + INT8 RTN guarded 0.995" in {c.name for c in with_guard}
    assert not any(c.fallback_for for c in candidates({"blocks": 12}, None, guard=0.995))  # the guard calibrates
    # every candidate is a valid recipe
    for c in [*cls_vit, *long, *calibrated, *with_guard]:
        load_recipe(c.recipe)


def test_the_front_keeps_what_nothing_beats():
    def m(name, fidelity, speedup):
        return Measurement(name, name, {}, "ok", fidelity, None, speedup, 5)

    points = [m("a", 0.999, 1.1), m("b", 0.995, 1.5), m("c", 0.990, 1.4), m("d", 0.98, 2.0), m("e", 0.97, 1.9)]
    assert [p.name for p in pareto_front(points)] == ["d", "b", "a"]


def test_tune_writes_the_fastest_build_meeting_the_budget_and_resumes(tiny_vit_onnx, data, tmp_path):
    _, onnx_path = tiny_vit_onnx
    out = tmp_path / "best"
    events = []
    result = trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=out, min_cosine=0.98,
                         budget_s=300, samples=8, progress=lambda e: events.append((time.monotonic(), e)))
    finished = time.monotonic()
    # progress: the phases in order, an estimate of the time left once something was measured,
    # never past the budget, and at half time within a factor of 4 of the truth
    phases = [e.phase for _, e in events]
    assert sorted(set(phases), key=phases.index) == ["setup", "screening", "timing", "done"]
    assert [e.left_s for _, e in events[:3]] == [None, None, None] and events[-1][1].left_s == 0.0
    assert all(e.left_s is not None and 0 <= e.left_s <= 300 - e.elapsed_s for _, e in events[4:])
    t_half, half = next((t, e) for t, e in events if e.elapsed_s >= events[-1][1].elapsed_s / 2)
    assert (finished - t_half) / 4 <= half.left_s <= 4 * (finished - t_half)
    assert str(events[-1][1]) == result.message
    best = result.best
    assert best is not None and best.fidelity >= 0.98 and best.rounds == 40
    # every family of the space compiled and was scored on this model (MoD routing included)
    screened = {m.name: m for m in result.measurements if m.fidelity is not None}
    assert {"MoD 2+3 ratio 0.75", "ToMe r 4", "EViT late 2+3 keep 0.9", "INT8 SmoothQuant"} <= set(screened)
    assert not [m.error for m in result.measurements if m.status == "failed"]
    # the other pruning methods start at the strongest keep EViT met on their schedule
    evit = [m for m in result.measurements if m.name.startswith("EViT even 1+2+3 keep") and " + " not in m.name]
    strongest = [m.name for m in evit if m.meets][-1].rsplit(" ", 1)[1]
    divprune = [m.name for m in result.measurements if m.name.startswith("DivPrune even") and m.fidelity is not None
                and " + " not in m.name]
    assert divprune[0] == f"DivPrune even 1+2+3 keep {strongest}"
    timed = [m for m in result.measurements if m.meets and m.rounds == 40]
    assert best.speedup == max(m.speedup for m in timed)
    # INT8 alone met the budget: its guarded fallbacks were never needed (nor listed)
    assert not [m.name for m in result.measurements if " guarded " in m.name]
    # the build is the chosen recipe's, and meets the budget when verified on the evaluation data
    assert trimrt.load(out).manifest["recipe"]["onnxruntime"] == {"fuse": True}
    recipe = tomllib.loads((out / "recipe.toml").read_text())
    assert recipe == best.recipe
    report = (out / "tune_report.md").read_text()
    assert f"| {best.name} **(chosen)** |" in report and (out / "pareto.png").stat().st_size > 10_000
    x = np.load(data / "eval" / "x.npy")
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in zip(trimrt.load(out).run({"pixel_values": x})["logits"],
                           trimrt.load(str(tmp_path / "best.tune" / "candidates" /
                                           next(m.key for m in result.measurements if m.name == "fusion only")))
                           .run({"pixel_values": x})["logits"])]
    assert np.mean(cos) >= 0.98
    # a second run resumes from state.json: nothing compiled or measured again, the same choice
    state = json.loads((tmp_path / "best.tune" / "state.json").read_text())
    again = trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=out, min_cosine=0.98,
                        budget_s=300, samples=8)
    assert again.best.key == best.key
    assert json.loads((tmp_path / "best.tune" / "state.json").read_text()) == state
    # another budget reuses the measurements; other data does not
    with pytest.raises(TuneError, match="other settings .*samples: 8 then, 4 now"):
        trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=out, samples=4)


def test_an_unreachable_budget_says_how_close_it_came_and_writes_no_build(tiny_vit_onnx, data, tmp_path):
    _, onnx_path = tiny_vit_onnx
    result = CliRunner().invoke(main, ["tune", str(onnx_path), "--data", str(data / "cal"), "--eval", str(data / "eval"),
                                       "--min-cosine", "1.0", "--samples", "4", "--budget", "2m",
                                       "-o", str(tmp_path / "best")])
    assert result.exit_code == 1
    assert "no candidate reached cosine ≥ 1.0" in result.output and "the closest, " in result.output
    assert not (tmp_path / "best").exists() and (tmp_path / "best.tune" / "tune_report.md").is_file()


def test_bad_data_and_options_are_one_line_errors(tiny_vit_onnx, data, tmp_path):
    _, onnx_path = tiny_vit_onnx
    (tmp_path / "wrong").mkdir()
    np.save(tmp_path / "wrong" / "x.npy", np.zeros((2, 3, 16, 16), np.float32))
    base = ["tune", str(onnx_path), "--data", str(data / "cal"), "-o", str(tmp_path / "best")]
    result = CliRunner().invoke(main, [*base, "--eval", str(tmp_path / "wrong")])
    assert result.exit_code == 2 and result.stderr.startswith("error: the evaluation data")
    assert len(result.stderr.splitlines()) == 1
    result = CliRunner().invoke(main, [*base, "--eval", str(data / "eval"), "--budget", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.stderr


def test_the_top1_budget_applies_to_the_logits(tiny_vit_onnx, data, tmp_path):
    _, onnx_path = tiny_vit_onnx
    result = CliRunner().invoke(main, ["tune", str(onnx_path), "--data", str(data / "cal"), "--eval", str(data / "eval"),
                                       "--metric", "top1", "--min-top1", "0.75", "--samples", "4", "--budget", "30s",
                                       "-o", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output  # screening stopped at 3/4 of the budget: the rest timed what met it
    assert "top1 " in result.output and "≥ 0.75" in result.output
    report = (tmp_path / "best" / "tune_report.md").read_text()
    assert "| candidate | top1 |" in report and "top1 ≥ 0.75" in report


def test_a_budget_too_small_to_measure_anything_says_so(tiny_vit_onnx, data, tmp_path):
    _, onnx_path = tiny_vit_onnx
    result = trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=tmp_path / "best",
                         budget_s=1e-3, samples=4)
    assert result.best is None and not (tmp_path / "best").exists()
    assert result.message.startswith("the time budget ran out before a candidate meeting cosine ≥ 0.99 was timed")
    assert "give a larger --budget" in result.message


def test_the_retrieval_metric_ranks_the_evaluation_samples_neighbours(tiny_vit_onnx, data, tmp_path):
    from trimrt.compare import retrieval_agreement
    from trimrt.tuning.evaluation import Evaluation

    _, onnx_path = tiny_vit_onnx
    evaluation = Evaluation(onnx_path, data / "eval", 8, None, None, "retrieval")
    reference = np.concatenate([r["logits"] for r in evaluation.reference])

    class Permuted:
        """A 'build' answering sample i with the original's output of sample order[i]."""

        def __init__(self, order):
            self.order = order

        def run(self, feeds):
            i = next(j for j, f in enumerate(evaluation.feeds) if f is feeds)
            return {"logits": evaluation.reference[self.order[i]]["logits"]}

    assert evaluation.score(Permuted(range(8))) == 1.0
    swapped = reference[[5, 1, 2, 3, 4, 0, 6, 7]]
    expected = retrieval_agreement(reference, reference, swapped, swapped, 5, leave_one_out=True)[1]
    assert evaluation.score(Permuted([5, 1, 2, 3, 4, 0, 6, 7])) == expected < 1.0
    # too few samples to rank, and a budget option of another metric: one-line errors
    with pytest.raises(TuneError, match="gave 2 sample.*3 or more"):
        Evaluation(onnx_path, data / "eval", 2, None, None, "retrieval")
    result = CliRunner().invoke(main, ["tune", str(onnx_path), "--data", str(data / "cal"), "--eval", str(data / "eval"),
                                       "--min-retrieval", "0.9", "-o", str(tmp_path / "best")])
    assert result.exit_code == 2 and "--min-retrieval is the budget of --metric retrieval" in result.output
    with pytest.raises(TuneError, match="an encoder scored on cosine, whose budget is min_cosine"):
        trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=tmp_path / "best",
                    min_value=1 / 1.02)  # e.g. --max-perplexity-increase on an encoder
    with pytest.raises(TuneError, match="metric perplexity needs a KV-cache decoder"):
        trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=tmp_path / "best",
                    metric="perplexity")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer LLaMA exported with its KV cache, and token windows to calibrate and
    evaluate on (npz feeds: input_ids and attention_mask)."""
    from tests.families.causal_lms import make

    root = tmp_path_factory.mktemp("tune_llama")
    onnx_path = trimrt.export(make("llama", 2), root / "llama.onnx")
    rng = np.random.default_rng(1)
    for name in ("cal", "eval"):
        (root / name).mkdir()
        ids = rng.integers(0, 200, (8, 40))
        np.savez(root / name / "windows.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    return onnx_path, root


def _perplexity(session, ids: np.ndarray) -> float:
    """Perplexity of the windows from a prefill each (written out here, not trimrt's helper)."""
    from trimrt.runtime.kv_cache import DecoderSpec

    spec = DecoderSpec.from_manifest(session.manifest, "")
    nll = []
    for row in ids:
        feed = {"input_ids": row[None], "attention_mask": np.ones((1, len(row)), np.int64),
                "position_ids": np.arange(len(row))[None], **spec.empty_cache(1)}
        logits = session.run(feed)["logits"][0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll += list(-log_p[np.arange(len(row) - 1), row[1:]])
    return float(np.exp(np.mean(nll)))


def test_a_decoder_is_tuned_on_perplexity_and_timed_on_decode_steps(tiny_llama, tmp_path):
    onnx_path, root = tiny_llama
    out = tmp_path / "best"
    result = CliRunner().invoke(main, ["tune", str(onnx_path), "--data", str(root / "cal"), "--eval", str(root / "eval"),
                                       "--max-perplexity-increase", "0.001", "--samples", "8", "--budget", "5m",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(budget: perplexity at most +0.10%)" in result.output
    state = json.loads((tmp_path / "best.tune" / "state.json").read_text())["measurements"].values()
    names = {m["name"]: m for m in state}
    assert {"fusion only", "INT8 RTN", "INT8 SmoothQuant", "INT8 GPTQ", "INT4 RTN g128", "INT4 RTN g32",
            "INT4 AWQ g128", "INT4 GPTQ g128"} == set(names)
    # the chosen build meets the budget on the evaluation windows, by perplexity computed here
    ids = np.load(root / "eval" / "windows.npz")["input_ids"]
    ppl_build = _perplexity(trimrt.load(out), ids)
    ppl_original = _perplexity(trimrt.load(tmp_path / "best.tune" / "candidates" / names["fusion only"]["key"]), ids)
    assert ppl_build <= ppl_original * 1.001 + 1e-9
    chosen = next(m for m in state if m["rounds"] == 40 and f"{m['name']} **(chosen)**" in
                  (out / "tune_report.md").read_text())
    assert chosen["fidelity"] == pytest.approx(ppl_original / ppl_build, rel=1e-4)
    assert trimrt.load(out).manifest["decoder"]["layers"] == 2
    # the wrong metric for the model kind: one line, exit 2
    bad = CliRunner().invoke(main, ["tune", str(onnx_path), "--data", str(root / "cal"), "--eval", str(root / "eval"),
                                    "--metric", "retrieval", "-o", str(tmp_path / "other")])
    assert bad.exit_code == 2 and "metric retrieval compares embeddings (the model is a decoder)" in bad.stderr


def test_an_interrupted_tune_says_how_to_resume(tiny_vit_onnx, data, tmp_path, monkeypatch):
    import trimrt.tuning

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trimrt.tuning, "tune", interrupted)
    _, onnx_path = tiny_vit_onnx
    result = CliRunner().invoke(main, ["tune", str(onnx_path), "--data", str(data / "cal"), "--eval", str(data / "eval"),
                                       "-o", str(tmp_path / "best")])
    assert result.exit_code == 130
    assert result.stderr == (f"interrupted: what was measured is kept in {tmp_path / 'best.tune'}; run the same command "
                             "again to resume\n")


def test_an_int8_method_missing_the_budget_is_retried_with_the_guard(tiny_vit_onnx, data, tmp_path):
    _, onnx_path = tiny_vit_onnx
    result = trimrt.tune(str(onnx_path), data=data / "cal", eval_data=data / "eval", out_dir=tmp_path / "best",
                         min_cosine=0.99995, budget_s=120, samples=8)
    by_name = {m.name: m for m in result.measurements}
    plain, guarded = by_name["INT8 RTN"], by_name["INT8 RTN guarded 0.999975"]
    assert plain.status == "below budget" and guarded.status in ("ok", "below budget")
    assert guarded.recipe["quantization"] == {"method": "rtn", "min_cosine": 0.999975}
    assert guarded.fidelity > plain.fidelity
    # the guarded build keeps layers float, and says so in its manifest
    build = tmp_path / "best.tune" / "candidates" / guarded.key
    report = trimrt.load(build).manifest.pass_report("quantization")
    assert report["kept_float"], report


def test_long_samples_get_block_sparse_candidates_that_compile_and_score(tmp_path):
    """A BERT fed 1024-token samples: the space gains sparse attention at a half and a quarter
    of its 8 key blocks (a quarter and an eighth both round up to 3: the sink, the diagonal
    and one chosen), each compiles and keeps fidelity in the order of its density."""
    import torch
    import transformers

    from trimrt.tuning.evaluation import Evaluation
    from trimrt.tuning.search import _screen, _structure

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60, max_position_embeddings=1024)
    example = {"input_ids": torch.randint(0, 60, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    onnx_path = trimrt.export(transformers.BertModel(config).eval(), tmp_path / "bert.onnx", example_inputs=example)
    (tmp_path / "eval").mkdir()
    ids = np.random.default_rng(0).integers(0, 60, (4, 1024))
    np.savez(tmp_path / "eval" / "long.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    evaluation = Evaluation(onnx_path, tmp_path / "eval", 4, None, None, "cosine")
    assert evaluation.tokens == 1024
    space = candidates(_structure(onnx_path, lambda message: None), None, evaluation.tokens)
    sparse = [c for c in space if c.kind == "reduction" and "sparse_attention" in c.recipe]
    assert [c.name for c in sparse] == ["sparse attention 4/8 blocks", "sparse attention 3/8 blocks"]
    fidelity = []
    for c in sparse:
        m = Measurement(c.key, c.name, c.recipe)
        _screen(m, c, tmp_path, onnx_path, evaluation, 0.5)
        assert m.status == "ok" and m.flops_ratio > 1.0, m  # counted on the 1024-token samples
        fidelity.append(m.fidelity)
    assert 0.5 < fidelity[1] <= fidelity[0] < 1.0


def test_smoothquant_joins_the_reductions_only_where_it_beats_round_to_nearest():
    from trimrt.tuning.search import _State, _worth_combining

    space = candidates({"blocks": 4, "tokens": 17, "pooling": "cls"}, {"source": "cal/"})
    quantization = [c for c in space if c.kind == "quantization"]
    for rtn, smoothquant, expected in [(0.9990, 0.99905, ["INT8 RTN"]),  # a gap 95% of RTN's: not worth it
                                       (0.9946, 0.9984, ["INT8 RTN", "INT8 SmoothQuant"])]:  # MiniLM's
        state = _State.__new__(_State)
        state.entries = {}
        for c, fidelity in zip(quantization, (rtn, smoothquant)):
            m = state.get(c)
            m.status, m.fidelity = "ok", fidelity
        assert _worth_combining(quantization, state) == expected
