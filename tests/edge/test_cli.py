"""Bad input at the command line: one line naming the problem and the fix, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli import main
from edge.manifest import Manifest
from edge.pipeline import ConvertRequest, convert

TINY = "efficientmod_test_tiny"


def _run(*args: str) -> tuple[int, str]:
    """Exit code and stderr of ``effmod-edge ARGS`` (in-process)."""
    res = CliRunner().invoke(main, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stderr


def _one_line_error(rc: int, err: str, *needles: str, code: int = 2) -> None:
    """Exit ``code`` and one ``error:`` line, the last on stderr (a progress bar may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == code, f"exit code {rc}, wanted {code}; stderr: {err}"
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one final 'error:' line: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, samples_dir) -> Path:
    out = tmp_path_factory.mktemp("cli") / "out"
    convert(ConvertRequest(targets=["onnx"], model=TINY, output=out, calib_dir=str(samples_dir),
                           calib_size=4, eval_size=4))
    return out


@pytest.fixture
def copy(converted, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(converted, dst)
    return dst


@pytest.mark.parametrize("args, needle", [
    (["convert", "--target", "bogus", "-o", "x"], "'bogus' is not one of"),
    (["convert", "-o", "x"], "Missing option '--target'"),
    (["convert", "--target", "onnx", "--model", TINY, "--seed", "-1", "-o", "x"], "--seed must be between 0 and"),
    (["convert", "--target", "onnx", "--model", TINY, "--seed", str(2**64), "-o", "x"], "--seed must be between 0 and"),
    (["convert", "--target", "onnx", "--model", "", "-o", "x"], "--model is empty"),
    (["bench", "nowhere", "--threads", "a,b"], "--threads 'a,b'"),
    (["download-samples", "--url", "notaurl"], "not an http(s) or file URL"),
])
def test_usage_errors_are_one_line(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    _one_line_error(*_run(*args), needle)
    assert not (tmp_path / "x").exists(), "a rejected convert created its output folder"


def test_calibrated_precision_without_images_leaves_the_old_output_alone(copy, samples_dir):
    before = _snapshot(copy)
    _one_line_error(*_run("convert", "--target", "tflite", "--precision", "int8", "--calib-size", "0",
                          "--calib-dir", str(samples_dir), "--model", TINY, "-o", str(copy)),
                    "tflite/int8 need calibration images", "--calib-size")
    assert _snapshot(copy) == before, "the rejected convert changed the output folder"


def test_nothing_built_writes_nothing(copy, samples_dir, monkeypatch):
    """A run whose every artifact fails must not replace a good manifest with an empty one."""
    import converters.to_onnx as to_onnx

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(to_onnx, "export_onnx", broken)
    before = _snapshot(copy)
    _one_line_error(*_run("convert", "--target", "onnx", "--calib-size", "2", "--eval-size", "2",
                          "--calib-dir", str(samples_dir), "--model", TINY, "-o", str(copy)),
                    "no artifact was built", "exporter exploded", "nothing was written")
    assert _snapshot(copy) == before, "a convert that built nothing changed the output folder"


@pytest.mark.parametrize("in_the_way", ["manifest.json", f"{TINY}.onnx"])
def test_a_folder_in_the_way_is_refused_before_anything_moves(tmp_path, samples_dir, in_the_way):
    out = tmp_path / "out"
    (out / in_the_way).mkdir(parents=True)
    _one_line_error(*_run("convert", "--target", "onnx", "--calib-size", "2", "--eval-size", "2",
                          "--calib-dir", str(samples_dir), "--model", TINY, "-o", str(out)),
                    f"{in_the_way} this run writes", "choose another --output")
    assert sorted(p.name for p in out.iterdir()) == [in_the_way], f"files moved in: {list(out.iterdir())}"


def test_too_few_images_for_the_requested_split(tmp_path, samples_dir):
    few = tmp_path / "few"
    few.mkdir()
    for src in sorted(samples_dir.glob("*.JPEG"))[:10]:
        os.symlink(src, few / src.name)
    _one_line_error(*_run("convert", "--target", "onnx", "--calib-size", "8", "--eval-size", "4",
                          "--calib-dir", str(few), "--model", TINY, "-o", str(tmp_path / "out" / "a" / "b")),
                    "has 10 usable images", "lower them")
    assert not (tmp_path / "out").exists(), "a failed convert left the folders it created for --output"


@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_missing_or_changed_artifact_fails_evaluate_and_bench(copy, command):
    m = Manifest.load(copy / "manifest.json")
    (copy / m.artifacts[0].path).unlink()
    with open(copy / m.artifacts[1].path, "ab") as f:
        f.write(b"changed")
    extra = ["--runs", "1", "--warmup", "0", "--rounds", "1", "--threads", "1"] if command == "bench" else []
    rc, err = _run(command, str(copy), *extra)
    _one_line_error(rc, err, f"{command} failed for {m.artifacts[0].path}", "is missing", "and 1 more",
                    "re-run convert", code=1)
    written = json.loads((copy / f"{'evaluation' if command == 'evaluate' else 'bench'}.json").read_text())
    rows = written["rows" if command == "evaluate" else "results"]
    assert sum("error" in r for r in rows) == 2, f"{command}.json should record both broken artifacts: {rows}"


def test_report_flags_a_changed_artifact_without_a_new_evaluate(copy):
    m = Manifest.load(copy / "manifest.json")
    with open(copy / m.artifacts[0].path, "ab") as f:
        f.write(b"changed")
    rc, err = _run("report", str(copy))
    assert rc == 1, f"report passed a changed artifact: {err}"
    assert f"{m.artifacts[0].path} does not match its sha256" in err, err


def _edit_manifest(folder: Path, edit) -> None:
    d = json.loads((folder / "manifest.json").read_text())
    edit(d)
    (folder / "manifest.json").write_text(json.dumps(d))


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d["data"].update(root="/nonexistent/images"), ["image folder /nonexistent/images is gone",
                                                              "pass --data DIR"]),
    (lambda d: d["data"].pop("root"), ["data.root", "pass --data DIR"]),
    (lambda d: d["data"].update(eval_images=5), ["manifest.data.eval_images", "re-run convert"]),
    (lambda d: d["data"].update(extra=1), ["manifest.data: unknown field(s) extra", "re-run convert"]),
    (lambda d: d.update(weights="/nonexistent/ckpt.pth", weights_sha256="0" * 64),
     ["checkpoint /nonexistent/ckpt.pth is gone", "put it back"]),
    (lambda d: d.update(weights="/", weights_sha256="0" * 64), ["checkpoint / is a folder now", "put the checkpoint"]),
    (lambda d: d.update(model="efficientmod_nope"), ["unknown model 'efficientmod_nope'"]),
    (lambda d: d["tool"].update(seed="abc"), ["manifest.tool.seed", "re-run convert"]),
    (lambda d: d["artifacts"][0]["checks"].update(top1_agreement="high"),
     ["artifacts[0].checks.top1_agreement: 'high' is not a number"]),
    (lambda d: d["tool"].update(input_size=None), ["manifest.tool.input_size", "re-run convert"]),
    (lambda d: d["artifacts"][0]["input"].update(shape=[]), ["artifacts[0].input.shape", "4 dimensions of layout NCHW"]),
])
def test_evaluate_rejects_a_bad_manifest_naming_the_fix(copy, edit, needles):
    _edit_manifest(copy, edit)
    _one_line_error(*_run("evaluate", str(copy)), *needles)
    assert not (copy / ".effmod-cache").exists(), "evaluate left a cache folder behind after refusing"


