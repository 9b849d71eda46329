"""The DeepSpeed engine the trainer steps: parameter groups (per-module learning rates, decay, alignment), the
fused AdamW and the DeepSpeed config."""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import RunConfig
from trainer.ds_config import build_ds_config
from trainer.optim import build_adamw

# Parameters whose size is a multiple of this many elements (64 bytes in fp32) keep the alignment of the flat
# buffer DeepSpeed packs every group's partition into (one after another, in group order).
ALIGN_ELEMENTS = 16


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Groups by top-level submodule (so a stage can freeze one by setting its LR to 0) and by decay.

    The few parameters whose size is not a multiple of ALIGN_ELEMENTS (a scalar temperature, a 2-way bias,
    level-mixing logits) go in groups of their own at the end. ZeRO-3 views every weight inside one flat
    buffer in group order, so a 1-element parameter early on would leave every later weight 4 bytes off a
    64-byte boundary (bench/bench_trainer.py on a quiet Xeon: 1.24x -> 1.19x of the plain step,
    docs/BENCHMARKS.md).
    """
    groups: dict[tuple[bool, str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        decay = p.ndim >= 2 and "embed" not in name  # no decay on biases, norms, embeddings, scales
        odd_size = p.numel() % ALIGN_ELEMENTS != 0
        groups.setdefault((odd_size, top, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "module": top}
            for (_, top, decay), ps in sorted(groups.items())]


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``param_groups`` without the module names, ready for a torch optimizer (benchmarks, tests)."""
    return [{k: v for k, v in g.items() if k != "module"} for g in param_groups(model, weight_decay)]


def build_engine(cfg: RunConfig, module: torch.nn.Module, world_size: int, on_gpu: bool,
                 universal: bool = False,
                 ds_overrides: dict[str, Any] | None = None) -> tuple[Any, Any, list[str]]:
    """The DeepSpeed engine over ``module`` (the objectives module): parameter groups, the fused AdamW and the
    DeepSpeed config from ``cfg``; ``universal`` sets it to load a universal checkpoint; ``ds_overrides``
    replaces top-level sections of the DeepSpeed config (benchmarks' experiments, e.g. DeepSpeed's compiler).

    Returns the engine, its optimizer, and each parameter group's top-level module (per-stage learning rates).
    The process group must exist already (Ray Train's, or the caller's).
    """
    from model.layers import compile_blocks
    from trainer import ds_extensions
    from trainer.grad_norm import install_one_pass_grad_norm
    from trainer.zero3_external_params import register_external_parameters
    from trainer.zero3_units import mark_whole_units, reduce_gradients_per_parameter, uses_whole_units

    deepspeed = ds_extensions.import_deepspeed()

    ds_extensions.prepare()  # this environment's op builds; a lock left by a killed build would hang us

    register_external_parameters(module)
    if cfg.train.compile:
        compile_blocks(module.model)  # in place (names, hooks, checkpoints unchanged); compiles at first call
    groups = param_groups(module.model, cfg.optimizer.weight_decay)
    group_modules = [g.pop("module") for g in groups]
    ds_config = build_ds_config(cfg, world_size, on_gpu)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    ds_config.update(ds_overrides or {})
    whole_units = uses_whole_units(cfg, ds_config["zero_optimization"]["stage"])
    if whole_units:
        mark_whole_units(module)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=build_adamw(groups, cfg.optimizer),
                                                   config=ds_config, dist_init_required=False)
    if whole_units:
        reduce_gradients_per_parameter(engine.optimizer)
    if engine.zero_optimization_stage() > 0 and cfg.deepspeed.one_pass_grad_norm:
        install_one_pass_grad_norm(engine.optimizer)
    if engine.zero_optimization_stage() == 3:
        clear_gradient_partitions_after_step(engine.optimizer)
    # stage 0 with the torch optimizer itself (fp32, autocast); not under DeepSpeed's bf16 wrappers
    if engine.zero_optimization_stage() == 0 and engine.optimizer is getattr(engine, "basic_optimizer", None):
        lighten_plain_engine(engine, world_size)
    return engine, optimizer, group_modules


def lighten_plain_engine(engine: Any, world_size: int) -> None:
    """Stage 0 (no ZeRO: DeepSpeed steps the torch optimizer itself) without two costs the plain PyTorch loop
    does not have, and with the gradient norm it otherwise never records.

    - DeepSpeed clips with a Python loop of its own: one norm per gradient, stacked, then one multiply per
      gradient; and it keeps no global norm (``get_global_grad_norm`` returned None: grad_norm was NaN in
      the metrics). torch's ``clip_grad_norm_`` runs the same clip as the plain loop (foreach kernels on a
      GPU) and returns the norm, which is recorded where DeepSpeed's ZeRO optimizers record theirs. The
      gradients are already averaged over the ranks when DeepSpeed clips, so the norm is the same on each.
    - On one rank, the backward's all-reduce: DeepSpeed flattens every gradient into a bucket, all-reduces
      it with itself and copies each gradient back. There is nothing to average with. What it also does is
      kept: a trainable parameter with no gradient (a head whose objective is off in this stage) gets a zero
      one, so AdamW steps it (its weight decay, its moments' decay) as on several ranks and under ZeRO.

    bench/bench_host_overhead.py measures the effect (docs/BENCHMARKS.md).
    """
    if world_size == 1:
        def zero_missing_gradients(*_args, **_kwargs) -> None:  # in place of allreduce_gradients
            if not engine.is_gradient_accumulation_boundary():
                return
            for p in engine.module.parameters():
                if p.requires_grad and p.grad is None and p.numel():
                    p.grad = torch.zeros_like(p)

        engine.allreduce_gradients = zero_missing_gradients
    max_norm = engine.gradient_clipping()

    def clip_fp32_gradients() -> None:  # called by DeepSpeed's step when gradient_clipping > 0
        grads = [p for p in engine.module.parameters() if p.grad is not None]
        engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


def clear_gradient_partitions_after_step(optimizer: Any) -> bool:
    """ZeRO-3: a parameter that gets no gradient in a step (its objective is off, or its module is not run)
    steps with a zero gradient, as at stages 0-2, not with the last gradient it had.

    DeepSpeed's ZeRO-3 keeps every rank's gradient partitions in one flat buffer and writes only the
    partitions of the parameters that reached the backward; the others keep the previous step's values, which
    the norm, the clip and the update then read again (measured: with all objectives for a step and `mlm_text`
    alone for the next two, 208,906 of the debug model's 310,926 gradient elements were the same non-zero
    values in both; ZeRO-1/2 give zeros). With optimizer offload the same holds for the fp32 gradients it
    keeps in host memory for the CPU step. Stale values are also not in a checkpoint, so a run resumed there
    would step differently from the uninterrupted run. Clearing these buffers once the optimizer has stepped
    (or skipped the step) costs a memset of this rank's partition per step (in host memory too with offload).
    Not with NVMe optimizer swapping, which the trainer does not configure. Returns whether the buffers are
    cleared.
    """
    if getattr(optimizer, "swap_optimizer", True) or not hasattr(optimizer, "grad_partitions_flat_buffer"):
        return False
    step = optimizer.step

    def step_then_clear(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        # read at each call: DeepSpeed may reassign these tensors' .data
        optimizer.grad_partitions_flat_buffer.zero_()
        if optimizer.offload_optimizer:
            for flat in optimizer.fp32_partitioned_groups_flat:
                if flat.grad is not None:
                    flat.grad.zero_()
        return result

    optimizer.step = step_then_clear
    return True
