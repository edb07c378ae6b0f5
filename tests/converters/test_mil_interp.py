"""NumPy MIL interpreter: each kernel against PyTorch (or coremltools' own decompression)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools", reason="Core ML extra not installed (pip install -e '.[coreml]')")

from coremltools.converters.mil import Builder as mb  # noqa: E402

from converters.mil_interp import (  # noqa: E402
    Interpreter,
    OutputMismatchError,
    UnsupportedOpError,
    cast_float,
    observe_tensors,
    precision_histogram,
    unpack_bits,
)

RNG = np.random.default_rng(0)
IOS17 = ct.target.iOS17


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _run(prog, **feeds) -> np.ndarray:
    out = Interpreter(prog).run(feeds)
    return next(iter(out.values()))


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _close(name: str, got, ref, tol: float) -> None:
    """max |got - ref| <= tol, naming the output that differed."""
    diff = _maxdiff(got, ref)
    assert diff <= tol, f"{name}: interpreter output differs from the reference by max|d| {diff:.3g} > {tol:g}"


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,dil,groups",
    [
        (3, 8, 7, 4, 3, 1, 1),  # stem: 7x7 stride 4
        (8, 16, 3, 2, 1, 1, 1),  # downsample
        (8, 8, 7, 1, 3, 1, 8),  # depthwise 7x7
        (8, 8, 3, 1, 3, 3, 8),  # dilated depthwise
        (8, 12, 1, 1, 0, 1, 1),  # 1x1
        (8, 12, 3, 1, 1, 1, 4),  # grouped
    ],
)
def test_conv_matches_torch(cin, cout, k, stride, pad, dil, groups):
    x, w, b = _randn(2, cin, 20, 20), _randn(cout, cin // groups, k, k), _randn(cout)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return mb.conv(x=x_in, weight=w, bias=b, strides=[stride] * 2, pad_type="custom", pad=[pad] * 4,
                       dilations=[dil] * 2, groups=groups)

    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride, pad, dil, groups)
    got = _run(prog, x_in=x)
    assert got.shape == tuple(ref.shape), f"conv output shape {got.shape}, torch {tuple(ref.shape)}"
    _close("conv", got, ref, 1e-4)


def test_conv_same_padding_matches_torch():
    x, w = _randn(1, 4, 9, 9), _randn(6, 4, 3, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return mb.conv(x=x_in, weight=w, strides=[1, 1], pad_type="same")

    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding="same")
    _close("conv (same padding)", _run(prog, x_in=x), ref, 1e-4)


def test_linear_and_matmul_match_torch():
    x, w, b = _randn(3, 16), _randn(10, 16), _randn(10)
    a, c = _randn(2, 4, 7, 5), _randn(2, 4, 6, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=a.shape), mb.TensorSpec(shape=c.shape)],
                opset_version=IOS17)
    def prog(x_in, a_in, c_in):
        return (
            mb.linear(x=x_in, weight=w, bias=b),
            mb.matmul(x=a_in, y=c_in, transpose_y=True),
            mb.matmul(x=c_in, y=a_in, transpose_y=True),
        )

    lin, mm1, mm2 = Interpreter(prog).run({"x_in": x, "a_in": a, "c_in": c}).values()
    _close("linear", lin, F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)), 1e-5)
    _close("matmul a @ c^T", mm1, torch.from_numpy(a) @ torch.from_numpy(c).transpose(-1, -2), 1e-5)
    _close("matmul c @ a^T", mm2, torch.from_numpy(c) @ torch.from_numpy(a).transpose(-1, -2), 1e-5)


def test_einsum_ane_attention_equations_match_torch():
    q, k = _randn(1, 8, 1, 12), _randn(1, 12, 1, 8)

    @mb.program(input_specs=[mb.TensorSpec(shape=q.shape), mb.TensorSpec(shape=k.shape)], opset_version=IOS17)
    def prog(q_in, k_in):
        return mb.einsum(values=(q_in, k_in), equation="nchw,nwhu->nchu")

    ref = torch.einsum("nchw,nwhu->nchu", torch.from_numpy(q), torch.from_numpy(k))
    _close("einsum nchw,nwhu->nchu", _run(prog, q_in=q, k_in=k), ref, 1e-5)


def test_layer_norm_gelu_softmax_match_torch():
    x = _randn(2, 6, 5, 5)
    g, b = _randn(6), _randn(6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return (
            mb.layer_norm(x=x_in, axes=[1], gamma=g, beta=b, epsilon=1e-5),
            mb.gelu(x=x_in, mode="EXACT"),
            mb.gelu(x=x_in, mode="TANH_APPROXIMATION"),
            mb.softmax(x=x_in, axis=1),
            mb.softmax(x=x_in, axis=-1),
        )

    ln, ge, gt, s1, s2 = Interpreter(prog).run({"x_in": x}).values()
    t = torch.from_numpy(x)
    ln_ref = F.layer_norm(t.permute(0, 2, 3, 1), (6,), torch.from_numpy(g), torch.from_numpy(b)).permute(0, 3, 1, 2)
    _close("layer_norm", ln, ln_ref, 1e-5)
    _close("gelu", ge, F.gelu(t), 1e-6)
    _close("gelu (tanh)", gt, F.gelu(t, approximate="tanh"), 1e-6)
    _close("softmax axis 1", s1, torch.softmax(t, 1), 1e-6)
    _close("softmax axis -1", s2, torch.softmax(t, -1), 1e-6)


def test_batch_norm_matches_torch():
    """coremltools fuses a per-channel mul + add (LayerNorm affine of a real checkpoint) into batch_norm."""
    x = _randn(2, 6, 5, 5)
    mean, var, g, b = _randn(6), np.abs(_randn(6)) + 0.1, _randn(6), _randn(6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return (mb.batch_norm(x=x_in, mean=mean, variance=var, gamma=g, beta=b, epsilon=1e-3),
                mb.batch_norm(x=x_in, mean=mean, variance=var))

    full, bare = Interpreter(prog).run({"x_in": x}).values()
    t, tm, tv = torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var)
    ref = F.batch_norm(t, tm, tv, torch.from_numpy(g), torch.from_numpy(b), training=False, eps=1e-3)
    _close("batch_norm", full, ref, 1e-5)
    _close("batch_norm (no affine)", bare, F.batch_norm(t, tm, tv, training=False, eps=1e-5), 1e-5)


def test_elementwise_and_reductions_match_torch():
    x, y = _randn(2, 3, 4, 4), np.abs(_randn(1, 3, 1, 1)) + 0.5

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        sq = mb.mul(x=x_in, y=x_in)
        return (
            mb.add(x=x_in, y=y), mb.sub(x=x_in, y=y), mb.mul(x=x_in, y=y), mb.real_div(x=x_in, y=y),
            mb.reduce_mean(x=x_in, axes=[2, 3], keep_dims=False), mb.rsqrt(x=sq, epsilon=1e-6),
            mb.sqrt(x=sq),
        )

    add, sub, mul, div, mean, rs, sq = Interpreter(prog).run({"x_in": x}).values()
    t, u = torch.from_numpy(x), torch.from_numpy(y)
    _close("add", add, t + u, 1e-6)
    _close("sub", sub, t - u, 1e-6)
    _close("mul", mul, t * u, 1e-6)
    _close("real_div", div, t / u, 1e-6)
    _close("reduce_mean", mean, t.mean(dim=(2, 3)), 1e-6)
    rs_ref = torch.rsqrt(t * t + 1e-6)
    rel = _maxdiff(rs, rs_ref) / float(rs_ref.max())
    assert rel < 1e-6, f"rsqrt: interpreter output differs by {rel:.3g} of its largest value (> 1e-6)"
    _close("sqrt", sq, torch.abs(t), 1e-6)



def test_remaining_elementwise_kernels_match_torch():
    """The kernels the EfficientMod programs do not use today but the interpreter offers, each against torch."""
    x, y = _randn(2, 3, 5), np.abs(_randn(1, 3, 1)) + 0.5

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return (
            mb.clip(x=x_in, alpha=-0.5, beta=0.7), mb.erf(x=x_in), mb.exp(x=x_in), mb.relu(x=x_in),
            mb.sigmoid(x=x_in), mb.tanh(x=x_in), mb.identity(x=x_in), mb.maximum(x=x_in, y=y),
            mb.minimum(x=x_in, y=y), mb.pow(x=mb.exp(x=x_in), y=y), mb.floor_div(x=x_in, y=y),
            mb.reduce_max(x=x_in, axes=[1], keep_dims=True), mb.reduce_min(x=x_in, axes=[-1], keep_dims=False),
            mb.expand_dims(x=x_in, axes=[-2, 0]),
        )

    t, u = torch.from_numpy(x), torch.from_numpy(y)
    want = {
        "clip": t.clamp(-0.5, 0.7), "erf": torch.erf(t), "exp": torch.exp(t), "relu": torch.relu(t),
        "sigmoid": torch.sigmoid(t), "tanh": torch.tanh(t), "identity": t, "maximum": torch.maximum(t, u),
        "minimum": torch.minimum(t, u), "pow": torch.exp(t) ** u, "floor_div": torch.floor(t / u),
        "reduce_max": t.amax(dim=1, keepdim=True), "reduce_min": t.amin(dim=-1),
        "expand_dims": t.unsqueeze(-2).unsqueeze(0),
    }
    outs = list(Interpreter(prog).run({"x_in": x}).values())
    assert len(outs) == len(want), f"{len(outs)} outputs for {len(want)} ops"
    for (name, ref), got in zip(want.items(), outs):
        assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {got.shape}, torch {tuple(ref.shape)}"
        _close(name, got, ref, 2e-6 * max(1.0, float(ref.abs().max())))

def test_layout_ops_match_torch():
    x = _randn(1, 12, 2, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        a, b, c = mb.split(x=x_in, split_sizes=[4, 4, 4], axis=1)
        return (
            mb.reshape(x=x_in, shape=[1, 12, 1, 10]),
            mb.transpose(x=x_in, perm=[0, 3, 2, 1]),
            mb.tile(x=x_in, reps=[1, 2, 1, 1]),
            mb.concat(values=(c, a, b), axis=1),
            mb.squeeze(x=mb.reshape(x=x_in, shape=[1, 120, 1, 1]), axes=[2, 3]),
            mb.cast(x=x_in, dtype="int32"),
        )

    r, tr, ti, ca, sq, cs = Interpreter(prog).run({"x_in": x}).values()
    t = torch.from_numpy(x)
    _close("reshape", r, t.reshape(1, 12, 1, 10), 0.0)
    _close("transpose", tr, t.permute(0, 3, 2, 1), 0.0)
    _close("tile", ti, t.repeat(1, 2, 1, 1), 0.0)
    a, b, c = torch.split(t, 4, dim=1)
    _close("concat", ca, torch.cat([c, a, b], 1), 0.0)
    assert sq.shape == (1, 120), sq.shape
    _close("squeeze", sq, t.reshape(1, 120), 0.0)
    assert cs.dtype == np.int32, cs.dtype
    _close("cast int32", cs, t.to(torch.int32), 0.0)


def test_quantize_dequantize_match_torch():
    x = _randn(1, 4, 6, 6) * 3
    scale, zp = 0.05, 3

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        q = mb.quantize(input=x_in, scale=np.float32(scale), zero_point=np.int8(zp), output_dtype="int8")
        return q, mb.dequantize(input=q, scale=np.float32(scale), zero_point=np.int8(zp))

    q, dq = Interpreter(prog).run({"x_in": x}).values()
    tq = torch.clamp(torch.round(torch.from_numpy(x) / scale) + zp, -128, 127)  # round half to even
    assert q.dtype == np.int8
    assert int(np.abs(q.astype(np.int32) - tq.numpy().astype(np.int32)).max()) == 0
    _close("dequantize", dq, (tq - zp) * scale, 1e-6)


def test_constexpr_weight_decompression_matches_coremltools():
    from coremltools.optimize import _utils as opt_utils

    q = RNG.integers(-127, 128, size=(6, 4, 1, 1)).astype(np.int8)
    scale = (RNG.random(6) * 0.1 + 0.01).astype(np.float32)
    zp = np.zeros(6, np.int8)
    lut = np.sort(_randn(16))
    idx = RNG.integers(0, 16, size=6 * 4).astype(np.uint8)
    packed = opt_utils.pack_elements_into_bits(idx, 4)
    x = _randn(1, 4, 3, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        w1 = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0)
        w2 = mb.constexpr_lut_to_dense(lut=lut, indices=packed, shape=np.uint32([6, 4, 1, 1]))
        return mb.conv(x=x_in, weight=w1), mb.conv(x=x_in, weight=w2)

    y1, y2 = Interpreter(prog).run({"x_in": x}).values()
    w1 = q.astype(np.float32) * scale[:, None, None, None]
    w2 = lut[idx].reshape(6, 4, 1, 1)
    _close("conv (constexpr_affine_dequantize weight)", y1, F.conv2d(torch.from_numpy(x), torch.from_numpy(w1)), 1e-5)
    _close("conv (constexpr_lut_to_dense weight)", y2, F.conv2d(torch.from_numpy(x), torch.from_numpy(w2)), 1e-5)
    assert int(np.abs(unpack_bits(packed, 4, idx.size).astype(np.int64) - idx).max()) == 0
    seen: dict[str, list[np.ndarray]] = {}
    observe_tensors(prog, [{"x_in": x}] * 2, lambda name, v: seen.setdefault(name, []).append(np.asarray(v)))
    dense = [name for name, vs in seen.items() if vs[0].shape == w1.shape]
    assert len(dense) == 2, f"the observer saw {len(dense)} decompressed weights per run, want 2 (folded once, reported every run)"
    for name in dense:
        assert len(seen[name]) == 2, f"{name}: reported {len(seen[name])} times over 2 runs"
        err = min(_maxdiff(seen[name][1], w1), _maxdiff(seen[name][1], w2))
        assert err < 1e-6, f"decompressed weight {name} on the second run is neither weight (max|d| {err:.3g})"
    hist = precision_histogram(prog)
    assert hist["conv"] == {"fp32": 2}


def test_unknown_op_fails_naming_it():
    x = _randn(1, 8)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return mb.topk(x=x_in, k=2, axis=-1)

    with pytest.raises(UnsupportedOpError, match="'topk'") as info:
        Interpreter(prog)
    assert info.value.op_type == "topk"




def test_slice_by_index_masks_strides_and_squeeze_match_indexing():
    """Each case against the NumPy index it means; a masked begin on a squeezed axis is element 0 (spec)."""
    x = _randn(4, 6, 8)
    cases = {
        "plain": (dict(begin=[1, 0, 2], end=[3, 6, 8]), x[1:3, 0:6, 2:8]),
        "strides and end mask": (dict(begin=[0, 1, 0], end=[4, 0, 8], stride=[2, 2, 3], end_mask=[False, True, False]),
                                 x[0:4:2, 1::2, 0:8:3]),
        "negative stride": (dict(begin=[3, 5, 7], end=[0, 0, 0], stride=[-1, -2, -1],
                                 end_mask=[True, False, True]), x[3::-1, 5:0:-2, 7::-1]),
        "squeeze": (dict(begin=[2, 0, 0], end=[3, 6, 8], squeeze_mask=[True, False, False]), x[2]),
        "squeeze with begin mask": (dict(begin=[3, 1, 0], end=[0, 5, 8], begin_mask=[True, False, False],
                                         squeeze_mask=[True, False, False]), x[0, 1:5]),
    }
    for name, (kw, want) in cases.items():
        @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
        def prog(x_in):
            return mb.slice_by_index(x=x_in, **kw)

        got = _run(prog, x_in=x)
        assert got.shape == want.shape, f"slice_by_index {name}: shape {got.shape}, indexing gives {want.shape}"
        _close(f"slice_by_index {name}", got, want, 0.0)

def test_fp16_mode_rounds_every_intermediate():
    x = np.full((1, 4), 1.0, np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        a = mb.add(x=x_in, y=np.float32(1e-4))  # below half an fp16 ulp at 1.0 (4.9e-4)
        return mb.sub(x=a, y=np.float32(1.0))

    exact = _run(prog, x_in=x)
    assert float(exact[0, 0]) == pytest.approx(1e-4, rel=1e-2)
    forced = Interpreter(prog, fp16=True).run({"x_in": x})
    assert float(next(iter(forced.values()))[0, 0]) == 0.0

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog16(x_in):
        h = mb.cast(x=x_in, dtype="fp16")
        a = mb.add(x=h, y=np.float16(1e-3))
        return mb.cast(x=mb.mul(x=a, y=np.float16(3.0)), dtype="fp32")

    got = float(_run(prog16, x_in=x)[0, 0])
    want = float(np.float16(np.float16(np.float16(1.0) + np.float16(1e-3)) * np.float16(3.0)))
    assert got == want
    assert got != pytest.approx(3.003, abs=1e-5)
    ignored = float(next(iter(Interpreter(prog16, fp16=False).run({"x_in": x}).values()))[0, 0])
    assert abs(ignored - (1.0 + float(np.float16(1e-3))) * 3.0) < 1e-6


def test_reshape_zeros_copy_dimensions_aligned_from_the_right():
    """iOS17: with ``shape`` shorter or longer than the input's rank, a 0 copies the input's dimension at the
    same place counted from the right, and a 0 left of the first dimension is 1."""
    x = _randn(2, 3, 4)
    for shape, want in (([0, -1], (3, 8)), ([0, 0, -1, 1], (1, 2, 12, 1)), ([2, 0, -1], (2, 3, 4))):
        @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
        def prog(x_in):
            return mb.reshape(x=x_in, shape=shape)

        got = _run(prog, x_in=x)
        assert got.shape == want, f"reshape {x.shape} by {shape}: {got.shape}, iOS17 gives {want}"
        _close(f"reshape by {shape}", got, x.reshape(want), 0.0)


def test_a_kernel_that_departs_from_the_declared_shape_fails_by_name(monkeypatch):
    """A kernel whose output is not what the program declares stops there, naming the op, instead of
    letting the next op compute on it (here a transpose kernel that forgets to transpose)."""
    from converters import mil_interp

    x = _randn(2, 3, 4)
    monkeypatch.setitem(mil_interp.KERNELS, "transpose", lambda a: np.asarray(a["x"]))

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=IOS17)
    def prog(x_in):
        return mb.reduce_sum(x=mb.transpose(x=x_in, perm=[2, 0, 1]), axes=[1])

    with pytest.raises(OutputMismatchError, match=r"'transpose'.*declares shape \[4, 2, 3\].*gave shape \[2, 3, 4\]") as info:
        Interpreter(prog).run({"x_in": x})
    assert info.value.op_type == "transpose"


def test_cast_float_matches_numpy_bit_for_bit():
    every_half = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(256, 256)
    want = every_half.astype(np.float32)
    got = cast_float(every_half, np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), "float16 -> float32: NaN positions differ"
    bad = int((got.view(np.uint32) != want.view(np.uint32))[~nan].sum())
    assert bad == 0, f"float16 -> float32: {bad} of 65536 bit patterns differ from NumPy"

    bits = RNG.integers(0, 2**32, size=(1, 64, 32, 32), dtype=np.uint64).astype(np.uint32)
    singles = np.concatenate([bits.view(np.float32).ravel(), _randn(50_000), _randn(50_000) * 1e-5,
                              np.float32([65504, 65519.99, 65520, -70000, 2**-24, 2**-25, 3 * 2**-26])])
    singles = singles[~np.isnan(singles)]
    with np.errstate(over="ignore"):
        want16, got16 = singles.astype(np.float16), cast_float(singles, np.float16)
    bad = int((got16.view(np.uint16) != want16.view(np.uint16)).sum())
    assert bad == 0, f"float32 -> float16: {bad} of {singles.size} values round differently from NumPy"

    channels_last = _randn(1, 8, 16, 16).transpose(0, 2, 3, 1)
    for src, dst in ((channels_last, np.float16), (channels_last.astype(np.float16), np.float32)):
        out = cast_float(src, dst)
        assert out.strides == src.astype(dst).strides, "cast_float changed the memory layout (reductions would sum in another order)"
        assert np.array_equal(out, src.astype(dst))
    reversed_view = _randn(4, 100)[:, ::-1]
    assert np.array_equal(cast_float(reversed_view, np.float16), reversed_view.astype(np.float16))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("last", [False, True])
def test_activation_stats_refuse_non_finite_values_in_any_image_order(monkeypatch, bad, last):
    """min/max kept or dropped a NaN depending on which image came last; the range then became NaN or inf."""
    import converters.mil_interp as mi
    from edge.errors import ConversionError

    images = [np.array([-2.0, 3.0], np.float32), np.array([bad, 1.0], np.float32)]
    images = images if last else images[::-1]

    def observe(program, feeds, update, fp16=None):
        for arr in images:
            update("t", arr)

    monkeypatch.setattr(mi, "observe_tensors", observe)
    with pytest.raises(ConversionError, match="tensor t took non-finite values"):
        mi.activation_stats(None, [])
