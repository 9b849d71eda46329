"""The workers' torch.distributed rendezvous, listening on the node's own address instead of every interface.

Ray Train's TorchConfig sets the process group up through ``env://``: rank 0's TCPStore server then binds to
all interfaces (``::``), so every training job opened a port to whatever network reaches the node (found by
listing a running job's sockets; tests/integration/test_preemption.py now checks that none listens on a
wildcard address). Here rank 0 binds the store's socket itself, to the address Ray knows the node by
(127.0.0.1 on an embedded Ray), with a port the kernel picks while it is bound (no free-port race), and hands
it to TCPStore (``master_listen_fd``); the other ranks connect to it and every rank builds its process group
from that store. Everything else is Ray Train's TorchConfig: the backend choice (gloo on CPU, NCCL on GPUs),
the torchrun-style environment variables, the teardown.

This relies on Ray Train's ``_TorchBackend`` (Ray 2.60) like orchestrator/failure_policy.py on its failure
policy; the socket test fails if a Ray release bypasses it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

# The worker process's store: rank 0's holds the server, which must live as long as the process group.
_store = None
_listener: socket.socket | None = None


def open_store(timeout_s: int) -> tuple[str, int]:
    """Rank 0: the rendezvous server on this node's address; returns (address, port)."""
    global _store, _listener
    import torch.distributed as dist

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    _listener = socket.create_server((addr, 0), family=family)
    port = _listener.getsockname()[1]
    _store = dist.TCPStore(addr, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                           master_listen_fd=_listener.fileno())
    return addr, port


def join_process_group(backend: str, rank: int, world_size: int, addr: str, port: int,
                       timeout_s: int) -> None:
    """Every rank: connect to rank 0's store and build the process group from it."""
    global _store
    import torch.distributed as dist

    # also for libraries that read them (DeepSpeed's own init checks MASTER_ADDR / MASTER_PORT)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if "nccl" in backend:
        # as Ray Train does: a hung NCCL collective raises instead of blocking forever
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if rank != 0:
        _store = dist.TCPStore(addr, port, None, False, timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=_store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        timeout_s = backend_config.timeout_s
        addr, port = worker_group.execute_single(0, open_store, timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend, rank, world_size, addr,
                                                   port, timeout_s) for rank in range(world_size)])


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store listens on the node's address only (see the module's docstring)."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend
