"""``effmod-edge report``: one page that answers "which file do I ship?".

Reads ``manifest.json`` and, when present, ``evaluation.json`` and
``bench.json`` from the output folder; writes ``report.md`` and a
self-contained ``report.html`` (inline SVG plots, no network).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ConfigError, EffmodError
from edge.checks import Threshold, evaluate_threshold, interval_text
from edge.manifest import (BENCH_FILE, EVALUATION_FILE, REFERENCE_LABELS, REPORT_FILES, Manifest, TooDeepError,
                           artifact_problem, check_metrics, is_number, parse_json, reference_label, refuse_in_the_way,
                           require_writable, write_files_atomic)
from edge.targets import TARGETS

METRICS = {"agreement": "top1_agreement", "sqnr": "sqnr_db", "top1": "top1", "top5": "top5", "cosine": "cosine"}


@dataclass(frozen=True)
class FailUnder:
    """A report gate: rows whose ``metric`` is below ``value`` fail it."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "FailUnder":
        name, sep, value = text.partition("=")
        if not sep or name not in METRICS:
            raise ConfigError(f"--fail-under {text!r}: use METRIC=VALUE with METRIC one of {', '.join(METRICS)}")
        try:
            bar = float(value)
        except ValueError:
            raise ConfigError(f"--fail-under {text!r}: {value!r} is not a number") from None
        if bar != bar or bar in (float("inf"), float("-inf")):  # a NaN bar would pass every row
            example = "25" if name == "sqnr" else "0.99"  # dB, or a fraction
            raise ConfigError(f"--fail-under {text!r}: the bar must be a finite number, e.g. {name}={example}")
        low = -1.0 if name == "cosine" else 0.0
        if name != "sqnr" and not low <= bar <= 1.0:  # agreement=99 would fail every row
            raise ConfigError(f"--fail-under {text!r}: {name} is a fraction from {low:g} to 1; did you mean "
                              f"{name}={bar / 100:g}?")
        return cls(name, bar)


def report_folder(path: str | os.PathLike) -> Path:
    """The output folder a report reads: OUT itself, or the folder of OUT/manifest.json."""
    p = Path(path)
    if p.is_file():
        if p.name != "manifest.json":
            raise ConfigError(f"{p} is a file, not an output folder; pass OUT or OUT/manifest.json from a convert run")
        return p.parent
    return p


def _search_target(d: dict) -> str:
    """The search's bar on the calibration images, where the manifest records it (older ones do not)."""
    t = d.get("search_target")
    if not isinstance(t, dict) or not all(is_number(t.get(k)) for k in ("min_agreement", "min_sqnr_db")):
        return ""
    return f" (asked: {100 * t['min_agreement']:.0f} % agreement, {t['min_sqnr_db']:g} dB SQNR)"


def _ranking(details: dict) -> str:
    """Which ranking chose an int8-mixed file's kept ops (manifests before session 19: the per-op sensitivity)."""
    r = details.get("kept_float_nodes_ranking")
    if isinstance(r, str):
        return "the search ended before it kept any"
    if isinstance(r, dict) and "error" not in r:
        return "convs ranked by logit noise"
    return "ranked by per-op sensitivity" + (": the logit-noise ranking failed" if isinstance(r, dict) else "")


def mixed_step_line(step: dict) -> str:
    """One int8-mixed search step of a manifest, as a line of text."""
    line = (f"LN stats float={step.get('layernorm_stats_float')}, ADDs float={step.get('adds_float', False)}, "
            f"+{step['kept_nodes']} ops -> calib agreement {step['calib_agreement']:.1%}, "
            f"SQNR {step['calib_sqnr_db']:.1f} dB, {step['bytes'] / 1e6:.2f} MB")
    if "latency_ms" in step:
        line += f", {step['latency_ms']:.2f} ms ({step['latency_vs_first_step']:.2f}x the first step)"
    return line + (f" (search ended: {step['ended_search']})" if "ended_search" in step else "")


