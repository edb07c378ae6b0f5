#!/usr/bin/env bash
# Convert one variant to ONNX + every TFLite precision, then time and tabulate it.
# Usage: benchmarks/tflite.sh [VARIANT] [OUT]   (weights: $EFFMOD_WEIGHTS, else random)
set -euo pipefail
variant=${1:-efficientmod_xxs}
out=${2:-out/bench-$variant}
start=$(date +%s)
effmod-edge convert --target onnx --target tflite --model "$variant" --output "$out" \
    ${EFFMOD_WEIGHTS:+--weights "$EFFMOD_WEIGHTS"}
echo "convert wall seconds (onnx + all tflite precisions, calibration and checks): $(( $(date +%s) - start ))"
effmod-edge bench "$out/manifest.json" --runs 30 --rounds 3
python "$(dirname "$0")/accuracy_table.py" "$out/manifest.json"
