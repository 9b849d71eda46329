"""Runs a function on N ranks over gloo, each in a spawned process (a real process group on 127.0.0.1, as a
Ray Train worker has), and returns what rank 0's call returned."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.integration.services import free_port


def _rank(rank: int, fn: Callable, port: int, world: int, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    record = fn(rank, world)
    if rank == 0:
        torch.save(record, out)
    dist.destroy_process_group()


def run_on_gloo_ranks(fn: Callable[[int, int], Any], folder: Path, world: int = 2) -> Any:
    """``fn(rank, world)`` on ``world`` ranks (``fn`` importable at module level: the ranks are spawned); rank
    0's result, passed back through ``folder``."""
    out = Path(folder) / "record.pt"
    mp.start_processes(_rank, args=(fn, free_port(), world, str(out)), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out)
