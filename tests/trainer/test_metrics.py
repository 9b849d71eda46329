"""step_metrics: throughput per source, analytic FLOP/s (and MFU on known GPUs), memory."""

from __future__ import annotations

import pytest
import torch

from model.flops import flops_per_sample
from tests.integration.recipes import DEBUG_CONFIG
from trainer import metrics as M
from trainer.config import load_config
from trainer.loop import StepResult


@pytest.fixture
def cfg():
    return load_config(DEBUG_CONFIG)


def result(**kw) -> StepResult:
    base = {"losses": {"mlm_text": 2.0, "mim": 1.0, "itc": 3.0}, "total": 6.0,
            "samples": {"text": 8, "image": 8, "pair": 16}, "step_time": 0.5, "data_time": 0.1,
            "grad_norm": 1.5, "lr": 1e-3}
    base.update(kw)
    return StepResult(**base)


def test_cpu_step_reports_achieved_flops_and_no_mfu(cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = M.step_metrics(result(), cfg, world_size=2)
    m = cfg.model
    per_device = (8 * flops_per_sample(m, "text", seq_len=cfg.seq_len, objectives=["mlm"])
                  + 8 * flops_per_sample(m, "image", objectives=["mim"])
                  + 16 * flops_per_sample(m, "pair", seq_len=cfg.seq_len, objectives=["itc"])) / 0.5
    assert out["perf/achieved_tflops"] == pytest.approx(per_device / 1e12)
    assert "perf/mfu" not in out and "memory/cuda_max_allocated_gb" not in out
    assert out["memory/rss_gb"] > 0.01
    assert out["throughput/pair_samples_per_s"] == 16 * 2 / 0.5
    patches = (m.vision.image_size // m.vision.patch_size) ** 2
    assert out["throughput/text_tokens_per_s"] == 8 * cfg.seq_len * 2 / 0.5
    assert out["throughput/image_tokens_per_s"] == 8 * patches * 2 / 0.5
    assert out["throughput/pair_tokens_per_s"] == 16 * (cfg.seq_len + patches) * 2 / 0.5
    assert out["data_wait_fraction"] == pytest.approx(0.2) and out["lr"] == 1e-3


def test_objectives_of_the_step_decide_the_flops(cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    itc_only = M.step_metrics(result(losses={"itc": 1.0}, samples={"pair": 16}), cfg, 1)
    both = M.step_metrics(result(losses={"itc": 1.0, "mlm_pair": 1.0}, samples={"pair": 16}), cfg, 1)
    assert both["perf/achieved_tflops"] > itc_only["perf/achieved_tflops"] > 0


def test_gpu_step_reports_mfu_against_the_device_peak(cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 * 2**30)
    M._this_gpu_peak.cache_clear()
    try:
        out = M.step_metrics(result(), cfg, world_size=8)
    finally:
        M._this_gpu_peak.cache_clear()
    assert out["perf/mfu"] == pytest.approx(out["perf/achieved_tflops"] * 1e12 / 989e12)
    assert out["memory/cuda_max_allocated_gb"] == 5.0 and out["memory/cuda_allocated_gb"] == 3.0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 125e12), ("NVIDIA GH200 480GB", 989e12),
    ("Tesla V100-SXM2-16GB", 125e12), ("Some Future GPU", None),
])
def test_peak_table(name, peak):
    assert M.peak_bf16_flops(name) == peak


def test_unknown_gpu_reports_achieved_flops_without_mfu(cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Some Future GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    M._this_gpu_peak.cache_clear()
    try:
        out = M.step_metrics(result(), cfg, world_size=1)
    finally:
        M._this_gpu_peak.cache_clear()
    assert "perf/mfu" not in out and out["perf/achieved_tflops"] > 0


@pytest.mark.gpu
def test_mfu_on_this_gpu(cfg):
    """On a real GPU: the device is in the table (else the test names it) and GPU memory is read."""
    name = torch.cuda.get_device_name(0)
    torch.ones(1024, 1024, device="cuda")
    out = M.step_metrics(result(), cfg, world_size=1)
    assert M.peak_bf16_flops(name) is not None, f"add {name!r} to PEAK_BF16_FLOPS"
    assert 0 < out["perf/mfu"] < 1 and out["memory/cuda_max_allocated_gb"] > 0
