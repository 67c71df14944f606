"""The `trimrt` command line: compile / run / verify / bench / generate / inspect.

Every error a user can cause prints one line, `error: …`, and exits with code 2;
`verify` exits with 1 when a threshold is missed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from .errors import TrimrtError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrimrtError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except click.UsageError as exc:  # a subcommand's bad option or argument: one line too
            message = exc.format_message().rstrip(".")
            command = (exc.ctx or ctx).command_path
            click.echo(f"error: {message[:1].lower()}{message[1:]}; see '{command} --help'", err=True)
            ctx.exit(2)


def _npz_path(ctx, param, path: Path | None) -> Path | None:
    """--output as numpy writes it (a missing .npz suffix is added), checked before the run."""
    if path is None:
        return None
    if path.name in ("", ".", "..") or path.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file name such as {path / 'out.npz'}")
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    if not path.parent.is_dir():
        raise click.BadParameter(f"folder {path.parent} does not exist; create it or write elsewhere")
    if (path.parent / "manifest.json").is_file():
        raise click.BadParameter(f"{path} would be written into the build {path.parent}; write elsewhere")
    return path
def _count(name: str) -> click.IntRange:
    """The click range of a verify / bench count (the same bounds the API checks)."""
    from .verification import COUNT_RANGES

    return click.IntRange(*COUNT_RANGES[name])


# options several commands share
_build_arg = click.argument("build", type=click.Path(path_type=Path))
_inputs = click.option("--input", "inputs", multiple=True, help="NAME=FILE.npy or FILE.npz instead of random inputs.")
_tokens = click.option("--tokens", type=_count("tokens"),
                       help="Length of dynamic token axes of random inputs (default: the build's example).")
_json = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")


@click.group(cls=_Group)
@click.version_option(package_name="trimrt")
@click.option("-v", "--verbose", is_flag=True, help="Log what the compiler does.")
def main(verbose: bool) -> None:
    """trimrt: compile transformers with token pruning into builds that run on ONNX Runtime and TensorRT."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Build directory to write.")
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe TOML file (none: no rewrites).")
@click.option("--target", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime",
              show_default=True)
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="PyTorch exporter for factory models (auto: dynamo, TorchScript if dynamo fails).")
def compile(model: str, out_dir: Path, recipe: Path | None, target: str, exporter: str) -> None:  # noqa: A001
    """Compile MODEL (an .onnx file, or file.py:factory / package.module:factory) into a build."""
    from rich.console import Console

    from .compiler.driver import compile_model
    from .inspect import flops_text, fusion_line, quantization_line, quantization_summary, token_stages
    from .runtime.manifest import Manifest

    console = Console(highlight=False)
    with console.status("compiling") as status:
        manifest = Manifest(compile_model(model, recipe, out_dir, target=target, exporter=exporter,
                                          progress=lambda msg: (status.update(msg), console.log(msg))))
    # plain lines (click.echo): never wrapped (paths are long), no markup (names from the model hold brackets)
    click.echo(f"{click.style('build written', fg='green', bold=True)}: {out_dir}  (FLOPs {flops_text(manifest['flops'])})")
    for label, steps in token_stages(manifest):
        click.echo(f"{label}: {steps}")
    summaries = {"quantization": lambda report: quantization_line(quantization_summary(report)), "ort_fusion": fusion_line}
    for name in manifest.pass_names:
        if name in summaries:
            click.echo(summaries[name](manifest.pass_report(name)))


