"""Explicit, cached, checksummed, resumable download of the public ImageNet sample set.

Only ``effmod-edge download-samples`` (or :func:`download_samples`) reaches the
network. Files land in ``$EFFMOD_CACHE/imagenet-samples`` (default
``~/.cache/effmod-edge``); each is checked against the SHA-256 list shipped with
the package, partial files resume with HTTP Range requests (a body cut off
mid-file stays as ``NAME.part`` for the next run), and a marker file is written
only once all 1000 verified files are present.
"""

from __future__ import annotations

import http.client
import os
import sys
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
_OFFLINE_FIX = "or use `effmod-edge convert --calib-dir DIR` with a local image folder"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "effmod-edge").expanduser()


def checksums() -> dict[str, str]:
    text = resources.files("calibration").joinpath("data/imagenet_samples.sha256").read_text()
    return dict(line.split("\t") for line in text.splitlines() if line.strip())


def cached_samples_dir() -> Path | None:
    """The cached sample folder if a previous download completed, else None."""
    d = cache_root() / "imagenet-samples"
    return d if (d / _MARKER).is_file() else None


class _CacheWriteError(Exception):
    """A local file of the cache could not be written (not a network problem)."""


def _fetch(url: str, dest: Path, sha256: str, timeout: float) -> int:
    """Fetch ``url`` into ``dest`` through ``dest.part``, resuming a partial file; a short body stays a .part.

    Returns how many bytes came from a .part of an earlier run (0: downloaded whole).
    """
    part = dest.with_name(dest.name + ".part")
    try:
        start = part.stat().st_size if part.exists() else 0
        if start and file_sha256(part) == sha256:  # complete, but the rename never happened
            os.replace(part, dest)
            return start
    except OSError as exc:
        raise _CacheWriteError(exc) from None
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not start:
            raise
        part.unlink()  # the server says the .part is not a prefix of its file: start again
        return _fetch(url, dest, sha256, timeout)
    with resp:
        mode = "ab" if start and resp.status == 206 else "wb"
        try:
            f = open(part, mode)
        except OSError as exc:
            raise _CacheWriteError(exc) from None
        with f:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise _CacheWriteError(exc) from None
        left = getattr(resp, "length", None)  # a file:// answer has none
        if left:  # bytes the server announced but never sent: http.client returns b"" on an early close
            raise http.client.IncompleteRead(b"", left)
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise _CacheWriteError(exc) from None
    return start if mode == "ab" else 0


def _download_error(name: str, base: str, exc: BaseException) -> DataError:
    """One line naming what went wrong with ``name`` and the fix for that case."""
    where = f"download of {name} from {base}"
    if isinstance(exc, _CacheWriteError):
        cause = exc.args[0]
        return DataError(f"{where}: cannot write into the cache folder ({getattr(cause, 'strerror', None) or cause}); "
                         f"point {CACHE_ENV} at a writable folder")
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 404:
            return DataError(f"{where} failed: the server has no such file (HTTP 404); check --url or {URL_ENV}")
        if exc.code >= 500:
            return DataError(f"{where} failed: server error (HTTP {exc.code}); rerun later, {_OFFLINE_FIX}")
        return DataError(f"{where} failed (HTTP {exc.code} {exc.reason}); check --url or {URL_ENV}")
    if isinstance(exc, http.client.IncompleteRead):
        return DataError(f"{where} was cut off ({exc.expected} bytes missing); rerun to resume, {_OFFLINE_FIX}")
    if isinstance(exc, http.client.HTTPException):
        return DataError(f"{where} failed: the server's answer is not HTTP ({type(exc).__name__}); check that "
                         "--url points at a web server")
    reason = getattr(exc, "reason", None) or exc
    return DataError(f"{where} failed ({reason}); check the network, {_OFFLINE_FIX} (the download resumes when rerun)")


def download_samples(base_url: str | None = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download (or finish downloading) the 1000 sample images; returns the folder."""
    base = (base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/") + "/"
    where = "--url" if base_url else (URL_ENV if os.environ.get(URL_ENV) else "the default URL")
    if any(c.isspace() for c in base):
        raise DataError(f"{where} {base!r} contains whitespace; percent-encode it (a space is %20)")
    try:
        parsed = urllib.parse.urlsplit(base)
        parsed.port  # raises for a port that is not a number
    except ValueError as exc:
        raise DataError(f"{where} {base!r} is not a valid URL ({exc}); pass e.g. --url {DEFAULT_BASE_URL}") from None
    if parsed.scheme not in ("http", "https", "file") or (parsed.scheme != "file" and not parsed.netloc):
        raise DataError(f"{where} {base!r} is not an http(s) or file URL; pass e.g. --url {DEFAULT_BASE_URL}")
    dest = cache_root() / "imagenet-samples"
    writable_fix = f"point {CACHE_ENV} at a writable folder"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {dest} ({exc.strerror or exc}); {writable_fix}") from None
    sums = checksums()
    try:
        todo = [n for n in sorted(sums) if not ((dest / n).is_file() and file_sha256(dest / n) == sums[n])]
    except OSError as exc:
        raise DataError(f"cannot read the cached file {exc.filename} ({exc.strerror or exc}); fix its permissions "
                        f"or {writable_fix}") from None
    in_the_way = [dest / n for n in todo if (dest / n).is_dir() or (dest / (n + ".part")).is_dir()]
    if in_the_way:
        raise DataError(f"{in_the_way[0]} (or its .part) is a folder where a sample image goes; remove it and rerun")
    interactive = sys.stderr.isatty()
    bar = tqdm(todo, desc="imagenet samples", unit="img", disable=not progress,
               mininterval=0.1 if interactive else 30.0, miniters=None if interactive else 100)
    for name in bar:
        target = dest / name
        try:
            resumed = _fetch(base + name, target, sums[name], timeout)
        except (_CacheWriteError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _download_error(name, base, exc) from None
        if file_sha256(target) != sums[name]:
            target.unlink()
            if resumed:
                raise DataError(f"{name} was resumed from a partial file of an earlier run, and the result is not the "
                                f"expected file (SHA-256 mismatch); the partial file was removed: rerun to download "
                                f"it whole")
            raise DataError(f"{base} served a different file for {name} (SHA-256 mismatch): it is not the sample "
                            f"set this version expects; check --url or {URL_ENV}")
    try:
        (dest / _MARKER).write_text("ok\n")
    except OSError as exc:
        raise DataError(f"every sample in {dest} is verified, but the marker {_MARKER} could not be written "
                        f"({exc.strerror or exc}); {writable_fix}, or use `effmod-edge convert --calib-dir {dest}`"
                        ) from None
    return dest
