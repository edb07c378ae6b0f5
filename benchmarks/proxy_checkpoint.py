"""Write a synthetic "every path matters" EfficientMod checkpoint for accuracy benchmarks.

Why: a freshly initialised EfficientMod (upstream init, ``create_model``) is a
poor stand-in for a trained one when judging int8. Its modulation blocks carry
LayerScale 1e-4 and std-0.02 Linear weights, so every block adds ~1e-4 of
itself to the residual stream: the network is nearly the patch embeddings plus
the attention blocks, and quantization error inside the blocks (depthwise convs,
GELU, the modulation product) never reaches the logits. Its logits are also
nearly uniform (median top-2 gap ~0.007), so top-1 agreement is a coin toss.

This checkpoint is still random and still **not** a trained model, but
variance-preserving: conv/Linear weights N(0, 1/fan_in), small random biases
and LayerNorm affines, LayerScale ``--gamma`` (default 0.3). Every block then
changes the residual stream by O(1) and the logits spread out (std ~0.6, top-2
gap ~0.17 for xxs). The manifest records the file as the weights source.

Usage: python benchmarks/proxy_checkpoint.py efficientmod_xxs OUT.pth [--gamma 0.3] [--seed 1]
then EFFMOD_WEIGHTS=OUT.pth benchmarks/tflite.sh efficientmod_xxs OUT_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from edge.efficientmod import create_model
from edge.errors import EffmodError


@torch.no_grad()
def proxy_state_dict(name: str, gamma: float = 0.3, seed: int = 1) -> dict[str, torch.Tensor]:
    """State dict of ``name`` with variance-preserving random weights (see module docstring)."""
    model = create_model(name, seed=0)
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.weight[0].numel() ** 0.5)
            if mod.bias is not None:
                mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    for pname, p in model.named_parameters():
        if pname.endswith("gamma_1"):
            p.fill_(gamma)
    return model.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--gamma", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    try:
        state = proxy_state_dict(args.model, args.gamma, args.seed)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except EffmodError as exc:
        sys.exit(f"error: {exc}")
    except OSError as exc:
        sys.exit(f"error: cannot write {out}: {exc.strerror}; choose a writable output path")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {out}: {args.model}, variance-preserving random weights, LayerScale {args.gamma}")


if __name__ == "__main__":
    main()