@main.command()
@_build_arg
@click.option("--input", "inputs", multiple=True, required=True, help="NAME=FILE.npy, or FILE.npz (repeatable).")
@click.option("--output", type=click.Path(path_type=Path), callback=_npz_path,
              help="Write outputs to this .npz file (.npz is added when missing).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True)
def run(build: Path, inputs: tuple[str, ...], output: Path | None, backend: str) -> None:
    """Run BUILD on inputs from .npy/.npz files."""
    from .runtime import load
    from .runtime.feeds import load_feed_files

    outs = load(build, backend=backend).run(load_feed_files(list(inputs)))
    if output is not None:
        try:
            np.savez(output, **outs)
        except OSError as exc:
            raise click.BadParameter(f"cannot write {output}: {exc.strerror}", param_hint="'--output'") from None
        click.echo(f"wrote {len(outs)} output(s) to {output}")
    for name, arr in outs.items():
        click.echo(f"{name}: {arr.dtype}{list(arr.shape)} {np.array2string(arr.reshape(-1)[:6], precision=4)}")


@main.command()
@_build_arg
@click.option("--reference", help="Original .onnx file or a PyTorch factory (default: the build's reference.onnx).")
@click.option("--samples", default=8, show_default=True, type=_count("samples"),
              help="Random input samples (when no --input).")
@_inputs
@_tokens
@click.option("--min-cosine", type=click.FloatRange(-1.0, 1.0), help="Fail (exit 1) when an output's mean cosine is below this.")
@click.option("--min-top1", type=click.FloatRange(0.0, 1.0), help="Fail (exit 1) when the top-1 agreement of logits is below this.")
@click.option("--per-pass", is_flag=True, help="Also apply the recipe's passes one at a time: the drift each adds.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino"]), default="auto", show_default=True,
              help="Engine the build runs on (auto: the one its target names; the reference runs on ONNX Runtime).")
@_json
def verify(build: Path, reference: str | None, samples: int, inputs, tokens, min_cosine, min_top1, per_pass: bool,
           backend: str, as_json: bool) -> None:
    """Compare BUILD with its reference on the same inputs."""
    from .verification import verify_build

    report = verify_build(build, reference, samples=samples, inputs=list(inputs) or None, tokens=tokens,
                          min_cosine=min_cosine, min_top1=min_top1, per_pass=per_pass, backend=backend)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _echo_verify(build, report)
    if not report.passed:
        sys.exit(1)


def _echo_verify(build: Path, report) -> None:
    from rich.console import Console
    from rich.table import Table

    from .inspect import format_label

    q = report.quantization
    quantized = "" if q is None else f", quantized {format_label(q)} {q['method']}"
    click.echo(f"verify {build} ({report.samples} samples{quantized})")
    table = Table()
    for col in ("output", "shape", "max abs", "max rel", "cosine mean", "cosine min", "top-1"):
        table.add_column(col, justify="right")
    for m in report.outputs:
        table.add_row(m.name, str(m.shape), f"{m.max_abs:.3g}", f"{m.max_rel:.3g}", f"{m.cosine_mean:.5f}",
                      f"{m.cosine_min:.5f}", "-" if m.top1 is None else f"{m.top1:.3f}")
    Console(highlight=False).print(table)
    if q is not None:
        at_compile = (f"; at compile time, on its calibration set: cosine {q['calibration_cosine']:.6f}"
                      if "calibration_cosine" in q else "")
        click.echo(f"quantized build ({q['quantized']}/{q['linear_layers']} linear layers {format_label(q)}, "
                   f"{q['method']}): the cosines above are its fidelity against the float model{at_compile}")
    for line in report.not_compared:
        click.echo(f"not compared (token-level output, tokens pruned): {line}")
    for step in report.per_pass:
        cos = ", ".join(f"{name} {c:.5f}" for name, c in step["cosine_mean"].items())
        click.echo(f"after {' + '.join(step['passes'])}: mean cosine {cos}")
    for k in report.keep_ratios:
        click.echo(f"adaptive pruning at block {k['block']}: kept visible {k['mean']:.1%} of its span "
                   f"(min {k['min']:.1%}, max {k['max']:.1%})")
    failed = f"{click.style('FAIL', fg='red')}: {'; '.join(report.failures)}"
    click.echo(click.style("PASS", fg="green") if report.passed else failed)


@main.command()
@_build_arg
@click.option("--baseline", type=click.Path(path_type=Path), help="Unmodified .onnx (default: the build's reference.onnx).")
@click.option("--batch", default=1, show_default=True, type=_count("batch"))
@_tokens
@_inputs
@click.option("--threads", default=2, show_default=True, type=_count("threads"),
              help="ONNX Runtime intra-op threads, same for both.")
