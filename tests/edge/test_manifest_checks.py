"""Manifest schema strictness and the comparison metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edge.checks import (
    NearTies,
    Threshold,
    check_record,
    compare_logits,
    evaluate_threshold,
    noise_limited_agreement,
    sqnr_db,
    images_to_settle,
    sqnr_for_agreement,
    wilson_interval,
)
from edge.errors import ConfigError
from edge.manifest import Manifest

GOOD = {
    "model": "efficientmod_xxs", "weights": "untrained",
    "artifacts": [{
        "target": "onnx", "precision": "fp32", "path": "m.onnx", "bytes": 10, "sha256": "a" * 64,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": [None, 3, 224, 224],
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "quantization": None,
                  "normalization": "app"},
        "output": {"name": "logits", "layout": "NC", "dtype": "float32", "shape": [1, 1000]},
        "checks": {"max_abs_diff": 0.0}, "details": {},
    }],
}


def test_a_version_1_manifest_reads_as_version_2():
    """Version 1 had no normalization field: Core ML image inputs normalized in the model, the rest in the app."""
    d = copy.deepcopy(GOOD)
    d["schema_version"] = 1
    del d["artifacts"][0]["input"]["normalization"]
    coreml = copy.deepcopy(d["artifacts"][0])
    coreml.update(target="coreml", precision="fp16", path="m.mlpackage")
    coreml["input"].update(name="image", layout="image", dtype="image", shape=[1, 3, 224, 224], quantization=None)
    d["artifacts"].append(coreml)
    m = Manifest.from_dict(d)
    assert m.schema_version == 2 == Manifest(model="m", weights="w").schema_version
    assert [a.input.normalization for a in m.artifacts] == ["app", "in_model"], m.artifacts
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_round_trip():
    m = Manifest.from_dict(GOOD)
    d = m.to_dict()
    assert Manifest.from_dict(d).to_dict() == d
    assert m.artifacts[0].input.shape[0] is None
    for key in ("model", "weights"):
        assert d[key] == GOOD[key], f"{key}: {d[key]!r} after the round trip, {GOOD[key]!r} before"
    (art,) = d["artifacts"]
    for key, want in GOOD["artifacts"][0].items():
        got = art[key]
        if key == "output":  # optional fields come back as None
            got = {k: v for k, v in got.items() if k in want or v is not None}
        assert got == want, f"artifact {key}: {got!r} after the round trip, {want!r} before"


@pytest.mark.parametrize("mutate,named", [
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d["artifacts"][0].update(colour="red"), "colour"),
    (lambda d: d["artifacts"][0]["input"].update(scale=2), "scale"),
    (lambda d: d["artifacts"][0].update(sha256="xyz"), "xyz"),
    (lambda d: d["artifacts"][0].update(path="/abs/m.onnx"), "/abs/m.onnx"),
    (lambda d: d["artifacts"][0].update(path="../m.onnx"), "../m.onnx"),
    (lambda d: d["artifacts"][0].update(target="caffe"), "caffe"),
    (lambda d: d["artifacts"][0].update(precision="int4"), "int4"),
    (lambda d: d["artifacts"][0].update(bytes="10"), "'10'"),
    (lambda d: d["artifacts"][0]["input"].update(layout="CHW"), "CHW"),
    (lambda d: d["artifacts"][0]["input"].update(normalization="maybe"), "maybe"),
    (lambda d: d["artifacts"][0]["input"].update(normalization="app", std=[0.2, 0.2]), r"std: normalization 'app'"),
    (lambda d: d["artifacts"][0]["input"].update(std=[0.2, 0.0, 0.2]), r"std: \[0.2, 0.0, 0.2\]"),
    (lambda d: d.update(schema_version=3), "schema_version: 3 is not one this effmod-edge reads .1, 2.; upgrade"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d["artifacts"][0]["checks"].update(top1_agreement_ci95=[float("nan"), 1.0]), r"ci95: \[nan, 1.0\]"),
    (lambda d: d["artifacts"][0]["checks"].update(top1_agreement_ci95=[0.1, float("inf")]), r"0 <= low <= high <= 1"),
    (lambda d: d["artifacts"][0]["checks"].update(top1_agreement_ci95=[0.9, 0.8]), r"0 <= low <= high <= 1"),
    (lambda d: d.update(failures=[{"target": "onnx", "precision": "fp32", "error": "x", "seconds": 1.0,
                                   "path": "../m.onnx"}]), r"failures\[0\]\.path: '\.\./m\.onnx'"),
])
def test_rejects_bad_values_naming_them(mutate, named):
    d = copy.deepcopy(GOOD)
    mutate(d)
    with pytest.raises(ConfigError, match=named.replace("/", ".").replace("'", ".")):
        Manifest.from_dict(d)


MIXED_DETAILS = {  # the int8-mixed fields the report reads, as convert writes them
    "kept_float_op_types": ["GELU", "RSQRT"], "layernorm_stats_float": True, "target_met_on_calibration": False,
    "kept_float_nodes": [{"tensor": "t1", "op": "CONV_2D", "drop_db": 0.4}],
    "search": [{"layernorm_stats_float": False, "adds_float": False, "kept_nodes": 0, "calib_agreement": 0.9,
                "calib_sqnr_db": 24.0, "bytes": 4000000, "meets_target": False, "latency_ms": 5.1,
                "latency_vs_first_step": 1.0, "ended_search": "gained < 0.3 dB over the step before"}],
    "sensitivity": [{"op": "CONV_2D", "tensor": "t1", "drop_db": 0.4}],
}


@pytest.mark.parametrize("mutate,named", [
    (lambda d: d.update(search="none"), r"details\.search: 'none' is not a list"),
    (lambda d: d.pop("search"), r"details\.search: None is not a list"),
    (lambda d: d["search"][0].pop("calib_sqnr_db"), r"details\.search\[0\]: missing field 'calib_sqnr_db'"),
    (lambda d: d["search"][0].update(bytes="4 MB"), r"details\.search\[0\]\.bytes: expected int, got '4 MB'"),
    (lambda d: d["search"][0].update(latency_ms=None), r"details\.search\[0\]\.latency_ms: expected a number"),
    (lambda d: d["search"][0].pop("latency_vs_first_step"), r"details\.search\[0\]: latency_ms and latency_vs_first"),
    (lambda d: d["sensitivity"].append("CONV_2D"), r"details\.sensitivity\[1\]: expected an object"),
    (lambda d: d["sensitivity"][0].update(drop_db="big"), r"details\.sensitivity\[0\]\.drop_db: expected a number"),
    (lambda d: d.update(kept_float_op_types="GELU"), r"details\.kept_float_op_types: expected a list"),
])
def test_mixed_details_the_report_reads_are_validated(mutate, named):
    d = copy.deepcopy(GOOD)
    d["artifacts"][0]["details"] = copy.deepcopy(MIXED_DETAILS)
    assert Manifest.from_dict(d).artifacts[0].details == MIXED_DETAILS
    mutate(d["artifacts"][0]["details"])
    with pytest.raises(ConfigError, match=r"artifacts\[0\]\." + named):
        Manifest.from_dict(d)


def test_sqnr_of_known_noise():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 1000))
    noisy = ref + 0.01 * rng.standard_normal(ref.shape)
    assert sqnr_db(ref, noisy) == pytest.approx(40.0, abs=0.2)
    assert sqnr_db(ref, ref) == float("inf")


def test_compare_logits_agreement_and_topk():
    ref = np.array([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    got = np.array([[2.0, 3.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    m = compare_logits(ref, got, np.array([1, -1]))
    assert m["top1_agreement"] == 0.5 and m["max_abs_diff"] == 1.0
    assert m["labelled_images"] == 1 and m["top1"] == 1.0 and m["reference_top1"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, got[:1])


def test_threshold_misses_are_named():
    metrics = {"max_abs_diff": 2e-4, "sqnr_db": 20.0, "top1_agreement": 0.9}
    misses = evaluate_threshold(metrics, Threshold(max_abs=1e-4, min_sqnr_db=25, min_agreement=0.99))
    assert len(misses) == 3 and "max |Δ|" in misses[0] and "SQNR" in misses[1] and "agreement" in misses[2]
    rec = check_record(metrics, Threshold(min_sqnr_db=10))
    assert rec["passed"] and rec["threshold"] == {"min_sqnr_db": 10}


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_inf_or_nan_logits_miss_an_agreement_only_bar(bad):
    """Core ML w8 and the palettes have only an agreement bar; one image of fp16-overflowed logits must miss it."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((100, 1000)).astype(np.float32)
    got = ref.copy()
    got[3, 7] = bad
    metrics = compare_logits(ref, got)
    rec = check_record(metrics, Threshold(min_agreement=0.99), NearTies(ref))
    assert metrics["nonfinite_logits"] == 1 and not rec["passed"], rec
    assert "1 logits are inf or NaN" in rec["misses"][0], rec["misses"]
    assert np.isnan(metrics["cosine"]), f"cosine of an image with {bad} logits must not read as a match: {metrics}"
    assert rec.get("near_ties") is None, f"no near-ties figure from a non-finite SQNR: {rec.get('near_ties')}"
    assert compare_logits(ref, ref)["nonfinite_logits"] == 0


