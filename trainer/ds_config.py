"""Derives the DeepSpeed JSON config from the typed config, the world size and the device."""

from __future__ import annotations

from typing import Any

from trainer.config import RunConfig


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """Accumulation keeps the global batch fixed by the config whatever the world size."""
    total = cfg.train.global_micro_batches
    if total % world_size:
        raise ValueError(f"train.global_micro_batches={total} is not divisible by the world size "
                         f"{world_size}; choose a multiple of every worker count the job may run with")
    return total // world_size


def resolve_precision(cfg: RunConfig, on_gpu: bool) -> str:
    if cfg.deepspeed.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return cfg.deepspeed.precision


def _unless_set(setting: bool | None, auto: bool) -> bool:
    """A tri-state setting: the config's True/False, or (None) the value chosen for this world size."""
    return auto if setting is None else setting


def zero3_sizes(cfg: RunConfig) -> dict[str, int]:
    """ZeRO-3's bucket, prefetch and persistence sizes (elements), each the config's or, at 0, from the width.

    A transformer block holds ~12 h^2 weights (h the widest hidden size). Prefetch: two blocks ahead, so the
    next block's all-gather is in flight while this one computes. Reduce bucket: four blocks' gradients, at
    least 2^25 elements (each bucket costs passes over it, and on CPU smaller buckets measured slower: 2M
    elements 1.20x vs 50M 1.14x of the plain step, docs/BENCHMARKS.md); a fixed 5e7 is four blocks of large
    but one of xl. Persistence: parameters under 16 h elements (biases, norms, scales: every 1-D tensor of a
    block) stay gathered, so the module hooks only fetch weight matrices; at least DeepSpeed's 1e5, the value
    every ZeRO-3 test so far ran with (below it the debug flavor's weights would be partitioned too). Floors
    keep tiny widths from many small ops.
    """
    ds, m = cfg.deepspeed, cfg.model
    h = max(m.text.dim, m.vision.dim, m.fusion.dim)
    block = 12 * h * h
    return {
        "prefetch_bucket_size": ds.prefetch_bucket_size or max(2 * block, 1 << 22),
        "reduce_bucket_size": ds.reduce_bucket_size or max(4 * block, 1 << 25),
        "param_persistence_threshold": ds.param_persistence_threshold or max(16 * h, 100_000),
    }


def build_ds_config(cfg: RunConfig, world_size: int, on_gpu: bool,
                    stage: int | None = None) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``; the optimizer and scheduler are built by the trainer.

    ``stage``: the ZeRO stage, else resolved from ``deepspeed.zero_stage`` (trainer/zero_stage.py for auto).
    """
    from trainer.zero_stage import resolve_zero_stage

    ds = cfg.deepspeed
    accum = grad_accum_steps(cfg, world_size)
    if stage is None:
        stage = resolve_zero_stage(cfg, world_size, on_gpu).stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        sizes = zero3_sizes(cfg)
        zero.update({
            "stage3_prefetch_bucket_size": sizes["prefetch_bucket_size"],
            "stage3_param_persistence_threshold": sizes["param_persistence_threshold"],
            "stage3_max_live_parameters": ds.max_live_parameters,
            "stage3_max_reuse_distance": ds.max_reuse_distance,
            # False keeps native F.linear instead of DeepSpeed's memory-saving autograd function.
            "memory_efficient_linear": _unless_set(ds.memory_efficient_linear, world_size > 1),
            "reduce_bucket_size": sizes["reduce_bucket_size"],
            "overlap_comm": ds.overlap_comm,
            "reduce_scatter": _unless_set(ds.reduce_scatter, world_size > 1),
            # Needed so that export and universal checkpoints can rebuild full weights from the shards.
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params and stage == 3:
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
        # Read only with offload_optimizer: DeepSpeed then refuses a client optimizer unless told otherwise,
        # pushing its own DeepSpeedCPUAdam, a C++ extension compiled on first use on every node (a minute
        # here). torch's fused AdamW has a vectorised CPU kernel of its own (torch >= 2.4): 27 ms vs
        # DeepSpeedCPUAdam's 30 ms per step over 48M fp32 parameters on 2 cores (docs/BENCHMARKS.md), so the
        # trainer keeps it there too.
        "zero_force_ds_cpu_optimizer": False,
    }
    precision = resolve_precision(cfg, on_gpu)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "autocast":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if not on_gpu:
        config["checkpoint"] = {"use_node_local_storage": False}
    return config
