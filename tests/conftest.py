"""Shared test fixtures. Helpers that build and train tiny models live in tests/tiny.py.

Torch's thread count is set per module with a fixture (never at import time, where it would
leak into every module collected after):
    pytestmark = pytest.mark.usefixtures("one_thread")
"""

from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="session")
def numpy_only(tmp_path_factory):
    """PYTHONPATH for `python -S` (the standalone run.py's tests): links to numpy (and numpy.libs,
    its bundled BLAS) only, so nothing else (torch, tokenizers, jinja2) can be imported there."""
    d = tmp_path_factory.mktemp("numpy_only")
    site = Path(np.__file__).resolve().parent.parent
    for name in ("numpy", "numpy.libs"):
        if (site / name).exists():
            (d / name).symlink_to(site / name)
    return d


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where CUDA is: skipped (with the reason) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