def test_an_agreement_bar_is_printed_as_set():
    (miss,) = evaluate_threshold({"max_abs_diff": 0.0, "sqnr_db": 30.0, "top1_agreement": 0.9949},
                                 Threshold(min_agreement=0.995))
    assert miss.endswith("< 99.5%"), f"the bar reads rounded: {miss}"


def _near_tied_logits(rng: np.random.Generator) -> np.ndarray:
    ref = rng.standard_normal((200, 50))
    ref[:40, 1] = ref[:40].max(1) - 0.02  # 40 images with a near-tied runner-up
    return ref


@pytest.mark.parametrize("db", [10.0, 20.0, 30.0])
def test_noise_limited_agreement_matches_monte_carlo(db):
    rng = np.random.default_rng(0)
    ref = _near_tied_logits(rng)
    sigma = np.sqrt(np.sum(ref**2) / ref.size / 10 ** (db / 10))
    trials = [np.mean((ref + sigma * rng.standard_normal(ref.shape)).argmax(1) == ref.argmax(1)) for _ in range(300)]
    assert noise_limited_agreement(ref, db) == pytest.approx(float(np.mean(trials)), abs=0.005)


def test_sqnr_for_agreement_inverts_and_near_ties_raise_it():
    rng = np.random.default_rng(0)
    ref = _near_tied_logits(rng)
    needed = sqnr_for_agreement(ref, 0.99)
    assert noise_limited_agreement(ref, needed) == pytest.approx(0.99, abs=0.002)
    clear = ref.copy()
    clear[:40, 1] -= 1.0  # the same images without the near-ties
    assert sqnr_for_agreement(clear, 0.99) < needed - 5
    tied = ref.copy()
    tied[0, 1] = tied[0].max()  # an exact tie caps agreement below 100 %
    assert sqnr_for_agreement(tied, 0.999) == float("inf")
    assert noise_limited_agreement(ref, float("inf")) == 1.0


