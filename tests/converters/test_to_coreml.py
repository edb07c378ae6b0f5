"""Core ML target on the tiny variant, checked on Linux by the NumPy MIL interpreter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="Core ML extra not installed (pip install -e '.[coreml]')")

from converters.mil_interp import load_package, run_package  # noqa: E402
from edge.ane import to_ane  # noqa: E402
from edge.efficientmod import to_deploy  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.manifest import Manifest  # noqa: E402
from edge.pipeline import ConvertRequest, convert  # noqa: E402

TINY = "efficientmod_test_tiny"
ALL = ["fp16", "fp32", "w8", "w8a8", "pal6", "pal4"]
# The tiny variant's weight tensors are small; quantize all of them so w8/pal really are compressed.
OPTS = {"coreml_weight_threshold": 64}


def _artifact(m: Manifest, precision: str):
    (a,) = [a for a in m.artifacts if a.precision == precision]
    return a


@pytest.fixture(scope="module")
def ane_out(tmp_path_factory, samples_dir) -> Path:
    out = tmp_path_factory.mktemp("coreml_ane")
    convert(ConvertRequest(targets=["coreml"], model=TINY, output=out, calib_dir=str(samples_dir),
                           calib_size=8, eval_size=6, precisions=ALL, options=dict(OPTS)))
    return out


@pytest.fixture(scope="module")
def plain_out(tmp_path_factory, samples_dir, proxy_tiny_checkpoint) -> Path:
    """fp32 plain form on proxy weights, whose every block reaches the logits."""
    out = tmp_path_factory.mktemp("coreml_plain")
    convert(ConvertRequest(targets=["coreml"], model=TINY, weights=str(proxy_tiny_checkpoint), output=out,
                           calib_dir=str(samples_dir),
                           calib_size=0, eval_size=6, precisions=["fp32"],
                           options={**OPTS, "coreml_form": "plain"}))
    return out


def test_all_precisions_written(ane_out):
    m = Manifest.load(ane_out / "manifest.json")
    assert sorted(a.precision for a in m.artifacts) == sorted(ALL), m.failures
    for a in m.artifacts:
        assert (ane_out / a.path / "Manifest.json").is_file()
        assert a.path == f"{TINY}_{a.precision}.mlpackage"
        assert a.details["form"] == "ane" and a.details["deployment_target"] == "iOS17"
        assert a.input.layout == "image" and a.input.shape == [1, 3, 224, 224]
        assert a.input.normalization == "in_model", "the package normalizes 0-255 pixels itself"
        assert a.bytes > 0


def test_fp32_matches_pytorch(proxy_out):
    """On proxy weights (untrained blocks barely reach the logits, so a dropped block would pass there)."""
    _, manifest = proxy_out
    a = _artifact(manifest, "fp32")
    # measured max|d| 1.6e-5, SQNR 103.2 dB
    assert a.checks["max_abs_diff"] <= 1e-4, f"{a.path}: fp32 Core ML logits max|d| vs PyTorch {a.checks}"
    assert a.checks["sqnr_db"] >= 100.0, f"{a.path}: fp32 Core ML logits SQNR vs PyTorch {a.checks}"
    assert a.checks["top1_agreement"] == 1.0, f"{a.path}: top-1 differs from PyTorch {a.checks}"


def test_fp16_sqnr(ane_out):
    a = _artifact(Manifest.load(ane_out / "manifest.json"), "fp16")
    assert a.checks["sqnr_db"] >= 58.0, f"fp16 package SQNR (measured 61.0 dB): {a.checks}"
    assert a.details["compute_precision"] == "fp16"
    assert set(a.details["ops_by_precision"]["conv"]) == {"fp16"}


def test_w8_agreement_and_compression(ane_out):
    m = Manifest.load(ane_out / "manifest.json")
    a = _artifact(m, "w8")
    assert a.checks["top1_agreement"] >= 0.99, a.checks
    assert a.checks["sqnr_db"] >= 36.0, f"w8 package SQNR (measured 39.4 dB): {a.checks}"
    assert a.details["weight_ops"].get("constexpr_affine_dequantize", 0) >= 30
    assert a.bytes < _artifact(m, "fp16").bytes

    def weights(precision: str) -> int:  # the tiny net's program text is a third of its package: compare weights
        return (ane_out / f"{TINY}_{precision}.mlpackage" / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size

    assert weights("w8") < 0.65 * weights("fp16"), f"w8 weights {weights('w8')} B against fp16's {weights('fp16')} B"
    assert a.details["weight_rounding"]["method"].startswith("nearest"), "w8 is data-free by default"


def test_w8a8_has_int8_activations(ane_out):
    a = _artifact(Manifest.load(ane_out / "manifest.json"), "w8a8")
    search = a.details["activation_search"]
    kept = [k["op"] for k in search["kept_fp16"]]
    from edge.targets import OPTIONS

    budget = OPTIONS["coreml_w8a8_float_budget"].default
    assert len(kept) == int(budget * search["quantized_conv_inputs"]) > 0, search
    assert set(kept) <= set(a.details["kept_float"]["ops"]), "searched ops must reach the package's float list"
    # one quantize op per quantized tensor (shared by its consumers): most conv inputs still int8
    assert a.details["activation_quantize_ops"] >= 25
    assert a.details["activation_calibration"]["images"] == 8
    assert a.checks["sqnr_db"] >= 25.0 and a.checks["top1_agreement"] >= 0.99, a.checks


def test_palettes(ane_out):
    m = Manifest.load(ane_out / "manifest.json")
    p6, p4 = _artifact(m, "pal6"), _artifact(m, "pal4")
    assert p6.details["weight_ops"].get("constexpr_lut_to_dense", 0) >= 20
    assert p6.checks["sqnr_db"] > p4.checks["sqnr_db"], (p6.checks, p4.checks)
    assert p4.bytes < p6.bytes
    for p in (p6, p4):  # the layer search kept its noisiest layers int8, within the default budget
        search = p.details["palette_search"]
        assert 0 < search["kept_fraction"] <= 0.15, search
        assert p.details["weight_ops"].get("constexpr_affine_dequantize", 0) == len(search["kept_int8"]), p.details
    for p, nbits in ((p6, 6), (p4, 4)):  # indices as wide as the palette: a 6-bit palette is not stored in 8 bits
        sizes = {op.name: op.inputs["lut"].val.shape[-2] if op.inputs["lut"].val.ndim > 1 else op.inputs["lut"].val.size
                 for op in load_package(ane_out / p.path).program.functions["main"].operations
                 if op.op_type == "constexpr_lut_to_dense"}
        assert sizes and set(sizes.values()) == {1 << nbits}, f"{p.path}: LUT entries {sizes}"


def test_stored_palette_counts_float16_values_exactly():
    """98304 float16 weights on a 64-value palette (an xxs fc1): NumPy's float16 np.unique counted 110 values on
    an AVX-512 host, so coremltools' unique mode stored them with 8-bit indices; stored_palette keeps 6 bits."""
    from converters.to_coreml import stored_palette
    from edge.errors import ConversionError

    rng = np.random.default_rng(0)
    palette = np.sort(rng.normal(0.0, 0.02, 64)).astype(np.float16)
    assert np.unique(palette.astype(np.float32)).size == 64
    weight = palette[rng.integers(0, 64, (768, 128, 1, 1))]
    lut, indices = stored_palette(6)(weight)
    assert lut.dtype == np.float16 and lut.shape == (64,) and indices.dtype == np.uint8
    assert np.array_equal(lut[indices].reshape(weight.shape), weight), "the LUT does not give back the weights"
    with pytest.raises(ConversionError, match="4-bit palette holds 64 distinct values"):
        stored_palette(4)(weight)


