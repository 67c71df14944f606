"""The search of `trimrt tune`: compile, screen on fidelity, then successive halving on speed.

1. Fidelity first (cheap: seconds a candidate): every candidate is compiled into the work
   folder and run on the evaluation samples against the original model. The space is cut
   on the way: along one family (a pruning schedule, ToMe, MoD, sparse attention), once a
   setting misses the budget the stronger ones are not tried; the other pruning methods
   start at the strongest keep EViT met on their schedule; an INT8 method that misses is
   retried with the guard; INT8 is only combined with reductions that met the budget alone
   (both lower fidelity monotonically on every model measured here), and a calibrated INT8
   method only where it beats round-to-nearest's fidelity (same speed, costlier compiles).
2. Speed (what the budget is spent on): the candidates that met the budget are timed
   against the original model as `bench` does (alternating, medians of paired ratios) in
   rungs of growing rounds; after each rung the faster third goes on. The best is the
   fastest at the highest rung it reached.

Screening stops at `SCREENING_SHARE` of the time budget, so that a budget too short to
screen the whole space still times what met it and chooses among that.

The work folder (`OUT.tune/`) keeps the compiled candidates and `state.json`, written after
every measurement: running the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import TrimrtError, TuneError
from .evaluation import DEFAULT_MIN, METRICS, Evaluation
from .report import budget_text, value_text
from .space import COMBINED, QUANTIZATION, REDUCTION, Candidate, candidates

#: timed rounds of the successive-halving rungs
RUNGS = (5, 15, 40)
#: the share of the time budget screening may use; the rest is kept for timing
SCREENING_SHARE = 0.75
#: a calibrated INT8 method is combined with reductions only when its gap to a fidelity of 1
#: is at most this share of round-to-nearest's
CALIBRATED_GAIN = 0.9


@dataclass
class Measurement:
    """What was measured of one candidate."""

    key: str
    name: str
    recipe: dict
    status: str = "pending"  # ok | below budget | failed | pending
    fidelity: float | None = None
    flops_ratio: float | None = None
    speedup: float | None = None
    rounds: int = 0  # timed rounds of the speedup (its rung)
    error: str = ""
    #: the speedup measured at each rung reached (the halving compares candidates at one rung,
    #: so a resumed run makes the same choices)
    rung_speedups: list = field(default_factory=list)
    #: wall time spent on it: compiling and scoring, and each timing (the progress estimate's data)
    screen_s: float = 0.0
    timing_s: list = field(default_factory=list)

    @property
    def meets(self) -> bool:
        return self.status == "ok"


@dataclass
class TuneResult:
    """The chosen candidate (None when none met the budget), every measurement, and where the
    build and the report went."""

    best: Measurement | None
    measurements: list[Measurement]
    out_dir: Path | None
    report: Path | None
    message: str
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TuneProgress:
    """What tune is doing, for a progress display: the phase ("setup", "screening" or
    "timing"), the seconds spent and the estimated seconds left (from this run's own
    compile and timing times; None until something was measured; never past the budget)."""

    message: str
    phase: str
    elapsed_s: float
    left_s: float | None

    def __str__(self) -> str:
        return self.message


class _Clock:
    """Estimates the time left from what the search measured: seconds per screened candidate
    and per timed round (with a warm-up's share), and the work still planned."""

    WARMUP = 2

    def __init__(self, budget_s: float, progress: Callable[[TuneProgress], None] | None):
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.progress = progress or (lambda event: None)
        self.phase = "setup"
        #: a timed round's cost before one was timed: the original and a build, each once
        self.round_guess_s = 0.0

    def expired(self, share: float = 1.0) -> bool:
        """Whether `share` of the budget is spent."""
        return time.monotonic() > self.started + share * (self.deadline - self.started)

    def say(self, message: str, measurements=(), to_screen: int = 0, timings: list[tuple[int, int]] = ()) -> None:
        """`to_screen`: candidates still to compile and score; `timings`: (candidates, rounds)
        still to time."""
        now = time.monotonic()
        screens = [m.screen_s for m in measurements if m.screen_s]
        per_round = [t / (rounds + self.WARMUP) for m in measurements for t, rounds in zip(m.timing_s, RUNGS)]
        left = None
        if screens or per_round:
            round_s = float(np.mean(per_round)) if per_round else self.round_guess_s
            left = to_screen * float(np.mean(screens or [0.0])) + sum(n * (r + self.WARMUP) * round_s for n, r in timings)
            left = min(left, max(self.deadline - now, 0.0))
        self.progress(TuneProgress(message, self.phase, now - self.started, left))


def rung_sizes(feasible: int) -> list[int]:
    """How many candidates each rung of the successive halving times: all that met the
    budget, then the fastest third (at least 2), then the fastest 2."""
    sizes, n = [], feasible
    for rung in range(len(RUNGS)):
        sizes.append(n)
        n = min(n, max(2, math.ceil(n / 3)) if rung + 1 < len(RUNGS) - 1 else 2)
    return sizes


def tune(model, *, data: str | Path, eval_data: str | Path, out_dir: str | Path, min_cosine: float = 0.99,
         metric: str | None = None, min_value: float | None = None, budget_s: float = 1200.0, batch: int = 1,
         threads: int = 2, samples: int = 32, tokenizer: str | None = None, max_length: int | None = None,
         progress: Callable[[TuneProgress], None] | None = None) -> TuneResult:
    """See the module docstring. `metric`: "cosine" (mean cosine of the outputs; a decoder's:
    of the logits at every position; the budget is `min_cosine`), "top1" (agreement of the
    logits' argmax), "retrieval" (recall@5 of each evaluation sample's nearest neighbours
    among the others, by the embeddings' cosine) or "perplexity" (a decoder's: the original's
    perplexity on the evaluation text over the build's); the budget of the last three is
    `min_value` (default 0.97, 0.95 and 1 / 1.02: at most 2% more perplexity). None: cosine
    for encoders, perplexity for decoders. `progress` is called with a TuneProgress at every
    step (its str() is the message)."""
    clock = _Clock(budget_s, progress)
    say = clock.say
    if metric is not None and metric not in METRICS:
        raise TuneError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".tune")
    work.mkdir(parents=True, exist_ok=True)
    source = _source_onnx(model, work, say)
    evaluation = Evaluation(source, Path(eval_data), samples, tokenizer, max_length, metric)
    metric = evaluation.metric
    clock.round_guess_s = 2 * batch * evaluation.seconds_per_sample
    if metric == "cosine" and min_value is not None:
        raise TuneError(f"the model is {'a decoder' if evaluation.decoder else 'an encoder'} scored on cosine, whose "
                        "budget is min_cosine (--min-cosine); min_value (--min-top1, --min-retrieval, "
                        "--max-perplexity-increase) goes with its metric")
    threshold = min_cosine if metric == "cosine" else (DEFAULT_MIN[metric] if min_value is None else min_value)
    # what the measurements depend on (the budget does not: a rerun with another one reuses them)
    settings = {"source": str(source), "data": str(Path(data).resolve()), "eval": str(Path(eval_data).resolve()),
                "metric": metric, "batch": batch, "threads": threads, "samples": samples, "tokenizer": tokenizer,
                "max_length": max_length}
    state = _State(work / "state.json", settings, threshold)
    settings = {**settings, "threshold": threshold}
    # a decoder's candidates do not depend on its structure (weight formats and methods only)
    structure = {"decoder": True} if evaluation.decoder else _structure(source, say)
    calibration = {"source": settings["data"], "samples": min(samples, 64),
                   **({"tokenizer": tokenizer} if tokenizer else {}), **({"max_length": max_length} if max_length else {})}
    # the guard's bar: halfway between the budget and 1, for the gap between its held-out
    # calibration samples and the evaluation data
    guard = round(1 - (1 - threshold) / 2, 6) if metric == "cosine" and threshold < 1 else None
    space = candidates(structure, calibration, evaluation.tokens, guard)
    say(f"{len(space)} candidate recipes; budget {budget_s:.0f} s; {budget_text(metric, threshold)}")

    by_name = {c.name: c for c in space}
    families = _families([c for c in space if c.kind != COMBINED and not c.fallback_for])

    def screen(candidate: Candidate) -> Measurement:
        m = state.get(candidate)
        if m.status == "pending" and not clock.expired(SCREENING_SHARE):
            to_screen, feasible = _planned(space, state)
            clock.phase = "screening"
            say(f"[{len(state.done()) + 1}] compiling and evaluating {candidate.name}", state.entries.values(),
                to_screen, list(zip(rung_sizes(feasible), RUNGS)))
            began = time.monotonic()
            _screen(m, candidate, work, source, evaluation, threshold)
            m.screen_s = time.monotonic() - began
            state.save()
        return m

    feasible_reductions = []
    for group in families.values():  # along one family: stop at the first setting that misses the budget
        for candidate in group if not group[0].refines else []:
            if not screen(candidate).meets:
                break
            if candidate.kind == REDUCTION:
                feasible_reductions.append(candidate.name)
    for group in families.values():  # other pruning methods, from the strongest keep EViT met
        met = [i for i, c in enumerate(families[group[0].refines]) if state.get(c).meets] if group[0].refines else []
        for candidate in group[met[-1]:] if met else []:
            if not screen(candidate).meets:
                break
            feasible_reductions.append(candidate.name)
    for c in space:  # a method that missed the budget, retried with the guard
        if _fallback_needed(c, state, by_name) is True:
            screen(c)
    feasible_quantization = _worth_combining([c for c in space if c.kind == QUANTIZATION and state.get(c).meets],
                                             state)
    for reduction in feasible_reductions:
        for q in feasible_quantization:
            combined = by_name.get(f"{reduction} + {q}")
            if combined is not None:
                screen(combined)
    # the space's candidates (the state may hold other budgets' guards), less the guarded
    # fallbacks of methods that met the budget alone (never needed) and their combinations
    unneeded = [c.name for c in space if _fallback_needed(c, state, by_name) is False]
    measurements = [state.get(c) for c in space
                    if not any(c.name == u or c.name.endswith(f" + {u}") for u in unneeded)]
    _speed_rungs(state, measurements, source, work, evaluation, batch, threads, clock)
    # the fastest among those timed at the highest rung reached
    best = max((m for m in measurements if m.meets and m.speedup), key=lambda m: (m.rounds, m.speedup), default=None)
    return _finish(best, measurements, out_dir, work, settings, threshold, metric, clock)


