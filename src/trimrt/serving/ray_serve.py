"""A Ray Serve deployment of a build (`trimrt serve`): replicas holding a Session, dynamic batching.

HTTP routes (JSON unless said otherwise):

- `GET /health`: {"status": "ok", "build", "pid", "requests", "runs", "batching"}; `runs` <
  `requests` once requests were batched; `pid` names the replica that answered;
- `GET /v1/metadata`: the build's inputs and outputs (names, dtypes, shapes);
- `POST /v1/infer`: `{"inputs": {name: nested list}}` (each input's dtype is the build's),
  or an npz body (`Content-Type: application/x-npz`); answers `{"outputs": {name: nested
  list}}`, or npz when the request was npz or `Accept: application/x-npz`. Errors: 400 with
  `{"error": one line}` for bad inputs, 500 for a failed run;
- decoder builds, with `openai=True`: `POST /v1/completions` (OpenAI's completions API: prompt
  text or token ids, max_tokens, temperature, top_p, seed, stop, `stream` as server-sent
  events) and `GET /v1/models`.

Requests that arrive within `batch_wait_ms` of each other are batched (`@serve.batch`) and
run by `batching.run_requests`, so every answer is what `Session.run` gives the request
alone (up to float rounding where it shared a run). The JSON numbers round-trip exactly (a float32 is printed as the float64
of the same value and parsed back to it).
"""

import asyncio
import io
import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from ..errors import InputError, ServingError, TrimrtError
from .batching import BatchPolicy, run_requests
from .checks import check_servable

NPZ = "application/x-npz"
app = FastAPI(title="trimrt")


