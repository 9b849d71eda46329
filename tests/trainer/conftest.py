"""Fixtures of the trainer tests."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and two threads spin badly when the 2-core machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group (the manager's collectives run as at world size 1)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files sha256_file read, in order."""
    from trainer import checkpoint as ckpt

    seen: list[str] = []
    real = ckpt.sha256_file

    def recording(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "sha256_file", recording)
    return seen