class _State:
    """The measurements by candidate key, saved to state.json (resumed when the settings match)."""

    def __init__(self, path: Path, settings: dict, threshold: float):
        self.path, self.settings = path, settings
        self.entries: dict[str, Measurement] = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") != settings:
                raise TuneError(f"{path.parent} holds a tune run with other settings "
                                f"({_differences(saved.get('settings'), settings)}); remove that folder or choose another -o")
            self.entries = {k: Measurement(**v) for k, v in saved["measurements"].items()}
        for m in self.entries.values():  # this run's budget decides what meets it
            if m.fidelity is not None and m.status in ("ok", "below budget"):
                m.status = "ok" if m.fidelity >= threshold else "below budget"

    def get(self, candidate: Candidate) -> Measurement:
        return self.entries.setdefault(candidate.key, Measurement(candidate.key, candidate.name, candidate.recipe))

    def done(self) -> list[Measurement]:
        return [m for m in self.entries.values() if m.status != "pending"]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "measurements": {k: asdict(m) for k, m in self.entries.items()}},
                                  indent=1))
        tmp.replace(self.path)


def _differences(old: dict | None, new: dict) -> str:
    old = old if isinstance(old, dict) else {}
    keys = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _source_onnx(model, work: Path, say) -> Path:
    """The model as an ONNX file: the user's, or its export (once) into the work folder."""
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        path = Path(model)
        if not path.is_file():
            raise TuneError(f"model file not found: {path}")
        return path.resolve()
    path = work / "model.onnx"
    if not path.is_file():
        from ..compiler.source import export_onnx

        say(f"exporting {model}")
        try:
            export_onnx(model, path)
        except TrimrtError as exc:
            raise TuneError(f"cannot export {model}: {exc}") from None
    return path