def test_agreement_miss_says_what_near_ties_allow():
    rng = np.random.default_rng(0)
    ref = _near_tied_logits(rng)
    got = ref + 0.05 * rng.standard_normal(ref.shape)
    metrics = compare_logits(ref, got)
    rec = check_record(metrics, Threshold(min_agreement=0.99), NearTies(ref))
    ties = rec["near_ties"]
    assert ties["expected_agreement"] == pytest.approx(noise_limited_agreement(ref, metrics["sqnr_db"]), abs=1e-4)
    assert ties["sqnr_db_for_min_agreement"] == sqnr_for_agreement(ref, 0.99)
    assert not rec["passed"] and "i.i.d. noise at this SQNR would give" in rec["misses"][0]
    assert "near_ties" not in check_record(metrics, Threshold(min_sqnr_db=10), NearTies(ref))
    tied = ref.copy()
    tied[:, 1] = tied.max(1)  # every top-1 exactly tied: no SQNR reaches the bar, and JSON has no infinity
    rec = check_record(compare_logits(tied, got), Threshold(min_agreement=0.99), NearTies(tied))
    assert rec["near_ties"]["sqnr_db_for_min_agreement"] is None and "tied top-1s" in rec["misses"][0]


def test_agreement_interval_is_wilsons_and_covers():
    lo, hi = wilson_interval(99, 100)
    assert (lo, hi) == pytest.approx((0.9455, 0.9983), abs=5e-4), (lo, hi)
    rng = np.random.default_rng(0)
    hits = rng.binomial(100, 0.97, size=4000)
    covered = np.mean([a <= 0.97 <= b for a, b in (wilson_interval(int(k), 100) for k in hits)])
    assert 0.93 <= covered <= 0.99, f"95 % interval covered the true rate in {covered:.1%} of draws"