@click.option("--rounds", default=30, show_default=True, type=_count("rounds"),
              help="Timed rounds (each runs both models once).")
@click.option("--warmup", default=5, show_default=True, type=_count("warmup"))
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino"]),
              help="Engine both models run on (default: the build's target where it is one of these, else onnxruntime).")
@_json
def bench(build: Path, baseline: Path | None, batch: int, tokens: int | None, inputs, threads: int, rounds: int,
          warmup: int, backend: str, as_json: bool) -> None:
    """Time BUILD against its unmodified baseline (alternating runs, medians)."""
    from .bench import bench_build

    r = bench_build(build, baseline, batch=batch, threads=threads, rounds=rounds, warmup=warmup, tokens=tokens,
                    inputs=list(inputs) or None, backend=backend)
    if as_json:
        return click.echo(json.dumps(r.to_dict(), indent=2))
    ideal = f"{r.flops_ratio:.2f}×" if r.flops_ratio else "n/a"
    eff = f"{100 * r.efficiency:.0f}%" if r.efficiency else "n/a"
    click.echo(f"{r.engine}, batch {r.batch}, {r.threads} threads, {r.rounds} alternating rounds (medians):\n"
               f"  baseline {r.baseline_ms:8.2f} ms\n  build    {r.build_ms:8.2f} ms\n"
               f"  speedup  {r.speedup:.2f}×   FLOPs ratio (ideal) {ideal}   measured/ideal {eff}")
    if r.cache_in_place:
        click.echo("  (the build: a decode step writing its KV cache in place, as generation runs it; the "
                   "baseline fed its past)")


@main.command()
@_build_arg
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text (needs --tokenizer), or token ids as '1,2,3'; repeat for a batch.")
@click.option("--inputs-embeds", "embeds_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Instead of --prompt, for an inputs_embeds build: a .npy of one prompt's embeddings "
                   "[tokens, hidden] (e.g. image features spliced into text), or a batch [b, tokens, hidden].")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="tokenizer.json, or a folder holding it (default: the build's own, when compiled from a checkpoint).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--temperature", type=click.FloatRange(0, min_open=True), help="Sample at this temperature (default: greedy).")
@click.option("--top-k", type=click.IntRange(1), help="Sample among the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Sample among the most likely tokens of this mass.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", type=int, help="Random seed of sampling.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop at this text (needs --tokenizer); repeatable.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: its own choice).")
@click.option("--speculation", type=click.Choice(["prompt_lookup", "token_recycling"]),
              help="Draft tokens and verify them in one step each (greedy, one prompt): the same tokens, fewer "
                   "steps; plain decoding then runs once more to report the speedup.")
@click.option("--recycling-table", type=click.Path(dir_okay=False, path_type=Path),
              help="With --speculation token_recycling: a .npy table to start from (when it exists) and to save "
                   "after generating (hot start across runs).")
