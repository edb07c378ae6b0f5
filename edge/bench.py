"""Host latency of every runnable artifact in a manifest, measured in one run.

Each artifact (and PyTorch eager as the baseline) is timed in interleaved rounds,
so slow drift of a shared machine hits all rows alike. TFLite models run in
worker subprocesses, ONNX and PyTorch in this process.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from edge.context import log
from edge.efficientmod import create_model, get_config, to_deploy
from edge.errors import ConfigError, EffmodError
from edge.manifest import (BENCH_FILE, Manifest, artifact_problem, reference_label, refuse_in_the_way, require_writable,
                           write_json_atomic)
from edge.threads import torch_threads
from edge.timing import WARMUP_SECS, warm_up


# CPU features that decide int8 and fp16 speed (XNNPACK, onnxruntime): x86 VNNI/AMX dot products, Arm dot products
INT8_ISA = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
            "asimddp", "i8mm", "asimdhp", "sve", "sve2")


def _cpuinfo(text: str) -> tuple[str, str, list[str]]:
    """Model name, family/model/stepping (x86), and the :data:`INT8_ISA` features of /proc/cpuinfo's first CPU."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    ident = " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return fields.get("model name", ""), ident, [f for f in INT8_ISA if f in flags]


def machine_info() -> dict:
    """The host a latency or check was measured on; ``isa`` is what int8 speed depends on most.

    "AMD EPYC" alone names both a Zen 4 with AVX-512 VNNI (int8-mixed about 1.9x fp32 on xxs) and a
    Zen 3 with AVX2 only (about 1.0x)."""
    cpu, ident, isa = platform.processor() or "", "", None  # None: not known (no /proc/cpuinfo), not "none"
    try:
        name, ident, isa = _cpuinfo(Path("/proc/cpuinfo").read_text())
        cpu = name or cpu
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "onnxruntime", "ai-edge-litert", "tensorflow", "coremltools", "onnx2tf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_id": ident, "isa": isa, "cores": os.cpu_count(),
            "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "versions": versions}


def _stats(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "min_ms": round(float(a.min()), 3), "runs": int(a.size)}


