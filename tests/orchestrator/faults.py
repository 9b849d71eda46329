"""Helpers of the fault-injection tests: drivers in subprocesses, their process trees, checkpoint probes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = "checkpoint_manager_snapshot.json"
# Keeps every service on loopback and quiet (docs/CLUSTER.md, "Several Ray nodes on one machine"); DS on CPU.
QUIET_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
             "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DS_ACCELERATOR": "cpu",
             "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}


class Driver:
    """`unimo train ...` in a subprocess (own session, own Ray temp dir), with its whole process tree tracked.

    Ray's raylet puts each worker in a process group of its own, and a killed driver's children are
    re-parented, so the tree is snapshotted while the driver lives and every process ever seen is killed at
    the end.
    """

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log_path = log
        # Short on purpose: Ray's unix socket paths under it are capped at 107 bytes.
        self.ray_tmp = tempfile.mkdtemp(prefix="u8r_", dir="/tmp")
        full_env = {**os.environ, **QUIET_ENV, "RAY_TMPDIR": self.ray_tmp, **(env or {})}
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                                     env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen: dict[int, float] = {}

    def snapshot(self) -> list[psutil.Process]:
        """The driver's live descendants, remembered for the final cleanup."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self.seen[p.pid] = p.create_time()
        return procs

    def train_workers(self) -> list[psutil.Process]:
        """The Ray Train worker actors (not their forked data-loader processes, which inherit the title)."""
        out = []
        for p in self.snapshot():
            with contextlib.suppress(psutil.Error):
                if "RayTrainWorker" in " ".join(p.cmdline()) and "RayTrainWorker" not in " ".join(
                        p.parent().cmdline()):
                    out.append(p)
        return out

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver did not finish within {timeout:.0f}s; log tail:\n"
                                 f"{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the driver only: what Ray does with its orphans is part of what is tested."""
        self.snapshot()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def leftovers(self) -> list[int]:
        alive = []
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).create_time() == started:
                    alive.append(pid)
        return alive

    def leftover_names(self) -> list[str]:
        names = []
        for pid in self.leftovers():
            with contextlib.suppress(psutil.Error):
                names.append(psutil.Process(pid).name())
        return names

    def cleanup(self) -> None:
        self.snapshot()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()
        import shutil

        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@contextlib.contextmanager
def driver(args: list[str], log: Path, env: dict[str, str] | None = None):
    d = Driver(args, log, env)
    try:
        yield d
    finally:
        d.cleanup()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, d: Driver | None = None,
             poll: float = 0.3):
    """Polls until ``predicate()`` is truthy; fails early (with the log) if the driver has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if d is not None:
            d.snapshot()
            if d.proc.poll() is not None:
                raise AssertionError(f"driver exited ({d.proc.returncode}) while waiting for "
                                     f"{what}:\n{d.tail()}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f":\n{d.tail()}" if d else ""))


def registered(run_dir: Path, step: int) -> bool:
    """Whether Ray Train has committed the checkpoint of ``step`` (its snapshot lists it): what a restart
    uses."""
    snap = run_dir / "checkpoints" / SNAPSHOT
    try:
        return f"step_{step:08d}" in snap.read_text()
    except OSError:
        return False


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint's trainer state, with its merged data cursor (``state_with_cursor``)."""
    return state_with_cursor(sorted((run_dir / "checkpoints").glob("step_*"))[-1])


def state_with_cursor(step: Path) -> dict:
    """A checkpoint's trainer state, with its merged data cursor under ``data_cursor`` (the elastic view
    beside it since checkpoint schema 3, every rank's cursor merged before)."""
    from data_pipeline.cursor import merge_states
    from trainer import checkpoint as ckpt

    state = json.loads((step / ckpt.STATE).read_text())
    view = step / ckpt.ELASTIC_VIEW
    if view.is_file():
        state["data_cursor"] = json.loads(view.read_text())
    elif state.get("data_states"):
        state["data_cursor"] = merge_states(state["data_states"])
    return state


def shard_sizes(folder: Path) -> dict[int, int]:
    """Samples per shard (distinct keys in each tar), by shard index in sorted order."""
    import tarfile

    sizes = {}
    for i, tar in enumerate(sorted(folder.glob("*.tar"))):
        with tarfile.open(tar) as t:
            sizes[i] = len({m.name.split(".", 1)[0] for m in t.getmembers() if m.isfile()})
    return sizes


def consumed(state: dict, source: str, sizes: dict[int, int]) -> int:
    """Distinct samples of ``source`` yielded to training so far, from the merged data cursor of all ranks
    (``final_state``'s ``data_cursor``).

    A sample read twice counts once, and one skipped is never counted, so comparing with steps x global batch
    catches both.
    """
    from data_pipeline.cursor import from_ranges

    src = state["data_cursor"]["sources"][source]
    epochs = src.get("epochs")
    assert epochs is not None, f"cursor of {source} is incomplete (not every stream reported)"
    per_epoch = sum(sizes.values())
    first = min((int(e) for e in epochs), default=src["fresh_from"])
    total = first * per_epoch  # epochs before the first listed one are complete
    for ep in epochs.values():
        total += sum(sizes[s] for s in ep["finished"])
        total += sum(len(from_ranges(r)) for r in ep["partial"].values())
    return total


def fp32_weights(step_dir: Path) -> dict:
    """Consolidated fp32 weights of a ZeRO-3 checkpoint (DeepSpeed's own zero_to_fp32)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="ds")


def differing_tensors(a: dict, b: dict) -> list[str]:
    import torch

    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]
