"""Shared fixtures: the ImageNet sample folder, found without copying it."""

from __future__ import annotations

import os
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
