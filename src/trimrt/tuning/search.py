"""The search of `trimrt tune`: compile, screen on fidelity, then successive halving on speed.

1. Fidelity first (cheap: seconds a candidate): every candidate is compiled into the work
   folder and run on the evaluation samples against the original model. The space is cut
   on the way: along one pruning schedule, once a keep ratio misses the budget the smaller
   ones are not tried, and INT8 is only combined with reductions that met the budget alone
   (both lower fidelity monotonically on every model measured here).
2. Speed (what the budget is spent on): the candidates that met the budget are timed
   against the original model as `bench` does (alternating, medians of paired ratios) in
   rungs of growing rounds; after each rung the faster third goes on. The best is the
   fastest at the highest rung it reached.

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
from .space import Candidate, candidates

#: timed rounds of the successive-halving rungs
RUNGS = (5, 15, 40)
METRICS = ("cosine", "top1", "retrieval")
#: the budget of a metric when none is given (cosine's is `min_cosine`)
DEFAULT_MIN = {"top1": 0.97, "retrieval": 0.95}
#: neighbours the retrieval metric compares (recall@k)
RETRIEVAL_K = 5


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


def tune(model, *, data: str | Path, eval_data: str | Path, out_dir: str | Path, min_cosine: float = 0.99,
         metric: str = "cosine", min_value: float | None = None, budget_s: float = 1200.0, batch: int = 1,
         threads: int = 2, samples: int = 32, tokenizer: str | None = None, max_length: int | None = None,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """See the module docstring. `metric`: "cosine" (mean cosine of the outputs; the budget is
    `min_cosine`), "top1" (agreement of the logits' argmax) or "retrieval" (recall@5 of each
    evaluation sample's nearest neighbours among the others, by the embeddings' cosine); the
    budget of the last two is `min_value` (default 0.97 and 0.95)."""
    say = progress or (lambda msg: None)
    started = time.monotonic()
    deadline = started + budget_s
    if metric not in METRICS:
        raise TuneError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    threshold = min_cosine if metric == "cosine" else (DEFAULT_MIN[metric] if min_value is None else min_value)
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".tune")
    work.mkdir(parents=True, exist_ok=True)
    source = _source_onnx(model, work, say)
    # what the measurements depend on (the budget does not: a rerun with another one reuses them)
    settings = {"source": str(source), "data": str(Path(data).resolve()), "eval": str(Path(eval_data).resolve()),
                "metric": metric, "batch": batch, "threads": threads, "samples": samples, "tokenizer": tokenizer,
                "max_length": max_length}
    state = _State(work / "state.json", settings, threshold)
    settings = {**settings, "threshold": threshold}
    evaluation = Evaluation(source, Path(eval_data), samples, tokenizer, max_length, metric)
    structure = _structure(source, say)
    calibration = {"source": settings["data"], "samples": min(samples, 64),
                   **({"tokenizer": tokenizer} if tokenizer else {}), **({"max_length": max_length} if max_length else {})}
    space = candidates(structure, calibration)
    say(f"{len(space)} candidate recipes; budget {budget_s:.0f} s; {metric} ≥ {threshold}")

    def screen(candidate: Candidate) -> Measurement:
        m = state.get(candidate)
        if m.status == "pending" and time.monotonic() < deadline:
            say(f"[{len(state.done())}/{len(space)}] compiling and evaluating {candidate.name}")
            _screen(m, candidate, work, source, evaluation, threshold)
            state.save()
        return m

    by_name = {c.name: c for c in space}
    singles = [c for c in space if " + " not in c.name]
    feasible_reductions = []
    for group in _schedules(singles):  # along one schedule: stop at the first keep that misses the budget
        for candidate in group:
            if not screen(candidate).meets:
                break
            if candidate.name not in ("fusion only",) and not candidate.name.startswith("INT8"):
                feasible_reductions.append(candidate.name)
    feasible_int8 = [c.name for c in singles if c.name.startswith("INT8") and state.get(c).meets]
    for reduction in feasible_reductions:
        for q in feasible_int8:
            combined = by_name.get(f"{reduction} + {q}")
            if combined is not None:
                screen(combined)
    _speed_rungs(state, source, work, evaluation, batch, threads, deadline, say)
    measurements = [state.get(c) for c in space]
    # the fastest among those timed at the highest rung reached
    best = max((m for m in measurements if m.meets and m.speedup), key=lambda m: (m.rounds, m.speedup), default=None)
    return _finish(best, measurements, out_dir, work, settings, threshold, metric, time.monotonic() - started, say)


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


class Evaluation:
    """The evaluation samples, the original model's outputs on them, and the metric."""

    def __init__(self, source: Path, eval_data: Path, samples: int, tokenizer, max_length, metric: str):
        import onnx

        from ..quantization.calibration import load_calibration_feeds, model_inputs
        from ..recipe import CalibrationOptions
        from ..runtime.backends import OnnxRuntimeBackend

        inputs = model_inputs(onnx.load(str(source), load_external_data=False))
        try:
            options = CalibrationOptions(source=str(eval_data.resolve()), samples=samples, tokenizer=tokenizer,
                                         max_length=max_length)
            self.feeds = load_calibration_feeds(options, inputs, None)
        except TrimrtError as exc:
            raise TuneError(f"the evaluation data {eval_data}: {exc}") from None
        backend = OnnxRuntimeBackend(source, threads=2, spinning=False)
        backend.activate()
        self.reference = [backend.infer(f, None) for f in self.feeds]
        backend.deactivate()
        self.metric = metric
        rows = sum(next(iter(r.values())).shape[0] for r in self.reference)
        if metric == "retrieval" and rows < 3:
            raise TuneError(f"metric retrieval ranks each evaluation sample's neighbours: {eval_data} gave {rows} "
                            "sample(s), give 3 or more")

    def score(self, session) -> float:
        """The build's fidelity to the original model on the evaluation samples."""
        from ..compare import compare_outputs, retrieval_agreement

        got = [session.run(f) for f in self.feeds]
        names = [n for n in self.reference[0] if n in got[0] and got[0][n].shape == self.reference[0][n].shape]
        if not names:
            raise TuneError("no output of the build has the original's shape (token-level outputs of a pruned model); "
                            "tune needs a pooled output (an embedding, logits)")
        values = []
        for name in names:
            got_all = np.concatenate([g[name] for g in got])
            ref_all = np.concatenate([r[name] for r in self.reference])
            if self.metric == "retrieval":
                if ref_all.ndim == 2 and np.issubdtype(ref_all.dtype, np.floating):
                    values.append(retrieval_agreement(ref_all, ref_all, got_all, got_all, RETRIEVAL_K,
                                                      leave_one_out=True)[1])
                continue
            m = compare_outputs(name, got_all, ref_all)
            if self.metric == "top1":
                if m.top1 is not None:
                    values.append(m.top1)
            else:
                values.append(m.cosine_mean)
        if not values:
            raise TuneError(f"metric {self.metric} needs " + (
                "a logits output ([batch, classes])" if self.metric == "top1" else
                "an embedding output ([batch, dim])") + "; use --metric cosine")
        return float(min(values))


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
    return {**info["structure"], "decoder": any("past" in i["name"] for i in info["inputs"])}


