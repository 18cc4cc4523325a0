"""Test settings: offline, no progress bars, quiet threads."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
os.environ.setdefault("COLUMNS", "200")  # wide rich output: one error per line in captured stderr


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks are per-op overhead bound: on a shared 2-core machine one torch thread runs them many times
    faster (no OpenMP contention). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``;
    the thread count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
