"""EfficientMod (Ma et al., ICLR 2024), written for export.

Order follows timm's model files: blocks, model, deploy (export) form, variant
registry, checkpoint handling. Module and parameter names equal the upstream
release's state_dict keys, so release checkpoints load strictly.

Two forms share one set of weights:

* ``EfficientMod`` -- the eager model, channels-last like the release, used as the
  numerical reference.
* ``EfficientModDeploy`` -- the export form built by :func:`to_deploy`: channels-first
  4-D tensors throughout, 1x1 convolutions in place of channels-last ``Linear``,
  LayerNorm over the channel axis, LayerScale and the attention scale folded into
  the preceding projections, static shapes (no Python-int shape arithmetic), so
  ``torch.export`` and ``torch.jit.trace`` both take it and converters emit
  ``DEPTHWISE_CONV_2D`` for the 7x7 context convolution.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

RepeatMode = Literal["concat", "tile", "broadcast", "fold"]
REPEAT_MODES: tuple[str, ...] = ("concat", "tile", "broadcast", "fold")
NormImpl = Literal["reduce", "conv"]
NORM_IMPLS: tuple[str, ...] = ("reduce", "conv")
DwImpl = Literal["single", "split"]
DW_IMPLS: tuple[str, ...] = ("single", "split")


# --------------------------------------------------------------------------- blocks


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm; NCHW (stem) or NHWC (between stages) in, NHWC out."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int, pad: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=pad)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, channels_last_in: bool = True) -> torch.Tensor:
        if channels_last_in:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ContextLayer(nn.Module):
    """Context branch: Linear, 7x7 depthwise conv, GELU, Linear (channels-last)."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.context_list = nn.ModuleList(
            [nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)]
        )
        self.act = nn.GELU()
        self.g = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f(x).permute(0, 3, 1, 2)
        ctx = 0
        for conv in self.context_list:
            ctx = ctx + self.act(conv(y))
        return self.g(ctx.permute(0, 2, 3, 1))


class ModulationMlp(nn.Module):
    """fc1 (+GELU) modulated element-wise by the context branch, then fc2."""

    def __init__(self, dim: int, ratio: int, kernel: int):
        super().__init__()
        self.ratio = ratio
        self.expand = ratio != 1
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.context_layer = ContextLayer(dim, kernel)
        self.act = nn.GELU() if self.expand else nn.Identity()
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context_layer(x)
        h = self.act(self.fc1(x))
        if self.expand:
            ctx = ctx.repeat(1, 1, 1, self.ratio)
        return self.fc2(h * ctx)


