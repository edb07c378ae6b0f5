"""evaluate's image choice: the recorded eval split, or a balanced pick that never includes a calibration image."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibration.folder import ImageFolder, scan_folder
from calibration.splits import pick_balanced
from edge.cli import main
from edge.evaluate import evaluate_manifest
from edge.manifest import Manifest
from edge.pipeline import ConvertRequest, convert

TINY = "efficientmod_test_tiny"


@pytest.fixture(scope="module")
def twelve_images(tmp_path_factory, samples_dir) -> Path:
    """Twelve sample photos of twelve classes (links), so 'every held-out image' is a short run."""
    root = tmp_path_factory.mktemp("twelve") / "images"
    root.mkdir()
    for src in sorted(samples_dir.glob("n*.JPEG"))[:12]:
        os.symlink(src, root / src.name)
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory, twelve_images, proxy_tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "out"
    convert(ConvertRequest(targets=["onnx", "coreml"], precisions=["fp32"], model=TINY,
                           weights=str(proxy_tiny_checkpoint), output=out, calib_dir=str(twelve_images),
                           calib_size=4, eval_size=3))
    return out


def _without_calibration(root: Path, calib: set[str], limit: int | None = None) -> str:
    """Fingerprint of the balanced pick of ``root`` minus ``calib``, computed independently of evaluate."""
    folder = scan_folder(root)
    kept = [i for i in folder.items if i.name not in calib]
    return pick_balanced(ImageFolder(folder.root, kept), limit, seed=0).fingerprint()


def _edit_data(out: Path, edit) -> None:
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    edit(d["data"])
    path.write_text(json.dumps(d))


def test_manifest_records_the_calibration_images(converted, twelve_images):
    import hashlib

    data = Manifest.load(converted / "manifest.json").data
    calib = data["calib_images"]
    assert len(calib) == 4 and not set(calib) & set(data["eval_images"]), data
    assert hashlib.sha256("\n".join(calib).encode()).hexdigest()[:16] == data["calib_fingerprint"], \
        "calib_images are not the images the calibration fingerprint was taken of"


def test_heldout_evaluates_every_image_calibration_left(converted, twelve_images):
    calib = set(Manifest.load(converted / "manifest.json").data["calib_images"])
    result = evaluate_manifest(converted / "manifest.json", heldout=True, progress=False)
    img = result["images"]
    assert img["count"] == 8 and img["excluded_calibration"] == 4, img
    assert img["fingerprint"] == _without_calibration(twelve_images, calib), "evaluate used other images"
    onnx = next(r for r in result["rows"] if r["target"] == "onnx" and r["precision"] == "fp32")
    # measured on these 8 images: max|d| ~1e-6 (proxy weights)
    assert onnx["max_abs_diff"] <= 1e-4 and onnx["top1_agreement"] == 1.0, f"fp32 ONNX on held-out images: {onnx}"


def test_data_on_the_calibration_folder_leaves_calibration_out(converted, twelve_images):
    calib = set(Manifest.load(converted / "manifest.json").data["calib_images"])
    result = evaluate_manifest(converted / "manifest.json", data_dir=twelve_images, limit=5, progress=False)
    img = result["images"]
    assert img["count"] == 5 and img["excluded_calibration"] == 4, img
    assert img["fingerprint"] == _without_calibration(twelve_images, calib, 5)
    assert img["fingerprint"] != pick_balanced(scan_folder(twelve_images), 5, seed=0).fingerprint(), \
        "the test cannot tell exclusion from a plain pick"


def test_older_manifests_recreate_the_calibration_split(converted, twelve_images, tmp_path):
    """Manifests before calib_images: the split is re-created from root, size and seed, checked by fingerprint."""
    out = tmp_path / "old"
    shutil.copytree(converted, out)
    calib = set(Manifest.load(out / "manifest.json").data["calib_images"])
    _edit_data(out, lambda d: d.pop("calib_images"))
    img = evaluate_manifest(out / "manifest.json", heldout=True, progress=False)["images"]
    assert img["count"] == 8 and img["fingerprint"] == _without_calibration(twelve_images, calib), img

    _edit_data(out, lambda d: d.update(calib_fingerprint="0" * 16))
    res = CliRunner().invoke(main, ["evaluate", str(out / "manifest.json"), "--heldout"])
    assert res.exit_code == 2 and "does not say which images calibration used" in res.stderr, res.stderr
    assert "re-run convert" in res.stderr.strip().splitlines()[-1]
    img = evaluate_manifest(out / "manifest.json", data_dir=twelve_images, progress=False)["images"]
    assert img["excluded_calibration"] is None and img["count"] == 12, \
        f"unknown calibration images must be recorded as unknown, not as zero: {img}"


def test_heldout_cli_says_how_many_were_left_out(converted):
    res = CliRunner().invoke(main, ["evaluate", str(converted / "manifest.json"), "--heldout", "--limit", "6"])
    assert res.exit_code == 0, res.stderr
    assert "6 images (balanced pick" in res.stdout and "4 calibration images left out" in res.stdout, res.stdout


def test_convert_names_the_heldout_command_that_settles_its_bars(tmp_path, twelve_images, caplog):
    """3 evaluation images cannot settle an agreement bar; the warning's command evaluates the 8 images left."""
    import logging
    import re
    import shlex

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="effmod_edge"):  # Core ML w8: a 99 % agreement bar, data-free
        convert(ConvertRequest(targets=["coreml"], precisions=["w8"], model=TINY, output=out,
                               calib_dir=str(twelve_images), calib_size=4, eval_size=3))
    warning = next((r.getMessage() for r in caplog.records if "cannot settle" in r.getMessage()), None)
    assert warning is not None, [r.getMessage() for r in caplog.records]
    command = re.search(r"`effmod-edge (evaluate [^`]+)`", warning)
    assert command, warning
    res = CliRunner().invoke(main, shlex.split(command.group(1)))
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "evaluation.json").read_text())["images"]["count"] == 8


