"""Subprocess worker for TensorFlow/LiteRT steps that may crash or abort.

Run as ``python -m converters.litert_worker <command> <args.json>``; results are
written to files named in the JSON. Keeping TFLiteConverter and the LiteRT
interpreter out of the main process means a model that aborts the runtime (as
onnx2tf's int16x8 output does on EfficientMod) fails only its own precision.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.timing import warm_up

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _representative(calib_path: str, limit: int | None = None):
    data = np.load(calib_path)
    if limit:
        data = data[:limit]

    def gen():
        for i in range(len(data)):
            yield [data[i : i + 1]]

    return gen


def _converter(args: dict):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(args["saved_model"])
    mode = args["mode"]
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "calibrate":
        conv.representative_dataset = _representative(args["calib"], args.get("calib_limit"))
        conv._experimental_calibrate_only = True
    elif mode != "dynamic":
        raise SystemExit(f"unknown conversion mode {mode!r}")
    return conv


def _opcode_indices(model, builtin: int) -> set[int]:
    """Indices into ``model.operatorCodes`` of one builtin op (old and new opcode fields)."""
    return {i for i, c in enumerate(model.operatorCodes) if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin}


def float_depthwise_weights(model) -> int:
    """Give every int8-weight (hybrid) DEPTHWISE_CONV_2D its weights back as float32, in place.

    XNNPACK has no hybrid depthwise kernel: in a dynamic-range file those ops ran
    on the reference kernels, outside the delegate. Dequantized weights keep the
    file's int8 weight values (depthwise weights are a few kB) and let XNNPACK
    run the op in float. Returns how many ops were changed.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fu

    graph = model.subgraphs[0]
    codes = _opcode_indices(model, fu.schema_fb.BuiltinOperator.DEPTHWISE_CONV_2D)
    changed = 0
    for op in graph.operators:
        if op.opcodeIndex not in codes or graph.tensors[op.inputs[0]].type != fu.schema_fb.TensorType.FLOAT32:
            continue
        w = graph.tensors[op.inputs[1]]
        if w.type != fu.schema_fb.TensorType.INT8 or w.quantization is None or w.quantization.scale is None:
            continue
        q = w.quantization
        shape = tuple(int(d) for d in w.shape)
        values = np.frombuffer(np.asarray(model.buffers[w.buffer].data, np.uint8).tobytes(), np.int8).reshape(shape)
        scale = np.asarray(q.scale, np.float32)
        zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), np.float32)
        bshape = [1] * len(shape)
        if scale.size > 1:
            bshape[q.quantizedDimension] = scale.size
        real = ((values.astype(np.float32) - zero.reshape(bshape)) * scale.reshape(bshape)).astype(np.float32)
        model.buffers[w.buffer].data = np.frombuffer(real.tobytes(), np.uint8)
        w.type = fu.schema_fb.TensorType.FLOAT32
        w.quantization = None
        changed += 1
    return changed


# where each weight op keeps its output channels, to read its int8 weights in PyTorch's (out, ...) order
_TORCH_ORDER = {"CONV_2D": (0, 3, 1, 2), "DEPTHWISE_CONV_2D": (3, 0, 1, 2), "FULLY_CONNECTED": (0, 1)}
LEVELS_MAX_DIFFERENT = 1e-3  # share of weights whose nearest level may differ by one (float rounding of the scale)
LEVELS_MISMATCH_EXIT = 3  # cmd_convert's exit code when the levels do not pair: the caller converts another way


class LevelsMismatch(Exception):
    """The file's int8 weights and the given nearest levels do not pair one to one."""