def test_unreadable_manifest_and_bad_bench_settings(copy):
    (copy / "manifest.json").write_bytes(bytes(range(128, 256)) * 8)
    for cmd in ("evaluate", "bench", "report"):
        _one_line_error(*_run(cmd, str(copy)), "is not valid JSON", "re-run convert")
    for args, needle in ((["--runs", "0"], "--runs >= 1"), (["--threads", "0"], "positive thread counts")):
        _one_line_error(*_run("bench", str(copy), *args), needle)


def test_report_rejects_a_bench_file_of_another_layout(copy):
    (copy / "bench.json").write_text(json.dumps({"results": [{"target": "onnx", "precision": "fp32"}]}))
    _one_line_error(*_run("report", str(copy)), "results[0] lacks path", "re-run effmod-edge bench")


@pytest.mark.parametrize("name, doc, needle", [
    ("bench.json", {"results": [{"target": "onnx", "precision": "fp32", "path": "a.onnx", "threads": 1,
                                 "median_ms": "fast"}]}, "results[0].median_ms: 'fast' is not a number"),
    ("bench.json", {"results": [], "settings": "x"}, "settings 'x' lacks numeric runs"),
    ("evaluation.json", {"rows": [{"target": "onnx", "precision": "fp32", "path": "a.onnx",
                                   "top1_agreement_ci95": [0.5]}]}, "rows[0].top1_agreement_ci95"),
])
def test_report_rejects_wrongly_typed_results_by_field(copy, name, doc, needle):
    (copy / name).write_text(json.dumps(doc))
    _one_line_error(*_run("report", str(copy)), needle, "re-run effmod-edge")


