"""Layer-wise palette search: which conv weights of a palettized package stay int8.

Per-tensor k-means palettes cost different layers very different amounts of
accuracy: on the proxy xxs checkpoint the 19 worst of 68 palettized convs
(15 % of the palettized weights) carry about two thirds of the pal6 logit
noise. The search measures, in PyTorch on the deploy network with the
calibration images, the logit noise each conv adds when only its weight is
replaced by its palettized one (GPTQ-rounded by :class:`calibration.gptq.LayerRounder`,
or the one coremltools' k-means wrote, :func:`coreml_targets`), then keeps the
layers with the most noise per weight element at int8 (per-channel) until
a budget (a fraction of the palettized elements) is spent.

MIL ops are tied to PyTorch parameters by their weights: a conv's fp16
weight const equals exactly one parameter cast to fp16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from calibration.gptq import nearest_grid
from edge.checks import sqnr_db

WEIGHT_OPS = ("conv", "linear")


class BlockCache:
    """Logits of ``net`` on fixed images when only one block's weights (or hooks) differ from now.

    The searches change one layer at a time and run the network again. For a
    net with ``patch_embed``, ``blocks`` (``nn.Sequential``) and ``tail``, the
    input of every block is computed once, with the weights ``net`` has at
    construction; :meth:`logits` then reruns only the blocks from the changed
    one on. The blocks before it see the same inputs and weights, so the logits
    are those of a full forward. Other nets, and layers outside the blocks, run whole.
    :attr:`reference` holds the logits at construction.
    """

    def __init__(self, net: nn.Module, x: torch.Tensor):
        self.net, self.x = net, x
        blocks = getattr(net, "blocks", None)
        self.inputs: list[torch.Tensor] = []
        if isinstance(blocks, nn.Sequential) and hasattr(net, "patch_embed") and hasattr(net, "tail"):
            with torch.no_grad():
                h = net.patch_embed(x)
                for block in blocks:
                    self.inputs.append(h)
                    h = block(h)
                self.inputs.append(h)
                self.reference = net.tail(h).numpy()
        else:
            with torch.no_grad():
                self.reference = net(x).numpy()

    def start(self, name: str) -> int | None:
        """Index of the block holding module or parameter ``name``; past the blocks for the tail; None: run whole."""
        if not self.inputs:
            return None
        head, _, rest = name.partition(".")
        if head == "blocks":
            return int(rest.partition(".")[0])
        return None if head == "patch_embed" else len(self.inputs) - 1

    def logits(self, changed: str | None = None) -> np.ndarray:
        """Logits with the net as it is now, where only ``changed`` (a module/parameter name) may differ."""
        start = self.start(changed) if changed is not None else None
        with torch.no_grad():
            if start is None:
                return self.net(self.x).numpy()
            h = self.inputs[start]
            for block in list(self.net.blocks)[start:]:
                h = block(h)
            return self.net.tail(h).numpy()
FP16_SUBNORMAL_STEP = 2.0**-24


def op_weights(program: Any, producer: str) -> dict[str, np.ndarray]:
    """Dense weight of every conv/linear op whose weight comes from a ``producer`` op.

    ``producer`` is ``const`` (float program) or ``constexpr_lut_to_dense`` (palettized).
    """
    from converters.mil_interp import KERNELS

    out: dict[str, np.ndarray] = {}
    for op in program.functions["main"].operations:
        weight = op.inputs.get("weight") if op.op_type in WEIGHT_OPS else None
        src = weight.op if weight is not None else None
        if src is None or src.op_type != producer:
            continue
        if producer == "const":
            out[op.name] = np.asarray(src.outputs[0].val)
        else:
            out[op.name] = np.asarray(KERNELS[producer]({k: v.val for k, v in src.inputs.items()}))
    return out


def match_parameters(net: nn.Module, weights: dict[str, np.ndarray]) -> dict[str, str]:
    """``{op name: parameter name}`` for the ops whose fp16 weight equals a parameter of ``net``.

    Equal means the same fp16 bytes, or, failing that, exactly one parameter of
    the same shape within one fp16 subnormal step (coremltools and torch round
    a few float32 values below 2^-14 to different neighbouring subnormals).
    """
    half = {n: p.detach().to(torch.float16).numpy() for n, p in net.named_parameters()}
    index = {(v.shape, v.tobytes()): n for n, v in half.items()}
    out = {}
    for op, w in weights.items():
        w16 = np.asarray(w, np.float16)
        name = index.get((w16.shape, w16.tobytes()))
        if name is None:
            near = [n for n, v in half.items() if v.shape == w16.shape
                    and np.abs(v.astype(np.float32) - w16.astype(np.float32)).max() <= FP16_SUBNORMAL_STEP]
            name = near[0] if len(near) == 1 else None
        if name is not None:
            out[op] = name
    return out


def weight_consts(program: Any, net: nn.Module, params: set[str]) -> tuple[str, ...]:
    """Names of the weight const ops in ``program`` that hold the ``params`` of ``net``.

    Compression configs are keyed by these const names, not by the consuming
    conv: coremltools shares identical consts (e.g. zero biases) between convs,
    and per-conv configs then conflict.
    """
    match = match_parameters(net, op_weights(program, "const"))
    ops = {op.name: op for op in program.functions["main"].operations}
    return tuple(sorted({ops[op].inputs["weight"].op.name for op, name in match.items() if name in params}))


@dataclass
class PaletteSearch:
    """What the search measured and chose; ``keep`` are parameter names."""

    budget: float
    images: int
    keep: list[str] = field(default_factory=list)
    noise_share: dict[str, float] = field(default_factory=dict)
    elements: dict[str, int] = field(default_factory=dict)
    unmatched_ops: int = 0
    predicted_sqnr_db: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        total = sum(self.elements.values()) or 1
        kept = sum(self.elements[n] for n in self.keep)
        return {
            "method": "per-layer logit noise of the palettized weight (PyTorch, calibration images); "
                      "most noise per element kept int8 per-channel, within the budget",
            "images": self.images,
            "budget_fraction": self.budget,
            "kept_int8": [{"parameter": n, "elements": self.elements[n], "noise_share": round(self.noise_share[n], 4)}
                          for n in self.keep],
            "kept_fraction": round(kept / total, 4),
            "kept_noise_share": round(sum(self.noise_share[n] for n in self.keep), 4),
            "unmatched_ops": self.unmatched_ops,
            "calib_sqnr_db": {k: round(v, 2) for k, v in self.predicted_sqnr_db.items()},
        }


def coreml_targets(net: nn.Module, float_program: Any, palettized_program: Any) -> tuple[dict[str, torch.Tensor], int]:
    """``{parameter name: palettized weight}`` as coremltools wrote them, and how many ops matched no parameter."""
    pal = op_weights(palettized_program, "constexpr_lut_to_dense")
    match = match_parameters(net, op_weights(float_program, "const"))
    targets = {match[op]: torch.from_numpy(pal[op].astype(np.float32)) for op in pal if op in match}
    return targets, len(set(pal) - set(match))


def search(
    net: nn.Module,
    targets: dict[str, torch.Tensor],
    images_nchw: np.ndarray,
    budget: float,
    int8: Callable[[str], torch.Tensor] | None = None,
    unmatched_ops: int = 0,
) -> PaletteSearch:
    """Measure each palettized weight's logit noise on ``images_nchw``; choose what stays int8.

    ``net`` takes normalized NCHW images (the module the package was converted
    from); ``targets`` maps its parameter names to their palettized weights, and
    ``int8(name)`` gives the int8 weight a kept layer gets (default: nearest
    per-channel rounding, :func:`calibration.gptq.nearest_grid`). Its parameters
    are restored before returning.
    """
    params = dict(net.named_parameters())
    res = PaletteSearch(budget=budget, images=len(images_nchw), unmatched_ops=unmatched_ops)
    x = torch.from_numpy(np.ascontiguousarray(images_nchw, np.float32))
    saved = {n: params[n].detach().clone() for n in targets}
    net.eval()
    try:
        with torch.no_grad():
            cache = BlockCache(net, x)
            ref = cache.reference
            for n, w in targets.items():
                params[n].copy_(w)
                res.noise_share[n] = float(((cache.logits(n) - ref) ** 2).sum())
                params[n].copy_(saved[n])
                res.elements[n] = int(w.numel())
            total = sum(res.noise_share.values()) or 1.0
            res.noise_share = {n: v / total for n, v in res.noise_share.items()}
            order = sorted(targets, key=lambda n: res.noise_share[n] / res.elements[n], reverse=True)
            room = budget * sum(res.elements.values())
            for n in order:
                if res.elements[n] <= room:
                    res.keep.append(n)
                    room -= res.elements[n]
            for label, kept in (("all_palettized", set()), ("with_kept_int8", set(res.keep))):
                for n, w in targets.items():
                    if n in kept:
                        params[n].copy_(int8(n) if int8 is not None else nearest_grid(saved[n]))
                    else:
                        params[n].copy_(w)
                res.predicted_sqnr_db[label] = float(sqnr_db(ref, net(x).numpy()))
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
    return res