def _time(fn, warmup: int, runs: int, warmup_secs: float) -> list[float]:
    warm_up(fn, warmup, warmup_secs)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _onnx_timer(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    x = np.zeros(shape, np.float32)
    name = sess.get_inputs()[0].name
    return lambda warmup, runs, secs: _time(lambda: sess.run(None, {name: x}), warmup, runs, secs)


def _tflite_timer(path: Path, threads: int, build: Path):
    from converters.to_tflite import time_tflite

    def run(warmup: int, runs: int, secs: float) -> list[float]:
        return time_tflite([path], build, threads=threads, rounds=1, runs=runs, warmup=warmup, warmup_secs=secs)[path]

    return run


def _torch_timer(model: torch.nn.Module, threads: int, input_size: int):
    x = torch.zeros(1, 3, input_size, input_size)

    def run(warmup: int, runs: int, secs: float) -> list[float]:
        with torch_threads(threads), torch.inference_mode():
            return _time(lambda: model(x), warmup, runs, secs)

    return run


BASELINE = {"target": "tflite", "precision": "fp32"}  # the file every speed-up is measured against


def _onnx_reference(model: torch.nn.Module, size: int, build: Path) -> Path:
    """fp32 ONNX of ``model``'s deploy form (as convert's onnx target writes it), for onnxruntime's row."""
    from converters.to_onnx import export_onnx

    return export_onnx(to_deploy(model, size), build / "reference.onnx", size)


def _speedup_vs_baseline(row: dict, medians: list[float], timed: list[tuple[dict, list[float]]]) -> dict | None:
    """Baseline time / this row's time, paired round by round at the same thread count.

    Each round times every row once, so a round's ratio sees the same machine
    state; the spread over rounds shows how far the noise moves the ratio.
    """
    base = next((m for r, m in timed if all(r[k] == v for k, v in BASELINE.items()) and r["threads"] == row["threads"]),
                None)
    if base is None or len(base) != len(medians):
        return None
    ratios = np.asarray(base) / np.asarray(medians)
    return {"median": round(float(np.median(ratios)), 3), "min": round(float(ratios.min()), 3),
            "max": round(float(ratios.max()), 3), "rounds": int(ratios.size)}


def bench_manifest(
    manifest_path: str | os.PathLike,
    runs: int = 30,
    warmup: int = 5,
    rounds: int = 3,
    threads: tuple[int, ...] | None = None,
    include_torch: bool = True,
    warmup_secs: float = WARMUP_SECS,
    include_onnxruntime: bool = True,
) -> dict:
    """Time every runnable artifact; writes ``bench.json`` beside the manifest.

    Each round first runs each row at least ``warmup`` times and for ``warmup_secs`` seconds, untimed.
    PyTorch eager is timed beside them (``include_torch``), and so is onnxruntime on an fp32 ONNX
    export of the deploy form when the manifest holds TFLite files but no ONNX file to time
    (``include_onnxruntime``): issue 4 compares fp32 TFLite with onnxruntime in one run.
    """
    if runs < 1 or rounds < 1 or warmup < 0 or not 0 <= warmup_secs < float("inf"):
        raise ConfigError(f"bench needs --runs >= 1, --rounds >= 1, --warmup >= 0 and a finite --warmup-secs >= 0 "
                          f"(got {runs}, {rounds}, {warmup}, {warmup_secs})")
    if threads is not None and (not threads or min(threads) < 1):
        raise ConfigError(f"--threads must be positive thread counts, e.g. 1,2 (got {','.join(map(str, threads))})")
    manifest_path = Path(manifest_path)
    manifest = Manifest.load(manifest_path)
    root = manifest_path.resolve().parent  # workers run in their own folder: relative paths would miss
    get_config(manifest.model)
    require_writable(root)
    refuse_in_the_way(root / BENCH_FILE, f"the {BENCH_FILE} bench writes", "move it away")
    threads = threads or tuple(sorted({1, os.cpu_count() or 1}))
    rows: list[dict] = []
    timers: list[tuple[dict, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        for a in manifest.artifacts:
            row = {"target": a.target, "precision": a.precision, "path": a.path, "bytes": a.bytes}
            problem = artifact_problem(root, a)
            if problem:
                rows.append({**row, "error": problem})
                continue
            for t in threads:
                if a.target == "onnx":
                    timers.append(({**row, "threads": t, "runtime": "onnxruntime"}, _onnx_timer(root / a.path, t)))
                elif a.target == "tflite":
                    timers.append(({**row, "threads": t, "runtime": "litert-xnnpack"}, _tflite_timer(root / a.path, t, build)))
                else:
                    rows.append({**row, "threads": t, "skipped": "Core ML runs only on macOS; no host latency"})
        model = create_model(manifest.model, num_classes=manifest.num_classes).eval()  # latency only: random weights
        size = int((manifest.tool or {}).get("input_size", 224))
        timed_targets = {r["target"] for r, _ in timers}
        if include_onnxruntime and "tflite" in timed_targets and "onnx" not in timed_targets:
            import onnxruntime

            row = {"target": "onnx", "precision": "fp32", "path": "", "bytes": 0,
                   "runtime": f"onnxruntime {onnxruntime.__version__}",
                   "note": "deploy form exported by bench: no ONNX file of the manifest could be timed"}
            try:
                path = _onnx_reference(model, size, build)
                row["bytes"] = path.stat().st_size
                timers += [({**row, "threads": t}, _onnx_timer(path, t)) for t in threads]
            except Exception as exc:  # a failed export costs its row, not the bench
                rows.append({**row, "error": f"ONNX export for onnxruntime failed: {type(exc).__name__}: {exc}"})
        if include_torch:
            for t in threads:
                timers.append(({"target": "pytorch", "precision": "fp32", "path": "", "bytes": 0, "threads": t,
                                "runtime": f"torch {torch.__version__} eager"}, _torch_timer(model, t, size)))
        samples: dict[int, list[float]] = {i: [] for i in range(len(timers))}
        round_medians: dict[int, list[float]] = {i: [] for i in range(len(timers))}
        errors: dict[int, str] = {}
        for r in range(rounds):
            for i, (row, timer) in enumerate(timers):
                if i in errors:
                    continue
                try:
                    got = timer(warmup, runs, warmup_secs)
                except Exception as exc:  # a runtime crash is a row's error, not the bench's
                    errors[i] = f"{type(exc).__name__}: {exc}"
                    continue
                samples[i] += got
                round_medians[i].append(float(np.median(got)))
            log.info("bench: round %d/%d done", r + 1, rounds)
        timed = [(row, round_medians[i]) for i, (row, _) in enumerate(timers) if i not in errors]
        for i, (row, _) in enumerate(timers):
            if i in errors:
                rows.append({**row, "error": errors[i]})
            else:
                speedup = _speedup_vs_baseline(row, round_medians[i], timed)
                rows.append({**row, **_stats(samples[i]), **({"speedup_vs_fp32_tflite": speedup} if speedup else {})})
    result = {"manifest": str(manifest_path), "model": manifest.model, "weights": manifest.weights,
              "machine": machine_info(), "settings": {"runs": runs, "warmup": warmup, "warmup_secs": warmup_secs, "rounds": rounds,
                                                     "threads": list(threads)},
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": rows}
    write_json_atomic(root / BENCH_FILE, result)
    return result


def format_table(result: dict) -> str:
    """Markdown table of a bench result."""
    lines = ["| target | precision | file | MB | threads | median ms | p90 ms | min ms | speed-up vs fp32 TFLite "
             "(rounds: median, min-max) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["results"]:
        mb = f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "-"
        if "median_ms" in r:
            sp = r.get("speedup_vs_fp32_tflite")
            ratio = f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f}, {sp['rounds']})" if sp else "-"
            lines.append(f"| {r['target']} | {r['precision']} | {reference_label(r)} | {mb} | {r['threads']} | "
                         f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} | {ratio} |")
        else:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['target']} | {r['precision']} | {reference_label(r)} | {mb} | {r.get('threads', '-')} | {why} "
                         "| | | |")
    return "\n".join(lines)


def require_manifest(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise EffmodError(f"manifest {p} not found; pass OUT/manifest.json from a convert run")
    return p
