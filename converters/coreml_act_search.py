"""Which w8a8 conv inputs to leave fp16: per-layer logit noise of int8 activations, measured in PyTorch.

w8a8 quantizes the input of every conv to int8 with one calibrated symmetric
range per tensor. Some inputs carry far more of the resulting logit noise than
others (heavy-tailed ones, or ones the rest of the network amplifies). The
search fake-quantizes one conv input at a time in the PyTorch module the
package was converted from, with the very ranges the package will use (keyed by
the MIL tensor names), measures the logit noise on calibration images, and
keeps the noisiest inputs fp16, up to a budget (a fraction of the quantized
conv inputs). Ops are tied to PyTorch modules by their exact fp16 weights, as
in :mod:`converters.coreml_palette`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from converters.coreml_palette import BlockCache, match_parameters, op_weights
from edge.checks import sqnr_db


@dataclass
class ActivationSearch:
    """What the search measured and chose; ``keep`` are MIL conv op names."""

    budget: float
    images: int
    candidates: int = 0
    keep: list[str] = field(default_factory=list)
    noise_share: dict[str, float] = field(default_factory=dict)
    module: dict[str, str] = field(default_factory=dict)
    unmatched_ops: int = 0
    predicted_sqnr_db: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "method": "per-conv logit noise of its int8 input (PyTorch fake-quant with the package's ranges, "
                      "calibration images); noisiest inputs kept fp16, within the budget",
            "images": self.images,
            "budget_fraction": self.budget,
            "quantized_conv_inputs": self.candidates,
            "kept_fp16": [{"op": op, "module": self.module[op], "noise_share": round(self.noise_share[op], 4)}
                          for op in self.keep],
            "kept_noise_share": round(sum(self.noise_share[op] for op in self.keep), 4),
            "unmatched_ops": self.unmatched_ops,
            "calib_sqnr_db": {k: round(v, 2) for k, v in self.predicted_sqnr_db.items()},
        }


def _fake_quant(bound: float):
    scale = bound / 127.0

    def hook(_mod: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        return (torch.round(x / scale).clamp(-128, 127) * scale,) + tuple(inputs[1:])  # as the package's quantize

    return hook


def search(
    net: nn.Module,
    program: Any,
    stats: dict[str, dict[str, float]],
    quantized: set[str],
    images_nchw: np.ndarray,
    budget: float,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> ActivationSearch:
    """Measure each quantized conv input's logit noise on ``images_nchw``; choose which stay fp16.

    ``program`` is the float program the package is made from (its weights are
    ``net``'s, in fp16); ``quantized`` the tensor names w8a8 quantizes; ``stats``
    their ranges; ``exclude`` names conv ops whose inputs stay fp16 anyway (the
    classifier head, user-named ops). ``net`` is left as it was.
    """
    match = match_parameters(net, op_weights(program, "const"))
    modules = dict(net.named_modules())
    convs = [op for op in program.functions["main"].operations if op.op_type in ("conv", "linear")
             and op.name not in exclude and op.inputs["x"].name in quantized and op.inputs["x"].name in stats]
    res = ActivationSearch(budget=budget, images=len(images_nchw))
    hooks: dict[str, tuple[nn.Module, float]] = {}
    for op in convs:
        param = match.get(op.name)
        mod = modules.get(param.rsplit(".", 1)[0]) if param else None
        if mod is None:
            res.unmatched_ops += 1
            continue
        s = stats[op.inputs["x"].name]
        hooks[op.name] = (mod, max(abs(s["rmin"]), abs(s["rmax"])))
        res.module[op.name] = param.rsplit(".", 1)[0]
    res.candidates = len(hooks)
    x = torch.from_numpy(np.ascontiguousarray(images_nchw, np.float32))
    net.eval()

    cache = BlockCache(net, x)

    def logits(quantize: set[str]) -> np.ndarray:
        handles = [hooks[op][0].register_forward_pre_hook(_fake_quant(hooks[op][1])) for op in quantize]
        try:
            only = next(iter(quantize)) if len(quantize) == 1 else None
            return cache.logits(res.module[only] if only is not None else None)
        finally:
            for h in handles:
                h.remove()

    ref = cache.reference
    for op in hooks:
        res.noise_share[op] = float(((logits({op}) - ref) ** 2).sum())
    total = sum(res.noise_share.values()) or 1.0
    res.noise_share = {op: v / total for op, v in res.noise_share.items()}
    n_keep = min(len(hooks), math.floor(budget * len(hooks) + 1e-9))
    res.keep = sorted(hooks, key=lambda op: res.noise_share[op], reverse=True)[:n_keep]
    everything = set(hooks)
    res.predicted_sqnr_db["all_int8"] = float(sqnr_db(ref, logits(everything)))
    res.predicted_sqnr_db["with_kept_fp16"] = float(sqnr_db(ref, logits(everything - set(res.keep))))
    return res