def generate(build: Path, prompts: tuple[str, ...], embeds_file: Path | None, tokenizer: Path | None,
             threads: int | None, speculation: str | None, recycling_table: Path | None, **options) -> None:
    """Generate text with a decoder build: streams one prompt's continuation (a batch prints each
    result), then the time to first token, decode tokens/s and the KV-cache size."""
    from .runtime import load

    if bool(prompts) == (embeds_file is not None):
        raise click.UsageError("give --prompt (repeatable) or --inputs-embeds, one of the two")
    if recycling_table is not None and speculation != "token_recycling":
        raise click.UsageError("--recycling-table goes with --speculation token_recycling")
    options = {k: v for k, v in options.items() if v is not None}  # --stop (multiple) is always a tuple
    with load(build, threads=threads) as session:
        # a build compiled from a checkpoint folder has its own tokenizer
        gen = session.generator(tokenizer, speculation=speculation)
        if recycling_table is not None and recycling_table.is_file():
            gen.speculation.load(recycling_table)
        if embeds_file is not None:
            embeds = _embeds(embeds_file)
            parsed, options = [None] * (1 if embeds.ndim == 2 else len(embeds)), {**options, "inputs_embeds": embeds}
        else:
            parsed = [_prompt(p, text_ok=gen.tokenizer is not None) for p in prompts]
        if len(parsed) == 1:
            for piece in gen.stream(parsed[0], **options):
                click.echo(piece if isinstance(piece, str) else f"{piece} ", nl=False)
            click.echo()
            stats = gen.last_stats
        else:
            results = gen.generate(None if embeds_file else parsed, **options)
            for i, result in enumerate(results):
                shown = result.text if result.text is not None else " ".join(map(str, result.tokens))
                click.echo(f"[{i}] {shown}")
            stats = results[0].stats
        if speculation is not None:
            plain = session.generator(tokenizer).generate(parsed[0], **options)
            if recycling_table is not None:
                gen.speculation.save(recycling_table)
    click.echo(f"prompt {stats.prompt_tokens} tokens × {stats.batch}, time to first token "
               f"{stats.time_to_first_token_s * 1e3:.1f} ms, decode {stats.decode_tokens_per_s:.1f} tokens/s, "
               f"KV cache {stats.kv_cache_bytes / 2**20:.2f} MiB" + _kv_saved(stats), err=True)
    if speculation is not None:
        rate = plain.stats.decode_tokens_per_s
        speedup = f"{stats.decode_tokens_per_s / rate:.2f}×" if rate > 0 and stats.decode_s > 0 else "n/a"
        click.echo(f"{speculation}: {stats.tokens_per_step:.2f} tokens per decode step "
                   f"({stats.accepted_draft_tokens} of {stats.draft_tokens} draft tokens accepted), decode speedup "
                   f"over plain decoding {speedup} ({rate:.1f} tokens/s)"
                   + (f"; table {gen.speculation.nbytes / 2**10:.0f} KiB" if hasattr(gen.speculation, "nbytes") else ""),
                   err=True)


def _kv_saved(stats) -> str:
    """What prompt pruning saved of the KV cache ("" when nothing)."""
    saved = stats.kv_cache_bytes_unpruned - stats.kv_cache_bytes
    if saved <= 0:
        return ""
    return f" ({stats.kv_cache_bytes_unpruned / 2**20:.2f} MiB unpruned: {saved / stats.kv_cache_bytes_unpruned:.0%} saved)"


def _embeds(path: Path) -> np.ndarray:
    """--inputs-embeds: a float .npy of rank 2 or 3."""
    try:
        embeds = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path} is not a .npy array: {exc}", param_hint="--inputs-embeds") from None
    if embeds.ndim not in (2, 3) or embeds.dtype.kind != "f":
        raise click.BadParameter(f"{path} holds {embeds.dtype}{list(embeds.shape)}; give float embeddings "
                                 "[tokens, hidden] or [batch, tokens, hidden]", param_hint="--inputs-embeds")
    return embeds


def _prompt(text: str, *, text_ok: bool):
    """--prompt: text when there is a tokenizer, else comma-separated token ids."""
    if text_ok:
        return text
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of token ids such as '1,2,3'; give --tokenizer to pass "
                                 "text", param_hint="--prompt") from None


