"""Image folders, preprocessing, splits and where images come from."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from calibration.folder import load_pixels, scan_folder
from calibration.imagenet import class_names, wnids
from calibration.preprocess import CROP, MEAN, STD, preprocess, resize_and_crop
from calibration.source import resolve_image_dir
from calibration.splits import make_split
from edge.errors import DataError


def _jpeg(path, color=(200, 10, 10), size=(300, 200), mode="RGB"):
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path, "JPEG")


def test_label_convention():
    w = wnids()
    assert len(w) == 1000 and w == sorted(w) and w[0] == "n01440764" and w[-1] == "n15075141"
    assert class_names()[0] == "tench" and len(set(class_names())) > 990


def test_preprocess_contract():
    img = Image.new("RGB", (400, 300), (255, 0, 128))
    x = preprocess(img)
    assert x.shape == (3, CROP, CROP) and x.dtype == np.float32
    expected = (np.array([1.0, 0.0, 128 / 255]) - MEAN) / STD
    assert np.allclose(x[:, 100, 100], expected, atol=1e-5)


def test_center_crop_keeps_center():
    img = Image.new("RGB", (600, 300), (0, 0, 0))
    img.paste((255, 255, 255), (250, 100, 350, 200))  # white square in the middle
    out = np.asarray(resize_and_crop(img))
    assert out.shape == (224, 224, 3)
    assert out[112, 112].min() > 240 and out[5, 5].max() < 15


def test_grayscale_becomes_rgb():
    x = preprocess(Image.new("L", (256, 256), 128))
    assert x.shape == (3, 224, 224)
    assert np.allclose(x[:, 0, 0], (128 / 255 - np.array(MEAN)) / np.array(STD), atol=1e-5)


def test_both_layouts_and_bad_files(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    _jpeg(flat / "n01440764_tench.JPEG")
    _jpeg(flat / "n15075141_toilet_tissue.JPEG")
    (flat / "n01443537_goldfish.JPEG").write_bytes(np.random.default_rng(0).bytes(500))
    (flat / "README.md").write_text("not an image")
    folder = scan_folder(flat)
    assert sorted(i.label for i in folder.items) == [0, 1, 999]
    assert folder.skipped["non-image"] == 1
    pixels, labels, kept = load_pixels(folder.items, folder.skipped)
    assert pixels.shape == (2, 224, 224, 3) and sorted(labels.tolist()) == [0, 999]
    assert folder.skipped["corrupt or unreadable"] == 1
    nested = tmp_path / "nested"
    (nested / "n01443537").mkdir(parents=True)
    _jpeg(nested / "n01443537" / "a.jpg")
    _jpeg(nested / "unknown.jpg")
    labels = {i.name: i.label for i in scan_folder(nested).items}
    assert labels == {"n01443537/a.jpg": 1, "unknown.jpg": -1}


def test_empty_and_all_corrupt_folders(tmp_path):
    with pytest.raises(DataError, match="no images"):
        scan_folder(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no usable image"):
        make_split(scan_folder(tmp_path), 1, 1)
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_folder_errors_name_the_option_the_folder_came_from(tmp_path):
    for flag in ("--calib-dir", "--data"):
        for root in (tmp_path / "missing", tmp_path):
            with pytest.raises(DataError) as err:
                scan_folder(root, flag=flag)
            others = {"--calib-dir", "--data"} - {flag}
            assert flag in str(err.value) and not any(o in str(err.value) for o in others), (flag, str(err.value))


def test_split_is_balanced_disjoint_deterministic(samples_dir):
    folder = scan_folder(samples_dir)
    a = make_split(folder, 200, 50, seed=0)
    b = make_split(scan_folder(samples_dir), 200, 50, seed=0)
    c = make_split(scan_folder(samples_dir), 200, 50, seed=1)
    assert a.calib.names == b.calib.names and a.eval.names == b.eval.names
    assert a.calib.names != c.calib.names
    assert not set(a.calib.names) & set(a.eval.names)
    assert np.array_equal(a.eval.nhwc(), a.eval.nchw().transpose(0, 2, 3, 1))


def test_split_is_balanced_on_uneven_classes(uneven_image_folder):
    """Classes of 10, 3 and 1 images: the calibration set takes every class before a second image of any,
    and calibration + evaluation together are a balanced prefix (1 + 3 + 6), whatever the seed."""
    from collections import Counter

    folder = scan_folder(uneven_image_folder)
    assert Counter(i.label for i in folder.items) == {0: 10, 1: 3, 2: 1}, "fixture layout or label convention changed"
    for seed in (0, 1, 2):
        split = make_split(folder, 6, 4, seed=seed)
        calib, both = Counter(split.calib.labels.tolist()), Counter(split.calib.labels.tolist() + split.eval.labels.tolist())
        assert calib[2] == 1 and sorted(calib.values()) == [1, 2, 3], f"seed {seed}: calibration per class {dict(calib)}"
        assert both == {0: 6, 1: 3, 2: 1}, f"seed {seed}: calibration + evaluation per class {dict(both)}, want 6/3/1"
        assert not set(split.calib.names) & set(split.eval.names), f"seed {seed}: calibration and evaluation overlap"


def test_a_fine_tunes_own_class_folders_are_balanced(tmp_path, samples_dir):
    """Folders that are no ImageNet wnid (cat/, dog/) are classes too: 30 cats must not fill calibration."""
    photos = sorted(samples_dir.glob("n*.JPEG"))
    for cls, n, first in (("cat", 30, 0), ("dog", 3, 30)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"img{i:02d}.jpg").symlink_to(photos[first + i])
    split = make_split(scan_folder(tmp_path), 6, 6, seed=0)
    folders = sorted(name.split("/")[0] for name in split.calib.names)
    assert folders.count("dog") == 3 and folders.count("cat") == 3, f"calibration took {folders}"


def test_split_needs_eval_images(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / f"n01440764_{i}.JPEG")
    with pytest.raises(DataError, match="lower --calib-size"):
        make_split(scan_folder(tmp_path), 5, 2)


def test_image_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFMOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFMOD_CALIB_DIR", str(tmp_path / "env"))
    assert resolve_image_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_image_dir(None) == tmp_path / "env"
    monkeypatch.delenv("EFFMOD_CALIB_DIR")
    with pytest.raises(DataError, match="--calib-dir"):
        resolve_image_dir(None)
    done = tmp_path / "cache" / "imagenet-samples"
    done.mkdir(parents=True)
    (done / ".complete").write_text("ok")
    assert resolve_image_dir(None) == done


def test_same_file_name_in_two_class_folders_stays_two_images(tmp_path):
    """In <wnid>/<file> layout the file name alone is ambiguous; splits and manifests name images by relative path."""
    for wnid, color in (("n01440764", (200, 10, 10)), ("n01443537", (10, 10, 200))):
        (tmp_path / wnid).mkdir()
        for i in range(2):
            _jpeg(tmp_path / wnid / f"img{i}.jpg", color=color)
    folder = scan_folder(tmp_path)
    names = [i.name for i in folder.items]
    assert names == ["n01440764/img0.jpg", "n01440764/img1.jpg", "n01443537/img0.jpg", "n01443537/img1.jpg"], names
    split = make_split(folder, 2, 2, seed=0)
    assert not set(split.calib.names) & set(split.eval.names), (split.calib.names, split.eval.names)
    wanted = set(split.eval.names)
    picked = [i for i in folder.items if i.name in wanted]
    assert sorted(i.label for i in picked) == sorted(split.eval.labels.tolist()), "eval images picked by name differ"


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """Pillow's own convert clips 16-bit values at 255: the image came out almost white."""
    gray8 = np.random.default_rng(0).integers(0, 256, (300, 260), dtype=np.uint16)
    Image.fromarray((gray8 * 257).astype(np.uint16)).save(tmp_path / "n01440764_a.png")
    Image.fromarray(gray8.astype(np.uint8), "L").save(tmp_path / "n01440764_b.png")
    pixels, _, kept = load_pixels(scan_folder(tmp_path).items)
    assert len(kept) == 2
    diff = np.abs(pixels[0].astype(int) - pixels[1].astype(int)).max()
    assert diff == 0, f"16-bit and 8-bit copies of one image differ by {diff} levels after preprocessing"


