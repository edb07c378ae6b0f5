#!/bin/bash
# Does one onnxsim pass before onnx2tf (-nuo) give the same .tflite files as onnx2tf's own three onnxsim runs?
# For every variant and both LayerNorm forms of the TFLite deploy form; random weights (the graph is what counts).
# Usage: benchmarks/onnxsim_once.sh [WORK_DIR [VARIANT...]]   (from the repository root, in its venv; all four
# variants take ~20 min on 2 cores)
set -euo pipefail
work=$(realpath -m "${1:-/tmp/onnxsim-once}")
repo=$(pwd)
mkdir -p "$work"
npy=calibration_image_sample_data_20x128x128x3_float32.npy  # onnx2tf downloads it unless it is in its folder
python -c "import sys, numpy as np; np.save(sys.argv[1], np.zeros((20, 128, 128, 3), np.float32))" "$work/$npy"
variants=("${@:2}")
[ ${#variants[@]} -gt 0 ] || variants=(efficientmod_xxs efficientmod_xs efficientmod_s efficientmod_s_conv)
for v in "${variants[@]}"; do
  for form in reduce conv; do
    d="$work/$v-$form"
    rm -rf "$d" && mkdir -p "$d/own" "$d/once"
    PYTHONPATH="$repo" python - "$v" "$form" "$d" <<'EOF'
import sys
from pathlib import Path

import onnx
import onnxsim

from converters.to_onnx import export_onnx
from converters.to_tflite import ONNX_OPSET
from edge.efficientmod import create_model, to_deploy

variant, form, d = sys.argv[1:]
net = to_deploy(create_model(variant).eval(), 224, norm_impl=form, dw_impl="split")
export_onnx(net, Path(d, "own", "model.onnx"), 224, opset=ONNX_OPSET)
model, checked = onnxsim.simplify(onnx.load(Path(d, "own", "model.onnx")))
assert checked
onnx.save(model, Path(d, "once", "model.onnx"))
EOF
    cp "$work/$npy" "$d/own/" && cp "$work/$npy" "$d/once/"
    (cd "$d/own" && python -c "from onnx2tf.onnx2tf import main; main()" -i model.onnx -o out -n > log 2>&1) &
    own=$!
    trap 'kill $own 2> /dev/null' EXIT
    (cd "$d/once" && python -c "from onnx2tf.onnx2tf import main; main()" -i model.onnx -o out -n -nuo > log 2>&1)
    wait $own
    trap - EXIT
    for p in float32 float16; do
      if cmp -s "$d/own/out/model_$p.tflite" "$d/once/out/model_$p.tflite"; then r=same; else r=DIFFERENT; fi
      echo "$v $form $p: $r"
    done
  done
done
