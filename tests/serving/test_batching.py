"""Dynamic batching never changes an answer: grouped runs equal runs one request at a time."""

from __future__ import annotations

import numpy as np
import pytest

import trimrt
from trimrt.errors import InputError
from trimrt.serving.batching import BatchPolicy, run_requests


@pytest.fixture(scope="module")
def bert_build(small_vocab_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "bert"
    trimrt.compile(str(small_vocab_bert), None, out)
    return out


def _text(rng, rows, tokens, vocab=60):
    return {"input_ids": rng.integers(0, vocab, (rows, tokens)).astype(np.int64),
            "attention_mask": np.ones((rows, tokens), np.int64)}


def test_requests_of_mixed_lengths_are_grouped_and_answer_as_alone(bert_build):
    session = trimrt.load(bert_build)
    policy = BatchPolicy.of_session(session)
    assert policy.rows_independent
    rng = np.random.default_rng(0)
    requests = [_text(rng, rows, tokens) for rows, tokens in [(1, 8), (2, 12), (3, 8), (1, 12), (1, 5)]]
    calls = []
    run = session.run
    session.run = lambda feeds, names=None: calls.append(feeds["input_ids"].shape) or run(feeds, names)
    results = run_requests(session, requests, policy)
    session.run = run
    assert sorted(calls) == [(1, 5), (3, 12), (4, 8)]  # one run per token length, rows concatenated
    for request, result in zip(requests, results):
        alone = session.run(request)
        assert result.keys() == alone.keys()
        for name in alone:
            np.testing.assert_allclose(result[name], alone[name], rtol=0, atol=1e-6)


def test_a_bad_request_gets_its_own_error_and_the_others_their_answers(bert_build):
    session = trimrt.load(bert_build)
    rng = np.random.default_rng(1)
    good = _text(rng, 2, 8)
    out_of_vocab = _text(rng, 1, 8)
    out_of_vocab["input_ids"][0, 3] = 500
    wrong_dtype = {**_text(rng, 1, 8), "attention_mask": np.ones((1, 8), np.float32)}
    results = run_requests(session, [good, out_of_vocab, wrong_dtype, "not feeds"], BatchPolicy.of_session(session))
    np.testing.assert_allclose(results[0]["last_hidden_state"], session.run(good)["last_hidden_state"], atol=1e-6)
    assert isinstance(results[1], InputError) and "token id 500" in str(results[1])
    assert isinstance(results[2], InputError) and "must be int64" in str(results[2])
    assert isinstance(results[3], InputError) and "mapping" in str(results[3])


def test_dynamic_int8_builds_run_one_request_at_a_time(tiny_vit_onnx, tmp_path):
    _, onnx_path = tiny_vit_onnx
    trimrt.compile(str(onnx_path), {"quantization": {"method": "rtn"}}, tmp_path / "int8")
    session = trimrt.load(tmp_path / "int8")
    policy = BatchPolicy.of_session(session)
    assert not policy.rows_independent and "DynamicQuantizeLinear" in policy.reason
    rng = np.random.default_rng(2)
    requests = [{"pixel_values": rng.standard_normal((1, 3, 32, 32)).astype(np.float32) * s} for s in (1, 10, 0.1)]
    results = run_requests(session, requests, policy)
    for request, result in zip(requests, results):  # bit-identical to each alone (a shared scale would differ)
        np.testing.assert_array_equal(result["logits"], session.run(request)["logits"])
