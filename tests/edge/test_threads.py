"""torch_threads: the block runs with the count asked for (at least 1), the previous count comes back."""

from __future__ import annotations

import pytest
import torch

from edge.threads import torch_threads


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1, "inside torch_threads(1)"
    assert torch.get_num_threads() == before, "count not restored after the block"
    with torch_threads(0):
        assert torch.get_num_threads() == 1, "torch_threads(0) must run with one thread, not fail"
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before, "count not restored after an exception in the block"
