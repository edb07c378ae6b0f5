"""What the int8 ops outside XNNPACK cost a full-integer .tflite: a timing-only experiment.

A full-integer EfficientMod file leaves GELU, RSQRT, BATCH_MATMUL and SOFTMAX
outside the XNNPACK delegate (``effmod-edge inspect``), which has no int8
kernels for them. This script writes copies of a conversion's ``*_int8.tflite``
in which those GELU (then also RSQRT) ops are swapped for int8 LOGISTIC, an op
of the same shape that XNNPACK does run in int8, and times them beside the
fp32, int8 and int8-mixed files in one LiteRT worker (interleaved rounds).

The swapped files compute the wrong function: they exist only to show how
much latency each op type's fallback costs, i.e. what an int8 kernel for it
could buy. Nothing here is written into a conversion's output folder.

Usage: python -m benchmarks.int8_fallback_cost OUT [--threads 2] [--rounds 10] [--runs 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.ab_latency import round_ratios
from converters.to_tflite import inspect_tflite, time_tflite
from edge.errors import EffmodError

SWAPS = (("GELU",), ("GELU", "RSQRT"))


def swap_to_logistic(src: Path, dst: Path, op_names: tuple[str, ...]) -> int:
    """Copy ``src`` to ``dst`` with every op named in ``op_names`` replaced by int8 LOGISTIC; returns how many."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    from converters.litert_worker import _opcode_indices

    model = fu.read_model(str(src))
    ops = fu.schema_fb.BuiltinOperator
    codes = set().union(*(_opcode_indices(model, getattr(ops, name)) for name in op_names))
    code = fu.schema_fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = ops.LOGISTIC
    code.version = 2  # the int8 kernel
    model.operatorCodes.append(code)
    logistic = len(model.operatorCodes) - 1
    graph = model.subgraphs[0]
    swapped = 0
    for op in graph.operators:
        if op.opcodeIndex in codes:
            op.opcodeIndex, op.builtinOptionsType, op.builtinOptions = logistic, 0, None
            q = graph.tensors[op.outputs[0]].quantization
            q.scale, q.zeroPoint = [1 / 256], [-128]  # the output quantization int8 LOGISTIC requires
            swapped += 1
    fu.write_model(model, str(dst))
    return swapped


def _one(out: Path, pattern: str) -> Path:
    found = sorted(out.glob(pattern))
    if len(found) != 1:
        raise EffmodError(f"{out}: expected one {pattern} file, found {len(found)}; pass the --output folder of "
                          "`effmod-edge convert --target tflite` with the fp32, int8 and int8-mixed precisions")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    try:
        if not args.out.is_dir():
            raise EffmodError(f"{args.out}: no such folder")
        if min(args.threads, args.rounds, args.runs) < 1:
            raise EffmodError("--threads, --rounds and --runs must be >= 1")
        fp32, int8, mixed = (_one(args.out, p) for p in ("*_fp32.tflite", "*_int8.tflite", "*_int8_mixed.tflite"))
        with tempfile.TemporaryDirectory() as work:
            work_dir = Path(work)
            files, labels = [fp32, int8], ["fp32", "int8 (full integer)"]
            for names in SWAPS:
                dst = work_dir / f"int8_{'_'.join(n.lower() for n in names)}_as_logistic.tflite"
                n = swap_to_logistic(int8, dst, names)
                files.append(dst)
                labels.append(f"int8, {n} {' + '.join(names)} swapped for LOGISTIC (timing only)")
            files.append(mixed)
            labels.append("int8-mixed")
            outside = [inspect_tflite(f, work_dir)["not_delegated"] for f in files]
            samples = time_tflite(files, work_dir, threads=args.threads, rounds=args.rounds, runs=args.runs, warmup=5)
    except EffmodError as exc:
        sys.exit(f"error: {exc}")
    ratios = round_ratios(samples, fp32, args.rounds, args.runs)
    print(f"{args.threads} threads, {args.rounds} rounds x {args.runs} runs, one worker")
    print("| file | not delegated | median ms | speed-up vs fp32 (rounds: median, min-max) |")
    print("|---|---|---:|---|")
    for f, label, nd in zip(files, labels, outside):
        r = ratios[f]
        names = ", ".join(f"{k} {v}" for k, v in nd.items()) or "none"
        print(f"| {label} | {names} | {np.median(samples[f]):.2f} | {np.median(r):.2f}x ({r.min():.2f}-{r.max():.2f}) |")


if __name__ == "__main__":
    main()
