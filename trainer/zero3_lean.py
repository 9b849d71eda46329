"""A lighter ZeRO-3 optimizer step: the same update as DeepSpeed's with the gradient norm taken in one pass
(bench/bench_host_overhead.py measures it; docs/BENCHMARKS.md).

DeepSpeed takes the norm per parameter group, and within a group per parameter (a cast to fp64 and a norm for
each), then all-reduces each group's norm on its own: with the trainer's 23 parameter groups
(trainer/engine.py: per top-level module, so that a stage can freeze one) that is 23 all-reduces and hundreds
of small kernels per step, ~9% of a ZeRO-3 step at a tiny width. Every group's gradient partition lies in one
flat buffer, one group after another (DeepSpeed allocates it so), and only the global norm is used (clipping,
the grad_norm metric): here it is one fp64 sum of squares over that buffer, in chunks to bound the fp64 copy,
and one all-reduce. Same elements, same precision; the summation order differs, so the norm can differ from
DeepSpeed's in its last bits (tests/trainer/test_zero3_lean.py).

Only where DeepSpeed's general path has nothing else to do: no optimizer offload (its norm is taken on the CPU
buffers), no Muon, no model or expert parallelism, every parameter trainable and partitioned over one process
group (the norm's all-reduce runs over it, as DeepSpeed's does). Elsewhere, or with a DeepSpeed that lacks
what is read here, the step keeps DeepSpeed's norm.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Elements per fp64 partial norm: bounds the temporary fp64 copy to 32 MiB whatever the model's size.
NORM_CHUNK = 1 << 22

# What the lighter step reads of DeepSpeed's stage-3 optimizer (DeepSpeed 0.19).
_OPTIMIZER_API = ("grad_partitions_flat_buffer", "fp16_groups", "model_parallel_group", "offload_optimizer",
                  "_get_norm_groups", "_get_param_partition_group")


def why_not_lean(optimizer: Any) -> str | None:
    """Why the lighter step cannot replace DeepSpeed's for this optimizer, or None when it can."""
    missing = [name for name in _OPTIMIZER_API if not hasattr(optimizer, name)]
    if missing:
        return f"this DeepSpeed's ZeRO-3 optimizer lacks {', '.join(missing)}"
    if optimizer.offload_optimizer:
        return "deepspeed.offload_optimizer: the norm is taken over the CPU buffers"
    if getattr(optimizer, "use_muon", False):
        return "Muon's updates are scaled per group"
    if optimizer.model_parallel_group is not None:
        return "model parallelism adds its own reductions to the norm"
    params = [p for group in optimizer.fp16_groups for p in group]
    if not params:
        return "the optimizer holds no parameters"
    if not all(p.requires_grad for p in params):
        return "a parameter without gradients sits in the optimizer's groups"
    group = optimizer._get_param_partition_group(params[0])
    if any(optimizer._get_param_partition_group(p) != group
           or getattr(p, "ds_zero_placement_family", "replicated") != "replicated" for p in params):
        return "the parameters are not all partitioned over one process group"
    if optimizer.grad_partitions_flat_buffer.numel() != sum(p.partition_numel() for p in params):
        return "the gradient partitions do not fill one flat buffer"
    return None


def global_grad_norm(flat: torch.Tensor, group: Any) -> torch.Tensor:
    """The 2-norm over every rank's gradient partitions, in fp64; -1 where it is not finite (DeepSpeed's
    sentinel, which its step turns into a skipped update)."""
    import deepspeed.comm as dist

    squares = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), NORM_CHUNK):
        squares += torch.linalg.vector_norm(flat[start:start + NORM_CHUNK], dtype=torch.float64).square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    norm = squares.sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, -1.0))


def lighten_zero3_optimizer(optimizer: Any) -> bool:
    """Gives this optimizer instance the one-pass norm; returns whether it did (else logs why not)."""
    reason = why_not_lean(optimizer)
    if reason is not None:
        log.info("ZeRO-3 keeps DeepSpeed's per-group gradient norm: %s", reason)
        return False
    group = next(optimizer._get_param_partition_group(p) for g in optimizer.fp16_groups for p in g)  # all's

    def norm_groups() -> list[torch.Tensor]:
        # One entry: DeepSpeed combines the groups' norms as a 2-norm, which of a single norm is that norm.
        # The buffer is read at each call: DeepSpeed may move it (offload's swaps assign its .data).
        return [global_grad_norm(optimizer.grad_partitions_flat_buffer, group)]

    optimizer._get_norm_groups = norm_groups
    return True