def test_swapped_weights_give_the_program_a_conversion_gives():
    """GPTQ-style networks (only weight values differ) reuse the float program: the same ops, consts and
    description as exporting and converting them again; where that cannot be guaranteed, swap_weights says
    so (None)."""
    import copy

    from benchmarks.swap_identity import program_summary as _program_summary
    from converters.to_coreml import build_mlmodel, swap_weights
    from edge.efficientmod import create_model

    def rounded(net, names) -> torch.nn.Module:
        out = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in out.named_parameters():
                if name in names:
                    p.copy_(torch.round(p * 64) / 64)
        return out

    net = to_ane(to_deploy(create_model(TINY))).eval()
    params = dict(net.named_parameters())
    big = {n for n, p in params.items() if p.numel() > 2048}  # what GPTQ rounds at the default threshold
    assert len(big) >= 4
    base = build_mlmodel(net, 224, "fp16", "iOS17")
    new = rounded(net, big)
    swapped = swap_weights(base, net, new, 224, "iOS17")
    assert swapped is not None, "swap_weights fell back on plain GPTQ-style weights"
    full_ops, full_consts, full_desc = _program_summary(build_mlmodel(new, 224, "fp16", "iOS17"))
    ops, consts, desc = _program_summary(swapped)
    assert ops == full_ops, "the swapped program's ops differ from a fresh conversion's"
    differ = [a[0] for a, b in zip(full_consts, consts) if a != b]
    assert len(consts) == len(full_consts) and not differ, f"consts at op positions {differ[:5]} differ"
    assert desc == full_desc, "the swapped model's description (interface, metadata) differs"
    base_consts = _program_summary(base)[1]
    assert sum(a != b for a, b in zip(base_consts, consts)) == len(big)

    stored = {c[2] for c in base_consts}
    folded = [n for n, p in params.items() if p.numel() >= 100
              and not {p.detach().numpy().astype(dt).tobytes() for dt in (np.float16, np.float32)} & stored]
    # random init: LayerScale folded in (|w| <= 6e-6) makes a 256-element fc2 underflow in fp16, and coremltools'
    # fp16 pass lifts those values off zero, so the const is not the weight's astype
    assert folded, "no weight of the random tiny net is stored other than by astype (measured: blocks.1.fc2.weight)"
    assert swap_weights(base, net, rounded(net, big | set(folded[:1])), 224, "iOS17") is None, (
        f"{folded[0]} is not stored as its astype, yet swap_weights did not refuse")
    pair = next((a, b) for a in params for b in params if a < b and params[a].shape == params[b].shape
                and params[a].numel() >= 256 and a not in folded and b not in folded)
    same = rounded(net, set(pair))
    with torch.no_grad():  # two weights made equal: a conversion would share one const between them
        dict(same.named_parameters())[pair[0]].copy_(dict(same.named_parameters())[pair[1]])
    assert swap_weights(base, net, same, 224, "iOS17") is None, f"{pair} made equal, yet swap_weights did not refuse"
    other = to_ane(to_deploy(create_model(TINY, seed=1))).eval()  # a program not made from `old`
    assert swap_weights(base, other, new, 224, "iOS17") is None, "a program of other weights was not refused"


