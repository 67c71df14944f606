"""Serving under load: a trimrt build behind Ray Serve (`trimrt serve`) and Triton Inference
Server (`trimrt export-triton`, the python-backend model), with dynamic batching and without.

    python benchmarks/serving_load.py                # all-MiniLM-L6-v2, 16 clients × 50 requests
    python benchmarks/serving_load.py --clients 8 --per-client 20 --json out.json

The build: the pretrained all-MiniLM-L6-v2 (mean-pooled, normalised embeddings) compiled by
trimrt with ONNX Runtime fusion. Requests: real text (the corpus' passages) of 16, 32 or 64
tokens, 1 to 4 rows each, the same list for every configuration. Every answer is compared
with `Session.run` of the request alone (the largest difference is printed: 0 for a request
run alone, float rounding where requests shared a run). Everything
runs on this machine, the clients too (their CPU time competes with the servers'), on
127.0.0.1: servers are started and stopped here.

Rows of the table: throughput (requests and rows per second, wall clock from the first
request to the last answer), latency p50 / p99 per request (retries included), the mean
requests per run (batching), errors. The last Ray row kills one of two replicas after a
quarter of the requests: its clients retry (up to 6 tries, growing back-off) and must never
get a wrong answer; the time until Serve's replacement replica answers is reported.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.models, tests.serving.servers (the Triton launcher and the HTTP client)
sys.path.insert(0, str(Path(__file__).resolve().parent))

LENGTHS = (16, 32, 64)  # sentences and short passages: what an embedding service is sent


def make_requests(tokenizer, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` requests of real text: a random length of LENGTHS, 1-4 rows of that length."""
    from examples.models import corpus

    rng = np.random.default_rng(seed)
    pools = {n: [p.input_ids for p in corpus.passages(tokenizer, n, 64)] for n in LENGTHS}
    requests = []
    for _ in range(count):
        n = int(rng.choice(LENGTHS))
        rows = rng.choice(len(pools[n]), int(rng.integers(1, 5)), replace=False)
        requests.append(corpus.feeds([pools[n][r] for r in rows]))
    return requests


def run_load(call, requests: list[dict], clients: int, on_progress=None) -> dict:
    """`clients` threads, each sending its share of `requests` one after another through
    `call(feeds) -> (outputs, tries)`; returns answers (None: failed), latencies, wall time."""
    answers: list = [None] * len(requests)
    latency: list[float] = [0.0] * len(requests)
    tries: list[int] = [0] * len(requests)
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(k, len(requests), clients):
            start = time.perf_counter()
            try:
                answers[i], tries[i] = call(requests[i])
            except Exception as exc:  # noqa: BLE001 - counted and shown: a failed request, never a wrong answer
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            latency[i] = time.perf_counter() - start
            with lock:
                done[0] += 1
                if on_progress:
                    on_progress(done[0])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return {"answers": answers, "latency": latency, "tries": tries, "errors": errors,
            "wall_s": time.perf_counter() - start}


def summarize(name: str, load: dict, requests: list[dict], references: list[np.ndarray], runs: int | None,
              output: str, extra: dict | None = None) -> dict:
    ok = [i for i, a in enumerate(load["answers"]) if a is not None]
    diffs = [float(np.abs(load["answers"][i][output].astype(np.float32) - references[i]).max()) for i in ok]
    rows = sum(len(requests[i]["input_ids"]) for i in ok)
    lat = sorted(load["latency"][i] for i in ok)
    return {"config": name, "requests": len(requests), "answered": len(ok), "failed": len(load["errors"]),
            "retried": sum(t > 1 for t in load["tries"]), "requests_per_s": len(ok) / load["wall_s"],
            "rows_per_s": rows / load["wall_s"], "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "requests_per_run": (len(requests) / runs) if runs else None, "max_abs_diff": max(diffs, default=None),
            "errors": load["errors"][:3], **(extra or {})}


def inprocess_rows(build: Path, requests, references) -> list[dict]:
    """The same requests without a server: Session.run one request at a time, and grouped 16 at
    a time by batching.run_requests (what a server's batch runs), both on 2 threads."""
    import trimrt
    from trimrt.serving.batching import BatchPolicy, run_requests

    rows = []
    with trimrt.load(build, threads=2) as session:
        policy = BatchPolicy.of_session(session)
        for name, size in [("in process, Session.run one request at a time (no server)", 1),
                           ("in process, run_requests on 16 requests at a time (no server)", 16)]:
            answers, latency = [], []
            start = time.perf_counter()
            for k in range(0, len(requests), size):
                t = time.perf_counter()
                answers += run_requests(session, requests[k:k + size], policy)
                latency += [time.perf_counter() - t] * len(requests[k:k + size])
            load = {"answers": answers, "latency": latency, "tries": [1] * len(requests), "errors": [],
                    "wall_s": time.perf_counter() - start}
            groups = sum(len({(r["input_ids"].shape[1]) for r in requests[k:k + size]})
                         for k in range(0, len(requests), size))
            rows.append(summarize(name, load, requests, references, groups, "sentence_embedding"))
            print(_line(rows[-1]), flush=True)
    return rows


