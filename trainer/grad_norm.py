"""The gradient norm of DeepSpeed's ZeRO optimizers (stages 1-3) in one pass: the same norm, which clipping
and the grad_norm metric use, with one all-reduce per step instead of one per parameter group, and without a
Python loop over the parameters (bench/bench_host_overhead.py measures it; docs/BENCHMARKS.md).

DeepSpeed takes the norm per parameter group, and within a group per parameter (a cast to fp64 and a norm for
each), then all-reduces each group's norm on its own: with the trainer's 23 parameter groups
(trainer/engine.py: per top-level module, so that a stage can freeze one) that is 23 all-reduces and hundreds
of small kernels per step, 9-12% of a ZeRO step at a tiny width. Only the global norm is used, so here:
- ZeRO-3: every group's gradient partition lies in one flat buffer, one group after another (DeepSpeed
  allocates it so): one fp64 sum of squares over it, in chunks to bound the fp64 copy;
- ZeRO-1/2: the groups' partition gradients (a list of tensors each) in one fp64 ``_foreach_norm``;
then one all-reduce of the sum of squares over the data-parallel group. The same elements and precision as
DeepSpeed's (fp64 per tensor; ZeRO-3's sums in fp64, ZeRO-1/2's rank sums in fp32, whose overflow skips the
step as DeepSpeed's does); the summation order differs, so the norm can differ in its last bits
(tests/trainer/test_grad_norm.py).

Only where DeepSpeed's general path has nothing else to do: no optimizer offload (its norm is taken on the CPU
buffers), no Muon, no mixture of experts, no model or pipeline parallelism, every parameter trainable (ZeRO-3:
and partitioned over one process group, over which the all-reduce runs, as DeepSpeed's does). Elsewhere, or
with a DeepSpeed that lacks what is read here, the optimizer keeps DeepSpeed's norm and the reason is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Elements per fp64 partial norm (ZeRO-3's flat buffer): bounds the fp64 copy to 32 MiB at any model size.
NORM_CHUNK = 1 << 22

# What is read of DeepSpeed's optimizers (DeepSpeed 0.19), per kind.
_ZERO3_API = ("grad_partitions_flat_buffer", "fp16_groups", "model_parallel_group", "offload_optimizer",
              "_get_norm_groups", "_get_param_partition_group")
_ZERO12_API = ("bit16_groups", "averaged_gradients", "dp_process_group", "model_parallel_group",
               "cpu_offload", "has_moe_layers", "scaled_global_norm")


def _is_zero3(optimizer: Any) -> bool:
    """ZeRO-3's optimizer (DeepSpeedZeroOptimizer_Stage3) rather than ZeRO-1/2's (DeepSpeedZeroOptimizer)."""
    return hasattr(optimizer, "fp16_groups") and not hasattr(optimizer, "bit16_groups")


def _common_obstacle(optimizer: Any, params: list, api: tuple[str, ...], offload: str) -> str | None:
    missing = [name for name in api if not hasattr(optimizer, name)]
    if missing:
        return f"this DeepSpeed's {type(optimizer).__name__} lacks {', '.join(missing)}"
    if getattr(optimizer, offload):
        return "deepspeed.offload_optimizer: the norm is taken over the CPU buffers"
    if getattr(optimizer, "use_muon", False) or any(getattr(p, "use_muon", False) for p in params):
        return "Muon's updates are scaled per group"
    if optimizer.model_parallel_group is not None:
        return "model parallelism adds its own reductions to the norm"
    if not params:
        return "the optimizer holds no parameters"
    if not all(p.requires_grad for p in params):
        return "a parameter without gradients sits in the optimizer's groups"
    if any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return "pipeline-replicated parameters are counted once"
    return None


def _zero3_obstacle(optimizer: Any, params: list) -> str | None:
    group = optimizer._get_param_partition_group(params[0])
    if any(optimizer._get_param_partition_group(p) != group
           or getattr(p, "ds_zero_placement_family", "replicated") != "replicated" for p in params):
        return "the parameters are not all partitioned over one process group"
    if optimizer.grad_partitions_flat_buffer.numel() != sum(p.partition_numel() for p in params):
        return "the gradient partitions do not fill one flat buffer"
    return None


def _zero12_obstacle(optimizer: Any, params: list) -> str | None:
    if optimizer.has_moe_layers:
        return "mixture-of-experts norms are averaged over the expert group"
    return None


def why_not_one_pass(optimizer: Any) -> str | None:
    """Why the one-pass norm cannot replace DeepSpeed's for this ZeRO optimizer, or None when it can."""
    if _is_zero3(optimizer):
        groups, api, offload, specific = "fp16_groups", _ZERO3_API, "offload_optimizer", _zero3_obstacle
    else:
        groups, api, offload, specific = "bit16_groups", _ZERO12_API, "cpu_offload", _zero12_obstacle
    params = [p for group in getattr(optimizer, groups, []) for p in group]
    return _common_obstacle(optimizer, params, api, offload) or specific(optimizer, params)