def test_target_filter_evaluates_only_those_artifacts_and_the_report_says_so(converted, tmp_path):
    from edge.report import CHECKS_MARK, render

    out = tmp_path / "filtered"
    shutil.copytree(converted, out)
    result = evaluate_manifest(out / "manifest.json", heldout=True, targets=["coreml"], progress=False)
    evaluated = {(r["target"], r["precision"]) for r in result["rows"]}
    assert evaluated == {("pytorch", "fp32"), ("coreml", "fp32")}, evaluated
    coreml = next(r for r in result["rows"] if r["target"] == "coreml")
    # measured on these 8 images: max|d| ~1e-5 through the fp32 MIL interpreter
    assert coreml["max_abs_diff"] <= 1e-4, f"coreml fp32 on held-out images: {coreml}"
    md, _, _ = render(out)
    lines = md.read_text().splitlines()
    onnx_rows = [line for line in lines if line.startswith("| onnx ")]
    coreml_rows = [line for line in lines if line.startswith("| coreml ")]
    assert onnx_rows and all(f".onnx{CHECKS_MARK} |" in line for line in onnx_rows), onnx_rows
    assert coreml_rows and not any(CHECKS_MARK + " |" in line for line in coreml_rows), coreml_rows
    assert any(line.startswith("* not in evaluation.json") for line in lines)


def test_a_filter_that_matches_nothing_names_what_the_manifest_has(converted):
    res = CliRunner().invoke(main, ["evaluate", str(converted / "manifest.json"), "--precision", "int8"])
    assert res.exit_code == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no artifact of the manifest matches") and "coreml/fp32, onnx/fp32" in line, line


