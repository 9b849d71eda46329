"""System metrics: psutil readings per node, NVML readings of this job's GPUs only (fake NVML without GPU)."""

from __future__ import annotations

import sys
import time
import types
from collections import namedtuple

import pytest

from tests.orchestrator.faults import wait_for
from trainer.system_metrics import GpuProbe, SystemSampler, gpu_identity, metric_node_name
from trainer.metric_logger import metric_key

Mem = namedtuple("Mem", "total used free")
Util = namedtuple("Util", "gpu memory")


class FakeNVMLError(Exception):
    pass


def fake_pynvml(uuids: list[str], no_power: bool = False) -> types.ModuleType:
    """Four GPUs on the machine; readings differ per GPU so a test can tell which ones were read."""
    nv = types.ModuleType("pynvml")
    nv.NVML_TEMPERATURE_GPU = 0
    nv.opened = []

    def by_index(i):
        if not 0 <= i < len(uuids):
            raise FakeNVMLError("invalid index")
        nv.opened.append(i)
        return i

    def by_uuid(u):
        if u not in uuids:
            raise FakeNVMLError("not found")
        return by_index(uuids.index(u))

    def power(h):
        if no_power:
            raise FakeNVMLError("not supported")
        return 100_000 + h * 1000

    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetHandleByIndex = by_index
    nv.nvmlDeviceGetHandleByUUID = by_uuid
    nv.nvmlDeviceGetIndex = lambda h: h
    nv.nvmlDeviceGetUtilizationRates = lambda h: Util(gpu=10 * h, memory=0)
    nv.nvmlDeviceGetMemoryInfo = lambda h: Mem(total=80 * 2**30, used=(h + 1) * 2**30, free=0)
    nv.nvmlDeviceGetPowerUsage = power
    nv.nvmlDeviceGetTemperature = lambda h, kind: 40 + h
    return nv


UUIDS = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(4)]


def test_only_the_jobs_gpus_are_read(monkeypatch):
    nv = fake_pynvml(UUIDS)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    probe = GpuProbe([UUIDS[2], "3", UUIDS[2]])  # two ranks share GPU 2; another rank named GPU 3 by index
    out = probe.read()
    assert probe.count == 2 and sorted(set(nv.opened)) == [2, 3]
    assert out["gpu2/utilization_percent"] == 20.0 and out["gpu3/temperature_c"] == 43.0
    assert out["gpu2/memory_used_gb"] == pytest.approx(3.0) and out["gpu2/power_w"] == pytest.approx(102.0)
    assert out["gpu3/memory_percent"] == pytest.approx(100 * 4 / 80)
    assert not any(k.startswith(("gpu0/", "gpu1/")) for k in out)


def test_unsupported_readings_and_unknown_gpus_are_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(UUIDS, no_power=True))
    out = GpuProbe([UUIDS[0], "GPU-not-on-this-machine"]).read()
    assert "gpu0/temperature_c" in out and "gpu0/power_w" not in out
    assert all(k.startswith("gpu0/") for k in out)


def test_no_nvml_means_no_gpu_metrics(monkeypatch):
    broken = types.ModuleType("pynvml")

    def fail():
        raise FakeNVMLError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    probe = GpuProbe([UUIDS[0]])
    assert probe.count == 0 and probe.read() == {}


def test_gpu_identity_without_cuda_is_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_identity(0, "0,1") is None


def test_gpu_identity_falls_back_to_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_props(i):
        raise RuntimeError("no uuid here")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_props)
    assert gpu_identity(1, "4,6") == "6"  # CUDA device 1 of this process is the machine's GPU 6
    assert gpu_identity(0, f"{UUIDS[3]},{UUIDS[1]}") == UUIDS[3]
    assert gpu_identity(2, None) == "2"


def test_host_sample_has_cpu_memory_disk_network_under_the_node_prefix(tmp_path):
    sampler = SystemSampler("worker-1.cluster.local", lambda m, s: None, lambda: 7, interval=60,
                            disk_path=str(tmp_path))
    time.sleep(0.05)
    out = sampler.sample()
    assert sampler.prefix == "system/worker-1.cluster.local/"
    for name in ("cpu_percent", "memory_used_gb", "memory_percent", "memory_available_gb",
                 "disk_used_percent"):
        assert f"system/worker-1.cluster.local/{name}" in out, name
    assert all(v >= 0 for v in out.values())
    assert all(metric_key(k) == k for k in out)  # valid MLflow names as they are
    assert not any("/gpu" in k for k in out)  # no GPU ids given -> no GPU metrics
    sampler.stop()


def test_sampler_thread_logs_with_the_current_step():
    got = []
    step = {"now": 3}
    sampler = SystemSampler("n", lambda m, s: got.append((s, m)), lambda: step["now"], interval=0.05).start()
    wait_for(lambda: any(s == 3 for s, _ in got), 60, "a sample at step 3", poll=0.01)  # 60: a dead thread
    step["now"] = 9
    wait_for(lambda: any(s == 9 for s, _ in got), 60, "a sample at step 9", poll=0.01)
    sampler.stop()
    steps = [s for s, _ in got]
    assert 3 in steps and 9 in steps and steps == sorted(steps)
    assert all("system/n/cpu_percent" in m for _, m in got)


def test_node_names_are_safe_in_metric_keys():
    assert metric_node_name("ip-10-0-1-7.ec2.internal") == "ip-10-0-1-7.ec2.internal"
    assert metric_node_name("pod/with:odd chars") == "pod_with_odd_chars"


@pytest.mark.gpu
def test_real_gpu_is_found_by_its_cuda_identity():
    """torch names a device by a bare UUID, NVML by 'GPU-<uuid>': the mapping must meet on a real GPU."""
    import os

    import torch

    gid = gpu_identity(torch.cuda.current_device(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.ones(1 << 20, device="cuda")
    probe = GpuProbe([gid])
    out = probe.read()
    probe.close()
    assert probe.count == 1, gid
    label = next(iter(out)).split("/")[0]
    assert {f"{label}/{n}" for n in ("utilization_percent", "memory_used_gb", "memory_percent")} <= set(out)
    assert out[f"{label}/memory_used_gb"] > 0
