"""convert end to end on ONNX: checks, atomic output, bad input, the CLI surface."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edge.checks import sqnr_db
from edge.cli import main
from edge.efficientmod import create_model
from edge.errors import ConfigError, EffmodError
from edge.manifest import EVALUATION_FILE, Manifest
from edge.pipeline import ConvertRequest, convert
from edge.weights import file_sha256


def test_onnx_convert_records_checks(tmp_path, samples_dir, proxy_tiny_checkpoint):
    # proxy weights: every block reaches the logits, so an export that drops or garbles one fails
    res = convert(ConvertRequest(targets=["onnx"], model="efficientmod_test_tiny", weights=str(proxy_tiny_checkpoint),
                                 output=tmp_path, calib_dir=str(samples_dir), calib_size=4, eval_size=12))
    m = Manifest.load(res.manifest_path)
    assert [a.input.shape[0] for a in m.artifacts] == [1, None]
    for a in m.artifacts:
        # measured max|d| 1.2e-6, SQNR 129.6 dB (both files)
        assert a.checks["max_abs_diff"] <= 1e-5, f"{a.path}: ONNX logits max|d| vs PyTorch {a.checks}"
        assert a.checks["sqnr_db"] >= 126.0, f"{a.path}: ONNX logits SQNR vs PyTorch {a.checks}"
        assert a.checks["top1_agreement"] == 1.0, f"{a.path}: top-1 differs from PyTorch {a.checks}"
        assert a.sha256 == file_sha256(tmp_path / a.path) and a.bytes == (tmp_path / a.path).stat().st_size
    assert len(m.data["eval_images"]) == 12 and (tmp_path / "labels.txt").read_text().count("\n") == 1000
    assert not list(tmp_path.glob(".effmod-staging-*"))


@pytest.mark.parametrize("wrap", ["timm", "ddp"])
def test_upstream_format_checkpoint_onnx_matches(tmp_path, samples_dir, wrap):
    """The ONNX files hold the checkpoint's weights: their logits match a model built apart from the
    pipeline (other seed, then load_state_dict of the same tensors), not just the pipeline's own reference."""
    import numpy as np
    import onnxruntime as ort

    from benchmarks.proxy_checkpoint import proxy_state_dict

    sd = proxy_state_dict("efficientmod_xxs", seed=11)
    obj = {"state_dict": sd} if wrap == "timm" else {"model": {"module." + k: v for k, v in sd.items()}}
    ckpt = tmp_path / "ckpt.pth"
    torch.save(obj, ckpt)
    res = convert(ConvertRequest(targets=["onnx"], weights=str(ckpt), output=tmp_path / "out",
                                 calib_dir=str(samples_dir), calib_size=0, eval_size=16))
    assert res.manifest.model == "efficientmod_xxs" and res.manifest.weights_sha256 == file_sha256(ckpt)
    reference = create_model("efficientmod_xxs", seed=5)
    reference.load_state_dict(sd)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference.eval()(x).numpy()
    for a in res.manifest.artifacts:
        # measured: manifest check max|d| 2.6e-6; independent model max|d| 1.4e-6, SQNR 125.7 dB
        assert a.checks["max_abs_diff"] <= 2.5e-5, f"{a.path}: manifest check {a.checks}"
        sess = ort.InferenceSession(str(tmp_path / "out" / a.path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        got = np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(len(x))])
        diff, sqnr = float(np.abs(got - ref).max()), sqnr_db(ref, got)
        assert diff <= 1e-5 and sqnr >= 122.0, (
            f"{a.path}: logits vs an independently loaded {wrap} checkpoint: max|d| {diff:.3g} (<= 1e-5), "
            f"SQNR {sqnr:.1f} dB (>= 122)")