def completion_request(body, has_tokenizer: bool) -> tuple[object, dict, bool]:
    """(prompt, Generator options, stream) of an OpenAI completions body; ValueError naming a
    field it cannot serve."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # ["text"] or [[ids]]: one prompt
    if isinstance(prompt, str):
        if not has_tokenizer:
            raise ValueError("this build has no tokenizer: send the prompt as token ids (a list of integers), or "
                             "serve it with --tokenizer")
    elif not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        raise ValueError("'prompt' must be a string or a list of token ids (one prompt a request)")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise ValueError("only n = 1 is served (one completion per request)")
    options = {"max_new_tokens": body.get("max_tokens", 16)}
    temperature = float(body.get("temperature", 1.0) or 0)  # OpenAI's default: sampling at 1; 0: greedy
    if temperature > 0:
        options["temperature"] = float(temperature)
        if body.get("top_p") is not None:
            options["top_p"] = float(body["top_p"])
    if body.get("seed") is not None:
        options["seed"] = int(body["seed"])
    stop = body.get("stop")
    if stop:
        options["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
    return prompt, options, bool(body.get("stream", False))


def decode_feeds(body: bytes, binary: bool, inputs) -> dict[str, np.ndarray]:
    """A request body's feeds: an npz archive, or JSON {"inputs": {name: nested list}} cast to
    each input's dtype (InputError naming what is wrong)."""
    if binary:
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"the body is not an npz archive of the inputs ({exc})") from None
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not JSON ({exc}); send {{\"inputs\": {{name: nested list}}}} or an npz "
                         f"archive with Content-Type: {NPZ}") from None
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), dict):
        raise InputError('the JSON body must be {"inputs": {name: nested list}}')
    dtypes = {i.name: i.dtype for i in inputs}
    feeds = {}
    for name, value in data["inputs"].items():
        try:
            arr = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise InputError(f"input {name!r} is not an array ({str(exc).splitlines()[0]})") from None
        want = dtypes.get(name)  # None: an unknown input, which the Session names
        if arr.dtype.kind not in "biuf":
            raise InputError(f"input {name!r} must hold numbers, got {arr.dtype.name} values")
        if want is not None and want.kind in "iu" and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise InputError(f"input {name!r} takes {want.name}, got numbers with fractions")
        feeds[name] = arr.astype(want) if want is not None else arr
    return feeds


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# helpers above: the ingress class is pickled with the module globals it finds when decorated
@serve.deployment
@serve.ingress(app)
class BuildDeployment:
    """One replica: a Session over the build, requests batched within `batch_wait_ms`."""

    def __init__(self, build_dir: str, max_batch: int = 16, batch_wait_ms: float = 5.0, threads: int | None = None,
                 openai: bool = False, tokenizer: str | None = None, name: str | None = None):
        from ..runtime import load

        # no idle spinning: the replica's cores are shared with the HTTP proxy
        self.session = load(build_dir, threads=threads, spinning=False)
        self.name = name or Path(build_dir).resolve().name
        self.policy = BatchPolicy.of_session(self.session) if not openai else None
        self.batch.set_max_batch_size(max_batch)
        self.batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.requests = 0
        self.runs = 0
        self.generator = self.session.generator(tokenizer) if openai else None
        self._generating = threading.Lock()  # one generation at a time per replica (they share the cores)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def batch(self, requests: list[dict]) -> list:
        self.requests += len(requests)
        self.runs += 1
        return await asyncio.to_thread(run_requests, self.session, requests, self.policy)

    @app.get("/health")
    def health(self) -> dict:
        batching = "rows of requests of one shape" if self.policy and self.policy.rows_independent else (
            f"one request a run: {self.policy.reason}" if self.policy else "generation")
        return {"status": "ok", "build": self.name, "pid": os.getpid(), "requests": self.requests, "runs": self.runs,
                "batching": batching}

    @app.get("/v1/metadata")
    def metadata(self) -> dict:
        def tensors(infos):
            return [{"name": i.name, "dtype": i.dtype.name, "shape": list(i.shape)} for i in infos]

        return {"build": self.name, "inputs": tensors(self.session.inputs), "outputs": tensors(self.session.outputs)}

    @app.post("/v1/infer")
    async def infer(self, request: Request) -> Response:
        if self.policy is None:
            return _error(400, "this deployment generates text: POST /v1/completions")
        binary = request.headers.get("content-type", "").split(";")[0].strip() in (NPZ, "application/octet-stream")
        try:
            feeds = decode_feeds(await request.body(), binary, self.session.inputs)
        except InputError as exc:
            return _error(400, str(exc))
        result = await self.batch(feeds)
        if isinstance(result, TrimrtError):
            return _error(400 if isinstance(result, InputError) else 500, str(result))
        if binary or NPZ in request.headers.get("accept", ""):
            return Response(encode_npz(result), media_type=NPZ)
        return JSONResponse({"outputs": {name: arr.tolist() for name, arr in result.items()}})

    @app.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "trimrt"}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        if self.generator is None:
            return _error(404, "this deployment serves a build's inputs and outputs: POST /v1/infer "
                               "(start a decoder build with --openai for completions)")
        try:
            body = json.loads(await request.body() or b"{}")
            prompt, options, stream = completion_request(body, self.generator.tokenizer is not None)
        except (ValueError, TypeError, InputError) as exc:
            return _error(400, str(exc))
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
        if stream:
            return StreamingResponse(self._stream(prompt, options, cid, created), media_type="text/event-stream")
        try:
            result = await asyncio.to_thread(self._generate, prompt, options)
        except TrimrtError as exc:
            return _error(400 if isinstance(exc, InputError) else 500, str(exc))
        text = result.text if result.text is not None else " ".join(map(str, result.tokens))
        return JSONResponse(self._completion(cid, created, text, result.finish_reason, usage={
            "prompt_tokens": result.stats.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.stats.prompt_tokens + len(result.tokens)}))

    def _generate(self, prompt, options):
        with self._generating:
            return self.generator.generate(prompt, **options)

    def _stream(self, prompt, options, cid: str, created: int):
        """Server-sent events: a chunk per text piece, the last with its finish_reason, then [DONE]."""
        with self._generating:
            pieces = 0
            try:
                for piece in self.generator.stream(prompt, **options):
                    pieces += 1
                    text = piece if isinstance(piece, str) else f"{piece} "
                    yield _event(self._completion(cid, created, text, None))
            except TrimrtError as exc:
                yield _event({"error": {"message": str(exc), "type": type(exc).__name__}})
                return
            stats = self.generator.last_stats
            finish = "length" if stats.new_tokens >= options["max_new_tokens"] else "stop"
            yield _event(self._completion(cid, created, "", finish))
        yield "data: [DONE]\n\n"

    def _completion(self, cid: str, created: int, text: str, finish_reason, usage: dict | None = None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": self.name,
               "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
        return {**out, "usage": usage} if usage else out


def deployment(build_dir: str | Path, *, replicas: int = 1, max_batch: int = 16, batch_wait_ms: float = 5.0,
               threads: int | None = None, openai: bool = False, tokenizer: str | Path | None = None,
               name: str | None = None):
    """The Ray Serve application of a build (bind it, or `serve.run` it)."""
    build_dir = check_servable(build_dir, replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                               openai=openai)
    options = BuildDeployment.options(name=name or "trimrt", num_replicas=replicas,
                                      ray_actor_options={"num_cpus": threads or 1},
                                      max_ongoing_requests=max(2 * max_batch, 8), health_check_period_s=2,
                                      graceful_shutdown_timeout_s=5)
    return options.bind(str(build_dir), max_batch, float(batch_wait_ms), threads, openai,
                        None if tokenizer is None else str(Path(tokenizer).resolve()), name)


def start(build_dir: str | Path, *, port: int = 8000, host: str = "127.0.0.1", replicas: int = 1,
          max_batch: int = 16, batch_wait_ms: float = 5.0, threads: int | None = None, openai: bool = False,
          tokenizer: str | Path | None = None, name: str | None = None, num_cpus: int | None = None,
          route_prefix: str = "/") -> str:
    """Serve a build over HTTP on host:port under `route_prefix` (a local Ray cluster of
    `num_cpus` is started unless one runs, or RAY_ADDRESS names one); returns the base URL.
    Several builds can be served side by side under different names and prefixes. `stop()`
    shuts everything down."""
    import ray

    check_servable(build_dir, replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms, openai=openai)
    connect(num_cpus)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = threads or max(1, cpus // replicas)
    app_ = deployment(build_dir, replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms, threads=threads,
                      openai=openai, tokenizer=tokenizer, name=name)
    available = int(ray.available_resources().get("CPU", 0))
    if replicas * threads > available:
        raise ServingError(f"{replicas} replica(s) × {threads} thread(s) need {replicas * threads} CPUs; the Ray cluster "
                           f"has {available} free: lower --replicas or --threads")
    serve.start(http_options={"host": host, "port": port})
    serve.run(app_, name=name or "trimrt", route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def connect(num_cpus: int | None = None) -> None:
    """Join the Ray cluster RAY_ADDRESS names, or start a local one of `num_cpus` (default: this
    machine's CPUs); nothing when this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)


def stop() -> None:
    """Shut down Serve and the Ray cluster this process started (nothing left running)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
