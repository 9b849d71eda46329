"""Issue #26: a user mistake ends the job once, with one paragraph; a stop means stop.

- a missing data folder is refused by the pre-flight before Ray starts (no worker group at all);
- a user error that only a worker meets (the data went missing after the pre-flight) ends the job at its first
  worker group: not retried, not counted against scaling.max_failures, the message names the folder and the
  log;
- SIGTERM while the workers are stuck in a storage retry loop (S3 went down) ends the run after the stop
  grace, without a new checkpoint, and no worker group starts after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.recipes import DEBUG_CONFIG, ONE_WORKER, small_run
from tests.integration.services import FAKE_AWS, S3Server, upload_folder
from tests.orchestrator.faults import QUIET_ENV, ROOT, Driver, driver, wait_for

pytestmark = pytest.mark.integration

# How the driver ends a job (ONE_WORKER); max_failures=3 would retry a failure it counted.
NO_EVAL = ["data.eval_pairs=", *ONE_WORKER, "scaling.cpus_per_worker=1", "scaling.max_failures=3"]
GROUP_START = "1 rank(s) on cpu"  # rank 0 prints it once per worker-group start, before the loader is built

# `unimo train` with the pre-flight replaced by the config's own check: the only way a user error can reach a
# worker is then the one under test (nothing else is changed).
WITHOUT_PREFLIGHT = ("import sys, orchestrator.driver as d; "
                     "d.run_preflight_quietly = lambda cfg: cfg.check_ready_to_train(); "
                     "from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))")


class ScriptDriver(Driver):
    """Driver running ``python -c code args`` instead of ``python -m orchestrator.cli args``."""

    def __init__(self, code: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log_path = log
        self.ray_tmp = tempfile.mkdtemp(prefix="u8r_", dir="/tmp")
        full_env = {**os.environ, **QUIET_ENV, "RAY_TMPDIR": self.ray_tmp, **(env or {})}
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen = {}


def test_missing_data_is_refused_before_ray_starts(synthetic_data, tmp_path):
    missing = tmp_path / "no-such-folder"
    argv = ["train", DEBUG_CONFIG, *small_run("nodata", tmp_path / "runs", str(synthetic_data),
                                              extra=[*NO_EVAL, f"data.pair.urls={missing}"])]
    with driver(argv, tmp_path / "nodata.log") as run:
        assert run.wait(timeout=300) == 1
        out = run.output()
    expected = f"unimo: error: data.pair.urls: no shards (*.tar, *.tar.gz, *.tgz, ...) found under {missing}"
    assert expected in out, out[-3000:]
    assert "Started a local Ray instance" not in out and GROUP_START not in out, out[-3000:]


def test_a_user_error_in_a_worker_ends_the_job_at_its_first_worker_group(synthetic_data, tmp_path):
    missing = tmp_path / "gone"
    argv = ["train", DEBUG_CONFIG, *small_run("gone", tmp_path / "runs", str(synthetic_data),
                                              extra=[*NO_EVAL, f"data.pair.urls={missing}"])]
    run = ScriptDriver(WITHOUT_PREFLIGHT, argv, tmp_path / "gone.log")
    try:
        assert run.wait(timeout=600) == 1
        out = run.output()
    finally:
        run.cleanup()
    assert out.count(GROUP_START) == 1, out[-4000:]
    assert "RETRY" not in out, out[-4000:]
    last = [line for line in out.splitlines() if line.startswith("unimo: error:")][-1]
    expected = f"unimo: error: no shards (*.tar, *.tar.gz, *.tgz, ...) found under {missing}: point it at"
    assert last.startswith(expected) and "(full traceback: " in last, last
    log = Path(last.split("(full traceback: ")[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text() and log.is_relative_to(tmp_path / "runs" / "gone")


def test_sigterm_during_a_storage_retry_loop_stops_without_a_new_worker_group(synthetic_data, tmp_path,
                                                                               monkeypatch):
    s3 = S3Server()
    s3.start()
    try:
        for key, value in {**FAKE_AWS, "AWS_ENDPOINT_URL": s3.url}.items():
            monkeypatch.setenv(key, value)
        upload_folder(synthetic_data, "data", "synthetic")
        base = "s3://data/synthetic"
        # Plenty of retries with a short backoff: the loop outlasts the stop grace by far.
        extra = [*NO_EVAL, f"data.pair.urls={base}/pairs", f"data.text.urls={base}/text",
                 f"data.image.urls={base}/images", "data.io_retries=500", "data.io_backoff_s=0.2",
                 "data.io_backoff_max_s=0.5"]
        argv = ["train", DEBUG_CONFIG,
                *small_run("stuck", tmp_path / "runs", str(synthetic_data), extra=extra)]
        # The grace is waited out in full (the workers cannot reach a step boundary with S3 down), so it is
        # short: nothing in the test races it.
        env = {**FAKE_AWS, "AWS_ENDPOINT_URL": s3.url, "UNIMO_STOP_GRACE_S": "5"}
        with driver(argv, tmp_path / "stuck.log", env) as run:
            wait_for(lambda: "[unimo] pre-flight:" in run.output(), 300, "the pre-flight to pass", run)
            s3.stop()  # the workers will find the storage down when they list the shards
            wait_for(lambda: "retrying in" in run.output(), 600, "a storage retry in a worker", run)
            os.kill(run.proc.pid, signal.SIGTERM)
            assert run.wait(timeout=300) == 1
            out = run.output()
    finally:
        s3.stop()
    assert "stopped on request WITHOUT a new checkpoint" in out, out[-4000:]
    assert "starts from scratch (no checkpoint yet)" in out, out[-4000:]
    assert out.count(GROUP_START) == 1, out[-4000:]
    assert not list((tmp_path / "runs" / "stuck" / "checkpoints").glob("step_*"))
