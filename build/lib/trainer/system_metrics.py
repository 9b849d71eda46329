"""Per-node system metrics: CPU, memory, disk, network via psutil, this job's GPUs via NVML, in a thread.

psutil and pynvml (nvidia-ml-py) are what MLflow's own system-metrics monitor uses; we sample ourselves rather
than turn that monitor on because it logs per process (one series per rank, no node name) and watches every
GPU of the machine, while a job should see its own GPUs only and one series per node. Without a GPU, without
NVML, or where a counter is unsupported (MIG, some containers) those metrics are simply absent.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

MB = 1024 ** 2
GB = 1024 ** 3


def metric_node_name(host: str) -> str:
    """A host name usable inside an MLflow metric key (letters, digits, '_', '-', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", host) or "node"


def gpu_identity(device_index: int, visible_devices: str | None) -> str | None:
    """How NVML can find the CUDA device ``device_index`` of this process: its UUID when torch knows it, else
    the CUDA_VISIBLE_DEVICES entry it maps to (an index or UUID), else the index itself; None without CUDA.

    ``visible_devices`` is the caller's CUDA_VISIBLE_DEVICES (passed in: library code does not read the env).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        if uuid:
            return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except (AttributeError, RuntimeError):  # torch without the uuid property
        pass
    entries = [e.strip() for e in (visible_devices or "").split(",") if e.strip()]
    return entries[device_index] if device_index < len(entries) else str(device_index)


class GpuProbe:
    """NVML handles for a given set of GPUs (by UUID or NVML index) and their current readings."""

    def __init__(self, gpu_ids: list[str]):
        self._handles: list[tuple[str, object]] = []
        self._nvml = None
        if not gpu_ids:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as err:  # noqa: BLE001 - no driver, no library: GPU metrics are absent
            log.info("NVML unavailable (%s); no GPU system metrics", err)
            return
        self._nvml = pynvml
        for gid in dict.fromkeys(gpu_ids):  # ranks sharing a GPU name it once
            handle = self._open(gid)
            if handle is not None:
                self._handles.append((f"gpu{self._label(handle, gid)}", handle))

    def _open(self, gid: str):
        nv = self._nvml
        try:
            if gid.isdigit():
                return nv.nvmlDeviceGetHandleByIndex(int(gid))
            return nv.nvmlDeviceGetHandleByUUID(gid)
        except Exception as err:  # noqa: BLE001
            log.info("NVML cannot open GPU %s (%s); its metrics are absent", gid, err)
            return None

    def _label(self, handle, gid: str) -> str:
        try:
            return str(self._nvml.nvmlDeviceGetIndex(handle))  # the index nvidia-smi shows
        except Exception:  # noqa: BLE001 - MIG handles have no index
            return re.sub(r"[^A-Za-z0-9]", "", gid)[-8:]

    @property
    def count(self) -> int:
        return len(self._handles)

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, handle in self._handles:
            for name, value in self._readings(handle):
                out[f"{label}/{name}"] = value
        return out

    def _readings(self, handle):
        nv = self._nvml
        probes = (
            ("utilization_percent", lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu),
            ("memory_used_gb", lambda: nv.nvmlDeviceGetMemoryInfo(handle).used / GB),
            ("memory_percent", lambda: 100.0 * _ratio(nv.nvmlDeviceGetMemoryInfo(handle))),
            ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
        )
        for name, probe in probes:
            try:
                yield name, float(probe())
            except Exception:  # noqa: BLE001 - unsupported on this device: leave it out
                continue

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None


def _ratio(mem) -> float:
    return mem.used / mem.total if mem.total else 0.0


class HostProbe:
    """psutil readings of the whole machine; I/O counters become rates between two readings."""

    def __init__(self, disk_path: str = "/"):
        import psutil

        self._ps = psutil
        self._disk_path = disk_path
        self._last = self._counters()
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement window

    def _counters(self) -> tuple[float, object, object]:
        disk = net = None
        try:
            disk = self._ps.disk_io_counters()
        except Exception:  # noqa: BLE001 - containers may hide block devices
            pass
        try:
            net = self._ps.net_io_counters()
        except Exception:  # noqa: BLE001
            pass
        return time.monotonic(), disk, net

    def read(self) -> dict[str, float]:
        vm = self._ps.virtual_memory()
        out = {"cpu_percent": float(self._ps.cpu_percent(interval=None)),
               "memory_used_gb": (vm.total - vm.available) / GB, "memory_percent": float(vm.percent),
               "memory_available_gb": vm.available / GB}
        try:
            out["disk_used_percent"] = float(self._ps.disk_usage(self._disk_path).percent)
        except OSError:
            pass
        now = self._counters()
        dt = max(now[0] - self._last[0], 1e-6)
        (_, d0, n0), (_, d1, n1) = self._last, now
        if d0 is not None and d1 is not None:
            out["disk_read_mb_s"] = max(d1.read_bytes - d0.read_bytes, 0) / MB / dt
            out["disk_write_mb_s"] = max(d1.write_bytes - d0.write_bytes, 0) / MB / dt
        if n0 is not None and n1 is not None:
            out["network_rx_mb_s"] = max(n1.bytes_recv - n0.bytes_recv, 0) / MB / dt
            out["network_tx_mb_s"] = max(n1.bytes_sent - n0.bytes_sent, 0) / MB / dt
        self._last = now
        return out


class SystemSampler:
    """Samples a node every ``interval`` seconds in a daemon thread and hands ``system/<node>/...`` metrics to
    ``log(metrics, step)`` with the training step ``step_fn()`` of the moment (lining up with the loss)."""

    def __init__(self, node: str, log_fn: Callable[[dict[str, float], int], None], step_fn: Callable[[], int],
                 interval: float = 10.0, gpu_ids: list[str] | None = None, disk_path: str = "/"):
        self.prefix = f"system/{metric_node_name(node)}/"
        self._log = log_fn
        self._step = step_fn
        self._interval = interval
        self._host = HostProbe(disk_path)
        self._gpus = GpuProbe(gpu_ids or [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    @property
    def gpu_count(self) -> int:
        return self._gpus.count

    def sample(self) -> dict[str, float]:
        readings = {**self._host.read(), **self._gpus.read()}
        return {self.prefix + k: v for k, v in readings.items()}

    def start(self) -> "SystemSampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._log(self.sample(), int(self._step()))
            except Exception as err:  # noqa: BLE001 - a failed sample must never end training
                log.warning("system metrics sample failed: %s", err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._gpus.close()
