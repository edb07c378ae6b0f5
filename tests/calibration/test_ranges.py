"""MSE-optimal activation ranges: lower measured int8 error than min/max, never worse."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.ranges import HistogramObserver, mse_range, mse_symmetric_bound


def _fake_quant_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Measured error of asymmetric int8 quantization of ``x`` with range [lo, hi] (0 representable)."""
    scale = (hi - lo) / 255
    zp = np.round(-128 - lo / scale)
    q = np.clip(np.round(x / scale + zp), -128, 127)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def _observe(x: np.ndarray) -> HistogramObserver:
    obs = HistogramObserver({"t": (float(x.min()), float(x.max()))})
    for part in np.array_split(x, 4):
        obs.update("t", part)
    return obs


@pytest.mark.parametrize(
    "kind, min_gain_db",
    [("gaussian", 0.5), ("post_gelu", 0.5), ("outliers", 1.0)],
)
def test_mse_range_beats_min_max(kind, min_gain_db):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(400_000)
    if kind == "post_gelu":
        x = x * 0.5 * (1 + np.tanh(0.79788456 * (x + 0.044715 * x**3)))
    if kind == "outliers":  # a few huge activations, as trained transformers have
        x[rng.choice(len(x), 20, replace=False)] *= 60
    obs = _observe(x)
    a, b = obs.mse_ranges()["t"]
    assert a <= 0.0 <= b
    base = _fake_quant_mse(x, float(x.min()), float(x.max()))
    got = _fake_quant_mse(x, a, b)
    gain_db = 10 * np.log10(base / got)
    assert gain_db >= min_gain_db, f"{kind}: MSE range [{a:.3g}, {b:.3g}] gains only {gain_db:.2f} dB over min/max"


def test_mse_range_keeps_a_two_level_tensor():
    """A tensor with two values must keep both: clipping either costs more than it saves."""
    x = np.array([0.0] * 1000 + [5.0] * 1000)
    a, b = _observe(x).mse_ranges()["t"]
    assert b >= 5.0 - 5.0 / 2048, (a, b)


def test_degenerate_ranges_are_left_alone():
    obs = HistogramObserver({"const": (1.0, 1.0), "nan": (float("nan"), 1.0), "ok": (-1.0, 1.0)})
    assert set(obs.hist) == {"ok"}
    assert mse_range(np.zeros(2048), -1.0, 1.0) == (-1.0, 1.0)


def _fake_quant_sym_mse(x: np.ndarray, t: float) -> float:
    """Measured error of symmetric int8 quantization (codes -127..127) with bound ``t``."""
    scale = t / 127
    return float(np.mean((np.clip(np.round(x / scale), -127, 127) * scale - x) ** 2))


@pytest.mark.parametrize("kind, min_gain_db", [("gaussian", 1.5), ("outliers", 2.5), ("one_sided", 1.2)])
def test_mse_symmetric_bound_beats_max_abs(kind, min_gain_db):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(400_000)
    if kind == "outliers":
        x[rng.choice(len(x), 20, replace=False)] *= 60
    if kind == "one_sided":  # e.g. a post-GELU conv input: the negative half of the grid is wasted either way
        x = np.abs(x)
    t = _observe(x).mse_bounds()["t"]
    full = float(np.abs(x).max())
    assert 0 < t <= full * (1 + 1e-3)
    gain_db = 10 * np.log10(_fake_quant_sym_mse(x, full) / _fake_quant_sym_mse(x, t))
    assert gain_db >= min_gain_db, f"{kind}: bound {t:.3g} (max |x| {full:.3g}) gains only {gain_db:.2f} dB"


def test_mse_symmetric_bound_of_empty_histogram_is_max_abs():
    assert mse_symmetric_bound(np.zeros(2048), -3.0, 1.0) == 3.0


@pytest.mark.parametrize("share", [0.5, 0.9, 0.97])
def test_mostly_zero_tensors_are_not_clipped_harder_than_min_max(share):
    """Exact zeros are on the int8 grid: charging them rounding error made the MSE range clip too hard."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    x[rng.random(x.size) < share] = 0.0
    obs = _observe(x)
    lo, hi = obs.mse_ranges()["t"]
    mse, minmax = _fake_quant_mse(x, lo, hi), _fake_quant_mse(x, float(x.min()), float(x.max()))
    assert mse <= minmax, f"{share:.0%} zeros: MSE range [{lo:.2f}, {hi:.2f}] error {mse:.3e} > min/max {minmax:.3e}"
    t = obs.mse_bounds()["t"]
    full = float(np.abs(x).max())
    assert _fake_quant_sym(x, t) <= _fake_quant_sym(x, full), f"{share:.0%} zeros: symmetric bound {t:.2f} loses"


def _fake_quant_sym(x: np.ndarray, t: float) -> float:
    scale = t / 127
    return float(np.mean((np.clip(np.round(x / scale), -128, 127) * scale - x) ** 2))


def test_non_finite_values_are_left_out_of_the_histogram():
    obs = HistogramObserver({"t": (-1.0, 1.0)}, bins=8)
    obs.update("t", np.array([np.nan, np.inf, -np.inf, 0.99, -0.99, 1e300, 0.0, 0.0]))
    assert obs.hist["t"].tolist() == [1, 0, 0, 0, 0, 0, 0, 2], obs.hist["t"]  # exact zeros cost nothing: not counted