def test_a_manifest_nested_past_the_recursion_limit_is_refused(copy):
    """Refused before json's C parser recurses: under coremltools' recursion limit (5000, set on import)
    100000 brackets overflowed the C stack and killed the test run with a segfault."""
    (copy / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)
    try:
        for cmd in ("evaluate", "bench", "report"):
            _one_line_error(*_run(cmd, str(copy)), "nests too deeply", "re-run convert")
    finally:
        sys.setrecursionlimit(limit)


def test_evaluate_limit_must_be_positive(copy):
    for limit in ("0", "-2"):
        _one_line_error(*_run("evaluate", str(copy), "--limit", limit), "--limit must be >= 1")


def test_inspect_of_a_non_tflite_file_names_the_fix(converted, tmp_path):
    onnx = next(converted.glob("*.onnx"))
    _one_line_error(*_run("inspect", str(onnx)), "is not a TFLite model", "pass a .tflite file")
    (tmp_path / "m.mlpackage").mkdir()
    _one_line_error(*_run("inspect", str(tmp_path / "m.mlpackage")), "is a Core ML package", "inspect reads one .tflite")
    _one_line_error(*_run("inspect", str(tmp_path)), "is a folder", "inspect reads one .tflite")


def test_download_cache_that_is_a_file(tmp_path, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EFFMOD_CACHE", str(blocker))
    _one_line_error(*_run("download-samples", "--url", "http://127.0.0.1:9/"), "cannot create the cache folder",
                    "EFFMOD_CACHE")


def test_onnxruntime_usage_events_are_off_for_every_subprocess():
    """onnxruntime's Linux builds look up mobile.events.data.microsoft.com (seen from onnx2tf's onnxsim runs)."""
    from converters.to_tflite import _env

    code = "import edge, os; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "1", f"importing edge did not turn onnxruntime's usage events off: {got}"
    assert _env().get("ORT_DISABLE_TELEMETRY") == "1", "the converter's subprocess environment lacks the switch"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the conversion's sockets")
def test_tflite_conversion_makes_no_network_connection(tmp_path, samples_dir):
    """Every process of a TFLite conversion (onnx2tf with its onnxsim pass, the LiteRT worker) stays off the network."""
    pytest.importorskip("onnx2tf", reason="TFLite extra not installed")
    trace = tmp_path / "trace.txt"
    # without the test session's dead proxy: a client that honours proxy variables would otherwise only reach it
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace), sys.executable, "-m",
                    "edge.cli", "convert", "--model", TINY, "--target", "tflite", "--precision", "fp32",
                    "--calib-size", "4", "--eval-size", "4", "--calib-dir", str(samples_dir),
                    "-o", str(tmp_path / "out")], check=True, capture_output=True, env=env)
    inet = [line for line in trace.read_text().splitlines() if "AF_INET" in line and "127.0.0.1" not in line]
    assert inet == [], f"network connections during a conversion: {inet[:3]}"


