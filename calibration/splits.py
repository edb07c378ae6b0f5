"""Deterministic, class-balanced, disjoint calibration and evaluation splits."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from calibration.folder import ImageFolder, ImageItem, load_pixels
from calibration.preprocess import MEAN, STD
from edge.errors import DataError


@dataclass
class Batch:
    """Cropped uint8 NHWC pixels with labels (-1 = unknown) and file names."""

    pixels: np.ndarray
    labels: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def nchw(self) -> np.ndarray:
        """Normalized float32 NCHW, the PyTorch/ONNX input contract."""
        x = self.pixels.astype(np.float32) / 255.0
        x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def nhwc(self) -> np.ndarray:
        """Normalized float32 NHWC, the TFLite input contract."""
        return np.ascontiguousarray(self.nchw().transpose(0, 2, 3, 1))

    def without_labels(self) -> "Batch":
        """The same images with every label unknown (-1): ImageNet labels say nothing about a fine-tune's classes."""
        return Batch(self.pixels, np.full(len(self), -1, dtype=np.asarray(self.labels).dtype), self.names)

    def fingerprint(self) -> str:
        """Hash of the image names (the split's identity in a manifest)."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:16]

    def content_fingerprint(self) -> str:
        """Hash of the cropped pixels and labels: differs for same-named files of another folder or an edited file."""
        h = hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


@dataclass
class Split:
    calib: Batch
    eval: Batch
    seed: int
    folder: ImageFolder

    def describe(self) -> dict:
        return {
            "root": str(self.folder.root.resolve()),  # evaluate may run from another directory
            "seed": self.seed,
            "calib_size": len(self.calib),
            "eval_size": len(self.eval),
            "calib_fingerprint": self.calib.fingerprint(),
            "eval_fingerprint": self.eval.fingerprint(),
            "calib_content_fingerprint": self.calib.content_fingerprint(),
            "eval_content_fingerprint": self.eval.content_fingerprint(),
            "calib_images": list(self.calib.names),
            "eval_images": list(self.eval.names),
            "skipped": dict(self.folder.skipped),
        }


def balanced_order(items: list[ImageItem], seed: int) -> list[ImageItem]:
    """Round-robin over shuffled classes, each class shuffled: any prefix is balanced.

    An image without an ImageNet label counts as a class of its folder (a fine-tune's
    ``cat/`` and ``dog/``), so those folders are balanced too."""
    rng = np.random.default_rng(seed)
    by_class: dict[tuple[int, str], list[ImageItem]] = defaultdict(list)
    for item in items:
        by_class[item.label, "" if item.label >= 0 else item.name.rpartition("/")[0]].append(item)
    classes = sorted(by_class)
    classes = [classes[i] for i in rng.permutation(len(classes))]
    queues = [[by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in classes]
    order: list[ImageItem] = []
    depth = max(len(q) for q in queues)
    for r in range(depth):
        order.extend(q[r] for q in queues if r < len(q))
    return order


def _take(order: list[ImageItem], start: int, n: int, skipped: Counter) -> tuple[Batch, int]:
    """Decode from ``order[start:]`` until ``n`` usable images; returns batch and next index."""
    pix, lab, names = [], [], []
    i = start
    while len(names) < n and i < len(order):
        chunk = order[i : i + (n - len(names))]
        i += len(chunk)
        p, l, kept = load_pixels(chunk, skipped)
        if len(kept):
            pix.append(p)
            lab.append(l)
            names.extend(k.name for k in kept)
    if not names:
        return Batch(np.zeros((0, 224, 224, 3), np.uint8), np.zeros((0,), np.int64), []), i
    return Batch(np.concatenate(pix), np.concatenate(lab), names), i


def load_items(items: list[ImageItem], skipped: Counter | None = None) -> Batch:
    """Decode ``items`` in order into a batch, skipping (and counting) unusable files."""
    batch, _ = _take(items, 0, len(items), skipped if skipped is not None else Counter())
    return batch


def pick_balanced(folder: ImageFolder, n: int | None = None, seed: int = 0) -> Batch:
    """Up to ``n`` usable images of ``folder`` in class-balanced order."""
    order = balanced_order(folder.items, seed)
    batch, _ = _take(order, 0, n or len(order), folder.skipped)
    return batch


def _calibration(folder: ImageFolder, calib_size: int, seed: int) -> tuple[list[ImageItem], Batch, int]:
    """The balanced order, the calibration batch taken from its start, and the index after it."""
    order = balanced_order(folder.items, seed)
    calib, nxt = _take(order, 0, calib_size, folder.skipped)
    return order, calib, nxt


def calibration_batch(folder: ImageFolder, calib_size: int, seed: int = 0) -> Batch:
    """The calibration images ``make_split`` takes from ``folder`` for this size and seed."""
    return _calibration(folder, calib_size, seed)[1]


def make_split(folder: ImageFolder, calib_size: int, eval_size: int, seed: int = 0) -> Split:
    """Calibration set then a disjoint evaluation set, both class-balanced."""
    if calib_size < 0 or eval_size < 1:
        raise DataError(f"calib size must be >= 0 and eval size >= 1, got {calib_size} and {eval_size}")
    order, calib, nxt = _calibration(folder, calib_size, seed)
    evaluation, _ = _take(order, nxt, eval_size, folder.skipped)
    if len(calib) + len(evaluation) == 0:
        raise DataError(
            f"no usable image in {folder.root} ({folder.summary()}); every file was corrupt "
            "or unreadable: point --calib-dir at a folder of valid JPEG/PNG images"
        )
    if len(evaluation) == 0:
        raise DataError(
            f"{folder.root} has {len(calib)} usable images, all taken by calibration; "
            f"lower --calib-size below {len(calib)} or add images"
        )
    if len(calib) < calib_size or len(evaluation) < eval_size:
        usable = len(calib) + len(evaluation)
        raise DataError(  # calibration took all it asked for (else evaluation would be empty): evaluate the rest
            f"{folder.root} has {usable} usable images, fewer than --calib-size {calib_size} plus --eval-size "
            f"{eval_size}; lower them (e.g. --eval-size {usable - calib_size}) or add images"
        )
    return Split(calib=calib, eval=evaluation, seed=seed, folder=folder)
