"""bench: time a build against its unmodified baseline in one process.

Both run on ONNX Runtime CPU with the same thread count and the same inputs. After a
warm-up, each round times one baseline run and one build run, in alternating order,
so drift of the machine (frequency, other load) hits both alike; the report gives
the median times, the speedup as the median of the per-round ratios, and the FLOPs
ratio from the build manifest (the ideal speedup). Both sessions run with intra-op
spinning off: spinning threads of the idle session would otherwise steal the cores of
the running one (measured: ±30% swings of an identity build on 2 cores). A decoder build
whose graph writes its KV cache in place is timed on a decode step as generation runs it
(BenchReport.cache_in_place).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import InputError
from .runtime.feeds import build_feeds, load_feed_files, validate_feeds
from .runtime.kv_cache import KINDS, DecoderSpec, KVCache, is_past_name, past_name, present_name
from .runtime.manifest import read_manifest
from .runtime.session import load
from .verification import check_counts, load_reference_onnx

#: the engines bench times a build and its baseline on (both on the same one)
ENGINES = ("onnxruntime", "openvino")


@dataclass
class BenchReport:
    batch: int
    threads: int
    rounds: int
    baseline_ms: float
    build_ms: float
    speedup: float  # median of per-round baseline/build ratios
    flops_ratio: float | None
    #: a decoder build timed as generation runs its decode steps: the past in a cache buffer the
    #: step writes into (decoder.shared_buffer); the baseline, a plain ONNX decoder, is fed its past
    cache_in_place: bool = False
    #: the engine both ran on
    engine: str = "onnxruntime"

    @property
    def efficiency(self) -> float | None:
        """Measured speedup as a fraction of the ideal (FLOPs) one."""
        return self.speedup / self.flops_ratio if self.flops_ratio else None

    def to_dict(self) -> dict:
        return {**asdict(self), "efficiency": self.efficiency}


def time_alternating(run_a, run_b, *, warmup: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per call of two callables, interleaved (ABBA…) after `warmup` calls of each."""
    for _ in range(warmup):
        run_a()
        run_b()
    times_a, times_b = [], []
    for i in range(rounds):
        order = ((run_a, times_a), (run_b, times_b)) if i % 2 == 0 else ((run_b, times_b), (run_a, times_a))
        for fn, sink in order:
            t0 = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t0)
    return times_a, times_b


def paired_speedup(times_a: list[float], times_b: list[float]) -> float:
    """Median over rounds of time_a / time_b: each round's two runs are neighbours in time,
    so load that drifts over the measurement cancels in each ratio."""
    return statistics.median(a / b for a, b in zip(times_a, times_b))


def bench_build(build_dir: str | Path, baseline: str | Path | None = None, *, batch: int = 1, threads: int = 2,
                warmup: int = 5, rounds: int = 30, inputs: list[str] | None = None, seed: int = 0,
                tokens: int | None = None, backend: str | None = None) -> BenchReport:
    """Time the build and its baseline, both on `backend` (onnxruntime or openvino; None: the
    build's target where it is one of them, else onnxruntime)."""
    check_counts(batch=batch, threads=threads, warmup=warmup, rounds=rounds, tokens=tokens)
    build_dir = Path(build_dir)
    if backend is None:
        target = read_manifest(build_dir, check_hashes=False).get("target")
        backend = target if target in ENGINES else "onnxruntime"
    if backend not in ENGINES:
        raise InputError(f"bench runs on {list(ENGINES)}, not {backend!r}")
    # through Session: the sealed-build checks and a BuildLoadError for a model the engine cannot load
    session = load(build_dir, backend=backend, threads=threads, spinning=False)
    manifest, build = session.manifest, session.backend
    if baseline is None and not manifest.get("reference"):
        raise InputError(f"{build_dir} holds no reference model: pass --baseline ORIGINAL.onnx")
    baseline = build_dir / manifest["reference"] if baseline is None else baseline
    # on OpenVINO the baseline is compiled for the build's static shapes too, if it has them
    options = ({"threads": threads, "shapes": build.shapes} if backend == "openvino"
               else {"threads": threads, "spinning": False})
    base = load_reference_onnx(baseline, build.inputs, "baseline", engine=backend, **options)
    if inputs:
        feeds = validate_feeds(build.inputs, load_feed_files(inputs))
    else:
        feeds = build_feeds(manifest, build.inputs, batch=batch, seed=seed, tokens=tokens)
    fed = int(next(iter(feeds.values())).shape[0])
    if not inputs and fed != batch:
        raise InputError(f"cannot bench at batch {batch}: the model's batch axis is fixed at {fed} "
                         "(export it with a dynamic batch)")
    run_build, in_place = _build_step(session, feeds)
    t_base, t_build = time_alternating(lambda: base.infer(feeds), run_build, warmup=warmup, rounds=rounds)
    return BenchReport(batch=fed, threads=threads, rounds=rounds, baseline_ms=statistics.median(t_base) * 1e3,
                       build_ms=statistics.median(t_build) * 1e3, speedup=paired_speedup(t_base, t_build),
                       flops_ratio=manifest.get("flops", {}).get("ratio"), cache_in_place=in_place, engine=backend)


def _build_step(session, feeds: dict) -> tuple[Callable[[], object], bool]:
    """(one timed run of the build, whether it writes a cache in place). A decoder build that
    shares its past / present buffer runs a decode step as the generator does: the fed past
    held in a KVCache, the step's keys / values written into it and dropped after the run, so
    every round steps on the same past. Any other build: the backend on the feeds."""
    spec = DecoderSpec.from_manifest(session.manifest, "") if session.manifest.get("decoder") else None
    past = feeds.get(past_name(0, KINDS[0]))
    if spec is None or not spec.shared_buffer or spec.prunes_prompt or past is None or not past.shape[2] \
            or not session.backend.in_place:
        return (lambda: session.backend.infer(feeds)), False
    cache = KVCache(spec, batch=past.shape[0])
    cache.load({present_name(i, k): feeds[past_name(i, k)] for i in range(spec.layers) for k in KINDS}, past.shape[2])
    step = {name: value for name, value in feeds.items() if not is_past_name(name)}

    def run():
        session.run_with_cache(step, cache)
        cache.length = past.shape[2]

    return run, True
