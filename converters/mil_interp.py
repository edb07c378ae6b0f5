"""A NumPy reference interpreter for Core ML ML Programs, read back from a saved .mlpackage.

Core ML's runtime (``MLModel.predict``) exists only on macOS. On Linux a saved
package is read back as a MIL program with coremltools' protobuf loader
(``coremltools.converters.mil.frontend.milproto.load``) and executed here, op by
op, with NumPy kernels written from the MIL op specifications.

Numerics: every kernel computes in float32 (float64 is never used) and each
output is rounded to the dtype the program declares for it, so an fp16 program
(compute precision fp16: ``cast`` to fp16 after the input, fp16 weights, fp16
tensors throughout, ``cast`` back to fp32 before the output) is evaluated with
float16 rounding after every op, as Core ML's fp16 backends store intermediate
tensors. ``fp16=True`` forces that rounding on an fp32 program too (what the
Neural Engine, fp16-only, would do); ``fp16=False`` ignores fp16 declarations.

An op with no kernel raises :class:`UnsupportedOpError` naming the op type.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from calibration.ranges import HistogramObserver
from edge.errors import ConversionError

# --------------------------------------------------------------------------- errors


class UnsupportedOpError(NotImplementedError):
    """The program contains an op (or an op mode) this interpreter has no kernel for."""

    def __init__(self, op_type: str, detail: str = ""):
        self.op_type = op_type
        super().__init__(
            f"MIL op {op_type!r} is not supported by the NumPy interpreter" + (f" ({detail})" if detail else "")
        )


class OutputMismatchError(RuntimeError):
    """A kernel's output does not have the shape or dtype kind the program declares for it."""

    def __init__(self, op: Any, index: int, expected: str, got: str):
        self.op_type = op.op_type
        super().__init__(f"MIL op {op.op_type!r} ({op.name}) output {index}: the program declares {expected}, the "
                         f"interpreter's kernel gave {got}; the kernel does not follow this op's semantics")


# --------------------------------------------------------------------------- loading


@dataclass
class Package:
    """A saved .mlpackage read back as a MIL program plus its model description."""

    path: Path
    spec: Any
    program: Any
    input_name: str
    input_shape: tuple[int, ...]
    is_image: bool
    color_layout: str
    output_names: list[str]
    classifier: bool
    metadata: dict = field(default_factory=dict)

    @property
    def main(self) -> Any:
        return self.program.functions["main"]