def _duration(ctx, param, text: str) -> float:
    """--budget: seconds, or a number with s / m / h."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration such as 600, 20m or 1h") from None
    if value <= 0:
        raise click.BadParameter(f"the budget must be positive, got {text!r}")
    return value


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@main.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Calibration data (a folder of .npy/.npz feeds, a .txt file with --tokenizer, or images).")
@click.option("--eval", "eval_data", required=True, type=click.Path(exists=True, path_type=Path),
              help="Evaluation data, of the same kinds, held out from --data: the budget is checked on it.")
@click.option("--min-cosine", default=0.99, show_default=True, type=click.FloatRange(-1.0, 1.0),
              help="The fidelity budget with --metric cosine.")
@click.option("--metric", type=click.Choice(["cosine", "top1", "retrieval", "perplexity"]),
              help="cosine: mean cosine of the outputs (a decoder's logits at every position); top1: agreement of the "
                   "logits' argmax; retrieval: recall@5 of each evaluation sample's nearest neighbours among the others "
                   "(embeddings); perplexity: a decoder's on the evaluation text. Default: cosine, perplexity for "
                   "decoders.")
@click.option("--min-top1", type=click.FloatRange(0.0, 1.0), help="The budget with --metric top1 (default 0.97).")
@click.option("--min-retrieval", type=click.FloatRange(0.0, 1.0),
              help="The budget with --metric retrieval (default 0.95).")
@click.option("--max-perplexity-increase", type=click.FloatRange(0.0),
              help="The budget with --metric perplexity: the build's perplexity at most this much higher, relative "
                   "(default 0.02: +2%).")
@click.option("--budget", "budget_s", default="20m", show_default=True, callback=_duration,
              help="Time to spend (600, 20m, 1h); screening stops at 3/4 of it, the rest times what met the budget.")
@click.option("--batch", default=1, show_default=True, type=_count("batch"), help="Batch size the speed is measured at.")
@click.option("--threads", default=2, show_default=True, type=_count("threads"))
@click.option("--samples", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Evaluation samples (and at most 64 calibration samples).")
@click.option("--tokenizer", help="Text data: a Hugging Face tokenizer name or folder.")
@click.option("--max-length", type=click.IntRange(1), help="Text data: tokens per sample.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Where the best build goes (its recipe and report beside it in the build; work in OUT.tune/).")
def tune(model: str, data: Path, eval_data: Path, min_cosine: float, metric: str | None, min_top1: float | None,
         min_retrieval: float | None, max_perplexity_increase: float | None, budget_s: float, batch: int, threads: int,
         samples: int, tokenizer: str | None, max_length: int | None, out_dir: Path) -> None:
    """Search the recipes for MODEL: the fastest build that meets the fidelity budget on --eval."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .tuning import tune as run
    from .tuning.search import TuneProgress

    budgets = {"top1": ("--min-top1", min_top1), "retrieval": ("--min-retrieval", min_retrieval),
               "perplexity": ("--max-perplexity-increase", max_perplexity_increase)}
    for its_metric, (option, value) in budgets.items():
        if value is not None and metric != its_metric and not (its_metric == "perplexity" and metric is None):
            raise click.UsageError(f"{option} is the budget of --metric {its_metric}; add --metric {its_metric}")
    min_value = budgets[metric][1] if metric in budgets else None
    if max_perplexity_increase is not None:
        min_value = 1 / (1 + max_perplexity_increase)

    console = Console(highlight=False, stderr=True, log_path=False)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[left]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("tuning", total=None, left="")

        def show(event: TuneProgress) -> None:
            bar.console.log(event.message)
            known = event.left_s is not None
            bar.update(task, description=event.phase, completed=event.elapsed_s,
                       total=event.elapsed_s + event.left_s if known else None,
                       left=f"about {_minutes(event.left_s)} left" if known else "")

        try:
            result = run(model, data=data, eval_data=eval_data, out_dir=out_dir, min_cosine=min_cosine, metric=metric,
                         min_value=min_value, budget_s=budget_s, batch=batch, threads=threads, samples=samples,
                         tokenizer=tokenizer, max_length=max_length, progress=show)
        except KeyboardInterrupt:
            work = out_dir.with_name(out_dir.name + ".tune")
            click.echo(f"interrupted: what was measured is kept in {work}; run the same command again to resume",
                       err=True)
            sys.exit(130)
    click.echo(result.message)
    click.echo(f"report: {result.report}")
    if result.best is None:
        sys.exit(1)


@main.command("export-triton")
@_build_arg
@click.option("-o", "--output", "repository", required=True, type=click.Path(path_type=Path),
              help="Triton model repository to write the models into (created if missing).")
@click.option("--name", help="Model name (default: the build folder's name); the python-backend model is NAME_python.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(0, 1 << 16),
              help="max_batch_size of the models (0: no batching).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 256), help="Instances of each model.")
@click.option("--queue-delay-us", default=2000, show_default=True, type=click.IntRange(0),
              help="How long dynamic batching waits for more requests (microseconds).")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads per instance.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="An encoder build taking input_ids: also write NAME_text, an ensemble taking text "
                   "(tokenizer.json, or a folder holding it).")
