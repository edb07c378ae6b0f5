"""Model zoo: parameter counts, release key names, deploy-form equivalence, export."""

from __future__ import annotations

import pytest
import torch

from edge.efficientmod import (
    DW_IMPLS,
    NORM_IMPLS,
    REPEAT_MODES,
    VARIANTS,
    EfficientMod,
    LayerNorm2d,
    ModulationBlock,
    SplitDepthwise,
    count_macs,
    count_params,
    create_model,
    get_config,
    to_deploy,
)
from edge.errors import ConfigError

EXPECTED = {
    "efficientmod_xxs": 4_736_264,
    "efficientmod_xs": 6_627_544,
    "efficientmod_s": 12_897_184,
    "efficientmod_s_conv": 12_872_336,
}


def _perturbed(name: str, seed: int = 1) -> EfficientMod:
    """A model with variance-preserving random weights (benchmarks/proxy_checkpoint.py): every block,
    conv and Linear reaches the logits, LayerNorm affines and LayerScales are far from their init, so
    folding, channel repeats and split depthwise rows all matter (a wrong repeat moves logits by ~0.4)."""
    from benchmarks.proxy_checkpoint import proxy_state_dict

    m = create_model(name, seed=0)
    m.load_state_dict(proxy_state_dict(name, seed=seed))
    return m.eval()


@pytest.mark.parametrize("name,count", EXPECTED.items())
def test_parameter_counts_match_release(name, count):
    with torch.device("meta"):
        m = EfficientMod(get_config(name))
    assert count_params(m) == count


def test_release_key_names():
    keys = set(create_model("efficientmod_xxs").state_dict())
    for k in ("patch_embed.proj.weight", "layers.2.blocks.5.mlp.context_layer.context_list.0.weight",
              "layers.2.blocks.6.attn.qkv.weight", "layers.0.blocks.0.gamma_1",
              "layers.0.downsample.norm.bias", "head.weight"):
        assert k in keys, k


def test_macs_counted_from_graph():
    macs = count_macs(create_model("efficientmod_xxs"))
    assert 0.55e9 < macs < 0.62e9, macs  # paper: 0.6 GMACs


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, size: int = 224) -> float:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


@pytest.mark.parametrize("repeat", REPEAT_MODES)
@pytest.mark.parametrize("norm", NORM_IMPLS)
@pytest.mark.parametrize("dw", DW_IMPLS)
def test_deploy_forms_equal_eager_tiny(repeat, norm, dw):
    m = _perturbed("efficientmod_test_tiny")
    d = to_deploy(m, repeat_mode=repeat, norm_impl=norm, dw_impl=dw)
    # measured <= 9e-7 on proxy weights (logit std 0.47)
    diff = _max_diff(m, d)
    assert diff <= 1e-5, f"deploy form ({repeat}, {norm}, {dw}) logits differ from eager: max|d| {diff:.3g} > 1e-5"


def _assert_deploy_forms_equal(name: str) -> None:
    """Default and (conv LayerNorm, split depthwise) deploy forms; measured <= 1.5e-6 on every variant."""
    m = _perturbed(name)
    for kwargs in ({}, {"norm_impl": "conv", "dw_impl": "split"}):
        diff = _max_diff(m, to_deploy(m, **kwargs))
        assert diff <= 1e-5, f"{name} deploy form {kwargs or 'default'}: logits max|d| {diff:.3g} > 1e-5"


def test_deploy_form_equals_eager_xxs():
    _assert_deploy_forms_equal("efficientmod_xxs")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientmod_xs", "efficientmod_s", "efficientmod_s_conv"])
def test_deploy_form_equals_eager_large(name):
    _assert_deploy_forms_equal(name)


def test_reparameterize_is_idempotent():
    m = _perturbed("efficientmod_test_tiny")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = m(x)
        once = m.reparameterize()(x)
        twice = m.reparameterize()(x)
    diff = (before - once).abs().max().item()  # measured 4.2e-7
    assert diff <= 1e-5, f"reparameterized logits differ from eager: max|d| {diff:.3g} > 1e-5"
    assert torch.equal(once, twice), "a second reparameterize() changed the logits"
    assert all(torch.all(b.gamma_1 == 1) for b in m.modules() if isinstance(b, ModulationBlock)), "gamma_1 not folded"


def test_deploy_form_exports_with_torch_export_and_trace():
    m = _perturbed("efficientmod_test_tiny")
    d = to_deploy(m)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = d(x)
        traced = torch.jit.trace(d, x)
        exported = torch.export.export(d, (x,))
        for kind, got in (("torch.jit.trace", traced(x)), ("torch.export", exported.module()(x))):
            diff = (got - ref).abs().max().item()  # measured 0.0
            assert diff <= 1e-6, f"{kind} logits differ from the deploy module: max|d| {diff:.3g} > 1e-6"


def test_split_depthwise_is_exact():
    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    with torch.no_grad():  # variance-preserving weights: every one of the 49 taps of every row matters
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / 7)
        conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=gen))
    x = torch.randn(1, 16, 13, 11, generator=gen)
    with torch.no_grad():
        diff = (conv(x) - SplitDepthwise(conv)(x)).abs().max().item()
    assert diff <= 1e-5, f"SplitDepthwise output differs from the 7x7 depthwise conv: max|d| {diff:.3g} > 1e-5"


def test_unknown_variant_names_choices():
    with pytest.raises(ConfigError, match="efficientmod_xxs"):
        get_config("efficientmod_huge")


def test_tiny_variant_is_hidden_but_registered():
    assert VARIANTS["efficientmod_test_tiny"].test_only


def _int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 fake quantization, as TFLite does for conv weights."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale) * scale


@pytest.mark.parametrize("channels", [32, 256, 512])
def test_conv_layernorm_survives_int8_weights(channels):
    """The conv-form LayerNorm must still subtract the mean when its conv weights are int8.

    A centering matrix I - 1/C as one conv lost its -1/C entries to rounding (all
    of them for C >= 256); the -1/C mean conv quantizes exactly.
    """
    src = torch.nn.LayerNorm(channels)
    norm = LayerNorm2d(src, affine=False, impl="conv")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 7, 7, generator=gen) + 3.0 * torch.randn(2, 1, 7, 7, generator=gen)
    with torch.no_grad():
        ref = norm(x)
        for conv in (norm.neg_mean, norm.variance):
            conv.weight.copy_(_int8_per_channel(conv.weight))
        got = norm(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()).item()
    assert sqnr >= 40.0, f"int8-weight LayerNorm over {channels} channels: SQNR {sqnr:.1f} dB < 40 dB"


def test_patch_embed_folds_centering_into_projection():
    m = _perturbed("efficientmod_test_tiny")
    d = to_deploy(m, norm_impl="conv")
    pe = d.patch_embed
    assert pe.norm.centered and not hasattr(pe.norm, "neg_mean")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean = pe.proj(x).mean(dim=1)
    assert mean.abs().max().item() < 1e-5, "projection output should already be centered over channels"