def test_unusable_images_are_skipped_with_the_reason(tmp_path):
    import os

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "n01440764_ok.png")
    Image.fromarray(np.full((60, 50), 0.5, np.float32), "F").save(tmp_path / "n01440764_float.tif")
    Image.fromarray(np.zeros((1, 4000, 3), np.uint8)).save(tmp_path / "n01440764_narrow.png")
    fd = os.open(os.path.join(os.fsencode(tmp_path), b"n01440764_\xff.png"), os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    folder = scan_folder(tmp_path)
    assert folder.skipped == {"file name not UTF-8": 1}, folder.skipped
    skipped = dict(folder.skipped)
    pixels, _, kept = load_pixels(folder.items, folder.skipped)
    assert [k.path.name for k in kept] == ["n01440764_ok.png"], kept
    assert dict(folder.skipped) == {**skipped, "floating-point pixels (mode F; save as 8-bit)": 1,
                                    "aspect ratio over 100:1": 1}, folder.skipped


def test_an_unreadable_class_folder_is_counted_not_dropped_silently(tmp_path, monkeypatch):
    import os

    for wnid in ("n01440764", "n01443537"):
        (tmp_path / wnid).mkdir()
        _jpeg(tmp_path / wnid / "a.jpg")
    real = os.scandir

    def scandir(path="."):  # root bypasses file permissions, so the refusal is simulated
        if os.fspath(path).endswith("n01443537"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    folder = scan_folder(tmp_path)
    assert [i.name for i in folder.items] == ["n01440764/a.jpg"]
    assert folder.skipped["unreadable folder"] == 1 and "1 unreadable folder" in folder.summary()


def test_too_few_images_suggests_sizes_that_fit(tmp_path):
    for i in range(16):
        _jpeg(tmp_path / f"n01440764_{i}.JPEG")
    with pytest.raises(DataError, match=r"e\.g\. --eval-size 6\)"):
        make_split(scan_folder(tmp_path), 10, 100)