def test_report_gate_takes_metrics_not_the_interval(copy):
    _one_line_error(*_run("report", str(copy), "--fail-under", "agreement_ci95=0.9"), "use METRIC=VALUE")


def test_bad_samples_url_from_the_environment_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFMOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFMOD_SAMPLES_URL", "bogus")
    _one_line_error(*_run("download-samples"), "EFFMOD_SAMPLES_URL 'bogus/'")
    assert not (tmp_path / "cache").exists()


def _class_folders(root: Path, samples_dir: Path, same_names: bool) -> Path:
    """Two class folders of 3 sample images each, named img0..img2 in both (or with the class in the name)."""
    for wnid in ("n01440764", "n01443537"):
        (root / wnid).mkdir(parents=True)
        for i, src in enumerate(sorted(samples_dir.glob(f"{wnid}_*"))[:1] * 3):
            os.symlink(src, root / wnid / (f"img{i}.JPEG" if same_names else f"{wnid}_img{i}.JPEG"))
    return root


@pytest.mark.parametrize("same_names", [False, True])
def test_manifests_that_named_images_by_file_name_still_evaluate(tmp_path, samples_dir, same_names):
    """Before 16fd2e9 eval images were recorded by file name; in <wnid>/<file> layout that can be ambiguous."""
    images = _class_folders(tmp_path / "images", samples_dir, same_names)
    out = tmp_path / "out"
    convert(ConvertRequest(targets=["onnx"], model=TINY, output=out, calib_dir=str(images), calib_size=2,
                           eval_size=4))
    _edit_manifest(out, lambda d: d["data"].update(eval_images=[n.split("/")[-1] for n in d["data"]["eval_images"]]))
    rc, err = _run("evaluate", str(out))
    if same_names:
        _one_line_error(rc, err, "names its evaluation images by file name only", "re-run convert")
    else:
        assert rc == 0, err
        assert json.loads((out / "evaluation.json").read_text())["images"]["count"] == 4


def test_evaluate_needs_the_checkpoint_only_without_cached_reference_logits(tmp_path, samples_dir,
                                                                           proxy_tiny_checkpoint):
    ckpt = tmp_path / "ckpt.pth"
    shutil.copyfile(proxy_tiny_checkpoint, ckpt)
    out = tmp_path / "out"
    convert(ConvertRequest(targets=["onnx"], model=TINY, weights=str(ckpt), output=out, calib_dir=str(samples_dir),
                           calib_size=2, eval_size=3))
    assert Manifest.load(out / "manifest.json").weights == str(ckpt.resolve()), "the manifest should hold an absolute path"
    assert _run("evaluate", str(out))[0] == 0
    ckpt.unlink()
    rc, err = _run("evaluate", str(out))
    assert rc == 0, f"cached reference logits should make the checkpoint unnecessary: {err}"
    rc, err = _run("evaluate", str(out), "--limit", "2")
    _one_line_error(rc, err, f"checkpoint {ckpt.resolve()} is gone", "put it back")


def test_report_refuses_a_folder_in_the_way_and_writes_neither_file(copy):
    (copy / "report.html").mkdir()
    _one_line_error(*_run("report", str(copy)), "report.html is a folder in the way", "nothing was written")
    assert not (copy / "report.md").exists(), "report.md written although report.html could not be"


def test_empty_output_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, samples_dir):
    monkeypatch.chdir(tmp_path)
    _one_line_error(*_run("convert", "--target", "onnx", "--model", TINY, "--calib-dir", str(samples_dir), "-o", ""),
                    "--output is empty")
    assert _snapshot(tmp_path) == {}, "a refused convert wrote into the current folder"


@pytest.mark.parametrize("name, command", [("evaluation.json", "evaluate"), ("bench.json", "bench"),
                                           (".effmod-cache", "evaluate")])
def test_a_result_path_in_the_way_is_refused_before_the_run(copy, name, command):
    blocker = copy / name
    blocker.mkdir() if name.endswith(".json") else blocker.write_text("not a folder")
    _one_line_error(*_run(command, str(copy)), f"{name} is a", "in the way", "move it away")


