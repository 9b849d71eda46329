"""Per-step metrics derived from one step's measurements: throughput per source, timing fractions."""

from __future__ import annotations

from typing import Any


def step_metrics(result: Any, cfg: Any, world_size: int) -> dict[str, float]:
    """Metrics of one optimizer step beyond the losses (``result``: trainer.loop.StepResult, ``cfg``: RunConfig)."""
    step_time = max(result.step_time, 1e-9)
    metrics = {
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "step_time_s": result.step_time,
        "data_wait_fraction": result.data_time / step_time,
    }
    for src, n in result.samples.items():
        metrics[f"throughput/{src}_samples_per_s"] = n * world_size / step_time
    return metrics
