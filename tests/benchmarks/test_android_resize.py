"""The NumPy emulation of the Android demo's resize behind BENCHMARKS.md's Android figures."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.android_resize import bilinear, demo_crop
from calibration.preprocess import resize_and_crop


def test_bilinear_halving_is_a_2x2_mean_and_same_size_is_identity():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
    box = a.reshape(4, 2, 5, 2, 3).astype(np.float64).mean(axis=(1, 3))
    diff = np.abs(bilinear(a, 5, 4).astype(np.float64) - box).max()
    assert diff <= 0.5, f"halving differs from the 2x2 mean by {diff} levels (rounding allows 0.5)"
    assert np.array_equal(bilinear(a, 10, 8), a), "a same-size resize changed pixels"


def test_demo_crop_takes_the_pipelines_region():
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 960x1280
    img = Image.fromarray(smooth)
    ref = np.asarray(resize_and_crop(img)).astype(int)
    for halve in (False, True):
        got = demo_crop(img, halve).astype(int)
        assert got.shape == (224, 224, 3), f"halve={halve}: shape {got.shape}"
        err = np.abs(got - ref).mean()
        assert err < 3.0, f"halve={halve}: mean |Δpixel| {err:.2f} against the bicubic pipeline on a blocky image"
