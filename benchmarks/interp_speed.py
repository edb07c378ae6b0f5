"""Time the NumPy MIL interpreter on saved .mlpackage files, and check its outputs against a saved run.

Core ML convert spends much of its time evaluating packages with
``converters.mil_interp`` (checks, activation ranges, searches). This script runs
each package on the first ``--limit`` images of a folder (sorted by path) and
prints milliseconds per image. ``--save`` stores the outputs; ``--compare`` reads
such a file (from another commit: run the script with that checkout on
PYTHONPATH) and prints, per package, whether the outputs are bit-identical and
their max |Δ|.

Usage: python -m benchmarks.interp_speed PKG.mlpackage [...] --data DIR [--limit 12]
       [--save OUT.npz] [--compare OTHER.npz]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from calibration.folder import load_pixels, scan_folder
from edge.errors import EffmodError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path)
    args = ap.parse_args()
    try:
        for p in args.packages:
            if p.suffix != ".mlpackage" or not p.is_dir():
                raise EffmodError(f"{p}: not an existing .mlpackage folder")
        if args.limit < 1:
            raise EffmodError(f"--limit {args.limit}: pass at least 1 image")
        if args.compare is not None and not args.compare.is_file():
            raise EffmodError(f"--compare {args.compare}: no such file; write one with --save")
        folder = scan_folder(args.data, flag="--data")
        pixels, _, _ = load_pixels(sorted(folder.items, key=lambda i: str(i.path))[: args.limit])
        from converters import mil_interp

        reference = dict(np.load(args.compare)) if args.compare else {}
        outputs = {}
        for path in args.packages:
            pkg = mil_interp.load_package(path)
            start = time.perf_counter()
            outputs[path.stem] = out = mil_interp.run_package(pkg, pixels)
            line = f"{path.name}: {(time.perf_counter() - start) / len(pixels) * 1e3:.1f} ms/image on {len(pixels)} images"
            if path.stem in reference:
                ref = reference[path.stem]
                same = ref.shape == out.shape and np.array_equal(ref, out)
                diff = float(np.abs(ref - out).max()) if ref.shape == out.shape else float("nan")
                line += f"; against --compare: {'bit-identical' if same else 'DIFFERENT'} (max|d| {diff:.3g})"
            print(line, flush=True)
        if args.save:
            np.savez(args.save, **outputs)
    except EffmodError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