def _all_reduced_norm(squares: torch.Tensor, group: Any) -> torch.Tensor:
    """The square root of ``squares`` summed over ``group``'s ranks; +inf where it is not finite."""
    import deepspeed.comm as dist

    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    norm = squares.sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))


def _norm_dtype() -> torch.dtype:
    """DeepSpeed's: fp64, or fp32 on a device without fp64."""
    from deepspeed.runtime.zero.utils import get_norm_dtype

    return get_norm_dtype()


def flat_grad_norm(flat: torch.Tensor, group: Any) -> torch.Tensor:
    """ZeRO-3: the 2-norm over every rank's flat gradient partitions, in fp64."""
    dtype = _norm_dtype()
    squares = torch.zeros((), dtype=dtype, device=flat.device)
    for start in range(0, flat.numel(), NORM_CHUNK):
        squares += torch.linalg.vector_norm(flat[start:start + NORM_CHUNK], dtype=dtype).square()
    return _all_reduced_norm(squares, group)


def listed_grad_norm(grads: list[torch.Tensor], group: Any, device: Any) -> torch.Tensor:
    """ZeRO-1/2: the 2-norm over every rank's partition gradients: per tensor in fp64, the rank's sum of
    squares then in fp32, as DeepSpeed's (a sum past fp32's range, a norm above ~1.8e19, is +inf: the step
    skipped)."""
    dtype = _norm_dtype()
    norms = torch._foreach_norm(grads, 2, dtype=dtype) if grads else []
    squares = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=dtype, device=device)
    return _all_reduced_norm(squares.float(), group)


def install_one_pass_grad_norm(optimizer: Any) -> bool:
    """Gives this ZeRO optimizer instance the one-pass norm; returns whether it did (else logs why not)."""
    reason = why_not_one_pass(optimizer)
    if reason is not None:
        log.info("ZeRO keeps DeepSpeed's per-group gradient norm: %s", reason)
        return False
    if _is_zero3(optimizer):
        group = optimizer._get_param_partition_group(optimizer.fp16_groups[0][0])  # every parameter's

        def norm_groups() -> list[torch.Tensor]:
            # One entry: DeepSpeed combines the groups' norms as a 2-norm (of one norm: that norm; of +inf:
            # an invalid norm, the step skipped). The buffer is read at each call (DeepSpeed may set .data).
            return [flat_grad_norm(optimizer.grad_partitions_flat_buffer, group)]

        optimizer._get_norm_groups = norm_groups
        return True

    def scaled_global_norm(norm_type: float = 2) -> torch.Tensor:
        assert norm_type == 2, "only the L2 norm"  # as DeepSpeed's
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in optimizer.averaged_gradients[i]
                 if not getattr(g, "_zero_padding", False)]  # the partitions' zero padding adds nothing
        # a rank whose partitions hold only padding still joins the all-reduce, on the device the others use
        device = grads[0].device if grads else getattr(optimizer, "device", "cpu")
        return listed_grad_norm(grads, optimizer.dp_process_group, device)

    optimizer.scaled_global_norm = scaled_global_norm
    return True