def ray_rows(build: Path, requests, references, clients: int) -> list[dict]:
    from ray import serve

    from tests.serving.servers import free_port, http, infer_retrying
    from trimrt.serving import ray_serve

    port = free_port()
    ray_serve.connect(num_cpus=2)
    rows = []
    configs = [("Ray Serve, 1 replica × 2 threads, no batching", dict(replicas=1, threads=2, max_batch=1)),
               ("Ray Serve, 1 replica × 2 threads, batching ≤16 / 5 ms", dict(replicas=1, threads=2, max_batch=16)),
               ("Ray Serve, 2 replicas × 1 thread, batching ≤16 / 5 ms", dict(replicas=2, threads=1, max_batch=16)),
               ("… same, one replica killed after 25% of the requests", dict(replicas=2, threads=1, max_batch=16))]
    try:
        for name, config in configs:
            url = ray_serve.start(build, port=port, batch_wait_ms=5, name="minilm", **config)
            kill = name.startswith("…")

            def call(feeds):
                return infer_retrying(url, feeds, binary=True)

            def counters():
                seen = {}
                for _ in range(10 * config["replicas"]):
                    h = json.loads(http(f"{url}/health")[2])
                    seen[h["pid"]] = h
                return seen

            run_load(call, requests[: 4 * clients], clients)  # warm-up (not measured)
            before = counters()
            victim, killed_at = sorted(before)[0], [None]

            def progress(done):
                if kill and killed_at[0] is None and done >= len(requests) // 4:
                    killed_at[0] = time.perf_counter()
                    os.kill(victim, signal.SIGKILL)

            load = run_load(call, requests, clients, on_progress=progress)
            extra = {}
            if kill:
                while True:  # until the replacement replica answers
                    alive = set(counters())
                    if len(alive) == 2 and victim not in alive:
                        break
                    time.sleep(0.5)
                extra["replaced_after_s"] = time.perf_counter() - killed_at[0]
                runs = None
            else:
                after = counters()
                runs = sum(h["runs"] - before.get(pid, {"runs": 0})["runs"] for pid, h in after.items())
            rows.append(summarize(name, load, requests, references, runs, "sentence_embedding", extra))
            print(_line(rows[-1]), flush=True)
            serve.delete("minilm")
    finally:
        ray_serve.stop()
    return rows


def triton_rows(build: Path, requests, references, clients: int, workdir: Path) -> list[dict]:
    from tests.serving.servers import triton_missing, triton_server
    from trimrt.serving.triton import export_triton

    reason = triton_missing()
    if reason:
        print(f"Triton rows skipped: {reason}")
        return []
    import tritonclient.http as tclient

    rows = []
    for name, max_batch in [("Triton (python backend), no batching", 0),
                            ("Triton (python backend), dynamic batching ≤16 / 2 ms", 16)]:
        repo = workdir / f"repo_{max_batch}"
        export_triton(build, repo, name="minilm", max_batch=max_batch, threads=2)
        local = threading.local()

        def call(feeds):
            if not hasattr(local, "client"):
                local.client = tclient.InferenceServerClient(address, connection_timeout=120, network_timeout=120)
            tensors = []
            for key, arr in feeds.items():
                t = tclient.InferInput(key, list(arr.shape), "INT64")
                t.set_data_from_numpy(arr)
                tensors.append(t)
            result = local.client.infer("minilm_python", tensors)
            return {"sentence_embedding": result.as_numpy("sentence_embedding")}, 1

        with triton_server(repo, ["minilm_python"], workdir) as address:
            run_load(call, requests[: 4 * clients], clients)  # warm-up (not measured)
            before = _executions(address)
            load = run_load(call, requests, clients)
            runs = _executions(address) - before
        rows.append(summarize(name, load, requests, references, runs, "sentence_embedding"))
        print(_line(rows[-1]), flush=True)
    return rows


def _executions(address: str) -> int:
    """How many times Triton has run the model (each run: one execute() over a list of requests)."""
    from tests.serving.servers import http

    stats = json.loads(http(f"http://{address}/v2/models/minilm_python/stats")[2])["model_stats"][0]
    return int(stats["execution_count"])


def _line(r: dict) -> str:
    per_run = "-" if r["requests_per_run"] is None else f"{r['requests_per_run']:.2f}"
    extra = f", replaced after {r['replaced_after_s']:.1f} s" if "replaced_after_s" in r else ""
    return (f"| {r['config']} | {r['requests_per_s']:.1f} | {r['rows_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {per_run} | {r['failed']} failed, {r['retried']} retried{extra} | {r['max_abs_diff']:.1e} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--json", type=Path, help="Write the rows to this file.")
    args = parser.parse_args()

    from minilm_token_pruning import export_minilm

    import trimrt

    work = Path(tempfile.mkdtemp(prefix="trimrt-serving-"))
    onnx_path, tokenizer = export_minilm(work)
    build = work / "minilm_build"
    trimrt.compile(str(onnx_path), {"onnxruntime": {"fuse": True}}, build)
    requests = make_requests(tokenizer, args.clients * args.per_client)
    with trimrt.load(build, threads=2) as session:
        references = [session.run(r)["sentence_embedding"] for r in requests]
    rows_per_request = np.mean([len(r["input_ids"]) for r in requests])
    print(f"all-MiniLM-L6-v2 (trimrt build, ONNX Runtime fusion), {len(requests)} requests from {args.clients} "
          f"clients, {rows_per_request:.2f} rows of {'/'.join(map(str, LENGTHS))} tokens per request, "
          f"{os.cpu_count()} CPUs\n")
    print("| configuration | requests/s | rows/s | p50 ms | p99 ms | requests per run | failures | max |Δ| vs Session.run |")
    print("|---|---|---|---|---|---|---|---|")
    rows = inprocess_rows(build, requests, references)
    rows += ray_rows(build, requests, references, args.clients)
    if not args.skip_triton:
        rows += triton_rows(build, requests, references, args.clients, work)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    wrong = [r["config"] for r in rows if r["max_abs_diff"] is not None and r["max_abs_diff"] > 1e-6]
    if wrong:
        print(f"WRONG ANSWERS in {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