def load_package(path: str | Path) -> Package:
    """Read ``path`` (.mlpackage folder) from disk into a MIL program; no runtime needed."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    path = Path(path)
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{path} is not an .mlpackage (no Manifest.json)")
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path} holds a {spec.WhichOneof('Type')!r} model, not an ML Program")
    items = json.loads(manifest.read_text())["itemInfoEntries"].values()
    weights_dir = ""
    for item in items:
        if item.get("name") == "weights":
            weights_dir = str(path / "Data" / item["path"])
    if not weights_dir:
        weights_dir = str(path / "Data" / "com.apple.CoreML" / "weights")
    program = milproto.load(spec, spec.specificationVersion, file_weights_dir=weights_dir)
    desc = spec.description
    if len(desc.input) != 1:
        raise ValueError(f"{path}: expected one input, found {len(desc.input)}")
    inp = desc.input[0]
    kind = inp.type.WhichOneof("Type")
    if kind == "imageType":
        it = inp.type.imageType
        space = {10: "GRAYSCALE", 20: "RGB", 30: "BGR"}.get(int(it.colorSpace), str(it.colorSpace))
        channels = 1 if space == "GRAYSCALE" else 3
        shape = (1, channels, int(it.height), int(it.width))
    else:
        space = ""
        shape = tuple(int(d) for d in inp.type.multiArrayType.shape)
    meta = {
        "author": desc.metadata.author,
        "license": desc.metadata.license,
        "version": desc.metadata.versionString,
        "short_description": desc.metadata.shortDescription,
        "user_defined": dict(desc.metadata.userDefined),
    }
    return Package(
        path=path, spec=spec, program=program, input_name=inp.name, input_shape=shape,
        is_image=kind == "imageType", color_layout=space, output_names=[o.name for o in desc.output],
        classifier=bool(desc.predictedFeatureName), metadata=meta,
    )


# --------------------------------------------------------------------------- helpers


def dtype_name(var: Any) -> str:
    """MIL dtype of a var as a short string: fp16, fp32, int8, int32, bool, str, ..."""
    from coremltools.converters.mil.mil import types

    t = var.dtype
    try:
        return types.builtin_to_string(t)
    except Exception:
        return getattr(t, "__name__", str(t))


_NP_OF = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
    "bool": np.bool_,
}


_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)


def cast_float(a: np.ndarray, dtype: Any) -> np.ndarray:
    """``a.astype(dtype)``, with the float32 <-> float16 casts done by torch.

    torch's vectorized casts round exactly as NumPy's (IEEE round-to-nearest-even,
    overflow to inf; a test compares every float16 bit pattern and random float32
    ones), keep the source's memory layout as ``astype`` does (so reductions sum
    in the same order), and are 10-20x faster: NumPy's scalar loop cost an fp16
    program more time than all its kernels together. One torch thread: its
    OpenMP workers spinning between calls slowed NumPy's BLAS threads 3x.
    """
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if {a.dtype, dtype} != {_F16, _F32} or a.size < 64 or any(s < 0 for s in a.strides):
        return a.astype(dtype)
    import torch

    from edge.threads import torch_threads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only source: the tensor is only read
        src = torch.from_numpy(a)
    with torch_threads(1):  # torch's OpenMP workers would spin against NumPy's BLAS threads
        return src.to(torch.float16 if dtype == _F16 else torch.float32).numpy()


def _f32(x: Any) -> np.ndarray:
    return cast_float(np.asarray(x), _F32)


def _widen16(a: np.ndarray) -> np.ndarray:
    """float16 ``a`` as float32 (exact, cast by torch: NumPy's float16 reductions are a scalar loop); else ``a``."""
    return _f32(a) if a.dtype == _F16 else a


def _val(x: Any) -> Any:
    return x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x


def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


# --------------------------------------------------------------------------- kernels

Kernel = Callable[[dict], Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*names: str) -> Callable[[Kernel], Kernel]:
    def deco(fn: Kernel) -> Kernel:
        for n in names:
            KERNELS[n] = fn
        return fn

    return deco


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    """Element-wise kernel with NumPy broadcasting (MIL's rule); floats computed in float32."""

    def run(a: dict) -> np.ndarray:
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        if _is_float(x, y):
            return fn(_f32(x), _f32(y))
        return fn(x, y)

    return run


def _is_float(*xs: Any) -> bool:
    return any(np.issubdtype(np.asarray(x).dtype, np.floating) for x in xs)


KERNELS["add"] = _binary(np.add)
KERNELS["sub"] = _binary(np.subtract)
KERNELS["mul"] = _binary(np.multiply)
KERNELS["real_div"] = _binary(np.divide)
KERNELS["maximum"] = _binary(np.maximum)
KERNELS["minimum"] = _binary(np.minimum)
KERNELS["pow"] = _binary(np.power)
KERNELS["floor_div"] = _binary(np.floor_divide)


@kernel("identity")
def _identity(a: dict) -> Any:
    return a["x"]


@kernel("relu")
def _relu(a: dict) -> np.ndarray:
    return np.maximum(_f32(a["x"]), np.float32(0))


@kernel("sigmoid")
def _sigmoid(a: dict) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-_f32(a["x"])))).astype(np.float32, copy=False)


@kernel("tanh")
def _tanh(a: dict) -> np.ndarray:
    return np.tanh(_f32(a["x"]))


@kernel("exp")
def _exp(a: dict) -> np.ndarray:
    return np.exp(_f32(a["x"]))


@kernel("sqrt")
def _sqrt(a: dict) -> np.ndarray:
    return np.sqrt(_f32(a["x"]))


@kernel("rsqrt")
def _rsqrt(a: dict) -> np.ndarray:
    eps = np.float32(_val(a.get("epsilon", 1e-12)))
    return (np.float32(1) / np.sqrt(_f32(a["x"]) + eps)).astype(np.float32, copy=False)


@kernel("erf")
def _erf(a: dict) -> np.ndarray:
    from scipy.special import erf

    return erf(_f32(a["x"])).astype(np.float32, copy=False)


@kernel("clip")
def _clip(a: dict) -> np.ndarray:
    return np.clip(_f32(a["x"]), np.float32(_val(a["alpha"])), np.float32(_val(a["beta"])))


@kernel("gelu")
def _gelu(a: dict) -> np.ndarray:
    x = _f32(a["x"])
    mode = str(_val(a.get("mode", "EXACT")))
    if mode == "EXACT":
        from scipy.special import erf

        return (0.5 * x * (1.0 + erf(x / np.float32(np.sqrt(2.0))))).astype(np.float32, copy=False)
    if mode == "TANH_APPROXIMATION":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return (0.5 * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x**3)))).astype(np.float32, copy=False)
    if mode == "SIGMOID_APPROXIMATION":
        return (x / (1.0 + np.exp(np.float32(-1.702) * x))).astype(np.float32, copy=False)
    raise UnsupportedOpError("gelu", f"mode {mode}")


