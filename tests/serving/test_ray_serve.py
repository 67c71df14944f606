"""`trimrt serve`: a Ray Serve deployment on 127.0.0.1 answers what Session.run returns,
under concurrent load, with a replica killed mid-load, and as an OpenAI completions endpoint."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

if importlib.util.find_spec("ray") is None:  # never imported here: the servers run in child processes
    pytest.skip("Ray Serve not installed (pip install 'trimrt[serve]')", allow_module_level=True)
pytest.importorskip("transformers")

import trimrt  # noqa: E402
from tests.families.causal_lms import build, word_tokenizer  # noqa: E402
from tests.serving.servers import HTTPFailure, free_port, http, infer, infer_retrying, ray_serve_process  # noqa: E402
from trimrt.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
PRUNE = {"token_pruning": {"method": "cls_attention", "layers": [1, 2], "keep": 0.5}}


@pytest.fixture(scope="module")
def builds(tiny_vit_onnx, tmp_path_factory):
    _, onnx_path = tiny_vit_onnx
    root = tmp_path_factory.mktemp("ray")
    trimrt.compile(str(onnx_path), PRUNE, root / "vit")
    return {"vit": root / "vit", "llm": build("llama")[0], "tokenizer": word_tokenizer(root / "tokenizer.json")}


@pytest.fixture(scope="module")
def served(builds, tmp_path_factory):
    """The ViT build (2 replicas) at /vit and the decoder (OpenAI API) at /llm, one local Ray cluster."""
    port = free_port()
    apps = [dict(build_dir=builds["vit"], port=port, replicas=2, threads=1, max_batch=8, batch_wait_ms=10, num_cpus=4,
                 name="vit", route_prefix="/vit"),
            dict(build_dir=builds["llm"], port=port, threads=1, openai=True, tokenizer=builds["tokenizer"], name="llm",
                 route_prefix="/llm")]
    with ray_serve_process(apps, tmp_path_factory.mktemp("ray_serve")) as (vit, llm):
        yield {"vit": vit, "llm": llm}


def _images(rng, rows):
    return {"pixel_values": rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)}


def _replicas(url: str, count: int = 2, timeout: float = 90.0, without: int | None = None) -> dict:
    """{pid: /health answer} of `count` replicas (none of them `without`). Serve's router may send
    one client's sequential requests to the same replica, so health is asked 8 at a time, until
    that many replicas have answered or `timeout` seconds have passed."""
    def health(_):
        status, _, body = http(f"{url}/health")
        return json.loads(body) if status == 200 else None  # a replica being replaced may answer 5xx

    seen: dict = {}
    deadline = time.monotonic() + timeout
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while True:
            for answer in filter(None, pool.map(health, range(8))):
                seen[answer["pid"]] = answer
            seen.pop(without, None)
            if len(seen) >= count:
                return seen
            assert time.monotonic() < deadline, f"{count} replicas did not answer within {timeout:.0f} s: {sorted(seen)}"
            time.sleep(0.5)


def test_json_and_npz_bodies_answer_what_session_run_returns(served, builds):
    session = trimrt.load(builds["vit"])
    rng = np.random.default_rng(0)
    for binary in (False, True):
        feeds = _images(rng, 3)
        out = infer(served["vit"], feeds, binary=binary)
        assert out["logits"].dtype == np.float32 or not binary
        np.testing.assert_array_equal(out["logits"].astype(np.float32), session.run(feeds)["logits"])
    status, _, body = http(f"{served['vit']}/v1/metadata")
    assert status == 200 and json.loads(body)["inputs"] == [{"name": "pixel_values", "dtype": "float32",
                                                             "shape": ["batch", 3, 32, 32]}]


def test_bad_requests_get_a_400_with_one_line(served):
    cases = [(b"{not json", "not JSON"), (json.dumps({"inputs": {"pixel": [[1.0]]}}).encode(), "unknown input"),
             (json.dumps({"inputs": {"pixel_values": [[1.0, 2.0]]}}).encode(), "must have rank 4"),
             (json.dumps({"x": 1}).encode(), '{"inputs"'),
             (json.dumps({"inputs": {"pixel_values": [["a"]]}}).encode(), "must hold numbers")]
    for body, message in cases:
        status, _, answer = http(f"{served['vit']}/v1/infer", body, {"Content-Type": "application/json"})
        error = json.loads(answer)["error"]
        assert status == 400 and message in error and "\n" not in error
    status, _, answer = http(f"{served['vit']}/v1/completions", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and "/v1/infer" in json.loads(answer)["error"]


def test_concurrent_clients_get_session_run_s_answers_and_requests_are_batched(served, builds):
    session = trimrt.load(builds["vit"])
    rng = np.random.default_rng(1)
    requests = [_images(rng, int(rows)) for rows in rng.integers(1, 4, 96)]

    before = _replicas(served["vit"])  # both replicas' counters (each answer names its replica)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda feeds: infer(served["vit"], feeds), requests))
    for feeds, answer in zip(requests, answers):
        np.testing.assert_allclose(answer["logits"].astype(np.float32), session.run(feeds)["logits"], rtol=0, atol=1e-6)
    after = _replicas(served["vit"])
    served_requests = sum(h["requests"] - before.get(pid, {"requests": 0})["requests"] for pid, h in after.items())
    runs = sum(h["runs"] - before.get(pid, {"runs": 0})["runs"] for pid, h in after.items())
    assert served_requests == len(requests) and runs < served_requests  # some requests shared a run


def test_a_killed_replica_is_replaced_and_clients_never_get_a_wrong_answer(served, builds):
    session = trimrt.load(builds["vit"])
    rng = np.random.default_rng(2)
    requests = [_images(rng, int(rows)) for rows in rng.integers(1, 3, 120)]
    victim = min(_replicas(served["vit"]))
    outcomes = []

    def client(feeds):
        try:
            out, tries = infer_retrying(served["vit"], feeds)
            outcomes.append(tries)
            return out
        except HTTPFailure as exc:  # failed with a clear error: allowed, a wrong answer is not
            outcomes.append(exc)
            return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, feeds) for feeds in requests]
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        answers = [f.result() for f in futures]
    for feeds, answer in zip(requests, answers):
        if answer is not None:
            np.testing.assert_allclose(answer["logits"].astype(np.float32), session.run(feeds)["logits"], rtol=0,
                                       atol=1e-6)
    assert sum(isinstance(o, int) for o in outcomes) >= len(requests) - 4
    _replicas(served["vit"], without=victim)  # Serve's controller starts a replacement replica
    np.testing.assert_array_equal(infer(served["vit"], requests[0])["logits"].astype(np.float32),
                                  session.run(requests[0])["logits"])


def test_openai_completions_and_streaming_give_the_runtime_s_text(served, builds):
    gen = trimrt.load(builds["llm"]).generator(builds["tokenizer"])
    prompt = "w5 w17 w33 w8 w41"
    expected = gen.generate(prompt, max_new_tokens=10)
    body = {"model": "llm", "prompt": prompt, "max_tokens": 10, "temperature": 0}
    status, _, answer = http(f"{served['llm']}/v1/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
    answer = json.loads(answer)
    assert status == 200 and answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == expected.text and answer["choices"][0]["finish_reason"] == expected.finish_reason
    assert answer["usage"]["completion_tokens"] == len(expected.tokens)
    status, headers, stream = http(f"{served['llm']}/v1/completions", json.dumps({**body, "stream": True}).encode(),
                                   {"Content-Type": "application/json"})
    events = [line.removeprefix("data: ") for line in stream.decode().split("\n\n") if line]
    assert status == 200 and headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text and len(chunks) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    # sampling is seeded; n > 1 is refused in one line
    sampled = {"model": "llm", "prompt": prompt, "max_tokens": 8, "temperature": 1.3, "seed": 4}
    texts = {json.loads(http(f"{served['llm']}/v1/completions", json.dumps(sampled).encode(),
                             {"Content-Type": "application/json"})[2])["choices"][0]["text"] for _ in range(2)}
    assert texts == {gen.generate(prompt, max_new_tokens=8, temperature=1.3, seed=4).text}
    status, _, answer = http(f"{served['llm']}/v1/completions", json.dumps({**body, "n": 2}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 400 and "n = 1" in json.loads(answer)["error"]
    assert json.loads(http(f"{served['llm']}/v1/models")[2])["data"][0]["id"] == "llm"


def test_cli_refuses_openai_for_an_encoder_in_one_line(builds):
    result = CliRunner().invoke(main, ["serve", str(builds["vit"]), "--openai", "--port", str(free_port())])
    assert result.exit_code == 2 and "not a decoder build" in result.stderr and len(result.stderr.splitlines()) == 1
    assert "ray" not in sys.modules  # checked before Ray is imported (or started)


def test_cli_serves_until_terminated_and_leaves_nothing_running(builds, tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen([sys.executable, "-m", "trimrt.cli", "serve", str(builds["vit"]), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if http(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "trimrt serve did not come up"
            time.sleep(1)
        x = _images(np.random.default_rng(3), 2)
        np.testing.assert_array_equal(infer(f"http://127.0.0.1:{port}", x, binary=True)["logits"],
                                      trimrt.load(builds["vit"]).run(x)["logits"])
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopped" in err, err[-3000:]
    with pytest.raises(OSError):
        http(f"http://127.0.0.1:{port}/health", timeout=2)