@click.option("--ensemble-model", type=click.Choice(["stock", "python"]), default="stock", show_default=True,
              help="The model NAME_text feeds: the stock backend's NAME, or NAME_python.")
def export_triton(build: Path, repository: Path, name: str | None, max_batch: int, instances: int, queue_delay_us: int,
                  threads: int | None, tokenizer: Path | None, ensemble_model: str) -> None:
    """Write BUILD as models of a Triton Inference Server model repository."""
    from .serving.triton import export_triton as export

    models = export(build, repository, name=name, max_batch=max_batch, instances=instances,
                    queue_delay_us=queue_delay_us, threads=threads, tokenizer=tokenizer, ensemble_model=ensemble_model)
    for model in models:
        click.echo(f"{click.style('wrote', fg='green', bold=True)} {repository / model.name} ({model.kind})")
        for note in model.notes:
            click.echo(f"  note: {note}")
    click.echo(f"serve it with: tritonserver --model-repository {repository}")


@main.command()
@_build_arg
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Replicas of the deployment.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="Requests batched into one run at most (1: no batching).")
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0),
              help="How long a batch waits for more requests.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime threads per replica (default: CPUs / replicas).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--openai", is_flag=True, help="A decoder build: serve OpenAI's /v1/completions (streaming) instead.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="With --openai: tokenizer.json or a folder holding it (default: the build's own).")
def serve(build: Path, replicas: int, max_batch: int, batch_wait_ms: float, threads: int | None, host: str, port: int,
          openai: bool, tokenizer: Path | None) -> None:
    """Serve BUILD over HTTP with Ray Serve (replicas, dynamic batching) until Ctrl-C."""
    import signal
    import time

    from .serving.checks import check_servable

    check_servable(build, replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms, openai=openai)
    try:
        from .serving import ray_serve
    except ImportError as exc:
        raise click.UsageError(f"serving needs Ray Serve ({exc.name} is missing): pip install 'trimrt[serve]'") from None
    try:
        ray_serve.connect()
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C (after Ray set its own)
        url = ray_serve.start(build, port=port, host=host, replicas=replicas, max_batch=max_batch,
                              batch_wait_ms=batch_wait_ms, threads=threads, openai=openai, tokenizer=tokenizer)
        routes = "POST /v1/completions (stream: true for events), GET /v1/models" if openai else \
            "POST /v1/infer (JSON or npz), GET /v1/metadata"
        click.echo(f"{click.style('serving', fg='green', bold=True)} {build} at {url}: {routes}, GET /health; "
                   "Ctrl-C stops", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.stop()
    click.echo("stopped", err=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@main.command()
@click.argument("target")
@_json
def inspect(target: str, as_json: bool) -> None:
    """Show the transformer structure of a MODEL, or the passes and ops of a BUILD."""
    from .inspect import flops_text, fusion_line, inspect_target, openvino_line, pass_lines
    from .runtime.manifest import Manifest

    info = inspect_target(target)
    if as_json:
        return click.echo(json.dumps(info, indent=2, default=str))
    s = info.get("structure") or {}
    click.echo(f"{info['kind']}: {info.get('source') or info.get('path')}")
    if s or info["kind"] == "model":
        click.echo(f"  blocks: {s.get('blocks')}  tokens: {s.get('tokens')} (axis {s.get('token_axis')})  "
                   f"width: {s.get('width')}  heads: {s.get('heads')}  {s.get('norm')}\n"
                   f"  pooling: {s.get('pooling')}  protected tokens: {s.get('protected_tokens')}")
    else:
        click.echo("  structure: not analysed (the recipe has no token-level pass)")
    for a in s.get("attention", []):
        click.echo(f"  block {a['block']:>2}: attention {a['core']} (scale {a['scale']}"
                   f"{', masked' if a['masked'] else ''}), stream {a['stream']}")
    if info["kind"] == "build":
        click.echo(f"  target: {info['target']}\n  passes: " + " → ".join(p["pass"] for p in info["passes"]))
        for line in pass_lines(Manifest(passes=info["passes"])):
            click.echo(f"    {line}")
        click.echo(f"  custom ops: {info['custom_ops'] or 'none'}\n  FLOPs (batch 1): {flops_text(info['flops'], digits=3)}")
        if info["quantization"]:
            _echo_quantization(info["quantization"])
        if info["onnxruntime_fusion"]:
            click.echo(f"  {fusion_line(info['onnxruntime_fusion'])}")
        if info["openvino"]:
            click.echo(f"  {openvino_line(info['openvino'])}")
    if info.get("decoder"):
        d = info["decoder"]
        click.echo(f"  decoder: {d['layers']} layers, KV cache {d['kv_heads']} heads × {d['head_dim']} "
                   f"({d['kv_dtype']}): {d['kv_bytes_per_token'] / 1024:.1f} KiB per token of context; "
                   f"positions: {d['max_positions'] or 'unbounded'}; end of sequence: {d['eos_token_ids'] or 'none'}")
        if d.get("prompt_pruning"):
            p = d["prompt_pruning"]
            groups = "; ".join(_layer_group(*g["layers"]) + f" {g['span_tokens_cached']}" for g in p["groups"])
            groups = groups or "every layer caches the whole span"
            click.echo(f"  prompt pruning: span [{p['span'][0]}, {p['span'][1]}) of {p['span'][1] - p['span'][0]} "
                       f"tokens; {groups}: {p['kv_bytes_saved_per_prompt'] / 1024:.1f} KiB less cache per prompt")
        if d.get("prompt_routing"):
            r = d["prompt_routing"]
            layers = "; ".join(_layer_group(x["layer"], x["layer"]) + f" {x['span_tokens_cached']}" for x in r["layers"])
            click.echo(f"  prompt routing (MoD): {layers} span tokens: "
                       f"{r['kv_bytes_saved_per_prompt'] / 1024:.1f} KiB less cache per prompt")


def _layer_group(first: int, last: int) -> str:
    return f"layer {first} caches" if first == last else f"layers {first}–{last} cache"


def _echo_quantization(q: dict) -> None:
    """The quantization section of `inspect`: summary lines, then one row per linear layer."""
    from .inspect import fidelity_text, format_label, human_bytes

    group = f", group size {q['group_size']}" if "group_size" in q else ""
    ratio = f" ({q['weight_ratio']:.2f}× smaller)" if q["weight_ratio"] else ""
    cal = q.get("calibration")
    source = cal and ("random data (random = true, a smoke test)" if cal["source"] == "random" else cal["source"])
    lines = [f"  quantization: {format_label(q)}, method {q['method']}{group}",
             f"    encoding: {q['encoding']}", f"    {q['quantized']} of {q['linear_layers']} linear layers quantized",
             f"    weights: {human_bytes(q['weight_bytes_before'])} → {human_bytes(q['weight_bytes_after'])}{ratio}",
             *([f"    calibration: {cal['samples']} samples from {source}"] if cal else []),
             f"    fidelity on the calibration set: {fidelity_text(q)}"]
    for layer in q["kept_float"]:
        alone = f", cosine with only it quantized {layer['cosine_alone']:.6f}" if "cosine_alone" in layer else ""
        lines.append(f"    kept float: {layer['name']} ({layer['reason']}{alone})")
    rows = [(x["name"], "×".join(map(str, x["shape"])), x["format"], "" if x.get("alpha") is None else f"{x['alpha']:g}",
             f"{x['cosine_alone']:.6f}" if "cosine_alone" in x else "", x.get("reason", "")) for x in q["layers"]]
    header = ("layer", "shape", "format", "alpha", "cosine if only it is quantized", "reason")
    keep = [i for i, h in enumerate(header) if i < 3 or any(r[i] for r in rows)]  # drop empty columns
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines += ["      " + "  ".join(row[i].ljust(widths[i]) for i in keep).rstrip() for row in (header, *rows)]
    click.echo("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
