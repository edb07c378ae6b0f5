"""ImageNet-1K label convention: class index = position of the wnid in sorted order."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, str], ...]:
    text = resources.files("calibration").joinpath("data/imagenet_classes.tsv").read_text("utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())
    if len(rows) != 1000 or [r[0] for r in rows] != sorted(r[0] for r in rows):
        raise RuntimeError("packaged imagenet_classes.tsv is damaged: expected 1000 sorted wnids")
    return rows  # type: ignore[return-value]


def wnids() -> list[str]:
    """The 1000 ImageNet-1K wnids in index order (n01440764 is 0)."""
    return [w for w, _ in _table()]


def class_names() -> list[str]:
    """Human-readable names for the 1000 classes, in index order."""
    return [n for _, n in _table()]


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(wnids())}
