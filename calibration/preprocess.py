"""Evaluation preprocessing, identical to the upstream EfficientMod evaluation.

Every target, the evaluator and the mobile apps use this contract:

1. decode to RGB (grayscale and RGBA images are converted),
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


def resize_and_crop(img: Image.Image, resize: int = RESIZE, crop: int = CROP) -> Image.Image:
    """Steps 1-3: RGB, shorter side to ``resize`` (bicubic), center crop ``crop``."""
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def to_uint8_hwc(img: Image.Image) -> np.ndarray:
    """Cropped RGB pixels as uint8 HWC, the input of int8-I/O and image-input models."""
    return np.asarray(resize_and_crop(img), dtype=np.uint8)


def normalize(pixels_hwc: np.ndarray) -> np.ndarray:
    """Step 4-5: uint8 HWC pixels -> normalized float32 CHW."""
    x = pixels_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img: Image.Image) -> np.ndarray:
    """The full contract: a PIL image -> normalized float32 (3, 224, 224)."""
    return normalize(to_uint8_hwc(img))
