"""Static Neural Engine check of a Core ML ML Program (works on Linux).

The rules are heuristics collected from Apple's ANE guidance (ml-ane-transformers,
the Core ML performance docs) and observed Core ML behaviour, not Apple's
compiler: they flag what is *expected* to leave the Neural Engine (``fallback``)
or to run there slowly (``warnings``). On macOS, :func:`compute_plan_devices`
asks Core ML itself (``MLComputePlan``) where each op would run.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from converters.mil_interp import WEIGHT_OPS, dtype_name, precision_histogram

MAX_ANE_DIM = 16384  # a tensor axis longer than this does not fit the ANE
UNSUPPORTED_OPS = {
    "gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
    "non_maximum_suppression", "argsort", "topk", "cumsum", "while_loop", "cond", "random_normal",
    "random_uniform", "random_bernoulli", "random_categorical", "non_zero", "band_part", "lstm", "gru", "rnn",
}
CPU_TAIL_OPS = {"classify"}  # label lookup: runs on the CPU after the network, cheap
ANE_EINSUMS = {"nchw,nwhu->nchu", "chw,whu->chu"}  # the MIL einsum op's patterns, up to renaming
INT_ACTIVATION_OPS = {"quantize", "dequantize"}
DATA_MOVEMENT_OPS = {"reshape", "transpose", "split", "concat", "squeeze", "expand_dims", "slice_by_index", "tile"}
FLOAT_TYPES = {"fp16", "fp32", "fp64"}
ANE_FLOAT = "fp16"


def canonical_einsum(equation: str) -> str:
    """``equation`` with its index letters renamed in order of first use (``bkhc`` -> ``abcd``)."""
    names: dict[str, str] = {}
    out = []
    for ch in equation.replace(" ", ""):
        if ch.isalpha():
            names.setdefault(ch, "abcdefghijklmnopqrstuvwxyz"[len(names)])
            out.append(names[ch])
        else:
            out.append(ch)
    return "".join(out)


def _rank(var: Any) -> int | None:
    shape = getattr(var, "shape", None)
    return None if shape is None else len(shape)


def _symbolic(var: Any) -> bool:
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    return any(is_symbolic(d) for d in (getattr(var, "shape", None) or ()))


def check_program(program: Any) -> dict:
    """Op counts by precision plus the ops expected to fall back from (or be slow on) the ANE."""
    fallback: list[dict] = []
    warnings: list[dict] = []
    max_rank = 0
    for op in program.functions["main"].operations:
        if op.op_type in WEIGHT_OPS:
            continue
        outs = [v for v in op.outputs if _rank(v) is not None]
        ins = [
            v for val in op.inputs.values() for v in (val if isinstance(val, (list, tuple)) else (val,))
            if v.op is None or v.op.op_type != "const"
        ]
        ranks = [_rank(v) for v in outs + ins if _rank(v) is not None]
        max_rank = max([max_rank] + ranks)
        dtypes = {dtype_name(v) for v in op.outputs}
        reasons: list[str] = []
        notes: list[str] = []
        if op.op_type in UNSUPPORTED_OPS:
            reasons.append(f"{op.op_type} has no Neural Engine kernel")
        if op.op_type in CPU_TAIL_OPS:
            notes.append("classifier label lookup runs on the CPU")
        if any(r > 4 for r in ranks):
            reasons.append(f"rank-{max(ranks)} tensor (the ANE works on rank <= 4)")
        if any(_symbolic(v) for v in outs):
            reasons.append("dynamic shape")
        big = [d for v in outs + ins for d in (getattr(v, "shape", None) or ()) if isinstance(d, int) and d > MAX_ANE_DIM]
        if big:
            reasons.append(f"axis of size {max(big)} > {MAX_ANE_DIM}")
        if op.op_type == "einsum":
            eq = str(op.inputs["equation"].val)
            if canonical_einsum(eq) not in {canonical_einsum(e) for e in ANE_EINSUMS}:
                reasons.append(f"einsum {eq!r} is not one of the ANE equations {sorted(ANE_EINSUMS)}")
        float_out = dtypes & FLOAT_TYPES
        if op.op_type == "cast":
            notes.append("cast at the model boundary (input/output dtype change)")
        elif float_out and ANE_FLOAT not in float_out:
            reasons.append(f"computes in {'/'.join(sorted(float_out))}; the ANE computes in fp16 only")
        elif not float_out and op.op_type in DATA_MOVEMENT_OPS:
            notes.append(f"moves {'/'.join(sorted(dtypes))} data (no arithmetic)")
        elif not float_out and op.op_type not in INT_ACTIVATION_OPS | CPU_TAIL_OPS:
            reasons.append(f"integer compute ({'/'.join(sorted(dtypes))})")
        if op.op_type in INT_ACTIVATION_OPS:
            notes.append("int8 activations: int8-int8 compute only on A17 Pro / M4 and newer ANEs")
        if ranks and not reasons and op.op_type not in CPU_TAIL_OPS and min(ranks) < 4 and op.op_type != "cast":
            notes.append(f"rank-{min(ranks)} tensor, padded to 4-D on the ANE")
        if op.op_type == "transpose":
            perm = [int(p) % len(op.inputs["x"].shape) for p in op.inputs["perm"].val]
            if perm[-1] != len(perm) - 1 and op.inputs["x"].shape[perm[-1]] != 1:
                notes.append("transpose moves the innermost (last) axis: a real data relayout")
        if op.op_type == "reshape" and _rank(op.inputs["x"]) != _rank(op.outputs[0]):
            notes.append(f"reshape changes rank {_rank(op.inputs['x'])} -> {_rank(op.outputs[0])}")
        entry = {"op": op.name, "type": op.op_type}
        if reasons:
            fallback.append({**entry, "reasons": reasons})
        elif notes:
            warnings.append({**entry, "notes": notes})
    fb_types = Counter(f["type"] for f in fallback)
    return {
        "ops_by_precision": precision_histogram(program),
        "max_rank": max_rank,
        "rank5_ops": sum(1 for f in fallback if any("rank-" in r and "<= 4" in r for r in f["reasons"])),
        "fallback_count": len(fallback),
        "fallback_by_type": dict(sorted(fb_types.items())),
        "fallback": fallback,
        "warning_count": len(warnings),
        "warnings": warnings,
        "method": "static rules (converters.ane_check), not Apple's compiler",
    }


def compute_plan_devices(package: str | Path) -> dict:
    """Preferred compute device per op from Core ML's ``MLComputePlan`` (macOS 14.4+ only).

    Where the plan cannot be made (an older macOS, coremltools without its native
    library) the record says why: the package was built and checked, and stays.
    """
    if sys.platform != "darwin":
        return {"skipped": f"MLComputePlan needs macOS (this is {sys.platform})"}
    with tempfile.TemporaryDirectory(prefix="effmod-plan-") as tmp:  # the compiled model is only read here
        try:
            return _compute_plan_devices(package, Path(tmp) / "model.mlmodelc")
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return {"skipped": f"MLComputePlan failed: {type(exc).__name__}: {first}"}


def _compute_plan_devices(package: str | Path, compiled: Path) -> dict:
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    ct.models.utils.compile_model(str(package), destination_path=str(compiled))
    plan = MLComputePlan.load_from_path(path=str(compiled), compute_units=ct.ComputeUnit.ALL)
    devices: Counter = Counter()
    off_ane: list[str] = []
    for func in plan.model_structure.program.functions.values():
        for op in func.block.operations:
            if op.operator_name == "const":
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            if usage is None:
                continue
            device = type(usage.preferred_compute_device).__name__
            devices[device] += 1
            if "NeuralEngine" not in device:
                off_ane.append(f"{op.operator_name}:{op.outputs[0].name if op.outputs else ''} -> {device}")
    return {"preferred_device_counts": dict(devices), "off_ane": off_ane}
