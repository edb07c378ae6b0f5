"""What bench's warm-up floor changes: `effmod-edge bench` with and without it, A B B A, on one or more outputs.

Runs ``edge.bench.bench_manifest`` four times per manifest, with ``--warmup-secs``
0 (A: the warm-up before 4b6e9ce, 5 runs only) and the default (B), in the order
A B B A so drift of the machine hits both alike. Prints each run's median ms and
paired speed-up over fp32 TFLite per row. ONNX and TFLite rows only (no PyTorch).

Usage: python -m benchmarks.warmup_ab OUT/manifest.json [OUT2/manifest.json ...] [--rounds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time

from edge.bench import bench_manifest, require_manifest
from edge.errors import EffmodError
from edge.timing import WARMUP_SECS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifests", nargs="+")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        for path in args.manifests:
            manifest = require_manifest(path)
            for i, secs in enumerate((0.0, WARMUP_SECS, WARMUP_SECS, 0.0)):
                start = time.monotonic()
                result = bench_manifest(manifest, runs=args.runs, warmup=5, rounds=args.rounds,
                                        threads=(args.threads,), include_torch=False, warmup_secs=secs)
                print(f"{result['model']} run {i} ({'AB'[secs > 0]}, warmup_secs={secs}): "
                      f"{time.monotonic() - start:.0f} s", flush=True)
                for r in result["results"]:
                    if "median_ms" in r:
                        sp = r.get("speedup_vs_fp32_tflite") or {}
                        print(f"   {r['target']:6s} {r['precision']:10s} {r['median_ms']:7.2f} ms  "
                              f"{sp.get('median', 1.0):.3f}x ({sp.get('min', 1.0):.2f}-{sp.get('max', 1.0):.2f})",
                              flush=True)
    except EffmodError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
