"""Re-run the TFLite int8-mixed conversion with one graph choice changed, for BENCHMARKS.md ablations.

Ablations (each against a default ``effmod-edge convert --target tflite`` run):

* ``single-depthwise``: the int8 graph keeps the 7x7 depthwise conv as one op
  instead of the 5x5 + two dilated edge convs;
* ``float-head``: int8-mixed also keeps the classifier ``FULLY_CONNECTED`` in float;
* ``float-adds``: int8-mixed also keeps every ``ADD`` (the residual stream, the
  LayerNorm centering, the split depthwise sums) in float;
* ``float-muls``: int8-mixed also keeps every ``MUL`` (the modulation product,
  the LayerNorm scaling) in float;
* ``stream-adds``: the int8-mixed ADD step keeps only the residual-stream ADDs
  in float, not the LayerNorm centering ADDs (their output feeds the square and
  the scaling MULs) nor the split-depthwise sums (an input is a depthwise conv).

The change is made by wrapping the converter's own functions for this process
only; the package itself is untouched. Prints the int8-mixed file's size, op
histogram and checks against PyTorch.

Usage: python benchmarks/ablate_tflite.py ABLATION --model efficientmod_xxs [--weights CKPT] --output OUT
(images from --calib-dir or $EFFMOD_CALIB_DIR)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import converters.to_tflite as to_tflite
from converters.litert_worker import read_graph
from edge.errors import EffmodError
from edge.pipeline import ConvertRequest, convert

ABLATIONS = ("single-depthwise", "float-head", "float-adds", "float-muls", "stream-adds")
EXTRA_FLOAT_OPS = {"float-head": "FULLY_CONNECTED", "float-adds": "ADD", "float-muls": "MUL"}


def residual_stream_adds(model: Path) -> list[str]:
    """Output tensors of the ADDs on the residual stream: no depthwise-conv input, not feeding 2+ MULs."""
    g = read_graph(model.read_bytes())
    return [g.names[o["outputs"][0]] for o in g.ops if o["op_name"] == "ADD"
            and "DEPTHWISE_CONV_2D" not in [g.producer[i]["op_name"] for i in o["inputs"] if i in g.producer]
            and [c["op_name"] for c in g.consumers.get(o["outputs"][0], [])].count("MUL") < 2]


def apply(ablation: str) -> None:
    """Patch the converter of this process for ``ablation``."""
    if ablation == "single-depthwise":
        deploy = to_tflite.to_deploy
        to_tflite.to_deploy = lambda *a, **k: deploy(*a, **{**k, "dw_impl": "single"})
    elif ablation in EXTRA_FLOAT_OPS:
        quantize = to_tflite._Builder.quantize

        def with_float_op(self, out, int8_io=False, denylist=None):
            if denylist:  # only the int8-mixed steps pass a denylist
                denylist = {**denylist, "ops": [*denylist.get("ops", []), EXTRA_FLOAT_OPS[ablation]]}
            return quantize(self, out, int8_io, denylist)

        to_tflite._Builder.quantize = with_float_op
    elif ablation == "stream-adds":
        quantize = to_tflite._Builder.quantize
        found: dict[Path, list[str]] = {}

        def stream_adds_only(self, out, int8_io=False, denylist=None):
            if denylist and "ADD" in denylist.get("ops", []):
                calibrated = self.calibrated()
                if calibrated not in found:
                    found[calibrated] = residual_stream_adds(calibrated)
                nodes = found[calibrated]
                denylist = {**denylist, "ops": [o for o in denylist["ops"] if o != "ADD"],
                            "nodes": [*denylist.get("nodes", []), *nodes]}
            return quantize(self, out, int8_io, denylist)

        to_tflite._Builder.quantize = stream_adds_only
    else:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ablation", choices=ABLATIONS)
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--calib-dir")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    apply(args.ablation)
    try:
        res = convert(ConvertRequest(targets=["tflite"], output=Path(args.output), model=args.model,
                                     weights=args.weights, calib_dir=args.calib_dir, precisions=["int8-mixed"]))
    except EffmodError as exc:
        sys.exit(f"error: {exc}")
    for a in res.manifest.artifacts:
        c = a.checks
        print(json.dumps({"ablation": args.ablation, "file": a.path, "bytes": a.bytes, "ops": a.details["ops"],
                          "float_ops": a.details["float_ops"], "top1_agreement": c["top1_agreement"],
                          "sqnr_db": round(float(c["sqnr_db"]), 2), "max_abs_diff": c["max_abs_diff"]}))
    for f in res.manifest.failures:
        print(f"FAILED {f.precision}: {f.error}")


if __name__ == "__main__":
    main()
