"""The report of `trimrt tune`: the Pareto front of speed vs fidelity as a picture
(matplotlib), and a markdown page with the chosen build and every candidate."""

from __future__ import annotations

from pathlib import Path

REPORT = "tune_report.md"
PICTURE = "pareto.png"
RECIPE = "recipe.toml"


def budget_text(metric: str, threshold: float) -> str:
    """The fidelity budget as users state it ("cosine ≥ 0.99", "perplexity at most +2.00%")."""
    if metric == "perplexity":  # the value is the original's perplexity over the build's
        return f"perplexity at most {1 / threshold - 1:+.2%}"
    return f"{metric} ≥ {threshold}"


def value_text(metric: str, value: float) -> str:
    """A candidate's fidelity as users read it ("cosine 0.9929", "perplexity +0.31%")."""
    return f"perplexity {1 / value - 1:+.2%}" if metric == "perplexity" else f"{metric} {value:.4f}"


def pareto_front(measurements) -> list:
    """The timed candidates no other is both faster and more faithful than, fastest first."""
    timed = sorted((m for m in measurements if m.speedup and m.fidelity is not None),
                   key=lambda m: (-m.speedup, -m.fidelity))
    front, best_fidelity = [], float("-inf")
    for m in timed:
        if m.fidelity > best_fidelity:
            front.append(m)
            best_fidelity = m.fidelity
    return front


def write_report(measurements, best, folder: Path, settings: dict, message: str) -> Path:
    """Write tune_report.md, pareto.png (when matplotlib is installed) and, with a best
    candidate, its recipe.toml into `folder`; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = _plot(measurements, best, folder / PICTURE, settings)
    if best is not None:
        import tomli_w

        (folder / RECIPE).write_text(f"# chosen by trimrt tune: {best.name}\n" + tomli_w.dumps(best.recipe))
    front = {m.key for m in pareto_front(measurements)}
    metric = settings["metric"]
    tried = [m for m in measurements if m.status != "pending"]
    rows = sorted(tried, key=lambda m: (m.speedup is None, -(m.speedup or 0), -(m.fidelity or 0)))
    lines = [f"# trimrt tune: {Path(settings['source']).name}", "", message, "",
             f"Budget: {budget_text(metric, settings['threshold'])} on {settings['samples']} samples of {settings['eval']}; "
             f"speed: batch {settings['batch']}, {settings['threads']} threads, against the original model "
             "(alternating rounds, median of paired ratios).", ""]
    if picture:
        lines += [f"![speed vs fidelity]({PICTURE})", ""]
    column = "perplexity: original ÷ build" if metric == "perplexity" else metric
    lines += [f"| candidate | {column} | FLOPs ratio | speedup | rounds | status |", "|---|---|---|---|---|---|"]
    for m in rows:
        mark = " **(chosen)**" if best is not None and m.key == best.key else (" (front)" if m.key in front else "")
        lines.append(f"| {m.name}{mark} | {_num(m.fidelity, 4)} | {_num(m.flops_ratio, 2)} | {_num(m.speedup, 2)} | "
                     f"{m.rounds or '-'} | {m.status}{': ' + m.error if m.error else ''} |")
    if len(tried) < len(measurements):
        lines += ["", f"Not tried: {len(measurements) - len(tried)} more candidates of the space (a lighter setting "
                  "of their family, or their reduction or quantization alone, missed the budget, and both only lower "
                  "fidelity; other pruning methods are tried from the strongest keep EViT met; or the time budget "
                  "ran out first)."]
    path = folder / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _plot(measurements, best, path: Path, settings: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [m for m in measurements if m.speedup and m.fidelity is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ok = [m for m in timed if m.meets]
    below = [m for m in timed if not m.meets]
    ax.scatter([m.fidelity for m in ok], [m.speedup for m in ok], s=22, color="tab:blue", label="meets the budget")
    if below:
        ax.scatter([m.fidelity for m in below], [m.speedup for m in below], s=22, color="tab:gray", label="below it")
    front = pareto_front(timed)
    if front:
        ax.plot([m.fidelity for m in front], [m.speedup for m in front], color="tab:blue", lw=1, label="Pareto front")
    if best is not None:
        ax.scatter([best.fidelity], [best.speedup], s=160, marker="*", color="tab:red", zorder=3,
                   label=f"chosen: {best.name}")
    metric = settings["metric"]
    ax.axvline(settings["threshold"], color="tab:red", ls="--", lw=1,
               label=f"budget: {budget_text(metric, settings['threshold'])}")
    ax.set_xlabel("perplexity, the original's ÷ the build's (1: unchanged)" if metric == "perplexity"
                  else f"{metric} vs the original model (evaluation data)")
    ax.set_ylabel(f"speedup over the original (batch {settings['batch']})")
    ax.set_title(f"trimrt tune: {Path(settings['source']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
