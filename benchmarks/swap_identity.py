"""Check that swapping GPTQ weights into the fp16 program gives the program a fresh conversion gives, and time both.

``converters.to_coreml.swap_weights`` builds the w8/w8a8 and palette packages'
fp16 programs from the float fp16 program instead of exporting and converting
the GPTQ-rounded networks again. For one variant and form this script rounds the
conversion's layers (more than 2048 weights) with GPTQ onto int8 and onto 4-bit
palettes (``--gptq-images`` random images: the check needs rounded weights, not
good ones), converts each rounded network both ways, and prints the seconds of
each and whether the two programs have the same ops, consts and description.
Exit status 1 when any differs.

Usage: python -m benchmarks.swap_identity [--model efficientmod_xxs] [--form ane|plain] [--gptq-images 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from edge.errors import EffmodError

THRESHOLD = 2048  # coremltools' default: GPTQ rounds the layers it compresses


def program_summary(mlmodel: Any) -> tuple[list, list, str]:
    """Every op (type, inputs as positions of the ops that made them), every const's bytes in program order,
    and the model description. Positions, not names: coremltools numbers unnamed consts from a
    process-wide counter, so two conversions of one network name them differently."""
    from converters.to_coreml import program_copy

    func = program_copy(mlmodel).functions["main"]
    where = {name: f"input:{name}" for name in func.inputs}
    ops, consts = [], []
    for i, op in enumerate(func.operations):
        args = sorted((k, [where[x.name] for x in v] if isinstance(v, (list, tuple)) else where[v.name])
                      for k, v in op.inputs.items())
        ops.append((op.op_type, args))
        for j, out in enumerate(op.outputs):
            where[out.name] = f"{i}.{j}"
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            consts.append((i, op.outputs[0].val.dtype.str, op.outputs[0].val.tobytes()))
    return ops, consts, str(mlmodel.get_spec().description)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientmod_xxs")
    ap.add_argument("--form", choices=("ane", "plain"), default="ane")
    ap.add_argument("--gptq-images", type=int, default=4)
    args = ap.parse_args()
    from calibration.gptq import LayerRounder
    from converters.to_coreml import build_mlmodel, swap_weights
    from edge.ane import to_ane
    from edge.efficientmod import create_model, to_deploy

    try:
        deploy = to_deploy(create_model(args.model))
    except (EffmodError, KeyError, ValueError) as e:
        sys.exit(f"error: {e}")
    net = (to_ane(deploy) if args.form == "ane" else deploy).eval()
    images = np.random.default_rng(0).standard_normal((args.gptq_images, 3, 224, 224)).astype(np.float32)
    rounder = LayerRounder(net, images, min_elements=THRESHOLD + 1)
    nets = {"int8": rounder.network({n: rounder.int8(n) for n in rounder.layers}),
            "pal4": rounder.network({n: rounder.palette(n, 4) for n in rounder.layers})}
    base = build_mlmodel(net, 224, "fp16", "iOS17")
    same_all = True
    for weights, rounded in nets.items():
        t = time.perf_counter()
        fresh = build_mlmodel(rounded, 224, "fp16", "iOS17")
        t_fresh = time.perf_counter() - t
        t = time.perf_counter()
        swapped = swap_weights(base, net, rounded, 224, "iOS17")
        t_swap = time.perf_counter() - t
        if swapped is None:
            print(f"{args.model} {args.form} {weights}: swap_weights refused (the pipeline converts again)")
            continue
        a, b = program_summary(fresh), program_summary(swapped)
        same = [x == y for x, y in zip(a, b)]
        same_all &= all(same)
        print(f"{args.model} {args.form} {weights} ({len(rounder.layers)} layers rounded): convert {t_fresh:.2f} s, "
              f"swap {t_swap:.2f} s; ops {'same' if same[0] else 'DIFFER'}, "
              f"consts {'same' if same[1] else 'DIFFER'} ({len(a[1])}), description {'same' if same[2] else 'DIFFER'}")
    sys.exit(0 if same_all else 1)


if __name__ == "__main__":
    main()