@kernel("softmax")
def _softmax(a: dict) -> np.ndarray:
    x = _f32(a["x"])
    axis = int(_val(a.get("axis", -1)))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


@kernel("layer_norm")
def _layer_norm(a: dict) -> np.ndarray:
    x = _f32(a["x"])
    axes = tuple(_ints(a["axes"])) if a.get("axes") is not None else tuple(range(x.ndim))
    eps = np.float32(_val(a.get("epsilon", 1e-5)))
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=axes, keepdims=True)
    y = d / np.sqrt(var + eps)
    shape = [x.shape[i] if (i in axes or i - x.ndim in axes) else 1 for i in range(x.ndim)]
    if a.get("gamma") is not None:
        y = y * _f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + _f32(a["beta"]).reshape(shape)
    return y.astype(np.float32, copy=False)


@kernel("batch_norm")
def _batch_norm(a: dict) -> np.ndarray:
    """Inference batch norm over axis 1; coremltools fuses a per-channel mul + add into it."""
    x = _f32(a["x"])
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    eps = np.float32(_val(a.get("epsilon", 1e-5)))
    scale = 1.0 / np.sqrt(_f32(a["variance"]).reshape(shape) + eps)
    if a.get("gamma") is not None:
        scale = scale * _f32(a["gamma"]).reshape(shape)
    y = (x - _f32(a["mean"]).reshape(shape)) * scale
    if a.get("beta") is not None:
        y = y + _f32(a["beta"]).reshape(shape)
    return y.astype(np.float32, copy=False)


def _reduce(fn: Callable) -> Kernel:
    def run(a: dict) -> np.ndarray:
        x = np.asarray(a["x"])
        xf = _f32(x) if np.issubdtype(x.dtype, np.floating) else x
        axes = tuple(_ints(a["axes"])) if a.get("axes") is not None else None
        return np.asarray(fn(xf, axis=axes, keepdims=bool(_val(a.get("keep_dims", False)))))

    return run


KERNELS["reduce_mean"] = _reduce(np.mean)
KERNELS["reduce_sum"] = _reduce(np.sum)
KERNELS["reduce_max"] = _reduce(np.max)
KERNELS["reduce_min"] = _reduce(np.min)


@kernel("linear")
def _linear(a: dict) -> np.ndarray:
    y = np.matmul(_f32(a["x"]), _f32(a["weight"]).T)
    if a.get("bias") is not None:
        y = y + _f32(a["bias"])
    return y


@kernel("matmul")
def _matmul(a: dict) -> np.ndarray:
    x, y = _f32(a["x"]), _f32(a["y"])
    if _val(a.get("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if _val(a.get("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("einsum")
def _einsum(a: dict) -> np.ndarray:
    eq = str(_val(a["equation"]))
    return np.einsum(eq, *[_f32(v) for v in a["values"]], optimize=True).astype(np.float32, copy=False)


def _conv_pads(a: dict, spatial: tuple[int, ...], kernel_hw: tuple[int, ...], strides: list[int], dil: list[int]) -> list[tuple[int, int]]:
    pad_type = str(_val(a.get("pad_type", "valid")))
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        p = _ints(a["pad"])
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        pads = []
        for n, k, s, d in zip(spatial, kernel_hw, strides, dil):
            out = -(-n // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            lo = total // 2 if pad_type == "same" else total - total // 2
            pads.append((lo, total - lo))
        return pads
    raise UnsupportedOpError("conv", f"pad_type {pad_type}")


@kernel("conv")
def _conv(a: dict) -> np.ndarray:
    x, w = _f32(a["x"]), _f32(a["weight"])
    if x.ndim != 4:
        raise UnsupportedOpError("conv", f"rank-{x.ndim} input (only 2-D convolution is implemented)")
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    strides = _ints(a["strides"]) if a.get("strides") is not None else [1, 1]
    dil = _ints(a["dilations"]) if a.get("dilations") is not None else [1, 1]
    groups = int(_val(a.get("groups", 1)))
    pads = _conv_pads(a, (h, wd), (kh, kw), strides, dil)
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0), (0, 0)] + pads)
    hp, wp = x.shape[2:]
    ho = (hp - (kh - 1) * dil[0] - 1) // strides[0] + 1
    wo = (wp - (kw - 1) * dil[1] - 1) // strides[1] + 1
    if kh == kw == 1 and groups == 1:
        xs = x[:, :, : (ho - 1) * strides[0] + 1 : strides[0], : (wo - 1) * strides[1] + 1 : strides[1]]
        y = np.matmul(w.reshape(cout, cin), xs.reshape(n, cin, ho * wo)).reshape(n, cout, ho, wo)
    elif groups == cin and cin_g == 1 and cout == cin:
        y = np.zeros((n, cout, ho, wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dil[0], j * dil[1]
                patch = x[:, :, r0 : r0 + (ho - 1) * strides[0] + 1 : strides[0], c0 : c0 + (wo - 1) * strides[1] + 1 : strides[1]]
                y += patch * w[:, 0, i, j][None, :, None, None]
    else:
        win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1), axis=(2, 3))
        win = win[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]][:, :, :ho, :wo]
        cout_g = cout // groups
        outs = []
        for g in range(groups):
            cols = win[:, g * cin_g : (g + 1) * cin_g]  # (n, cin_g, ho, wo, kh, kw)
            cols = np.ascontiguousarray(cols.transpose(0, 2, 3, 1, 4, 5)).reshape(n, ho * wo, cin_g * kh * kw)
            wg = w[g * cout_g : (g + 1) * cout_g].reshape(cout_g, -1)
            outs.append(np.matmul(cols, wg.T).transpose(0, 2, 1).reshape(n, cout_g, ho, wo))
        y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]
    if a.get("bias") is not None:
        y = y + _f32(a["bias"]).reshape(1, -1, 1, 1)
    return y.astype(np.float32, copy=False)


