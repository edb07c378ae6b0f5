"""Apple Neural Engine friendly Core ML form of EfficientMod (same weights as the deploy form).

Follows the guidance of Apple's ``ml-ane-transformers`` write-up:

* every tensor is channels-first and 4-D, from the image to the logits (the last
  op reshapes (B, 1000, 1, 1) to (B, 1000), nothing before it changes rank);
* 1x1 convolutions instead of ``Linear`` (the classifier head included);
* LayerNorm over the channel axis (axis 1);
* attention runs on (B, C, 1, S) tensors: the feature map is viewed as a
  sequence of S = H*W tokens on the last axis, heads are split along channels,
  keys are transposed once to (B, S, 1, C), and each head does two einsums
  (``bchq,bkhc->bkhq`` and ``bkhq,bchk->bchq``) that coremltools lowers to the
  MIL ``einsum`` op the Neural Engine runs natively; the softmax is over axis 1.
  No rank-5 reshape, no per-head transposes.

The modulation blocks, patch embeddings and norms are taken from
:class:`edge.efficientmod.EfficientModDeploy` unchanged; only the attention
blocks and the head are rebuilt, so both forms compute the same function.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from edge.efficientmod import (
    EfficientMod,
    EfficientModDeploy,
    LayerNorm2d,
    _DeployAttentionBlock,
    to_deploy,
)


class AneAttention(nn.Module):
    """Multi-head self-attention on a (B, C, 1, S) sequence, two einsums per head.

    ``qkv`` already carries the folded norm affine and the 1/sqrt(d) query scale.
    """

    def __init__(self, qkv: nn.Conv2d, proj: nn.Conv2d, heads: int, head_dim: int):
        super().__init__()
        self.qkv = copy.deepcopy(qkv)
        self.proj = copy.deepcopy(proj)
        self.heads = heads
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.heads * self.head_dim
        q, k, v = torch.split(self.qkv(x), inner, dim=1)
        k = k.transpose(1, 3)  # (B, Sk, 1, C): the one transpose, shared by all heads
        outs = []
        for qh, kh, vh in zip(
            torch.split(q, self.head_dim, dim=1),
            torch.split(k, self.head_dim, dim=3),
            torch.split(v, self.head_dim, dim=1),
        ):
            # (B, d, 1, Sq) . (B, Sk, 1, d) -> (B, Sk, 1, Sq); softmax over the key (channel) axis
            weights = torch.einsum("bchq,bkhc->bkhq", qh, kh).softmax(dim=1)
            # (B, Sk, 1, Sq) . (B, d, 1, Sk) -> (B, d, 1, Sq)
            outs.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
        return self.proj(torch.cat(outs, dim=1))


class AneAttentionBlock(nn.Module):
    """Transformer block of the deploy form, run in the (B, C, 1, S) sequence layout."""

    def __init__(self, src: _DeployAttentionBlock):
        super().__init__()
        self.norm1 = copy.deepcopy(src.norm1)
        self.attn = AneAttention(src.qkv, src.proj, src.heads, src.head_dim)
        self.norm2 = copy.deepcopy(src.norm2)
        self.fc1 = copy.deepcopy(src.fc1)
        self.fc2 = copy.deepcopy(src.fc2)
        self.height, self.width = src.height, src.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        s = x.reshape(-1, c, 1, self.height * self.width)
        s = s + self.attn(self.norm1(s))
        s = s + self.fc2(F.gelu(self.fc1(self.norm2(s))))
        return s.reshape(-1, c, self.height, self.width)


class EfficientModANE(nn.Module):
    """ANE-friendly Core ML form: 4-D channels-first throughout, logits (B, 1000) out."""

    def __init__(self, deploy: EfficientModDeploy):
        super().__init__()
        self.cfg = deploy.cfg
        self.input_size = deploy.input_size
        self.patch_embed = copy.deepcopy(deploy.patch_embed)
        self.blocks = nn.Sequential(
            *[
                AneAttentionBlock(b) if isinstance(b, _DeployAttentionBlock) else copy.deepcopy(b)
                for b in deploy.blocks
            ]
        )
        self.norm: LayerNorm2d = copy.deepcopy(deploy.norm)
        lin = deploy.head
        self.head = nn.Conv2d(lin.in_features, lin.out_features, 1, bias=True)
        with torch.no_grad():
            self.head.weight.copy_(lin.weight.reshape(lin.out_features, lin.in_features, 1, 1))
            self.head.bias.copy_(lin.bias)
        self.num_classes = lin.out_features

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the output of :attr:`blocks`."""
        x = self.head(self.norm(x).mean(dim=(2, 3), keepdim=True))
        return x.reshape(-1, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.blocks(self.patch_embed(x)))


def to_ane(model: EfficientMod | EfficientModDeploy | EfficientModANE, input_size: int = 224) -> EfficientModANE:
    """The ANE form of ``model`` (eager or deploy form; an ANE model is returned as is)."""
    if isinstance(model, EfficientModANE):
        return model
    return EfficientModANE(to_deploy(model, input_size)).eval()
