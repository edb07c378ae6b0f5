"""Image folders in either layout, with labels, loaded without crashing on bad files.

Layouts:
* flat: ``<wnid>_<anything>.<ext>`` (the public 1000-image ImageNet sample set),
* ImageFolder: ``<wnid>/<file>.<ext>``.

A file whose wnid is not an ImageNet-1K class keeps label -1 (usable for
calibration, left out of label accuracy).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calibration.imagenet import wnid_to_index
from calibration.preprocess import UnusableImageError, to_uint8_hwc
from edge.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageItem:
    path: Path
    label: int
    name: str = ""  # the path relative to the folder root (POSIX): unique, unlike the file name in <wnid>/ layout

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.path.name)


@dataclass
class ImageFolder:
    root: Path
    items: list[ImageItem]
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{len(self.items)} images in {self.root}" + (
            f", {skipped} skipped ({detail})" if skipped else ""
        )


def _label_for(path: Path, root: Path) -> int:
    index = wnid_to_index()
    if path.parent != root and path.parent.name in index:
        return index[path.parent.name]
    return index.get(path.name.split("_", 1)[0], -1)


def scan_folder(root: str | os.PathLike, flag: str = "--calib-dir") -> ImageFolder:
    """List the image files under ``root`` (sorted, deterministic) with their labels.

    ``flag`` is the option the user passed the folder with; error messages name it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        fix = {"--calib-dir": "pass --calib-dir DIR or set EFFMOD_CALIB_DIR to a folder of images",
               "EFFMOD_CALIB_DIR": "set EFFMOD_CALIB_DIR to a folder of images, or pass --calib-dir DIR",
               "the download cache": "run effmod-edge download-samples again, or pass --calib-dir DIR"}.get(
            flag, f"pass {flag} with a folder of images")
        raise DataError(f"{flag} {root} does not exist or is not a folder; {fix}")
    items: list[ImageItem] = []
    skipped: Counter = Counter()
    def unreadable(exc: OSError) -> None:  # os.walk would drop the folder silently
        skipped["unreadable folder"] += 1

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            path = Path(dirpath) / fname
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped["non-image"] += 1
                continue
            name = path.relative_to(root).as_posix()
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes: the split's fingerprint (UTF-8) cannot hash the name
                skipped["file name not UTF-8"] += 1
                continue
            items.append(ImageItem(path, _label_for(path, root), name))
    folder = ImageFolder(root, items, skipped)
    if not items:
        raise DataError(
            f"no images in {root} ({folder.summary()}); point {flag} at a folder of "
            "JPEG/PNG files (flat <wnid>_<name>.JPEG or <wnid>/<file>)"
        )
    return folder


def load_pixels(items: list[ImageItem], skipped: Counter | None = None) -> tuple[np.ndarray, np.ndarray, list[ImageItem]]:
    """Decode and crop ``items`` -> uint8 (N, 224, 224, 3), labels (N,), items kept.

    Corrupt or unreadable files, and images the contract refuses (:class:`UnusableImageError`),
    are skipped and counted in ``skipped`` by reason.
    """
    skipped = skipped if skipped is not None else Counter()
    pixels, labels, kept = [], [], []
    for item in items:
        try:
            with Image.open(item.path) as img:
                img.load()
                arr = to_uint8_hwc(img)
        except UnusableImageError as exc:
            skipped[exc.reason] += 1
            continue
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError):
            skipped["corrupt or unreadable"] += 1
            continue
        pixels.append(arr)
        labels.append(item.label)
        kept.append(item)
    if not pixels:
        return np.zeros((0, 224, 224, 3), np.uint8), np.zeros((0,), np.int64), []
    return np.stack(pixels), np.asarray(labels, np.int64), kept
