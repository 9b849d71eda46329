"""F4: SIGTERM to the job saves a checkpoint at the next step and exits cleanly; re-running resumes there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.recipes import DEBUG_CONFIG, ROOT, small_run

pytestmark = pytest.mark.integration


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float, sink: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError("job ended early:\n" + "".join(sink[-50:]))
            continue
        sink.append(line)
        if needle in line:
            return
    raise AssertionError(f"no '{needle}' within {timeout}s:\n" + "".join(sink[-50:]))


def test_sigterm_checkpoints_then_resubmission_resumes(synthetic_data, tmp_path):
    storage = tmp_path / "runs"
    tracking = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    argv = [sys.executable, "-m", "orchestrator.cli", "train", DEBUG_CONFIG,
            *small_run("preempt", storage, str(synthetic_data), steps=400, every=1000, extra=tracking)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        wait_for_line(proc, "step 3/400", timeout=360, sink=lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-3000:]
    assert "stop requested: saving a checkpoint" in text
    assert "run stopped on request" in text
    ckpts = sorted((storage / "preempt" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, ckpts
    stopped_at = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped_at < 400
    assert not (storage / "preempt" / "STOP").exists()

    # Resubmitting the same run resumes at that step (here with a plan that ends 2 steps later).
    again = [*argv[:5], *small_run("preempt", storage, str(synthetic_data), steps=stopped_at + 2, every=1000,
                                   extra=tracking)]
    done = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"at step {stopped_at}" in done.stdout + done.stderr
    final = sorted((storage / "preempt" / "checkpoints").glob("step_*"))[-1]
    assert json.loads((final / "trainer_state.json").read_text())["step"] == stopped_at + 2
