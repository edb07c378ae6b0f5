"""w8a8 activation search on the tiny proxy checkpoint: which conv inputs stay fp16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="Core ML extra not installed (pip install -e '.[coreml]')")

from calibration.folder import scan_folder  # noqa: E402
from calibration.splits import make_split  # noqa: E402
from converters.coreml_act_search import search  # noqa: E402
from converters.to_coreml import build_mlmodel, calibration_stats, head_op_name, quantized_inputs  # noqa: E402
from edge.ane import to_ane  # noqa: E402
from edge.efficientmod import to_deploy  # noqa: E402
from edge.weights import load_model  # noqa: E402

TINY = "efficientmod_test_tiny"


@pytest.fixture(scope="module")
def measured(tmp_path_factory, samples_dir, proxy_tiny_checkpoint):
    net = to_ane(to_deploy(load_model(TINY, proxy_tiny_checkpoint).model), 224).eval()
    base = build_mlmodel(net, 224, "fp16", "iOS17")
    pkg = tmp_path_factory.mktemp("act") / "base.mlpackage"
    base.save(str(pkg))
    calib = make_split(scan_folder(samples_dir), 8, 1, 0).calib
    stats = calibration_stats(pkg, calib.pixels)
    program = base._mil_program
    return net, program, stats, quantized_inputs(program) & set(stats), calib.nchw()


def test_search_keeps_the_noisiest_inputs_within_budget(measured):
    net, program, stats, quantized, x = measured
    head = head_op_name(program)
    with torch.no_grad():
        before = net(torch.from_numpy(x)).numpy()
    res = search(net, program, stats, quantized, x, budget=0.2, exclude={head})
    with torch.no_grad():
        assert np.array_equal(before, net(torch.from_numpy(x)).numpy()), "search must leave no hook behind"
    rep = res.report()
    assert rep["unmatched_ops"] == 0 and res.candidates >= 10, rep
    assert head not in res.noise_share, "an op kept fp16 anyway must not be measured or spend the budget"
    assert len(res.keep) == int(0.2 * res.candidates), rep
    ranked = sorted(res.noise_share, key=res.noise_share.get, reverse=True)
    assert res.keep == ranked[: len(res.keep)]
    # the noise is concentrated, and leaving the kept inputs fp16 pays on the calibration images
    assert rep["kept_noise_share"] > 1.5 * len(res.keep) / res.candidates, rep
    gain = rep["calib_sqnr_db"]["with_kept_fp16"] - rep["calib_sqnr_db"]["all_int8"]
    assert gain >= 1.0, rep


def test_zero_budget_keeps_nothing(measured):
    net, program, stats, quantized, x = measured
    res = search(net, program, stats, quantized, x[:2], budget=0.0)
    assert res.keep == [] and res.candidates > 0
    assert res.predicted_sqnr_db["all_int8"] == res.predicted_sqnr_db["with_kept_fp16"]


def test_search_quantizer_clips_where_the_package_does():
    """The package's int8 quantize reaches code -128; the search's fake quantizer clipped at -127."""
    from converters.coreml_act_search import _fake_quant

    hook = _fake_quant(127.0)  # scale 1
    (out,) = hook(None, (torch.tensor([-128.0, -127.6, 127.0, 200.0]),))
    assert out.tolist() == [-128.0, -128.0, 127.0, 127.0], out