def test_palette_search_can_be_switched_off(tmp_path, samples_dir):
    res = convert(ConvertRequest(targets=["coreml"], model=TINY, output=tmp_path, calib_dir=str(samples_dir),
                                 calib_size=0, eval_size=2, precisions=["pal6"],
                                 options={**OPTS, "coreml_palette_budget": "0"}))
    (a,) = res.manifest.artifacts
    assert "palette_search" not in a.details and "constexpr_affine_dequantize" not in a.details["weight_ops"]


def test_ane_form_is_4d_and_matches_plain(ane_out, plain_out):
    ane = _artifact(Manifest.load(ane_out / "manifest.json"), "fp32")
    plain = _artifact(Manifest.load(plain_out / "manifest.json"), "fp32")
    chk = ane.details["ane_check"]
    assert chk["max_rank"] == 4 and chk["rank5_ops"] == 0
    assert "einsum" in ane.details["ops_by_precision"] and "linear" not in ane.details["ops_by_precision"]
    assert plain.details["form"] == "plain", plain.details
    # proxy weights; measured max|d| 2.0e-5, SQNR 103.5 dB
    assert plain.checks["max_abs_diff"] <= 1e-4 and plain.checks["sqnr_db"] >= 100.0, (
        f"{plain.path}: plain-form fp32 logits vs PyTorch {plain.checks}")
    fp16 = _artifact(Manifest.load(ane_out / "manifest.json"), "fp16").details["ane_check"]
    assert fp16["fallback_count"] == 0, fp16["fallback"]
    # fp32 packages cannot run on the fp16-only ANE: every compute op is flagged
    assert chk["fallback_count"] > 50


def test_ane_module_matches_eager_model(proxy_tiny_checkpoint):
    """Proxy weights: on untrained ones a wrong softmax axis moved logits by only 1.2e-5."""
    from edge.weights import load_model

    model = load_model(TINY, proxy_tiny_checkpoint).model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        diff = (to_ane(to_deploy(model))(x) - ref).abs().max().item()
    assert diff <= 1e-5, f"ANE-form module logits differ from eager: max|d| {diff:.3g} > 1e-5 (measured 7.2e-7)"


@pytest.mark.parametrize("precision", ["fp16", "w8a8", "pal4"])
def test_classifier_package(ane_out, samples_dir, precision):
    """The classifier is its logits package plus softmax and classify: same weights, probabilities = softmax(logits)."""
    from calibration.folder import scan_folder
    from calibration.splits import make_split
    from converters.mil_interp import weight_histogram

    m = Manifest.load(ane_out / "manifest.json")
    a = _artifact(m, precision)
    cls = a.details["classifier"]
    assert cls["label_agreement_with_logits_package"] == 1.0
    pkg, logits_pkg = load_package(ane_out / cls["path"]), load_package(ane_out / a.path)
    assert pkg.classifier and pkg.output_names == ["classLabel", "classLabel_probs"]
    assert weight_histogram(pkg.program) == weight_histogram(logits_pkg.program), "classifier weights stored otherwise"
    px = make_split(scan_folder(samples_dir), 2, 1, 0).calib.pixels
    probs, logits = run_package(pkg, px), run_package(logits_pkg, px)
    ref = torch.softmax(torch.from_numpy(logits.astype(np.float32)), 1).numpy()
    rel = float(np.abs(probs - ref).max() / ref.max())
    # softmax in fp16, as the logits: rounding 2^-11 relative (measured 5e-4 of the largest probability)
    assert rel <= 2.0**-10, f"{cls['path']}: probabilities differ from softmax(logits) by {rel:.3g} of the largest"
    assert (probs.argmax(1) == logits.argmax(1)).all()