@kernel("reshape")
def _reshape(a: dict) -> np.ndarray:
    x = np.asarray(a["x"])
    shape = _ints(a["shape"])
    # a 0 copies the input's dimension aligned from the right (iOS17; older opsets need len(shape) == rank,
    # where right and left alignment agree); a 0 left of the input's first dimension is 1
    offset = x.ndim - len(shape)
    shape = [(x.shape[offset + i] if offset + i >= 0 else 1) if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def _transpose(a: dict) -> np.ndarray:
    return np.transpose(np.asarray(a["x"]), _ints(a["perm"]))


@kernel("tile")
def _tile(a: dict) -> np.ndarray:
    return np.tile(np.asarray(a["x"]), _ints(a["reps"]))


@kernel("concat")
def _concat(a: dict) -> np.ndarray:
    vals = [np.asarray(v) for v in a["values"]]
    axis = int(_val(a["axis"]))
    if _val(a.get("interleave", False)):
        stacked = np.stack(vals, axis=axis + 1 if axis >= 0 else axis)
        shape = list(vals[0].shape)
        shape[axis] *= len(vals)
        return stacked.reshape(shape)
    return np.concatenate(vals, axis=axis)


@kernel("split")
def _split(a: dict) -> list[np.ndarray]:
    x = np.asarray(a["x"])
    axis = int(_val(a["axis"]))
    if a.get("split_sizes") is not None:
        cuts = np.cumsum(_ints(a["split_sizes"]))[:-1]
        return np.split(x, cuts, axis=axis)
    return np.split(x, int(_val(a["num_splits"])), axis=axis)


@kernel("squeeze")
def _squeeze(a: dict) -> np.ndarray:
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_ints(a["axes"])))


@kernel("expand_dims")
def _expand_dims(a: dict) -> np.ndarray:
    x = np.asarray(a["x"])
    axes = sorted(ax if ax >= 0 else ax + x.ndim + len(_ints(a["axes"])) for ax in _ints(a["axes"]))
    for ax in axes:
        x = np.expand_dims(x, ax)
    return x


