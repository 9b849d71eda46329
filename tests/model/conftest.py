"""Model tests run torch on one thread: their tiny ops gain nothing from a second one, and on a shared 2-core
machine the threads' spin-waiting made them slow (suite at load 13: 96 s with 2 threads, 8.5 s with 1)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
