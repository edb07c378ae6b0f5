"""Shared fixtures: the ImageNet sample folder, found without copying it; a network guard."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """EFFMOD_CALIB_DIR, else ../shared/imagenet-samples beside the repository."""
    env = os.environ.get("EFFMOD_CALIB_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "imagenet-samples")
    for c in candidates:
        if c.is_dir():
            return c
    pytest.skip(f"no ImageNet sample folder: set EFFMOD_CALIB_DIR (looked in {', '.join(map(str, candidates))})")


@pytest.fixture(scope="session")
def proxy_tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny variant as a proxy checkpoint (benchmarks/proxy_checkpoint.py): every block reaches the logits."""
    import torch

    from benchmarks.proxy_checkpoint import proxy_state_dict

    path = tmp_path_factory.mktemp("proxy") / "efficientmod_test_tiny_proxy.pth"
    torch.save(proxy_state_dict("efficientmod_test_tiny"), path)
    return path


# Three ImageNet classes (tench, goldfish, great white shark) with 10, 3 and 1 images.
UNEVEN_CLASSES = {"n01440764": 10, "n01443537": 3, "n01484850": 1}


@pytest.fixture
def uneven_image_folder(tmp_path) -> Path:
    """An ImageFolder-layout folder (``<wnid>/<wnid>_<i>.jpg``) whose classes hold 10, 3 and 1 images
    (labels 0, 1, 2): a split that takes files in order or at random is visibly unbalanced on it.
    File names are unique across classes because splits and manifests name images by file name only."""
    from PIL import Image

    root = tmp_path / "uneven"
    for c, (wnid, n) in enumerate(UNEVEN_CLASSES.items()):
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (256, 240), (20 * i, 80 * c, 120)).save(root / wnid / f"{wnid}_{i:02d}.jpg", "JPEG")
    return root


_NO_NETWORK_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a proxied request fails at once


def _is_loopback(host) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: refuse it


@pytest.fixture(scope="session", autouse=True)
def _no_network():
    """Tests never touch the network: proxy variables point at a dead loopback port (subprocesses
    inherit them) and an in-process connect() to a non-loopback address raises. AF_UNIX is untouched.
    Session scope, so module and session fixtures (the conversions) run under it too."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _guard(monkeypatch)
        yield


def _guard(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, _NO_NETWORK_PROXY)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise ConnectionRefusedError(f"tests must not touch the network: connect to {address!r} refused")

    def connect(self, address):
        _check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
