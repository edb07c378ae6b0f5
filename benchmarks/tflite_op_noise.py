"""Where the TFLite int8-mixed logit noise comes from, by op type (for BENCHMARKS.md).

Runs a normal ``int8-mixed`` conversion and, on the same calibrated model,
re-quantizes it with different op types denylisted (kept float), measuring the
logits of each file against PyTorch on the first calibration images:

* ``base``: what int8-mixed keeps float at its ADD step (XNNPACK's float op
  types, every ADD, the LayerNorm statistics);
* ``+TYPE float``: the base with every op of TYPE float too (what floating
  that type would buy);
* ``only TYPE int8``: every other op type float, so only TYPE's inputs,
  outputs and weights are int8 (the noise that type brings on its own).

Each row gives SQNR, agreement and the noise power as a share of the logits'
power (``10^(-SQNR/10)``): noise powers of independent sources add, so the
``only`` rows show how the base's noise divides between op types.

Usage: python benchmarks/tflite_op_noise.py --model efficientmod_s --weights P.pth --output OUT [--images 64]
(images from --calib-dir or $EFFMOD_CALIB_DIR)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import converters.to_tflite as to_tflite
from edge.checks import compare_logits
from edge.context import torch_logits
from edge.errors import EffmodError
from edge.pipeline import ConvertRequest, convert

OP_TYPES = {
    "CONV_2D": ("CONV_2D",),
    "DEPTHWISE_CONV_2D": ("DEPTHWISE_CONV_2D",),
    "MUL": ("MUL",),
    "FULLY_CONNECTED": ("FULLY_CONNECTED",),
    "data movement": ("CONCATENATION", "PAD", "STRIDED_SLICE", "TRANSPOSE", "RESHAPE"),
}
OTHER = ("MEAN",)  # in no group: kept float in the "only" rows


def variants() -> dict[str, list[str]]:
    """Row name -> op types denylisted beyond XNNPACK's float op types."""
    base = ["ADD"]
    everything = base + [t for types in OP_TYPES.values() for t in types] + list(OTHER)
    rows = {"base": base}
    rows.update({f"+{name} float": base + list(types) for name, types in OP_TYPES.items()})
    rows.update({f"only {name} int8": [t for t in everything if t not in types] for name, types in OP_TYPES.items()})
    return rows


def study(images: int):
    """A replacement for ``to_tflite._mixed`` that measures the rows, then converts as usual."""
    mixed = to_tflite._mixed

    def run(b: to_tflite._Builder, stem: str):
        imgs = np.load(b.calib_npy)[:images]
        ref = torch_logits(b.ctx.loaded.model, np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
        print("| kept float beyond GELU, RSQRT, SOFTMAX, BATCH_MATMUL, LayerNorm stats | SQNR dB | noise share | "
              "agreement | MB |\n|---|---:|---:|---:|---:|", flush=True)
        for i, (name, ops) in enumerate(variants().items()):
            path = b.quantize(b.build / f"op_noise_{i}.tflite", denylist={
                "ops": list(to_tflite.RUNTIME_FLOAT_OPS) + ops, "nodes": [], "layernorm_stats": True})
            m = compare_logits(ref, to_tflite.litert_logits(path, imgs, b.build))
            print(f"| {name} | {m['sqnr_db']:.2f} | {10 ** (-m['sqnr_db'] / 10):.2e} | "
                  f"{m['top1_agreement']:.1%} | {path.stat().st_size / 1e6:.2f} |", flush=True)
        print(f"({len(imgs)} calibration images, logits against PyTorch fp32)", flush=True)
        return mixed(b, stem)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--calib-dir")
    ap.add_argument("--output", required=True)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    to_tflite._mixed = study(args.images)
    try:
        convert(ConvertRequest(targets=["tflite"], output=Path(args.output), model=args.model,
                               weights=args.weights, calib_dir=args.calib_dir, precisions=["int8-mixed"]))
    except EffmodError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