def swap_weight_levels(model: Any, nearest: list[np.ndarray], levels: list[np.ndarray],
                       scales: list[tuple[np.ndarray, np.ndarray]] | None = None) -> int:
    """Replace int8 weights by other levels, in place; returns how many weights were replaced.

    ``nearest[j]`` are layer j's weights rounded to the nearest per-channel int8
    level, in PyTorch's layout: the file's own int8 weights of that layer, up to a
    few weights a rounding of the scale put one level off. Each int8 weight of a
    CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED must pair with exactly one
    layer, and each layer with one weight; its buffer then takes ``levels[j]``.
    ``scales[j]`` = (the per-row scale of ``nearest[j]``, that of ``levels[j]``):
    where the file holds the first, it takes the second; a scale the converter
    changed (a constant folded into the weights) is multiplied by their ratio.
    Without ``scales`` the file's scales stay (right when each row's largest
    weight keeps its level, as GPTQ pins it).
    """
    from tensorflow.lite.tools import flatbuffer_utils as fu

    graph = model.subgraphs[0]
    codes = {i: kind for kind in _TORCH_ORDER
             for i in _opcode_indices(model, getattr(fu.schema_fb.BuiltinOperator, kind))}
    taken: set[int] = set()
    for op in graph.operators:
        kind = codes.get(op.opcodeIndex)
        if kind is None or len(op.inputs) < 2:
            continue
        w = graph.tensors[op.inputs[1]]
        if w.type != fu.schema_fb.TensorType.INT8 or model.buffers[w.buffer].data is None:
            continue
        shape = tuple(int(d) for d in w.shape)
        order = _TORCH_ORDER[kind]
        if w.quantization is None or w.quantization.scale is None or w.quantization.quantizedDimension != order[0]:
            raise LevelsMismatch(f"{kind} weight {w.name.decode()} is not quantized per output channel")
        stored = np.frombuffer(np.asarray(model.buffers[w.buffer].data, np.uint8).tobytes(), np.int8)
        rows = stored.reshape(shape).transpose(order).reshape(shape[order[0]], -1).astype(np.int16)
        hits = [j for j, n in enumerate(nearest) if n.size == rows.size and len(n) == len(rows)
                and _same_levels(rows, n.reshape(len(rows), -1))]
        if len(hits) != 1 or hits[0] in taken:
            raise LevelsMismatch(f"{kind} weight {w.name.decode()} {shape} pairs with {len(hits)} layers"
                                 + (" (one already paired)" if hits and hits[0] in taken else ""))
        j = hits[0]
        taken.add(j)
        torch_shape = tuple(shape[i] for i in order)
        new = levels[j].astype(np.int8).reshape(torch_shape).transpose(np.argsort(order))
        model.buffers[w.buffer].data = np.frombuffer(np.ascontiguousarray(new).tobytes(), np.uint8)
        if scales is not None:
            w.quantization.scale = _new_scale(np.asarray(w.quantization.scale, np.float32), *scales[j])
    if len(taken) != len(nearest):
        raise LevelsMismatch(f"{len(nearest) - len(taken)} of {len(nearest)} layers have no int8 weight in the file")
    return len(taken)