def _schedules(singles: list[Candidate]) -> list[list[Candidate]]:
    """The single-method candidates in the order they are screened: fusion, INT8, then each
    reduction family (a pruning schedule, or ToMe) from the lightest setting to the strongest."""
    groups: dict[str, list[Candidate]] = {}
    for c in singles:
        family = c.name.rsplit(" keep ", 1)[0] if " keep " in c.name else ("ToMe" if c.name.startswith("ToMe") else c.name)
        groups.setdefault(family, []).append(c)
    for family, group in groups.items():
        if family == "ToMe":
            group.sort(key=lambda c: c.recipe["token_merging"]["r"])
    return list(groups.values())


def _screen(m: Measurement, candidate: Candidate, work: Path, source: Path, evaluation: Evaluation,
            threshold: float) -> None:
    from ..compiler.driver import compile_model
    from ..runtime import load

    build = work / "candidates" / candidate.key
    try:
        if not (build / "manifest.json").is_file():
            compile_model(str(source), candidate.recipe, build)
        with load(build, threads=2, spinning=False) as session:
            m.fidelity = evaluation.score(session)
            m.flops_ratio = (session.manifest.get("flops") or {}).get("ratio")
    except TuneError:
        raise
    except TrimrtError as exc:  # a recipe this model cannot take: recorded, the search goes on
        m.status, m.error = "failed", str(exc)
        return
    m.status = "ok" if m.fidelity >= threshold else "below budget"


