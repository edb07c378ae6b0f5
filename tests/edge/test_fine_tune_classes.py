"""A fine-tune's own head: other class counts load, convert and verify, with the user's class names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edge.cli import main
from edge.efficientmod import create_model
from edge.evaluate import evaluate_manifest
from edge.manifest import Manifest
from edge.pipeline import ConvertRequest, convert
from edge.weights import load_model

TINY = "efficientmod_test_tiny"
NAMES = ["cat", "dog", "bird", "cat", "fish", "frog", "horse", "ship", "truck", "plane"]  # "cat" twice on purpose


@pytest.fixture(scope="module")
def ten_class_checkpoint(tmp_path_factory) -> tuple:
    model = create_model(TINY, seed=3, num_classes=10)
    with torch.no_grad():  # a head that is not near-uniform, so a garbled head shows in the logits
        model.head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("ft") / "ten.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 30}, path)
    labels = path.with_name("names.txt")
    labels.write_text("\n".join(NAMES) + "\n")
    return path, labels, model


def test_a_ten_class_head_is_detected_and_loads_bit_exact(ten_class_checkpoint):
    path, _, model = ten_class_checkpoint
    for wanted in (None, TINY):
        loaded = load_model(wanted, path)
        assert (loaded.variant, loaded.num_classes) == (TINY, 10), (wanted, loaded.variant, loaded.num_classes)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        diff = (loaded.model(x) - model(x)).abs().max().item()
        assert diff == 0.0, f"--model {wanted}: logits differ by {diff} from the fine-tune's own model"


def test_convert_verifies_every_target_with_the_users_class_names(ten_class_checkpoint, tmp_path, samples_dir):
    path, labels, _ = ten_class_checkpoint
    out = tmp_path / "out"
    res = convert(ConvertRequest(targets=["onnx", "tflite", "coreml"], precisions=["fp32"], weights=str(path),
                                 labels=str(labels), output=out, calib_dir=str(samples_dir), calib_size=0,
                                 eval_size=8))
    m = Manifest.load(res.manifest_path)
    assert (m.num_classes, m.imagenet_classes) == (10, False)
    assert not m.failures, m.failures
    assert (out / "labels.txt").read_text().splitlines() == NAMES
    assert {a.target for a in m.artifacts} == {"onnx", "tflite", "coreml"}
    for a in m.artifacts:
        assert a.output.shape[-1] == 10, f"{a.path}: output shape {a.output.shape}"
        assert a.checks["max_abs_diff"] <= 1e-4, f"{a.path}: max|Δ| {a.checks['max_abs_diff']} against PyTorch"
        assert "top1" not in a.checks, f"{a.path}: a top-1 against ImageNet labels for a 10-class fine-tune"
    side = json.loads((out / f"{TINY}_fp32.tflite.json").read_text())
    assert side["output"]["shape"] == [1, 10] and "10 classes" in side["output"]["meaning"]
    coreml = next(a for a in m.artifacts if a.target == "coreml")
    if "classifier" in coreml.details:  # fp32 has no classifier package; fp16's is checked in the slow tests
        assert coreml.details["classifier"]["label_agreement_with_logits_package"] == 1.0
    rows = evaluate_manifest(res.manifest_path, progress=False)["rows"]
    assert all("top1" not in r for r in rows), [r.get("top1") for r in rows]
    assert all(r["sqnr_db"] > 80 for r in rows if "error" not in r), rows


def test_coreml_classifier_uses_the_users_names(ten_class_checkpoint, tmp_path, samples_dir):
    from converters.to_coreml import classifier_labels

    assert classifier_labels(NAMES)[0] == "cat (0)" and classifier_labels(NAMES)[3] == "cat (3)"
    assert classifier_labels(NAMES)[1] == "dog"
    clash = classifier_labels(["cat", "cat (2)", "cat"])  # the suffix that makes the second cat unique is a name
    assert len(set(clash)) == 3 and clash[1] == "cat (2)", f"two classes share a label in Core ML's dictionary: {clash}"
    imagenet = classifier_labels()
    assert len(set(imagenet)) == 1000 and "crane (n02012849)" in imagenet, "ImageNet's labels changed"
    path, labels, model = ten_class_checkpoint
    out = tmp_path / "out"
    res = convert(ConvertRequest(targets=["coreml"], precisions=["fp16"], weights=str(path), labels=str(labels),
                                 output=out, calib_dir=str(samples_dir), calib_size=0, eval_size=8))
    (a,) = Manifest.load(res.manifest_path).artifacts
    cls = a.details["classifier"]
    assert cls["label_agreement_with_logits_package"] == 1.0, cls
    assert "labels.txt" in cls["labels"]


@pytest.mark.parametrize("text, needle", [
    ("a\nb\nc\n", "has 3 names but the model has 10 classes"),
    ("\n".join(["x"] * 4 + [""] + ["y"] * 5) + "\n", "line 5 is empty"),
])
def test_a_labels_file_that_does_not_fit_is_refused_before_anything_is_written(ten_class_checkpoint, tmp_path,
                                                                                 samples_dir, text, needle):
    path, _, _ = ten_class_checkpoint
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", "--target", "onnx", "--weights", str(path), "--labels", str(bad),
                                    "--calib-dir", str(samples_dir), "--output", str(out)])
    last = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: ") and needle in last, (res.exit_code, res.stderr)
    assert not out.exists(), "a refused --labels left an output folder"


def test_without_labels_the_classes_are_numbered(ten_class_checkpoint, tmp_path, samples_dir):
    path, _, _ = ten_class_checkpoint
    res = convert(ConvertRequest(targets=["onnx"], weights=str(path), output=tmp_path / "o",
                                 calib_dir=str(samples_dir), calib_size=0, eval_size=4))
    assert (tmp_path / "o" / "labels.txt").read_text().split() == [f"class_{i}" for i in range(10)]
    assert np.isfinite(res.manifest.artifacts[0].checks["sqnr_db"])