@kernel("slice_by_index")
def _slice_by_index(a: dict) -> np.ndarray:
    x = np.asarray(a["x"])
    begin, end = _ints(a["begin"]), _ints(a["end"])
    stride = _ints(a["stride"]) if a.get("stride") is not None else [1] * x.ndim
    bm = _ints(a["begin_mask"]) if a.get("begin_mask") is not None else [0] * x.ndim
    em = _ints(a["end_mask"]) if a.get("end_mask") is not None else [0] * x.ndim
    sq = _ints(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else [0] * x.ndim
    idx = []
    for i in range(x.ndim):
        if sq[i]:  # a masked begin is the first element in the stride's direction
            idx.append((0 if stride[i] > 0 else -1) if bm[i] else begin[i])
        else:
            idx.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    return x[tuple(idx)]


@kernel("cast")
def _cast(a: dict) -> np.ndarray:
    dt = str(_val(a["dtype"]))
    if dt not in _NP_OF:
        raise UnsupportedOpError("cast", f"dtype {dt}")
    x = np.asarray(a["x"])
    if np.issubdtype(_NP_OF[dt], np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)
    return x.astype(_NP_OF[dt])


def _axis_shape(ndim: int, axis: int, size: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = size
    return shape


def _per_axis(v: Any, ndim: int, axis: int | None) -> np.ndarray:
    """A scalar, or a vector broadcast along ``axis`` of a rank-``ndim`` tensor."""
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    if v.ndim == ndim:
        return v
    if axis is None:
        raise ValueError("a per-axis scale needs an axis")
    return v.reshape(_axis_shape(ndim, axis % ndim, v.size))


@kernel("quantize")
def _quantize(a: dict) -> np.ndarray:
    x = _f32(a["input"])
    axis = None if a.get("axis") is None else int(_val(a["axis"]))
    scale = _f32(_per_axis(a["scale"], x.ndim, axis))
    dt = _NP_OF[str(_val(a["output_dtype"]))]
    zp = 0 if a.get("zero_point") is None else _per_axis(a["zero_point"], x.ndim, axis).astype(np.float32, copy=False)
    info = np.iinfo(dt)
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dt)


@kernel("dequantize")
def _dequantize(a: dict) -> np.ndarray:
    q = np.asarray(a["input"])
    axis = None if a.get("axis") is None else int(_val(a["axis"]))
    scale = _f32(_per_axis(a["scale"], q.ndim, axis))
    zp = 0 if a.get("zero_point") is None else _per_axis(a["zero_point"], q.ndim, axis).astype(np.float32, copy=False)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32, copy=False)


