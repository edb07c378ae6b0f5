#!/usr/bin/env bash
# The current-figures run of BENCHMARKS.md: every variant, every target and precision, proxy weights.
# For each variant: a proxy checkpoint (benchmarks/proxy_checkpoint.py), then
# effmod-edge convert --target onnx --target tflite --target coreml, and its accuracy table.
# Latency (effmod-edge bench) last, for the variants in $BENCH_VARIANTS (default xxs and s), so
# no conversion shares the cores with the timing.
# Usage: benchmarks/all_variants.sh OUT [VARIANT...]   (images: --calib-dir default, $EFFMOD_CALIB_DIR)
set -euo pipefail
out=${1:?usage: benchmarks/all_variants.sh OUT [VARIANT...]}
shift
if [ $# -gt 0 ]; then variants=("$@"); else variants=(efficientmod_xxs efficientmod_xs efficientmod_s efficientmod_s_conv); fi
here=$(dirname "$0")
mkdir -p "$out"
for v in "${variants[@]}"; do
    ckpt="$out/proxy_$v.pth"
    [ -f "$ckpt" ] || python "$here/proxy_checkpoint.py" "$v" "$ckpt"
    start=$(date +%s)
    effmod-edge convert --target onnx --target tflite --target coreml --model "$v" --weights "$ckpt" \
        --output "$out/$v" > "$out/$v.log" 2>&1 || echo "$v: convert exit $?" >> "$out/$v.log"
    echo "$v: convert wall seconds (onnx + tflite + coreml, all precisions): $(( $(date +%s) - start ))" \
        | tee -a "$out/times.txt"
    python "$here/accuracy_table.py" "$out/$v/manifest.json" > "$out/$v.md"
done
for v in ${BENCH_VARIANTS:-efficientmod_xxs efficientmod_s}; do
    [ -f "$out/$v/manifest.json" ] || continue
    effmod-edge bench "$out/$v/manifest.json" --runs 30 --rounds 3 > "$out/$v.bench.md"
done
python "$here/summary_table.py" "$out"/*/manifest.json > "$out/summary.md"