def test_a_relative_calib_dir_still_evaluates_from_another_directory(twelve_images, tmp_path, monkeypatch):
    monkeypatch.chdir(twelve_images.parent)
    out = tmp_path / "out"
    convert(ConvertRequest(targets=["onnx"], model=TINY, output=out, calib_dir="images", calib_size=4, eval_size=3))
    assert Manifest.load(out / "manifest.json").data["root"] == str(twelve_images.resolve())
    monkeypatch.chdir(tmp_path)
    img = evaluate_manifest(out / "manifest.json", heldout=True, progress=False)["images"]
    assert img["count"] == 8 and img["excluded_calibration"] == 4, img


def test_a_missing_data_folder_names_evaluates_own_option(converted, tmp_path):
    missing = tmp_path / "no-such-folder"
    res = CliRunner().invoke(main, ["evaluate", str(converted / "manifest.json"), "--data", str(missing)])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and line.startswith(f"error: --data {missing} does not exist"), res.stderr
    assert "--calib-dir" not in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["evaluate", str(converted / "manifest.json"), "--data", str(empty)])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and line.startswith(f"error: no images in {empty}") and "--data" in line, res.stderr
    assert "--calib-dir" not in line, line


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory, proxy_tiny_checkpoint, twelve_images) -> Path:
    out = tmp_path_factory.mktemp("rel") / "out"
    convert(ConvertRequest(targets=["tflite"], precisions=["fp32"], model=TINY, weights=str(proxy_tiny_checkpoint),
                           output=out, calib_dir=str(twelve_images), calib_size=0, eval_size=3))
    return out


def test_evaluate_and_bench_run_tflite_from_a_relative_manifest_path(tiny_tflite, monkeypatch):
    from edge.bench import bench_manifest

    monkeypatch.chdir(tiny_tflite.parent)
    old_work = tiny_tflite / ".effmod-cache" / "work"  # where earlier versions left the runtimes' inputs for good
    old_work.mkdir(parents=True, exist_ok=True)
    (old_work / "images-0123.npy").write_bytes(b"\0" * 1000)
    killed = tiny_tflite / ".effmod-cache" / ".work-killed"  # a killed run's folder: its lock file, nobody holding it
    killed.mkdir()
    (killed / ".owner.lock").write_text("")
    (killed / "images-4567.npy").write_bytes(b"\0" * 1000)
    rows = evaluate_manifest("out/manifest.json", progress=False)["rows"]
    (tfl,) = [r for r in rows if r["target"] == "tflite"]
    assert "error" not in tfl and tfl["sqnr_db"] > 100, f"TFLite fp32 from a relative manifest path: {tfl}"
    kept = sorted(p.name for p in (tiny_tflite / ".effmod-cache").iterdir())
    assert all(n.startswith(("reference-", "logits-")) and n.endswith(".npy") for n in kept), \
        f"evaluate left more than its cached logits (the runtimes' image arrays, a work folder?): {kept}"
    bench = bench_manifest("out/manifest.json", runs=2, warmup=1, rounds=1, threads=(1,), include_torch=False,
                           warmup_secs=0)["results"]
    (tfl,) = [r for r in bench if r["target"] == "tflite"]
    assert "error" not in tfl and tfl["median_ms"] > 0, f"TFLite bench from a relative manifest path: {tfl}"


