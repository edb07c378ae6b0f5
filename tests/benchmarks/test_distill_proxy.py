"""benchmarks/distill_proxy.py: the split, the GPU augmentation, and a short distillation on the CPU."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.distill_proxy import merge, random_views, split_names, train
from edge.weights import load_model
from tests.benchmarks.test_trained_margins import _random_lite0


def test_split_alternates_over_sorted_names_and_is_disjoint():
    names = [f"n{i:08d}_x.JPEG" for i in range(9, -1, -1)]
    train_names, heldout = split_names(names)
    assert train_names == sorted(names)[0::2] and heldout == sorted(names)[1::2]
    assert not set(train_names) & set(heldout) and set(train_names) | set(heldout) == set(names)


def test_full_view_without_flip_is_the_image_and_flips_mirror_it():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    same = random_views(images, 32, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    ref = images.float() / 255
    assert float((same - ref).abs().max()) < 1e-5
    flipped = 0
    for _ in range(8):
        view = random_views(images, 32, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
        for v, r in zip(view, ref):
            err_same, err_flip = float((v - r).abs().max()), float((v - r.flip(-1)).abs().max())
            assert min(err_same, err_flip) < 1e-5, "a full view is neither the image nor its mirror"
            flipped += err_flip < 1e-5
    assert 0 < flipped < 24, f"{flipped} of 24 views flipped: flips are not random"


def test_crop_of_a_region_keeps_its_content():
    """A view of a quarter-area crop of a half-black, half-white image is all one colour or shows the edge."""
    images = torch.zeros(64, 3, 64, 64, dtype=torch.uint8)
    images[..., 32:] = 255
    g = torch.Generator().manual_seed(1)
    views = random_views(images, 16, g, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False)
    left = views[..., :2].mean((1, 2, 3))
    right = views[..., -2:].mean((1, 2, 3))
    assert torch.all(right >= left - 1e-6), "the right edge of a view is darker than its left without a flip"
    assert float(views.mean()) == pytest.approx(0.5, abs=0.1)


def test_short_distillation_lowers_the_loss_and_merges_to_a_loadable_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pack" / "train").mkdir(parents=True)
    for i in range(4):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((256, 256), Image.Resampling.BILINEAR).save(tmp_path / "pack" / "train" / f"{i}.jpg")
    torch.save(_random_lite0(), tmp_path / "lite0.pth")
    args = argparse.Namespace(
        pack=tmp_path / "pack", lite0=tmp_path / "lite0.pth", out=tmp_path / "out", model="efficientmod_test_tiny",
        seconds=1e9, max_steps=20, batch=6, res=64, lr=3e-3, weight_decay=0.05, warmup=1, mixup=0.0, clip=5.0,
        seed=0, log_every=4, save_every=1e9, device="cpu")
    log = train(args)
    losses = [h["loss"] for h in log["history"]]
    assert np.mean(losses[-2:]) < 0.8 * losses[0], f"distillation loss went {losses}"
    merge(tmp_path / "out", tmp_path / "student.pth", "efficientmod_test_tiny")
    student = load_model("efficientmod_test_tiny", tmp_path / "student.pth").model
    trained = torch.load(tmp_path / "student.pth", weights_only=True)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in trained.items())