def _new_scale(stored: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    old, new = np.asarray(old, np.float32).reshape(-1), np.asarray(new, np.float32).reshape(-1)
    if stored.shape != old.shape:
        raise LevelsMismatch(f"a weight has {stored.size} scales where its layer has {old.size} rows")
    ratio = np.divide(new.astype(np.float64), old.astype(np.float64), out=np.ones(old.shape), where=old > 0)
    return np.where(stored == old, new, (stored * ratio).astype(np.float32)).astype(np.float32)


def _same_levels(a: np.ndarray, b: np.ndarray) -> bool:
    diff = np.abs(a - b.astype(np.int16))
    return bool(diff.max(initial=0) <= 1 and np.count_nonzero(diff) <= LEVELS_MAX_DIFFERENT * diff.size)


def cmd_convert(args: dict) -> None:
    """saved_model -> dynamic-range .tflite, or a calibrated (float) model for int8.

    fp32 and fp16 files come from onnx2tf itself. Dynamic-range files take the
    int8 levels in ``levels`` if given: an .npz of ``nearest<j>``, ``levels<j>``,
    ``nearest_scale<j>`` and ``scale<j>`` per layer (see ``swap_weight_levels``).
    Then they get their depthwise weights back in float (``float_depthwise_weights``).
    If the levels do not pair with the file's weights, nothing is written but
    ``out``.levels.json naming why, and the worker exits with ``LEVELS_MISMATCH_EXIT``.
    """
    model = _converter(args).convert()
    if args["mode"] == "dynamic" and (args.get("float_depthwise", True) or args.get("levels")):
        from tensorflow.lite.tools import flatbuffer_utils as fu

        parsed = fu.convert_bytearray_to_object(bytearray(model))
        if args.get("levels"):
            with np.load(args["levels"]) as z:
                count = sum(f.startswith("levels") for f in z.files)
                nearest = [z[f"nearest{j}"] for j in range(count)]
                levels = [z[f"levels{j}"] for j in range(count)]
                scales = [(z[f"nearest_scale{j}"], z[f"scale{j}"]) for j in range(count)]
            try:
                swapped = swap_weight_levels(parsed, nearest, levels, scales)
            except Exception as exc:  # a graph this pairing does not know: the caller converts another way
                why = str(exc) if isinstance(exc, LevelsMismatch) else f"{type(exc).__name__}: {exc}"
                with open(args["out"] + ".levels.json", "w") as f:
                    json.dump({"error": why}, f)
                raise SystemExit(LEVELS_MISMATCH_EXIT) from None
            with open(args["out"] + ".levels.json", "w") as f:
                json.dump({"swapped": swapped}, f)
        if args.get("float_depthwise", True):
            float_depthwise_weights(parsed)
        model = bytes(fu.convert_object_to_bytearray(parsed))
    with open(args["out"], "wb") as f:
        f.write(model)


# XNNPACK runs an int8 ADD only if each input's scale is at least 2^-10 of the
# output's; a nearly constant input (e.g. the channel mean of an already
# centered tensor) gets a far smaller scale and drops the ADD to the reference
# kernel. Inputs are widened to 2^-8 of the output range, with margin.
ADD_MIN_INPUT_RATIO = 2.0**-8


def _widen_add_inputs(model, ranges: dict[str, tuple[float, float]]) -> int:
    """Widen ``ranges`` of ADD inputs in place so XNNPACK delegates every int8 ADD; returns how many."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    graph = model.subgraphs[0]
    add_codes = _opcode_indices(model, fu.schema_fb.BuiltinOperator.ADD)
    widened = 0
    for op in graph.operators:
        if op.opcodeIndex not in add_codes:
            continue
        out = graph.tensors[op.outputs[0]].name.decode()
        if out not in ranges:
            continue
        need = (ranges[out][1] - ranges[out][0]) * ADD_MIN_INPUT_RATIO
        for i in op.inputs:
            name = graph.tensors[i].name.decode()
            if name in ranges and ranges[name][1] - ranges[name][0] < need:
                lo, hi = ranges[name]
                extra = need - (hi - lo)
                ranges[name] = (min(lo - extra / 2, 0.0), max(hi + extra / 2, 0.0))
                widened += 1
    return widened


def _recorded_ranges(model) -> dict[str, tuple[float, float]]:
    """Each calibrated tensor's recorded (min, max)."""
    return {
        t.name.decode(): (float(t.quantization.min[0]), float(t.quantization.max[0]))
        for t in model.subgraphs[0].tensors
        if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1
    }


def cmd_histograms(args: dict) -> None:
    """Histograms of every recorded tensor of a calibrated (float) model over its calibration images.

    Runs images ``start::step`` of the calibration file, so several workers
    can share the images: the counts of shards add up to the counts of one
    pass, exactly. Writes ``out`` (tensors x bins, int64) and
    ``out``.json (tensor names, image count).
    """
    from ai_edge_litert import interpreter as lit
    from tensorflow.lite.tools import flatbuffer_utils as fu

    from calibration.ranges import HistogramObserver

    obs = HistogramObserver(_recorded_ranges(fu.read_model(args["calibrated"])))
    it = lit.Interpreter(
        model_path=args["calibrated"],
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=lit.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    it.allocate_tensors()
    index = {t["name"]: t["index"] for t in it.get_tensor_details() if t["name"] in obs.hist}
    inp = it.get_input_details()[0]
    images = np.load(args["calib"])[args.get("start", 0) :: args.get("step", 1)]
    for x in images:
        it.set_tensor(inp["index"], x[None].astype(np.float32))
        it.invoke()
        for name, idx in index.items():
            obs.update(name, it.get_tensor(idx))
    names = sorted(index)
    np.save(args["out"], np.stack([obs.hist[n] for n in names]) if names else np.zeros((0, obs.bins), np.int64))
    with open(args["out"] + ".json", "w") as f:
        json.dump({"names": names, "images": int(len(images))}, f)


def cmd_refine_ranges(args: dict) -> None:
    """Final int8 activation ranges of a calibrated model: MSE-optimal (or min/max), delegate-safe.

    With ``method="mse"`` sums the histogram shards named in ``histograms``
    (``cmd_histograms``: each recorded tensor over its min/max on the
    calibration images) and takes ``calibration.ranges.mse_range`` of each
    tensor's histogram. Either way ADD inputs are widened (``_widen_add_inputs``).
    Writes a copy with the new min/max; ``mlir_quantize`` then derives scales from them.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fu

    from calibration.ranges import HistogramObserver

    model = fu.read_model(args["calibrated"])
    tensors = {t.name.decode(): t for t in model.subgraphs[0].tensors}
    recorded = _recorded_ranges(model)
    ranges = dict(recorded)
    summary: dict = {"method": args.get("method", "mse")}
    if summary["method"] == "mse":
        obs = HistogramObserver(recorded)
        seen: set[str] = set()
        images = 0
        for shard in args["histograms"]:
            with open(shard + ".json") as f:
                meta = json.load(f)
            for name, counts in zip(meta["names"], np.load(shard)):
                obs.hist[name] += counts
            seen.update(meta["names"])
            images += meta["images"]
        # the model's input and output keep min/max: clipping the largest logits
        # would tie exactly the classes top-1 is decided between
        graph = model.subgraphs[0]
        io = {graph.tensors[i].name.decode() for i in list(graph.inputs) + list(graph.outputs)}
        mse = {n: r for n, r in obs.mse_ranges().items() if n in seen and n not in io}
        ranges.update(mse)
        ratios = [(hi - lo) / (recorded[n][1] - recorded[n][0]) for n, (lo, hi) in mse.items()]
        summary.update({
            "images": images, "tensors": len(ratios),
            "median_range_ratio": round(float(np.median(ratios)), 3) if ratios else 1.0,
        })
    summary["widened_add_inputs"] = _widen_add_inputs(model, ranges)
    for name, (lo, hi) in ranges.items():
        if (lo, hi) != recorded[name]:
            q = tensors[name].quantization
            q.min, q.max = np.array([lo], np.float32), np.array([hi], np.float32)
    fu.write_model(model, args["out"])
    with open(args["summary"], "w") as f:
        json.dump(summary, f)


@dataclass
class Graph:
    """A .tflite's ops and tensor details, each tensor's producing op and its consuming ops."""

    interpreter: Any
    ops: list[dict]
    tensors: dict[int, dict]
    producer: dict[int, dict]
    consumers: dict[int, list[dict]]

    @property
    def names(self) -> dict[int, str]:
        return {i: t["name"] for i, t in self.tensors.items()}

    def ops_of(self, types: tuple[str, ...]) -> list[dict]:
        """The ops of ``types``, in graph order."""
        return [o for o in self.ops if o["op_name"] in types]


def read_graph(model: bytes | str, allocate: bool = False) -> Graph:
    """The op graph of a .tflite, given as its bytes or its path (LiteRT's op and tensor details).

    ``allocate`` allocates the tensors, so constant tensors can be read from ``Graph.interpreter``.
    """
    from ai_edge_litert import interpreter as lit

    it = lit.Interpreter(model_content=model) if isinstance(model, bytes) else lit.Interpreter(model_path=model)
    if allocate:
        it.allocate_tensors()
    ops = it._get_ops_details()
    consumers: dict[int, list[dict]] = {}
    for o in ops:
        for i in o["inputs"]:
            consumers.setdefault(i, []).append(o)
    return Graph(it, ops, {t["index"]: t for t in it.get_tensor_details()},
                 {o["outputs"][0]: o for o in ops if len(o["outputs"])}, consumers)


def layernorm_stat_nodes(model: bytes | Graph) -> list[str]:
    """Output tensors of each LayerNorm's statistics chain (square, variance, rsqrt, scale).

    Found structurally around every RSQRT: its producer (the variance conv or
    add), the square feeding that, and the multiplies consuming the rsqrt.
    Variance spans orders of magnitude across pixels; in int8 small variances
    round away and rsqrt explodes, so these stay float in int8-mixed.
    """
    g = model if isinstance(model, Graph) else read_graph(model)
    ops, names, producer, consumers = g.ops, g.names, g.producer, g.consumers
    nodes: list[str] = []
    for o in ops:
        if o["op_name"] != "RSQRT":
            continue
        chain = [o]
        var = producer.get(o["inputs"][0])
        if var is not None and var["op_name"] in ("CONV_2D", "ADD", "MEAN"):
            chain.append(var)
            sq = producer.get(var["inputs"][0])
            if sq is not None and sq["op_name"] == "MUL" and sq["inputs"][0] == sq["inputs"][1]:
                chain.append(sq)
        chain += [c for c in consumers.get(o["outputs"][0], []) if c["op_name"] == "MUL"]
        nodes += [names[c["outputs"][0]] for c in chain]
    return nodes


def cmd_quantize(args: dict) -> None:
    """Calibrated model -> int8 .tflite; denylisted op types / output tensors stay float."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert

    with open(args["calibrated"], "rb") as f:
        calibrated = f.read()
    deny = dict(args.get("denylist") or {})
    nodes = list(deny.get("nodes") or [])
    if nodes or deny.get("layernorm_stats"):  # the calibrated graph, read once for both
        g = read_graph(calibrated)
        if deny.get("layernorm_stats"):
            nodes += layernorm_stat_nodes(g)
        unknown = sorted(set(nodes) - set(g.names.values()))
        if unknown:  # the quantizer ignores a name it does not know: that op would stay int8 without a word
            raise SystemExit(f"denylisted tensors not in the calibrated model: {', '.join(unknown[:5])}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        deny["nodes"] = nodes
    io_type = tf.int8 if args.get("int8_io") else tf.float32
    model = tfl_convert.mlir_quantize(
        calibrated,
        fully_quantize=bool(args.get("int8_io")),
        input_data_type=io_type,
        output_data_type=io_type,
        denylisted_ops=deny.get("ops") or None,
        denylisted_nodes=deny.get("nodes") or None,
    )
    with open(args["out"], "wb") as f:
        f.write(model)


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((ref - np.asarray(got, np.float64)) ** 2))
    if noise == 0.0:
        return 120.0
    return float(10 * math.log10(max(float(np.sum(ref**2)), 1e-30) / noise))


def _all_tensors(model_content: bytes, images: np.ndarray) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
    """Ops of a model and the (dequantized) value of every op output, per image."""
    from ai_edge_litert import interpreter as lit

    it = lit.Interpreter(
        model_content=model_content,
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=lit.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    it.allocate_tensors()
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = [o for o in it._get_ops_details() if o["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    inp = it.get_input_details()[0]
    values: dict[str, list[np.ndarray]] = {}
    for x in images:
        x = x[None]
        if inp["dtype"] == np.int8:
            sc, zp = inp["quantization"]
            x = np.clip(np.round(x / sc + zp), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], x.astype(inp["dtype"], copy=False))
        it.invoke()
        for o in ops:
            for idx in o["outputs"]:
                t = details[idx]
                v = it.get_tensor(idx)
                if np.issubdtype(v.dtype, np.integer):
                    sc, zp = t["quantization"]
                    v = (v.astype(np.float32) - zp) * sc
                values.setdefault(t["name"], []).append(np.array(v, np.float32))
    return [{"op": o["op_name"], "out": [details[i]["name"] for i in o["outputs"]],
             "in": [details[i]["name"] for i in o["inputs"] if i in details]} for o in ops], values


def _float_names(qops: list[dict], fops: list[dict], qvals: dict, fvals: dict) -> dict[str, str]:
    """Each int8-model op output's name in the float model it was quantized from.

    The quantizer renames some op outputs (``.../convolution`` becomes
    ``.../convolution1``, the model's output another name), so ops are paired by
    position when both models run the same op sequence (QUANTIZE/DEQUANTIZE left
    out) with the same output shapes; otherwise names are taken as they are.
    """
    def shape(vals: dict, name: str) -> tuple | None:
        return vals[name][0].shape if vals.get(name) else None

    if [(o["op"], len(o["out"])) for o in qops] != [(o["op"], len(o["out"])) for o in fops]:
        print("sensitivity: the int8 and float op sequences differ; pairing outputs by name", file=sys.stderr)
        return {}
    pairs = {qn: fn for q, f in zip(qops, fops) for qn, fn in zip(q["out"], f["out"])}
    if any(shape(qvals, qn) != shape(fvals, fn) for qn, fn in pairs.items()):
        print("sensitivity: paired int8 and float outputs differ in shape; pairing outputs by name", file=sys.stderr)
        return {}
    return pairs


def _converted_from(g: Graph) -> dict[str, str]:
    """Each QUANTIZE/DEQUANTIZE output's name -> the op output it converts (through chains of them)."""
    source: dict[str, str] = {}
    for o in g.ops:
        if o["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            i = g.names[o["inputs"][0]]
            source[g.names[o["outputs"][0]]] = source.get(i, i)
    return source


def cmd_sensitivity(args: dict) -> None:
    """Per-op SQNR of the full-int8 model's op outputs against the float model's.

    ``float_model`` is the calibrated model the int8 file was quantized from, so
    rows name each op's output as the quantizer's denylist knows it.
    ``sqnr_db`` is the accumulated fidelity at that op's output; ``drop_db`` is how
    much this op lowers it below its worst input, i.e. the error the op itself adds.
    ``layernorm_stat`` marks the ops of a LayerNorm's statistics chain (:func:`layernorm_stat_nodes`).
    """
    with open(args["float_model"], "rb") as f:
        float_model = f.read()
    with open(args["quant_model"], "rb") as f:
        quant_model = f.read()
    images = np.load(args["calib"])[: args.get("debug_limit", 8)]
    fops, fvals = _all_tensors(float_model, images)
    qops, qvals = _all_tensors(quant_model, images)
    g = read_graph(quant_model)
    to_float, source = _float_names(qops, fops, qvals, fvals), _converted_from(g)
    sqnr = {}
    for name, vals in qvals.items():
        fname = to_float.get(name, name)
        if fname not in fvals or fvals[fname][0].shape != vals[0].shape:
            continue
        ref = np.concatenate([v.ravel() for v in fvals[fname]])
        if float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))) < 1e-6:
            continue  # a numerically zero tensor has no meaningful SQNR
        sqnr[name] = _sqnr_db(ref, np.concatenate([v.ravel() for v in vals]))
    stats = set(layernorm_stat_nodes(float_model))
    extra = {g.names[o["outputs"][0]]: 3 * int(np.prod(g.tensors[o["inputs"][1]]["shape"]))  # float32 over int8
             for o in g.ops_of(CONV_OPS)}
    rows = []
    for o in qops:
        name = o["out"][0]
        if name not in sqnr:
            continue
        inputs = [sqnr[source.get(i, i)] for i in o["in"] if source.get(i, i) in sqnr]
        drop = min(inputs) - sqnr[name] if inputs else 0.0
        fname = to_float.get(name, name)
        rows.append({"tensor": fname, "op": o["op"], "sqnr_db": round(sqnr[name], 2), "drop_db": round(drop, 2),
                     "layernorm_stat": fname in stats, "extra_bytes": extra.get(name, 0)})
    rows.sort(key=lambda r: -r["drop_db"])
    with open(args["out"], "w") as f:
        json.dump(rows, f, indent=1)


CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _dequantized_weight(it, t: dict) -> np.ndarray:
    """A constant weight tensor in float, per-channel int8 scales applied; layout as stored."""
    v = it.get_tensor(t["index"]).astype(np.float32)
    q = t["quantization_parameters"]
    if len(q["scales"]):
        shape = [1] * v.ndim
        shape[q["quantized_dimension"]] = -1
        v = (v - q["zero_points"].reshape(shape)) * q["scales"].reshape(shape)
    return v


def cmd_conv_ops(args: dict) -> None:
    """The conv/FC ops of an int8 .tflite, in graph order, for the int8-mixed logit-noise ranking.

    For each: the name the quantizer's denylist knows it by (its output in the
    ``calibrated`` model; an int8 file renames the model's output), its input
    and output quantization, and whether keeping it float removes its input's
    and output's int8 rounding in ``step_model`` (the producer, resp. every
    consumer, is already float there). Weights (float, PyTorch's OIHW / OI
    layout) go to ``weights`` (.npz, keyed by position).
    """
    qg, cg = read_graph(args["quant_model"], allocate=True), read_graph(args["calibrated"], allocate=True)
    sg = read_graph(args["step_model"])
    it, det, cit, cdet, sdet = qg.interpreter, qg.tensors, cg.interpreter, cg.tensors, sg.tensors
    quant, cal, step = qg.ops_of(CONV_OPS), cg.ops_of(CONV_OPS), sg.ops_of(CONV_OPS)
    if not (len(quant) == len(cal) == len(step)):
        raise SystemExit(f"conv ops differ: {len(quant)} int8, {len(cal)} calibrated, {len(step)} in the step model")
    rows, weights = [], {}
    for k, (q, c, s) in enumerate(zip(quant, cal, step)):
        w = _dequantized_weight(it, det[q["inputs"][1]])
        shapes = {tuple(d[o["inputs"][1]]["shape"]) for d, o in ((cdet, c), (sdet, s))}
        if shapes != {w.shape} or not q["op_name"] == c["op_name"] == s["op_name"]:
            raise SystemExit(f"conv op {k} differs between the int8 and the calibrated model")
        step_size = float(np.max(det[q["inputs"][1]]["quantization_parameters"]["scales"], initial=0.0))
        gap = float(np.abs(_dequantized_weight(cit, cdet[c["inputs"][1]]) - w).max())
        if gap > step_size + 1e-6:  # same shape and type but another conv's weights: the graphs are ordered apart
            raise SystemExit(f"conv op {k}: the int8 weights are {gap:.3g} from the calibrated model's")
        if det[q["outputs"][0]]["name"] != sdet[s["outputs"][0]]["name"]:
            raise SystemExit(f"conv op {k} differs between the int8 and the step model")
        if q["op_name"] == "CONV_2D":
            w = w.transpose(0, 3, 1, 2)
        elif q["op_name"] == "DEPTHWISE_CONV_2D":
            w = w.transpose(3, 0, 1, 2)
        weights[str(k)] = w
        pin = sg.producer.get(s["inputs"][0])
        source = s["inputs"][0] if pin is None else pin["inputs"][0]  # graph input, or what QUANTIZE reads
        outs = sg.consumers.get(s["outputs"][0], [])
        rows.append({
            "tensor": cdet[c["outputs"][0]]["name"], "op": q["op_name"],
            "input_q": [float(x) for x in det[q["inputs"][0]]["quantization"]],
            "output_q": [float(x) for x in det[q["outputs"][0]]["quantization"]],
            "float_input_removable": (pin is None or pin["op_name"] == "QUANTIZE")
                                     and np.dtype(sdet[source]["dtype"]) == np.float32,
            "float_output_removable": bool(outs) and all(o["op_name"] == "DEQUANTIZE" for o in outs),
        })
    np.savez(args["weights"], **weights)
    with open(args["out"], "w") as f:
        json.dump(rows, f, indent=1)


def _interpreter(args: dict):
    """A LiteRT interpreter with the default (XNNPACK) delegate, tensors allocated."""
    from ai_edge_litert import interpreter as lit

    it = lit.Interpreter(model_path=args["model"], num_threads=args.get("threads", 2))
    it.allocate_tensors()
    return it


def cmd_run(args: dict) -> None:
    """Run a .tflite on normalized NHWC float images; write float32 logits."""
    it = _interpreter(args)
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    images = np.load(args["images"])
    logits = []
    for x in images:
        x = x[None]
        if inp["dtype"] in (np.int8, np.uint8):
            scale, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zp), info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], x.astype(inp["dtype"], copy=False))
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] in (np.int8, np.uint8):
            scale, zp = out["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        logits.append(np.asarray(y, np.float32).reshape(-1))
    np.save(args["out"], np.stack(logits))


def cmd_inspect(args: dict) -> None:
    """Op histogram, ops computed in float, I/O details and delegate coverage."""
    from ai_edge_litert import interpreter as lit

    it = lit.Interpreter(
        model_path=args["model"], num_threads=1, experimental_disable_delegate_node_fusion=True
    )
    it.allocate_tensors()
    ops = it._get_ops_details()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    delegated_outputs = {tuple(o["outputs"]) for o in ops if o["op_name"] == "DELEGATE"}
    hist, float_ops, not_delegated = Counter(), Counter(), Counter()
    for o in ops:
        if o["op_name"] == "DELEGATE":
            continue
        hist[o["op_name"]] += 1
        first = next((tensors[i] for i in o["inputs"] if i in tensors), None)
        dtype = np.dtype(first["dtype"]).name if first is not None else ""
        if dtype in ("float32", "float16") and o["op_name"] not in ("QUANTIZE",):
            float_ops[o["op_name"]] += 1
        if tuple(o["outputs"]) not in delegated_outputs:
            not_delegated[o["op_name"]] += 1

    def io(d):
        return {
            "name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
            "quantization": {"scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])},
        }

    result = {
        "ops": dict(hist.most_common()),
        "total_ops": int(sum(hist.values())),
        "float_ops": dict(float_ops.most_common()),
        "not_delegated": dict(not_delegated.most_common()),
        "input": io(it.get_input_details()[0]),
        "output": io(it.get_output_details()[0]),
    }
    with open(args["out"], "w") as f:
        json.dump(result, f, indent=1)


def cmd_bench(args: dict) -> None:
    """Latency of one or more .tflite files, in ms: warm-up, then timed invokes in interleaved rounds.

    ``models`` are loaded once; each round times every model in turn, so drift
    of a shared machine hits them alike. Writes ``{model: [samples...]}``.
    """
    interpreters = {}
    for path in args["models"]:
        it = _interpreter({**args, "model": path})
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
        warm_up(it.invoke, args.get("warmup", 5), args.get("warmup_secs", 0.0))
        interpreters[path] = it
    samples: dict[str, list[float]] = {path: [] for path in interpreters}
    for _ in range(args.get("rounds", 1)):
        for path, it in interpreters.items():
            for _ in range(args.get("runs", 30)):
                t = time.perf_counter()
                it.invoke()
                samples[path].append((time.perf_counter() - t) * 1e3)
    with open(args["out"], "w") as f:
        json.dump(samples, f)


COMMANDS = {
    "convert": cmd_convert,
    "quantize": cmd_quantize,
    "histograms": cmd_histograms,
    "refine_ranges": cmd_refine_ranges,
    "sensitivity": cmd_sensitivity,
    "conv_ops": cmd_conv_ops,
    "run": cmd_run,
    "inspect": cmd_inspect,
    "bench": cmd_bench,
}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m converters.litert_worker {{{','.join(COMMANDS)}}} ARGS.json")
    with open(argv[1]) as f:
        COMMANDS[argv[0]](json.load(f))


if __name__ == "__main__":
    main(sys.argv[1:])
