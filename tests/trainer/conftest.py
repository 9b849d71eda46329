"""Fixtures of the trainer tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and two threads spin badly when the 2-core machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
