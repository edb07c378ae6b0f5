"""TFLite target: deploy form -> ONNX -> onnx2tf -> TFLite, checked with LiteRT.

Graph choices (each measured, see BENCHMARKS.md):

* ONNX opset 20, so GELU is one ``Gelu`` node that becomes the TFLite ``GELU``
  builtin (opset 17 spells it with ``Erf``, which TFLite only has as a Flex op);
* the channels-first deploy form, so the 7x7 context conv is ``DEPTHWISE_CONV_2D``,
  split into a 5x5 core and two dilated edge convs (``dw_impl="split"``): XNNPACK
  runs a 49-tap depthwise kernel on a slow generic path;
* in the int8 files, LayerNorm statistics as 1x1 convolutions
  (``norm_impl="conv"``): XNNPACK runs them in int8, while an int8 ``SUB`` of a
  broadcast mean or ``ADD`` of eps fall back to the reference kernels; the float
  files (fp32, fp16, dynamic) keep ``MEAN``-based LayerNorm, which is faster in
  float (a second onnx2tf run);
* the modulation's channel repeat as concats of at most 4 inputs (XNNPACK does
  not delegate a 6-input ``CONCATENATION``);
* in the dynamic-range file, depthwise weights dequantized back to float:
  XNNPACK has no hybrid depthwise kernel, and 26 of xxs's 36 depthwise convs
  ran on reference kernels.

int8 calibration records each activation's min/max over the calibration images,
then narrows it to the MSE-optimal int8 range of the activation's histogram
(``calibration.ranges``; option ``tflite_ranges=minmax`` turns that off). ADD
inputs are then widened to at least 2^-8 of the ADD's output range: XNNPACK
refuses int8 ADDs with a far smaller input scale (a nearly constant channel mean
had one, and 26 ADDs of xxs fell out of the delegate).

``int8-mixed`` keeps the op types XNNPACK has no int8 kernel for in float, then
searches (:func:`search_steps`, asking the calibration images for the int8 bar
plus ``SEARCH_SQNR_MARGIN_DB`` of SQNR): LayerNorm statistics in float, every ADD in
float (the residual stream in per-tensor int8 carried most of the error on
proxy weights), then 4, 8 and 16 convs in float, ranked by the logit noise
their int8 rounding adds (:mod:`converters.tflite_noise`; the per-op SQNR
sensitivity is still measured and recorded, and serves if that ranking
fails), as many as fit in a file size of option ``tflite_mixed_max_size``
(30 %) of fp32's (:func:`fill_budget`; the fallback keeps to it too). The walk stops at the first step that
meets the agreement target on the calibration images, or when a kept-convs step
gains less than ``MIN_STEP_GAIN_DB``, and keeps a step
only if it meets the target or gains at least ``MIN_GAIN_DB``. The tried steps'
files are then timed side by side (LiteRT, 2 threads) and the manifest records
each step's latency against the first: what its float ops cost. The timing is a
record, not a term of the choice, so the file shipped does not depend on how
busy the machine was.

The int8, int8-mixed and dynamic files' weights are GPTQ-rounded onto the
per-channel int8 grid (``calibration.gptq``; option ``tflite_weight_rounding=nearest`` leaves
the rounding to the converter), whose rounding errors largely cancel on the
calibration images. The int8 files' form is exported with those weights, so the
converter stores exactly them; the dynamic file gets them written into its int8
weights after conversion (``litert_worker.swap_weight_levels``).

onnx2tf runs in a private working folder that holds the sample-image .npy it
would otherwise download, after one onnxsim pass in its own process. Every
TensorFlow/LiteRT step runs in a subprocess (``converters.litert_worker``).
A conversion starts all its onnx2tf runs (the float files' LayerNorm form and
the int8 files' GPTQ-rounded one) and the int8 calibration before the first
precision, so they run beside each other, beside GPTQ and beside the float
files' checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from calibration.gptq import GPTQ_IMAGES, LayerRounder, RoundingReport, int8_levels, quantizable_layers
from calibration.preprocess import MEAN, STD
from converters.litert_worker import LEVELS_MISMATCH_EXIT
from converters.to_onnx import export_onnx
from edge.checks import compare_logits, evaluate_threshold
from edge.context import ArtifactResult, ConvertContext, PrecisionFailure, log, torch_logits
from edge.efficientmod import EfficientModDeploy, to_deploy
from edge.errors import ConversionError
from edge.manifest import TensorSpec
from edge.targets import TARGETS, validate_options
from edge.threads import torch_threads
from edge.timing import WARMUP_SECS

ONNX_OPSET = 20
SAMPLE_NPY = "calibration_image_sample_data_20x128x128x3_float32.npy"
RUNTIME_FLOAT_OPS = ("GELU", "RSQRT", "SOFTMAX", "BATCH_MATMUL")


@dataclass(frozen=True)
class MixedStep:
    """One int8-mixed candidate: what it keeps in float beyond the runtime's float op types."""

    layernorm_stats: bool  # LayerNorm statistics (1x1 convs) in float
    adds: bool  # every ADD in float
    kept_nodes: int  # number of convs kept float, from the logit-noise ranking (per-op sensitivity if it failed)


MIXED_STEPS = (MixedStep(False, False, 0), MixedStep(True, False, 0), MixedStep(True, True, 0),
               MixedStep(True, True, 4), MixedStep(True, True, 8), MixedStep(True, True, 16))
NOISE_RANK_IMAGES = 16  # calibration images the logit-noise ranking of the convs runs on
MIN_GAIN_DB = 0.5  # a step is taken over a faster one only if it meets the target or gains this much
MIN_STEP_GAIN_DB = 0.2  # a kept-nodes step gaining less than this over the step before ends the search
SEARCH_SQNR_MARGIN_DB = 1.0  # over the SQNR bar on calibration images, whose ranges were fit: held-out read 0.2-0.8 lower
MIXED_BAR = TARGETS["tflite"].precision("int8-mixed").threshold  # what a step must meet on calibration images
SEARCH_BENCH_THREADS, SEARCH_BENCH_ROUNDS, SEARCH_BENCH_RUNS = 2, 5, 20  # timing of the tried int8-mixed steps
WORKER_TIMEOUT_S = 900
HISTOGRAM_WORKERS = 2  # processes sharing the MSE-range histogram pass
FLOAT_NORM, INT8_NORM = "reduce", "conv"  # LayerNorm form of the float and of the int8 files
DYNAMIC_MIN_ELEMENTS = 1024  # the dynamic-range converter leaves smaller weight tensors float
NEAREST = {"method": "nearest (the converter's own rounding)"}


