"""benchmarks/int8_fallback_cost.py: the timing-only GELU/RSQRT -> LOGISTIC swap lands in the XNNPACK delegate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow (TFLite extra) not installed")

from benchmarks.int8_fallback_cost import swap_to_logistic  # noqa: E402
from converters.to_tflite import inspect_tflite, litert_logits  # noqa: E402


def _int8_gelu_rsqrt(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(3, 3, 3, 8)).astype(np.float32) / 3)

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32)])
    def net(x):
        y = tf.nn.gelu(tf.nn.conv2d(x, w, 1, "SAME"), approximate=False)
        return y * tf.math.rsqrt(tf.reduce_mean(y * y, axis=-1, keepdims=True) + 1.0)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([net.get_concrete_function()], net)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rng.normal(size=(1, 16, 16, 3)).astype(np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    path.write_bytes(conv.convert())


def test_swapped_ops_run_in_xnnpack(tmp_path):
    src = tmp_path / "m_int8.tflite"
    _int8_gelu_rsqrt(src)
    before = inspect_tflite(src, tmp_path)
    assert before["not_delegated"] == {"GELU": 1, "RSQRT": 1}, before["not_delegated"]
    gelu_only, both = tmp_path / "gelu.tflite", tmp_path / "both.tflite"
    assert swap_to_logistic(src, gelu_only, ("GELU",)) == 1
    assert swap_to_logistic(src, both, ("GELU", "RSQRT")) == 2
    assert inspect_tflite(gelu_only, tmp_path)["not_delegated"] == {"RSQRT": 1}
    after = inspect_tflite(both, tmp_path)
    assert after["not_delegated"] == {} and after["ops"].get("LOGISTIC") == 2, after
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = litert_logits(both, pixels, tmp_path)
    assert out.shape[0] == 2 and np.isfinite(out).all(), "the swapped file does not run"


def test_round_ratios_pair_each_round_with_the_baselines():
    from benchmarks.ab_latency import round_ratios

    base, other = Path("base.tflite"), Path("other.tflite")
    samples = {base: [10.0, 12.0, 11.0, 20.0, 22.0, 21.0], other: [5.0, 6.0, 7.0, 20.0, 10.0, 11.0]}
    got = round_ratios(samples, base, rounds=2, runs=3)
    assert np.array_equal(got[base], [1.0, 1.0]), got[base]
    assert np.allclose(got[other], [11.0 / 6.0, 21.0 / 11.0]), f"per-round median ratios: {got[other]}"
