"""Per-step metrics beyond the losses: throughput per source (samples, tokens), FLOP/s and MFU, memory."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from model.flops import flops_per_sample
from model.objective_registry import OBJECTIVES


# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s per GPU. Matched as
# lower-case substrings of torch.cuda.get_device_name(), first match wins, so variants come before families.
# V100 and T4 have no bf16: their fp16 tensor peak is the ceiling a bf16-configured run could approach.
PEAK_BF16_FLOPS = (
    ("gh200", 989e12), ("h200 nvl", 835e12), ("h200", 989e12), ("h100 nvl", 835e12), ("h100 pcie", 756e12),
    ("h100", 989e12), ("h800", 989e12), ("b200", 2250e12), ("a100", 312e12), ("a800", 312e12),
    ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12),
    ("a10g", 125e12),  # AWS g5: NVIDIA publishes no A10G sheet; this is the A10's figure AWS tables reuse
    ("a10", 125e12), ("a6000", 155e12), ("a40", 150e12), ("rtx 4090", 165e12), ("v100", 125e12),
    ("t4", 65e12),
)

GB = 1024 ** 3


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU model named as CUDA names it; None for a card not in the table."""
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


@lru_cache(maxsize=1)
def _this_gpu_peak() -> float | None:
    return peak_bf16_flops(torch.cuda.get_device_name(torch.cuda.current_device()))


def flops_per_source(cfg: Any, objectives: list[str]) -> dict[str, int]:
    """Training FLOPs (forward + backward) per sample of each source, for the objectives a step ran."""
    by_source: dict[str, list[str]] = {}
    for name in objectives:
        if name in OBJECTIVES:
            by_source.setdefault(OBJECTIVES[name].source, []).append(OBJECTIVES[name].head)
    m = cfg.model
    return {src: flops_per_sample(m, src, seq_len=cfg.seq_len, image_size=m.vision.image_size,
                                  objectives=objs) for src, objs in by_source.items()}


def tokens_per_sample(cfg: Any) -> dict[str, int]:
    """Positions the encoders process per sample: text padded to seq_len, image patches, both for a pair."""
    patches = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    return {"text": cfg.seq_len, "image": patches, "pair": cfg.seq_len + patches}


@lru_cache(maxsize=1)
def _this_process():
    import psutil

    return psutil.Process()


def memory_metrics(on_gpu: bool) -> dict[str, float]:
    """Resident memory of this process; on GPU also the allocator's current and peak (since start) use."""
    out = {"memory/rss_gb": _this_process().memory_info().rss / GB}
    if on_gpu:
        out["memory/cuda_allocated_gb"] = torch.cuda.memory_allocated() / GB
        out["memory/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
    return out


def step_metrics(result: Any, cfg: Any, world_size: int) -> dict[str, float]:
    """Metrics of one optimizer step beyond the losses (``result``: loop.StepResult, ``cfg``: RunConfig).

    Throughputs are global (all ranks); ``perf/achieved_tflops`` is per device, and on a GPU in the peak table
    ``perf/mfu`` divides it by the device's dense bf16 peak. Losses name the objectives the step ran, which
    decide the FLOPs per sample (model/flops.py's analytic count, matmuls only, backward = 2 x forward).
    """
    step_time = max(result.step_time, 1e-9)
    metrics = {
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "step_time_s": result.step_time,
        "data_wait_fraction": result.data_time / step_time,
    }
    flops = flops_per_source(cfg, list(result.losses))
    tokens = tokens_per_sample(cfg)
    achieved = 0.0  # FLOP/s of this device
    for src, n in result.samples.items():
        metrics[f"throughput/{src}_samples_per_s"] = n * world_size / step_time
        metrics[f"throughput/{src}_tokens_per_s"] = n * tokens[src] * world_size / step_time
        achieved += n * flops.get(src, 0) / step_time
    metrics["perf/achieved_tflops"] = achieved / 1e12
    on_gpu = torch.cuda.is_available()
    peak = _this_gpu_peak() if on_gpu else None
    if peak:
        metrics["perf/mfu"] = achieved / peak
    metrics.update(memory_metrics(on_gpu))
    return metrics
