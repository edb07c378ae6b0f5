"""Torch's intra-op thread count, set for a block of work and restored after it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` (at least 1) torch threads, then restore the previous count.

    Torch's OpenMP workers spin while they wait: with more threads than free
    cores (another process converting beside it, or NumPy's BLAS threads) a
    block runs far slower than with fewer threads.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
