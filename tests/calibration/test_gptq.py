"""GPTQ weight rounding: on the converters' int8 grid or a per-tensor palette, lower output error than nearest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration.gptq import (
    LayerRounder,
    grouped_palette_luts,
    gptq_round,
    nearest_grid,
    on_palette,
    on_row_palettes,
    palette_lut,
    quantizable_layers,
)
from edge.checks import sqnr_db


def _correlated_images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth images whose channels are mixtures of shared sources: neighbouring inputs correlate."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, 2, size // 4, size // 4, generator=g)
    src = nn.functional.interpolate(src, size=(size, size), mode="bilinear", align_corners=False)
    mix = torch.randn(channels, 2, generator=g)
    x = torch.einsum("cs,nshw->nchw", mix, src) + 0.1 * torch.randn(n, channels, size, size, generator=g)
    return x.numpy().astype(np.float32)


def _on_grid(layer: nn.Module) -> float:
    """Largest distance (in levels) of any weight from its row's int8 grid, with the scale the converter derives."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    scale = w.abs().amax(1, keepdim=True) / 127
    return float(((w / scale) - (w / scale).round()).abs().max())


def _output_sqnr(net: nn.Module, ref_net: nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        ref = ref_net(torch.from_numpy(x)).numpy()
        got = net(torch.from_numpy(x)).numpy()
    return sqnr_db(ref, got)


def _nearest_copy(net: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        for _, layer in quantizable_layers(out)[0]:
            layer.weight.copy_(nearest_grid(layer.weight))
    return out


@pytest.mark.parametrize(
    "make, min_gain_db",
    [
        # measured gains 6.85, 3.52 and 6.73 dB
        (lambda: nn.Conv2d(3, 16, 3, padding=1), 3.8),
        (lambda: nn.Conv2d(3, 12, 5, padding=4, dilation=2, groups=3), 1.0),
        (lambda: nn.Sequential(nn.Conv2d(3, 24, 1), nn.Conv2d(24, 24, 5, padding=2, groups=24)), 3.7),
    ],
    ids=["dense3x3", "grouped-dilated", "pointwise+depthwise"],
)
def test_gptq_beats_nearest_on_held_out_inputs(make, min_gain_db):
    torch.manual_seed(0)
    net = make().eval()
    calib, held_out = _correlated_images(64, seed=1), _correlated_images(32, seed=2)
    rounded, report = gptq_round(net, calib)
    for name, layer in quantizable_layers(rounded)[0]:
        assert _on_grid(layer) < 1e-3, f"{name}: GPTQ weights are off the int8 grid by {_on_grid(layer):.3g} levels"
        orig = dict(net.named_modules())[name].weight.detach().reshape(layer.weight.shape[0], -1)
        got = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        # each row keeps its largest weight, so a converter derives the same per-channel scale
        torch.testing.assert_close(got.abs().amax(1), orig.abs().amax(1), rtol=1e-6, atol=0)
    gptq = _output_sqnr(rounded, net, held_out)
    near = _output_sqnr(_nearest_copy(net), net, held_out)
    assert gptq >= near + min_gain_db, f"GPTQ {gptq:.2f} dB vs nearest {near:.2f} dB on held-out inputs"
    assert report.layers == len(quantizable_layers(net)[0])
    assert report.as_dict()["layer_output_error_gain_db"]["median"] > 0


def test_linear_layer_and_original_untouched():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)  # nn.Linear's init
    lin = nn.Linear(32, 8)
    basis = torch.randn(4, 32, generator=g)
    x = (torch.randn(256, 4, generator=g) @ basis + 0.05 * torch.randn(256, 32, generator=g)).numpy()
    before = lin.weight.detach().clone()
    rounded, _ = gptq_round(lin, x[:192])
    assert torch.equal(lin.weight, before), "gptq_round must not modify the network it was given"
    assert _on_grid(rounded) < 1e-3
    gptq, near = _output_sqnr(rounded, lin, x[192:]), _output_sqnr(_nearest_copy(lin), lin, x[192:])
    assert gptq >= near + 5.4, f"Linear: GPTQ {gptq:.2f} dB vs nearest {near:.2f} dB (measured gain 8.39 dB)"


def test_small_layers_skipped_and_dead_inputs_handled():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 64, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].weight[1].zero_()  # channel 1 of the second conv's input is always its bias: constant
        net[0].bias[1] = 0.0  # ... and zero: a dead input column
    rounded, report = gptq_round(net, _correlated_images(8), min_elements=100)
    assert report.layers == 1 and report.skipped_small == 1
    assert torch.equal(rounded[0].weight, net[0].weight), "a layer below the size threshold must stay float"
    assert torch.isfinite(rounded[1].weight).all() and _on_grid(rounded[1]) < 1e-3


