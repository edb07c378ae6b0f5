"""TFLite target on the tiny variant: graph shape, per-precision checks, crash isolation."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx2tf", reason="TFLite extra not installed (pip install -e '.[tflite]')")

from converters.to_tflite import _run, _Started, inspect_tflite, litert_logits  # noqa: E402
from edge.checks import sqnr_db  # noqa: E402
from edge.errors import ConversionError  # noqa: E402
from edge.manifest import Manifest  # noqa: E402
from edge.pipeline import ConvertRequest, convert  # noqa: E402

TINY = "efficientmod_test_tiny"


@pytest.fixture(scope="module")
def tflite_out(tmp_path_factory, samples_dir) -> Path:
    out = tmp_path_factory.mktemp("tflite")
    convert(ConvertRequest(targets=["tflite"], model=TINY, output=out, calib_dir=str(samples_dir),
                           calib_size=16, eval_size=12, precisions=["fp32", "fp16", "dynamic", "int8"]))
    return out


def _by(manifest: Manifest, path_part: str):
    (a,) = [a for a in manifest.artifacts if a.path.endswith(path_part)]
    return a


def test_fp32_matches_pytorch(tflite_out):
    """Untrained weights (the shared fixture); the proxy-weight fp32 check is test_relative_output_path."""
    m = Manifest.load(tflite_out / "manifest.json")
    a = _by(m, "_fp32.tflite")
    assert a.checks["max_abs_diff"] <= 1e-4, f"fp32 TFLite logits differ from PyTorch: {a.checks}"
    assert a.checks["top1_agreement"] == 1.0, f"fp32 TFLite top-1 differs from PyTorch: {a.checks}"


def test_fp16_sqnr(tflite_out):
    a = _by(Manifest.load(tflite_out / "manifest.json"), "_fp16.tflite")
    assert a.checks["sqnr_db"] >= 63.0, f"fp16 TFLite SQNR {a.checks['sqnr_db']} dB < 63 dB (measured 66.0)"


def test_int8_io_variant_is_integer(tflite_out):
    m = Manifest.load(tflite_out / "manifest.json")
    io = _by(m, "_int8_io.tflite")
    assert io.input.dtype == "int8" and io.input.quantization["scale"] > 0
    assert io.output.dtype == "int8" and io.output.quantization["scale"] > 0
    fl = _by(m, "_int8.tflite")
    assert fl.input.dtype == "float32"
    # Same calibration, same graph: the int8-I/O file differs only by I/O rounding.
    # measured difference 0.000 dB
    assert abs(io.checks["sqnr_db"] - fl.checks["sqnr_db"]) < 0.1, f"int8-I/O vs int8 SQNR: {io.checks} vs {fl.checks}"
    assert fl.checks["sqnr_db"] >= 24.0, f"int8 logits too far from PyTorch: {fl.checks}"


def test_int8_ops_outside_xnnpack_are_only_the_known_float_types(tflite_out):
    """Every int8 ADD/MUL/CONV stays in the delegate (MSE ranges once pushed ADDs out)."""
    from converters.to_tflite import RUNTIME_FLOAT_OPS

    info = inspect_tflite(tflite_out / f"{TINY}_int8.tflite")
    stray = {op: n for op, n in info["not_delegated"].items() if op not in RUNTIME_FLOAT_OPS}
    assert stray == {}, f"int8 ops outside XNNPACK: {stray}"


def test_layernorm_stat_nodes_find_every_statistics_chain(tflite_out):
    """Each LayerNorm of the int8 graph: its RSQRT, the variance conv, the square and the scaling MUL."""
    from collections import Counter

    from converters.litert_worker import layernorm_stat_nodes, read_graph
    from edge.efficientmod import LayerNorm2d, create_model, to_deploy

    content = (tflite_out / f"{TINY}_int8.tflite").read_bytes()
    g = read_graph(content)
    op_of = {g.names[o["outputs"][0]]: o["op_name"] for o in g.ops if o["outputs"]}
    nodes = layernorm_stat_nodes(content)
    norms = sum(isinstance(m, LayerNorm2d) for m in to_deploy(create_model(TINY), norm_impl="conv").modules())
    assert len(set(nodes)) == len(nodes), f"a tensor found twice: {nodes}"
    kinds = Counter(op_of[n] for n in nodes)
    assert kinds == {"RSQRT": norms, "CONV_2D": norms, "MUL": 2 * norms}, f"{norms} LayerNorms, chains {kinds}"


def test_mse_ranges_beat_min_max(tflite_out, tmp_path, samples_dir):
    """The default MSE-clipped activation ranges give higher logit SQNR than plain min/max."""
    fl = _by(Manifest.load(tflite_out / "manifest.json"), "_int8.tflite")
    ranges = fl.details["activation_ranges"]
    assert ranges["method"] == "mse" and ranges["images"] == 16 and ranges["tensors"] > 50, ranges
    res = convert(ConvertRequest(targets=["tflite"], model=TINY, output=tmp_path, calib_dir=str(samples_dir),
                                 calib_size=16, eval_size=12, precisions=["int8"],
                                 options={"tflite_ranges": "minmax"}))
    mm = _by(res.manifest, "_int8.tflite")
    assert mm.details["activation_ranges"]["method"] == "minmax"
    assert fl.checks["sqnr_db"] > mm.checks["sqnr_db"], (fl.checks["sqnr_db"], mm.checks["sqnr_db"])


def test_graph_is_phone_friendly(tflite_out):
    info = inspect_tflite(tflite_out / f"{TINY}_fp32.tflite")
    ops = info["ops"]
    # 3 depthwise convs per modulation block (7x7 split into 5x5 core + 2 dilated edges), 5 blocks
    assert ops.get("DEPTHWISE_CONV_2D") == 15, ops
    assert "TILE" not in ops and not any(k.startswith("Flex") for k in ops), ops
    assert ops.get("GELU", 0) > 0, "GELU should be one builtin op, not an Erf expansion"
    # transposes only inside the two attention blocks (2 each)
    assert ops.get("TRANSPOSE", 0) <= 4, ops
    assert info["not_delegated"] == {}, f"fp32 ops outside XNNPACK: {info['not_delegated']}"


def test_dynamic_file_runs_entirely_in_xnnpack(tflite_out):
    m = Manifest.load(tflite_out / "manifest.json")
    dyn, fp32 = _by(m, "_dynamic.tflite"), _by(m, "_fp32.tflite")
    info = inspect_tflite(tflite_out / dyn.path)
    assert info["not_delegated"] == {}, f"dynamic-range ops outside XNNPACK: {info['not_delegated']}"
    assert dyn.bytes <= 0.5 * fp32.bytes, f"dynamic file lost its int8 weights: {dyn.bytes} vs fp32 {fp32.bytes}"
    assert dyn.checks["sqnr_db"] >= 38.0, f"dynamic logits too far from PyTorch (measured 40.9 dB): {dyn.checks}"
    assert dyn.details["weight_rounding"]["method"].startswith("GPTQ"), dyn.details["weight_rounding"]


def test_dynamic_depthwise_weights_go_back_to_float(tmp_path):
    """A hybrid (int8-weight) depthwise conv falls out of XNNPACK; the dynamic pass makes it float.

    The tiny variant's depthwise weights are below the converter's 1024-element
    quantization threshold, so this builds a graph whose weights are not.
    """
    tf = pytest.importorskip("tensorflow", reason="TensorFlow (TFLite extra) not installed")
    from converters.to_tflite import worker

    rng = np.random.default_rng(0)

    class DwThenPw(tf.Module):
        def __init__(self):
            super().__init__()
            self.dw = tf.constant(rng.normal(size=(5, 5, 64, 1)).astype(np.float32) / 5)
            self.pw = tf.constant(rng.normal(size=(1, 1, 64, 64)).astype(np.float32) / 8)

        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 64], tf.float32)])
        def __call__(self, x):
            y = tf.nn.depthwise_conv2d(x, self.dw, [1, 1, 1, 1], "SAME")
            return tf.nn.conv2d(y, self.pw, 1, "SAME")

    module = DwThenPw()
    tf.saved_model.save(module, str(tmp_path / "sm"))
    x = rng.normal(size=(2, 16, 16, 64)).astype(np.float32)
    ref = np.concatenate([module(x[i : i + 1]).numpy() for i in range(2)])
    files = {}
    for keep in (False, True):
        files[keep] = tmp_path / f"dyn-{keep}.tflite"
        worker("convert", {"saved_model": str(tmp_path / "sm"), "mode": "dynamic", "out": str(files[keep]),
                           "float_depthwise": keep}, tmp_path)
    before, after = inspect_tflite(files[False], tmp_path), inspect_tflite(files[True], tmp_path)
    assert before["not_delegated"].get("DEPTHWISE_CONV_2D") == 1, f"expected a hybrid depthwise conv: {before}"
    assert after["not_delegated"] == {}, f"ops outside XNNPACK after the pass: {after['not_delegated']}"
    got = litert_logits(files[True], x, tmp_path)
    sqnr = sqnr_db(ref, got.reshape(ref.shape))
    assert sqnr >= 30.0, f"dynamic depthwise+pointwise output SQNR {sqnr:.1f} dB < 30 dB"


def test_histogram_shards_add_up_to_one_pass(tmp_path):
    """The MSE-range histograms split over worker processes equal one pass over all images, count for count."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow (TFLite extra) not installed")
    from converters.to_tflite import histogram_shards, worker

    rng = np.random.default_rng(0)

    class ConvGelu(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.constant(rng.normal(size=(3, 3, 3, 8)).astype(np.float32) / 3)

        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32)])
        def __call__(self, x):
            return tf.nn.gelu(tf.nn.conv2d(x, self.w, 1, "SAME"))

    tf.saved_model.save(ConvGelu(), str(tmp_path / "sm"))
    calib = tmp_path / "calib.npy"
    np.save(calib, rng.normal(size=(7, 16, 16, 3)).astype(np.float32))
    calibrated = tmp_path / "calibrated.tflite"
    worker("convert", {"saved_model": str(tmp_path / "sm"), "mode": "calibrate", "out": str(calibrated),
                       "calib": str(calib)}, tmp_path)
    one = histogram_shards(calibrated, calib, tmp_path, workers=1)
    three = histogram_shards(calibrated, calib, tmp_path, workers=3)
    meta = [json.loads(Path(f + ".json").read_text()) for f in one + three]
    assert meta[0]["images"] == 7 and [m["images"] for m in meta[1:]] == [3, 2, 2], meta
    assert all(m["names"] == meta[0]["names"] for m in meta) and len(meta[0]["names"]) >= 2, meta
    total, parts = np.load(one[0]), sum(np.load(f) for f in three)
    assert total.sum() > 0 and np.array_equal(total, parts), \
        f"sharded histograms differ from one pass in {int((total != parts).sum())} bins"


