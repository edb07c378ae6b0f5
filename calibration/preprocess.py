"""Evaluation preprocessing, identical to the upstream EfficientMod evaluation.

Every target, the evaluator and the mobile apps use this contract:

1. decode to RGB (grayscale and RGBA images are converted; 16-bit grayscale is
   scaled to 8 bits; signed, 32-bit integer and float images, and images whose
   long side is over MAX_ASPECT times the short one, are refused with
   :class:`UnusableImageError`). The stored pixels are used, with no EXIF
   rotation, as torchvision's ImageNet loader reads them; apps feed the photo
   upright (ios_notes), so for an EXIF-rotated file (1 of the 1000 samples, a
   can opener) the evaluated image is the app's turned on its side,
2. resize so the *shorter* side is 256 px with bicubic interpolation
   (longer side = floor(256 * long / short)),
3. center-crop 224 x 224 (offset = round((size - 224) / 2)),
4. scale to [0, 1], subtract MEAN and divide by STD per channel (RGB order),
5. layout NCHW float32 for PyTorch/ONNX, NHWC for TFLite; Core ML packages take
   the 224 x 224 RGB image of step 3 (0..255) and do step 4 inside the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE = 256
CROP = 224
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


MAX_ASPECT = 100  # the shorter-side resize grows with the aspect ratio: a 1x40000 image would need 10 GB
UNSIGNED_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes of 16-bit grayscale files


class UnusableImageError(ValueError):
    """An image the contract cannot turn into 8-bit RGB pixels; ``reason`` says why, for the skip count."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def to_rgb(img: Image.Image) -> Image.Image:
    """Step 1: 8-bit RGB. Pillow's own convert clips 16-bit values at 255 (a white image)."""
    if img.mode in UNSIGNED_16:
        wide = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode.startswith("I") or img.mode == "F":  # signed or 32-bit integers, floats: no known white level
        kind = "floating-point" if img.mode == "F" else "signed or 32-bit integer"
        raise UnusableImageError(f"{kind} pixels (mode {img.mode}; save as 8-bit)")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> Image.Image:
    """Steps 1-3: RGB, shorter side to ``resize`` (bicubic), center crop ``crop``."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UnusableImageError(f"aspect ratio over {MAX_ASPECT}:1")
    img = to_rgb(img)
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def to_uint8_hwc(img: Image.Image) -> np.ndarray:
    """Cropped RGB pixels as uint8 HWC: what a Core ML image input takes (int8-I/O TFLite takes normalized, quantized values)."""
    return np.asarray(resize_and_crop(img), dtype=np.uint8)


def normalize(pixels_hwc: np.ndarray) -> np.ndarray:
    """Step 4-5: uint8 HWC pixels -> normalized float32 CHW."""
    x = pixels_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img: Image.Image) -> np.ndarray:
    """The full contract: a PIL image -> normalized float32 (3, 224, 224)."""
    return normalize(to_uint8_hwc(img))
