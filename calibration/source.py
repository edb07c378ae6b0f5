"""Where images come from: --calib-dir, then EFFMOD_CALIB_DIR, then the download cache."""

from __future__ import annotations

import os
from pathlib import Path

from calibration.download import cached_samples_dir
from edge.errors import DataError

ENV_VAR = "EFFMOD_CALIB_DIR"


def _source(calib_dir: str | os.PathLike | None) -> tuple[str, Path | None]:
    """Where the image folder comes from, in order of precedence, and the folder (None: no cache yet)."""
    if calib_dir:
        return "--calib-dir", Path(calib_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return ENV_VAR, Path(env).expanduser()
    return "the download cache", cached_samples_dir()


def resolve_image_dir(calib_dir: str | os.PathLike | None = None) -> Path:
    """The image folder to use; never touches the network."""
    folder = _source(calib_dir)[1]
    if folder is not None:
        return folder
    raise DataError(
        "no image folder: pass --calib-dir DIR, set EFFMOD_CALIB_DIR=DIR, "
        "or run `effmod-edge download-samples` once to cache the public ImageNet sample set"
    )


def image_dir_origin(calib_dir: str | os.PathLike | None = None) -> str:
    """How the user named the folder :func:`resolve_image_dir` picks, for error messages."""
    return _source(calib_dir)[0]