def _env() -> dict:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    return env


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            return f"killed by signal {-rc}"
        return f"killed by {name}" + (", out of memory?" if -rc == signal.SIGKILL else "")
    return f"exit code {rc}"


_LIVE: set["_Started"] = set()  # runs not yet awaited or killed: stopped when a conversion is abandoned

# A child asks the kernel to kill it when its parent dies (even by SIGKILL); Linux only, and not the
# child's own children. Then it checks the converting process did not die first.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "if sys.platform.startswith('linux'):\n"
                    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
                    "    if os.getppid() != int(os.environ['EFFMOD_PARENT_PID']):\n"
                    "        sys.exit('effmod-edge worker: the converting process is gone (or python forked it)')\n")


def stop_all_runs() -> None:
    """Kill every worker and onnx2tf run this process started and has not awaited (an interrupted convert)."""
    for run in list(_LIVE):
        run.kill()


# TensorFlow's glog info/warning lines and absl's preamble: never the reason a step failed
_LOG_NOISE = re.compile(r"^([IW]\d{4} |WARNING: All log messages before absl)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Started:
    """A subprocess started now and awaited later; a failure raises ConversionError naming its cause."""

    def __init__(self, cmd: list[str], cwd: Path, what: str, timeout: float = WORKER_TIMEOUT_S):
        self.what, self.timeout = what, timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self._logs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())  # files, not pipes: no deadlock
        env = {**_env(), "EFFMOD_PARENT_PID": str(os.getpid())}
        try:  # its own process group, so kill() also stops whatever it started
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._logs[0], stderr=self._logs[1],
                                         start_new_session=True)
        except OSError:
            self._close_logs()
            raise
        _LIVE.add(self)

    def wait(self) -> None:
        waiting = time.monotonic()
        try:
            try:
                rc = self.proc.wait(timeout=max(self.deadline - time.monotonic(), 0.0))
                done = time.monotonic()  # where a conversion's time goes: -v shows each run's and the wait for it
                log.debug("%s: done within %.1f s of its start; waited %.1f s for it", self.what,
                          done - self.started, done - waiting)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ConversionError(f"{self.what} timed out after {self.timeout:.0f}s") from None
            except BaseException:  # interrupted while waiting (SIGINT, SIGTERM): the child must not outlive us
                self.kill()
                raise
            if rc != 0:
                lines = [l for l in _ANSI.sub("", self._read_logs()).splitlines()
                         if l.strip() and not _LOG_NOISE.match(l)]
                last = f": {lines[-1][:300]}" if lines else ""
                raise ConversionError(f"{self.what} failed ({_describe_exit(rc)}){last}")
        finally:
            _LIVE.discard(self)
            self._close_logs()

    def kill(self) -> None:
        """Stop the process and its group if it still runs (a conversion that ends early leaves no orphans)."""
        running = self.proc.poll() is None
        try:  # the group, also when the leader is gone: what it started may still run
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if running:
                self.proc.kill()
        if running:
            self.proc.wait()
        _LIVE.discard(self)
        self._close_logs()

    def _read_logs(self) -> str:
        text = ""
        for f in self._logs:
            if not f.closed:
                f.seek(0)
                text += f.read().decode("utf-8", errors="replace") + "\n"  # native stderr need not be UTF-8
        return text

    def _close_logs(self) -> None:
        for f in self._logs:
            f.close()


def cores_beside_runs() -> int:
    """Threads this process may give torch: the cores the onnx2tf runs and workers still running leave, at most
    torch's own count (``OMP_NUM_THREADS``, the physical cores or what the caller set).

    Measured on 2 cores beside one busy process: GPTQ's Gram pass took 15.0 s with
    2 torch threads, 7.7 s with 1 (torch's waiting threads spin).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - sum(run.proc.poll() is None for run in list(_LIVE))))


def _run(cmd: list[str], cwd: Path, what: str, timeout: float = WORKER_TIMEOUT_S) -> None:
    _Started(cmd, cwd, what, timeout).wait()


def start_worker(command: str, args: dict, build_dir: Path, timeout: float = WORKER_TIMEOUT_S) -> _Started:
    """Start one ``converters.litert_worker`` command in a fresh Python process, in ``build_dir``.

    Paths in ``args`` must be absolute: the worker's working folder is ``build_dir``."""
    build_dir = build_dir.resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    arg_file = build_dir / f"{command}-{time.monotonic_ns()}.json"
    arg_file.write_text(json.dumps(args))
    return _Started([sys.executable, "-c", _DIE_WITH_PARENT + "from converters.litert_worker import main; "
                     "main(sys.argv[1:])", command, str(arg_file)], build_dir,
                    f"LiteRT {command}", timeout)


def worker(command: str, args: dict, build_dir: Path, timeout: float = WORKER_TIMEOUT_S) -> None:
    """Run one ``converters.litert_worker`` command in a fresh Python process."""
    start_worker(command, args, build_dir, timeout).wait()


def histogram_shards(calibrated: Path, calib_npy: Path, build_dir: Path, workers: int) -> list[str]:
    """Activation histograms of a calibrated model, the calibration images shared among ``workers`` processes.

    The shards' counts add up exactly to one pass's, so the ranges (and the
    files) do not depend on ``workers``; on 2 cores two workers take about half
    the time of one (the interpreter runs reference kernels to keep every tensor).
    """
    runs: list[_Started] = []
    outs = [str(build_dir / f"hist-{i}-of-{workers}.npy") for i in range(workers)]
    try:
        for i, out in enumerate(outs):
            runs.append(start_worker("histograms", {"calibrated": str(calibrated), "calib": str(calib_npy),
                                                    "start": i, "step": workers, "out": out}, build_dir))
        while runs:
            runs[0].wait()
            runs.pop(0)
    finally:
        for run in runs:  # those not waited for: one failed (or we were interrupted), the rest must not run on
            run.kill()
    return outs


def litert_logits(model: Path, images_nhwc: np.ndarray, build_dir: Path, threads: int | None = None) -> np.ndarray:
    """Logits of a .tflite on normalized NHWC images, computed in a subprocess.

    ``threads`` defaults to 2, fewer beside running subprocesses (the checks run beside
    calibration and onnx2tf). XNNPACK's results do not depend on the count: every file
    of an xxs conversion gave bitwise-equal logits with 1 and 2 threads (a test checks it).
    """
    if threads is None:
        threads = min(2, cores_beside_runs())
    digest = hashlib.sha256(np.ascontiguousarray(images_nhwc).tobytes()).hexdigest()[:16]
    images = build_dir / f"images-{digest}.npy"
    if not images.exists():  # reused by every file checked on these images; an interrupted save must not be
        part = build_dir / f".images-{digest}-{os.getpid()}.npy"
        np.save(part, images_nhwc)
        os.replace(part, images)
    out = build_dir / f"logits-{model.stem}-{digest}.npy"
    worker("run", {"model": str(model.resolve()), "images": str(images.resolve()), "out": str(out.resolve()),
                   "threads": threads}, build_dir)
    return np.load(out)