def _structure(source: Path, say) -> dict:
    """The compiler's analysis of the model (what `trimrt inspect MODEL` shows)."""
    from ..inspect import inspect_model

    say("analysing the model")
    try:
        info = inspect_model(str(source))
    except TrimrtError as exc:
        raise TuneError(f"cannot analyse {source}: {exc}") from None
    return info["structure"]


def _planned(space: list[Candidate], state: _State) -> tuple[int, int]:
    """(candidates still to screen, candidates expected to meet the budget), projecting the
    share of reductions that met it so far onto those not screened yet (for the estimate)."""
    by_kind: dict[str, list[Measurement]] = {}
    by_name = {c.name: c for c in space}
    for c in space:
        if _fallback_needed(c, state, by_name) is False:  # counted once its plain method missed
            continue
        if c.refines and state.get(c).status == "pending":  # a few around EViT's best keep: not counted
            continue
        by_kind.setdefault(c.kind, []).append(state.get(c))
    reductions, quantization = by_kind.get(REDUCTION, []), by_kind.get(QUANTIZATION, [])
    screened = [m for m in reductions if m.status != "pending"]
    rate = sum(m.meets for m in screened) / len(screened) if screened else 1.0
    expected_reductions = sum(m.meets for m in screened) + rate * (len(reductions) - len(screened))
    expected_quantization = sum(m.meets or m.status == "pending" for m in quantization)
    combined_done = sum(m.status != "pending" for m in by_kind.get(COMBINED, []))
    combined_left = max(expected_reductions * expected_quantization - combined_done, 0) if reductions else 0
    singles_left = sum(m.status == "pending" for kind, ms in by_kind.items() if kind != COMBINED for m in ms)
    feasible = sum(m.meets for ms in by_kind.values() for m in ms) + rate * (singles_left + combined_left)
    return round(singles_left + combined_left), round(feasible)