_DUMP_INT8_WEIGHTS = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1])
out = {}
for d in it.get_tensor_details():
    q = d["quantization_parameters"]
    if d["dtype"] != np.int8 or len(q["scales"]) < 2:
        continue
    v = it.get_tensor(d["index"]).astype(np.float64)
    axis = q["quantized_dimension"]
    scale = q["scales"].reshape([-1 if i == axis else 1 for i in range(v.ndim)])
    out[f"{d['index']}_{axis}"] = v * scale
np.savez(sys.argv[2], **out)
"""


def _int8_weights_torch_layout(model: Path, tmp_path: Path) -> list[np.ndarray]:
    """Dequantized per-channel int8 weights of a .tflite (in a subprocess), in PyTorch's layout."""
    import subprocess

    dump = tmp_path / "weights.npz"
    subprocess.run([sys.executable, "-c", _DUMP_INT8_WEIGHTS, str(model), str(dump)], check=True,
                   capture_output=True, timeout=300)
    out = []
    with np.load(dump) as z:
        for key in z.files:
            w, axis = z[key], int(key.rsplit("_", 1)[1])
            if w.ndim == 4:  # depthwise (1, kh, kw, C) -> (C, 1, kh, kw); conv OHWI -> OIHW
                w = w.transpose(3, 0, 1, 2) if axis == 3 else w.transpose(0, 3, 1, 2)
            out.append(w)
    return out


