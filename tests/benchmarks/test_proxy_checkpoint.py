"""The synthetic benchmark checkpoint: accepted by the loader, and its blocks matter."""

from __future__ import annotations

import torch

from edge.weights import load_model

TINY = "efficientmod_test_tiny"


def _block_share(model: torch.nn.Module) -> float:
    """Relative change of the logits when every modulation block's output is switched off."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        full = model(x)
        for name, p in model.named_parameters():
            if name.endswith("gamma_1"):
                p.zero_()
        cut = model(x)
    return float((full - cut).norm() / full.norm())


def test_proxy_blocks_move_the_logits_upstream_init_does_not(proxy_tiny_checkpoint):
    proxy = load_model(TINY, proxy_tiny_checkpoint).model.eval()
    untrained = load_model(TINY, None).model.eval()
    proxy_share, untrained_share = _block_share(proxy), _block_share(untrained)
    assert proxy_share > 0.1, f"proxy checkpoint: modulation blocks change the logits by only {proxy_share:.1%}"
    assert untrained_share < 0.01, f"upstream init: blocks change the logits by {untrained_share:.2%} (expected ~0)"