def test_bench_times_onnxruntime_beside_a_tflite_only_manifest(tiny_tflite, tmp_path):
    from edge.bench import bench_manifest
    from edge.report import FailUnder, render

    out = tmp_path / "out"
    shutil.copytree(tiny_tflite, out, ignore=shutil.ignore_patterns(".effmod-cache"))
    rows = bench_manifest(out / "manifest.json", runs=2, warmup=1, rounds=1, threads=(1,), include_torch=False,
                          warmup_secs=0)["results"]
    (ort,) = [r for r in rows if r["target"] == "onnx"]
    assert ort["path"] == "" and ort["median_ms"] > 0 and ort["bytes"] > 0, f"onnxruntime row: {ort}"
    assert ort["speedup_vs_fp32_tflite"]["rounds"] == 1, f"onnxruntime not paired with fp32 TFLite: {ort}"
    md, page, misses = render(out, [FailUnder.parse("agreement=0.99")])
    (line,) = [x for x in md.read_text().splitlines() if "(bench export)" in x]
    assert f"{ort['median_ms']:.2f}" in line, f"report row of the onnxruntime export lacks its latency: {line}"
    assert not [m for m in misses if "bench export" in m], f"a latency-only row was gated on agreement: {misses}"
    rows = bench_manifest(out / "manifest.json", runs=1, warmup=0, rounds=1, threads=(1,), include_torch=False,
                          warmup_secs=0, include_onnxruntime=False)["results"]
    assert {r["target"] for r in rows} == {"tflite"}, f"include_onnxruntime=False still timed: {rows}"