def test_deterministic_and_needs_images():
    net = nn.Conv2d(3, 8, 3, padding=1)
    x = _correlated_images(8)
    a, _ = gptq_round(net, x)
    b, _ = gptq_round(net, x)
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="calibration images"):
        gptq_round(net, x[:0])


def test_tiny_model_logits(proxy_tiny_checkpoint):
    """On the tiny variant's deploy form with proxy weights, GPTQ's logits beat nearest rounding's."""
    from edge.efficientmod import to_deploy
    from edge.weights import load_model

    model = load_model("efficientmod_test_tiny", proxy_tiny_checkpoint).model
    net = to_deploy(model, 64, norm_impl="conv", dw_impl="split")
    rng = np.random.default_rng(0)
    # smooth random "images" (normalized), 64 to calibrate, 32 held out
    imgs = _correlated_images(96, size=64, seed=4) + 0.2 * rng.standard_normal((96, 3, 64, 64)).astype(np.float32)
    rounded, report = gptq_round(net, imgs[:64])
    gptq, near = _output_sqnr(rounded, net, imgs[64:]), _output_sqnr(_nearest_copy(net), net, imgs[64:])
    assert gptq >= near + 2.0, f"tiny logits: GPTQ {gptq:.2f} dB vs nearest {near:.2f} dB"


def test_palette_lut_is_a_kmeans_fixed_point():
    w = torch.from_numpy(np.random.default_rng(5).standard_t(4, size=(64, 48)))
    lut = palette_lut(w, 4)
    assert lut.shape == (16,) and torch.all(lut[1:] > lut[:-1]), "palette must be 16 sorted distinct values"
    q = on_palette(w.reshape(-1), lut)
    tol = 1e-3 * float(w.max() - w.min())
    for v in lut:  # each value is (to within the iteration limit) the mean of the weights it represents
        members = w.reshape(-1)[q == v]
        assert len(members) and abs(float(members.mean() - v)) < tol, f"palette value {float(v):.4f} is not its cluster mean"
    near = ((w.reshape(-1) - q) ** 2).sum()
    uniform = torch.linspace(float(w.min()), float(w.max()), 16, dtype=torch.float64)
    assert near < ((w.reshape(-1) - on_palette(w.reshape(-1), uniform)) ** 2).sum(), "k-means must beat a uniform grid"


@pytest.mark.parametrize("nbits, min_gain_db", [(4, 3.7), (6, 3.2)])  # measured gains 6.70 and 6.25 dB
def test_palette_gptq_beats_nearest_palette(nbits, min_gain_db):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 5, padding=2,
                                                                                          groups=32)).eval()
    calib, held_out = _correlated_images(64, seed=1), _correlated_images(32, seed=2)
    rounder = LayerRounder(net, calib)
    pal = {n: rounder.palette(n, nbits) for n in rounder.layers}
    near = {n: on_palette(layer.weight.detach(), palette_lut(layer.weight, nbits)) for n, layer in rounder.layers.items()}
    for n, w in pal.items():
        lut = palette_lut(rounder.layers[n].weight, nbits).to(w.dtype)
        assert torch.isin(w, lut).all(), f"{n}: a GPTQ palette weight is not one of the palette's values"
        assert len(torch.unique(w)) <= 1 << nbits
    gptq = _output_sqnr(rounder.network(pal), net, held_out)
    nearest = _output_sqnr(rounder.network(near), net, held_out)
    assert gptq >= nearest + min_gain_db, (
        f"pal{nbits}: GPTQ {gptq:.2f} dB vs nearest palette {nearest:.2f} dB, gain under {min_gain_db} dB")
    report = rounder.report(f"pal{nbits}").as_dict()
    assert report["layers"] == 3 and f"pal{nbits}" in report["method"]
    assert report["layer_output_error_gain_db"]["median"] > 0