def _fallback_needed(candidate: Candidate, state: _State, by_name: dict[str, Candidate]) -> bool | None:
    """For a guarded fallback: whether its plain method missed the budget (True: try it);
    None for every other candidate."""
    if not candidate.fallback_for:
        return None
    return state.get(by_name[candidate.fallback_for]).status == "below budget"


def _worth_combining(quantization: list[Candidate], state: _State) -> list[str]:
    """The quantization candidates (that met the budget alone) to combine with reductions: a
    calibrated method (SmoothQuant) only where it is more faithful than round-to-nearest
    alone, its gap to 1 at least CALIBRATED_GAIN smaller; both run at the same speed, and the
    calibrated compiles cost several times more (30 s against 6 s on the ViT)."""
    plain = {c.recipe["quantization"].get("method", "rtn"): state.get(c).fidelity for c in quantization
             if not c.fallback_for}
    out = []
    for c in quantization:
        method, fidelity = c.recipe["quantization"].get("method", "rtn"), state.get(c).fidelity
        rtn = plain.get("rtn")
        if method != "rtn" and not c.fallback_for and rtn is not None and (1 - fidelity) > CALIBRATED_GAIN * (1 - rtn):
            continue
        out.append(c.name)
    return out


def _families(singles: list[Candidate]) -> dict[str, list[Candidate]]:
    """The single-method candidates in the order they are screened, grouped: a reduction
    family together under its name (lightest first), every other candidate alone."""
    groups: dict[str, list[Candidate]] = {}
    for c in singles:
        groups.setdefault(c.family if c.kind == REDUCTION else c.key, []).append(c)
    return groups


def _screen(m: Measurement, candidate: Candidate, work: Path, source: Path, evaluation: Evaluation,
            threshold: float) -> None:
    from ..compiler.driver import compile_model
    from ..runtime import load
    from ..runtime.manifest import MODEL

    build = work / "candidates" / candidate.key
    try:
        if not (build / "manifest.json").is_file():
            compile_model(str(source), candidate.recipe, build)
        with load(build, threads=2, spinning=False) as session:
            m.fidelity = evaluation.score(session)
            m.flops_ratio = evaluation.flops_ratio(build / MODEL)
            if m.flops_ratio is None:
                m.flops_ratio = (session.manifest.get("flops") or {}).get("ratio")
    except TuneError:
        raise
    except TrimrtError as exc:  # a recipe this model cannot take: recorded, the search goes on
        m.status, m.error = "failed", str(exc)
        return
    m.status = "ok" if m.fidelity >= threshold else "below budget"