def test_metadata_and_interface(ane_out):
    pkg = load_package(ane_out / f"{TINY}_fp16.mlpackage")
    md = pkg.metadata
    assert md["author"] and md["license"] and md["version"] == "0.1.0"
    assert "EfficientMod" in md["short_description"]
    ud = md["user_defined"]
    assert ud["variant"] == TINY and ud["weights_source"] == "untrained" and "std" in ud["preprocessing"]
    assert pkg.is_image and pkg.color_layout == "RGB" and pkg.input_shape == (1, 3, 224, 224)
    assert pkg.output_names == ["logits"]
    assert len(ud) >= 8


def test_interpreter_rereads_saved_package(proxy_out, samples_dir, proxy_tiny_checkpoint):
    from calibration.folder import scan_folder
    from calibration.splits import make_split
    from edge.checks import sqnr_db
    from edge.weights import load_model

    out, manifest = proxy_out
    a = _artifact(manifest, "fp32")
    split = make_split(scan_folder(samples_dir), 8, 6, 0)
    logits = run_package(out / a.path, split.eval.pixels[:2])
    with torch.no_grad():
        ref = load_model(TINY, proxy_tiny_checkpoint).model.eval()(torch.from_numpy(split.eval.nchw()[:2])).numpy()
    diff, sqnr = float(np.abs(logits - ref).max()), sqnr_db(ref, logits)
    # measured max|d| 1.2e-5, SQNR 105.6 dB
    assert diff <= 1e-4 and sqnr >= 102.0, f"{a.path} re-read: max|d| {diff:.3g} (<= 1e-4), SQNR {sqnr:.1f} dB (>= 102)"


def test_mse_calibration_narrows_quantized_ranges(ane_out, samples_dir):
    """The symmetric bounds w8a8 uses (max |range|) are tighter with MSE than with min/max."""
    from calibration.folder import scan_folder
    from calibration.splits import make_split
    from converters.to_coreml import calibration_stats, quantized_inputs

    package = ane_out / f"{TINY}_fp16.mlpackage"
    px = make_split(scan_folder(samples_dir), 8, 1, 0).calib.pixels
    minmax, mse = calibration_stats(package, px, "minmax"), calibration_stats(package, px, "mse")
    quantized = quantized_inputs(load_package(package).program) & set(minmax)
    assert len(quantized) >= 20
    tighter = 0
    for n in quantized:
        bound = max(abs(minmax[n]["rmin"]), abs(minmax[n]["rmax"]))
        got = max(abs(mse[n]["rmin"]), abs(mse[n]["rmax"]))
        assert got <= bound * (1 + 1e-3), f"{n}: MSE bound {got} above max |x| {bound}"
        tighter += got < 0.98 * bound
    assert tighter >= len(quantized) // 2, f"only {tighter} of {len(quantized)} ranges narrowed"
    # attention outputs reach their projection conv through a concat, whose group shares one range
    ops = load_package(package).program.functions["main"].operations
    concat_fed = {op.outputs[0].name for op in ops if op.op_type == "concat"} & quantized
    assert concat_fed
    for n in concat_fed:
        bound = max(abs(minmax[n]["rmin"]), abs(minmax[n]["rmax"]))
        assert max(abs(mse[n]["rmin"]), abs(mse[n]["rmax"])) < 0.995 * bound, f"{n}: concat-fed range not narrowed"


