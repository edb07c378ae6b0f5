"""Manifest schema strictness and the comparison metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edge.checks import Threshold, check_record, compare_logits, evaluate_threshold, sqnr_db
from edge.errors import ConfigError
from edge.manifest import Manifest

GOOD = {
    "model": "efficientmod_xxs", "weights": "untrained",
    "artifacts": [{
        "target": "onnx", "precision": "fp32", "path": "m.onnx", "bytes": 10, "sha256": "a" * 64,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": [None, 3, 224, 224],
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "quantization": None},
        "output": {"name": "logits", "layout": "NC", "dtype": "float32", "shape": [1, 1000]},
        "checks": {"max_abs_diff": 0.0}, "details": {},
    }],
}


def test_round_trip():
    m = Manifest.from_dict(GOOD)
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()
    assert m.artifacts[0].input.shape[0] is None


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
    (lambda d: d.pop("model"), "model"),
])
def test_rejects_bad_values_naming_them(mutate, named):
    d = copy.deepcopy(GOOD)
    mutate(d)
    with pytest.raises(ConfigError, match=named.replace("/", ".").replace("'", ".")):
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
