"""Explicit, cached, checksummed, resumable download of the public ImageNet sample set.

Only ``effmod-edge download-samples`` (or :func:`download_samples`) reaches the
network. Files land in ``$EFFMOD_CACHE/imagenet-samples`` (default
``~/.cache/effmod-edge``); each is checked against the SHA-256 list shipped with
the package, partial files resume with HTTP Range requests, and a marker file is
written only once all 1000 verified files are present.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from edge.errors import DataError
from edge.weights import file_sha256

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/EliSchwartz/imagenet-sample-images/master/"
URL_ENV = "EFFMOD_SAMPLES_URL"
CACHE_ENV = "EFFMOD_CACHE"
_MARKER = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "effmod-edge")).expanduser()


def checksums() -> dict[str, str]:
    text = resources.files("calibration").joinpath("data/imagenet_samples.sha256").read_text()
    return dict(line.split("\t") for line in text.splitlines() if line.strip())


def cached_samples_dir() -> Path | None:
    """The cached sample folder if a previous download completed, else None."""
    d = cache_root() / "imagenet-samples"
    return d if (d / _MARKER).is_file() else None


def _fetch(url: str, dest: Path, timeout: float) -> None:
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        mode = "ab" if start and resp.status == 206 else "wb"
        with open(part, mode) as f:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                f.write(chunk)
    os.replace(part, dest)


def download_samples(base_url: str | None = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download (or finish downloading) the 1000 sample images; returns the folder."""
    base = (base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/") + "/"
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https", "file") or (parsed.scheme != "file" and not parsed.netloc):
        where = "--url" if base_url else (URL_ENV if os.environ.get(URL_ENV) else "the default URL")
        raise DataError(f"{where} {base!r} is not an http(s) or file URL; pass e.g. --url {DEFAULT_BASE_URL}")
    dest = cache_root() / "imagenet-samples"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {dest} ({exc.strerror or exc}); point {CACHE_ENV} at a "
                        f"writable folder") from None
    sums = checksums()
    todo = [n for n in sorted(sums) if not ((dest / n).is_file() and file_sha256(dest / n) == sums[n])]
    for name in tqdm(todo, desc="imagenet samples", unit="img", disable=not progress):
        target = dest / name
        try:
            _fetch(base + name, target, timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(
                f"download of {name} from {base} failed ({exc}); check the network or pass "
                "--calib-dir DIR with a local image folder (the download resumes when rerun)"
            ) from None
        if file_sha256(target) != sums[name]:
            target.unlink()
            raise DataError(f"checksum mismatch for {name} from {base}; rerun to fetch it again")
    (dest / _MARKER).write_text("ok\n")
    return dest
