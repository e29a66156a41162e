"""Shared test fixtures. Helpers that build and train tiny models live in tests/tiny.py."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models run chains of small ops, where a second thread
    only adds synchronisation (and on a busy 2-core machine waits for a descheduled thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