class ModulationBlock(nn.Module):
    """Pre-norm residual block around :class:`ModulationMlp`, with LayerScale."""

    def __init__(self, dim: int, ratio: int, kernel: int, layerscale_value: float = 1e-4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = ModulationMlp(dim, ratio, kernel)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layerscale_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma_1 * self.mlp(self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold LayerScale into fc2; a second call folds ones, i.e. changes nothing."""
        gamma = self.gamma_1.detach().clone()
        self.mlp.fc2.weight.mul_(gamma[:, None])
        self.mlp.fc2.bias.mul_(gamma)
        self.gamma_1.fill_(1.0)


class Attention(nn.Module):
    """Multi-head self-attention on tokens (B, N, C); head_dim = max(C // heads, 32)."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = max(dim // num_heads, 32)
        self.scale = self.head_dim**-0.5
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class AttnMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionBlock(nn.Module):
    """Transformer block appended at the end of stages 3-4 (channels-last in/out)."""

    def __init__(self, dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = AttnMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.reshape(b, h, w, c)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: PatchEmbed | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class VariantConfig:
    """Architecture of one EfficientMod variant plus its published figures."""

    name: str
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    attention_depths: tuple[int, int, int, int]
    mlp_ratio: int
    att_ratios: tuple[int, int, int, int]
    kernel: int = 7
    num_classes: int = 1000
    paper_top1: float | None = None
    expected_params: int | None = None
    test_only: bool = False

    def block_ratio(self, index: int) -> int:
        """Modulation blocks alternate expansion 1 and ``mlp_ratio``, starting with 1."""
        return 1 if index % 2 == 0 else self.mlp_ratio


class EfficientMod(nn.Module):
    """Eager EfficientMod, channels-last inside, NCHW image in, logits out."""

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.cfg = cfg
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(3, dims[0], kernel=7, stride=4, pad=3)
        stages = []
        for i, dim in enumerate(dims):
            blocks: list[nn.Module] = [
                ModulationBlock(dim, cfg.block_ratio(j), cfg.kernel) for j in range(cfg.depths[i])
            ]
            blocks += [AttentionBlock(dim, cfg.att_ratios[i]) for _ in range(cfg.attention_depths[i])]
            down = PatchEmbed(dim, dims[i + 1], kernel=3, stride=2, pad=1) if i < 3 else None
            stages.append(Stage(blocks, down))
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x, channels_last_in=False)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def reparameterize(self) -> "EfficientMod":
        """Fold LayerScale into the preceding projection, in place; safe to call twice."""
        for m in self.modules():
            if isinstance(m, ModulationBlock):
                m.reparameterize()
        return self


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- deploy form


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor, in ops every target has.

    ``impl="reduce"`` computes the statistics with channel means; ``impl="conv"``
    computes them with 1x1 convolutions, which keeps an int8 graph inside the
    XNNPACK delegate: the negated channel mean as a C->1 conv whose weights are
    all -1/C, broadcast-added to the input (not the centering matrix I - 1/C as
    one conv: per-channel int8 weights round its -1/C entries against the ~1
    diagonal, to 0 for C >= 256, so the mean was never subtracted), then a
    1/C-weighted sum of squares whose bias is eps. ``centered=True`` skips the mean: the caller
    folded the centering into the conv that produces the input. With
    ``affine=False`` scale and shift are left out: the caller folded them into
    the convolution(s) that consume the output.
    """

    def __init__(self, src: nn.LayerNorm, affine: bool = True, impl: NormImpl = "reduce", centered: bool = False):
        super().__init__()
        c = src.normalized_shape[0]
        self.eps = float(src.eps)
        self.affine = affine
        self.impl = impl
        self.centered = centered
        if centered and impl != "conv":
            raise ValueError("centered=True needs impl='conv'")
        if affine:
            self.weight = nn.Parameter(src.weight.detach().clone().reshape(1, c, 1, 1))
            self.bias = nn.Parameter(src.bias.detach().clone().reshape(1, c, 1, 1))
        if impl == "conv":
            if not centered:
                self.neg_mean = nn.Conv2d(c, 1, 1, bias=False)
                self.neg_mean.weight.data.fill_(-1.0 / c)
            self.variance = nn.Conv2d(c, 1, 1, bias=True)
            self.variance.weight.data.fill_(1.0 / c)
            self.variance.bias.data.fill_(self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "conv":
            d = x if self.centered else x + self.neg_mean(x)
            y = d * torch.rsqrt(self.variance(d * d))
        else:
            d = x - x.mean(dim=1, keepdim=True)
            y = d * torch.rsqrt((d * d).mean(dim=1, keepdim=True) + self.eps)
        return y * self.weight + self.bias if self.affine else y


def _repeat_channels(c: torch.Tensor, times: int) -> torch.Tensor:
    """``c`` repeated ``times`` along channels with concats of at most 4 inputs.

    XNNPACK delegates CONCATENATION of up to 4-5 inputs; a 6-way concat falls
    back to the slow reference kernel, so 6 is built as 2 x 3.
    """
    if times <= 4:
        return torch.cat([c] * times, dim=1)
    for f in (2, 3):
        if times % f == 0:
            return torch.cat([_repeat_channels(c, times // f)] * f, dim=1)
    return torch.cat([_repeat_channels(c, 4), _repeat_channels(c, times - 4)], dim=1)


@torch.no_grad()
def _fold_norm_affine(layer: nn.Conv2d | nn.Linear, norm: nn.LayerNorm) -> None:
    """Make ``layer(n)`` compute ``layer(n * norm.weight + norm.bias)``, in place."""
    w2d = layer.weight.reshape(layer.weight.shape[0], -1)
    layer.bias.add_(w2d @ norm.bias.detach())
    scale = norm.weight.detach().reshape((1, -1) + (1,) * (layer.weight.dim() - 2))
    layer.weight.mul_(scale)


@torch.no_grad()
def _center_outputs(conv: nn.Conv2d) -> None:
    """Make ``conv`` output its result minus the mean over output channels, in place."""
    conv.weight.sub_(conv.weight.mean(dim=0, keepdim=True))
    if conv.bias is not None:
        conv.bias.sub_(conv.bias.mean())


def _conv1x1(src: nn.Linear, rows: torch.Tensor | None = None) -> nn.Conv2d:
    """A 1x1 conv computing ``src`` on NCHW data; ``rows`` scales each output channel."""
    out_f, in_f = src.weight.shape
    conv = nn.Conv2d(in_f, out_f, 1, bias=True)
    w = src.weight.detach().clone()
    b = src.bias.detach().clone() if src.bias is not None else torch.zeros(out_f)
    if rows is not None:
        w = w * rows[:, None]
        b = b * rows
    conv.weight.data.copy_(w.reshape(out_f, in_f, 1, 1))
    conv.bias.data.copy_(b)
    return conv


class SplitDepthwise(nn.Module):
    """A 7x7 depthwise conv as a 5x5 core plus two dilated edge convs.

    The core takes the inner 5x5 taps; a 2x7 conv with row dilation 6 takes the
    top and bottom rows; a 5x2 conv with column dilation 6 takes the left and
    right columns of the middle rows. 25 + 14 + 10 = 49 taps, all SAME-padded.
    XNNPACK has fast kernels for up to 25 taps but a generic path for 49 that
    measured about 7x slower than this split on x86.
    """

    def __init__(self, src: nn.Conv2d):
        super().__init__()
        k = src.kernel_size[0]
        c = src.in_channels
        if src.kernel_size != (7, 7) or src.groups != c or src.stride != (1, 1) or src.padding != (3, 3):
            raise ValueError(f"SplitDepthwise needs a stride-1, padding-3, 7x7 depthwise conv, got {src}")
        w = src.weight.detach()
        self.core = nn.Conv2d(c, c, 5, padding=2, groups=c, bias=src.bias is not None)
        self.rows = nn.Conv2d(c, c, (2, 7), padding=3, dilation=(k - 1, 1), groups=c, bias=False)
        self.cols = nn.Conv2d(c, c, (5, 2), padding=(2, 3), dilation=(1, k - 1), groups=c, bias=False)
        self.core.weight.data.copy_(w[:, :, 1:6, 1:6])
        if src.bias is not None:
            self.core.bias.data.copy_(src.bias.detach())
        self.rows.weight.data.copy_(w[:, :, [0, 6], :])
        self.cols.weight.data.copy_(w[:, :, 1:6][:, :, :, [0, 6]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x) + self.rows(x) + self.cols(x)


class _DeployPatchEmbed(nn.Module):
    def __init__(self, src: PatchEmbed, norm_impl: NormImpl = "reduce"):
        super().__init__()
        self.proj = copy.deepcopy(src.proj)
        centered = norm_impl == "conv"
        if centered:
            _center_outputs(self.proj)
        self.norm = LayerNorm2d(src.norm, impl=norm_impl, centered=centered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class _DeployModulationBlock(nn.Module):
    def __init__(
        self,
        src: ModulationBlock,
        height: int,
        width: int,
        repeat_mode: RepeatMode,
        norm_impl: NormImpl,
        dw_impl: DwImpl,
    ):
        super().__init__()
        mlp = src.mlp
        ctx = mlp.context_layer
        self.norm = LayerNorm2d(src.norm, affine=False, impl=norm_impl)
        self.ctx_f = _conv1x1(ctx.f)
        dw = ctx.context_list[0]
        self.ctx_dw = SplitDepthwise(dw) if dw_impl == "split" else copy.deepcopy(dw)
        self.ctx_g = _conv1x1(ctx.g)
        self.fc1 = _conv1x1(mlp.fc1)
        self.fc2 = _conv1x1(mlp.fc2, rows=src.gamma_1.detach())
        _fold_norm_affine(self.ctx_f, src.norm)
        _fold_norm_affine(self.fc1, src.norm)
        self.ratio = mlp.ratio
        self.dim = ctx.f.out_features
        if repeat_mode == "fold" and self.ratio != 1:
            # g's output channels tiled: the conv emits the repeated context directly
            with torch.no_grad():
                w, b = self.ctx_g.weight, self.ctx_g.bias
                tiled = nn.Conv2d(w.shape[1], w.shape[0] * self.ratio, 1)
                tiled.weight.copy_(w.repeat(self.ratio, 1, 1, 1))
                tiled.bias.copy_(b.repeat(self.ratio))
            self.ctx_g = tiled
        self.hw = height * width
        self.height, self.width = height, width
        self.repeat_mode = repeat_mode

    def _repeat_mul(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.ratio == 1 or self.repeat_mode == "fold":
            return h * c
        if self.repeat_mode == "concat":
            return h * _repeat_channels(c, self.ratio)
        if self.repeat_mode == "tile":
            return h * c.repeat(1, self.ratio, 1, 1)
        hb = h.reshape(-1, self.ratio, self.dim, self.hw)
        out = hb * c.reshape(-1, 1, self.dim, self.hw)
        return out.reshape(-1, self.ratio * self.dim, self.height, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        c = self.ctx_g(F.gelu(self.ctx_dw(self.ctx_f(y))))
        h = self.fc1(y)
        if self.ratio != 1:
            h = F.gelu(h)
        return x + self.fc2(self._repeat_mul(h, c))


class _DeployAttentionBlock(nn.Module):
    def __init__(self, src: AttentionBlock, height: int, width: int, norm_impl: NormImpl):
        super().__init__()
        attn = src.attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        inner = self.heads * self.head_dim
        rows = torch.ones(3 * inner)
        rows[:inner] = attn.scale
        self.norm1 = LayerNorm2d(src.norm1, affine=False, impl=norm_impl)
        self.qkv = _conv1x1(attn.qkv, rows=rows)
        self.proj = _conv1x1(attn.proj)
        self.norm2 = LayerNorm2d(src.norm2, affine=False, impl=norm_impl)
        self.fc1 = _conv1x1(src.mlp.fc1)
        self.fc2 = _conv1x1(src.mlp.fc2)
        _fold_norm_affine(self.qkv, src.norm1)
        _fold_norm_affine(self.fc1, src.norm2)
        self.height, self.width = height, width
        self.tokens = height * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm1(x)).reshape(-1, 3 * self.heads, self.head_dim, self.tokens)
        q, k, v = torch.split(qkv, self.heads, dim=1)
        attn = torch.softmax(q.transpose(2, 3) @ k, dim=-1)
        out = (v @ attn.transpose(2, 3)).reshape(
            -1, self.heads * self.head_dim, self.height, self.width
        )
        x = x + self.proj(out)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class EfficientModDeploy(nn.Module):
    """Channels-first export form of an :class:`EfficientMod`; see module docstring."""

    def __init__(
        self,
        src: EfficientMod,
        input_size: int = 224,
        repeat_mode: RepeatMode = "concat",
        norm_impl: NormImpl = "reduce",
        dw_impl: DwImpl = "single",
    ):
        super().__init__()
        if dw_impl not in DW_IMPLS:
            raise ValueError(f"dw_impl must be one of {DW_IMPLS}, got {dw_impl!r}")
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        if repeat_mode not in REPEAT_MODES:
            raise ValueError(f"repeat_mode must be one of {REPEAT_MODES}, got {repeat_mode!r}")
        if norm_impl not in NORM_IMPLS:
            raise ValueError(f"norm_impl must be one of {NORM_IMPLS}, got {norm_impl!r}")
        src = copy.deepcopy(src).eval().reparameterize()
        self.cfg = src.cfg
        self.input_size = input_size
        self.repeat_mode = repeat_mode
        self.norm_impl = norm_impl
        self.dw_impl = dw_impl
        self.patch_embed = _DeployPatchEmbed(src.patch_embed, norm_impl)
        blocks: list[nn.Module] = []
        for i, stage in enumerate(src.layers):
            side = input_size // (4 * 2**i)
            for blk in stage.blocks:
                if isinstance(blk, ModulationBlock):
                    blocks.append(_DeployModulationBlock(blk, side, side, repeat_mode, norm_impl, dw_impl))
                else:
                    blocks.append(_DeployAttentionBlock(blk, side, side, norm_impl))
            if stage.downsample is not None:
                blocks.append(_DeployPatchEmbed(stage.downsample, norm_impl))
        self.blocks = nn.Sequential(*blocks)
        self.norm = LayerNorm2d(src.norm, affine=False, impl=norm_impl)
        self.head = copy.deepcopy(src.head)
        _fold_norm_affine(self.head, src.norm)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the output of :attr:`blocks`."""
        return self.head(self.norm(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.blocks(self.patch_embed(x)))


def to_deploy(
    model: EfficientMod | EfficientModDeploy,
    input_size: int = 224,
    repeat_mode: RepeatMode = "concat",
    norm_impl: NormImpl = "reduce",
    dw_impl: DwImpl = "single",
) -> EfficientModDeploy:
    """Export form of ``model`` (same weights, folded); a deploy model is returned as is."""
    if isinstance(model, EfficientModDeploy):
        return model
    return EfficientModDeploy(model, input_size, repeat_mode, norm_impl, dw_impl).eval()


# --------------------------------------------------------------------------- registry


VARIANTS: dict[str, VariantConfig] = {
    c.name: c
    for c in (
        VariantConfig(
            name="efficientmod_xxs", embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2),
            attention_depths=(0, 0, 1, 2), mlp_ratio=6, att_ratios=(0, 0, 4, 4),
            paper_top1=77.1, expected_params=4_736_264,
        ),
        VariantConfig(
            name="efficientmod_xs", embed_dims=(32, 64, 144, 288), depths=(3, 3, 4, 2),
            attention_depths=(0, 0, 3, 3), mlp_ratio=4, att_ratios=(4, 4, 4, 4),
            paper_top1=79.4, expected_params=6_627_544,
        ),
        VariantConfig(
            name="efficientmod_s", embed_dims=(32, 64, 144, 312), depths=(4, 4, 8, 4),
            attention_depths=(0, 0, 4, 4), mlp_ratio=6, att_ratios=(4, 4, 4, 5),
            paper_top1=81.9, expected_params=12_897_184,
        ),
        VariantConfig(
            name="efficientmod_s_conv", embed_dims=(40, 80, 160, 344), depths=(4, 4, 12, 8),
            attention_depths=(0, 0, 0, 0), mlp_ratio=6, att_ratios=(0, 0, 0, 0),
            paper_top1=80.5, expected_params=12_872_336,
        ),
        VariantConfig(
            name="efficientmod_test_tiny", embed_dims=(8, 16, 24, 32), depths=(2, 1, 1, 1),
            attention_depths=(0, 0, 1, 1), mlp_ratio=4, att_ratios=(0, 0, 2, 2),
            test_only=True,
        ),
    )
}

PUBLIC_VARIANTS: tuple[str, ...] = tuple(n for n, c in VARIANTS.items() if not c.test_only)


def get_config(name: str) -> VariantConfig:
    key = name.lower().replace("-", "_")
    if not key.startswith("efficientmod_"):
        key = "efficientmod_" + key
    if key not in VARIANTS:
        from edge.errors import ConfigError

        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(PUBLIC_VARIANTS)}"
        )
    return VARIANTS[key]


def create_model(name: str, seed: int | None = 0, num_classes: int | None = None) -> EfficientMod:
    """A randomly initialised variant (deterministic for a given seed), in eval mode.

    ``num_classes`` replaces the 1000-class ImageNet head (a fine-tune's own classes)."""
    cfg = with_classes(get_config(name), num_classes)
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return EfficientMod(cfg).eval()
    return EfficientMod(cfg).eval()


MAX_CLASSES = 100_000


def with_classes(cfg: VariantConfig, num_classes: int | None) -> VariantConfig:
    """``cfg`` with a head of ``num_classes`` outputs (None keeps its own)."""
    if num_classes is None or num_classes == cfg.num_classes:
        return cfg
    if not 1 <= num_classes <= MAX_CLASSES:
        from edge.errors import ConfigError

        raise ConfigError(f"a head of {num_classes} classes is not supported (1 to {MAX_CLASSES})")
    return replace(cfg, num_classes=num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 224) -> int:
    """Multiply-accumulates of one forward pass, counted by tracing the aten graph."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, input_size, input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


# --------------------------------------------------------------------------- checkpoints


CHECKPOINT_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    """The tensor dict inside a checkpoint object, or None if there is none."""
    if not isinstance(obj, dict):
        return None
    for key in CHECKPOINT_WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Map a foreign checkpoint onto this module's key names; pure (input untouched).

    Accepts a bare state_dict, ``{"state_dict": ...}``, ``{"state_dict_ema": ...}``,
    ``{"model": ...}``, DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes, and
    a ``model.`` prefix on every key (a Lightning module holding the network as
    ``self.model``). Keys are otherwise kept as they are: names already follow the
    upstream release.
    """
    inner = unwrap_state_dict(state_dict)
    if inner is None:
        return {}
    out: dict[str, torch.Tensor] = dict(inner)
    while True:  # in any nesting: a Lightning module's torch.compile'd network is model._orig_mod.<key>
        keys = [k.split(".", 1)[1] if k.startswith(WRAPPER_PREFIXES) else k for k in out]
        if keys and all(k.startswith("model.") for k in keys):  # no key of the network itself starts so
            keys = [k[len("model."):] for k in keys]
        if keys == list(out):
            return out
        out = dict(zip(keys, out.values()))


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def head_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of a checkpoint's head (a fine-tune may have replaced ImageNet's 1000), if it has one."""
    w = state_dict.get("head.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and 1 <= w.shape[0] <= MAX_CLASSES:
        return int(w.shape[0])
    return None


def expected_shapes(name: str, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a variant (with a head of ``num_classes``), computed without allocating its weights."""
    with torch.device("meta"):
        model = EfficientMod(with_classes(get_config(name), num_classes))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class ShapeMatch:
    variant: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def match_variant(state_dict: dict[str, torch.Tensor], name: str) -> ShapeMatch:
    """How ``state_dict`` fits variant ``name``, with a head of as many classes as the checkpoint's."""
    shapes = expected_shapes(name, head_classes(state_dict))
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    return ShapeMatch(
        variant=get_config(name).name,
        missing=tuple(sorted(set(shapes) - set(got))),
        unexpected=tuple(sorted(set(got) - set(shapes))),
        mismatched=tuple(sorted(k for k in set(shapes) & set(got) if shapes[k] != got[k])),
    )


def detect_variant(state_dict: dict[str, torch.Tensor], include_test: bool = True) -> str | None:
    """The variant whose parameter names and shapes equal the checkpoint's, if any."""
    for name, cfg in VARIANTS.items():
        if cfg.test_only and not include_test:
            continue
        if match_variant(state_dict, name).exact:
            return name
    return None
