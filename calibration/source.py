"""Where images come from: --calib-dir, then EFFMOD_CALIB_DIR, then the download cache."""

from __future__ import annotations

import os
from pathlib import Path

from calibration.download import cached_samples_dir
from edge.errors import DataError

ENV_VAR = "EFFMOD_CALIB_DIR"


def resolve_image_dir(calib_dir: str | os.PathLike | None = None) -> Path:
    """The image folder to use; never touches the network."""
    if calib_dir:
        return Path(calib_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cached = cached_samples_dir()
    if cached is not None:
        return cached
    raise DataError(
        "no image folder: pass --calib-dir DIR, set EFFMOD_CALIB_DIR=DIR, "
        "or run `effmod-edge download-samples` once to cache the public ImageNet sample set"
    )


def image_dir_origin(calib_dir: str | os.PathLike | None = None) -> str:
    """How the user named the folder :func:`resolve_image_dir` picks, for error messages."""
    if calib_dir:
        return "--calib-dir"
    return ENV_VAR if os.environ.get(ENV_VAR) else "the download cache"
