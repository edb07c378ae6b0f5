"""The int8-mixed conv ranking: modules found by their int8 weights, logit noise measured per conv."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration.folder import scan_folder
from calibration.gptq import nearest_grid
from calibration.splits import make_split
from converters.tflite_noise import match_modules, rank_convs
from edge.checks import sqnr_db
from edge.efficientmod import to_deploy
from edge.errors import ConversionError
from edge.weights import load_model

TINY = "efficientmod_test_tiny"


@pytest.fixture(scope="module")
def net(proxy_tiny_checkpoint) -> nn.Module:
    return to_deploy(load_model(TINY, proxy_tiny_checkpoint).model, 224, norm_impl="conv", dw_impl="split")


@pytest.fixture(scope="module")
def images(samples_dir) -> np.ndarray:
    return make_split(scan_folder(samples_dir), 8, 4, 0).calib.nchw()


def _convs(net: nn.Module, images: np.ndarray) -> tuple[list[str], list[dict]]:
    """Every conv/linear in execution order, with min/max int8 scales of its input and output on ``images``."""
    seen: list[str] = []
    ranges: dict[str, list[float]] = {}

    def hook(name):
        def f(_m, a, o):
            seen.append(name)
            ranges[name] = [float(a[0].min()), float(a[0].max()), float(o.min()), float(o.max())]
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.from_numpy(images[:2]))
    for h in hs:
        h.remove()

    def q(lo: float, hi: float) -> list[float]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255 or 1.0
        return [scale, float(np.round(-128 - lo / scale))]

    ops = [{"tensor": f"t{k}", "op": "CONV_2D", "input_q": q(*ranges[n][:2]), "output_q": q(*ranges[n][2:]),
            "float_input_removable": True, "float_output_removable": True} for k, n in enumerate(seen)]
    return seen, ops


def test_modules_are_found_by_their_int8_weights(net):
    mods = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    order = np.random.default_rng(0).permutation(len(mods))
    weights = [nearest_grid(mods[i][1].weight.detach()).numpy() for i in order]
    found = match_modules(net, weights)
    assert len(set(found)) == len(found) == len(mods), "a module was matched twice"
    by_name = dict(mods)
    for i, name in zip(order, found):  # LayerNorm statistics convs share weights: any of equal weights will do
        same = torch.equal(by_name[name].weight, mods[i][1].weight)
        assert same, f"{mods[i][0]}'s int8 weights matched {name}"
    assert sum(name == mods[i][0] for i, name in zip(order, found)) > len(mods) // 2
    far = weights[:1] + [weights[1] * 1.5]
    with pytest.raises(ConversionError, match=r"conv 1 of the int8 file .* matches no module"):
        match_modules(net, far)


def test_a_coarse_conv_leads_the_noise_and_an_unremovable_one_is_left_out(net, images):
    with torch.no_grad():
        before = net(torch.from_numpy(images)).numpy()
    names, ops = _convs(net, images)
    weights = [dict(net.named_modules())[n].weight.detach().numpy() for n in names]
    base, summary = rank_convs(net, ops, weights, images)
    assert summary["convs"] == len(ops) and summary["candidates"] == len(base) > 10, summary
    k = names.index("blocks.0.fc2")
    coarse = [dict(r) for r in ops]
    coarse[k]["output_q"] = [coarse[k]["output_q"][0] * 16, coarse[k]["output_q"][1]]
    ranked, coarse_summary = rank_convs(net, coarse, weights, images)

    def share(rows) -> float:
        return next(c.share for c in rows if c.module == "blocks.0.fc2")

    assert share(ranked) > 20 * share(base), (share(ranked), share(base))  # rounding noise grows with scale^2
    assert coarse_summary["simulated_sqnr_db"] < summary["simulated_sqnr_db"], (coarse_summary, summary)
    shares = [c.share / (c.extra_bytes + 4096) for c in ranked]
    assert shares == sorted(shares, reverse=True), "not ranked by noise per extra float byte"
    coarse[k]["float_input_removable"] = coarse[k]["float_output_removable"] = False
    left, _ = rank_convs(net, coarse, weights, images)
    assert "blocks.0.fc2" not in {c.module for c in left}, "a conv whose float copy removes nothing was ranked"
    with torch.no_grad():  # no hook is left behind: the net computes its float logits again
        after = net(torch.from_numpy(images)).numpy()
    assert sqnr_db(before, after) > 100, "rank_convs left fake quantization in the net"


def test_conv_ops_of_a_real_file_rank_and_denylist(tmp_path, samples_dir, proxy_tiny_checkpoint):
    """On the tiny model's own int8 files: every conv is found and matched, the simulated SQNR tracks what
    LiteRT measures, and the ranking's name for the head (which the int8 file renames) keeps it float."""
    pytest.importorskip("onnx2tf", reason="TFLite extra not installed (pip install -e '.[tflite]')")
    from converters.to_tflite import INT8_NORM, RUNTIME_FLOAT_OPS, _Builder, _conv_noise, inspect_tflite, litert_logits
    from edge.context import ConvertContext

    loaded = load_model(TINY, proxy_tiny_checkpoint)
    split = make_split(scan_folder(samples_dir), 16, 4, 0)
    ctx = ConvertContext(loaded=loaded, deploy=to_deploy(loaded.model, 224), split=split,
                         reference=np.zeros((0, 1000), np.float32), work_dir=tmp_path)
    b = _Builder(ctx, tmp_path / "build")
    full = b.quantize(tmp_path / "full.tflite")
    deny = {"ops": list(RUNTIME_FLOAT_OPS) + ["ADD"], "nodes": [], "layernorm_stats": True}
    step = b.quantize(tmp_path / "step.tflite", denylist=deny)
    rows, summary = _conv_noise(b, full, step)
    net = b._gptq_deploy(INT8_NORM)
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    assert summary["convs"] == convs and summary["candidates"] == len(rows) > convs // 2, summary
    images = split.calib.nchw()[:16]
    with torch.no_grad():
        ref = net(torch.from_numpy(images)).numpy()
    measured = sqnr_db(ref, litert_logits(step, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), b.build))
    # measured: simulated 33.81 dB, LiteRT 32.92 dB (distilled s: 28.44 / 28.37)
    assert abs(summary["simulated_sqnr_db"] - measured) < 2.0, (summary["simulated_sqnr_db"], measured)
    (head,) = [r for r in rows if r["module"] == "head"]
    kept = b.quantize(tmp_path / "kept.tflite", denylist={**deny, "nodes": [head["tensor"]]})
    assert "FULLY_CONNECTED" not in inspect_tflite(step, b.build)["float_ops"]
    assert inspect_tflite(kept, b.build)["float_ops"].get("FULLY_CONNECTED") == 1, "the head stayed int8"
    from converters.litert_worker import read_graph

    g = read_graph(full.read_bytes())
    (fc,) = g.ops_of(("FULLY_CONNECTED",))
    int8_name = g.names[fc["outputs"][0]]  # the int8 file's name for the head, which the quantizer would ignore
    assert int8_name != head["tensor"], int8_name
    with pytest.raises(ConversionError, match=f"denylisted tensors not in the calibrated model: {int8_name}"):
        b.quantize(tmp_path / "unknown.tflite", denylist={**deny, "nodes": [int8_name]})