def time_tflite(models: list[Path], build_dir: Path, threads: int = 2, rounds: int = 5, runs: int = 20,
                warmup: int = 3, warmup_secs: float = 0.0) -> dict[Path, list[float]]:
    """Latency samples (ms) of each model, timed in interleaved rounds in one LiteRT worker.

    Each model is first run ``warmup`` times and for at least ``warmup_secs`` seconds."""
    out = build_dir / f"bench-{time.monotonic_ns()}.json"
    worker("bench", {"models": [str(m.resolve()) for m in models], "threads": threads, "rounds": rounds, "runs": runs,
                     "warmup": warmup, "warmup_secs": warmup_secs, "out": str(out.resolve())}, build_dir)
    samples = json.loads(out.read_text())
    return {m: samples[str(m.resolve())] for m in models}


def inspect_tflite(model: Path, build_dir: Path | None = None) -> dict:
    """Op histogram, float ops, ops outside the XNNPACK delegate, I/O quantization."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(build_dir or tmp).resolve()
        out = d / f"inspect-{model.stem}.json"
        worker("inspect", {"model": str(Path(model).resolve()), "out": str(out)}, d)
        return json.loads(out.read_text())


def _sample_npy(ctx: ConvertContext, path: Path) -> None:
    """The 20x128x128x3 [0,1] file onnx2tf looks for, made from our own images."""
    pixels = ctx.split.calib.pixels if len(ctx.split.calib) else ctx.split.eval.pixels
    imgs = [np.asarray(Image.fromarray(p).resize((128, 128), Image.Resampling.BILINEAR)) for p in pixels[:20]]
    while len(imgs) < 20:
        imgs.append(imgs[len(imgs) % max(len(imgs), 1)])
    np.save(path, (np.stack(imgs).astype(np.float32) / 255.0))


def tflite_deploy(ctx: ConvertContext, norm_impl: str) -> EfficientModDeploy:
    """The deploy form the TFLite files are made from (split depthwise, ``norm_impl`` LayerNorm)."""
    return to_deploy(ctx.loaded.model, ctx.input_size, norm_impl=norm_impl, dw_impl="split")


# onnx2tf would run the onnxsim command three times, each in a new process (about 10 s per run for xxs); one
# onnxsim pass in onnx2tf's own process gives the same .tflite files (measured on every variant and both
# LayerNorm forms). Without onnxsim, onnx2tf gave xxs 3 CUSTOM ops in place of the attention's 9 STRIDED_SLICE.
# A failing onnxsim fails the run (onnx2tf would warn and go on, to a graph with those CUSTOM ops).
_SIMPLIFY_THEN_ONNX2TF = (
    "import sys, onnx, onnxsim\n"
    "src = sys.argv[sys.argv.index('-i') + 1]\n"
    "onnx.save(onnxsim.simplify(onnx.load(src))[0], src)\n"
    "from onnx2tf.onnx2tf import main; main()\n"
)


class SavedModelRun:
    """One onnx2tf run (deploy form -> ONNX -> saved_model with float32/float16 .tflite), started in the background.

    The conversion starts every run it needs early, so the onnx2tf processes
    (about 30 s each for xxs, mostly on one core) overlap each other and the torch work.
    """

    def __init__(self, ctx: ConvertContext, build_dir: Path, norm_impl: str = "conv", deploy: nn.Module | None = None):
        build_dir.mkdir(parents=True, exist_ok=True)
        if deploy is None:
            deploy = tflite_deploy(ctx, norm_impl)
        with torch_threads(cores_beside_runs()):  # the runs started before this one are converting
            onnx_path = export_onnx(deploy, build_dir / "model.onnx", ctx.input_size, opset=ONNX_OPSET)
        _sample_npy(ctx, build_dir / SAMPLE_NPY)
        log.info("tflite: onnx2tf started (%s)", build_dir.name)
        self.saved = build_dir / "saved_model"
        self._proc: _Started | None = _Started(
            [sys.executable, "-c", _DIE_WITH_PARENT + _SIMPLIFY_THEN_ONNX2TF,
             "-i", str(onnx_path), "-o", str(self.saved), "-n", "-nuo"], build_dir, "onnx2tf")
        self._error: ConversionError | None = None

    def result(self) -> Path:
        """Wait for the run (once); the saved_model folder, or the run's error again on every call."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
            try:
                proc.wait()
                if not (self.saved / "model_float32.tflite").is_file():
                    raise ConversionError(f"onnx2tf wrote no model_float32.tflite in {self.saved}")
            except ConversionError as exc:
                self._error = exc
            except Exception as exc:  # any failure is this run's, and no later precision may use its folder
                self._error = ConversionError(f"onnx2tf: {type(exc).__name__}: {exc}")
        if self._error is not None:
            raise self._error
        return self.saved

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()


def _io_specs(model_info: dict, input_size: int) -> tuple[TensorSpec, TensorSpec]:
    def spec(d: dict, layout: str, shape: list, norm: bool) -> TensorSpec:
        q = d["quantization"] if d["dtype"] in ("int8", "uint8") else None
        return TensorSpec(d["name"], layout, d["dtype"], shape, list(MEAN) if norm else None,
                          list(STD) if norm else None, q, "app" if norm else None)

    return (
        spec(model_info["input"], "NHWC", [1, input_size, input_size, 3], True),
        spec(model_info["output"], "NC", [1, model_info["output"]["shape"][-1]], False),
    )


def _sidecar(path: Path, inp: TensorSpec, out: TensorSpec, precision: str, labels: str) -> str:
    """The metadata file an app reads beside the .tflite (labels, normalization, I/O)."""
    side = path.with_name(path.name + ".json")
    side.write_text(json.dumps({
        "model": path.name, "precision": precision, "labels": labels,
        "io": "int8" if inp.dtype == "int8" else "float32",  # int8 and its _int8_io file share a precision
        "input": {"name": inp.name, "layout": inp.layout, "dtype": inp.dtype, "shape": inp.shape,
                  "mean": inp.mean, "std": inp.std, "normalization": inp.normalization,
                  "quantization": inp.quantization,
                  "preprocessing": "RGB, shorter side to 256 (bicubic), center crop 224, /255, (x-mean)/std"},
        "output": {"name": out.name, "dtype": out.dtype, "shape": out.shape, "quantization": out.quantization,
                   "meaning": f"logits over the {out.shape[-1]} classes in labels order"},
    }, indent=1))
    return side.name