def _speed_rungs(state: _State, measurements: list[Measurement], source: Path, work: Path, evaluation: Evaluation,
                 batch: int, threads: int, clock: _Clock) -> None:
    """Successive halving on speed among the `measurements` that met the budget."""
    from ..bench import bench_build

    alive = [m for m in measurements if m.meets]
    if not alive:
        return
    if evaluation.decoder:  # a decode step (one new token) on a past as long as an evaluation sample
        from ..runtime.kv_cache import DecoderSpec
        from ..runtime.manifest import read_manifest

        spec = DecoderSpec.from_manifest(read_manifest(work / "candidates" / alive[0].key, check_hashes=False), "")
        feeds = spec.random_feeds(batch, new=1, past=evaluation.feeds[0]["input_ids"].shape[1])
    else:
        feeds = {k: np.concatenate([v] * batch) for k, v in evaluation.feeds[0].items()}
    inputs = work / f"bench_batch{batch}.npz"
    np.savez(inputs, **feeds)
    clock.phase = "timing"
    sizes = rung_sizes(len(alive))
    for rung, rounds in enumerate(RUNGS):
        for m in alive:
            if len(m.rung_speedups) > rung:
                continue
            if clock.expired():
                clock.say("time budget spent: choosing among what was measured", state.entries.values())
                return
            untimed = sum(len(x.rung_speedups) <= rung for x in alive)
            clock.say(f"rung {rung + 1}/{len(RUNGS)}: timing {m.name} ({rounds} rounds)", state.entries.values(),
                      timings=[(untimed, rounds), *zip(sizes[rung + 1:], RUNGS[rung + 1:])])
            began = time.monotonic()
            report = bench_build(work / "candidates" / m.key, source, batch=batch, threads=threads,
                                 warmup=_Clock.WARMUP, rounds=rounds, inputs=[str(inputs)])
            m.speedup, m.rounds = report.speedup, rounds
            m.rung_speedups.append(report.speedup)
            m.timing_s.append(time.monotonic() - began)
            state.save()
        alive.sort(key=lambda m: (m.rung_speedups[rung], m.key), reverse=True)
        alive = alive[:sizes[rung + 1]] if rung + 1 < len(RUNGS) else alive


def _finish(best, measurements, out_dir: Path, work: Path, settings: dict, threshold: float, metric: str,
            clock: _Clock) -> TuneResult:
    from ..compiler.artifacts import atomic_build_dir
    from .report import write_report

    measured = [m for m in measurements if m.fidelity is not None]
    if best is None:
        feasible = [m for m in measurements if m.meets]
        closest = max(measured, key=lambda m: m.fidelity, default=None)
        if feasible or not measured:
            message = (f"the time budget ran out before a candidate meeting {budget_text(metric, threshold)} was timed "
                       f"({len(feasible)} met it, {len(measured)} of {len(measurements)} were scored); give a larger "
                       "--budget: rerunning resumes; no build written")
        else:
            gap = f"; the closest, {closest.name}, reached {value_text(metric, closest.fidelity)}" if closest else ""
            message = (f"no candidate reached {budget_text(metric, threshold)} on the evaluation data{gap}; "
                       "no build written")
        report = write_report(measurements, None, work, settings, message)
        return TuneResult(None, measurements, None, report, message, settings)
    with atomic_build_dir(out_dir) as tmp:
        shutil.copytree(work / "candidates" / best.key, tmp, dirs_exist_ok=True)
    message = (f"{best.name}: {best.speedup:.2f}× over the original ({best.rounds} alternating rounds), "
               f"{value_text(metric, best.fidelity)} on the evaluation data (budget: {budget_text(metric, threshold)}); "
               f"{len(measured)} candidates measured "
               f"({time.monotonic() - clock.started:.0f} s this run)")
    report = write_report(measurements, best, out_dir, settings, message)
    clock.phase = "done"
    clock.say(message, measurements)
    return TuneResult(best, measurements, out_dir, report, message, settings)
