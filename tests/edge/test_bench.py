"""Speed-ups in the bench table are paired round by round against fp32 TFLite."""

from __future__ import annotations

from edge.bench import _speedup_vs_baseline, format_table


def _row(target: str, precision: str, threads: int) -> dict:
    return {"target": target, "precision": precision, "path": f"{target}-{precision}", "bytes": 1, "threads": threads}


def test_speedup_pairs_each_round_with_the_baseline_of_that_round():
    base, fast = _row("tflite", "fp32", 2), _row("tflite", "int8-mixed", 2)
    timed = [(base, [10.0, 20.0, 12.0]), (fast, [5.0, 10.0, 8.0])]
    sp = _speedup_vs_baseline(fast, timed[1][1], timed)
    assert sp == {"median": 2.0, "min": 1.5, "max": 2.0, "rounds": 3}, sp
    assert _speedup_vs_baseline(base, timed[0][1], timed)["median"] == 1.0


def test_no_speedup_without_a_baseline_at_that_thread_count():
    base, other = _row("tflite", "fp32", 2), _row("onnx", "fp32", 1)
    timed = [(base, [10.0]), (other, [9.0])]
    assert _speedup_vs_baseline(other, [9.0], timed) is None


def test_table_shows_the_paired_speedup():
    row = {**_row("tflite", "int8-mixed", 2), "median_ms": 5.0, "p90_ms": 6.0, "min_ms": 4.0,
           "speedup_vs_fp32_tflite": {"median": 1.61, "min": 1.52, "max": 1.7, "rounds": 5}}
    line = format_table({"results": [row]}).splitlines()[-1]
    assert "1.61x (1.52-1.70, 5)" in line, line


class _Clock:
    """A fake perf_counter that each warm-up call advances by ``step`` seconds."""

    def __init__(self, step: float):
        self.now, self.step, self.calls = 0.0, step, 0

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        self.calls += 1
        self.now += self.step


def test_warm_up_runs_the_count_when_it_outlasts_the_time_floor(monkeypatch):
    from edge import timing

    clock = _Clock(step=0.25)
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    timing.warm_up(clock.run, runs=5, seconds=0.5)
    assert clock.calls == 5, f"5 runs of 0.25 s outlast 0.5 s, so the count decides; ran {clock.calls}"


def test_warm_up_keeps_a_fast_model_running_until_the_time_floor(monkeypatch):
    from edge import timing

    clock = _Clock(step=2**-8)  # about 4 ms, exact in binary
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    timing.warm_up(clock.run, runs=5, seconds=0.5)
    assert clock.calls == 128, f"0.5 s of 1/256 s runs is 128 runs; ran {clock.calls}"


def test_machine_info_tells_a_vnni_host_from_an_avx2_one():
    """Two 'AMD EPYC' hosts of this project ran int8-mixed xxs at 1.9x and 1.0x fp32: the ISA must be recorded."""
    from edge.bench import _cpuinfo
    from edge.report import machine_line

    zen4 = ("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    zen3 = zen4.replace("model\t\t: 17", "model\t\t: 1").replace(" avx512f avx512_vnni avx512_bf16", "")
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU implementer\t: 0x41\n"
    assert _cpuinfo(zen4) == ("AMD EPYC", "cpu family 25 model 17", ["avx2", "fma", "avx512f", "avx512_vnni",
                                                                      "avx512_bf16"])
    name, ident, isa = _cpuinfo(zen3)
    line = machine_line({"cpu": name, "cpu_id": ident, "isa": isa, "cores": 2})
    assert line == "AMD EPYC (cpu family 25 model 1), 2 cores, ISA avx2 fma", line
    assert _cpuinfo(arm)[2] == ["asimddp", "i8mm"]
    assert machine_line({"cpu": "old", "cores": 2}) == "old, 2 cores", "a bench.json of before the isa field"
    assert machine_line({"cpu": "arm", "cpu_id": "", "isa": None, "cores": 8}) == "arm, 8 cores", \
        "no /proc/cpuinfo (macOS): the instruction sets are unknown, not absent"