def test_agreement_bar_resolved_only_when_the_interval_clears_it():
    ref = np.tile(np.arange(10.0), (100, 1))
    got = ref.copy()
    got[0, 0] = 20.0  # one image of 100 changes its top-1
    m = compare_logits(ref, got)
    assert m["top1_agreement"] == 0.99 and m["top1_agreement_ci95"] == pytest.approx([0.9455, 0.9983], abs=5e-4), m
    bar = Threshold(min_agreement=0.99)
    rec = check_record(m, bar)
    assert rec["passed"] and rec["agreement_bar_resolved"] is False, "99 of 100 cannot settle a 99 % bar"
    big = compare_logits(np.tile(ref, (8, 1)), np.concatenate([got] * 4 + [ref] * 4))
    assert big["top1_agreement"] == pytest.approx(0.995) and check_record(big, bar)["agreement_bar_resolved"] is False
    far = check_record({**m, "top1_agreement": 773 / 800, "images": 800, "top1_agreement_hits": 773}, bar)
    assert not far["passed"] and far["agreement_bar_resolved"] is True, far
    n = images_to_settle(0.99)
    assert wilson_interval(n, n)[0] >= 0.99 > wilson_interval(n - 1, n - 1)[0], n
    n = images_to_settle(0.95, 0.98)  # 98 of 100 cannot settle 95 %; 100 is more than all-agreeing would need (73)
    assert n > 100 and wilson_interval(0.98 * n, n)[0] >= 0.95 > wilson_interval(0.98 * (n - 1), n - 1)[0], n
    n = images_to_settle(0.99, 0.94)  # a miss: the interval's top must fall below the bar
    assert wilson_interval(0.94 * n, n)[1] < 0.99 <= wilson_interval(0.94 * (n - 1), n - 1)[1], n
    assert images_to_settle(0.99, 0.99) == float("inf")
    for copies, settled in ((3, False), (4, True)):  # 300 of 300 agreeing cannot settle 99 %, 400 of 400 can
        same = np.tile(ref, (copies, 1))
        assert check_record(compare_logits(same, same), bar)["agreement_bar_resolved"] is settled, copies


def test_the_recorded_interval_never_rounds_inward_past_the_bar():
    """380 of 380 agreeing: the Wilson bound is 98.9992 %; rounded to nearest it read 99.0 % while the bar was unresolved."""
    from edge.checks import interval_text

    ref = np.eye(380, 10, dtype=np.float32)
    record = check_record(compare_logits(ref, ref), Threshold(min_agreement=0.99))
    lo, hi = record["top1_agreement_ci95"]
    assert lo < 0.99 and hi == 1.0, f"recorded interval {lo}-{hi} for 380/380; the true lower bound is 0.989992"
    assert record["agreement_bar_resolved"] is False
    assert interval_text(record["top1_agreement_ci95"]) == "98.9-100.0"


def test_an_unreadable_artifact_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    import edge.manifest
    from edge.manifest import artifact_problem

    m = Manifest.from_dict(copy.deepcopy(GOOD))
    (tmp_path / "m.onnx").write_bytes(b"x")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(edge.manifest, "artifact_digest", unreadable)
    problem = artifact_problem(tmp_path, m.artifacts[0])
    assert problem and "m.onnx" in problem and "Permission denied" in problem, problem


def test_a_tflite_file_without_its_sidecar_is_a_problem(tmp_path):
    import hashlib
    from dataclasses import replace

    from edge.manifest import artifact_problem

    (tmp_path / "m.tflite").write_bytes(b"model")
    a = replace(Manifest.from_dict(copy.deepcopy(GOOD)).artifacts[0], target="tflite", path="m.tflite",
                sha256=hashlib.sha256(b"model").hexdigest())
    problem = artifact_problem(tmp_path, a)
    assert problem and "m.tflite.json" in problem and "missing" in problem, problem
    (tmp_path / "m.tflite.json").write_text("{}")
    assert artifact_problem(tmp_path, a) is None


def test_a_failure_without_a_path_is_written_without_one():
    """Manifests effmod-edge writes stay readable by the version before Failure.path where they can."""
    d = copy.deepcopy(GOOD)
    d["failures"] = [{"target": "tflite", "precision": "int8", "error": "x", "seconds": 1.0},
                     {"target": "onnx", "precision": "fp32", "error": "y", "seconds": 2.0, "path": "m_dynamic.onnx"}]
    out = Manifest.from_dict(d).to_dict()["failures"]
    assert "path" not in out[0] and out[1]["path"] == "m_dynamic.onnx", out
