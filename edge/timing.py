"""Warm-up before timed runs, shared by `effmod-edge bench`, its LiteRT worker and the int8-mixed search."""

from __future__ import annotations

import time
from typing import Callable

WARMUP_SECS = 0.5  # untimed warm-up floor per row and round, as LiteRT's benchmark_model (warmup_min_secs)


def warm_up(fn: Callable[[], object], runs: int, seconds: float) -> None:
    """Call ``fn`` untimed at least ``runs`` times and until ``seconds`` have passed.

    The time floor is what LiteRT's ``benchmark_model`` does (``warmup_runs=1``,
    ``warmup_min_secs=0.5``): a count alone warms a fast model for less time than a slow one.
    """
    end = time.perf_counter() + seconds
    done = 0
    while done < runs or time.perf_counter() < end:
        fn()
        done += 1
