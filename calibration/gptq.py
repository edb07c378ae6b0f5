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

The same column-by-column rounding works for any grid. :class:`LayerRounder`
also rounds onto a per-tensor palette (Core ML's iOS 17 ``constexpr_lut_to_dense``:
one look-up table of ``2**nbits`` values per weight tensor), whose values are a
1-D k-means of the weights (:func:`palette_lut`): each weight then lands on one
of those values, so coremltools' ``unique`` palettization stores them exactly.
With a group size it rounds onto grouped-channel palettes instead (iOS 18: one
table per ``group_size`` consecutive output channels), each row onto its own
group's table.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

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
    grid: str = "int8"

    def as_dict(self) -> dict:
        gains = np.asarray(self.layer_gain_db) if self.layer_gain_db else np.zeros(1)
        return {
            "method": f"GPTQ ({_grid_text(self.grid)})",
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


def palette_grid(nbits: int, group_size: int | None = None) -> str:
    """The name of a palette grid: ``pal4`` (per tensor) or ``pal4g16`` (per group of 16 output channels)."""
    return f"pal{nbits}" if group_size is None else f"pal{nbits}g{group_size}"


def _grid_text(grid: str) -> str:
    if grid == "int8":
        return "per-channel symmetric int8 grid, max|w| pinned"
    nbits, _, group = grid[3:].partition("g")
    where = f"one per group of {group} output channels" if group else "per-tensor"
    return f"{grid}: {where} k-means palette of {1 << int(nbits)} values"


def nearest_grid(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to its nearest per-channel int8 level (what the converters do)."""
    levels, scale = _nearest_levels(weight)
    return levels * scale


def int8_levels(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``weight``'s nearest per-channel int8 levels (int8, same shape; on the grid, its own levels) and its
    per-row scales (float32)."""
    levels, scale = _nearest_levels(weight.detach())
    return levels.to(torch.int8).numpy(), scale.reshape(-1).numpy()


def _nearest_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest per-channel int8 levels (float tensor, ``weight``'s shape) and the scales, shaped to broadcast."""
    scale = _scales(weight.reshape(weight.shape[0], -1)).view(-1, *[1] * (weight.dim() - 1))
    return (weight / scale).round().clamp(-LEVELS, LEVELS), scale


def _scales(rows: torch.Tensor) -> torch.Tensor:
    return rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / LEVELS


def _groups(layer: Layer) -> int:
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def _gram(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The (groups, k, k) Gram matrix of the layer's input ``x`` (float64), k = one group's weight row length.

    A 1x1 conv's rows are its input's pixels, one matmul over all of them. Other
    convs take one batched matmul per image and group on a view of ``F.unfold``'s
    columns, summed in float64: gathering each group's rows into one copy first
    took 3.4x as long on the depthwise pieces (0.86 s against 0.25 s).
    """
    if isinstance(layer, nn.Linear):
        cols = x.reshape(-1, x.shape[-1])
        return (cols.T @ cols).double()[None]
    g, n = layer.groups, x.shape[0]
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
        rows = x.permute(0, 2, 3, 1).reshape(-1, g, x.shape[1] // g).transpose(0, 1)
        return torch.bmm(rows.transpose(1, 2), rows).double()
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    cols = cols.view(n * g, cols.shape[1] // g, cols.shape[2])
    k = cols.shape[1]
    return torch.bmm(cols, cols.transpose(1, 2)).double().view(n, g, k, k).sum(0)


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1`` (groups, k, k), float64."""
    h = h.double().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)  # a view: edits land in h
    diag[diag <= 0] = 1.0  # inputs that were always zero: rounding them costs nothing
    diag += damp * diag.mean(dim=1, keepdim=True)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _gptq(w: torch.Tensor, u: torch.Tensor, quantize: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rows (groups, out, k) rounded column by column, each column's error spread over the later ones.

    ``quantize(j, column)`` puts column ``j`` (groups, out) on the grid; ``u`` is
    :func:`_inverse_factor` of the inputs' Gram matrix.
    """
    w = w.double().clone()
    q = torch.empty_like(w)
    for j in range(w.shape[2]):
        q[:, :, j] = quantize(j, w[:, :, j])
        err = (w[:, :, j] - q[:, :, j]) / u[:, j, j, None]
        w[:, :, j + 1 :] -= err[:, :, None] * u[:, None, j, j + 1 :]
    return q


def _int8_rows(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows (groups, out, k) rounded onto the per-channel int8 grid, row maxima pinned; ``u`` from :func:`_inverse_factor`."""
    g, rows, k = w.shape
    scale = _scales(w.reshape(g * rows, k)).view(g, rows)
    pinned = w.abs().argmax(dim=2)
    pin_value = torch.sign(torch.gather(w, 2, pinned[..., None])[..., 0]) * LEVELS

    def to_grid(j: int, col: torch.Tensor) -> torch.Tensor:
        level = (col / scale).round().clamp(-LEVELS, LEVELS)
        at_max = pinned == j
        level[at_max] = pin_value[at_max]  # keeps max|q| = 127, so the converter's scale is ours
        return level * scale

    return _gptq(w, u, to_grid)


def _kmeans_rows(x: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """(rows, k) sorted 1-D k-means centres of each row of ``x``, from quantile seeds (deterministic)."""
    x = x.detach().double().contiguous()
    centers = torch.from_numpy(np.quantile(x.numpy(), np.linspace(0.0, 1.0, k), axis=1).T.copy())
    ones = torch.ones_like(x)
    for _ in range(iters):
        idx = torch.searchsorted(((centers[:, 1:] + centers[:, :-1]) / 2).contiguous(), x)
        total = torch.zeros_like(centers).scatter_add_(1, idx, x)
        count = torch.zeros_like(centers).scatter_add_(1, idx, ones)
        new, _ = torch.sort(torch.where(count > 0, total / count.clamp_min(1), centers), dim=1)
        if torch.equal(new, centers):  # every row at its fixed point
            break
        centers = new
    return centers


def palette_lut(weight: torch.Tensor, nbits: int, iters: int = 50) -> torch.Tensor:
    """The sorted ``2**nbits``-value palette of ``weight``: 1-D k-means from quantile seeds (deterministic)."""
    return _kmeans_rows(weight.reshape(1, -1), 1 << nbits, iters)[0]


def on_palette(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Each of ``values`` replaced by its nearest entry of the sorted palette ``lut``."""
    return on_row_palettes(values.reshape(1, -1), lut[None]).reshape(values.shape)


def grouped_palette_luts(weight: torch.Tensor, nbits: int, group_size: int) -> torch.Tensor:
    """(groups, ``2**nbits``) sorted palettes: one :func:`palette_lut` per ``group_size`` output channels."""
    if weight.shape[0] % group_size:
        raise ValueError(f"{weight.shape[0]} output channels do not split into groups of {group_size}")
    return _kmeans_rows(weight.reshape(weight.shape[0] // group_size, -1), 1 << nbits)


def on_row_palettes(values: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """Each row of ``values`` (rows, ...) replaced by its nearest entry of that row's sorted palette ``luts[row]``."""
    luts = luts.to(values.dtype)
    flat = values.reshape(values.shape[0], -1).contiguous()
    idx = torch.searchsorted(((luts[:, 1:] + luts[:, :-1]) / 2).contiguous(), flat)
    return torch.gather(luts, 1, idx).reshape(values.shape)


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
            g = _gram(layer, inputs[0].detach().float())
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


class LayerRounder:
    """GPTQ rounding of one network's conv/linear weights onto int8 or palette grids.

    The layers' input Gram matrices are measured once on ``images_nchw``
    (normalized NCHW calibration images), from the float network: every layer
    is rounded against float inputs. Rounded weights are cached per grid, so
    searches that compare grids layer by layer pay for each rounding once.
    """

    def __init__(self, net: nn.Module, images_nchw: np.ndarray, min_elements: int = 0, damp: float = DAMP):
        if len(images_nchw) == 0:
            raise ValueError("GPTQ rounding needs calibration images")
        start = time.perf_counter()
        # a private copy: callers (the palette search) swap weights in and out of their network
        self.net, self.images, self.damp = copy.deepcopy(net).eval(), len(images_nchw), damp
        found, self.skipped_small = quantizable_layers(self.net, min_elements)
        self.layers: dict[str, Layer] = dict(found)
        with torch.no_grad():
            self._grams = input_gram(self.net, found, images_nchw)
        self._factors: dict[str, torch.Tensor] = {}
        self._rounded: dict[tuple[str, str], torch.Tensor] = {}
        self._gain_db: dict[tuple[str, str], float] = {}
        self.seconds = time.perf_counter() - start

    def _rows(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        g = _groups(layer)
        return layer.weight.detach().reshape(g, layer.weight.shape[0] // g, -1).double()

    def _round(self, name: str, grid: str, gptq: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               nearest: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        key = (name, grid)
        if key not in self._rounded:
            start = time.perf_counter()
            w, shape = self._rows(name), self.layers[name].weight.shape
            near = nearest(w)
            if name not in self._grams:  # never ran on these inputs: nothing to weigh the errors with
                q = near
            else:
                if name not in self._factors:
                    self._factors[name] = _inverse_factor(self._grams[name], self.damp)
                q = gptq(w, self._factors[name])
                h = self._grams[name]
                err_near, err_gptq = _output_error(w - near, h), _output_error(w - q, h)
                if err_near > 0:
                    self._gain_db[key] = 10.0 * float(np.log10(err_near / max(err_gptq, 1e-300)))
            self._rounded[key] = q.reshape(shape).to(self.layers[name].weight.dtype)
            self.seconds += time.perf_counter() - start
        return self._rounded[key]

    @torch.no_grad()
    def int8(self, name: str) -> torch.Tensor:
        """Layer ``name``'s weight on the per-channel symmetric int8 grid (row maxima pinned)."""
        return self._round(name, "int8", _int8_rows,
                           lambda w: nearest_grid(w.reshape(w.shape[0] * w.shape[1], -1)).reshape(w.shape))

    @torch.no_grad()
    def palette(self, name: str, nbits: int, group_size: int | None = None) -> torch.Tensor:
        """Layer ``name``'s weight on its own ``2**nbits``-value k-means palette.

        One palette per tensor, or with ``group_size`` one per group of that many
        output channels (each row then rounds onto its group's palette).
        """
        grid = palette_grid(nbits, group_size)
        if (name, grid) in self._rounded:
            return self._rounded[(name, grid)]
        weight = self.layers[name].weight
        if group_size is None:
            luts = palette_lut(weight, nbits).expand(weight.shape[0], -1)
        else:
            luts = grouped_palette_luts(weight, nbits, group_size).repeat_interleave(group_size, dim=0)

        def per_row(w: torch.Tensor) -> torch.Tensor:  # (groups, out, k) in output-channel order
            return on_row_palettes(w.reshape(weight.shape[0], -1), luts).reshape(w.shape)

        return self._round(name, grid, lambda w, u: _gptq(w, u, lambda _j, col: per_row(col)), per_row)

    def network(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the network with the given layers' weights replaced (by layer name)."""
        out = copy.deepcopy(self.net).eval()
        modules = dict(out.named_modules())
        with torch.no_grad():
            for name, w in weights.items():
                modules[name].weight.copy_(w)
        return out

    def report(self, grid: str, names: list[str] | None = None) -> RoundingReport:
        """What rounding ``names`` (default: every layer rounded onto ``grid``) did."""
        names = [n for (n, g) in self._rounded if g == grid] if names is None else names
        gains = [self._gain_db[(n, grid)] for n in names if (n, grid) in self._gain_db]
        return RoundingReport(self.images, len(names), self.skipped_small, self.seconds, gains, grid)


def gptq_round(net: nn.Module, images_nchw: np.ndarray, min_elements: int = 0,
               damp: float = DAMP) -> tuple[nn.Module, RoundingReport]:
    """A copy of ``net`` with every conv/linear of >= ``min_elements`` weights GPTQ-rounded to int8 levels.

    ``images_nchw`` are normalized calibration images (N, 3, H, W) float32. The
    weights stay float tensors; they are the values an int8 converter stores.
    """
    rounder = LayerRounder(net, images_nchw, min_elements, damp)
    out = rounder.network({name: rounder.int8(name) for name in rounder.layers})
    return out, rounder.report("int8")
