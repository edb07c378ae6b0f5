"""Agreement of existing artifacts with PyTorch on every image a conversion's calibration left out.

`effmod-edge convert` checks each file on ``--eval-size`` images (default 100),
too few to settle a 99 % agreement bar. This script re-creates the same
calibration split (same folder, ``--calib-size`` and seed) and runs the given
.tflite / .onnx / .mlpackage files on the held-out images after it, with the
runtime ``effmod-edge evaluate`` uses, printing SQNR, top-1 agreement with its
95 % Wilson interval, and the agreement i.i.d. logit noise of that SQNR would
leave (the near-tie model of ``edge.checks``).

Usage: python benchmarks/heldout_agreement.py --model efficientmod_xxs --weights CKPT
       [--calib-dir DIR] [--calib-size 200] [--eval-size 800] [--seed 0] FILE [FILE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from calibration.folder import scan_folder
from calibration.source import resolve_image_dir
from calibration.splits import make_split
from edge.checks import compare_logits, interval_text, noise_limited_agreement
from edge.context import torch_logits
from edge.errors import EffmodError
from edge.evaluate import artifact_logits
from edge.manifest import Artifact, TensorSpec
from edge.weights import load_model

TARGET_OF = {".tflite": "tflite", ".onnx": "onnx", ".mlpackage": "coreml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--calib-dir")
    ap.add_argument("--calib-size", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        split = make_split(scan_folder(resolve_image_dir(args.calib_dir)), args.calib_size, args.eval_size, args.seed)
        reference = torch_logits(load_model(args.model, args.weights, seed=args.seed).model, split.eval.nchw())
        print(f"{len(split.eval)} held-out images after {len(split.calib)} calibration images (seed {args.seed})")
        print("| file | SQNR dB | agreement | 95 % interval | expected (near-tie model) | seconds |")
        print("|---|---:|---:|---|---:|---:|")
        for f in args.files:
            target = TARGET_OF.get(f.suffix)
            if target is None or not f.exists():
                raise EffmodError(f"{f}: not an existing .tflite, .onnx or .mlpackage")
            spec = TensorSpec(name="input", layout="NCHW", dtype="float32", shape=[1, 3, 224, 224])
            art = Artifact(target, "-", f.name, 0, "", spec, spec)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                got = artifact_logits(f.parent, art, split.eval, Path(work))
            m = compare_logits(reference, got, split.eval.labels)
            print(f"| {f.name} | {m['sqnr_db']:.1f} | {100 * m['top1_agreement']:.1f} % | {interval_text(m['top1_agreement_ci95'])} | "
                  f"{100 * noise_limited_agreement(reference, m['sqnr_db']):.1f} % | {time.perf_counter() - start:.0f} |",
                  flush=True)
    except EffmodError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
