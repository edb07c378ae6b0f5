"""evaluate -> bench -> report on a tiny ONNX conversion, including broken rows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from edge.bench import bench_manifest
from edge.evaluate import CACHE_DIR, evaluate_manifest
from edge.errors import ConfigError
from edge.manifest import Manifest
from edge.pipeline import ConvertRequest, convert
from edge.report import FailUnder, render

TINY = "efficientmod_test_tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, samples_dir, proxy_tiny_checkpoint):
    """Proxy weights: every block reaches the logits, so a garbled export shows in the metrics."""
    out = tmp_path_factory.mktemp("report")
    convert(ConvertRequest(targets=["onnx"], model=TINY, weights=str(proxy_tiny_checkpoint), output=out,
                           calib_dir=str(samples_dir), calib_size=4, eval_size=10))
    return out


def test_evaluate_matches_reference_and_caches(converted):
    result = evaluate_manifest(converted / "manifest.json", progress=False)
    assert result["images"]["count"] == 10
    rows = {r["path"]: r for r in result["rows"]}
    onnx = rows[f"{TINY}.onnx"]
    # measured on 10 images: max|d| 1.2e-6, SQNR 129.5 dB
    assert onnx["max_abs_diff"] <= 1e-5, f"{onnx['path']}: evaluated max|d| vs PyTorch {onnx}"
    assert onnx["sqnr_db"] >= 126.0, f"{onnx['path']}: evaluated SQNR vs PyTorch {onnx}"
    assert onnx["top1_agreement"] == 1.0, f"{onnx['path']}: top-1 differs from PyTorch {onnx}"
    cached = sorted((converted / CACHE_DIR).glob("logits-*.npy"))
    assert len(cached) == 2
    stamp = [c.stat().st_mtime_ns for c in cached]
    again = evaluate_manifest(converted / "manifest.json", progress=False)
    assert [c.stat().st_mtime_ns for c in cached] == stamp, "second evaluate re-ran cached artifacts"
    assert again["rows"] == result["rows"]


def test_bench_times_every_runnable_artifact(converted):
    result = bench_manifest(converted / "manifest.json", runs=3, warmup=1, rounds=1, threads=(1,))
    timed = [r for r in result["results"] if "median_ms" in r]
    assert {r["target"] for r in timed} == {"onnx", "pytorch"}
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] for r in timed), timed
    assert result["machine"]["cores"] >= 1 and "onnxruntime" in result["machine"]["versions"]


def test_report_rows_gate_and_broken_artifacts(converted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    m = Manifest.load(out / "manifest.json")
    (out / m.artifacts[1].path).unlink()
    with open(out / m.artifacts[0].path, "ab") as f:
        f.write(b"tampered")
    evaluate_manifest(out / "manifest.json", progress=False)
    md, page, misses = render(out, [FailUnder.parse("agreement=0.99")])
    text = md.read_text()
    assert "does not match its sha256" in text and "is missing" in text
    assert len(misses) == 2 and all("onnx/fp32" in x for x in misses)
    assert page.read_text().count("<tr class='error'>") == 2


def test_report_gate_passes_on_intact_output(converted):
    md, page, misses = render(converted, [FailUnder.parse("agreement=0.99"), FailUnder.parse("sqnr=120")])
    assert misses == [], f"intact fp32 ONNX rows (SQNR ~129.5 dB) missed the gate: {misses}"
    assert "efficientmod_test_tiny_dynamic.onnx" in md.read_text()


def test_report_gate_names_rows_below_a_numeric_bar(converted):
    """A bar above the measured SQNR (~129.5 dB) fails every artifact row, each naming itself and its number."""
    import re

    from edge.report import collect_rows

    _, rows, _, _ = collect_rows(converted)
    measured = {r["path"]: r["sqnr"] for r in rows if r["target"] != "pytorch"}
    assert sorted(measured) == [f"{TINY}.onnx", f"{TINY}_dynamic.onnx"], rows
    _, _, misses = render(converted, [FailUnder.parse("agreement=0.99"), FailUnder.parse("sqnr=200")])
    assert len(misses) == 2, f"expected one sqnr miss per ONNX row, got {misses}"
    for path, sqnr in measured.items():
        assert 120.0 <= sqnr < 200.0, f"{path}: measured SQNR {sqnr} outside the range this test assumes"
        (miss,) = [m for m in misses if path in m.split(": ", 1)[0].split()]
        assert miss.startswith("onnx/fp32 "), miss
        number = re.search(r"sqnr (\S+) < 200", miss)
        assert number and float(number.group(1)) == pytest.approx(sqnr), f"{path}: miss {miss!r} lacks SQNR {sqnr}"


def test_a_nan_metric_misses_every_bar(converted, tmp_path):
    """NaN < 25 is false: a NaN SQNR (an artifact that outputs NaN) passed --fail-under sqnr=25."""
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    evaluate_manifest(out / "manifest.json", progress=False)
    ev = json.loads((out / "evaluation.json").read_text())
    row = next(r for r in ev["rows"] if r["target"] == "onnx")
    row["sqnr_db"] = float("nan")
    (out / "evaluation.json").write_text(json.dumps(ev))
    _, _, misses = render(out, [FailUnder.parse("sqnr=25")])
    assert [m for m in misses if row["path"] in m and "sqnr nan < 25" in m], f"a NaN SQNR passed the gate: {misses}"
    row["nonfinite_logits"] = 2
    (out / "evaluation.json").write_text(json.dumps(ev))
    _, _, misses = render(out, [])
    assert [m for m in misses if row["path"] in m and "2 logits are inf or NaN" in m], \
        f"inf/NaN logits passed a gate without bars: {misses}"


def test_failed_conversions_are_gate_misses_and_shown_in_html(converted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    m = json.loads((out / "manifest.json").read_text())
    m["failures"] = [{"target": "tflite", "precision": "int8", "error": "RuntimeError: <boom>", "seconds": 3.0},
                     {"target": "onnx", "precision": "fp32", "error": "bad record", "seconds": 1.0, "path": "b.onnx"}]
    (out / "manifest.json").write_text(json.dumps(m))
    md, page, misses = render(out, [FailUnder.parse("sqnr=25")])
    assert misses == ["tflite/int8: conversion failed after 3s: RuntimeError: <boom>",
                      "onnx/fp32 b.onnx: conversion failed after 1s: bad record"], misses
    html = page.read_text()
    assert "Failed conversions" in html and "RuntimeError: &lt;boom&gt;" in html, "the failure is not on the HTML page"
    assert "onnx/fp32 b.onnx after 1s" in html and "onnx/fp32 b.onnx after 1s" in md.read_text(), \
        "the failed file is not named on the page"


def test_fail_under_rejects_unknown_metric():
    with pytest.raises(ConfigError, match="latency"):
        FailUnder.parse("latency=3")


@pytest.mark.parametrize("bar", ["nan", "inf", "-inf"])
def test_fail_under_rejects_a_bar_no_row_can_miss(bar):
    """Every comparison with NaN is false, so sqnr=nan let a NaN artifact through the gate."""
    with pytest.raises(ConfigError, match=r"finite number, e\.g\. sqnr=25$"):  # dB, not a fraction
        FailUnder.parse(f"sqnr={bar}")
    with pytest.raises(ConfigError, match=r"finite number, e\.g\. agreement=0\.99$"):
        FailUnder.parse(f"agreement={bar}")


def test_report_html_renders_in_chromium(converted, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    bench_manifest(converted / "manifest.json", runs=2, warmup=1, rounds=1, threads=(1,))
    _, page, _ = render(converted)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr class=\"ok\">") == 3, "artifact rows (2 ONNX + PyTorch) missing from the rendered page"
    assert dom.count("<circle") >= 2, "latency-vs-agreement plot has no points"
    assert "effmod-edge report" in dom


def test_evaluate_on_another_folder_picks_balanced_images(converted, uneven_image_folder):
    """Classes of 10, 3 and 1 images: 5 picked images are 2 + 2 + 1, not the first 5 files of one class."""
    from collections import Counter

    from calibration.folder import scan_folder
    from calibration.splits import pick_balanced

    result = evaluate_manifest(converted / "manifest.json", data_dir=uneven_image_folder, limit=5, progress=False)
    assert result["images"]["count"] == 5 and result["images"]["split"] == "balanced pick", result["images"]
    pick = pick_balanced(scan_folder(uneven_image_folder), 5, seed=0)
    assert result["images"]["fingerprint"] == pick.fingerprint(), "evaluate did not use the balanced pick"
    counts = Counter(pick.labels.tolist())
    assert counts == {0: 2, 1: 2, 2: 1}, f"picked images per class {dict(counts)}, want 2/2/1"
    onnx = next(r for r in result["rows"] if r["target"] == "onnx")
    assert onnx["labelled_images"] == 5, onnx
    # measured max|d| 1.4e-6, SQNR 129.4 dB
    assert onnx["max_abs_diff"] <= 1e-5 and onnx["sqnr_db"] >= 126.0, f"{onnx['path']} on the picked images: {onnx}"


def test_mixed_step_line_shows_the_step_latency_when_timed():
    from edge.report import mixed_step_line

    step = {"layernorm_stats_float": True, "adds_float": True, "kept_nodes": 0, "calib_agreement": 0.98,
            "calib_sqnr_db": 32.9, "bytes": 5_437_240}
    assert " ms" not in mixed_step_line(step), "a manifest from before step timing has no latency to show"
    line = mixed_step_line({**step, "latency_ms": 5.404, "latency_vs_first_step": 1.068})
    assert line.endswith("5.44 MB, 5.40 ms (1.07x the first step)"), line


def test_report_says_how_latency_was_taken():
    from edge.report import latency_method

    bench = {"date": "2026-11-27", "settings": {"runs": 30, "warmup": 5, "warmup_secs": 0.5, "rounds": 3}}
    line = latency_method(bench)
    assert "3 interleaved rounds of 30 timed runs" in line and "at least 5 untimed runs and 0.5 s" in line, line
    older = {"settings": {"runs": 30, "warmup": 5, "rounds": 3}}  # bench.json from before --warmup-secs
    assert "and 0 s" in latency_method(older), latency_method(older)
    assert latency_method(None) == ""


@pytest.mark.parametrize("text, hint", [("agreement=99", "agreement=0.99"), ("top1=87.5", "top1=0.875"),
                                         ("cosine=-2", "cosine=-0.02")])
def test_fail_under_refuses_a_percentage_for_a_fraction(text, hint):
    with pytest.raises(ConfigError, match=f"did you mean {hint}"):
        FailUnder.parse(text)
    assert FailUnder.parse("sqnr=99").value == 99.0 and FailUnder.parse("cosine=-0.5").value == -0.5


def test_report_takes_the_manifest_path_and_refuses_other_files(converted, tmp_path):
    from edge.report import report_folder

    assert report_folder(converted / "manifest.json") == converted
    other = tmp_path / "bench.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="not an output folder; pass OUT or OUT/manifest.json"):
        report_folder(other)


def test_report_states_the_search_target_the_manifest_records():
    from edge.report import _search_target

    d = {"search_target": {"min_agreement": 0.99, "min_sqnr_db": 26.0, "sqnr_margin_db": 1.0, "on": "calibration images"}}
    assert _search_target(d) == " (asked: 99 % agreement, 26 dB SQNR)", _search_target(d)
    assert _search_target({}) == "", "a manifest from before the margin has no target to show"


def test_a_hand_edited_machine_or_interval_is_one_error(converted, tmp_path):
    from edge.errors import EffmodError

    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    evaluate_manifest(out / "manifest.json", progress=False)
    good = (out / "evaluation.json").read_text()
    for edit, named in ((lambda ev: ev.update(machine="x86"), "machine 'x86' is not an object"),
                        (lambda ev: ev["rows"][1].update(top1_agreement_ci95=[float("nan"), 1.0]), "ci95: [nan, 1.0]")):
        ev = json.loads(good)
        edit(ev)
        (out / "evaluation.json").write_text(json.dumps(ev))
        with pytest.raises(EffmodError, match=re.escape(named)):
            render(out)


def test_a_report_that_cannot_be_written_leaves_both_files_as_they_were(converted, tmp_path, monkeypatch):
    import edge.manifest
    from edge.errors import EffmodError

    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    md, page, _ = render(out)
    before = md.read_text(), page.read_text()
    real_fdopen, opened = os.fdopen, []

    def disk_full_on_the_second(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        opened.append(f)
        if len(opened) == 2:
            f.close()
            raise OSError(28, "No space left on device")
        return f

    monkeypatch.setattr(edge.manifest.os, "fdopen", disk_full_on_the_second)
    with pytest.raises(EffmodError, match="could not write the report into .*No space left on device"):
        render(out, [FailUnder.parse("sqnr=200")])  # another report: its md differs from the one on disk
    monkeypatch.undo()
    assert (md.read_text(), page.read_text()) == before, "one report file was replaced without the other"
    assert not list(out.glob("*.tmp")), "a temp file of the report was left behind"


def test_which_file_to_ship_names_the_fastest_and_smallest_that_meet_their_bars():
    from edge.report import bar_misses, ship_lines

    good = {"max_abs_diff": 0.01, "sqnr_db": 41.0, "top1_agreement": 0.995}
    low = {**good, "top1_agreement": 0.89, "sqnr_db": 28.8}

    def row(precision, path, mb, ms, metrics, **extra):
        return {"target": "tflite", "precision": precision, "path": path, "bytes": int(mb * 1e6),
                "latency": {2: ms} if ms else {}, "bar_misses": bar_misses("tflite", precision, metrics), **extra}

    rows = [row("fp32", "a_fp32.tflite", 19.0, 10.7, {**good, "max_abs_diff": 1e-6, "sqnr_db": 127.0}),
            row("dynamic", "a_dynamic.tflite", 5.25, 12.6, good),
            row("int8", "a_int8.tflite", 5.35, 8.0, low),  # fastest, but misses its bar: never suggested
            row("fp16", "a_fp16.tflite", 9.5, 9.0, {**good, "sqnr_db": 66.0}, error="is missing"),
            {"target": "pytorch", "precision": "fp32", "path": "PyTorch eager", "bytes": 0, "reference": True,
             "latency": {2: 1.0}}]
    assert rows[2]["bar_misses"] == ["top-1 agreement 89.00% < 99%"], rows[2]["bar_misses"]
    lines = ship_lines(rows, {"cpu": "x", "cores": 2, "isa": ["avx2", "fma"]})
    assert lines[0] == ("- tflite: fastest here: `a_fp32.tflite` (10.70 ms at 2 threads, 19.00 MB); smallest: "
                        "`a_dynamic.tflite` (5.25 MB, 12.60 ms)."), lines
    assert len(lines) == 2 and "(this one has none)" in lines[1], lines
    tie = ship_lines([rows[0], {**rows[1], "latency": {2: 11.0}}], {})
    assert tie[0].startswith("- tflite: fastest here: `a_fp32.tflite` (10.70 ms at 2 threads, 19.00 MB); as fast "
                             "within 5% (this machine's noise): `a_dynamic.tflite` (11.00 ms, 5.25 MB); smallest"), tie
    vnni = ship_lines(rows, {"cpu": "x", "cores": 2, "isa": ["avx2", "avx512_vnni"]})
    assert "has none" not in vnni[-1], vnni
    assert ship_lines(rows, {"isa": [["avx2"], None]})[-1].endswith("(this one has none)."), "a hand-edited isa"
    none_ok = ship_lines([rows[2]], {})
    assert none_ok[0] == "- tflite: no file meets its bar (see the table); ship none of them as is.", none_ok
    assert bar_misses("tflite", "no-such-precision", good) is None and bar_misses("tflite", "fp32", {}) is None
    unknown = ship_lines([{**rows[1], "bar_misses": None}], {})
    assert unknown[0].startswith("- tflite: no file has a verdict"), unknown
    only_one_thread = ship_lines([{**rows[1], "latency": {1: 20.0}}], {})
    assert "(20.00 ms at 1 thread, 5.25 MB)" in only_one_thread[0], only_one_thread
    skipped = ship_lines([{**rows[1], "latency": {}, "no_latency": "ai-edge-litert is not installed"}], {})
    assert "no latency: ai-edge-litert is not installed" in skipped[0], skipped
    coreml_fp16 = {"sqnr_db": 45.0, "top1_agreement": 1.0, "max_abs_diff": None}  # its bar checks SQNR alone
    assert bar_misses("coreml", "fp16", coreml_fp16) == [], "a metric the bar does not use must not matter"


def test_the_report_says_which_file_to_ship(converted):
    md, page, _ = render(converted)
    text = md.read_text()
    section = text.split("## Which file to ship\n", 1)[1].split("\n\n", 1)[0]
    timed = (converted / "bench.json").is_file()  # an earlier test of this module may have run bench
    first = "- onnx: fastest here: `" if timed else "- onnx: no latency on this machine (run effmod-edge bench); "
    assert section.startswith(first) and f"smallest: `{TINY}" in section, section
    assert "| meets its bar |" in text and re.search(r"\| yes( \(its 95 % interval[^|]*)? \|", text), \
        "the table must say which rows meet their bar"
    assert "Which file to ship" in page.read_text()
