"""Shared test fixtures. Helpers that build and train tiny models live in tests/tiny.py.

Torch's thread count is set per module with a fixture (never at import time, where it would
leak into every module collected after):
    pytestmark = pytest.mark.usefixtures("one_thread")
"""

import pytest
import torch


def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models run chains of small ops, where a second thread
    only adds synchronisation (and on a busy 2-core machine waits for a descheduled thread)."""
    yield from _threads(1)


@pytest.fixture(scope="module")
def two_threads():
    """Two torch threads for a module that trains (what this 2-core machine has, and no more on
    a bigger one, so timings stay comparable)."""
    yield from _threads(2)