def _speed_rungs(state: _State, source: Path, work: Path, evaluation: Evaluation, batch: int, threads: int,
                 deadline: float, say) -> None:
    """Successive halving on speed among the candidates that met the budget."""
    from ..bench import bench_build

    feeds = {k: np.concatenate([v] * batch) for k, v in evaluation.feeds[0].items()}
    inputs = work / f"bench_batch{batch}.npz"
    np.savez(inputs, **feeds)
    alive = [m for m in state.entries.values() if m.meets]
    for rung, rounds in enumerate(RUNGS):
        if not alive:
            return
        for m in alive:
            if len(m.rung_speedups) > rung:
                continue
            if time.monotonic() > deadline:
                say("time budget spent: choosing among what was measured")
                return
            say(f"rung {rung + 1}/{len(RUNGS)}: timing {m.name} ({rounds} rounds)")
            report = bench_build(work / "candidates" / m.key, source, batch=batch, threads=threads, warmup=2, rounds=rounds,
                                 inputs=[str(inputs)])
            m.speedup, m.rounds = report.speedup, rounds
            m.rung_speedups.append(report.speedup)
            state.save()
        alive.sort(key=lambda m: (m.rung_speedups[rung], m.key), reverse=True)
        alive = alive[:max(2, math.ceil(len(alive) / 3))] if rung + 1 < len(RUNGS) - 1 else alive[:2]


def _finish(best, measurements, out_dir: Path, work: Path, settings: dict, threshold: float, metric: str,
            seconds: float, say) -> TuneResult:
    from ..compiler.artifacts import atomic_build_dir
    from .report import write_report

    measured = [m for m in measurements if m.fidelity is not None]
    if best is None:
        feasible = [m for m in measurements if m.meets]
        closest = max(measured, key=lambda m: m.fidelity, default=None)
        if feasible or not measured:
            message = (f"the time budget ran out before a candidate meeting {metric} ≥ {threshold} was timed "
                       f"({len(feasible)} met it, {len(measured)} of {len(measurements)} were scored); give a larger "
                       "--budget: rerunning resumes; no build written")
        else:
            gap = f"; the closest, {closest.name}, reached {closest.fidelity:.4f}" if closest else ""
            message = f"no candidate reached {metric} ≥ {threshold} on the evaluation data{gap}; no build written"
        report = write_report(measurements, None, work, settings, message)
        return TuneResult(None, measurements, None, report, message, settings)
    with atomic_build_dir(out_dir) as tmp:
        shutil.copytree(work / "candidates" / best.key, tmp, dirs_exist_ok=True)
    message = (f"{best.name}: {best.speedup:.2f}× over the original ({best.rounds} alternating rounds), {metric} "
               f"{best.fidelity:.4f} ≥ {threshold} on the evaluation data; {len(measured)} candidates measured "
               f"({seconds:.0f} s this run)")
    report = write_report(measurements, best, out_dir, settings, message)
    say(message)
    return TuneResult(best, measurements, out_dir, report, message, settings)