class _Builder:
    """Per-conversion state: where files go and how each one is checked."""

    def __init__(self, ctx: ConvertContext, build: Path):
        self.ctx, self.build = ctx, build
        build.mkdir(parents=True, exist_ok=True)
        self._runs: dict[tuple[str, bool], SavedModelRun] = {}
        self.eval_nhwc = ctx.split.eval.nhwc()
        self.calib_npy = build / "calib.npy"
        self._calibrated: Path | None = None
        self._calibration: _Started | None = None
        self._calibration_error: Exception | None = None
        opts = validate_options(ctx.options)
        self.ranges = opts["tflite_ranges"]
        self.mixed_priority = opts["tflite_mixed_priority"]
        self.mixed_max_size = opts["tflite_mixed_max_size"]
        self.rounding = opts["tflite_weight_rounding"]
        self.ranges_summary: dict = {}
        self.rounding_summary: dict[str, dict] = {}
        self._gptq: tuple[dict[str, torch.Tensor], dict[str, RoundingReport]] | None = None
        self._quantized: dict[str, _Quantizing] = {}  # quantizer arguments -> the run started with them
        if len(ctx.split.calib):
            np.save(self.calib_npy, ctx.split.calib.nhwc())

    def start(self, norm_impl: str, rounded: bool = False) -> None:
        """Start the onnx2tf run of one LayerNorm form, unless it was started before.

        Float files use ``reduce`` (MEAN ops: measured faster in float, e.g. s
        19.6 vs 21.4 ms at 2 threads); int8 files use ``conv`` (1x1-conv
        statistics stay in XNNPACK's int8 kernels). ``rounded`` builds it from
        the GPTQ-rounded deploy form (see :meth:`_gptq_deploy`).
        """
        key = (norm_impl, rounded)
        if key not in self._runs:
            deploy = self._gptq_deploy(norm_impl) if rounded else None
            folder = self.build / (norm_impl + ("-gptq" if rounded else ""))
            self._runs[key] = SavedModelRun(self.ctx, folder, norm_impl, deploy)

    def saved(self, norm_impl: str, rounded: bool = False) -> Path:
        """The onnx2tf saved model of one LayerNorm form (started on first use, awaited here)."""
        self.start(norm_impl, rounded)
        return self._runs[(norm_impl, rounded)].result()

    def dynamic_rounded(self) -> bool:
        return self.rounding == "gptq" and len(self.ctx.split.calib) > 0

    def prefetch(self, precisions: list[str]) -> None:
        """Start every onnx2tf run ``precisions`` need (unrounded forms first), then calibration.

        Best effort: a form that cannot start here is started again by the
        precision that needs it, which then fails with the error, alone.
        """
        int8 = bool({"int8", "int8-mixed"} & set(precisions)) and self.calib_npy.exists()
        keys = []
        if {"fp32", "fp16", "dynamic"} & set(precisions):  # dynamic: its GPTQ levels go into this form's file
            keys.append((FLOAT_NORM, False))
        if int8:
            keys.append((INT8_NORM, self.rounding == "gptq"))
        for key in sorted(set(keys), key=lambda k: (k[1], k[0])):
            try:
                self.start(*key)
            except Exception as exc:  # reported by the precision that needs this form
                log.debug("tflite: could not start onnx2tf for %s early: %s", key, exc)
        if "dynamic" in precisions and self.dynamic_rounded() and not int8:  # else GPTQ ran for the int8 form
            try:  # beside the float form's onnx2tf run
                self._gptq_int8()
            except Exception as exc:  # reported by the dynamic precision
                log.debug("tflite: could not round the weights early: %s", exc)
        if int8:
            try:  # waits for the int8 form's onnx2tf run; calibration then runs beside the float files' steps
                self.start_calibration()
            except Exception as exc:
                log.debug("tflite: could not start calibration early: %s", exc)

    def close(self) -> None:
        """Stop onnx2tf runs and workers still going (a precision list that ended early, or an interrupt)."""
        for run in self._runs.values():
            run.kill()
        if self._calibration is not None:
            self._calibration.kill()
        stop_all_runs()

    def int8_saved(self) -> Path:
        """The saved model the full-integer files are quantized from."""
        return self.saved(INT8_NORM, rounded=self.rounding == "gptq")

    def _gptq_deploy(self, norm_impl: str) -> nn.Module:
        """The deploy form with GPTQ-rounded weights (``calibration.gptq``).

        The full-integer converter quantizes every conv/linear weight; the
        dynamic-range one only those of >= ``DYNAMIC_MIN_ELEMENTS`` elements.
        GPTQ runs once, on the int8 (``conv``) form: it weighs each layer's
        rounding with the Gram matrix of the layer's float inputs, which the two
        LayerNorm forms share (they differ only in how the statistics are
        computed), so the float form takes its layers' rounded weights from that
        run by name.
        """
        weights, reports = self._gptq_int8()
        net = tflite_deploy(self.ctx, norm_impl)
        layers, small = quantizable_layers(net, 0 if norm_impl == INT8_NORM else DYNAMIC_MIN_ELEMENTS)
        with torch.no_grad():
            for name, layer in layers:
                w = weights.get(name)
                if w is None or w.shape != layer.weight.shape:
                    raise ConversionError(f"GPTQ: layer {name} of the {norm_impl} LayerNorm form is not in the "
                                          f"{INT8_NORM} form; use --option tflite_weight_rounding=nearest")
                layer.weight.copy_(w)
        report = reports[norm_impl]
        if report.layers != len(layers):
            raise ConversionError(f"GPTQ: the {norm_impl} LayerNorm form has {len(layers)} layers to round, the "
                                  f"{INT8_NORM} form rounded {report.layers}; use --option tflite_weight_rounding=nearest")
        self.rounding_summary[norm_impl] = replace(report, skipped_small=small).as_dict()
        return net

    def _gptq_int8(self) -> tuple[dict[str, torch.Tensor], dict[str, RoundingReport]]:
        """GPTQ int8 weights of every conv/linear of the int8 deploy form (run once), and the reports per form."""
        if self._gptq is None:
            calib = self.ctx.split.calib
            if len(calib) == 0:
                raise ConversionError("GPTQ weight rounding needs calibration images: use --calib-size > 0")
            images = calib.nchw()[:GPTQ_IMAGES]
            log.info("tflite: GPTQ weight rounding on %d calibration images", len(images))
            with torch_threads(cores_beside_runs()):  # onnx2tf runs started before (float forms) convert meanwhile
                rounder = LayerRounder(tflite_deploy(self.ctx, INT8_NORM), images)
                weights = {name: rounder.int8(name) for name in rounder.layers}
            big = [name for name, layer in rounder.layers.items() if layer.weight.numel() >= DYNAMIC_MIN_ELEMENTS]
            self._gptq = weights, {INT8_NORM: rounder.report("int8"), FLOAT_NORM: rounder.report("int8", big)}
        return self._gptq

    def dynamic(self, out: Path) -> tuple[Path, dict]:
        """Dynamic-range int8 (int8 weights, float activations) and how its weights were rounded.

        With GPTQ rounding, the converter quantizes the float files' own saved
        model and the GPTQ levels replace its nearest ones (``swap_weight_levels``):
        the same file as converting a GPTQ-rounded copy, without a third onnx2tf
        run. Should the file's weights not pair with the layers, that run is made.
        """
        rounded = self.dynamic_rounded()
        if self.rounding == "gptq" and not rounded:
            log.warning("tflite dynamic: no calibration images, so nearest weight rounding instead of GPTQ "
                        "(use --calib-size > 0)")
        if not rounded:
            worker("convert", {"saved_model": str(self.saved(FLOAT_NORM)), "mode": "dynamic", "out": str(out)},
                   self.build)
            return out, {"weight_rounding": NEAREST}
        levels = self.build / "dynamic_levels.npz"
        np.savez(levels, **self._dynamic_levels())
        report = Path(f"{out}.levels.json")
        run = start_worker("convert", {"saved_model": str(self.saved(FLOAT_NORM)), "mode": "dynamic",
                                       "out": str(out), "levels": str(levels)}, self.build)
        try:
            run.wait()
            how = {"method": "written into the float files' converted model",
                   "weights": json.loads(report.read_text())["swapped"]}
        except ConversionError:
            if run.proc.returncode != LEVELS_MISMATCH_EXIT:  # the worker failed otherwise: the precision's error
                raise
            mismatch = json.loads(report.read_text())["error"]
            log.warning("tflite dynamic: the GPTQ levels do not pair with the converted weights (%s); converting a "
                        "GPTQ-rounded copy of the model instead", mismatch)
            worker("convert", {"saved_model": str(self.saved(FLOAT_NORM, rounded=True)), "mode": "dynamic",
                               "out": str(out)}, self.build)
            how = {"method": "converted from a GPTQ-rounded copy of the model", "reason": mismatch}
        finally:
            report.unlink(missing_ok=True)
        return out, {"weight_rounding": self.rounding_summary[FLOAT_NORM], "weight_levels": how}

    def _dynamic_levels(self) -> dict[str, np.ndarray]:
        """Per layer the dynamic-range converter quantizes: its nearest int8 levels and scales, and its GPTQ ones.

        The scales differ where the float form's layer is not the int8 form's: the
        patch embeddings' convs are centered in the int8 form only, and the float
        form takes their centered GPTQ weights (its LayerNorm removes the mean anyway).
        """
        rounded = self._gptq_deploy(FLOAT_NORM)
        original = dict(quantizable_layers(tflite_deploy(self.ctx, FLOAT_NORM), DYNAMIC_MIN_ELEMENTS)[0])
        out = {}
        for j, (name, layer) in enumerate(quantizable_layers(rounded, DYNAMIC_MIN_ELEMENTS)[0]):
            out[f"nearest{j}"], out[f"nearest_scale{j}"] = int8_levels(original[name].weight)
            out[f"levels{j}"], out[f"scale{j}"] = int8_levels(layer.weight)
        return out

    def int8_rounding(self) -> dict:
        return self.rounding_summary.get(INT8_NORM, NEAREST)

    def start_calibration(self) -> None:
        """Start the converter's calibration pass in the background, once the int8 saved model is there."""
        if self._calibration is None and self._calibrated is None:
            saved = self.int8_saved()
            log.info("tflite: calibrating on %d images", len(self.ctx.split.calib))
            self._calibration = start_worker("convert", {"saved_model": str(saved), "mode": "calibrate",
                                                         "out": str(self.build / "calibrated.tflite"),
                                                         "calib": str(self.calib_npy)}, self.build)

    def calibrated(self) -> Path:
        """The float model with activation ranges from the calibration images (once).

        The converter records each tensor's min/max; with ``tflite_ranges="mse"``
        (default) they are then narrowed to the MSE-optimal int8 range.
        """
        if self._calibration_error is not None:  # int8 and int8-mixed share one calibration: it fails once
            raise self._calibration_error
        if self._calibrated is None:
            if not self.calib_npy.exists():
                raise ConversionError("int8 needs calibration images: use --calib-size > 0")
            try:
                self._calibrated = self._calibrate()
            except Exception as exc:  # also a failed histogram or range pass: int8-mixed must not redo it all
                self._calibration_error = exc
                raise
        return self._calibrated

    def _calibrate(self) -> Path:
        self.start_calibration()
        run, self._calibration = self._calibration, None
        run.wait()
        out = self.build / "calibrated.tflite"
        refined, summary = self.build / "calibrated_ranges.tflite", self.build / "ranges.json"
        log.info("tflite: %s activation ranges", "MSE-optimal" if self.ranges == "mse" else "min/max")
        shards = (histogram_shards(out, self.calib_npy, self.build, min(HISTOGRAM_WORKERS, os.cpu_count() or 1))
                  if self.ranges == "mse" else None)
        worker("refine_ranges", {"calibrated": str(out), "calib": str(self.calib_npy), "method": self.ranges,
                                 "histograms": shards, "out": str(refined), "summary": str(summary)}, self.build)
        self.ranges_summary = json.loads(summary.read_text())
        return refined

    def start_quantize(self, out: Path, int8_io: bool = False, denylist: dict | None = None) -> "_Quantizing":
        """Start quantizing the calibrated model into ``out`` (awaited by the returned handle's ``wait``).

        The quantizer is deterministic: arguments it was started with before give
        that run's file, copied (int8-mixed's full-integer reference is the int8
        file), or that run's error.
        """
        calibrated = self.calibrated()
        key = json.dumps({"int8_io": int8_io, "denylist": denylist or {}}, sort_keys=True)
        earlier = self._quantized.get(key)
        if earlier is not None and earlier.reusable():
            return _Quantizing(out, None, earlier)
        run = self._quantized[key] = _Quantizing(out, start_worker("quantize", {
            "calibrated": str(calibrated), "out": str(out), "int8_io": int8_io, "denylist": denylist or {}},
            self.build))
        return run

    def quantize(self, out: Path, int8_io: bool = False, denylist: dict | None = None) -> Path:
        return self.start_quantize(out, int8_io, denylist).wait()

    def result(self, precision: str, path: Path, details: dict | None = None) -> ArtifactResult:
        info = inspect_tflite(path, self.build)
        inp, out = _io_specs(info, self.ctx.input_size)
        logits = litert_logits(path, self.eval_nhwc, self.build)
        side = _sidecar(path, inp, out, precision, "labels.txt")
        det = {
            "ops": info["ops"], "total_ops": info["total_ops"], "float_ops": info["float_ops"],
            "not_delegated": info["not_delegated"], "sidecar": side, "onnx_opset": ONNX_OPSET,
            "io": "int8" if inp.dtype == "int8" else "float32", **(details or {}),
        }
        return ArtifactResult(precision, path.name, inp, out, logits, det, extra_files=[side])