def test_the_cache_recomputes_same_named_images_of_another_folder(tiny_tflite, twelve_images, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    photos = sorted(twelve_images.iterdir())[:6]
    for src, other in zip(photos, reversed(photos)):  # b: the same names over other photos
        os.symlink(os.path.realpath(src), a / src.name)
        os.symlink(os.path.realpath(other), b / src.name)
    first = evaluate_manifest(tiny_tflite / "manifest.json", data_dir=a, progress=False)
    second = evaluate_manifest(tiny_tflite / "manifest.json", data_dir=b, progress=False)
    fresh_dir = tmp_path / "fresh"
    shutil.copytree(tiny_tflite, fresh_dir, ignore=shutil.ignore_patterns(".effmod-cache", "evaluation.json"))
    fresh = evaluate_manifest(fresh_dir / "manifest.json", data_dir=b, progress=False)
    assert first["images"]["fingerprint"] == second["images"]["fingerprint"], "the test needs same-named images"
    for got, want in zip(second["rows"], fresh["rows"]):
        assert got["sqnr_db"] == want["sqnr_db"] and got["top1"] == want["top1"], \
            f"{got['target']} {got['precision']}: cached figures of folder a reused for folder b ({got} vs {want})"
    assert [r["sqnr_db"] for r in first["rows"][1:]] != [r["sqnr_db"] for r in second["rows"][1:]], \
        "folders a and b gave identical SQNRs: the test cannot tell a stale cache"


def test_a_neighbouring_file_is_not_called_a_damaged_manifest(converted, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("tench\ngoldfish\n")
    result = CliRunner().invoke(main, ["evaluate", str(labels)])
    assert result.exit_code != 0 and "is it a manifest? pass OUT or OUT/manifest.json" in result.output, result.output
    other = tmp_path / "evaluation.json"
    other.write_text(json.dumps({"rows": []}))
    result = CliRunner().invoke(main, ["evaluate", str(other)])
    assert "is it a manifest?" in result.output and "re-run convert" not in result.output, result.output


def test_a_hand_edited_model_names_the_manifest_not_a_missing_option(converted, tmp_path):
    out = tmp_path / "edited"
    shutil.copytree(converted, out)
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    d["model"] = "efficientmod_xxs"
    path.write_text(json.dumps(d))
    result = CliRunner().invoke(main, ["evaluate", str(out)])
    assert result.exit_code != 0 and "manifest's model 'efficientmod_xxs'" in result.output, result.output
    assert "--model" not in result.output, result.output


@pytest.fixture()
def own_images(tmp_path, samples_dir) -> tuple[Path, Path]:
    """A converted tiny ONNX model whose image folder holds copies this test may damage."""
    root = tmp_path / "images"
    root.mkdir()
    for src in sorted(samples_dir.glob("n*.JPEG"))[:6]:
        shutil.copy(src, root / src.name)
    out = tmp_path / "out"
    convert(ConvertRequest(targets=["onnx"], precisions=["fp32"], model=TINY, output=out, calib_dir=str(root),
                           calib_size=2, eval_size=3))
    return root, out


def test_a_damaged_cache_file_is_computed_again(own_images):
    _, out = own_images
    first = evaluate_manifest(out / "manifest.json", progress=False)
    cached = sorted((out / ".effmod-cache").glob("*.npy"))
    assert len(cached) == 3, cached  # the reference and the two ONNX files
    import numpy as np

    for path in cached[:-1]:
        path.write_bytes(path.read_bytes()[:90])  # an interrupted write
    with open(cached[-1], "wb") as f:  # not an array at all
        np.savez(f, a=np.zeros(3))
    again = evaluate_manifest(out / "manifest.json", progress=False)
    assert [r.get("error") for r in again["rows"]] == [None] * 3, again["rows"]
    assert [r["sqnr_db"] for r in again["rows"]] == [r["sqnr_db"] for r in first["rows"]]
    assert all(np.load(p).shape == (3, 1000) for p in cached), "the damaged cache files were not written again"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in cached), [oct(p.stat().st_mode) for p in cached]
    left = [p.name for p in (out / ".effmod-cache").iterdir() if p.name.startswith(".") or p.is_dir()]
    assert not left, f"a temp file or work folder of the cache was left behind: {left}"
    shutil.rmtree(out / ".effmod-cache")
    (out / ".effmod-cache").symlink_to(out / "gone")
    res = CliRunner().invoke(main, ["evaluate", str(out / "manifest.json")])
    assert res.exit_code != 0 and "is a broken link in the way" in res.stderr.strip().splitlines()[-1], res.stderr


@pytest.mark.parametrize("damage", ["replaced", "undecodable"])
def test_changed_evaluation_images_are_named_not_used(own_images, samples_dir, damage):
    root, out = own_images
    victim = root / Manifest.load(out / "manifest.json").data["eval_images"][1]
    if damage == "replaced":  # still a photo, just not the one convert checked
        shutil.copy(sorted(samples_dir.glob("n*.JPEG"))[20], victim)
        want = "are not the pixels convert checked"
    else:
        victim.write_bytes(b"not a JPEG")
        want = "1 of the manifest's 3 evaluation images"
    for limit in ([], ["--limit", "3"]):  # a limit that takes the whole split checks it too
        res = CliRunner().invoke(main, ["evaluate", str(out / "manifest.json"), *limit])
        line = res.stderr.strip().splitlines()[-1]
        assert res.exit_code != 0 and want in line and "--data" in line, (limit, res.stderr)
    assert not (out / "evaluation.json").exists()
    heldout = evaluate_manifest(out / "manifest.json", heldout=True, progress=False)  # the way on that the error names
    assert heldout["images"]["count"] == (4 if damage == "replaced" else 3), heldout["images"]


def test_a_cache_it_cannot_write_is_read_and_the_rest_computed_apart(own_images, monkeypatch, caplog):
    import edge.evaluate
    from edge.errors import ConfigError

    _, out = own_images
    first = evaluate_manifest(out / "manifest.json", progress=False)
    for path in (out / ".effmod-cache").glob("logits-*"):
        path.unlink()
    real = edge.evaluate.require_writable

    def cache_read_only(folder):
        if folder.name == ".effmod-cache":
            raise ConfigError(f"cannot write into {folder} (Permission denied)")
        real(folder)

    monkeypatch.setattr(edge.evaluate, "require_writable", cache_read_only)
    monkeypatch.setattr(edge.evaluate, "_save_cached", lambda path, logits: None)  # as a read-only folder would
    again = evaluate_manifest(out / "manifest.json", progress=False)
    assert [r["sqnr_db"] for r in again["rows"]] == [r["sqnr_db"] for r in first["rows"]], again["rows"]
    assert "evaluating without writing to the cache" in caplog.text
    assert not [p for p in (out / ".effmod-cache").iterdir() if p.is_dir() or p.name.startswith("logits-")]
