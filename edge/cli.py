"""The ``effmod-edge`` command line: parse options, call library functions, print."""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path

import click

from edge.checks import interval_text
from edge.errors import ConfigError, EffmodError
from edge.manifest import reference_label
from edge.targets import OPTIONS, TARGETS, parse_option_pairs
from edge.timing import WARMUP_SECS

ALL_PRECISIONS = sorted({p for t in TARGETS.values() for p in t.precision_names})


class ElapsedFormatter(logging.Formatter):
    """``-v``: each line starts with the seconds since the logging module was loaded (as the command began),
    to show where a conversion's time goes."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.relativeCreated / 1000:7.1f}s  {super().format(record)}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ElapsedFormatter("%(message)s") if verbose else logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:
        warnings.simplefilter("ignore")
    for noisy in ("tensorflow", "absl", "h5py", "coremltools", "onnx2tf", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM ends the command like an exception, so staging folders and worker processes are cleaned up."""
    raise SystemExit(128 + signum)


class _Group(click.Group):
    """Turns user errors, ours and click's usage errors alike, into one line on stderr and exit code 2."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "effmod-edge"
            click.echo(f"error: {' '.join(exc.format_message().split())} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EffmodError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


def _interval(metrics: dict) -> str:
    """`` [lo-hi]``: the 95 % interval of the top-1 agreement, from the number of images."""
    ci = metrics.get("top1_agreement_ci95")
    return f" [{interval_text(ci)}]" if ci else ""


def _percent(value: float | None) -> str:
    """A share as a percentage; ``-`` where there is none (top-1 of images without labels)."""
    return "-" if value is None else f"{value:.1%}"


def _exit_on_row_errors(rows: list[dict], what: str) -> None:
    """Exit 1 naming the first artifact that could not be run, after the results were written."""
    bad = [r for r in rows if r.get("error")]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        first = bad[0]["error"]
        if first.startswith(("artifact file ", "sidecar ", "classifier package ")):
            fix = "re-run convert to rebuild the artifacts"
        elif "No module named" in first:
            fix = 'install the runtime with pip install -e ".[tflite]" or ".[coreml]"'
        else:
            fix = "re-run with -v for the traceback"
        click.echo(f"error: {what} failed for {reference_label(bad[0])}: {first}{more}; {fix}", err=True)
        sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (tracebacks of failed targets).")
def main(verbose: bool) -> None:
    """EfficientMod to ONNX, TFLite and Core ML, verified against PyTorch."""
    _setup_logging(verbose)


@main.command()
@click.option("--target", "targets", multiple=True, required=True, type=click.Choice(list(TARGETS)),
              help="Export target; repeat for several.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(ALL_PRECISIONS),
              help="Precision(s) to build; default: all of each target's.")
@click.option("--model", default=None, help="Variant, e.g. efficientmod_xxs; detected from --weights if omitted.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Checkpoint (.pth); omitted = random weights, for trying the pipeline.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="Class names, one per line in class-index order, for a fine-tune's own head "
                   "[default: ImageNet-1k's for 1000 classes].")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--calib-dir", default=None, type=click.Path(), help="Image folder (else $EFFMOD_CALIB_DIR, else the download cache).")
@click.option("--calib-size", default=200, show_default=True, help="Calibration images (class-balanced).")
@click.option("--eval-size", default=100, show_default=True, help="Evaluation images, disjoint from calibration.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data split (and of random weights).")
@click.option("--check-threshold", is_flag=True, help="Exit non-zero when an artifact misses its accuracy bar.")
@click.option("--report", "with_report", is_flag=True, help="Then evaluate, bench and render the report.")
@click.option("--deployment-target", default=None, type=click.Choice(list(OPTIONS["deployment_target"].choices)),
              help="Core ML minimum deployment target [default: iOS17].")
@click.option("--coreml-form", default=None, type=click.Choice(list(OPTIONS["coreml_form"].choices)),
              help="Core ML graph: Neural-Engine-friendly layout or the plain deploy form [default: ane].")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="Converter option, repeatable; `effmod-edge options` lists them.")
def convert(targets, precisions, model, weights, labels, output, calib_dir, calib_size, eval_size, seed, check_threshold,
            with_report, deployment_target, coreml_form, option_pairs) -> None:
    """Convert a checkpoint, check every artifact against PyTorch, write manifest.json."""
    from edge.pipeline import ConvertRequest, convert as run_convert

    options = parse_option_pairs(option_pairs)
    for key, value in (("deployment_target", deployment_target), ("coreml_form", coreml_form)):
        if value is not None:
            options[key] = value
    result = run_convert(
        ConvertRequest(
            targets=list(targets), precisions=list(precisions) or None, model=model, weights=weights,
            output=output, calib_dir=calib_dir, calib_size=calib_size, eval_size=eval_size, seed=seed,
            options=options, labels=labels,
        )
    )
    m = result.manifest
    click.echo(f"{m.model} ({m.weights}) -> {result.manifest_path}")
    for a in m.artifacts:
        c = a.checks
        click.echo(
            f"  {a.target:7s} {a.precision:10s} {a.path:40s} {a.bytes / 1e6:7.2f} MB  "
            f"max|Δ| {c['max_abs_diff']:.2e}  SQNR {c['sqnr_db']:6.1f} dB  agree {c['top1_agreement']:.1%}"
            f"{_interval(c)}  "
            f"{'PASS' if c['passed'] else 'MISS: ' + '; '.join(c['misses'])}"
        )
    for f in m.failures:
        click.echo(f"  {f.target:7s} {f.precision:10s} {f.path or '':40s} FAILED: {f.error}", err=True)
    if with_report:
        from edge.bench import bench_manifest
        from edge.evaluate import evaluate_manifest
        from edge.report import render

        evaluation = evaluate_manifest(result.manifest_path)
        bench = bench_manifest(result.manifest_path)
        md, page, _ = render(result.manifest_path.parent)
        click.echo(f"report: {md} {page}")
        _exit_on_row_errors(evaluation["rows"], "evaluate")
        _exit_on_row_errors(bench["results"], "bench")
    if result.failed:
        sys.exit(1)
    if check_threshold and result.below_threshold:
        names = ", ".join(f"{a.target}/{a.precision}" for a in result.below_threshold)
        click.echo(f"error: accuracy bar missed by {names}", err=True)
        sys.exit(1)


@main.command()
def options() -> None:
    """Table of converter options (for --option KEY=VALUE)."""
    for o in OPTIONS.values():
        click.echo(f"{o.name:24s} {o.target:7s} {o.hint():40s} default {o.default!r}\n{'':33s}{o.description}")


@main.command()
@click.option("--all", "show_all", is_flag=True, help="Include the tiny test variant.")
def models(show_all: bool) -> None:
    """Table of variants: parameters, GMACs at 224x224 (counted), paper top-1."""
    from edge.efficientmod import VARIANTS, count_macs, count_params, create_model

    click.echo(f"{'model':24s} {'params':>12s} {'GMACs':>7s} {'paper top-1':>12s}")
    for name, cfg in VARIANTS.items():
        if cfg.test_only and not show_all:
            continue
        m = create_model(name)
        top1 = f"{cfg.paper_top1:.1f}" if cfg.paper_top1 else "-"
        click.echo(f"{name:24s} {count_params(m):>12,d} {count_macs(m) / 1e9:>7.3f} {top1:>12s}")


@main.command("download-samples")
@click.option("--url", default=None, help="Base URL of the sample set (default: its public GitHub copy).")
def download_samples(url: str | None) -> None:
    """Download the public 1000-image ImageNet sample set into the cache (resumable)."""
    from calibration.download import download_samples as fetch

    click.echo(str(fetch(url)))


@main.command()
@click.argument("manifest", type=click.Path())
@click.option("--runs", default=30, show_default=True, help="Timed runs per round.")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs before each round (at least).")
@click.option("--warmup-secs", default=WARMUP_SECS, show_default=True, type=float,
              help="Untimed seconds before each round (at least), as LiteRT's benchmark_model warms up.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds over all artifacts.")
@click.option("--threads", default=None, help="Comma-separated thread counts (default: 1 and all cores).")
@click.option("--onnxruntime/--no-onnxruntime", "with_onnxruntime", default=True, show_default=True,
              help="Time onnxruntime fp32 on a deploy-form export when the manifest has TFLite files but no ONNX file.")
def bench(manifest: str, runs: int, warmup: int, warmup_secs: float, rounds: int, threads: str | None,
          with_onnxruntime: bool) -> None:
    """Host latency of every runnable artifact, of PyTorch eager and of onnxruntime fp32; writes bench.json."""
    from edge.bench import bench_manifest, format_table, require_manifest
    from edge.report import machine_line

    try:
        counts = tuple(int(t) for t in threads.split(",")) if threads else None
    except ValueError:
        raise EffmodError(f"--threads {threads!r} is not a comma-separated list of thread counts; pass e.g. 1,2") from None
    result = bench_manifest(require_manifest(manifest), runs=runs, warmup=warmup, rounds=rounds, threads=counts,
                            warmup_secs=warmup_secs, include_onnxruntime=with_onnxruntime)
    m = result["machine"]
    click.echo(f"{result['model']} ({result['weights']}) on {machine_line(m)}, {result['date']}")
    click.echo(format_table(result))
    _exit_on_row_errors(result["results"], "bench")


@main.command()
@click.argument("manifest", type=click.Path())
@click.option("--data", default=None, type=click.Path(),
              help="Image folder to pick from, calibration images left out (default: the manifest's eval split).")
@click.option("--heldout", is_flag=True,
              help="Every image of the conversion's folder that calibration did not use (with --limit, a balanced N).")
@click.option("--limit", default=None, type=int, help="At most N images.")
@click.option("--target", "targets", multiple=True, type=click.Choice(list(TARGETS)),
              help="Only this target's artifacts (repeatable; default: all).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(ALL_PRECISIONS),
              help="Only artifacts of this precision (repeatable; default: all).")
def evaluate(manifest: str, data: str | None, heldout: bool, limit: int | None, targets: tuple[str, ...],
             precisions: tuple[str, ...]) -> None:
    """Run the artifacts and PyTorch fp32 on the same images; writes evaluation.json."""
    from edge.bench import require_manifest
    from edge.evaluate import evaluate_manifest

    result = evaluate_manifest(require_manifest(manifest), data, limit, heldout=heldout, targets=targets,
                               precisions=precisions)
    img = result["images"]
    left_out = f", {img['excluded_calibration']} calibration images left out" if img.get("excluded_calibration") else ""
    click.echo(f"{img['count']} images ({img['split']}, {img['root']}{left_out})")
    for r in result["rows"]:
        if "error" in r:
            click.echo(f"  {r['target']:7s} {r['precision']:10s} {r['path']:40s} ERROR: {r['error']}")
        else:
            click.echo(f"  {r['target']:7s} {r['precision']:10s} {r['path']:40s} top-1 {_percent(r.get('top1'))} "
                       f"agree {r['top1_agreement']:.1%}{_interval(r)} SQNR {r['sqnr_db']:.1f} dB")
    _exit_on_row_errors(result["rows"], "evaluate")


@main.command()
@click.argument("out_dir", type=click.Path())
@click.option("--fail-under", "fail_under", multiple=True,
              help="Gate, e.g. agreement=0.99 or sqnr=25; exits 1 naming the rows below it.")
def report(out_dir: str, fail_under: tuple[str, ...]) -> None:
    """Render report.md and a self-contained report.html from OUT_DIR's json files."""
    from edge.report import FailUnder, render, report_folder

    md, page, misses = render(report_folder(out_dir), [FailUnder.parse(f) for f in fail_under])
    click.echo(f"{md}\n{page}")
    if misses:
        for m in misses:
            click.echo(f"below bar: {m}", err=True)
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(exists=True))
def inspect(model: str) -> None:
    """Op histogram of a .tflite, the ops its int8 graph keeps in float, XNNPACK coverage."""
    from converters.to_tflite import inspect_tflite

    if Path(model).is_dir():
        what = "a Core ML package (its checks are in the manifest's details.ane_check)" \
            if model.rstrip("/").endswith(".mlpackage") else "a folder"
        raise ConfigError(f"{model} is {what}; inspect reads one .tflite file: pass one that effmod-edge convert wrote")

    try:
        info = inspect_tflite(Path(model))
    except EffmodError as exc:
        raise EffmodError(f"{model} is not a TFLite model LiteRT can read ({exc}); pass a .tflite file that "
                          f"effmod-edge convert wrote") from None
    click.echo(f"{model}: {info['total_ops']} ops")
    click.echo(f"  input  {info['input']['name']} {info['input']['dtype']} {info['input']['shape']} q={info['input']['quantization']}")
    click.echo(f"  output {info['output']['name']} {info['output']['dtype']} {info['output']['shape']} q={info['output']['quantization']}")
    click.echo("  ops:           " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    click.echo("  float ops:     " + (", ".join(f"{k} {v}" for k, v in info["float_ops"].items()) or "none"))
    click.echo("  not delegated: " + (", ".join(f"{k} {v}" for k, v in info["not_delegated"].items()) or "none (all ops run in XNNPACK)"))


if __name__ == "__main__":
    sys.exit(main())
