"""Paired latency of .tflite files loaded once in one long-lived LiteRT worker (an app's steady state).

`effmod-edge bench` times every artifact in a fresh worker per round; this script
loads all files once, warms them up, and times them in interleaved rounds
(``converters.to_tflite.time_tflite``). It prints each file's median and its
speed-up over the first file, per round: median and min-max.

Usage: python benchmarks/ab_latency.py BASELINE.tflite OTHER.tflite [...] [--threads 2] [--rounds 20]
       [--runs 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from converters.to_tflite import time_tflite
from edge.errors import EffmodError


def round_ratios(samples: dict[Path, list[float]], baseline: Path, rounds: int, runs: int) -> dict[Path, np.ndarray]:
    """Per file, the baseline's per-round median latency over the file's: one speed-up per round."""
    per_round = {f: np.median(np.asarray(v).reshape(rounds, runs), axis=1) for f, v in samples.items()}
    return {f: per_round[baseline] / m for f, m in per_round.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    try:
        for f in args.files:
            if f.suffix != ".tflite" or not f.is_file():
                raise EffmodError(f"{f}: not an existing .tflite file")
        if len(args.files) < 2 or len(set(args.files)) < len(args.files) or min(args.threads, args.rounds, args.runs) < 1 or args.warmup < 0:
            raise EffmodError("pass at least two different files, and --threads/--rounds/--runs >= 1, --warmup >= 0")
        with tempfile.TemporaryDirectory() as work:
            samples = time_tflite(args.files, Path(work), threads=args.threads, rounds=args.rounds, runs=args.runs,
                                  warmup=args.warmup)
    except EffmodError as exc:
        sys.exit(f"error: {exc}")
    ratios = round_ratios(samples, args.files[0], args.rounds, args.runs)
    print(f"{args.threads} threads, {args.rounds} rounds x {args.runs} runs, one worker")
    print("| file | median ms | speed-up vs first (rounds: median, min-max) |")
    print("|---|---:|---|")
    for f in args.files:
        r = ratios[f]
        print(f"| {f} | {np.median(samples[f]):.2f} | {np.median(r):.2f}x ({r.min():.2f}-{r.max():.2f}) |")


if __name__ == "__main__":
    main()
