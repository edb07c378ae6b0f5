"""converters/ane_check.py: the static Neural Engine rules on small hand-built MIL programs."""

from __future__ import annotations

import pytest

ct = pytest.importorskip("coremltools", reason="Core ML extra not installed (pip install -e '.[coreml]')")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from converters.ane_check import ANE_EINSUMS, MAX_ANE_DIM, canonical_einsum, check_program  # noqa: E402

IOS17 = ct.target.iOS17


def _spec(*shape, dtype=types.fp16):
    return mb.TensorSpec(shape=shape, dtype=dtype)


def _summary(program) -> dict:
    r = check_program(program)
    return {"fallback": {f["type"]: f["reasons"] for f in r["fallback"]}, "fallback_count": r["fallback_count"],
            "max_rank": r["max_rank"], "rank5_ops": r["rank5_ops"], "warning_count": r["warning_count"]}


def test_canonical_einsum_renames_letters_in_order_of_use():
    assert canonical_einsum("bkhq, bqhv -> bkhv") == "abcd,adce->abce"
    assert canonical_einsum("nchw,nwhu->nchu") == "abcd,adce->abce"
    assert canonical_einsum("chw,whu->chu") == "abc,cbd->abd"
    # the same letters in another order are another contraction
    assert canonical_einsum("nhcw,nhwu->nhcu") == "abcd,abde->abce"
    assert canonical_einsum("nhcw,nhwu->nhcu") not in {canonical_einsum(e) for e in ANE_EINSUMS}


def test_fp16_rank4_program_with_a_renamed_ane_einsum_passes():
    @mb.program(input_specs=[_spec(1, 8, 4, 4), _spec(1, 4, 4, 6)], opset_version=IOS17)
    def prog(x, w):
        return mb.einsum(values=(mb.relu(x=x), w), equation="bkhq,bqhv->bkhv")

    r = check_program(prog)
    assert r["ops_by_precision"] == {"einsum": {"fp16": 1}, "relu": {"fp16": 1}}, r["ops_by_precision"]
    assert _summary(prog) == {"fallback": {}, "fallback_count": 0, "max_rank": 4, "rank5_ops": 0,
                              "warning_count": 0}, r


def test_rank3_ane_einsum_is_a_warning_not_a_fallback():
    @mb.program(input_specs=[_spec(8, 4, 4), _spec(4, 4, 6)], opset_version=IOS17)
    def prog(x, w):
        return mb.einsum(values=(x, w), equation="chw,whu->chu")

    r = check_program(prog)
    assert r["fallback_count"] == 0 and r["max_rank"] == 3, r
    assert [w["notes"] for w in r["warnings"]] == [["rank-3 tensor, padded to 4-D on the ANE"]], r["warnings"]


def test_non_ane_einsum_equation_is_flagged():
    @mb.program(input_specs=[_spec(1, 8, 4, 4), _spec(1, 4, 4, 6)], opset_version=IOS17)
    def prog(x, w):
        return mb.einsum(values=(x, w), equation="nchw,nwhu->nchu")

    # MIL's einsum builder only takes the ANE patterns; rewrite the built op's equation constant
    (op,) = [o for o in prog.functions["main"].operations if o.op_type == "einsum"]
    op.inputs["equation"]._sym_val.val = "nhcw,nhwu->nhcu"
    s = _summary(prog)
    assert s["fallback_count"] == 1 and list(s["fallback"]) == ["einsum"], s
    (reason,) = s["fallback"]["einsum"]
    assert reason.startswith("einsum 'nhcw,nhwu->nhcu' is not one of the ANE equations"), reason


def test_op_without_ane_kernel_is_flagged():
    @mb.program(input_specs=[_spec(1, 8, 4, 4)], opset_version=IOS17)
    def prog(x):
        return mb.topk(x=mb.relu(x=x), k=2, axis=1)

    s = _summary(prog)
    assert s["fallback"] == {"topk": ["topk has no Neural Engine kernel"]} and s["fallback_count"] == 1, s
    assert check_program(prog)["fallback_by_type"] == {"topk": 1}


def test_rank5_tensor_is_flagged_and_counted():
    @mb.program(input_specs=[_spec(1, 2, 3, 4, 5)], opset_version=IOS17)
    def prog(x):
        return mb.relu(x=x)

    s = _summary(prog)
    assert s == {"fallback": {"relu": ["rank-5 tensor (the ANE works on rank <= 4)"]}, "fallback_count": 1,
                 "max_rank": 5, "rank5_ops": 1, "warning_count": 0}, s


def test_axis_longer_than_the_ane_limit_is_flagged():
    @mb.program(input_specs=[_spec(1, 1, 2, MAX_ANE_DIM + 1)], opset_version=IOS17)
    def too_long(x):
        return mb.relu(x=x)

    @mb.program(input_specs=[_spec(1, 1, 2, MAX_ANE_DIM)], opset_version=IOS17)
    def at_limit(x):
        return mb.relu(x=x)

    s = _summary(too_long)
    assert s["fallback"] == {"relu": [f"axis of size {MAX_ANE_DIM + 1} > {MAX_ANE_DIM}"]} and s["rank5_ops"] == 0, s
    assert _summary(at_limit)["fallback_count"] == 0, _summary(at_limit)


def test_integer_and_fp32_compute_are_flagged():
    @mb.program(input_specs=[_spec(1, 4, 4, 4, dtype=types.int32)], opset_version=IOS17)
    def integer(x):
        return mb.add(x=x, y=x)

    @mb.program(input_specs=[_spec(1, 8, 4, 4, dtype=types.fp32)], opset_version=IOS17)
    def fp32(x):
        return mb.relu(x=x)

    assert _summary(integer)["fallback"] == {"add": ["integer compute (int32)"]}, _summary(integer)
    assert _summary(fp32)["fallback"] == {"relu": ["computes in fp32; the ANE computes in fp16 only"]}, _summary(fp32)



def test_compute_plan_that_cannot_be_made_is_a_skip_not_a_lost_package(monkeypatch, tmp_path):
    """On macOS before 14.4, or with coremltools lacking its native library, the plan fails: the package stays."""
    import coremltools as ct

    import converters.ane_check as ane
    from pathlib import Path

    seen = []

    def no_compiler(model, destination_path=None):
        seen.append(Path(destination_path))
        Path(destination_path).mkdir()
        raise Exception("Unable to compile the model: no native library")

    monkeypatch.setattr(ane.sys, "platform", "darwin")
    monkeypatch.setattr(ct.models.utils, "compile_model", no_compiler)
    got = ane.compute_plan_devices(tmp_path / "m.mlpackage")
    assert got == {"skipped": "MLComputePlan failed: Exception: Unable to compile the model: no native library"}, got
    assert seen and not seen[0].parent.exists(), "the compiled model's temp folder was left behind"