class _Quantizing:
    """A quantizer run of :meth:`_Builder.start_quantize`, or a copy of an earlier run's file."""

    def __init__(self, out: Path, run: _Started | None, source: "_Quantizing | None" = None):
        self.out, self.run, self.source = out, run, source
        self._done, self._killed, self._error = False, False, None

    def wait(self) -> Path:
        """``out`` once the run (or the earlier one) is done; its error, again on every call, if it failed."""
        if self._error is not None:
            raise self._error
        if not self._done:
            try:
                if self.run is not None:
                    self.run.wait()
                elif self.source is not None and self.source.wait() != self.out:
                    shutil.copyfile(self.source.out, self.out)
            except Exception as exc:
                self._error = exc
                raise
            self._done = True
        return self.out

    def reusable(self) -> bool:
        """Not killed, and if it failed, the quantizer refused (exit code > 0): a timeout or a signal (out of
        memory beside another run) need not happen again."""
        if self._killed:
            return False
        if self._error is None:
            return True
        rc = self.run.proc.returncode if self.run is not None else None
        return rc is not None and rc > 0

    def kill(self) -> None:
        self._killed = True
        if self.run is not None:
            self.run.kill()


def search_steps(steps: Iterable[MixedStep], evaluate: Callable[[MixedStep], dict],
                 priority: str = "accuracy") -> tuple[int, list[dict]]:
    """Walk ``steps`` (each keeps more in float, so is slower and bigger); return the chosen step's index among
    those evaluated (the record's order) and the record.

    ``evaluate(step)`` measures a step on calibration images (``top1_agreement``,
    ``sqnr_db``, ``bytes``). A step meets the target if it meets the int8 bar
    with ``SEARCH_SQNR_MARGIN_DB`` of SQNR to spare: the activation ranges were
    fit to those images, and the distilled students' held-out images read
    0.2-0.8 dB lower. The walk stops at the first step that meets the
    target, or when a kept-nodes step gains less than ``MIN_STEP_GAIN_DB`` over
    the step before it (the ranking has stopped paying). A step is
    chosen over the best earlier one only if it meets the target or gains at
    least ``MIN_GAIN_DB``. With ``priority="speed"`` the walk stops at the first
    (fastest) step whose SQNR meets the int8 SQNR bar (and margin), whatever its agreement.
    """
    tried: list[dict] = []
    best = None
    sqnr_target = sqnr_target_db()
    for i, step in enumerate(steps):
        m = evaluate(step)
        ok = not evaluate_threshold(m, MIXED_BAR) and bool(m["sqnr_db"] >= sqnr_target)  # a NumPy bool fails the manifest
        tried.append({"layernorm_stats_float": step.layernorm_stats, "adds_float": step.adds,
                      "kept_nodes": step.kept_nodes, "calib_agreement": m["top1_agreement"],
                      "calib_sqnr_db": m["sqnr_db"], "bytes": m["bytes"], "meets_target": ok})
        if priority == "speed" and m["sqnr_db"] >= sqnr_target:
            tried[-1]["ended_search"] = (f"fastest step meeting the {MIXED_BAR.min_sqnr_db} dB SQNR bar with "
                                         f"{SEARCH_SQNR_MARGIN_DB} dB to spare (priority speed)")
            return i, tried
        if best is None or ok or m["sqnr_db"] >= tried[best]["calib_sqnr_db"] + MIN_GAIN_DB:
            best = i
        if ok:
            break
        if step.kept_nodes > 0 and i > 0 and m["sqnr_db"] < tried[i - 1]["calib_sqnr_db"] + MIN_STEP_GAIN_DB:
            tried[-1]["ended_search"] = f"gained < {MIN_STEP_GAIN_DB} dB over the step before"
            break
    if best is None:
        raise ConversionError("int8-mixed: no search step to try")
    return best, tried


