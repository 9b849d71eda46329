"""Derives the DeepSpeed JSON config from the typed config, the world size and the device."""

from __future__ import annotations

from typing import Any

from trainer.config import RunConfig


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """Accumulation keeps the global batch fixed by the config whatever the world size."""
    total = cfg.train.global_micro_batches
    if total % world_size:
        raise ValueError(f"train.global_micro_batches={total} is not divisible by the world size {world_size}; "
                         "choose a multiple of every worker count the job may run with")
    return total // world_size


def resolve_precision(cfg: RunConfig, on_gpu: bool) -> str:
    if cfg.deepspeed.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return cfg.deepspeed.precision


def _unless_set(setting: bool | None, auto: bool) -> bool:
    """A tri-state setting: the config's True/False, or (None) the value chosen for this world size."""
    return auto if setting is None else setting


def build_ds_config(cfg: RunConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``; the optimizer and scheduler are built by the trainer."""
    ds = cfg.deepspeed
    accum = grad_accum_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "stage3_max_live_parameters": ds.max_live_parameters,
            "stage3_max_reuse_distance": ds.max_reuse_distance,
            # False keeps native F.linear instead of DeepSpeed's memory-saving autograd function.
            "memory_efficient_linear": _unless_set(ds.memory_efficient_linear, world_size > 1),
            "reduce_bucket_size": ds.reduce_bucket_size,
            "overlap_comm": ds.overlap_comm,
            "reduce_scatter": _unless_set(ds.reduce_scatter, world_size > 1),
            # Needed so that export and universal checkpoints can rebuild full weights from the shards.
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        # Per-rank micro-batch is a mixed batch of fixed per-source counts; DeepSpeed only uses this for its
        # bookkeeping, so we count one "sample" per micro-batch.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accum,
        "train_batch_size": accum * world_size,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own progress output replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # Read only with offload_optimizer: DeepSpeed then refuses a client optimizer unless told otherwise, pushing
        # its own DeepSpeedCPUAdam, a C++ extension compiled on first use on every node (a minute here). torch's
        # fused AdamW has a vectorised CPU kernel of its own (torch >= 2.4): 27 ms vs DeepSpeedCPUAdam's 30 ms per
        # step over 48M fp32 parameters on 2 cores (docs/BENCHMARKS.md), so the trainer keeps it there too.
        "zero_force_ds_cpu_optimizer": False,
    }
    if resolve_precision(cfg, on_gpu) == "bf16":
        config["bf16"] = {"enabled": True}
    if not on_gpu:
        config["checkpoint"] = {"use_node_local_storage": False}
    return config
