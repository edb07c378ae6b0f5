"""GPTQ rounding of int8 per-channel weights onto the grid the converters use.

Both int8 converters store a float weight tensor ``W`` (rows = output channels)
as ``s_r * q`` with ``s_r = max|W_r| / 127`` and ``q = round(W / s_r)`` in
[-127, 127]: TFLite's per-channel int8 and coremltools' ``linear_symmetric``
int8 alike. Rounding every weight to its nearest level ignores that one output
channel's rounding errors add up over the inputs it multiplies. GPTQ (Frantar
et al., ICLR 2023) rounds one input column at a time and spreads that column's
rounding error over the columns not yet rounded, weighted by the inverse of
``H = X^T X``, the Gram matrix of the layer's inputs on calibration images. That
greedily minimises the layer's output error ``||X (W - Q)^T||^2`` instead of
the weight error.

:func:`gptq_round` returns a copy of a network whose conv/linear weights already
lie on that grid, each row's largest weight pinned at +-127 levels so that the
converter derives the same scale and rounds every weight to itself: the int8
file then holds exactly these weights. Grouped and depthwise convs get one
``H`` per group; dilation, padding and stride come from ``F.unfold``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 127  # symmetric int8: q in [-127, 127]
DAMP = 0.01  # fraction of mean(diag(H)) added to the diagonal (GPTQ's default)
GPTQ_IMAGES = 128  # calibration images the converters feed it (stage-4 layers see 49 positions each)
Layer = nn.Conv2d | nn.Linear


@dataclass
class RoundingReport:
    """What :func:`gptq_round` did, for the manifest."""

    images: int
    layers: int
    skipped_small: int
    seconds: float
    layer_gain_db: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        gains = np.asarray(self.layer_gain_db) if self.layer_gain_db else np.zeros(1)
        return {
            "method": "GPTQ (per-channel symmetric int8 grid, max|w| pinned)",
            "calibration_images": self.images,
            "layers": self.layers,
            "layers_below_size_threshold": self.skipped_small,
            "seconds": round(self.seconds, 1),
            "layer_output_error_gain_db": {
                "median": round(float(np.median(gains)), 2),
                "min": round(float(gains.min()), 2),
                "max": round(float(gains.max()), 2),
                "measured_on": "calibration images, per layer, against round-to-nearest",
            },
        }


def nearest_grid(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to its nearest per-channel int8 level (what the converters do)."""
    scale = _scales(weight.reshape(weight.shape[0], -1)).view(-1, *[1] * (weight.dim() - 1))
    return (weight / scale).round().clamp(-LEVELS, LEVELS) * scale


def _scales(rows: torch.Tensor) -> torch.Tensor:
    return rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / LEVELS


def _groups(layer: Layer) -> int:
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def _columns(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (groups, rows, columns of one group's weight row)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    g = layer.groups
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
        n, c = x.shape[:2]
        return x.permute(0, 2, 3, 1).reshape(-1, g, c // g).transpose(0, 1)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    n, k, positions = cols.shape
    return cols.view(n, g, k // g, positions).permute(1, 0, 3, 2).reshape(g, n * positions, k // g)


def _gptq_rows(w: torch.Tensor, h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Weight rows (groups, out, k) rounded by GPTQ against each group's input Gram matrix ``h`` (groups, k, k)."""
    w = w.double().clone()
    h = h.double().clone()
    g, rows, k = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)  # a view: edits land in h
    diag[diag <= 0] = 1.0  # inputs that were always zero: rounding them costs nothing
    diag += damp * diag.mean(dim=1, keepdim=True)
    scale = _scales(w.reshape(g * rows, k)).view(g, rows)
    pinned = w.abs().argmax(dim=2)
    pin_value = torch.sign(torch.gather(w, 2, pinned[..., None])[..., 0]) * LEVELS
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for j in range(k):
        level = (w[:, :, j] / scale).round().clamp(-LEVELS, LEVELS)
        at_max = pinned == j
        level[at_max] = pin_value[at_max]  # keeps max|q| = 127, so the converter's scale is ours
        q[:, :, j] = level * scale
        err = (w[:, :, j] - q[:, :, j]) / u[:, j, j, None]
        w[:, :, j + 1 :] -= err[:, :, None] * u[:, None, j, j + 1 :]
    return q


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """sum over groups of tr(delta H delta^T): the squared output error on the calibration inputs."""
    d = delta.double()
    return float(torch.einsum("gok,gkl,gol->", d, h, d))


def quantizable_layers(net: nn.Module, min_elements: int = 0) -> tuple[list[tuple[str, Layer]], int]:
    """Conv/linear layers with at least ``min_elements`` weights, and how many were smaller."""
    layers, small = [], 0
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if mod.weight.numel() >= min_elements:
                layers.append((name, mod))
            else:
                small += 1
    return layers, small


@torch.no_grad()
def input_gram(net: nn.Module, layers: list[tuple[str, Layer]], images_nchw: np.ndarray,
               batch: int = 4) -> dict[str, torch.Tensor]:
    """Per layer, the (groups, k, k) Gram matrix of its inputs over ``images_nchw`` (float64)."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str, layer: Layer):
        def record(_mod, inputs, _out):
            cols = _columns(layer, inputs[0].detach().float())
            g = torch.bmm(cols.transpose(1, 2), cols).double()
            grams[name] = grams[name] + g if name in grams else g
        return record

    handles = [layer.register_forward_hook(hook(name, layer)) for name, layer in layers]
    try:
        for i in range(0, len(images_nchw), batch):
            net(torch.from_numpy(np.ascontiguousarray(images_nchw[i : i + batch])))
    finally:
        for h in handles:
            h.remove()
    return grams


@torch.no_grad()
def gptq_round(net: nn.Module, images_nchw: np.ndarray, min_elements: int = 0,
               damp: float = DAMP) -> tuple[nn.Module, RoundingReport]:
    """A copy of ``net`` with every conv/linear of >= ``min_elements`` weights GPTQ-rounded to int8 levels.

    ``images_nchw`` are normalized calibration images (N, 3, H, W) float32. The
    weights stay float tensors; they are the values an int8 converter stores.
    """
    if len(images_nchw) == 0:
        raise ValueError("GPTQ rounding needs calibration images")
    start = time.perf_counter()
    out = copy.deepcopy(net).eval()
    layers, small = quantizable_layers(out, min_elements)
    grams = input_gram(out, layers, images_nchw)
    gains = []
    for name, layer in layers:
        if name not in grams:  # never ran on these inputs: nothing to weigh the errors with
            layer.weight.copy_(nearest_grid(layer.weight))
            continue
        g = _groups(layer)
        w = layer.weight.detach().clone().reshape(g, layer.weight.shape[0] // g, -1)
        h = grams[name]
        q = _gptq_rows(w, h, damp)
        layer.weight.copy_(q.to(w.dtype).reshape(layer.weight.shape))
        near = nearest_grid(w.reshape(layer.weight.shape[0], -1)).reshape(w.shape)
        err_near = _output_error(w - near, h)
        err_gptq = _output_error(w.double() - q, h)
        if err_near > 0:
            gains.append(10.0 * float(np.log10(err_near / max(err_gptq, 1e-300))))
    return out, RoundingReport(len(images_nchw), len(layers), small, time.perf_counter() - start, gains)
