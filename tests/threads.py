"""The one-thread fixture the directories of tiny-model tests import into their conftest.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's spin-waiting
    made tests/hf ~8x slower (2.5 min against 20 s). Module-scoped and autouse, so it is set before any module
    fixture computes reference logits (thread count changes GEMM rounding); restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
