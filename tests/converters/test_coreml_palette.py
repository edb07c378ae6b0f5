"""Layer-wise palette search on the tiny proxy checkpoint (every block reaches the logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="Core ML extra not installed (pip install -e '.[coreml]')")

from converters.coreml_palette import coreml_targets, match_parameters, op_weights, search, weight_consts  # noqa: E402
from converters.to_coreml import build_mlmodel, compress_weights, head_op_name  # noqa: E402
from edge.ane import to_ane  # noqa: E402
from edge.efficientmod import to_deploy  # noqa: E402
from edge.weights import load_model  # noqa: E402

TINY = "efficientmod_test_tiny"


@pytest.fixture(scope="module")
def programs(proxy_tiny_checkpoint):
    net = to_ane(to_deploy(load_model(TINY, proxy_tiny_checkpoint).model), 224).eval()
    base = build_mlmodel(net, 224, "fp16", "iOS17")
    head = head_op_name(base._mil_program)
    pal = compress_weights(base, "pal4", "iOS17", threshold=64, float_ops=(head,))
    return net, base, pal


def test_every_palettized_op_is_tied_to_its_parameter(programs):
    net, base, pal = programs
    pal_w = op_weights(pal._mil_program, "constexpr_lut_to_dense")
    match = match_parameters(net, op_weights(base._mil_program, "const"))
    assert len(pal_w) >= 10 and set(pal_w) <= set(match)
    params = dict(net.named_parameters())
    for op, w in pal_w.items():
        assert tuple(w.shape) == tuple(params[match[op]].shape), op
        assert len(np.unique(w)) <= 16, f"{op}: {len(np.unique(w))} distinct values in a 4-bit palette"


def test_search_keeps_the_noisiest_layers_within_budget(programs):
    net, base, pal = programs
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        before = net(torch.from_numpy(x)).numpy()
    targets, unmatched = coreml_targets(net, base._mil_program, pal._mil_program)
    res = search(net, targets, x, budget=0.2, unmatched_ops=unmatched)
    with torch.no_grad():
        after = net(torch.from_numpy(x)).numpy()
    assert np.array_equal(before, after), "search must restore the network's weights"
    rep = res.report()
    assert 0 < rep["kept_fraction"] <= 0.2 and rep["unmatched_ops"] == 0, rep
    # the layers it keeps carry more than their share of the noise, and keeping them pays
    assert rep["kept_noise_share"] > 1.5 * rep["kept_fraction"], rep
    gain = rep["calib_sqnr_db"]["with_kept_int8"] - rep["calib_sqnr_db"]["all_palettized"]
    assert gain >= 1.0, rep

    calls = {"n": 0}

    def fail_on_third_forward(*_):  # by then a palettized weight is in place
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("interrupted")

    hook = net.register_forward_hook(fail_on_third_forward)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            search(net, targets, x, budget=0.2)
    finally:
        hook.remove()
    with torch.no_grad():
        assert np.array_equal(before, net(torch.from_numpy(x)).numpy()), "weights restored after a failure"


def test_kept_layers_sharing_a_const_with_palettized_ones():
    """coremltools merges identical consts (here the zero biases) across convs; a per-conv config then
    conflicts with the palettized neighbour. Configs keyed by the weight const don't."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 128, 3, padding=1), torch.nn.Conv2d(128, 128, 1),
                              torch.nn.Conv2d(128, 128, 1)).eval()
    for m in net:
        torch.nn.init.zeros_(m.bias)
    base = build_mlmodel(net, 16, "fp16", "iOS17")
    consts = weight_consts(base._mil_program, net, {"1.weight"})
    assert len(consts) == 1
    model = compress_weights(base, "pal6", "iOS17", threshold=64, int8_weights=consts)
    kinds = [op.op_type for op in model._mil_program.functions["main"].operations]
    assert kinds.count("constexpr_affine_dequantize") == 1 and kinds.count("constexpr_lut_to_dense") == 2, kinds


@pytest.mark.parametrize("form", ["ane", "deploy"])
def test_block_cache_gives_the_full_forward_bit_for_bit(form, proxy_tiny_checkpoint):
    from converters.coreml_palette import BlockCache

    net = to_deploy(load_model(TINY, proxy_tiny_checkpoint).model, 224).eval()
    net = to_ane(net, 224).eval() if form == "ane" else net
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32))
    cache = BlockCache(net, x)
    assert len(cache.inputs) == len(net.blocks) + 1, "the cache did not engage for this form"
    with torch.no_grad():
        assert np.array_equal(cache.reference, net(x).numpy()), "reference logits differ from a full forward"
    params = dict(net.named_parameters())
    last = len(net.blocks) - 1
    names = [n for n in params if n.startswith(("blocks.0.", f"blocks.{last}.", "head.", "patch_embed."))]
    firsts = {n.split(".")[0] + (("." + n.split(".")[1]) if n.startswith("blocks.") else ""): n for n in names}
    assert len(firsts) == 4, firsts
    for name in firsts.values():
        with torch.no_grad():
            saved = params[name].detach().clone()
            params[name].mul_(1.5)
            full = net(x).numpy()
            got = cache.logits(name)
            params[name].copy_(saved)
        assert np.abs(full - cache.logits(None)).max() > 0, f"{name}: the perturbation did not reach the logits"
        assert np.array_equal(got, full), (
            f"{name}: cached-prefix logits differ from a full forward by max|d| {np.abs(got - full).max():.3g}")