def _load_json(path: Path, rows_key: str, command: str) -> dict | None:
    """A results file of ``effmod-edge COMMAND``, or None if absent; its rows must have the fields it writes."""
    if not path.is_file():
        return None
    fix = f"re-run effmod-edge {command} to write it again"
    try:
        doc = parse_json(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EffmodError(f"{path} is not valid JSON ({exc}); {fix}") from None
    except TooDeepError:
        raise EffmodError(f"{path} nests too deeply to be a {command} result; {fix}") from None
    except OSError as exc:
        raise EffmodError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions or {fix}") from None
    rows = doc.get(rows_key) if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise EffmodError(f"{path} has no list {rows_key!r}; {fix}")
    for i, r in enumerate(rows):
        missing = [k for k in ("target", "precision", "path") if not isinstance(r, dict) or k not in r]
        if not missing and command == "bench" and not ("median_ms" in r and "threads" in r
                                                         or "skipped" in r or "error" in r):
            missing = ["median_ms/threads or skipped or error"]
        if missing:
            raise EffmodError(f"{path}: {rows_key}[{i}] lacks {', '.join(missing)}; {fix}")
        try:
            _check_result_row(r, f"{rows_key}[{i}]")
        except ConfigError as exc:
            raise EffmodError(f"{path}: {exc}; {fix}") from None
    if not isinstance(doc.get("machine", {}), dict):
        raise EffmodError(f"{path}: machine {doc['machine']!r} is not an object; {fix}")
    settings = doc.get("settings")
    if command == "bench" and settings is not None and not (
            isinstance(settings, dict) and all(is_number(settings.get(k)) for k in ("runs", "warmup", "rounds"))):
        raise EffmodError(f"{path}: settings {settings!r} lacks numeric runs, warmup and rounds; {fix}")
    return doc


def _check_result_row(r: dict, where: str) -> None:
    """Types of the fields the report reads from an evaluation or bench row."""
    for key in ("target", "precision", "path", "skipped", "error"):
        if key in r and not isinstance(r[key], str):
            raise ConfigError(f"{where}.{key}: {r[key]!r} is not a string")
    check_metrics(r, where)
    for key in ("median_ms", "p90_ms", "min_ms"):
        if key in r and not is_number(r[key]):
            raise ConfigError(f"{where}.{key}: {r[key]!r} is not a number")
    if "threads" in r and not (isinstance(r["threads"], int) and not isinstance(r["threads"], bool)):
        raise ConfigError(f"{where}.threads: {r['threads']!r} is not a thread count")


def collect_rows(out_dir: Path) -> tuple[Manifest, list[dict], dict | None, dict | None]:
    """One row per artifact: manifest facts + evaluation metrics + 1-thread/N-thread latency."""
    manifest = Manifest.load(out_dir / "manifest.json")
    evaluation = _load_json(out_dir / EVALUATION_FILE, "rows", "evaluate")
    bench = _load_json(out_dir / BENCH_FILE, "results", "bench")
    evals = {r["path"]: r for r in (evaluation or {}).get("rows", []) if r.get("path")}
    lat: dict[str, dict[int, float]] = {}
    no_latency: dict[str, str] = {}
    for r in (bench or {}).get("results", []):
        if "median_ms" in r:
            lat.setdefault(reference_label(r), {})[r["threads"]] = r["median_ms"]
        elif r.get("skipped") or r.get("error"):
            no_latency[reference_label(r)] = r.get("skipped") or r["error"]
    rows = []
    for a in manifest.artifacts:
        source = evals.get(a.path)
        metrics = source if source is not None else a.checks
        row = {"target": a.target, "precision": a.precision, "path": a.path, "bytes": a.bytes,
               "metrics_from": "evaluation.json" if source is not None else "manifest checks",
               "latency": lat.get(a.path, {}), "details": a.details,
               "no_latency": no_latency.get(a.path)}
        if source is not None and "error" in source:
            row["error"] = source["error"]
        else:
            row.update({k: metrics.get(v) for k, v in METRICS.items()})
            row["agreement_ci95"] = metrics.get("top1_agreement_ci95")
            row["nonfinite_logits"] = metrics.get("nonfinite_logits")
            row["bar_misses"] = bar_misses(a.target, a.precision, metrics)
        problem = None if "error" in row else artifact_problem(out_dir, a)
        if problem:
            row["error"] = problem
        rows.append(row)
    for target, label in REFERENCE_LABELS.items():  # rows bench timed beside the artifacts
        if label not in lat and label not in no_latency:
            continue
        row = {"target": target, "precision": "fp32", "path": label, "bytes": 0, "reference": True, "details": {},
               "latency": lat.get(label, {}), "no_latency": no_latency.get(label)}
        if target == "pytorch":  # the reference every check compares with
            torch_row = next((r for r in (evaluation or {}).get("rows", []) if r["target"] == "pytorch"), {})
            row.update({"metrics_from": "reference", "agreement": 1.0, "sqnr": math.inf, "cosine": 1.0,
                        "top1": torch_row.get("top1"), "top5": torch_row.get("top5")})
        else:  # bench's own export, timed for latency only: random weights, so no metrics
            row["metrics_from"] = "bench export"
        rows.append(row)
    return manifest, rows, evaluation, bench


def precision_bar(target: str, precision: str) -> Threshold | None:
    """The bar of the precision's table entry; None for a target or precision this version does not know."""
    spec = TARGETS.get(target)
    if spec is None:
        return None
    try:
        return spec.precision(precision).threshold
    except ConfigError:
        return None


def bar_misses(target: str, precision: str, metrics: dict) -> list[str] | None:
    """Why ``metrics`` miss the precision's bar ([]: they meet it); None: no verdict (a precision this
    version does not know, or a metric the bar needs is not a number)."""
    bar = precision_bar(target, precision)
    if bar is None:
        return None
    needed = [k for k, limit in (("max_abs_diff", bar.max_abs), ("sqnr_db", bar.min_sqnr_db),
                                 ("top1_agreement", bar.min_agreement)) if limit is not None]
    if not all(is_number(metrics.get(k)) for k in needed):
        return None
    return evaluate_threshold(metrics, bar)


def _unsettled(row: dict) -> bool:
    """The row meets its agreement bar, but its 95 % interval reaches below it: more images could tell."""
    bar, ci = precision_bar(row["target"], row["precision"]), row.get("agreement_ci95")
    return bool(bar is not None and bar.min_agreement is not None and isinstance(ci, list) and len(ci) == 2
                and is_number(ci[0]) and ci[0] < bar.min_agreement)


def ship_lines(rows: list[dict], machine: dict, mixed_sources: bool = False) -> list[str]:
    """Per target: the fastest and the smallest file that meet their precision's bar (markdown lines, then a note).

    "Fastest" is at the most threads any of those files was timed with, on the benchmarked machine."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows if not r.get("reference")):
        mine = [r for r in rows if r["target"] == target and not r.get("reference")]
        ok = [r for r in mine if "error" not in r and r.get("bar_misses") == []]
        if not ok:
            lines.append(f"- {target}: " + ("no file meets its bar (see the table); ship none of them as is."
                                             if all("error" in r or r.get("bar_misses") for r in mine) else
                                             "no file has a verdict (see the table: this version does not know "
                                             "the precision, or a metric its bar needs is missing)."))
            continue
        small = min(ok, key=lambda r: (r["bytes"], r["path"]))
        thread = max((t for r in ok for t in r["latency"]), default=None)
        threads = f"{thread} thread{'s' if thread != 1 else ''}"
        parts = []
        if thread is not None:
            timed = sorted((r for r in ok if thread in r["latency"]), key=lambda r: (r["latency"][thread], r["path"]))
            fast, best = timed[0], timed[0]["latency"][thread]
            parts.append(f"fastest here: `{fast['path']}` ({best:.2f} ms at {threads}, {fast['bytes'] / 1e6:.2f} MB)")
            close = [r for r in timed[1:] if r["latency"][thread] <= best * (1 + SAME_SPEED)]
            if close:
                parts.append(f"as fast within {SAME_SPEED:.0%} (this machine's noise): " + ", ".join(
                    f"`{r['path']}` ({r['latency'][thread]:.2f} ms, {r['bytes'] / 1e6:.2f} MB)" for r in close))
        elif target == "coreml":
            parts.append("no latency on this machine (Core ML runs on Apple devices)")
        else:
            reason = next((r["no_latency"] for r in ok if r.get("no_latency")), None)
            parts.append(f"no latency: {reason}" if reason else "no latency on this machine (run effmod-edge bench)")
        lat = f", {small['latency'][thread]:.2f} ms" if thread in small["latency"] else ""
        parts.append(f"smallest: `{small['path']}` ({small['bytes'] / 1e6:.2f} MB{lat})")
        lines.append(f"- {target}: " + "; ".join(parts) + ".")
    note = "Only files that meet their precision's bar are named"
    note += (" (rows marked * were judged on convert's images, the others on evaluate's)." if mixed_sources else ".")
    if any(not r.get("reference") and r["latency"] for r in rows):
        isa = machine.get("isa")
        none = isinstance(isa, list) and not {x for x in isa if isinstance(x, str)} & INT8_DOT_ISA
        note += (f" Latency is this machine's ({machine_line(machine)}): a phone's differs, and TFLite int8 and "
                 f"int8-mixed files run faster than fp32 only on CPUs with int8 dot products"
                 f"{' (this one has none)' if none else ''}.")
    return lines + [note]


SAME_SPEED = 0.05  # medians this close to the fastest are named beside it: a shared host's runs move ~10 %
INT8_DOT_ISA = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}  # machine_info's isa names with int8 dots


def gate(rows: list[dict], fail_under: list[FailUnder], failures: list | None = None) -> list[str]:
    """Names of rows (with the reason) that miss a --fail-under bar or have an error, and failed conversions."""
    misses = [f"{f.name}: conversion failed after {f.seconds:.0f}s: {f.error}" for f in failures or []]
    for r in rows:
        if r.get("reference"):
            continue
        name = f"{r['target']}/{r['precision']} {r['path']}"
        if "error" in r:
            misses.append(f"{name}: {r['error']}")
            continue
        if r.get("nonfinite_logits"):  # whatever the bars: no --fail-under may let inf/NaN logits through
            misses.append(f"{name}: {r['nonfinite_logits']} logits are inf or NaN")
        for f in fail_under:
            v = r.get(f.metric)
            if v is None or not v >= f.value:  # NaN misses every bar
                misses.append(f"{name}: {f.metric} {v} < {f.value}")
    return misses


def _fmt(v, pct: bool = False, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "exact"
    return f"{100 * v:.{digits}f}%" if pct else f"{v:.{digits}f}"


CHECKS_MARK = " *"  # a row whose metrics come from convert's checks while evaluation.json has the others'
CHECKS_NOTE = ("* not in evaluation.json (evaluate ran on other artifacts): metrics from convert's checks on its "
               "own evaluation images")


def _table_rows(rows: list[dict], threads: list[int], mark_checks: bool = False) -> list[list[str]]:
    out = []
    for r in rows:
        if mark_checks and r.get("metrics_from") == "manifest checks":
            r = {**r, "path": r["path"] + CHECKS_MARK}
        lat = [_fmt(r["latency"].get(t), digits=2) for t in threads]
        if r.get("no_latency") and threads:
            lat = ["n/a: " + r["no_latency"]] + [""] * (len(threads) - 1)
        if "error" in r:
            out.append([r["target"], r["precision"], r["path"], _fmt(r["bytes"] / 1e6, digits=2), "ERROR: " + r["error"],
                        "", "", "", "", "no", *lat])
        else:
            out.append([r["target"], r["precision"], r["path"], _fmt(r["bytes"] / 1e6, digits=2) if r["bytes"] else "-",
                        _fmt(r.get("top1"), True), _fmt(r.get("top5"), True), _agreement_cell(r),
                        _fmt(r.get("sqnr")), _fmt(r.get("cosine"), digits=4), _bar_cell(r), *lat])
    return out


def _bar_cell(row: dict) -> str:
    misses = row.get("bar_misses")
    if misses is None:
        return "-"
    if misses:
        return "no: " + "; ".join(misses)
    return "yes (its 95 % interval reaches below the agreement bar)" if _unsettled(row) else "yes"


def _agreement_cell(row: dict) -> str:
    """Top-1 agreement with its 95 % interval, e.g. ``99.0% [94.6-99.8]``."""
    ci = row.get("agreement_ci95")
    cell = _fmt(row.get("agreement"), True)
    return f"{cell} [{interval_text(ci)}]" if ci and row.get("agreement") is not None else cell


def _svg_scatter(rows: list[dict], thread: int) -> str:
    """Latency vs top-1 agreement, one labelled point per artifact (paper Fig. 3 style)."""
    pts = [(r["latency"][thread], r["agreement"], f"{r['target']} {r['precision']}") for r in rows
           if "error" not in r and thread in r.get("latency", {}) and r.get("agreement") is not None]
    w, h, pad = 640, 360, 50
    if not pts:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="640" height="60" role="img"><text x="10" y="30">' \
               'no latency figures: run effmod-edge bench first</text></svg>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = min(min(ys), 0.9) - 0.01, 1.005
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" class="plot" '
             f'aria-label="latency versus top-1 agreement">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">latency, {thread} thread(s), ms (median)</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">top-1 agreement with PyTorch</text>']
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{h - pad + 15}" font-size="11" text-anchor="middle">{xv:.1f}</text>')
        parts.append(f'<text x="{pad - 4}" y="{sy(yv):.1f}" font-size="11" text-anchor="end">{100 * yv:.0f}%</text>')
    for x, y, label in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#2a6fb0"><title>{html.escape(label)}</title></circle>')
        parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}" font-size="11">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_sensitivity(sens: list[dict]) -> str:
    """Bar per op: dB of SQNR the op itself loses in full int8, in graph order of rank."""
    top = sens[:40]
    w, bar = 760, 14
    h = 30 + bar * len(top)
    peak = max([r["drop_db"] for r in top] + [1e-9])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" class="plot" '
             f'aria-label="per-op int8 sensitivity">',
             '<text x="4" y="14" font-size="12">SQNR lost at each op in full int8 (dB), worst 40</text>']
    for i, r in enumerate(top):
        y = 24 + i * bar
        bw = max(r["drop_db"], 0) / peak * 380
        parts.append(f'<text x="4" y="{y + 10}" font-size="10">{html.escape(r["op"])} {html.escape(r["tensor"][-40:])}</text>')
        parts.append(f'<rect x="360" y="{y}" width="{bw:.1f}" height="{bar - 3}" fill="#c0392b"/>')
        parts.append(f'<text x="{364 + bw:.1f}" y="{y + 10}" font-size="10">{r["drop_db"]:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def machine_line(machine: dict) -> str:
    """CPU, cores and the instruction sets int8 speed depends on, e.g. ``AMD EPYC (cpu family 25 model 1 stepping 1),
    2 cores, ISA avx2 fma f16c``."""
    ident = f" ({machine['cpu_id']})" if machine.get("cpu_id") else ""
    isa = machine.get("isa")
    features = f", ISA {' '.join(map(str, isa)) or 'without AVX2/VNNI/dot-product'}" if isinstance(isa, list) else ""
    return f"{machine.get('cpu', '-')}{ident}, {machine.get('cores', '-')} cores{features}"


def latency_method(bench: dict | None) -> str:
    """How bench.json's latencies were taken, in one sentence (empty without a bench.json)."""
    s = (bench or {}).get("settings")
    if not s:
        return ""
    return (f"Latency ({bench.get('date', 'undated')}): median over {s['rounds']} interleaved rounds of {s['runs']} "
            f"timed runs, each round after at least {s['warmup']} untimed runs and {s.get('warmup_secs', 0)} s.")


def render(out_dir: str | os.PathLike, fail_under: list[FailUnder] | None = None) -> tuple[Path, Path, list[str]]:
    """Write report.md and report.html; returns their paths and the gate misses."""
    out_dir = Path(out_dir)
    manifest, rows, evaluation, bench = collect_rows(out_dir)
    require_writable(out_dir)
    threads = sorted({t for r in rows for t in r["latency"]})
    header = ["target", "precision", "file", "MB", "top-1", "top-5", "agreement [95 % interval]", "SQNR dB", "cosine",
              "meets its bar", *[f"ms ({t} thr)" for t in threads]]
    mixed_sources = evaluation is not None and any(r.get("metrics_from") == "manifest checks" for r in rows)
    body = _table_rows(rows, threads, mark_checks=mixed_sources)
    img = (evaluation or {}).get("images") or {k: (manifest.data or {}).get(k) for k in ("eval_size", "seed", "root")}
    machine = (bench or evaluation or {}).get("machine", {})
    timing = latency_method(bench)
    misses = gate(rows, fail_under or [], manifest.failures)
    source = "evaluation.json" if evaluation else "the manifest's conversion checks (run effmod-edge evaluate for more)"
    md = [f"# effmod-edge report: {manifest.model}", "",
          f"Weights: `{manifest.weights}`. Metrics from {source}; images: {json.dumps(img)}.",
          f"Machine: {machine_line(machine)}; runtimes {json.dumps(machine.get('versions', {}))}.",
          *([timing] if timing else []),
          "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    if mixed_sources:
        md += ["", CHECKS_NOTE]
    ship = ship_lines(rows, machine, mixed_sources)
    md += ["", "## Which file to ship", *ship]
    mixed = [r for r in rows if r["details"].get("sensitivity")]
    for r in mixed:
        d = r["details"]
        md += ["", f"## Mixed precision: {r['path']}",
               f"Kept in float: op types {', '.join(d.get('kept_float_op_types', []))}; LayerNorm statistics "
               f"{'float' if d.get('layernorm_stats_float') else 'int8'}; {len(d.get('kept_float_nodes', []))} more "
               f"ops ({_ranking(d)}). Target met on calibration: {d.get('target_met_on_calibration')}"
               f"{_search_target(d)}."]
        md += [f"- step: {mixed_step_line(s)}" for s in d["search"]]
    for f in manifest.failures:
        md.append(f"\nFailed: {f.name} after {f.seconds:.0f}s: {f.error}")
    if misses:
        md += ["", "## Gate misses", *[f"- {m}" for m in misses]]
    md_path, html_path = (out_dir / name for name in REPORT_FILES)
    for p in (md_path, html_path):
        refuse_in_the_way(p, "the report", "move it away")

    esc = html.escape
    table = ["<table id='artifacts'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row, r in zip(body, rows):
        cls = "error" if "error" in r else "ok"
        table.append(f"<tr class='{cls}'>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    table.append("</tbody></table>")
    if mixed_sources:
        table.append(f"<p>{esc(CHECKS_NOTE)}</p>")
    plot_thread = max(threads) if threads else 1
    def code(text: str) -> str:  # markdown's `path` as <code>path</code>
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(text))

    sections = ["<h2>Which file to ship</h2><ul>" + "".join(
                    f"<li>{code(line[2:])}</li>" for line in ship if line.startswith("- ")) + "</ul>"
                + "".join(f"<p>{code(line)}</p>" for line in ship if not line.startswith("- ")),
                f"<h2>Latency vs fidelity</h2>{_svg_scatter(rows, plot_thread)}"]
    for r in mixed:
        sections.append(f"<h2>Per-op int8 sensitivity: {esc(r['path'])}</h2>{_svg_sensitivity(r['details']['sensitivity'])}")
        sections.append("<ul>" + "".join(
            f"<li>{esc(mixed_step_line(s))}</li>" for s in r["details"]["search"]) + "</ul>")
    if manifest.failures:
        sections.append("<h2>Failed conversions</h2><ul>" + "".join(
            f"<li>{esc(f.name)} after {f.seconds:.0f}s: {esc(f.error)}</li>"
            for f in manifest.failures) + "</ul>")
    if misses:
        sections.append("<h2>Gate misses</h2><ul>" + "".join(f"<li>{esc(m)}</li>" for m in misses) + "</ul>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>effmod-edge report: {esc(manifest.model)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}tr.error td{{background:#fdd}}</style>
</head><body>
<h1>effmod-edge report: {esc(manifest.model)}</h1>
<p>Weights: <code>{esc(manifest.weights)}</code>. Metrics from {esc(source)}. Images: <code>{esc(json.dumps(img))}</code>.</p>
<p>Machine: {esc(machine_line(machine))}.</p>
{f"<p>{esc(timing)}</p>" if timing else ""}
{''.join(table)}
{''.join(sections)}
</body></html>
"""
    try:
        write_files_atomic([(md_path, ("\n".join(md) + "\n").encode("utf-8")), (html_path, page.encode("utf-8"))])
    except OSError as exc:
        raise EffmodError(f"could not write the report into {out_dir} ({exc.strerror or exc}); free some space or "
                          f"fix the folder's permissions and run report again") from None
    return md_path, html_path, misses