def sqnr_target_db() -> float:
    """The SQNR a search step must reach on the calibration images: the int8 bar plus the margin."""
    return (MIXED_BAR.min_sqnr_db or 0.0) + SEARCH_SQNR_MARGIN_DB


def mixed_steps(available: Callable[[MixedStep], int]) -> Iterator[MixedStep]:
    """:data:`MIXED_STEPS` as the search walks them: a kept-convs step keeps at most ``available(step)`` convs,
    and is left out unless it keeps more than the step before (the size budget may leave fewer candidates
    than a step asks for). Lazy: ``available`` is first called once the steps before are measured."""
    done = 0
    for step in MIXED_STEPS:
        if step.kept_nodes:
            n = min(step.kept_nodes, available(step))
            if n <= done:
                continue
            step, done = replace(step, kept_nodes=n), n
        yield step


def _search_latency(b: _Builder, files: list[Path], tried: list[dict]) -> dict:
    """Time the tried steps' files side by side; adds ``latency_ms`` and ``latency_vs_first_step`` to ``tried``.

    A record of what each step's float ops cost, not a term of the choice: the
    choice must not depend on how busy the machine was during the conversion.
    """
    threads = min(SEARCH_BENCH_THREADS, os.cpu_count() or 1)
    try:
        samples = time_tflite(files, b.build, threads=threads, rounds=SEARCH_BENCH_ROUNDS, runs=SEARCH_BENCH_RUNS,
                              warmup_secs=WARMUP_SECS)
    except Exception as exc:  # the files already ran for the checks; a failed timing loses only the record
        log.warning("tflite int8-mixed: timing the search steps failed: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    first = float(np.median(samples[files[0]]))
    for t, f in zip(tried, files):
        ms = float(np.median(samples[f]))
        t["latency_ms"], t["latency_vs_first_step"] = round(ms, 3), round(ms / first, 3)
    log.info("tflite int8-mixed: step latencies (%d threads) %s ms", threads,
             ", ".join(f"{t['latency_ms']:.2f}" for t in tried))
    return {"threads": threads, "rounds": SEARCH_BENCH_ROUNDS, "runs_per_round": SEARCH_BENCH_RUNS,
            "warmup_secs": WARMUP_SECS, "runtime": "litert-xnnpack", "statistic": "median"}


def mixed_candidates(ranked: list[dict], step: MixedStep, budget: int | None = None) -> list[dict]:
    """The sensitive ops (most error-adding first) a step can add: those its LayerNorm and ADD settings
    do not already keep float, so a step of N kept nodes has N more float ops; with a ``budget``, only
    those whose float weights (``extra_bytes``, 0 if unknown) still fit in it."""
    rows = [r for r in ranked if not (step.layernorm_stats and r.get("layernorm_stat"))
            and not (step.adds and r["op"] == "ADD")]
    return rows if budget is None else _within(rows, budget)


def _conv_noise(b: _Builder, full: Path, step_model: Path) -> tuple[list[dict], dict]:
    """The int8 file's convs ranked by logit noise per extra float byte (:mod:`converters.tflite_noise`)."""
    from converters.tflite_noise import rank_convs

    rows_path, weights_path = b.build / "conv_ops.json", b.build / "conv_weights.npz"
    worker("conv_ops", {"quant_model": str(full), "calibrated": str(b.calibrated()), "step_model": str(step_model),
                        "out": str(rows_path), "weights": str(weights_path)}, b.build)
    ops = json.loads(rows_path.read_text())
    with np.load(weights_path) as z:
        weights = [z[str(k)] for k in range(len(ops))]
    net = b._gptq_deploy(INT8_NORM) if b.rounding == "gptq" else tflite_deploy(b.ctx, INT8_NORM)
    images = b.ctx.split.calib.nchw()[:NOISE_RANK_IMAGES]
    log.info("tflite int8-mixed: ranking %d convs by logit noise on %d calibration images", len(ops), len(images))
    ranked, summary = rank_convs(net, ops, weights, images)
    return [c.as_dict() for c in ranked], summary


def _within(rows: list[dict], budget: int) -> list[dict]:
    """``rows`` in order, each one taken if its float weights still fit in what is left of ``budget`` bytes
    (a file already over budget still takes the rows that cost nothing)."""
    out, used, budget = [], 0, max(budget, 0)
    for r in rows:
        if used + r.get("extra_bytes", 0) <= budget:
            out.append(r)
            used += r.get("extra_bytes", 0)
    return out


def fill_budget(ranked: list[dict], budget: int) -> tuple[list[dict], str]:
    """The convs to offer the kept-convs steps, in the order they are taken, and which order won.

    Filling the budget in order of noise per byte can pass over one wide conv
    that carries more noise than all the small ones taken (on distilled s the
    classifier head: 28 % of the noise, 0.9 MB float); filling it in order of
    noise takes that one first. Whichever fill removes more of the noise is
    kept (the usual greedy for a knapsack), compared on the most convs a step keeps.
    """
    by_byte = _within(ranked, budget)
    by_noise = _within(sorted(ranked, key=lambda r: -r["noise_share"]), budget)
    most = max(s.kept_nodes for s in MIXED_STEPS)  # the steps take at most this many: compare what they can take
    if sum(r["noise_share"] for r in by_noise[:most]) > sum(r["noise_share"] for r in by_byte[:most]):
        return by_noise, "noise"
    return by_byte, "noise per extra byte"


def _step_float_ops(step: MixedStep) -> list[str]:
    """The op types a search step keeps float."""
    return list(RUNTIME_FLOAT_OPS) + (["ADD"] if step.adds else [])


def _step_denylist(step: MixedStep, nodes: list[str]) -> dict:
    """What a search step keeps float: op types, LayerNorm statistics, and the named convs ``nodes``."""
    return {"ops": _step_float_ops(step), "nodes": nodes, "layernorm_stats": step.layernorm_stats}


def _step_file(step: MixedStep) -> str:
    return f"mixed_{int(step.layernorm_stats)}{int(step.adds)}_{step.kept_nodes}.tflite"


def _mixed(b: _Builder, stem: str) -> ArtifactResult:
    """int8 with float islands: runtime-unsupported op types, then the convs of most logit noise per byte."""
    ctx = b.ctx
    full = b.quantize(b.build / "full_int8.tflite")
    # the first step keeps no convs, so it needs no ranking: it is quantized beside the sensitivity pass
    first = b.start_quantize(b.build / _step_file(MIXED_STEPS[0]), denylist=_step_denylist(MIXED_STEPS[0], []))
    sens_path = b.build / "sensitivity.json"
    sens: _Started | None = None
    try:
        sens = start_worker("sensitivity", {"float_model": str(b.calibrated()), "quant_model": str(full),
                                            "calib": str(b.calib_npy), "out": str(sens_path),
                                            "debug_limit": min(8, len(ctx.split.calib))}, b.build)
        calib_imgs = np.load(b.calib_npy)
        with torch_threads(cores_beside_runs()):
            ref = torch_logits(ctx.loaded.model, np.ascontiguousarray(calib_imgs.transpose(0, 3, 1, 2)))
    except BaseException:
        if sens is not None:
            sens.kill()
        first.kill()
        raise
    try:
        sens.wait()  # reaps or kills it, whatever happens: not killed again here
    except BaseException:
        first.kill()
        raise
    sensitivity = json.loads(sens_path.read_text())
    ranked = [r for r in sensitivity if r["op"] not in RUNTIME_FLOAT_OPS and r["drop_db"] > 0]
    float_bytes = (b.int8_saved() / "model_float32.tflite").stat().st_size
    paths: dict[MixedStep, Path] = {}
    evaluated: list[MixedStep] = []
    noise: dict[str, object] = {}

    def budget() -> int:
        """Bytes the kept convs' float weights may add to the file keeping LayerNorm statistics and ADDs float."""
        base = paths.get(MixedStep(True, True, 0))
        if base is None:
            raise ConversionError("the step keeping LayerNorm statistics and ADDs float was not built")
        return int(b.mixed_max_size * float_bytes) - base.stat().st_size

    def conv_ranking() -> list[dict] | None:
        """Computed once, on the file that keeps LayerNorm statistics and ADDs float; None: use the local one."""
        if "rows" not in noise:
            try:
                room = budget()
                rows, noise["summary"] = _conv_noise(b, full, paths[MixedStep(True, True, 0)])
                noise["rows"], order = fill_budget(rows, room)
                noise["summary"].update(size_budget_bytes=room, within_budget=len(noise["rows"]), order=order,
                                        noise_share_of_last_step=round(sum(
                                            r["noise_share"] for r in noise["rows"][:MIXED_STEPS[-1].kept_nodes]), 4))
            except Exception as exc:  # the local ranking still serves; the manifest says why
                log.warning("tflite int8-mixed: logit-noise ranking failed (%s); using the per-op sensitivity", exc)
                noise["rows"], noise["summary"] = None, {"error": f"{type(exc).__name__}: {exc}",
                                                         "fallback": "per-op sensitivity (drop_db)"}
        return noise["rows"]  # type: ignore[return-value]

    def candidates(step: MixedStep) -> list[dict]:
        rows = conv_ranking() if step.kept_nodes and step.layernorm_stats and step.adds else None
        if rows is not None:
            return rows
        room = budget() if step.kept_nodes and MixedStep(True, True, 0) in paths else None
        return mixed_candidates(ranked, step, room)  # the fallback keeps to the size budget too

    def evaluate(step: MixedStep) -> dict:
        nodes = [r["tensor"] for r in candidates(step)[: step.kept_nodes]] if step.kept_nodes else []
        deny = _step_denylist(step, nodes)
        path = paths[step] = b.quantize(b.build / _step_file(step), denylist=deny)
        evaluated.append(step)
        m = compare_logits(ref, litert_logits(path, calib_imgs, b.build))
        log.info("tflite int8-mixed: LayerNorm stats %s, ADDs %s, %d more ops in float -> calib agreement "
                 "%.1f%%, SQNR %.1f dB", "float" if step.layernorm_stats else "int8",
                 "float" if step.adds else "int8", len(deny["nodes"]), 100 * m["top1_agreement"], m["sqnr_db"])
        return {**m, "bytes": path.stat().st_size}

    chosen, tried = search_steps(mixed_steps(lambda step: len(candidates(step))), evaluate, b.mixed_priority)
    best = evaluated[chosen]
    latency = _search_latency(b, [paths[s] for s in evaluated], tried)
    final = ctx.work_dir / f"{stem}_int8_mixed.tflite"
    shutil.copyfile(paths[best], final)
    details = {
        "kept_float_op_types": _step_float_ops(best),
        "kept_float_op_types_reason": "GELU, RSQRT, SOFTMAX, BATCH_MATMUL: no int8 kernel inside XNNPACK "
                                      "(measured): int8 versions fall back to reference kernels and split the "
                                      "delegate"
                                      + ("; ADD: chosen by the search (per-tensor int8 on the residual stream "
                                         "costs accuracy, see search)" if best.adds else ""),
        "layernorm_stats_float": best.layernorm_stats,
        "adds_float": best.adds,
        "kept_float_nodes": candidates(best)[: best.kept_nodes],
        "kept_float_nodes_ranking": noise.get("summary", "not needed: the search ended before the kept-nodes steps"),
        "target_met_on_calibration": tried[chosen]["meets_target"],
        "search_target": {"min_agreement": MIXED_BAR.min_agreement, "min_sqnr_db": sqnr_target_db(),
                          "sqnr_margin_db": SEARCH_SQNR_MARGIN_DB, "on": "calibration images"},
        "search_priority": b.mixed_priority,
        "latency_cost_vs_first_step": (round(tried[chosen]["latency_vs_first_step"] - 1, 3)
                                       if "latency_vs_first_step" in tried[chosen] else None),
        "search_latency": latency,
        "activation_ranges": b.ranges_summary,
        "weight_rounding": b.int8_rounding(),
        "search": tried,
        "sensitivity": sensitivity,
    }
    return b.result("int8-mixed", final, details)


def convert(ctx: ConvertContext, precisions: list[str]) -> list[ArtifactResult | PrecisionFailure]:
    """Build and check every requested TFLite precision; one failure spares the others."""
    build = ctx.work_dir / ".tflite-build"
    b = _Builder(ctx, build)
    stem = ctx.stem
    out: list[ArtifactResult | PrecisionFailure] = []

    def attempt(precision: str, fn) -> None:
        start = time.perf_counter()
        try:
            res = fn()
            for r in res if isinstance(res, list) else [res]:
                if isinstance(r, ArtifactResult):
                    r.details["convert_seconds"] = round(time.perf_counter() - start, 1)
                out.append(r)
        except Exception as exc:  # a crash of one precision is recorded, the rest go on
            log.error("tflite %s failed: %s", precision, exc)
            out.append(PrecisionFailure(precision, f"{type(exc).__name__}: {exc}", round(time.perf_counter() - start, 2)))

    def copy(src: str, precision: str) -> ArtifactResult:
        dst = ctx.work_dir / f"{stem}_{precision}.tflite"
        shutil.copyfile(b.saved(FLOAT_NORM) / src, dst)
        return b.result(precision, dst)

    def int8() -> list[ArtifactResult | PrecisionFailure]:
        """The float-I/O file, then the int8-I/O one (both quantized at once): a failure of the second spares the first."""
        f = b.start_quantize(ctx.work_dir / f"{stem}_int8.tflite")  # calibrates first: ranges_summary is set after it
        name = f"{stem}_int8_io.tflite"
        try:
            io_file = b.start_quantize(ctx.work_dir / name, int8_io=True)
        except Exception as exc:  # did not start: its failure is recorded below, where waiting for it would raise
            io_file = exc
        try:
            ranges = {"activation_ranges": b.ranges_summary, "weight_rounding": b.int8_rounding()}
            done = [b.result("int8", f.wait(), ranges)]
        except BaseException:
            if isinstance(io_file, _Quantizing):
                io_file.kill()
            raise
        start = time.perf_counter()  # a failure's seconds: its own wait and check, not the float-I/O file's
        try:
            if isinstance(io_file, Exception):
                raise io_file
            done.append(b.result("int8", io_file.wait(), ranges))
        except Exception as exc:
            log.error("tflite int8 %s failed: %s", name, exc)
            done.append(PrecisionFailure("int8", f"{type(exc).__name__}: {exc}", round(time.perf_counter() - start, 2),
                                         name))
        return done

    steps = {
        "fp32": lambda: copy("model_float32.tflite", "fp32"),
        "fp16": lambda: copy("model_float16.tflite", "fp16"),
        "dynamic": lambda: b.result("dynamic", *b.dynamic(ctx.work_dir / f"{stem}_dynamic.tflite")),
        "int8": int8,
        "int8-mixed": lambda: _mixed(b, stem),
    }
    try:
        start = time.perf_counter()
        b.prefetch(precisions)
        shared = round(time.perf_counter() - start, 1)  # GPTQ, ONNX exports, the int8 form's onnx2tf run
        for p in precisions:
            log.info("tflite: %s", p)
            attempt(p, steps[p])
    finally:
        b.close()
    for r in out:
        if isinstance(r, ArtifactResult):
            r.details["shared_seconds"] = shared
    return out
