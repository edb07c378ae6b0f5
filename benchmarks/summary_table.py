"""One markdown table across variants: per target and precision, size, SQNR and agreement of each manifest.

Usage: python benchmarks/summary_table.py OUT/efficientmod_xxs/manifest.json OUT/efficientmod_s/manifest.json ...
Each cell is ``SQNR dB / agreement (i.i.d.-noise agreement) / MB``; the last
figure in brackets is what Gaussian logit noise of that SQNR would leave on the
same images (:func:`edge.checks.noise_limited_agreement`); ``*`` marks a file that misses its bar.
"""

from __future__ import annotations

import sys

from edge.manifest import Manifest


def cell(checks: dict, size: int) -> str:
    ties = checks.get("near_ties")
    expected = f" ({ties['expected_agreement']:.0%})" if ties else ""
    miss = "" if checks["passed"] else " *"
    return f"{checks['sqnr_db']:.1f} / {checks['top1_agreement']:.0%}{expected} / {size / 1e6:.2f}{miss}"


def table(manifests: list[Manifest]) -> str:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for m in manifests:
        for a in m.artifacts:
            key = (a.target, f"{a.precision} (`*{a.path.removeprefix(m.model)}`)")
            rows.setdefault(key, {})[m.model] = cell(a.checks, a.bytes)
        for f in m.failures:
            rows.setdefault((f.target, f"{f.precision} (failed)"), {})[m.model] = f"FAILED: {f.error[:60]}"
    models = [m.model for m in manifests]
    out = ["| target | precision (file) | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for (target, precision), cells in rows.items():
        out.append(f"| {target} | {precision} | " + " | ".join(cells.get(m, "-") for m in models) + " |")
    out.append("")
    out.append("Cells: SQNR dB / top-1 agreement (agreement i.i.d. Gaussian logit noise of that SQNR would "
               "leave) / MB; "
               "`*` misses its bar.")
    return "\n".join(out)


if __name__ == "__main__":
    print(table([Manifest.load(p) for p in sys.argv[1:]]))
