"""Numerical comparison of a converted model's logits against the PyTorch reference."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Threshold:
    """An accuracy bar; ``None`` fields are not checked."""

    max_abs: float | None = None
    min_sqnr_db: float | None = None
    min_agreement: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``got`` against ``ref``, in dB."""
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((ref - np.asarray(got, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-logits, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (``z`` = 1.96) Wilson score interval of a proportion ``hits / n``: what ``n`` images can tell."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def outward(ci: tuple[float, float], digits: int) -> list[float]:
    """An interval rounded to ``digits`` decimals away from its centre, so rounding never narrows it."""
    scale = 10.0**digits
    return [math.floor(ci[0] * scale + 1e-9) / scale, math.ceil(ci[1] * scale - 1e-9) / scale]


def interval_text(ci: list[float] | tuple[float, float]) -> str:
    """An agreement interval in percent, rounded outward, e.g. ``94.6-99.8``."""
    lo, hi = outward((ci[0], ci[1]), 3)
    return f"{100 * lo:.1f}-{100 * hi:.1f}"


def percent(fraction: float) -> str:
    """A bar as a percentage without rounding it: 0.99 -> ``99%``, 0.995 -> ``99.5%``."""
    return f"{100 * fraction:.10g}%"


def images_to_settle(bar: float, agreement: float = 1.0, z: float = 1.96) -> float:
    """Fewest images whose 95 % interval leaves ``bar`` out, if the agreement stays at ``agreement``.

    With every image agreeing (the default) that is n / (n + z^2) >= bar; an agreement
    equal to the bar is never settled (``inf``)."""
    if agreement == 1.0:
        return math.ceil(bar * z * z / (1.0 - bar)) if bar < 1.0 else math.inf
    if agreement == bar:
        return math.inf

    def settled(n: int) -> bool:
        lo, hi = wilson_interval(agreement * n, n, z)
        return lo >= bar if agreement > bar else hi < bar

    lo, hi = 1, 10**9
    if not settled(hi):
        return math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if settled(mid) else (mid + 1, hi)
    return lo


def compare_logits(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Metrics of ``got`` against ``ref`` (both (N, classes)); labels -1 are ignored."""
    ref = np.asarray(ref, np.float32)
    got = np.asarray(got, np.float32)
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, converted {got.shape}")
    finite = np.isfinite(got)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # inf/NaN logits give inf/NaN metrics
        diff = np.abs(ref.astype(np.float64) - got)
        num = np.sum(ref.astype(np.float64) * got, axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        cosine = np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)
        cosine[~finite.all(axis=1)] = np.nan  # an image with inf/NaN logits is no match, whatever its other logits
        sqnr = round(sqnr_db(ref, got), 3)
    agree = int(np.sum(ref.argmax(1) == got.argmax(1)))
    out = {
        "images": int(ref.shape[0]),
        "nonfinite_logits": int(finite.size - finite.sum()),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "sqnr_db": sqnr,
        "cosine": float(cosine.mean()) if cosine.size else 1.0,
        "top1_agreement": agree / len(ref) if len(ref) else 1.0,
        "top1_agreement_ci95": outward(wilson_interval(agree, len(ref)), 6),
        "top1_agreement_hits": agree,
    }
    if labels is not None:
        mask = np.asarray(labels) >= 0
        if mask.any():
            lab = np.asarray(labels)[mask]
            out["labelled_images"] = int(mask.sum())
            out["top1"] = float(topk_hits(got[mask], lab, 1).mean())
            out["top5"] = float(topk_hits(got[mask], lab, 5).mean())
            out["reference_top1"] = float(topk_hits(ref[mask], lab, 1).mean())
            out["reference_top5"] = float(topk_hits(ref[mask], lab, 5).mean())
    return out


def noise_limited_agreement(reference: np.ndarray, sqnr: float, nodes: int = 40) -> float:
    """Top-1 agreement that i.i.d. Gaussian logit noise of ``sqnr`` dB would leave on ``reference``.

    The noise power is the one the SQNR implies, spread evenly over every
    logit. An image keeps its top-1 when no other class's logit plus noise
    overtakes the top logit plus noise; the expectation over the top logit's
    noise is taken by Gauss-Hermite quadrature, so the figure is exact for that
    noise model. Near-tied top-2 logits make it fall: it says how much
    agreement a checkpoint allows at a given SQNR, whatever the quantizer.
    """
    ref = np.asarray(reference, np.float64)
    if ref.size == 0 or (math.isinf(sqnr) and sqnr > 0):
        return 1.0
    sigma = math.sqrt(float(np.sum(ref**2)) / ref.size / 10.0 ** (sqnr / 10.0))
    if sigma == 0.0:
        return 1.0
    top = ref.argmax(1)
    z = torch.from_numpy((ref.max(1, keepdims=True) - ref) / sigma)
    z[torch.arange(len(ref)), torch.from_numpy(top)] = math.inf
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    agree = torch.zeros(len(ref), dtype=torch.float64)
    for xj, wj in zip(x, w / math.sqrt(2.0 * math.pi)):
        agree += wj * torch.special.log_ndtr(z + xj).sum(1).exp()
    return float(agree.mean())


def sqnr_for_agreement(reference: np.ndarray, agreement: float, high: float = 120.0) -> float:
    """The SQNR (dB) at which :func:`noise_limited_agreement` reaches ``agreement``; ``inf`` if not by ``high``."""
    if noise_limited_agreement(reference, high) < agreement:
        return math.inf
    lo, hi = -20.0, high
    while hi - lo > 0.05:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if noise_limited_agreement(reference, mid) < agreement else (lo, mid)
    return round(hi, 1)


class NearTies:
    """What near-ties in one set of reference logits allow; the SQNR a bar needs is searched once per bar."""

    def __init__(self, reference: np.ndarray):
        self.reference = np.asarray(reference, np.float64)
        self._needed: dict[float, float | None] = {}

    def record(self, metrics: dict, threshold: Threshold) -> dict | None:
        """Agreement expected at the measured SQNR and the SQNR the bar needs; None without an agreement bar."""
        sqnr = metrics["sqnr_db"]
        if threshold.min_agreement is None or not len(self.reference) or math.isnan(sqnr) or sqnr == -math.inf:
            return None
        bar = threshold.min_agreement
        if bar not in self._needed:
            needed = sqnr_for_agreement(self.reference, bar)
            self._needed[bar] = None if math.isinf(needed) else needed  # None: exact ties, no SQNR suffices
        return {
            "noise_model": "i.i.d. Gaussian logit noise of the measured SQNR",
            "expected_agreement": round(noise_limited_agreement(self.reference, metrics["sqnr_db"]), 4),
            "sqnr_db_for_min_agreement": self._needed[bar],
        }


def evaluate_threshold(metrics: dict, threshold: Threshold) -> list[str]:
    """Human-readable reasons the metrics miss ``threshold``; empty when they pass."""
    misses = []
    if metrics.get("nonfinite_logits", 0):  # fails every bar: an agreement bar alone would not see them
        misses.append(f"{metrics['nonfinite_logits']} logits are inf or NaN (an fp16 overflow?)")
    if threshold.max_abs is not None and not metrics["max_abs_diff"] <= threshold.max_abs:
        misses.append(f"max |Δ| {metrics['max_abs_diff']:.3g} > {threshold.max_abs:g}")
    if threshold.min_sqnr_db is not None and not metrics["sqnr_db"] >= threshold.min_sqnr_db:
        misses.append(f"SQNR {metrics['sqnr_db']:.1f} dB < {threshold.min_sqnr_db:g} dB")
    if threshold.min_agreement is not None and not metrics["top1_agreement"] >= threshold.min_agreement:
        misses.append(
            f"top-1 agreement {metrics['top1_agreement']:.2%} < {percent(threshold.min_agreement)}"
        )
    return misses


def check_record(metrics: dict, threshold: Threshold, near_ties: NearTies | None = None) -> dict:
    """The ``checks`` entry of a manifest artifact: metrics, threshold and verdict.

    An agreement bar also gets ``agreement_bar_resolved``: whether the bar lies
    outside the agreement's 95 % Wilson interval (99 of 100 images agreeing
    cannot tell 99 % from 95 %). With the reference logits' ``near_ties``, it gets a
    ``near_ties`` record (:meth:`NearTies.record`), and an agreement miss says what that
    noise model expects, so a user can tell a checkpoint's near-ties from a
    conversion fault.
    """
    misses = evaluate_threshold(metrics, threshold)
    record = {**metrics, "threshold": threshold.as_dict(), "passed": not misses, "misses": misses}
    if threshold.min_agreement is not None and "top1_agreement_hits" in metrics:
        # False: the bar lies inside the 95 % interval, so these images cannot tell a pass from a miss
        lo, hi = wilson_interval(metrics["top1_agreement_hits"], metrics["images"])
        record["agreement_bar_resolved"] = bool(lo >= threshold.min_agreement or hi < threshold.min_agreement)
    ties = near_ties.record(metrics, threshold) if near_ties is not None else None
    if ties is not None:
        record["near_ties"] = ties
        needed = ties["sqnr_db_for_min_agreement"]
        hint = (f" (i.i.d. noise at this SQNR would give {ties['expected_agreement']:.1%}; "
                f"{percent(threshold.min_agreement)} needs " + (f"{needed:g} dB" if needed is not None else
                                                          "exact logits: tied top-1s") + " on these images)")
        misses[:] = [m + (hint if m.startswith("top-1 agreement") else "") for m in misses]
    return record
