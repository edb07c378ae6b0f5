"""The explicit sample download against a local HTTP server: checksums, resume, errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest

import calibration.download as dl
from edge.errors import DataError


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support; counts requested ranges."""

    ranges: list = []
    cut_after: int | None = None  # send only this many bytes of the next body, then close
    status: int | None = None  # answer the next request with this error status

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        RangeHandler.ranges.append(rng)
        if RangeHandler.status is not None:
            status, RangeHandler.status = RangeHandler.status, None
            self.send_error(status)
            return
        if rng and int(rng.split("=")[1].split("-")[0]) >= len(data):
            self.send_error(416)
            return
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, RangeHandler.cut_after = RangeHandler.cut_after, None
        self.wfile.write(body if cut is None else body[:cut])


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    files = {f"n0144076{i}_x.JPEG": bytes([i]) * (1000 + i) for i in range(3)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", files, root
    httpd.shutdown()


def _sums(files):
    return {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


@pytest.fixture()
def remote(server, tmp_path, monkeypatch):
    """The server's URL and files, a cache under tmp_path that expects them, and the cache's sample folder."""
    url, files, _ = server
    monkeypatch.setenv("EFFMOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "checksums", lambda: _sums(files))
    RangeHandler.ranges.clear()
    return url, files, tmp_path / "cache" / "imagenet-samples"


def test_download_verifies_and_marks_complete(remote):
    url, files, _ = remote
    out = dl.download_samples(url, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.JPEG")} == files
    assert dl.cached_samples_dir() == out


def test_download_resumes_partial_file(remote):
    url, files, dest = remote
    dest.mkdir(parents=True)
    name = sorted(files)[1]
    (dest / (name + ".part")).write_bytes(files[name][:400])
    dl.download_samples(url, progress=False)
    assert (dest / name).read_bytes() == files[name]
    assert "bytes=400-" in RangeHandler.ranges


def test_checksum_mismatch_leaves_no_file(server, tmp_path, monkeypatch):
    url, files, _ = server
    monkeypatch.setenv("EFFMOD_CACHE", str(tmp_path / "cache"))
    bad = _sums(files)
    first = sorted(bad)[0]
    bad[first] = "0" * 64
    monkeypatch.setattr(dl, "checksums", lambda: bad)
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        dl.download_samples(url, progress=False)
    assert not (tmp_path / "cache" / "imagenet-samples" / first).exists()
    assert dl.cached_samples_dir() is None


def test_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFMOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "checksums", lambda: {"n01440764_x.JPEG": "0" * 64})
    with pytest.raises(DataError, match="--calib-dir"):
        dl.download_samples("http://127.0.0.1:9/", timeout=2, progress=False)


def test_packaged_checksums_cover_the_sample_set():
    sums = dl.checksums()
    assert len(sums) == 1000 and all(len(v) == 64 for v in sums.values())


def test_body_cut_off_stays_partial_and_resumes(remote):
    url, files, dest = remote
    name = sorted(files)[0]
    RangeHandler.cut_after = 300
    with pytest.raises(DataError, match=f"{name} .*was cut off \\(700 bytes missing\\); rerun to resume"):
        dl.download_samples(url, progress=False)
    assert (dest / (name + ".part")).read_bytes() == files[name][:300] and not (dest / name).exists()
    dl.download_samples(url, progress=False)
    assert (dest / name).read_bytes() == files[name]
    assert RangeHandler.ranges[1] == "bytes=300-", RangeHandler.ranges


def test_complete_part_file_is_kept_without_a_request(remote):
    url, files, dest = remote
    dest.mkdir(parents=True)
    name = sorted(files)[2]
    (dest / (name + ".part")).write_bytes(files[name])  # killed between the last write and the rename
    dl.download_samples(url, progress=False)
    assert (dest / name).read_bytes() == files[name]
    assert len(RangeHandler.ranges) == 2, RangeHandler.ranges  # only the two other files were asked for


def test_part_file_longer_than_the_remote_starts_over(remote):
    url, files, dest = remote
    dest.mkdir(parents=True)
    name = sorted(files)[0]
    (dest / (name + ".part")).write_bytes(b"x" * 5000)  # the server answers 416 to its Range
    dl.download_samples(url, progress=False)
    assert (dest / name).read_bytes() == files[name]
    assert RangeHandler.ranges[:2] == ["bytes=5000-", None], RangeHandler.ranges


@pytest.mark.parametrize("status, fix", [(404, "no such file .*check --url"), (503, "server error .*rerun later")])
def test_http_errors_name_their_fix(remote, status, fix):
    url, _, _ = remote
    RangeHandler.status = status
    with pytest.raises(DataError, match=fix):
        dl.download_samples(url, progress=False)


def test_bad_port_and_empty_cache_variable(tmp_path, monkeypatch):
    for url in ("http://127.0.0.1:80a/", "http://[::1/"):
        with pytest.raises(DataError, match="is not a valid URL"):
            dl.download_samples(url, progress=False)
    monkeypatch.setenv("EFFMOD_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dl.cache_root() == tmp_path / ".cache" / "effmod-edge"


def test_a_file_url_downloads_too(server, tmp_path, monkeypatch):
    """A local mirror as file:// (no Content-Length to check against): verified by the checksums alone."""
    _, files, root = server
    monkeypatch.setenv("EFFMOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "checksums", lambda: _sums(files))
    out = dl.download_samples(root.as_uri(), progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.JPEG")} == files
    assert not list(out.glob("*.part")) and dl.cached_samples_dir() == out


def test_messages_name_the_real_cause(remote):
    """A space in the URL, a folder where an image goes, and a stale .part each get their own fix."""
    url, files, dest = remote
    with pytest.raises(DataError, match="contains whitespace; percent-encode"):
        dl.download_samples(url + "my samples/", progress=False)
    name = sorted(files)[0]
    (dest / name).mkdir(parents=True)
    with pytest.raises(DataError, match=f"{name} .or its .part. is a folder where a sample image goes; remove it"):
        dl.download_samples(url, progress=False)
    (dest / name).rmdir()
    (dest / (name + ".part")).write_bytes(b"\xff" * 10)  # not a prefix of the real file, which the server resumes
    with pytest.raises(DataError, match="resumed from a partial file of an earlier run.*rerun to download it whole"):
        dl.download_samples(url, progress=False)
    out = dl.download_samples(url, progress=False)  # the rerun the message asks for
    assert {p.name: p.read_bytes() for p in out.glob("*.JPEG")} == files
