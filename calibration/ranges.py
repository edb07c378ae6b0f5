"""Activation ranges for int8: histograms of calibration activations, MSE-optimal clipping.

Min/max calibration spends int8 levels on the few most extreme values a tensor
ever took; a range that clips them can give a lower total error (clipping error
of the tails plus rounding error Δ²/12 of everything inside). ``mse_range``
picks, from candidate bounds at tail quantiles, the pair that minimises that
expected squared error for a histogram. Exact zeros (padding, ReLU) are left
out of the histograms: zero is on every candidate's grid and inside every
candidate range, so they cost nothing whatever the range. Pure NumPy, no framework.
"""

from __future__ import annotations

import numpy as np

BINS = 2048
# tail mass a candidate bound may clip: 0 (min/max) and 1e-7 .. 2e-2 geometrically
_TAIL_QUANTILES = np.concatenate([[0.0], np.geomspace(1e-7, 2e-2, 47)])


class HistogramObserver:
    """Per-tensor histograms over fixed ranges, accumulated image by image."""

    def __init__(self, ranges: dict[str, tuple[float, float]], bins: int = BINS):
        self.bins = bins
        self.ranges = {n: (float(lo), float(hi)) for n, (lo, hi) in ranges.items() if _usable(lo, hi)}
        self.hist = {n: np.zeros(bins, np.int64) for n in self.ranges}

    def update(self, name: str, values: np.ndarray) -> None:
        """Count ``values``: exact zeros and non-finite values are left out, values beyond the range go to
        the edge bins."""
        if name not in self.ranges:
            return
        lo, hi = self.ranges[name]
        v = np.asarray(values, np.float64).ravel()
        v = v[np.isfinite(v) & (v != 0)]
        idx = np.clip((v - lo) * (self.bins / (hi - lo)), 0, self.bins - 1).astype(np.int64)
        self.hist[name] += np.bincount(idx, minlength=self.bins)

    def mse_ranges(self, levels: int = 255) -> dict[str, tuple[float, float]]:
        return {n: mse_range(h, *self.ranges[n], levels=levels) for n, h in self.hist.items()}

    def mse_bounds(self, levels: int = 254) -> dict[str, float]:
        """Per tensor the symmetric bound t of [-t, t] with the least int8 error."""
        return {n: mse_symmetric_bound(h, *self.ranges[n], levels=levels) for n, h in self.hist.items()}


def _usable(lo: float, hi: float) -> bool:
    return bool(np.isfinite(lo) and np.isfinite(hi) and hi - lo > 1e-5 * max(abs(lo), abs(hi), 1e-12))


def mse_range(hist: np.ndarray, lo: float, hi: float, levels: int = 255) -> tuple[float, float]:
    """The [a, b] (containing 0, within [lo, hi]) with the least expected int8 error.

    ``hist`` counts values in ``len(hist)`` equal bins over [lo, hi]. Values
    outside [a, b] cost their squared distance to the bound; values inside cost
    Δ²/12 with Δ = (b - a) / levels.
    """
    h = np.asarray(hist, np.float64)
    total = h.sum()
    if total == 0 or not _usable(lo, hi):
        return lo, hi
    n = len(h)
    edges = np.linspace(lo, hi, n + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    cdf = np.cumsum(h) / total
    a_idx = np.unique(np.searchsorted(cdf, _TAIL_QUANTILES, side="right"))  # bins [0, a_idx) are clipped low
    b_idx = np.unique(np.searchsorted(cdf, 1.0 - _TAIL_QUANTILES, side="left") + 1)  # bins [b_idx, n) clipped high
    a_idx, b_idx = np.clip(a_idx, 0, n), np.clip(b_idx, 0, n)
    a = np.minimum(edges[a_idx], 0.0)
    b = np.maximum(edges[b_idx], 0.0)
    # prefix sums of count, sum and sum of squares give each tail's clipping error in O(1)
    c0 = np.concatenate([[0.0], np.cumsum(h)])
    c1 = np.concatenate([[0.0], np.cumsum(h * centers)])
    c2 = np.concatenate([[0.0], np.cumsum(h * centers**2)])
    low_cnt, low_s1, low_s2 = c0[a_idx], c1[a_idx], c2[a_idx]
    low_err = low_s2 - 2 * a * low_s1 + a * a * low_cnt
    high_cnt, high_s1, high_s2 = c0[n] - c0[b_idx], c1[n] - c1[b_idx], c2[n] - c2[b_idx]
    high_err = high_s2 - 2 * b * high_s1 + b * b * high_cnt
    width = b[None, :] - a[:, None]
    inside = total - low_cnt[:, None] - high_cnt[None, :]
    err = low_err[:, None] + high_err[None, :] + inside * (width / levels) ** 2 / 12.0
    err = np.where(width > 0, err, np.inf)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(a[i]), float(b[j])


def mse_symmetric_bound(hist: np.ndarray, lo: float, hi: float, levels: int = 254) -> float:
    """The bound t of a symmetric range [-t, t] with the least expected int8 error.

    For symmetric quantization (zero point 0, step t / 127; the int8 code -128
    also exists, but only values below -t reach it, and they are charged as clipped).
    Same cost model as :func:`mse_range` on the magnitudes |x|: values beyond t
    cost (|x| - t)², values inside Δ²/12 with Δ = 2t / levels.
    Returns max(|lo|, |hi|) (min/max) for an empty histogram or unusable range.
    """
    h = np.asarray(hist, np.float64)
    full = max(abs(lo), abs(hi))
    total = h.sum()
    if total == 0 or not _usable(lo, hi):
        return float(full)
    edges = np.linspace(lo, hi, len(h) + 1)
    mag = np.abs((edges[:-1] + edges[1:]) / 2)
    order = np.argsort(mag)
    mag, h = mag[order], h[order]
    cdf = np.cumsum(h) / total
    cand = np.unique(np.searchsorted(cdf, 1.0 - _TAIL_QUANTILES, side="left"))
    cand = np.clip(cand, 0, len(h) - 1)
    t = mag[cand] + (hi - lo) / (2 * len(h))  # upper magnitude of the bin: covers every value in it
    c0 = np.concatenate([[0.0], np.cumsum(h)])
    c1 = np.concatenate([[0.0], np.cumsum(h * mag)])
    c2 = np.concatenate([[0.0], np.cumsum(h * mag**2)])
    k = np.searchsorted(mag, t, side="right")  # bins [0, k) (centre within t, ties included) lie inside
    out_cnt, out_s1, out_s2 = c0[-1] - c0[k], c1[-1] - c1[k], c2[-1] - c2[k]
    clip_err = out_s2 - 2 * t * out_s1 + t * t * out_cnt
    err = clip_err + c0[k] * (2 * t / levels) ** 2 / 12.0
    return float(t[int(np.argmin(err))])
