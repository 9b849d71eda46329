"""`unimo submit` / `unimo jobs` against a local head via the Ray Jobs API with token auth (and errors)."""

from __future__ import annotations

import json
import sys

import psutil
import pytest

from cluster.local_cluster import start_head, stop_all
from orchestrator import jobs
from orchestrator.runlock import RunLock
from tests.integration.recipes import DEBUG_CONFIG, ONE_WORKER, jobs_bound, STARTUP_S, small_run
from tests.orchestrator.faults import wait_for

pytestmark = pytest.mark.integration

# The Jobs API path (submit, logs, status, stop) is what is tested: ONE_WORKER
NO_EVAL = ["data.eval_pairs=", *ONE_WORKER, "scaling.cpus_per_worker=1"]


@pytest.fixture
def head(monkeypatch):
    """A token-auth head on 127.0.0.1 with 2 CPUs (room for a job's training worker); this process is its
    client."""
    info = start_head(2, auth=True)
    try:
        for key, value in info.client_env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        yield info
    finally:
        stop_all(info)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from orchestrator.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _train_workers(head_pid: int) -> list[int]:
    found = []
    for p in psutil.Process(head_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def test_wrong_or_missing_token_names_the_address_and_what_to_check(head, capsys, monkeypatch, tmp_path):
    url = head.dashboard_url
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    rc, _, err = cli(capsys, "jobs", "list", "--address", url)
    assert rc == 1 and f"the Ray cluster at {url} rejected the auth token from RAY_AUTH_TOKEN" in err
    assert "0" * 64 not in err  # the token itself is never printed
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setattr(jobs, "DEFAULT_TOKEN_FILE", tmp_path / "no_token")
    rc, _, err = cli(capsys, "jobs", "list", "--address", url)
    assert rc == 1 and f"the Ray cluster at {url} requires token authentication and no token was sent" in err


@jobs_bound(2)  # two jobs in a row (see jobs_bound)
def test_submit_logs_status_and_stop(head, synthetic_data, tmp_path, capsys):
    url, storage, data = head.dashboard_url, tmp_path / "runs", str(synthetic_data)
    common = ["--address", url, "--python", sys.executable]

    rc, out, err = cli(capsys, "submit", DEBUG_CONFIG, *common,
                       *small_run("viajobs", storage, data, steps=8, every=4, extra=NO_EVAL))
    assert rc == 0, err
    job = out.strip().splitlines()[0]
    assert job.startswith("unimo-viajobs-")

    # Two drivers for one run, at the front door: the same run cannot be submitted again while its job lives.
    rc, _, err = cli(capsys, "submit", DEBUG_CONFIG, *common,
                     *small_run("viajobs", storage, data, steps=8, every=4, extra=NO_EVAL))
    assert rc == 1 and f"already has a live job on {url}: {job}" in err

    rc, out, _ = cli(capsys, "jobs", "list", "--address", url)
    assert rc == 0 and job in out and "viajobs" in out

    rc, out, err = cli(capsys, "jobs", "logs", job, "--follow", "--address", url)
    assert rc == 0 and "step 8/8" in out and "run finished" in out, out[-3000:]
    assert "SUCCEEDED" in err
    rc, out, _ = cli(capsys, "jobs", "status", job, "--address", url)
    assert rc == 0 and out.startswith(f"{job} SUCCEEDED")
    state = json.loads((storage / "viajobs" / "checkpoints" / "step_00000008"
                        / "trainer_state.json").read_text())
    assert state["step"] == 8 and not (storage / "viajobs" / "run.lock").exists()

    # A long job is stopped while it trains: it checkpoints at the next step and ends STOPPED, its workers go,
    # its run lock is free, so resubmitting the run resumes there (preemption through the Jobs API).
    rc, out, err = cli(capsys, "submit", DEBUG_CONFIG, *common,
                       *small_run("long", storage, data, steps=5000, every=0, extra=NO_EVAL))
    assert rc == 0, err
    long_job = out.strip().splitlines()[0]
    client = jobs.connect(url)
    wait_for(lambda: "step 2/5000" in client.get_job_logs(long_job), STARTUP_S, "the long job to train")
    assert _train_workers(head.pid)
    rc, out, _ = cli(capsys, "jobs", "stop", long_job, "--wait", "--address", url)
    logs = client.get_job_logs(long_job)
    assert rc == 0 and f"{long_job} STOPPED" in out, logs[-3000:]
    wait_for(lambda: not _train_workers(head.pid), 60, "the stopped job's training workers to exit")
    saved = sorted((storage / "long" / "checkpoints").glob("step_*"))
    assert saved, "the stopped job saved no checkpoint:\n" + logs[-3000:]
    assert json.loads((saved[-1] / "trainer_state.json").read_text())["step"] >= 2
    lock = RunLock(storage / "long")
    owner = lock.read()
    assert owner is None or lock.stale_reason(owner), "a stopped job must not keep its run locked"
