"""Markdown accuracy/size table of a manifest (the BENCHMARKS.md accuracy rows)."""

from __future__ import annotations

import sys

from edge.manifest import Manifest
from edge.report import mixed_step_line


def table(manifest: Manifest) -> str:
    fp32 = {a.target: a.bytes for a in manifest.artifacts if a.precision == "fp32"}
    rows = ["| target | precision | file | MB | % of fp32 | agreement | i.i.d.-noise agreement | SQNR dB | "
            "SQNR for bar | cosine | max abs diff | top-1 | top-5 | passes |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in manifest.artifacts:
        c = a.checks
        share = f"{100 * a.bytes / fp32[a.target]:.0f}" if a.target in fp32 else "-"
        ties = c.get("near_ties")
        expected = f"{ties['expected_agreement']:.1%}" if ties else "-"
        needed = "-" if not ties else "ties" if ties["sqnr_db_for_min_agreement"] is None else \
            f"{ties['sqnr_db_for_min_agreement']:g}"
        rows.append(
            f"| {a.target} | {a.precision} | {a.path} | {a.bytes / 1e6:.2f} | {share} | {c['top1_agreement']:.1%} | "
            f"{expected} | {c['sqnr_db']:.1f} | {needed} | {c['cosine']:.4f} | {c['max_abs_diff']:.2e} | "
            f"{c.get('top1', float('nan')):.1%} | {c.get('top5', float('nan')):.1%} | "
            f"{'yes' if c['passed'] else 'no: ' + '; '.join(c['misses'])} |"
        )
    for f in manifest.failures:
        rows.append(f"| {f.target} | {f.precision} | FAILED after {f.seconds:.0f}s: {f.error} | | | | | | | | | | | |")
    mixed = [a for a in manifest.artifacts if a.precision == "int8-mixed"]
    for a in mixed:
        d = a.details
        rows.append("")
        rows.append(f"int8-mixed kept in float: op types {', '.join(d['kept_float_op_types'])}; "
                    f"LayerNorm statistics {'float' if d['layernorm_stats_float'] else 'int8'}; "
                    f"{len(d['kept_float_nodes'])} more ops; target met on calibration: "
                    f"{d['target_met_on_calibration']}")
        rows += [f"- {mixed_step_line(s)}" for s in d["search"]]
    d = manifest.data or {}
    rows.append("")
    rows.append(f"model {manifest.model}, weights {manifest.weights}; eval {d.get('eval_size')} images, "
                f"calib {d.get('calib_size')}, seed {d.get('seed')}")
    rows.append("i.i.d.-noise agreement: the top-1 agreement that Gaussian logit noise of the measured SQNR would "
                "leave on these images (edge.checks.noise_limited_agreement); SQNR for bar: the SQNR at which that "
                "reaches the agreement bar.")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Manifest.load(sys.argv[1])))
