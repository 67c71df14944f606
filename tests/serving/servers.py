"""Servers the serving tests start and stop themselves, on 127.0.0.1 only.

`triton_server`: the `tritonserver` binary that the nvidia-pytriton wheel bundles (with the
python backend only), run from the Triton environment `make triton-env` creates with
Debian's own Python 3.11 (the python backend's stub links Debian's libpython; with another
interpreter's environment the model load fails). The tests skip, with the reason, where
that environment is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the Triton environment (`make triton-env`); TRIMRT_TRITON_ENV overrides it
TRITON_ENV = Path(os.environ.get("TRIMRT_TRITON_ENV", ROOT / ".venv-triton"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: a full Triton Inference Server (one with the onnxruntime backend, e.g. NVIDIA's container:
#: /opt/tritonserver/bin/tritonserver) for the stock models' test; TRIMRT_FULL_TRITONSERVER names it
FULL_TRITONSERVER = os.environ.get("TRIMRT_FULL_TRITONSERVER")


def full_triton_missing() -> str | None:
    """Why the stock-backend models cannot be served here, or None."""
    if not FULL_TRITONSERVER:
        return ("needs a full Triton Inference Server with the onnxruntime backend (nvidia-pytriton's has only the "
                "python backend): set TRIMRT_FULL_TRITONSERVER=/opt/tritonserver/bin/tritonserver")
    if not Path(FULL_TRITONSERVER).is_file():
        return f"TRIMRT_FULL_TRITONSERVER={FULL_TRITONSERVER} is not a file"
    return None


def triton_missing() -> str | None:
    """Why the Triton server cannot run here, or None."""
    if not (TRITON_ENV / "bin" / "python").exists():
        return f"no Triton environment at {TRITON_ENV} (create it with `make triton-env`; needs /usr/bin/python3.11)"
    if not list(TRITON_ENV.glob("lib/python3.*/site-packages/pytriton/tritonserver/bin/tritonserver")):
        return f"{TRITON_ENV} has no nvidia-pytriton (run `make triton-env`)"
    return None


@contextlib.contextmanager
def triton_server(repository: Path, models: list[str], workdir: Path, timeout: float = 120.0, *, full: bool = False):
    """Start tritonserver on a free 127.0.0.1 port serving `models` of `repository`: the one
    of the Triton environment, or (`full`) FULL_TRITONSERVER with its own backends; yields its
    HTTP address ("127.0.0.1:PORT"); stops it (and waits for it) on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="tritonserver-", dir=workdir))  # a fresh copy each start
    env = dict(os.environ)
    if full:
        binary, where = FULL_TRITONSERVER, []
    else:
        site = next(TRITON_ENV.glob("lib/python3.*/site-packages"))
        dist = site / "pytriton" / "tritonserver"
        server = workdir / "tritonserver"
        # the wheel's layout: the stub of this Python's version goes into the python backend's folder
        shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
        version = site.parent.name.removeprefix("python")
        shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", server / "backends" / "python")
        binary = str(server / "bin" / "tritonserver")
        where = [f"--backend-directory={server / 'backends'}", f"--cache-directory={server / 'caches'}"]
        env.update({"LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
                    # the stub finds its interpreter's environment (trimrt, numpy, onnxruntime) on PATH
                    "PATH": f"{TRITON_ENV / 'bin'}:{os.environ.get('PATH', '')}"})
        env.pop("PYTHONPATH", None)
    port = free_port()
    log = open(workdir / "tritonserver.log", "w")
    args = [binary, f"--model-repository={repository}", *where, "--model-control-mode=explicit", *(f"--load-model={m}" for m in models),
            "--http-address=127.0.0.1", f"--http-port={port}", "--allow-grpc=false", "--allow-metrics=false",
            "--exit-timeout-secs=10"]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({process.returncode}): {_tail(workdir / 'tritonserver.log')}")
            try:
                with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s: {_tail(workdir / 'tritonserver.log')}")
            time.sleep(0.5)
        yield address
    finally:
        process.terminate()
        _reap(process, 30)
        log.close()


#: the child process of ray_serve_process: start the apps, print their URLs, serve until stdin closes
_RAY_SCRIPT = """
import json, sys
from trimrt.serving import ray_serve
try:
    urls = [ray_serve.start(**app) for app in json.loads(sys.argv[1])]
    print(json.dumps(urls), flush=True)
    sys.stdin.read()
finally:
    ray_serve.stop()
"""


@contextlib.contextmanager
def ray_serve_process(apps: list[dict], workdir: Path, timeout: float = 180.0):
    """Serve `apps` (keyword arguments of trimrt.serving.ray_serve.start: one port, names and
    route prefixes of their own) from a child process, so Ray never loads into the test process
    (importing it replaces inspect.isgenerator with a Cython wrapper, which changes the text
    corpus later tests read); yields the apps' URLs; stops Serve and Ray on exit."""
    import json
    import sys

    log = open(workdir / "ray_serve.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-c", _RAY_SCRIPT, json.dumps(apps, default=str)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=log, env=env, cwd=workdir, text=True)
    try:
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        line = process.stdout.readline()
        timer.cancel()
        if not line:
            raise RuntimeError(f"the Ray Serve process exited ({process.wait()}): {_tail(workdir / 'ray_serve.log')}")
        yield json.loads(line)
    finally:
        process.stdin.close()
        _reap(process, 60)
        log.close()


def _reap(process: subprocess.Popen, timeout: float) -> None:
    """Wait for a stopping server; kill it if it has not stopped within `timeout` seconds."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- an HTTP client of `trimrt serve` (the tests and benchmarks/serving_load.py) ----------------------

class HTTPFailure(Exception):
    """A request answered with an error status (or not answered)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def http(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 120.0):
    """(status, headers, body) of a GET (no body) or POST; error statuses are returned, not raised."""
    import urllib.error

    request = urllib.request.Request(url, data=body, headers=headers or {}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer(url: str, feeds: dict, binary: bool = False) -> dict:
    """POST /v1/infer: the outputs as arrays (HTTPFailure on an error status)."""
    import io
    import json

    import numpy as np

    if binary:
        buffer = io.BytesIO()
        np.savez(buffer, **feeds)
        status, _, body = http(f"{url}/v1/infer", buffer.getvalue(), {"Content-Type": "application/x-npz"})
    else:
        payload = json.dumps({"inputs": {k: np.asarray(v).tolist() for k, v in feeds.items()}}).encode()
        status, _, body = http(f"{url}/v1/infer", payload, {"Content-Type": "application/json"})
    if status != 200:
        raise HTTPFailure(status, body.decode(errors="replace")[:300])
    if binary:
        with np.load(io.BytesIO(body)) as archive:
            return {name: archive[name] for name in archive.files}
    return {name: np.asarray(value) for name, value in json.loads(body)["outputs"].items()}


def infer_retrying(url: str, feeds: dict, binary: bool = False, attempts: int = 6, backoff: float = 0.5):
    """`infer`, retried on a server error or a dropped connection (a replica that died); returns
    (outputs, tries). A 4xx is the request's own fault and is not retried."""
    for attempt in range(1, attempts + 1):
        try:
            return infer(url, feeds, binary), attempt
        except HTTPFailure as exc:
            if exc.status is not None and exc.status < 500 or attempt == attempts:
                raise
        except OSError as exc:
            if attempt == attempts:
                raise HTTPFailure(None, f"no answer: {exc}") from None
        time.sleep(backoff * attempt)