def _assert_holds_gptq_weights(model: Path, net, rounded, tmp_path: Path) -> int:
    """Every per-channel int8 weight in ``model`` equals a GPTQ-rounded weight; returns how many there are."""
    wanted = {n: p.detach().double().numpy() for n, p in rounded.named_parameters() if n.endswith("weight")}
    original = {n: p.detach().double().numpy() for n, p in net.named_parameters()}
    stored = _int8_weights_torch_layout(model, tmp_path)
    moved = 0
    for w in stored:
        level = np.abs(w.reshape(len(w), -1)).max(1).reshape(-1, *[1] * (w.ndim - 1)) / 127
        err = {n: float(np.abs((w - p) / level).max()) for n, p in wanted.items() if p.shape == w.shape}
        best = min(err, key=err.get)
        assert err[best] < 0.01, f"{model.name}: int8 weights {w.shape} are {err[best]:.3f} levels from {best}'s GPTQ weights"
        moved += float(np.abs((wanted[best] - original[best]) / level).max()) > 0.5
    assert moved > 0, f"{model.name}: GPTQ moved no weight by over half a level, so nearest rounding would pass too"
    return len(stored)


def _check_mixed(mixed, int8) -> None:
    """The int8-mixed record replays to the step it shipped, and that step holds what it claims in float."""
    from converters.to_tflite import MIXED_STEPS, RUNTIME_FLOAT_OPS, MixedStep, search_steps

    d = mixed.details
    tried = d["search"]
    assert tried and MixedStep(tried[0]["layernorm_stats_float"], tried[0]["adds_float"], 0) == MIXED_STEPS[0], tried
    steps = tuple(MixedStep(t["layernorm_stats_float"], t["adds_float"], t["kept_nodes"]) for t in tried)
    recorded = {s: {"top1_agreement": t["calib_agreement"], "sqnr_db": t["calib_sqnr_db"], "bytes": t["bytes"]}
                for s, t in zip(steps, tried)}
    chosen, replay = search_steps(steps, recorded.__getitem__)
    assert len(replay) == len(tried), "the search went on past a step that should have ended it"
    assert (steps[chosen].layernorm_stats, steps[chosen].adds, steps[chosen].kept_nodes) == (
        d["layernorm_stats_float"], d["adds_float"], len(d["kept_float_nodes"])), (d["search"], chosen)
    assert set(RUNTIME_FLOAT_OPS) <= set(d["kept_float_op_types"])
    stats = {r["tensor"] for r in d["sensitivity"] if r["layernorm_stat"]}
    assert stats, "no sensitivity row is marked as a LayerNorm statistics op"
    for r in d["sensitivity"]:  # what keeping it float costs: 3 bytes per weight of a conv, nothing otherwise
        convs = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        assert (r["extra_bytes"] > 0 and r["extra_bytes"] % 3 == 0) if r["op"] in convs else r["extra_bytes"] == 0, r
    for node in d["kept_float_nodes"]:  # each counted op is one the step's other settings left int8
        assert not (d["layernorm_stats_float"] and node["tensor"] in stats), f"{node} was float already"
        assert not (d["adds_float"] and node["op"] == "ADD"), f"{node} was float already"
    assert ("ADD" in d["float_ops"]) == d["adds_float"], (d["float_ops"], d["adds_float"])
    assert not d["not_delegated"], f"int8-mixed ops outside XNNPACK: {d['not_delegated']}"
    assert mixed.checks["sqnr_db"] >= int8.checks["sqnr_db"] - 0.5, (mixed.checks, int8.checks)
    ms = [t["latency_ms"] for t in tried]
    assert all(m > 0 for m in ms) and tried[0]["latency_vs_first_step"] == 1.0, tried
    for t in tried:
        assert abs(t["latency_vs_first_step"] - t["latency_ms"] / ms[0]) < 2e-3, f"step timing inconsistent: {t}"
    assert d["latency_cost_vs_first_step"] == round(tried[chosen]["latency_vs_first_step"] - 1, 3), d


def test_int8_on_weights_whose_blocks_matter(tmp_path, samples_dir, proxy_tiny_checkpoint, monkeypatch):
    """Upstream-init blocks barely reach the logits (LayerScale 1e-4), so the fixture's int8 SQNR
    mostly measures the stems; on a proxy checkpoint every block's int8 error counts. The int8 and
    dynamic files must also hold exactly the GPTQ-rounded weights: the converter re-derives each row's
    scale and rounds, and must land on the same levels."""
    from calibration.folder import scan_folder
    from calibration.gptq import GPTQ_IMAGES, gptq_round
    from calibration.splits import make_split
    from converters.to_tflite import DYNAMIC_MIN_ELEMENTS, FLOAT_NORM, INT8_NORM
    from edge.efficientmod import to_deploy
    from edge.weights import load_model

    import converters.to_tflite as tfl

    quantized, real = [], tfl.start_worker

    def spy(command, args, build_dir, timeout=tfl.WORKER_TIMEOUT_S):
        if command == "quantize":
            quantized.append(json.dumps([args["int8_io"], args["denylist"]], sort_keys=True))
        return real(command, args, build_dir, timeout)

    monkeypatch.setattr(tfl, "start_worker", spy)
    res = convert(ConvertRequest(targets=["tflite"], model=TINY, weights=str(proxy_tiny_checkpoint), output=tmp_path,
                                 calib_dir=str(samples_dir), calib_size=16, eval_size=12,
                                 precisions=["dynamic", "int8", "int8-mixed"]))
    assert not res.manifest.failures, res.manifest.failures
    repeats = {k: n for k, n in collections.Counter(quantized).items() if n > 1}
    assert not repeats, f"the quantizer ran twice on the same arguments (int8-mixed must reuse the int8 file): {repeats}"
    int8, dyn = _by(res.manifest, "_int8.tflite"), _by(res.manifest, "_dynamic.tflite")
    _check_mixed(_by(res.manifest, "_int8_mixed.tflite"), int8)
    mixed = _by(res.manifest, "_int8_mixed.tflite")
    from converters.litert_worker import CONV_OPS, read_graph

    convs = len(read_graph(str(tmp_path / int8.path)).ops_of(CONV_OPS))  # int8-mixed's full-int8 start is this file
    rows = [r for r in mixed.details["sensitivity"] if r["op"] in CONV_OPS]
    assert len(rows) == convs, (f"{len(rows)} of the {convs} int8 convs have a sensitivity row: the quantizer renames "
                                f"some outputs, so they must be paired with the float model's by position")
    # measured: int8 25.43 dB, dynamic 39.06 dB, int8-mixed 32.55 dB
    assert int8.checks["sqnr_db"] >= 23.0, f"int8 on proxy weights: {int8.checks}"
    assert dyn.checks["sqnr_db"] >= 36.0, f"dynamic on proxy weights: {dyn.checks}"
    assert mixed.checks["sqnr_db"] >= 29.5, f"int8-mixed on proxy weights: {mixed.checks}"
    assert mixed.checks["sqnr_db"] >= int8.checks["sqnr_db"] + 4.0, (
        f"int8-mixed gains under 4 dB over int8 (measured +7.1): {mixed.checks} vs {int8.checks}")
    for a in (int8, dyn):
        assert a.details["weight_rounding"]["method"].startswith("GPTQ"), a.details["weight_rounding"]

    images = make_split(scan_folder(samples_dir), 16, 12, 0).calib.nchw()[:GPTQ_IMAGES]
    model = load_model(TINY, proxy_tiny_checkpoint).model
    net = to_deploy(model, 224, norm_impl=INT8_NORM, dw_impl="split")
    rounded, report = gptq_round(net, images)
    n = _assert_holds_gptq_weights(tmp_path / int8.path, net, rounded, tmp_path)
    assert n == sum(p.dim() in (2, 4) and p.shape[0] > 1 for name, p in rounded.named_parameters()
                    if name.endswith("weight")), f"{n} per-channel int8 weights in the int8 file"
    # the float LayerNorm form takes its layers' weights from the one GPTQ run on the int8 form
    assert _assert_holds_gptq_weights(tmp_path / dyn.path, net, rounded, tmp_path) > 0
    float_form = to_deploy(model, 224, norm_impl=FLOAT_NORM, dw_impl="split")
    big = sum(p.numel() >= DYNAMIC_MIN_ELEMENTS for name, p in float_form.named_parameters()
              if name.endswith("weight") and p.dim() in (2, 4))
    assert dyn.details["weight_rounding"]["layers"] == big, (dyn.details["weight_rounding"], big)