@kernel("constexpr_affine_dequantize")
def _constexpr_affine_dequantize(a: dict) -> np.ndarray:
    q = np.asarray(a["quantized_data"])
    axis = int(_val(a["axis"]))
    scale = _f32(_per_axis(a["scale"], q.ndim, axis))
    zp = _per_axis(a["zero_point"], q.ndim, axis).astype(np.float32, copy=False)
    return (q.astype(np.float32) - zp) * scale


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit values packed LSB-first into bytes (MIL's layout)."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint32)
    return (bits << np.arange(nbits, dtype=np.uint32)).sum(axis=1)


@kernel("constexpr_lut_to_dense")
def _constexpr_lut_to_dense(a: dict) -> np.ndarray:
    lut = _f32(a["lut"])
    indices = np.asarray(a["indices"])
    if a.get("shape") is not None:  # iOS16/17 form: flat LUT, indices packed in bytes
        shape = _ints(a["shape"])
        nbits = int(np.log2(lut.size))
        idx = unpack_bits(indices, nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    # iOS18 form: indices tensor (one per element), lut [..blocks.., 2**n, vector_size]
    if lut.shape[-1] != 1:
        raise UnsupportedOpError("constexpr_lut_to_dense", "vector palettization")
    shape = indices.shape
    reps = [s // b for s, b in zip(shape, lut.shape[:-2])]
    idx = indices.astype(np.int64)
    block_ids = np.meshgrid(*[np.arange(s) // r for s, r in zip(shape, reps)], indexing="ij")
    return lut[tuple(block_ids) + (idx, 0)]


@kernel("constexpr_blockwise_shift_scale")
def _constexpr_blockwise_shift_scale(a: dict) -> np.ndarray:
    data = np.asarray(a["data"]).astype(np.float32, copy=False)
    scale = _f32(a["scale"])
    if scale.ndim != data.ndim:
        raise UnsupportedOpError("constexpr_blockwise_shift_scale", "scale rank differs from data rank")

    def expand(v: np.ndarray) -> np.ndarray:
        for ax, (d, s) in enumerate(zip(data.shape, v.shape)):
            v = np.repeat(v, d // s, axis=ax)
        return v

    if a.get("offset") is not None:
        data = data - expand(np.asarray(a["offset"]).astype(np.float32))
    return data * expand(scale)


@kernel("constexpr_cast")
def _constexpr_cast(a: dict) -> np.ndarray:
    return np.asarray(a["source_val"]).astype(_NP_OF[str(_val(a["output_dtype"]))])


@kernel("classify")
def _classify(a: dict) -> list[Any]:
    probs = _f32(a["probabilities"]).reshape(-1)
    classes = list(getattr(a["classes"], "ls", a["classes"]))
    best = int(np.argmax(probs))
    return [classes[best], {c: float(p) for c, p in zip(classes, probs)}]


# --------------------------------------------------------------------------- interpreter


def _declared(var: Any) -> tuple[tuple[int, ...] | None, str | None]:
    """A var's static shape (None if any dimension is symbolic) and dtype kind ("f", "i" or None: not checked)."""
    try:
        dims = tuple(var.shape)
    except ValueError:  # a list var has no shape
        return None, None
    shape = tuple(int(d) for d in dims) if all(isinstance(d, (int, np.integer)) for d in dims) else None
    name = dtype_name(var)
    kind = "f" if name.startswith("fp") else "i" if name.startswith(("int", "uint")) or name == "bool" else None
    return shape, kind


def _check_outputs(op: Any, outs: list[Any], declared: list[tuple[tuple[int, ...] | None, str | None]]) -> None:
    """Raise :class:`OutputMismatchError` when an array output's shape or dtype kind is not the declared one."""
    for j, (o, (shape, kind)) in enumerate(zip(outs, declared)):
        if not isinstance(o, np.ndarray):
            continue
        if shape is not None and o.shape != shape:
            raise OutputMismatchError(op, j, f"shape {list(shape)}", f"shape {list(o.shape)}")
        got = "f" if np.issubdtype(o.dtype, np.floating) else "i" if np.issubdtype(o.dtype, np.integer) or o.dtype == np.bool_ else None
        if kind is not None and got != kind:
            raise OutputMismatchError(op, j, f"dtype {dtype_name(op.outputs[j])}", f"dtype {o.dtype}")


class Interpreter:
    """Runs the main function of a MIL program on NumPy arrays.

    Every kernel output is checked against the shape and dtype kind the program
    declares for it, so a kernel that departs from an op's semantics (say, a
    newer opset's rule) fails by name instead of computing on.
    """

    def __init__(self, program: Any, fp16: bool | None = None):
        self.program = program
        self.fp16 = fp16
        self.func = program.functions["main"]
        self.ops = list(self.func.operations)
        missing = sorted({op.op_type for op in self.ops if op.op_type != "const" and op.op_type not in KERNELS})
        if missing:
            raise UnsupportedOpError(missing[0], f"program also uses {', '.join(missing[1:])}" if missing[1:] else "")
        self._consts: dict[str, Any] = {}
        self._last_use: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for v in op.inputs.values():
                for var in v if isinstance(v, (list, tuple)) else (v,):
                    self._last_use[var.name] = i
        for op in self.ops:
            if op.op_type == "const":
                self._consts[op.outputs[0].name] = self._round(op.outputs[0].val, op.outputs[0])
        self._out_specs = [[_declared(v) for v in op.outputs] for op in self.ops]
        self._folded = {i for i, op in enumerate(self.ops) if op.op_type.startswith("constexpr_")}
        for i in sorted(self._folded):
            self._fold(self.ops[i], self._out_specs[i])
        self.output_names = [v.name for v in self.func.outputs]

    def _fold(self, op: Any, declared: list) -> None:
        """Store the outputs of a ``constexpr_*`` op (weight decompression) as constants: its inputs are constants."""
        args = {k: self._resolve(v, {}) for k, v in op.inputs.items()}
        out = KERNELS[op.op_type](args)
        outs = [self._round(o, var) for var, o in zip(op.outputs, out if isinstance(out, list) else [out])]
        _check_outputs(op, outs, declared)
        for var, o in zip(op.outputs, outs):
            self._consts[var.name] = o

    def _target_dtype(self, var: Any, value: np.ndarray) -> Any:
        if not np.issubdtype(value.dtype, np.floating):
            return None
        if self.fp16 is True:
            return np.float16
        declared = dtype_name(var)
        if declared == "fp16" and self.fp16 is not False:
            return np.float16
        return np.float32

    def _round(self, value: Any, var: Any) -> Any:
        if isinstance(value, np.ndarray) or np.isscalar(value) and isinstance(value, (float, np.floating)):
            arr = np.asarray(value)
            dt = self._target_dtype(var, arr)
            if dt is not None:
                return cast_float(arr, dt)
            return arr
        return value

    def _resolve(self, v: Any, env: dict) -> Any:
        if isinstance(v, (list, tuple)):
            return [self._resolve(x, env) for x in v]
        if v.name in env:
            return env[v.name]
        if v.name in self._consts:
            return self._consts[v.name]
        if v.val is not None:
            return v.val
        raise KeyError(f"MIL var {v.name!r} used before it was computed")

    def run(self, feeds: dict[str, np.ndarray], observer: Callable[[Any, list[Any]], None] | None = None) -> dict[str, Any]:
        """Outputs of the main function for ``feeds`` (input name -> array)."""
        env: dict[str, Any] = {}
        for name, var in self.func.inputs.items():
            if name not in feeds:
                raise KeyError(f"missing input {name!r}")
            env[name] = self._round(np.asarray(feeds[name], np.float32), var)
        keep = set(self.output_names)
        for i, op in enumerate(self.ops):
            if op.op_type == "const":
                continue
            if i in self._folded:
                if observer is not None:
                    observer(op, [self._consts[var.name] for var in op.outputs])
                continue
            args = {k: self._resolve(v, env) for k, v in op.inputs.items()}
            out = KERNELS[op.op_type](args)
            outs = out if isinstance(out, list) else [out]
            if len(outs) != len(op.outputs):
                raise RuntimeError(f"{op.op_type} {op.name}: kernel gave {len(outs)} outputs, op has {len(op.outputs)}")
            outs = [self._round(o, var) for o, var in zip(outs, op.outputs)]
            _check_outputs(op, outs, self._out_specs[i])
            for var, o in zip(op.outputs, outs):
                env[var.name] = o
            if observer is not None:
                observer(op, outs)
            for v in op.inputs.values():
                for var in v if isinstance(v, (list, tuple)) else (v,):
                    if self._last_use.get(var.name) == i and var.name in env and var.name not in keep:
                        del env[var.name]
        return {name: env[name] for name in self.output_names}


def image_feed(pkg: Package, pixels_uint8_hwc: np.ndarray) -> np.ndarray:
    """One uint8 HWC RGB image as the (1, C, H, W) float input Core ML builds from a CVPixelBuffer."""
    x = np.asarray(pixels_uint8_hwc)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected one HWC RGB image, got shape {x.shape}")
    if x.shape[:2] != pkg.input_shape[2:]:
        raise ValueError(f"image is {x.shape[:2]}, the package wants {pkg.input_shape[2:]}")
    if pkg.color_layout == "BGR":
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32, copy=False)


def _scores(pkg: Package, outputs: dict[str, Any]) -> np.ndarray:
    if pkg.classifier:
        probs = outputs[pkg.spec.description.predictedProbabilitiesName]
        return np.asarray(list(probs.values()), np.float32)
    name = "logits" if "logits" in outputs else pkg.output_names[0]
    return np.asarray(outputs[name], np.float32).reshape(-1)


def _main_outputs(pkg: Package, outputs: dict[str, Any]) -> dict[str, Any]:
    """Map the program's output vars onto the model description's output names."""
    return dict(zip(pkg.output_names, outputs.values()))


def run_package(
    path: str | Path | Package, pixels_uint8_nhwc: np.ndarray, fp16: bool | None = None
) -> np.ndarray:
    """Float32 (N, classes) scores of a saved package on uint8 NHWC RGB images.

    For a logits package these are the logits; for a classifier package the class
    probabilities in class-label order.
    """
    pkg = path if isinstance(path, Package) else load_package(path)
    interp = Interpreter(pkg.program, fp16=fp16)
    rows = []
    for img in np.asarray(pixels_uint8_nhwc):
        rows.append(_scores(pkg, _main_outputs(pkg, interp.run({pkg.input_name: image_feed(pkg, img)}))))
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)


def classify_package(path: str | Path | Package, pixels_uint8_nhwc: np.ndarray) -> list[str]:
    """Predicted class labels of a classifier package (its ``classLabel`` output)."""
    pkg = path if isinstance(path, Package) else load_package(path)
    if not pkg.classifier:
        raise ValueError(f"{pkg.path} is not a classifier package")
    interp = Interpreter(pkg.program)
    label = pkg.spec.description.predictedFeatureName
    return [
        str(_main_outputs(pkg, interp.run({pkg.input_name: image_feed(pkg, img)}))[label])
        for img in np.asarray(pixels_uint8_nhwc)
    ]


def observe_tensors(
    program: Any, feeds: Iterable[dict[str, np.ndarray]], update: Callable[[str, Any], None], fp16: bool | None = None
) -> None:
    """Run ``program`` on each feed, calling ``update(name, value)`` for every input and op output."""
    interp = Interpreter(program, fp16=fp16)

    def observer(op: Any, outs: list[Any]) -> None:
        for var, o in zip(op.outputs, outs):
            update(var.name, o)

    for feed in feeds:
        for name, value in feed.items():
            update(name, value)
        interp.run(feed, observer)


class TensorCache:
    """Copies of the named tensors from the first feeds of one pass, up to ``budget`` bytes.

    A second pass over the same feeds replays ``tensors`` (one dict per feed, the
    first ``cached`` feeds, each complete) and runs the interpreter only on the
    feeds after them. Values are kept in the dtype the program computed them in.
    """

    def __init__(self, names: Iterable[str], budget: int):
        self.names, self.budget = set(names), int(budget)
        self.tensors: list[dict[str, np.ndarray]] = []
        self.nbytes = 0
        self._open = True

    @property
    def cached(self) -> int:
        return len(self.tensors)

    def wrap(self, feeds: Iterable[dict[str, np.ndarray]]) -> Iterable[dict[str, np.ndarray]]:
        """``feeds`` unchanged, opening one record per feed while the budget lasts."""
        for feed in feeds:
            if self._open:
                self.tensors.append({})
            yield feed

    def record(self, name: str, arr: np.ndarray) -> None:
        if not self._open or name not in self.names:
            return
        if self.nbytes + arr.nbytes > self.budget:  # this feed does not fit: drop its partial record, stop caching
            self._open = False
            self.nbytes -= sum(a.nbytes for a in self.tensors.pop().values())
            return
        self.tensors[-1][name] = arr.copy()
        self.nbytes += arr.nbytes


def activation_stats(
    program: Any, feeds: Iterable[dict[str, np.ndarray]], fp16: bool | None = None, cache: TensorCache | None = None
) -> dict[str, dict[str, float]]:
    """Per-tensor ``{"rmin", "rmax"}`` of every function input and non-const op output.

    The format coremltools' activation-quantization passes take (``activation_stats``).
    ``cache`` keeps copies of its tensors for a second pass (:func:`activation_histograms`).
    """
    stats: dict[str, dict[str, float]] = defaultdict(dict)

    def update(name: str, value: Any) -> None:
        arr = np.asarray(value)
        if cache is not None:
            cache.record(name, arr)
        if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
            return
        arr = _widen16(arr)
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # min/max of a range would drop or keep a NaN by image order
            raise ConversionError(
                f"activation ranges: tensor {name} took non-finite values (NaN/inf) on a calibration image, so "
                "no int8 range can hold it; the float program overflows there (check the checkpoint for huge or "
                "NaN weights), or leave the activation-quantized precision out with --precision")
        s = stats[name]
        s["rmin"] = min(lo, s.get("rmin", lo))
        s["rmax"] = max(hi, s.get("rmax", hi))

    observe_tensors(program, cache.wrap(feeds) if cache is not None else feeds, update, fp16)
    return dict(stats)


def activation_histograms(
    program: Any,
    feeds: Iterable[dict[str, np.ndarray]],
    ranges: dict[str, tuple[float, float]],
    fp16: bool | None = None,
    replay: Iterable[dict[str, np.ndarray]] = (),
) -> HistogramObserver:
    """Histograms (over the given fixed ranges) of the named tensors, for MSE-optimal int8 ranges.

    ``replay`` holds tensors already computed (:class:`TensorCache`), counted before
    the interpreter runs ``feeds``; counts do not depend on the order.
    """
    obs = HistogramObserver(ranges)

    def update(name: str, value: Any) -> None:  # update() ignores tensors without a range
        if name in obs.ranges:
            obs.update(name, _widen16(np.asarray(value)))

    for tensors in replay:
        for name, arr in tensors.items():
            update(name, arr)
    observe_tensors(program, feeds, update, fp16)
    return obs


WEIGHT_OPS = ("const", "constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale",
              "constexpr_cast", "constexpr_sparse_to_dense")


def precision_histogram(program: Any) -> dict[str, dict[str, int]]:
    """Compute ops by type and output precision, e.g. ``{"conv": {"fp16": 40}}`` (weights excluded)."""
    hist: dict[str, Counter] = defaultdict(Counter)
    for op in program.functions["main"].operations:
        if op.op_type in WEIGHT_OPS:
            continue
        hist[op.op_type][dtype_name(op.outputs[0])] += 1
    return {k: dict(v) for k, v in sorted(hist.items())}


def weight_histogram(program: Any) -> dict[str, int]:
    """Weight-producing ops by type: how many tensors are stored compressed and how."""
    return dict(Counter(op.op_type for op in program.functions["main"].operations if op.op_type in WEIGHT_OPS[1:]))