def test_unwritable_output_writes_nothing(tmp_path, samples_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(EffmodError, match="not writable"):
        convert(ConvertRequest(targets=["onnx"], model="efficientmod_test_tiny", output=blocker / "out",
                               calib_dir=str(samples_dir), calib_size=2, eval_size=2))


def test_failing_target_spares_others(tmp_path, samples_dir, monkeypatch):
    from edge import targets

    spec = targets.TARGETS["onnx"]
    monkeypatch.setitem(targets.TARGETS, "coreml", type(spec)(
        name="coreml", description="broken", suffix=".x", converter="json:nonexistent_function",
        precisions=targets.TARGETS["coreml"].precisions))
    res = convert(ConvertRequest(targets=["onnx", "coreml"], model="efficientmod_test_tiny", output=tmp_path,
                                 calib_dir=str(samples_dir), calib_size=2, eval_size=4, precisions=["fp32", "fp16"]))
    assert {a.target for a in res.manifest.artifacts} == {"onnx"}
    assert [(f.target, f.precision) for f in res.manifest.failures] == [("coreml", "fp16"), ("coreml", "fp32")]
    assert "nonexistent_function" in res.manifest.failures[0].error


def test_an_invalid_record_costs_only_its_artifact(tmp_path, samples_dir, monkeypatch):
    """A record the manifest refuses (a NumPy bool in a search row, the bug that cost a 26-minute s_conv run) is
    caught as the artifact is built: that artifact becomes a failure, the others are written."""
    import numpy as np

    import converters.to_onnx

    real = converters.to_onnx.convert

    def one_bad(ctx, precisions):
        results = real(ctx, precisions)
        step = {"kept_nodes": 0, "calib_agreement": 1.0, "calib_sqnr_db": 30.0, "bytes": 1, "meets_target": np.bool_(True)}
        results[-1].details = {**results[-1].details, "sensitivity": [], "search": [step]}
        return results

    def one_not_json(ctx, precisions):  # a free-form field the schema does not type
        results = real(ctx, precisions)
        results[-1].details = {**results[-1].details, "batches_checked": np.int64(3)}
        return results

    for fake, field in ((one_bad, "search[0].meets_target"), (one_not_json, "details: cannot be written as JSON")):
        monkeypatch.setattr(converters.to_onnx, "convert", fake)
        out = tmp_path / fake.__name__
        res = convert(ConvertRequest(targets=["onnx"], model="efficientmod_test_tiny", output=out,
                                     calib_dir=str(samples_dir), calib_size=2, eval_size=4))
        m = Manifest.load(res.manifest_path)
        assert [a.path for a in m.artifacts] == ["efficientmod_test_tiny.onnx"], m.artifacts
        assert [(f.target, f.precision, f.path) for f in m.failures] == [
            ("onnx", "fp32", "efficientmod_test_tiny_dynamic.onnx")], f"the failure must name the file: {m.failures}"
        assert field in m.failures[0].error and "not written" in m.failures[0].error, m.failures
        assert sorted(p.name for p in out.iterdir()) == ["efficientmod_test_tiny.onnx", "labels.txt", "manifest.json"]


def test_plan_validation():
    with pytest.raises(ConfigError, match="unknown target"):
        ConvertRequest(targets=["caffe"], output=None).plan()
    with pytest.raises(ConfigError, match="int4"):
        ConvertRequest(targets=["onnx"], output=None, precisions=["int4"]).plan()
    plan = ConvertRequest(targets=["onnx", "tflite"], output=None, precisions=["fp32", "int8"]).plan()
    assert plan == {"onnx": ["fp32"], "tflite": ["fp32", "int8"]}


def test_cli_models_table():
    out = CliRunner().invoke(main, ["models"]).output
    for name, count in [("efficientmod_xxs", "4,736,264"), ("efficientmod_xs", "6,627,544"),
                        ("efficientmod_s ", "12,897,184"), ("efficientmod_s_conv", "12,872,336")]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert count in line
    assert "test_tiny" not in out


def test_cli_bad_target_and_missing_weights(tmp_path, samples_dir):
    r = CliRunner().invoke(main, ["convert", "--target", "bogus", "--output", str(tmp_path)])
    assert r.exit_code != 0 and "bogus" in r.output
    proc = subprocess.run(
        [sys.executable, "-m", "edge.cli", "convert", "--target", "onnx", "--weights", str(tmp_path / "no.pth"),
         "--calib-dir", str(samples_dir), "--output", str(tmp_path / "out")],
        capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "not found" in errors[0]
    assert not (tmp_path / "out").exists()


def test_options_are_validated_with_defaults():
    from edge.targets import OPTIONS, validate_options

    opts = validate_options({"tflite_ranges": "minmax", "coreml_float_ops": "conv_3, linear_0", "coreml_float_head": "no"})
    assert opts["tflite_ranges"] == "minmax" and opts["coreml_form"] == OPTIONS["coreml_form"].default
    assert opts["coreml_float_ops"] == ("conv_3", "linear_0") and opts["coreml_float_head"] is False
    assert validate_options(opts) == opts
    with pytest.raises(ConfigError, match="unknown option 'tflite_range'"):
        validate_options({"tflite_range": "mse"})
    with pytest.raises(ConfigError, match="coreml_weight_threshold='many'.*whole number"):
        validate_options({"coreml_weight_threshold": "many"})
    with pytest.raises(ConfigError, match="tflite_ranges='p99'.*mse, minmax"):
        validate_options({"tflite_ranges": "p99"})
    assert validate_options({"coreml_palette_budget": "0.3"})["coreml_palette_budget"] == 0.3
    for bad in ("1.5", "-0.1", "abc", "nan", True):
        with pytest.raises(ConfigError, match="coreml_palette_budget=.*number from 0 to 1"):
            validate_options({"coreml_palette_budget": bad})


def test_parse_option_pairs_splits_at_the_first_equals_and_strips():
    from edge.targets import parse_option_pairs

    assert parse_option_pairs(["a = b", "k=x=y", "empty="]) == {"a": "b", "k": "x=y", "empty": ""}
    assert parse_option_pairs(["a=1", "a=2"]) == {"a": "2"}, "a repeated key keeps the last value"
    for bad in ("novalue", " =x"):
        with pytest.raises(ConfigError, match="is not KEY=VALUE"):
            parse_option_pairs([bad])


def test_option_table_matches_the_converters():
    pytest.importorskip("coremltools", reason="Core ML extra not installed")
    from converters import to_coreml
    from edge.targets import OPTIONS

    assert OPTIONS["coreml_form"].choices == to_coreml.FORMS
    assert OPTIONS["coreml_weight_threshold"].default == to_coreml.WEIGHT_THRESHOLD
    assert set(OPTIONS["deployment_target"].choices) == set(to_coreml.DEPLOYMENT_TARGETS)


def test_cli_rejects_bad_option_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["convert", "--target", "onnx", "--output", str(tmp_path / "o"),
                                    "--option", "tflite_ranges"])
    assert res.exit_code != 0
    assert "KEY=VALUE" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(main, ["options"])
    assert res.exit_code == 0 and "tflite_ranges" in res.output


def _add_old_entry(out, name: str = "old_fp16.tflite") -> None:
    """Record in out's manifest a TFLite fp16 file and sidecar, as a previous conversion would have."""
    import hashlib
    import json

    (out / name).write_bytes(b"an earlier conversion's file")
    (out / f"{name}.json").write_text("{}")
    m = json.loads((out / "manifest.json").read_text())
    entry = dict(m["artifacts"][0], target="tflite", precision="fp16", path=name, bytes=28,
                 sha256=hashlib.sha256(b"an earlier conversion's file").hexdigest())
    entry["input"] = dict(entry["input"], layout="NHWC", shape=[1, 224, 224, 3])
    m["artifacts"].append(entry)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("seed, kept", [(0, True), (1, False)])
def test_a_rerun_keeps_the_same_conversions_other_files_and_retires_the_rest(tmp_path, samples_dir, seed, kept):
    """Re-running onnx keeps a TFLite file of the same conversion (adding a target keeps the others); after a
    conversion from other weights (another seed of random weights) it is removed, not left unrecorded."""
    req = dict(targets=["onnx"], model="efficientmod_test_tiny", output=tmp_path, calib_dir=str(samples_dir),
               calib_size=4, eval_size=4)
    convert(ConvertRequest(**req))
    _add_old_entry(tmp_path)
    res = convert(ConvertRequest(**req, seed=seed))
    paths = [a.path for a in Manifest.load(res.manifest_path).artifacts]
    assert ("old_fp16.tflite" in paths) is kept, f"seed {seed}: manifest lists {paths}"
    for name in ("old_fp16.tflite", "old_fp16.tflite.json"):
        assert (tmp_path / name).exists() is kept, f"seed {seed}: {name} exists={not kept}, wanted {kept}"


def test_a_previous_manifest_it_cannot_read_is_named_with_the_files_it_may_have_described(tmp_path, samples_dir,
                                                                                         caplog):
    req = dict(targets=["onnx"], model="efficientmod_test_tiny", output=tmp_path, calib_dir=str(samples_dir),
               calib_size=4, eval_size=4)
    convert(ConvertRequest(**req))
    _add_old_entry(tmp_path)
    (tmp_path / "manifest.json").write_text((tmp_path / "manifest.json").read_text()[:300])  # damaged
    convert(ConvertRequest(**req))
    (warning,) = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert "old_fp16.tflite, old_fp16.tflite.json" in warning and "efficientmod_test_tiny.onnx" not in warning, warning


def test_a_rerun_retires_a_changed_file_of_the_same_conversion(tmp_path, samples_dir):
    req = dict(targets=["onnx"], model="efficientmod_test_tiny", output=tmp_path, calib_dir=str(samples_dir),
               calib_size=4, eval_size=4)
    convert(ConvertRequest(**req))
    _add_old_entry(tmp_path)
    (tmp_path / "old_fp16.tflite").write_bytes(b"edited since")
    res = convert(ConvertRequest(**req))
    assert "old_fp16.tflite" not in [a.path for a in res.manifest.artifacts]
    assert not (tmp_path / "old_fp16.tflite").exists(), "a file that no longer matches its record was kept"


def test_a_second_convert_into_a_folder_in_use_is_refused_at_once(tmp_path, samples_dir):
    """Two converts into one folder: the one finishing second read the folder's manifest before the first replaced
    it, so the first one's files would stay beside a manifest that does not describe them."""
    from edge.pipeline import prepare_output, release_staging

    out = tmp_path / "out"
    held = prepare_output(out)  # what a running convert holds
    req = ConvertRequest(targets=["onnx"], model="efficientmod_test_tiny", output=out, calib_dir=str(samples_dir),
                         calib_size=2, eval_size=2)
    try:
        with pytest.raises(ConfigError, match="another convert is writing into"):
            convert(req)
        assert [p.name for p in out.iterdir()] == [held.name], "the refused convert wrote into the folder"
    finally:
        release_staging(held)
    assert convert(req).manifest.artifacts, "the folder stayed locked after its convert ended"


def test_a_refused_convert_leaves_the_folder_the_other_one_created(tmp_path, samples_dir, monkeypatch):
    """Both started before the folder existed; the one that won the lock made it and must keep it."""
    import edge.pipeline as pl

    out = tmp_path / "new" / "out"
    real, held = pl.prepare_output, []

    def other_convert_first(output):
        output.mkdir(parents=True)  # the other convert has made the folder and locked it, not yet staged
        held.append(pl._lock_output(output))
        return real(output)

    monkeypatch.setattr(pl, "prepare_output", other_convert_first)
    try:
        with pytest.raises(ConfigError, match="another convert is writing into"):
            convert(ConvertRequest(targets=["onnx"], model="efficientmod_test_tiny", output=out,
                                   calib_dir=str(samples_dir), calib_size=2, eval_size=2))
        assert out.is_dir(), "the refused convert removed the folder the other one is converting into"
    finally:
        for fd in held:
            os.close(fd)


def test_the_python_api_refuses_what_the_cli_types_would(tmp_path):
    base = dict(targets=["onnx"], output=tmp_path)
    for bad, named in ((dict(calib_size=10.5), "calib_size"), (dict(eval_size="20"), "eval_size"),
                       (dict(seed=1.5), "seed"), (dict(seed=True), "seed"), (dict(options=None), "options"),
                       (dict(targets="onnx"), "targets"), (dict(precisions="fp32"), "precisions"),
                       (dict(input_size=256), "input_size")):
        with pytest.raises(ConfigError, match=named):
            ConvertRequest(**{**base, **bad}).plan()


def test_precision_naming_none_of_a_targets_precisions_is_refused():
    with pytest.raises(ConfigError, match="names none of coreml's precisions"):
        ConvertRequest(targets=["tflite", "coreml"], precisions=["int8"], output="x").plan()
    assert ConvertRequest(targets=["onnx", "tflite"], precisions=["int8"], output="x").plan() == \
        {"onnx": ["fp32"], "tflite": ["int8"]}, "onnx has one precision: it is built beside any --precision"


def test_convert_sweeps_staging_left_by_a_killed_conversion(tmp_path, samples_dir):
    """A staging folder whose lock nobody holds is a killed conversion's; a held one is a live conversion's."""
    import fcntl

    left = tmp_path / ".effmod-staging-killed"
    (left / "work").mkdir(parents=True)
    (left / ".owner.lock").write_text("")
    live = tmp_path / ".effmod-staging-live"  # held by another process, e.g. in another PID namespace
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"), str(live / ".owner.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = tmp_path / ".effmod-staging-unknown"  # no lock file: not ours to judge
        other.mkdir()
        convert(ConvertRequest(targets=["onnx"], model="efficientmod_test_tiny", output=tmp_path,
                               calib_dir=str(samples_dir), calib_size=0, eval_size=4))
        assert not left.exists(), "a killed conversion's staging folder was left in place"
        assert live.exists(), "a live conversion's staging folder was removed"
        assert other.exists(), "a staging folder without a lock file was removed"
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(live / ".owner.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with its holder
    os.close(fd)


def test_ios16_leaves_w8a8_out_unless_it_is_named():
    plan = ConvertRequest(targets=["coreml"], output="x", options={"deployment_target": "iOS16"}).plan()
    assert plan == {"coreml": ["fp16", "fp32", "w8", "pal6", "pal4"]}, plan
    with pytest.raises(ConfigError, match="w8a8 needs --deployment-target iOS17"):
        ConvertRequest(targets=["coreml"], precisions=["w8a8"], output="x",
                       options={"deployment_target": "iOS16"}).plan()
    no_images = ConvertRequest(targets=["coreml"], output="x", calib_size=0, options={"deployment_target": "iOS16"})
    assert "w8a8" not in no_images.plan()["coreml"], "iOS16 without calibration images was refused for w8a8"


@pytest.mark.parametrize("fail_at", [2, -1])
def test_a_failed_move_is_one_error_and_puts_the_folder_back(tmp_path, samples_dir, monkeypatch, fail_at):
    """A rename that fails in the middle of the move (2: the second entry; -1: the manifest, the last one)
    leaves the folder byte for byte as the conversion before left it: artifacts, manifest, derived files."""
    import edge.pipeline

    req = dict(targets=["onnx"], model="efficientmod_test_tiny", output=tmp_path, calib_dir=str(samples_dir),
               calib_size=0, eval_size=4)
    convert(ConvertRequest(**req))
    _add_old_entry(tmp_path)
    (tmp_path / EVALUATION_FILE).write_text("{}")
    (tmp_path / "labels.txt").write_text("an earlier conversion's labels\n")  # the first entry the rerun moves
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real, calls = os.replace, []

    def fails_once(src, dest):
        src, dest = Path(src), Path(dest)
        if dest.parent == tmp_path and src.parent.name.startswith(edge.pipeline.STAGING_PREFIX):
            calls.append(dest)
            last = dest.name == "manifest.json"
            if (fail_at == -1 and last) or (fail_at > 0 and len(calls) == fail_at and not last):
                raise PermissionError(13, "Permission denied", str(dest))
        real(src, dest)

    monkeypatch.setattr(os, "replace", fails_once)
    with pytest.raises(EffmodError, match="could not write .*Permission denied.*put the folder back.*convert again"):
        convert(ConvertRequest(**req, seed=1))
    monkeypatch.undo()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(map(str, after)) == sorted(map(str, before)), "the folder's files changed after a failed move"
    changed = [str(k) for k in before if after[k] != before[k]]
    assert not changed, f"{changed} differ from the previous conversion's after a failed move"
    assert len(calls) >= 2, calls


def _tree(root):
    """Every entry under ``root``: a file's bytes, a symlink's target, a folder as None."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes()
    return out


def _swap_fixture(tmp_path):
    """An output folder with a file, a package folder and a symlink; staged replacements and one new entry."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".effmod-staging-x"
    (out / "m.mlpackage" / "Data").mkdir(parents=True)
    (out / "m.mlpackage" / "Data" / "w.bin").write_bytes(b"old weights")
    (out / "a.tflite").write_bytes(b"old a")
    (out / "link.json").symlink_to("a.tflite")
    (out / "evaluation.json").write_text("old evaluation")
    (staging / "m.mlpackage" / "Data").mkdir(parents=True)
    (staging / "m.mlpackage" / "Data" / "w.bin").write_bytes(b"new weights")
    for name in ("a.tflite", "link.json", "new.onnx"):
        (staging / name).write_bytes(b"new " + name.encode())
    return out, staging


def _outside_staging(out):
    return {k: v for k, v in _tree(out).items() if not k.startswith(".effmod-staging")}


@pytest.mark.parametrize("fail_on", ["new.onnx", "link.json", None])
def test_swap_undo_restores_files_packages_and_symlinks(tmp_path, monkeypatch, fail_on):
    from edge.pipeline import ASIDE_PREFIX, _Swap

    out, staging = _swap_fixture(tmp_path)
    before = _outside_staging(out)
    real = os.replace

    def failing(src, dest):
        if Path(dest) == out / str(fail_on) and Path(src).parent == staging:
            raise PermissionError(13, "Permission denied", str(dest))
        real(src, dest)

    monkeypatch.setattr(os, "replace", failing)
    swap = _Swap()
    assert swap.remove(out / "evaluation.json") and not swap.remove(out / "bench.json")
    try:
        for name in ("a.tflite", "m.mlpackage", "new.onnx", "link.json"):
            swap.put(staging / name, out / name)
    except PermissionError:
        assert fail_on is not None
    assert swap.undo() == []
    after = _outside_staging(out)
    assert after == before, f"after undo the folder differs: {sorted(set(after) ^ set(before))}"
    assert not list(out.glob(ASIDE_PREFIX + "*"))


def test_swap_commit_removes_what_it_set_aside(tmp_path):
    from edge.pipeline import ASIDE_PREFIX, _Swap

    out, staging = _swap_fixture(tmp_path)
    swap = _Swap()
    swap.remove(out / "evaluation.json")
    for name in ("a.tflite", "m.mlpackage", "new.onnx", "link.json"):
        swap.put(staging / name, out / name)
    swap.commit()
    assert (out / "m.mlpackage" / "Data" / "w.bin").read_bytes() == b"new weights"
    assert (out / "link.json").read_bytes() == b"new link.json" and not (out / "link.json").is_symlink()
    assert not (out / "evaluation.json").exists() and not list(out.glob(ASIDE_PREFIX + "*"))


def test_swap_keeps_what_it_cannot_put_back_under_its_aside_name(tmp_path, monkeypatch, caplog):
    """A package whose new copy cannot be removed: the old one stays beside it, named, never deleted, and the
    next conversion into the folder says so."""
    import edge.pipeline
    from edge.pipeline import ASIDE_PREFIX, _Swap, prepare_output

    out, staging = _swap_fixture(tmp_path)
    swap = _Swap()
    swap.put(staging / "m.mlpackage", out / "m.mlpackage")

    def rmtree_fails(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(edge.pipeline.shutil, "rmtree", rmtree_fails)
    (left,) = swap.undo()
    assert left.name.startswith(ASIDE_PREFIX) and (left / "Data" / "w.bin").read_bytes() == b"old weights"
    monkeypatch.undo()
    edge.pipeline._unlock_staging(prepare_output(out))
    assert any(left.name in r.getMessage() and "rename it back" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert left.exists(), "a set-aside entry was deleted by the next conversion's sweep"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signals_wait_for_the_held_block_even_with_other_threads(tmp_path, sig):
    """torch's threads took the signal while the main thread's mask held it: the handler ran mid-block."""
    import signal

    script = tmp_path / "held.py"
    script.write_text(
        "import os, signal, sys, time, torch\n"
        "torch.set_num_threads(2); torch.ones(512, 512) @ torch.ones(512, 512)\n"
        "from edge.pipeline import _signals_held\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # also when pytest runs with SIGINT ignored\n"
        "done = 0\n"
        "try:\n"
        "    with _signals_held():\n"
        "        for done in range(1, 21):\n"
        "            if done == 2: print('ready', flush=True)\n"
        "            time.sleep(0.1)\n"
        "finally:\n"
        "    print('steps', done, flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert "steps 20" in out, f"{sig} interrupted the held block: {out!r} {err[-300:]!r}"
    assert proc.returncode != 0, f"{sig} was swallowed: exit {proc.returncode}"


def test_a_rerun_on_same_named_but_other_photos_retires_the_old_files(tmp_path, samples_dir):
    photos = sorted(samples_dir.glob("n*.JPEG"))[:6]
    images = tmp_path / "images"
    images.mkdir()
    for p in photos:
        os.symlink(p, images / p.name)
    out = tmp_path / "out"
    req = dict(targets=["onnx"], model="efficientmod_test_tiny", output=out, calib_dir=str(images), calib_size=0,
               eval_size=4)
    convert(ConvertRequest(**req))
    _add_old_entry(out)
    for p, other in zip(photos, reversed(photos)):  # the same names, other pixels
        (images / p.name).unlink()
        os.symlink(other, images / p.name)
    res = convert(ConvertRequest(**req))
    assert "old_fp16.tflite" not in [a.path for a in res.manifest.artifacts], "kept a file checked on other photos"
    assert not (out / "old_fp16.tflite").exists()