def test_range_cache_replay_is_exact(ane_out, samples_dir, monkeypatch):
    """The histogram pass replays the min/max pass's tensors: ranges equal a full rerun's, whatever fits the cache."""
    import converters.to_coreml as tc
    from calibration.folder import scan_folder
    from calibration.splits import make_split
    from converters.mil_interp import TensorCache, activation_stats, image_feed

    package = ane_out / f"{TINY}_fp16.mlpackage"
    px = make_split(scan_folder(samples_dir), 6, 1, 0).calib.pixels
    pkg = load_package(package)
    names = tc.quantized_inputs(pkg.program)
    feeds = [{pkg.input_name: image_feed(pkg, img)} for img in px]
    one = TensorCache(names, 2**40)
    activation_stats(pkg.program, feeds[:1], cache=one)
    partial = TensorCache(names, int(2.5 * one.nbytes))  # two images and a half: the third's record is dropped
    activation_stats(pkg.program, feeds, cache=partial)
    assert partial.cached == 2 and partial.nbytes == 2 * one.nbytes, (partial.cached, partial.nbytes, one.nbytes)
    assert all(set(t) == set(one.tensors[0]) == names for t in partial.tensors)
    ranges = {}
    for budget in (0, partial.budget, 2**40):
        monkeypatch.setattr(tc, "RANGE_CACHE_BYTES", budget)
        ranges[budget] = tc.calibration_stats(package, px, "mse")
    assert ranges[partial.budget] == ranges[0], "ranges from 2 replayed + 4 rerun images differ from 6 rerun"
    assert ranges[2**40] == ranges[0], "ranges from 6 replayed images differ from 6 rerun"


def test_range_cache_budget_follows_free_memory(monkeypatch):
    import converters.to_coreml as tc

    pages = {"SC_AVPHYS_PAGES": 2**18, "SC_PAGE_SIZE": 4096}  # 1 GiB free
    monkeypatch.setattr(tc.os, "sysconf", lambda name: pages[name])
    assert tc.range_cache_budget() == 2**28, "a quarter of 1 GiB free"
    pages["SC_AVPHYS_PAGES"] = 2**24  # 64 GiB free: the fixed cap
    assert tc.range_cache_budget() == tc.RANGE_CACHE_BYTES

    def unsupported(name):
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(tc.os, "sysconf", unsupported)
    assert tc.range_cache_budget() == tc.RANGE_CACHE_BYTES


def test_ios16_target(tmp_path, samples_dir):
    res = convert(ConvertRequest(targets=["coreml"], model=TINY, output=tmp_path, calib_dir=str(samples_dir),
                                 calib_size=4, eval_size=3, precisions=["fp16"],
                                 options={**OPTS, "deployment_target": "iOS16"}))
    (a,) = res.manifest.artifacts
    assert a.details["deployment_target"] == "iOS16", a.details
    assert a.checks["sqnr_db"] >= 56.0, f"iOS16 fp16 package SQNR (measured 59.3 dB): {a.checks}"
    assert not res.failed, res.failed
    with pytest.raises(ConfigError, match="w8a8 needs --deployment-target iOS17"):  # refused before converting
        convert(ConvertRequest(targets=["coreml"], model=TINY, output=tmp_path / "w8a8", calib_dir=str(samples_dir),
                               precisions=["fp16", "w8a8"], options={**OPTS, "deployment_target": "iOS16"}))
    assert not (tmp_path / "w8a8").exists()


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="MLModel.predict needs the macOS Core ML runtime")
def test_coreml_runtime_agrees_with_interpreter(ane_out, samples_dir):
    import coremltools as ct
    from PIL import Image

    a = _artifact(Manifest.load(ane_out / "manifest.json"), "fp32")
    model = ct.models.MLModel(str(ane_out / a.path), compute_units=ct.ComputeUnit.CPU_ONLY)
    from calibration.folder import scan_folder
    from calibration.splits import make_split

    px = make_split(scan_folder(samples_dir), 0, 2, 0).eval.pixels
    got = np.stack([model.predict({"image": Image.fromarray(p)})["logits"].reshape(-1) for p in px])
    assert float(np.abs(got - run_package(ane_out / a.path, px)).max()) < 1e-3


@pytest.fixture(scope="module")
def proxy_out(tmp_path_factory, samples_dir, proxy_tiny_checkpoint) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("coreml_proxy")
    res = convert(ConvertRequest(targets=["coreml"], model=TINY, weights=str(proxy_tiny_checkpoint), output=out,
                                 calib_dir=str(samples_dir), calib_size=8, eval_size=6,
                                 precisions=["fp32", "fp16", "w8", "w8a8", "pal4"],
                                 options={**OPTS, "coreml_w8_rounding": "gptq"}))
    return out, res.manifest


def test_checkpoint_with_layernorm_affines_converts(proxy_out):
    """Upstream init has LayerNorm weight 1 / bias 0; real weights don't, and coremltools then
    fuses their per-channel mul + add into batch_norm, which the interpreter must run."""
    _, manifest = proxy_out
    assert not manifest.failures, manifest.failures
    checks = {a.precision: a.checks for a in manifest.artifacts if "classifier" not in a.path}
    # measured: fp32 max|d| 1.6e-5 / 103.2 dB, fp16 56.4 dB, w8a8 37.76 dB
    assert checks["fp32"]["max_abs_diff"] <= 1e-4 and checks["fp32"]["sqnr_db"] >= 100.0, f"fp32: {checks['fp32']}"
    assert checks["fp16"]["sqnr_db"] >= 53.0, f"fp16: {checks['fp16']}"
    assert checks["w8a8"]["sqnr_db"] >= 34.5, f"w8a8: {checks['w8a8']}"
    w8a8 = _artifact(manifest, "w8a8")
    assert "MSE-optimal" in w8a8.details["activation_calibration"]["ranges_from"]


