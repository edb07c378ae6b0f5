"""Which convs of an int8-mixed TFLite file to keep float: each one's logit noise, measured in PyTorch.

The per-op sensitivity (``litert_worker.cmd_sensitivity``) measures how much
an op lowers the SQNR of its own output. That ranks an op by its local
fidelity, not by what its int8 rounding does to the logits: on a distilled
EfficientMod-s the four ops it ranked first, kept float, gained 0.0 dB.

This ranking fake-quantizes, in the PyTorch deploy form the file was made
from, one conv's int8 rounding at a time, with the very scales and zero points
of the int8 file, and measures the noise it adds to the logits on calibration
images. Only the rounding that keeping the conv float would remove is
simulated: its input's if the input comes from a float op, its output's if
every consumer is float (``litert_worker.cmd_conv_ops``). Their weight rounding
is not simulated: with GPTQ weights (the default) the deploy form holds the
int8 file's weights already, so keeping a conv float does not change them. Convs are tied to
PyTorch modules by their weights. Float weights take 4 bytes instead of 1, so
convs are ranked by logit noise per byte the file grows by keeping them float;
``converters.to_tflite.fill_budget`` then decides what fits the size budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from converters.coreml_palette import BlockCache
from edge.checks import sqnr_db
from edge.errors import ConversionError

RANK_BYTES_FLOOR = 4096  # per-conv overhead in the per-byte ranking, so tiny convs of no effect do not lead it


@dataclass(frozen=True)
class ConvNoise:
    """One conv of the int8 file and the logit noise of the int8 rounding keeping it float would remove."""

    tensor: str  # the denylist name
    op: str
    module: str
    share: float  # of the summed per-conv noise
    extra_bytes: int  # how much the file grows when the conv's weights stay float32

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "op": self.op, "module": self.module, "noise_share": round(self.share, 4),
                "extra_bytes": self.extra_bytes}


def _fake_quant(scale: float, zero_point: float):
    def f(x: torch.Tensor) -> torch.Tensor:
        if scale <= 0:  # a tensor the file does not quantize
            return x
        return (torch.clamp(torch.round(x / scale) + zero_point, -128, 127) - zero_point) * scale

    return f


def match_modules(net: nn.Module, weights: list[np.ndarray]) -> list[str]:
    """The conv/linear module of ``net`` holding each weight (same shape, nearest values); error if one has none.

    The int8 file's weights are the module's on the per-channel int8 grid, so a
    match is within half a step (about 0.4 % of the channel's largest weight).
    Modules of equal weights (the LayerNorm statistics convs of equal width) are
    taken in module order, which is the graph's order.
    """
    mods = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    free = dict(mods)
    names = []
    for k, w in enumerate(weights):
        best, gap = None, np.inf
        for n, m in free.items():
            wt = m.weight.detach().numpy()
            if wt.shape == w.shape:
                d = float(np.abs(wt - w).max())
                if d < gap:
                    best, gap = n, d
        if best is None or gap > 0.01 * float(np.abs(w).max()) + 1e-6:
            raise ConversionError(f"conv {k} of the int8 file {w.shape} matches no module of the deploy form")
        names.append(best)
        del free[best]
    return names


def rank_convs(net: nn.Module, ops: list[dict], weights: list[np.ndarray], images_nchw: np.ndarray,
               exclude_modules: tuple[str, ...] = (".variance",)) -> tuple[list[ConvNoise], dict]:
    """Rank the convs of ``ops`` (``litert_worker.cmd_conv_ops`` rows) by logit noise per extra float byte.

    Returns the ranking (noisiest per byte first; convs whose float copy removes
    nothing are left out) and a summary with the simulated SQNR of the int8
    file's convs, for comparison with the file's measured SQNR. ``net`` must be
    the deploy form the file was converted from; it is left as it was.
    """
    names = match_modules(net, weights)
    mods = dict(net.named_modules())
    x = torch.from_numpy(np.ascontiguousarray(images_nchw, np.float32))
    net.eval()
    cache = BlockCache(net, x)

    def logits(sel: list[int], only_removable: bool, changed: str | None = None) -> np.ndarray:
        hooks = []
        try:
            for k in sel:
                m, r = mods[names[k]], ops[k]
                fin, fout = _fake_quant(*r["input_q"]), _fake_quant(*r["output_q"])
                if r["float_input_removable"] or not only_removable:
                    hooks.append(m.register_forward_pre_hook(lambda _m, a, f=fin: (f(a[0]),) + tuple(a[1:])))
                if r["float_output_removable"] or not only_removable:
                    hooks.append(m.register_forward_hook(lambda _m, _a, o, f=fout: f(o)))
            return cache.logits(changed)
        finally:
            for h in hooks:
                h.remove()

    cands = [k for k, r in enumerate(ops) if not names[k].endswith(exclude_modules)
             and (r["float_input_removable"] or r["float_output_removable"])]
    noise = {k: float(((logits([k], True, names[k]) - cache.reference) ** 2).sum()) for k in cands}
    total = sum(noise.values()) or 1.0
    ranked = [ConvNoise(ops[k]["tensor"], ops[k]["op"], names[k], noise[k] / total,
                        3 * int(mods[names[k]].weight.numel())) for k in cands if noise[k] > 0]
    ranked.sort(key=lambda c: -c.share / (c.extra_bytes + RANK_BYTES_FLOOR))
    quantized = [k for k in range(len(ops)) if not names[k].endswith(exclude_modules)]
    summary = {
        "method": "per-conv logit noise of the int8 rounding that keeping it float removes (PyTorch fake-quant "
                  "with the int8 file's scales, calibration images)",
        "images": int(len(x)),
        "convs": len(ops),
        "candidates": len(ranked),
        "simulated_sqnr_db": round(float(sqnr_db(cache.reference, logits(quantized, False))), 2),
        "simulated": "every conv's input and output in int8 but the LayerNorm variance convs', against the "
                     "deploy form's float logits",
    }
    return ranked, summary