def test_grouped_palette_gptq_rounds_each_group_onto_its_own_palette():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 48, 1), nn.Conv2d(48, 48, 5, padding=2,
                                                                                          groups=48)).eval()
    with torch.no_grad():  # output channels of different scales: what grouped palettes are for
        for layer in net:
            layer.weight[16:32] *= 8.0
    calib, held_out = _correlated_images(64, seed=1), _correlated_images(32, seed=2)
    rounder = LayerRounder(net, calib)
    pal = {n: rounder.palette(n, 4, group_size=16) for n in rounder.layers}
    near = {}
    for n, layer in rounder.layers.items():
        w, luts = pal[n], grouped_palette_luts(layer.weight, 4, 16)
        for g in range(w.shape[0] // 16):
            rows = w[16 * g : 16 * (g + 1)]
            assert torch.isin(rows, luts[g].to(w.dtype)).all(), f"{n} group {g}: a weight is not on its group's palette"
            assert len(torch.unique(rows)) <= 16
        assert not torch.equal(luts[0], luts[1]), f"{n}: groups should get palettes of their own"
        near[n] = on_row_palettes(layer.weight.detach(), luts.repeat_interleave(16, dim=0))
    gptq = _output_sqnr(rounder.network(pal), net, held_out)
    nearest = _output_sqnr(rounder.network(near), net, held_out)
    per_tensor = _output_sqnr(rounder.network({n: rounder.palette(n, 4) for n in rounder.layers}), net, held_out)
    assert gptq >= nearest + 1.0, f"grouped pal4: GPTQ {gptq:.2f} dB vs nearest {nearest:.2f} dB"
    assert gptq >= per_tensor + 3.0, f"grouped pal4 {gptq:.2f} dB should beat per-tensor pal4 {per_tensor:.2f} dB"
    assert "one per group of 16 output channels" in rounder.report("pal4g16").as_dict()["method"]
    with pytest.raises(ValueError, match="groups of 16"):
        grouped_palette_luts(torch.zeros(24, 4), 4, 16)


def test_rounder_int8_equals_gptq_round_and_caches():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)).eval()
    x = _correlated_images(16)
    rounder = LayerRounder(net, x)
    rounded, _ = gptq_round(net, x)
    with torch.no_grad():  # a search swaps weights in and out of the caller's network: the rounder must not see it
        for p in net.parameters():
            p.mul_(0.5)
    for n in rounder.layers:
        assert torch.equal(rounder.int8(n), dict(rounded.named_modules())[n].weight), f"{n}: int8 rounding differs"
        assert rounder.int8(n) is rounder.int8(n), f"{n}: rounding was recomputed instead of cached"
        assert rounder.palette(n, 4) is rounder.palette(n, 4), f"{n}: palette rounding was recomputed"


def _brute_gram(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each group's sum over images and output positions of patch patch^T, the patches gathered by index."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1]).double()
        return (rows.T @ rows)[None]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    g, c = layer.groups, x.shape[1] // layer.groups
    xp = nn.functional.pad(x.double(), (pw, pw, ph, ph))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(g, c * kh * kw, c * kh * kw, dtype=torch.float64)
    for gi in range(g):
        for n in range(x.shape[0]):
            for i in range(oh):
                for j in range(ow):
                    patch = xp[n, gi * c:(gi + 1) * c, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                               j * sw: j * sw + dw * (kw - 1) + 1: dw].reshape(-1)
                    out[gi] += torch.outer(patch, patch)
    return out


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 4, (2, 7), padding=(0, 3), groups=4),
    nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv2d(4, 6, 1),
    nn.Conv2d(4, 6, 1, groups=2),
    nn.Linear(5, 3),
], ids=["dense3x3", "depthwise2x7", "grouped-strided-dilated", "pointwise", "grouped-pointwise", "linear"])
def test_input_gram_matches_patches_gathered_by_index(layer):
    from calibration.gptq import input_gram

    shape = (3, 7, 5) if isinstance(layer, nn.Linear) else (3, 4, 7, 6)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = input_gram(layer, [("l", layer)], x.numpy(), batch=2)["l"]  # two batches: the sum over them counts too
    want = _brute_gram(layer, x)
    assert got.shape == want.shape, f"Gram shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-6, f"Gram of {layer} differs from the gathered patches' by {err:.2e} (relative max)"