@pytest.mark.parametrize("precision", ["w8a8", "w8"])  # w8 with coreml_w8_rounding=gptq
def test_int8_packages_store_the_gptq_weights(proxy_out, samples_dir, proxy_tiny_checkpoint, precision):
    """coremltools re-derives each row's scale and rounds: the package must hold the GPTQ levels unchanged."""
    from calibration.folder import scan_folder
    from calibration.gptq import GPTQ_IMAGES, gptq_round
    from calibration.splits import make_split
    from converters.coreml_palette import op_weights
    from edge.weights import load_model

    out, manifest = proxy_out
    w8a8 = _artifact(manifest, precision)
    rounding = w8a8.details["weight_rounding"]
    assert rounding["method"].startswith("GPTQ") and rounding["layers"] > 0, rounding
    split = make_split(scan_folder(samples_dir), 8, 6, 0)
    net = to_ane(load_model(TINY, proxy_tiny_checkpoint).model, 224)
    rounded, _ = gptq_round(net, split.calib.nchw()[:GPTQ_IMAGES], min_elements=OPTS["coreml_weight_threshold"] + 1)
    wanted = {n: p.detach().double().numpy() for n, p in rounded.named_parameters() if n.endswith("weight")}
    original = {n: p.detach().double().numpy() for n, p in net.named_parameters()}
    program = load_package(out / w8a8.path).program
    stored = op_weights(program, "constexpr_affine_dequantize")
    assert len(stored) == rounding["layers"], f"{len(stored)} int8 weights in the package, GPTQ rounded {rounding['layers']}"
    moved = 0
    for op, w in stored.items():
        w = w.astype(np.float64)
        level = np.abs(w.reshape(len(w), -1)).max(1) / 127
        level = level.reshape(-1, *[1] * (w.ndim - 1))
        same_shape = [n for n, p in wanted.items() if p.shape == w.shape]
        err = {n: float(np.abs((w - wanted[n]) / level).max()) for n in same_shape}
        best = min(err, key=err.get)
        # fp16 scales: a level moves by at most ~127 * 2^-10 of itself
        assert err[best] < 0.15, f"{op}: package weights are {err[best]:.2f} levels from the GPTQ weights of {best}"
        moved += float(np.abs((wanted[best] - original[best]) / level).max()) > 0.5
    assert moved > 0, "GPTQ moved no weight by more than half a level: the test would not see nearest rounding"


def _check_stored_palettes(out: Path, pal4, samples_dir: Path, checkpoint: Path, group: int | None) -> None:
    """Each palettized weight in ``pal4``'s package is the GPTQ rounding onto its own k-means palette(s), stored exactly."""
    from calibration.folder import scan_folder
    from calibration.gptq import GPTQ_IMAGES, LayerRounder, grouped_palette_luts, on_row_palettes, palette_lut
    from calibration.splits import make_split
    from converters.coreml_palette import FP16_SUBNORMAL_STEP, op_weights
    from edge.weights import load_model

    rounding = pal4.details["weight_rounding"]
    assert rounding["palettes"]["method"].startswith("GPTQ (pal4" + (f"g{group}" if group else ":")), rounding
    split = make_split(scan_folder(samples_dir), 8, 6, 0)
    net = to_ane(load_model(TINY, checkpoint).model, 224)
    rounder = LayerRounder(net, split.calib.nchw()[:GPTQ_IMAGES], min_elements=OPTS["coreml_weight_threshold"] + 1)
    kept = {k["parameter"].removesuffix(".weight") for k in pal4.details["palette_search"]["kept_int8"]}
    stored = op_weights(load_package(out / pal4.path).program, "constexpr_lut_to_dense")
    assert len(stored) == rounding["palettes"]["layers"], f"{len(stored)} palettes stored, {rounding['palettes']['layers']} rounded"
    moved = 0
    for op, w in stored.items():
        rows = w.reshape(-1, group or w.shape[0], *w.shape[1:])
        assert max(len(np.unique(r)) for r in rows) <= 16, f"{op}: more than 16 values in a 4-bit palette"
        err = {n: float(np.abs(w.astype(np.float32) - rounder.palette(n, 4, group).to(torch.float16).float().numpy()).max())
               for n, layer in rounder.layers.items() if n not in kept and tuple(layer.weight.shape) == w.shape}
        best = min(err, key=err.get)
        assert err[best] <= FP16_SUBNORMAL_STEP, f"{op}: stored palette weights differ from GPTQ's for {best} by {err[best]:.3g}"
        layer = rounder.layers[best].weight.detach()
        luts = (grouped_palette_luts(layer, 4, group).repeat_interleave(group, dim=0) if group
                else palette_lut(layer, 4).expand(layer.shape[0], -1))
        moved += not torch.equal(on_row_palettes(layer, luts.float()), rounder.palette(best, 4, group))
    assert moved > 0, "no stored palette differs from nearest rounding: the test would not see GPTQ"


