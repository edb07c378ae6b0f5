"""How far the Android demo's resize departs from the verified bicubic preprocessing, judged by a trained classifier.

android_demo/EffmodClassifier.kt resizes with ``Bitmap.createScaledBitmap(..., filter=true)``:
bilinear sampling at pixel centres with no prefilter, which aliases when a large photo
is shrunk in one step. The demo therefore halves a photo while its shorter side stays
>= 512, then scales to the 256-side size. This script emulates both in NumPy (one step,
and with the halvings), applies the demo's integer crop, and compares each with
``calibration.preprocess.resize_and_crop`` (Pillow bicubic): mean and 99th-percentile
|Δpixel|, and the top-1 agreement of EfficientNet-Lite0 (trained ImageNet weights, see
benchmarks/trained_margins.py for the download) between the two inputs.

Usage: python -m benchmarks.android_resize --lite0 PTH [--calib-dir DIR] [--min-short 512] [--limit 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.trained_margins import Lite0, lite0_input, load_lite0_state
from calibration.folder import scan_folder
from calibration.preprocess import resize_and_crop, to_rgb
from calibration.source import resolve_image_dir

SHORT, CROP = 256, 224


def bilinear(a: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """Bilinear resize sampling at pixel centres, edges clamped, no prefilter; rounded to uint8."""
    def taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.clip((np.arange(n) + 0.5) * (size / n) - 0.5, 0, size - 1)
        i0 = np.floor(s).astype(int)
        return i0, np.minimum(i0 + 1, size - 1), (s - i0).astype(np.float32)

    a = a.astype(np.float32)
    y0, y1, fy = taps(new_h, a.shape[0])
    x0, x1, fx = taps(new_w, a.shape[1])
    fx3 = fx[None, :, None]
    top = a[y0][:, x0] * (1 - fx3) + a[y0][:, x1] * fx3
    bottom = a[y1][:, x0] * (1 - fx3) + a[y1][:, x1] * fx3
    out = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def demo_crop(img: Image.Image, halve: bool) -> np.ndarray:
    """The Kotlin demo's crop224: integer target size, optional halvings, bilinear, half-to-even offset."""
    a = np.asarray(to_rgb(img))
    h0, w0 = a.shape[:2]
    short = min(w0, h0)
    w = SHORT if w0 == short else SHORT * w0 // short
    h = SHORT * h0 // short if w0 == short else SHORT
    while halve and min(a.shape[0], a.shape[1]) // 2 >= SHORT:
        a = bilinear(a, a.shape[1] // 2, a.shape[0] // 2)
    r = bilinear(a, w, h)
    x, y = round((w - CROP) / 2), round((h - CROP) / 2)
    return r[y:y + CROP, x:x + CROP]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lite0", type=Path, required=True)
    p.add_argument("--calib-dir")
    p.add_argument("--min-short", type=int, default=512, help="only photos whose shorter side is at least this")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args(argv)
    folder = scan_folder(resolve_image_dir(args.calib_dir))
    picked = []
    for item in folder.items:
        with Image.open(item.path) as img:
            if min(img.size) >= args.min_short:
                picked.append(item)
        if len(picked) == args.limit:
            break
    if not picked:
        raise SystemExit(f"no photo in {folder.root} has a shorter side of {args.min_short} px or more")
    net = Lite0(load_lite0_state(args.lite0)).eval()
    ref, one, halved = [], [], []
    for item in picked:
        with Image.open(item.path) as img:
            ref.append(np.asarray(resize_and_crop(to_rgb(img))))
            one.append(demo_crop(img, halve=False))
            halved.append(demo_crop(img, halve=True))
    with torch.no_grad():
        top_ref = net(lite0_input(np.stack(ref))).argmax(1).numpy()
        print(f"{len(picked)} photos in {folder.root} with a shorter side >= {args.min_short} px")
        for name, batch in (("one bilinear step", one), ("halvings, then bilinear", halved)):
            b = np.stack(batch)
            d = np.abs(b.astype(int) - np.stack(ref).astype(int))
            agree = float(np.mean(net(lite0_input(b)).argmax(1).numpy() == top_ref))
            print(f"{name:>24}: mean |Δpixel| {d.mean():.2f}, p99 {np.percentile(d, 99):.0f}, "
                  f"Lite0 top-1 agreement with bicubic {agree:.1%}")


if __name__ == "__main__":
    main()