def test_a_new_conversion_retires_the_old_evaluation_and_its_reference(copy, samples_dir):
    """Random weights differ by seed: after converting seed 1 over seed 0, neither the old evaluation.json nor
    seed 0's cached PyTorch logits may describe the new files (they gave 0 % agreement, -3.7 dB)."""
    assert _run("evaluate", str(copy))[0] == 0 and _run("report", str(copy))[0] == 0
    convert(ConvertRequest(targets=["onnx"], model=TINY, output=copy, calib_dir=str(samples_dir), calib_size=4,
                           eval_size=4, seed=1))
    left = sorted(p.name for p in copy.iterdir() if p.name in ("evaluation.json", "bench.json", "report.md", "report.html"))
    assert left == [], f"results of the previous conversion left beside the new manifest: {left}"
    assert _run("evaluate", str(copy))[0] == 0
    rows = [r for r in json.loads((copy / "evaluation.json").read_text())["rows"] if r["target"] == "onnx"]
    # measured: 100 % agreement, SQNR ~130 dB against seed 1's own model
    assert rows and all(r["sqnr_db"] > 100 and r["top1_agreement"] == 1.0 for r in rows), rows


def test_the_environment_variable_is_named_when_its_folder_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFMOD_CALIB_DIR", str(tmp_path / "nowhere"))
    rc, err = _run("convert", "--target", "onnx", "--model", TINY, "-o", str(tmp_path / "out"))
    _one_line_error(rc, err, f"EFFMOD_CALIB_DIR {tmp_path / 'nowhere'} does not exist", "set EFFMOD_CALIB_DIR")


def test_a_first_conversion_leaves_files_of_the_same_names_alone(tmp_path, samples_dir):
    """Only a folder that held a manifest has results of ours to retire; a project's own report.md stays."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "report.md").write_text("# my notes")
    convert(ConvertRequest(targets=["onnx"], model=TINY, output=out, calib_dir=str(samples_dir), calib_size=2,
                           eval_size=2))
    assert (out / "report.md").read_text() == "# my notes"


def test_convert_report_exits_non_zero_when_an_artifact_cannot_be_evaluated(tmp_path, samples_dir, monkeypatch):
    """convert --report wrote a report of ERROR rows and exited 0 (a TFLite worker given relative paths)."""
    import edge.evaluate

    real = edge.evaluate.evaluate_manifest

    def one_row_fails(*args, **kwargs):
        result = real(*args, **kwargs)
        row = next(r for r in result["rows"] if r["target"] == "onnx")
        row.clear()
        row.update({"target": "onnx", "precision": "fp32", "path": f"{TINY}.onnx", "error": "RuntimeError: worker died"})
        return result

    monkeypatch.setattr(edge.evaluate, "evaluate_manifest", one_row_fails)
    rc, err = _run("convert", "--target", "onnx", "--model", TINY, "--calib-dir", str(samples_dir),
                   "--calib-size", "0", "--eval-size", "3", "--output", str(tmp_path / "out"), "--report")
    _one_line_error(rc, err, "evaluate failed for", "worker died", code=1)
    assert (tmp_path / "out" / "report.html").is_file(), "the report should still be written before the exit"


def test_evaluate_prints_a_dash_for_the_top1_of_unlabelled_images(copy, tmp_path, samples_dir):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, src in enumerate(sorted(samples_dir.glob("n*.JPEG"))[:3]):
        os.symlink(src, folder / f"photo_{i}.jpg")
    res = CliRunner().invoke(main, ["evaluate", str(copy / "manifest.json"), "--data", str(folder)])
    assert res.exit_code == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "agree" in line]
    assert rows and all("top-1 - " in line for line in rows), f"unlabelled images shown with a top-1: {rows}"


def test_verbose_lines_start_with_the_seconds_since_the_command_began():
    import logging

    from edge.cli import ElapsedFormatter

    record = logging.LogRecord("effmod_edge", logging.DEBUG, __file__, 1, "onnx2tf: done within %.1f s", (35.84,), None)
    record.relativeCreated = 61234.0  # ms since logging started
    assert ElapsedFormatter("%(message)s").format(record) == "   61.2s  onnx2tf: done within 35.8 s"