def test_dynamic_gptq_levels_swapped_in_equal_a_rounded_conversion(tmp_path, samples_dir, proxy_tiny_checkpoint,
                                                                   monkeypatch, caplog):
    """The dynamic file takes its GPTQ levels and scales into the float files' converted model instead of a
    third onnx2tf run of a GPTQ-rounded copy. The two must give the same file (a version that kept the file's
    scales did not: the patch embeddings' convs are centered in the int8 form only); levels that do not pair
    fall back to that run."""
    import converters.to_tflite as tfl
    from converters.litert_worker import LevelsMismatch, swap_weight_levels
    from tensorflow.lite.tools import flatbuffer_utils as fu

    rounded: list = []  # GPTQ once for both conversions: the comparison is of the two ways to the file only
    real_gptq, real_levels, started = tfl._Builder._gptq_int8, tfl._Builder._dynamic_levels, tfl.SavedModelRun.__init__

    def gptq_once(self):
        if not rounded:
            rounded.append(real_gptq(self))
        self._gptq = rounded[0]
        return rounded[0]

    def dynamic(out: Path, spoil: bool) -> tuple[bytes, list[str], dict]:
        onnx2tf: list[str] = []

        def levels(self):
            pairs = real_levels(self)
            if spoil:  # the first layer's nearest levels no longer match its weights in the file
                pairs["nearest0"] = -pairs["nearest0"]
            np.savez(tmp_path / "pairs.npz", **pairs)
            return pairs

        def spy(self, ctx, build_dir, *a, **k):
            onnx2tf.append(Path(build_dir).name)
            started(self, ctx, build_dir, *a, **k)

        with monkeypatch.context() as m:
            m.setattr(tfl._Builder, "_gptq_int8", gptq_once)
            m.setattr(tfl._Builder, "_dynamic_levels", levels)
            m.setattr(tfl.SavedModelRun, "__init__", spy)
            res = convert(ConvertRequest(targets=["tflite"], model=TINY, weights=str(proxy_tiny_checkpoint),
                                         output=out, calib_dir=str(samples_dir), calib_size=16, eval_size=4,
                                         precisions=["dynamic"]))
        assert not res.manifest.failures, res.manifest.failures
        assert not list(out.glob(".effmod-staging-*"))
        dyn = _by(res.manifest, "_dynamic.tflite")
        return (out / dyn.path).read_bytes(), onnx2tf, dyn.details["weight_levels"]

    swapped, runs, how = dynamic(tmp_path / "swap", spoil=False)
    assert runs == [tfl.FLOAT_NORM], f"onnx2tf runs for a dynamic file: {runs}"
    assert how["method"].startswith("written into") and how["weights"] > 0, how
    with caplog.at_level("WARNING"):
        fallback, runs, how = dynamic(tmp_path / "fallback", spoil=True)
    assert runs == [tfl.FLOAT_NORM, f"{tfl.FLOAT_NORM}-gptq"], f"onnx2tf runs after levels that do not pair: {runs}"
    assert "do not pair with the converted weights" in caplog.text and "pairs with 0 layers" in how["reason"], how
    assert swapped == fallback, "swapping GPTQ levels in gave another file than converting a GPTQ-rounded copy"

    with np.load(tmp_path / "pairs.npz") as z:  # depthwise weights are float again in the file
        kept = [z[f"levels{j}"] for j in range(len(z.files) // 4) if z[f"levels{j}"].shape[1] != 1]

    def pair(layers: list[np.ndarray]) -> int:
        return swap_weight_levels(fu.convert_bytearray_to_object(bytearray(swapped)), layers, layers)

    assert pair(kept) == len(kept) > 0  # the file holds the GPTQ levels, each weight paired with its layer
    with pytest.raises(LevelsMismatch, match="pairs with 0 layers"):
        pair(kept[1:])
    with pytest.raises(LevelsMismatch, match="1 of .* layers have no int8 weight"):
        pair(kept + [np.ones((3, 5), np.int8)])


def test_relative_output_path(tmp_path, samples_dir, monkeypatch, proxy_tiny_checkpoint):
    """README's `--output out`: onnx2tf runs in the build folder, so paths handed to it must not be relative.
    Also the fp32 equality check on proxy weights, whose every block reaches the logits."""
    monkeypatch.chdir(tmp_path)
    res = convert(ConvertRequest(targets=["tflite"], model=TINY, weights=str(proxy_tiny_checkpoint), output=Path("out"),
                                 calib_dir=str(samples_dir), calib_size=4, eval_size=4, precisions=["fp32"]))
    assert not res.manifest.failures, res.manifest.failures
    a = _by(res.manifest, "_fp32.tflite")
    # measured max|d| 8.6e-7, SQNR 129.7 dB
    assert a.checks["max_abs_diff"] <= 5e-6, f"{a.path}: fp32 TFLite logits max|d| vs PyTorch {a.checks}"
    assert a.checks["sqnr_db"] >= 126.0, f"{a.path}: fp32 TFLite logits SQNR vs PyTorch {a.checks}"
    assert (tmp_path / "out" / a.path).is_file()


def test_sidecar_and_labels(tflite_out):
    m = Manifest.load(tflite_out / "manifest.json")
    a = _by(m, "_int8_io.tflite")
    side = json.loads((tflite_out / a.details["sidecar"]).read_text())
    assert side["input"]["quantization"] == a.input.quantization
    assert side["io"] == "int8" and side["precision"] == "int8", "an app tells the int8-I/O file by its io field"
    float_io = json.loads((tflite_out / _by(m, "_int8.tflite").details["sidecar"]).read_text())
    assert float_io["io"] == "float32" and float_io["precision"] == "int8", float_io
    assert side["input"]["normalization"] == a.input.normalization == "app"
    assert side["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    labels = (tflite_out / side["labels"]).read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench"


@pytest.mark.parametrize("suffix", ["_fp32.tflite", "_fp16.tflite", "_dynamic.tflite", "_int8.tflite", "_int8_io.tflite"])
def test_litert_logits_do_not_depend_on_the_thread_count(tflite_out, tmp_path, suffix):
    """The checks run with fewer threads beside busy subprocesses: that must not change one bit of the logits."""
    images = np.random.default_rng(0).standard_normal((6, 224, 224, 3)).astype(np.float32)
    model = tflite_out / f"{TINY}{suffix}"
    one, two = (litert_logits(model, images, tmp_path, threads=t) for t in (1, 2))
    assert np.array_equal(one, two), f"{model.name}: 1 and 2 threads differ by {np.abs(one - two).max():.3g}"


def test_litert_logits_match_manifest_check(tflite_out, samples_dir):
    """Re-running the int8 file (whose error is far from zero) reproduces the manifest's check numbers."""
    from calibration.folder import scan_folder
    from calibration.splits import make_split
    from edge.checks import compare_logits
    from edge.context import torch_logits
    from edge.efficientmod import create_model

    recorded = _by(Manifest.load(tflite_out / "manifest.json"), "_int8.tflite").checks
    split = make_split(scan_folder(samples_dir), 16, 12, 0)
    got = litert_logits(tflite_out / f"{TINY}_int8.tflite", split.eval.nhwc(), tflite_out.parent)
    ref = torch_logits(create_model(TINY), split.eval.nchw())
    metrics = compare_logits(ref, got)
    assert metrics["images"] == recorded["images"] == 12, (metrics, recorded)
    assert metrics["max_abs_diff"] == pytest.approx(recorded["max_abs_diff"], rel=1e-4), (
        f"int8 re-run max|d| {metrics['max_abs_diff']} vs manifest {recorded['max_abs_diff']}")
    # the manifest rounds SQNR to 0.001 dB
    assert metrics["sqnr_db"] == pytest.approx(recorded["sqnr_db"], abs=1.5e-3), (
        f"int8 re-run SQNR {metrics['sqnr_db']} dB vs manifest {recorded['sqnr_db']} dB")


def test_timing_gives_every_model_its_rounds(tflite_out, tmp_path):
    """One worker times several files: each gets rounds x runs samples, filed under its own path."""
    from converters.to_tflite import time_tflite

    fp32, dyn = tflite_out / f"{TINY}_fp32.tflite", tflite_out / f"{TINY}_dynamic.tflite"
    samples = time_tflite([fp32, dyn], tmp_path, threads=1, rounds=3, runs=4, warmup=1)
    assert {m: len(v) for m, v in samples.items()} == {fp32: 12, dyn: 12}, samples
    assert all(x > 0 for v in samples.values() for x in v), samples
    with pytest.raises(ConversionError):
        time_tflite([fp32, tmp_path / "missing.tflite"], tmp_path, rounds=1, runs=1)


def test_failed_step_timing_loses_only_the_record(tmp_path, monkeypatch):
    """The steps' files already ran for their checks: a timing crash must not fail int8-mixed."""
    import types

    import converters.to_tflite as to_tflite

    def crash(*args, **kwargs):
        raise ConversionError("LiteRT bench failed (killed by SIGABRT)")

    monkeypatch.setattr(to_tflite, "time_tflite", crash)
    tried = [{"kept_nodes": 0}, {"kept_nodes": 4}]
    record = to_tflite._search_latency(types.SimpleNamespace(build=tmp_path), [tmp_path / "a", tmp_path / "b"], tried)
    assert "SIGABRT" in record["error"] and all("latency_ms" not in t for t in tried), (record, tried)


def test_corrupt_model_fails_in_subprocess(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3" + bytes(range(256)) * 4)
    with pytest.raises(ConversionError, match="LiteRT run failed"):
        litert_logits(bad, np.zeros((1, 224, 224, 3), np.float32), tmp_path)


def test_subprocess_error_names_the_cause_not_log_noise(tmp_path):
    """TensorFlow logs (glog I/W lines, colour codes) must not hide the failing step's own message."""
    script = ("import sys; print('\\x1b[31mERROR:\\x1b[0m input file does not exist'); "
              "print('I0000 00:00:1 cudart_stub.cc:31] Could not find cuda drivers', file=sys.stderr); sys.exit(1)")
    with pytest.raises(ConversionError) as err:
        _run([sys.executable, "-c", script], tmp_path, "onnx2tf")
    assert str(err.value) == "onnx2tf failed (exit code 1): ERROR: input file does not exist"


def test_aborting_runtime_is_reported_not_fatal(tmp_path):
    with pytest.raises(ConversionError, match="SIGABRT"):
        _run([sys.executable, "-c", "import os; os.abort()"], tmp_path, "LiteRT run")


def test_background_run_can_be_stopped_and_times_out(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    run = _Started(sleeper, tmp_path, "onnx2tf")
    run.kill()
    assert run.proc.returncode is not None and run.proc.returncode < 0, run.proc.returncode
    slow = _Started(sleeper, tmp_path, "onnx2tf", timeout=1)
    with pytest.raises(ConversionError, match="onnx2tf timed out after 1s"):
        slow.wait()
    assert slow.proc.returncode is not None, "a timed-out run must not be left running"


def test_torch_gets_the_cores_the_running_subprocesses_leave(tmp_path, monkeypatch):
    from converters import to_tflite

    from edge.threads import torch_threads

    monkeypatch.setattr(to_tflite.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    with torch_threads(3):
        assert to_tflite.cores_beside_runs() == 3, "no run started: every core"
        runs = [_Started([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, "onnx2tf") for _ in range(3)]
        try:
            assert to_tflite.cores_beside_runs() == 1, "three runs on three cores: still one thread, not zero"
            runs[0].kill()
            runs[1].kill()
            assert to_tflite.cores_beside_runs() == 2, "one run left on three cores"
        finally:
            for run in runs:
                run.kill()
    with torch_threads(2):
        assert to_tflite.cores_beside_runs() == 2, "never more threads than torch had (OMP_NUM_THREADS, the caller's)"


@pytest.mark.parametrize("script, reused", [
    ("pass", True),
    ("import sys; sys.exit('the quantizer refused the model')", True),  # the same arguments fail the same way
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", False),  # e.g. out of memory beside another run
], ids=["succeeded", "refused", "killed-by-signal"])
def test_a_quantizer_run_is_reused_only_where_it_would_end_the_same(tmp_path, script, reused):
    from converters.to_tflite import _Quantizing

    out = tmp_path / "q.tflite"
    out.write_bytes(b"q")
    run = _Quantizing(out, _Started([sys.executable, "-c", script], tmp_path, "LiteRT quantize"))
    try:
        run.wait()
    except ConversionError:
        pass
    assert run.reusable() == reused, f"{script}: reusable() is {run.reusable()}"
    if reused:  # a copy handle gives the earlier run's file, or raises its error again
        copy = _Quantizing(tmp_path / "copy.tflite", None, run)
        if run._error is None:
            assert copy.wait().read_bytes() == b"q", "the copy must hold the earlier run's file"
        else:
            with pytest.raises(ConversionError, match="refused the model"):
                copy.wait()
    pending = _Quantizing(out, _Started([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, "q"))
    assert pending.reusable(), "a run still going is reused (waited for)"
    pending.kill()
    assert not pending.reusable(), "a run we killed must not be reused"


def _is_calibration(cmd: list[str], what: str) -> bool:
    return what == "LiteRT convert" and json.loads(Path(cmd[-1]).read_text())["mode"] == "calibrate"


@pytest.mark.parametrize("broken, message", [
    ("dynamic", "LiteRT convert failed (killed by SIGABRT)"),
    ("int8", "LiteRT convert failed (killed by SIGABRT)"),
    ("histograms", "LiteRT histograms failed (killed by SIGABRT)"),
])
def test_failing_precision_spares_the_others(tmp_path, samples_dir, monkeypatch, proxy_tiny_checkpoint, broken, message):
    """A step aborts (the dynamic file's conversion, int8 calibration, or the histogram pass after it):
    only its precision fails, and a step int8 and int8-mixed share is not run a second time."""
    import os

    import converters.to_tflite as tfl

    real = tfl._Started
    aborted = []

    def abort(cmd, cwd, what, timeout=tfl.WORKER_TIMEOUT_S):
        if broken == "dynamic":
            hit = what == "LiteRT convert" and json.loads(Path(cmd[-1]).read_text())["mode"] == "dynamic"
        else:
            hit = _is_calibration(cmd, what) if broken == "int8" else what == "LiteRT histograms"
        if hit:
            cmd = [sys.executable, "-c", "import os; os.abort()"]
            aborted.append(what)
        return real(cmd, cwd, what, timeout)

    monkeypatch.setattr(tfl, "_Started", abort)
    failing = ["int8", "int8-mixed"] if broken != "dynamic" else ["dynamic"]  # both int8s need the one calibration
    result = convert(ConvertRequest(targets=["tflite"], model=TINY, weights=str(proxy_tiny_checkpoint), output=tmp_path,
                                    calib_dir=str(samples_dir), calib_size=4, eval_size=4, precisions=["fp32", *failing]))
    assert [f.precision for f in result.manifest.failures] == failing
    once = min(tfl.HISTOGRAM_WORKERS, os.cpu_count() or 1) if broken == "histograms" else 1  # one pass: its workers
    assert len(aborted) == once, f"the failed step was started {len(aborted)} times, not {once}: {aborted}"
    assert message in result.manifest.failures[0].error, result.manifest.failures[0].error
    assert [a.precision for a in result.manifest.artifacts] == ["fp32"]
    fp32 = result.manifest.artifacts[0].checks  # proxy weights; measured max|d| 8.6e-7, SQNR 129.7 dB
    assert fp32["max_abs_diff"] <= 5e-6 and fp32["sqnr_db"] >= 126.0, f"surviving fp32 file vs PyTorch: {fp32}"
    assert not list(tmp_path.glob(".effmod-staging-*"))


def test_a_failed_int8_io_file_spares_the_float_io_int8_file(tmp_path, samples_dir, monkeypatch, proxy_tiny_checkpoint):
    import converters.to_tflite as tfl

    real = tfl.start_worker

    def no_int8_io(command, args, build_dir, timeout=tfl.WORKER_TIMEOUT_S):
        if command == "quantize" and args["int8_io"]:  # fails while the float-I/O file is quantized beside it
            return tfl._Started([sys.executable, "-c", "import sys, time; time.sleep(1); "
                                 "sys.exit('fully_quantize refused the model')"], build_dir, "LiteRT quantize")
        return real(command, args, build_dir, timeout)

    monkeypatch.setattr(tfl, "start_worker", no_int8_io)
    result = convert(ConvertRequest(targets=["tflite"], model=TINY, weights=str(proxy_tiny_checkpoint), output=tmp_path,
                                    calib_dir=str(samples_dir), calib_size=4, eval_size=4, precisions=["int8"]))
    (int8,) = result.manifest.artifacts
    assert int8.path == f"{TINY}_int8.tflite" and int8.checks["sqnr_db"] > 15, f"the float-I/O int8 file: {int8}"
    (failed,) = result.manifest.failures
    assert (failed.precision, failed.path) == ("int8", f"{TINY}_int8_io.tflite"), failed
    assert "fully_quantize refused" in failed.error, failed.error
    assert int8.details["activation_ranges"], "the int8 record lost its activation ranges"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientmod_xxs", "efficientmod_xs", "efficientmod_s", "efficientmod_s_conv"])
def test_all_precisions_all_variants(tmp_path, samples_dir, variant):
    result = convert(ConvertRequest(targets=["tflite"], model=variant, output=tmp_path, calib_dir=str(samples_dir),
                                    calib_size=64, eval_size=32))
    assert not result.manifest.failures, result.manifest.failures
    by_precision = {a.precision: a for a in result.manifest.artifacts}
    assert set(by_precision) == {"fp32", "fp16", "dynamic", "int8", "int8-mixed"}
    checks = {p: a.checks for p, a in by_precision.items()}
    assert checks["fp32"]["max_abs_diff"] <= 1e-4, f"{variant} fp32: {checks['fp32']}"
    assert checks["fp16"]["sqnr_db"] >= 50.0, f"{variant} fp16: {checks['fp16']}"
    assert checks["dynamic"]["sqnr_db"] >= 36.0, f"{variant} dynamic: {checks['dynamic']}"
    assert checks["int8-mixed"]["sqnr_db"] >= 30.0, f"{variant} int8-mixed: {checks['int8-mixed']}"
    int8 = [a for a in result.manifest.artifacts if a.precision == "int8"]  # float-I/O and int8-I/O files
    for a in int8:
        assert a.checks["sqnr_db"] >= 22.0, f"{variant} {a.path}: {a.checks}"
    fp32_bytes = by_precision["fp32"].bytes
    assert all(a.bytes <= 0.30 * fp32_bytes for a in int8), "int8 file must be <= 30 % of fp32"


def test_inspect_cli_names_float_and_undelegated_ops(tflite_out):
    from click.testing import CliRunner

    from edge.cli import main

    fp32 = CliRunner().invoke(main, ["inspect", str(tflite_out / f"{TINY}_fp32.tflite")]).output
    assert "DEPTHWISE_CONV_2D 15" in fp32 and "not delegated: none" in fp32
    int8 = CliRunner().invoke(main, ["inspect", str(tflite_out / f"{TINY}_int8_io.tflite")]).output
    assert "float ops:     none" in int8, int8
    undelegated = next(l for l in int8.splitlines() if "not delegated" in l)
    assert "GELU" in undelegated and "RSQRT" in undelegated, "XNNPACK coverage of int8 changed: update BENCHMARKS.md"


def _metrics(sqnr: float, agreement: float = 0.9) -> dict:
    return {"top1_agreement": agreement, "sqnr_db": sqnr, "bytes": 1}


def _walk(sqnrs: list[float], agreements: list[float] | None = None, priority: str = "accuracy"):
    from converters.to_tflite import MIXED_STEPS, search_steps

    agreements = agreements or [0.9] * len(sqnrs)
    table = dict(zip(MIXED_STEPS, (_metrics(s, a) for s, a in zip(sqnrs, agreements))))
    return search_steps(MIXED_STEPS[: len(sqnrs)], table.__getitem__, priority)


def test_speed_priority_ships_the_fastest_step_meeting_the_sqnr_bar():
    """Proxy xxs's recorded steps (29.0 / 29.7 / 32.9 dB): accuracy takes the float ADDs, speed the first step."""
    sqnrs, agreements = [29.0, 29.7, 32.9, 32.8], [0.953, 0.984, 0.922, 0.953]
    assert _walk(sqnrs, agreements)[0] == 2
    chosen, tried = _walk(sqnrs, agreements, "speed")
    assert chosen == 0 and len(tried) == 1 and "priority speed" in tried[0]["ended_search"], tried
    chosen, tried = _walk([20.0, 24.0, 26.0, 40.0], priority="speed")
    assert chosen == 2 and len(tried) == 3, f"steps under the 25 dB bar must be passed over: {tried}"


def test_mixed_search_stops_at_the_first_step_that_meets_the_target():
    chosen, tried = _walk([20.0, 24.0, 30.0, 40.0], [0.9, 0.95, 0.99, 1.0])
    assert chosen == 2 and len(tried) == 3 and tried[-1]["meets_target"], tried


def test_mixed_search_asks_calibration_images_for_a_margin_over_the_sqnr_bar():
    """Distilled s_conv: 25.6 dB / 99.0 % on calibration, 25.4 dB on held-out photos; the bar is 25 dB."""
    chosen, tried = _walk([25.6, 28.4, 29.0], [0.99, 0.995, 0.995])
    assert chosen == 1 and not tried[0]["meets_target"] and tried[1]["meets_target"], tried
    chosen, tried = _walk([25.6, 28.4], priority="speed")
    assert chosen == 1 and "1.0 dB to spare" in tried[-1]["ended_search"], tried
    chosen, tried = _walk([np.float64(25.6), np.float64(28.4)], [np.float64(0.99)] * 2)  # as compare_logits gives
    assert [type(t["meets_target"]) for t in tried] == [bool, bool], "a NumPy bool in the record fails the manifest"


def test_mixed_search_keeps_a_slower_step_only_for_a_real_gain():
    chosen, tried = _walk([28.0, 28.4, 32.0, 32.1, 32.2, 32.3])
    assert chosen == 2, f"+0.4 dB must not buy float LayerNorm stats, +4 dB must buy float ADDs: {tried}"
    chosen, _ = _walk([19.5, 24.0, 28.4, 29.2, 29.25])
    assert chosen == 3, "+0.8 dB (distilled s, 4 convs kept float) must buy the step"
    assert len(tried) == 4 and "ended_search" in tried[-1], "a kept-nodes step gaining 0.1 dB ends the search"


def test_kept_convs_steps_stop_where_the_size_budget_does():
    from converters.to_tflite import MIXED_STEPS, mixed_steps

    asked: list = []

    def available(step):
        asked.append(step)
        return 6

    walk = mixed_steps(available)
    first = [next(walk) for _ in range(3)]
    assert first == list(MIXED_STEPS[:3]) and not asked, "the ranking must not be asked for before the kept steps"
    assert [s.kept_nodes for s in walk] == [4, 6], "8 and 16 asked, 6 in budget: one step of 6, no duplicate"
    assert [s.kept_nodes for s in mixed_steps(lambda s: 0)] == [0, 0, 0], "no candidate: no kept-convs step"


def test_size_budget_takes_what_still_fits_in_ranked_order():
    from converters.to_tflite import _within

    rows = [{"tensor": t, "extra_bytes": n} for t, n in (("a", 100), ("head", 900), ("b", 50), ("c", 60), ("d", 20))]
    assert [r["tensor"] for r in _within(rows, 220)] == ["a", "b", "c"], "a conv too big is passed over, not an end"
    assert _within(rows, -5) == [], "a file already over the budget keeps no conv float"
    free = [{"tensor": "mul", "extra_bytes": 0}, {"tensor": "gelu"}]  # no weights: keeping them float costs nothing
    assert [r["tensor"] for r in _within(rows + free, -5)] == ["mul", "gelu"], "a free op was left out"


def test_budget_goes_to_the_wide_conv_when_it_carries_more_noise_than_the_small_ones():
    from converters.to_tflite import fill_budget

    def rows(head_share):  # distilled s, rounded: small convs first per byte, the head 0.9 MB
        return [{"tensor": "fc2_0", "noise_share": 0.02, "extra_bytes": 3_000},
                {"tensor": "stem", "noise_share": 0.03, "extra_bytes": 14_000},
                {"tensor": "fc2_25", "noise_share": 0.12, "extra_bytes": 292_000},
                {"tensor": "head", "noise_share": head_share, "extra_bytes": 936_000},
                {"tensor": "fc2_23", "noise_share": 0.05, "extra_bytes": 292_000}]

    kept, order = fill_budget(rows(0.28), 1_146_000)
    assert order == "noise" and [r["tensor"] for r in kept] == ["head", "stem", "fc2_0"], (order, kept)
    kept, order = fill_budget(rows(0.10), 1_146_000)
    assert order == "noise per extra byte" and "head" not in [r["tensor"] for r in kept], (order, kept)
    small = [{"tensor": f"c{i}", "noise_share": 0.01, "extra_bytes": 1_000} for i in range(40)]
    kept, order = fill_budget(small + [{"tensor": "head", "noise_share": 0.25, "extra_bytes": 900_000}], 1_000_000)
    assert order == "noise", "both fills hold everything, but the steps take 16: the head must be among them"


def test_mixed_search_goes_on_while_sensitive_ops_pay():
    chosen, tried = _walk([20.0, 20.1, 20.2, 21.0, 22.5, 22.6])
    assert len(tried) == 6 and chosen == 4, tried


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc (Linux)")
def test_sigterm_during_convert_leaves_no_staging_and_no_workers(tmp_path, samples_dir):
    """SIGTERM while onnx2tf runs in the background: exit 143, staging folder gone, no worker left running."""
    import subprocess
    import time

    out = tmp_path / "out"
    cli = subprocess.Popen([sys.executable, "-m", "edge.cli", "convert", "--target", "tflite", "--model", TINY,
                            "--calib-dir", str(samples_dir), "--calib-size", "4", "--eval-size", "4",
                            "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not [p for p in _processes_mentioning(str(out)) if p != cli.pid] and time.monotonic() < deadline:
        assert cli.poll() is None, f"convert ended before any worker started: {cli.stderr.read()}"
        time.sleep(0.2)
    assert [p for p in _processes_mentioning(str(out)) if p != cli.pid], "no onnx2tf/LiteRT worker seen in 120 s"
    cli.terminate()
    assert cli.wait(timeout=60) == 143, cli.stderr.read()
    time.sleep(0.5)
    assert not _processes_mentioning(str(out)), "worker processes outlived convert"
    assert not out.exists() or not list(out.glob(".effmod-staging-*")), list(out.iterdir())


def _alive(pid: int) -> bool:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_kill_stops_what_the_run_started(tmp_path):
    """A run's own children die with it (onnx2tf used to start onnxsim, which outlived a kill of onnx2tf alone)."""
    import time

    child = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    run = _Started([sys.executable, "-c", script], tmp_path, "onnx2tf")
    deadline = time.monotonic() + 30
    while not (child.exists() and child.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(child.read_text())
    run.kill()
    time.sleep(0.3)
    assert not _alive(grandchild), "the run's own child outlived kill()"


def test_an_interrupted_wait_kills_the_run(tmp_path, monkeypatch):
    run = _Started([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, "LiteRT run")

    def interrupted(timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(run.proc, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.wait()
    monkeypatch.undo()
    assert run.proc.wait(timeout=10) < 0, "the worker went on after its wait was interrupted"


def test_a_worker_dies_with_the_converting_process(tmp_path):
    """The OOM killer's SIGKILL gives convert no chance to clean up: its workers must not run on."""
    import os
    import signal
    import subprocess
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from converters.to_tflite import _Started, _DIE_WITH_PARENT; "
        "r = _Started([sys.executable, '-c', _DIE_WITH_PARENT + 'import time; time.sleep(60)'], Path('.'), 'w'); "
        "print(r.proc.pid, flush=True); time.sleep(60)")], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    time.sleep(1.0)  # the worker has set its parent-death signal
    assert _alive(worker_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid), "the worker outlived the SIGKILLed convert"


@pytest.mark.parametrize("script, message", [
    ("import sys; sys.stderr.buffer.write(bytes(range(128, 256))); sys.exit(3)", "LiteRT run failed (exit code 3): \ufffd"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "LiteRT run failed (killed by SIGKILL, out of memory?)"),
])
def test_a_failed_run_is_one_conversion_error_whatever_it_printed(tmp_path, script, message):
    with pytest.raises(ConversionError) as err:
        _run([sys.executable, "-c", script], tmp_path, "LiteRT run")
    assert str(err.value).startswith(message) and not str(err.value).endswith(": "), str(err.value)


def test_a_mixed_step_counts_only_ops_its_other_settings_left_int8():
    """The ranking held LayerNorm statistics and ADDs that a step kept float already: step 64 added 47 ops."""
    from converters.to_tflite import MixedStep, mixed_candidates

    ranked = [{"tensor": "ln", "op": "MUL", "layernorm_stat": True}, {"tensor": "res", "op": "ADD"},
              {"tensor": "c1", "op": "CONV_2D"}, {"tensor": "c2", "op": "DEPTHWISE_CONV_2D"}]
    names = lambda step: [r["tensor"] for r in mixed_candidates(ranked, step)]  # noqa: E731
    assert names(MixedStep(False, False, 4)) == ["ln", "res", "c1", "c2"]
    assert names(MixedStep(True, False, 4)) == ["res", "c1", "c2"]
    assert names(MixedStep(True, True, 4)) == ["c1", "c2"]
    ranked[2]["extra_bytes"], ranked[3]["extra_bytes"] = 3000, 300  # the fallback keeps to the size budget
    assert [r["tensor"] for r in mixed_candidates(ranked, MixedStep(True, True, 4), budget=1000)] == ["c2"]
    assert [r["tensor"] for r in mixed_candidates(ranked, MixedStep(True, True, 4), budget=3300)] == ["c1", "c2"]