def test_palettes_store_the_gptq_palette_weights(proxy_out, samples_dir, proxy_tiny_checkpoint):
    out, manifest = proxy_out
    _check_stored_palettes(out, _artifact(manifest, "pal4"), samples_dir, proxy_tiny_checkpoint, None)


def test_ios18_grouped_palettes_store_the_gptq_weights(tmp_path, samples_dir, proxy_tiny_checkpoint):
    """iOS 18 pal4: one palette per 16 output channels, each GPTQ-rounded; other tensors stay fp16 or int8."""
    from converters.to_coreml import PALETTE_GROUP

    res = convert(ConvertRequest(targets=["coreml"], model=TINY, weights=str(proxy_tiny_checkpoint), output=tmp_path,
                                 calib_dir=str(samples_dir), calib_size=8, eval_size=6, precisions=["pal4"],
                                 options={**OPTS, "deployment_target": "iOS18"}))
    pal4 = _artifact(res.manifest, "pal4")
    assert pal4.details["deployment_target"] == "iOS18"
    _check_stored_palettes(tmp_path, pal4, samples_dir, proxy_tiny_checkpoint, PALETTE_GROUP)
    luts = [op for op in load_package(tmp_path / pal4.path).program.functions["main"].operations
            if op.op_type == "constexpr_lut_to_dense"]
    assert luts, "no palettized weight in the iOS 18 pal4 package"
    for op in luts:
        lut, shape = op.inputs["lut"].val, op.outputs[0].shape
        assert lut.shape[0] == shape[0] // PALETTE_GROUP and lut.shape[-2] == 16, f"{op.name}: lut {lut.shape}, weight {shape}"
    assert pal4.checks["sqnr_db"] >= 20.0, pal4.checks


@pytest.mark.slow
@pytest.mark.parametrize("form", ["ane", "plain"])
def test_xxs_all_precisions(tmp_path, samples_dir, form):
    res = convert(ConvertRequest(targets=["coreml"], model="efficientmod_xxs", output=tmp_path,
                                 calib_dir=str(samples_dir), calib_size=16, eval_size=16, precisions=ALL,
                                 options={"coreml_form": form}))
    assert not res.failed, res.failed
    checks = {a.precision: a.checks for a in res.manifest.artifacts}
    assert checks["fp32"]["max_abs_diff"] <= 1e-4
    assert checks["fp16"]["sqnr_db"] >= 40.0
    for p in ("w8", "w8a8"):
        assert checks[p]["passed"], (p, checks[p])
    # Random weights give near-tied logits (median top-1/top-2 gap ~0.03), so palette top-1
    # agreement is not meaningful here; check the noise level instead.
    assert checks["pal6"]["sqnr_db"] >= 25.0 and checks["pal4"]["sqnr_db"] >= 12.0, checks
    assert checks["pal6"]["sqnr_db"] > checks["pal4"]["sqnr_db"]
    sizes = {a.precision: a.bytes for a in res.manifest.artifacts}
    assert sizes["pal4"] < sizes["pal6"] < sizes["w8"], sizes
    rank5 = [a.details["ane_check"]["rank5_ops"] for a in res.manifest.artifacts]
    assert max(rank5) == 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientmod_xs", "efficientmod_s", "efficientmod_s_conv"])
def test_larger_variants_all_precisions(tmp_path, samples_dir, variant):
    """Every Core ML precision of the other three variants (ANE form), checked by the interpreter."""
    res = convert(ConvertRequest(targets=["coreml"], model=variant, output=tmp_path, calib_dir=str(samples_dir),
                                 calib_size=16, eval_size=16, precisions=ALL))
    assert not res.failed, res.failed
    checks = {a.precision: a.checks for a in res.manifest.artifacts if "classifier" not in a.path}
    assert checks["fp32"]["max_abs_diff"] <= 1e-4, checks["fp32"]
    assert checks["fp16"]["sqnr_db"] >= 40.0, checks["fp16"]
    for p in ("w8", "w8a8"):
        assert checks[p]["sqnr_db"] >= 25.0, (p, checks[p])
    # Upstream init leaves the modulation blocks inert (LayerScale 1e-4): once the palette search keeps
    # the influential convs int8, the palettized rest barely reaches the logits, and s_conv measured
    # pal6 and pal4 at the same 41.76 dB. So: pal4 no better than pal6, and smaller.
    assert checks["pal6"]["sqnr_db"] >= checks["pal4"]["sqnr_db"] - 0.05, checks
    sizes = {a.precision: a.bytes for a in res.manifest.artifacts if "classifier" not in a.path}
    assert sizes["pal4"] < sizes["pal6"] < sizes["w8"], sizes
    assert max(a.details["ane_check"]["rank5_ops"] for a in res.manifest.artifacts) == 0


def test_a_changed_classifier_package_is_caught(ane_out, tmp_path):
    """Apps ship the classifier package: the manifest records its sha256 and every consumer checks it."""
    import shutil

    from edge.manifest import artifact_problem

    a = _artifact(Manifest.load(ane_out / "manifest.json"), "fp16")
    assert artifact_problem(ane_out, a) is None
    copy = tmp_path / "copy"
    shutil.copytree(ane_out, copy)
    weights = next((copy / a.details["classifier"]["path"]).rglob("weight.bin"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problem = artifact_problem(copy, a)
    assert problem and "classifier package" in problem and "sha256" in problem, problem


def test_float_ops_keep_w8_and_w8a8_weights_float(ane_out, tmp_path, samples_dir):
    """--option coreml_float_ops applied to palettes only: w8 compressed the named conv's weights anyway, and
    w8a8 (GPTQ weights) stored them fp16 but already rounded to int8 levels."""
    fp16 = load_package(ane_out / f"{TINY}_fp16.mlpackage").program.functions["main"].operations
    conv = next(op for op in fp16 if op.op_type == "conv" and op.inputs["weight"].val.size >= 1024)

    def weight(ops, name):
        w = next(o for o in ops if o.name == name).inputs["weight"]
        return ("const" if w.op is None or w.op.op_type == "const" else w.op.op_type), w.val

    out = tmp_path / "out"
    convert(ConvertRequest(targets=["coreml"], model=TINY, output=out, calib_dir=str(samples_dir), calib_size=8,
                           eval_size=2, precisions=["fp16", "w8", "w8a8"],
                           options={**OPTS, "coreml_float_ops": (conv.name,)}))
    ref = load_package(out / f"{TINY}_fp16.mlpackage").program.functions["main"].operations
    _, want = weight(ref, conv.name)
    for precision in ("w8", "w8a8"):
        ops = load_package(out / f"{TINY}_{precision}.mlpackage").program.functions["main"].operations
        kind, got = weight(ops, conv.name)
        assert kind == "const", f"{precision} {conv.name}: its weight is still compressed ({kind})"
        assert np.array_equal(got, want), f"{precision} {conv.name}: float weight differs from fp16's (int8 levels?)"
        others = [o.name for o in ops if o.op_type == "conv" and o.name != conv.name]
        assert any(weight(ops, n)[0].startswith("constexpr") for n in others), f"{precision}: no conv compressed"


def test_the_same_conversion_gives_the_same_package_bytes(tmp_path, samples_dir):
    """coremltools wrote random item UUIDs, hash-ordered metadata and the date: every run changed every sha256.
    Two processes, as two users' runs are (op names depend on what a process exported before)."""
    import subprocess

    import coremltools as ct

    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run([sys.executable, "-m", "edge.cli", "convert", "--target", "coreml", "--precision", "fp16",
                        "--model", TINY, "--calib-dir", str(samples_dir), "--calib-size", "0", "--eval-size", "2",
                        "--output", str(out)], check=True, capture_output=True)
        (a,) = Manifest.load(out / "manifest.json").artifacts
        digests.append((a.sha256, a.details["classifier"]["sha256"]))
    assert digests[0] == digests[1], f"package sha256s differ between two runs of one conversion: {digests}"
    spec = ct.utils.load_spec(str(tmp_path / "b" / f"{TINY}_fp16.mlpackage"))  # still a package coremltools reads
    assert spec.description.metadata.userDefined["variant"] == TINY
    assert "com.github.apple.coremltools.conversion_date" not in spec.description.metadata.userDefined
    package = tmp_path / "b" / f"{TINY}_fp16.mlpackage"
    listed = {"Manifest.json"} | {f"Data/{item['path']}" for item in
                                  json.loads((package / "Manifest.json").read_text())["itemInfoEntries"].values()}
    stray = [p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()
             and not any(p.relative_to(package).as_posix().startswith(x) for x in listed)]
    assert not stray, f"files in the package that its Manifest.json does not list: {stray}"
