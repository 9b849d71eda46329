"""Unit tests of the run lock: one live driver per run, stale locks of dead drivers taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from tests.orchestrator.faults import wait_for
from orchestrator.runlock import LOCK_FILE, LockOwner, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[2]


def _foreign_lock(run_dir: Path, heartbeat_age: float, host: str = "other-host.example",
                  pid: int = 4242) -> str:
    """Writes a lock as another machine's driver would; returns its token."""
    now = time.time()
    owner = LockOwner(token="t-foreign", host=host, pid=pid, pid_started=0.0,
                      acquired=now - heartbeat_age - 5, heartbeat=now - heartbeat_age)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(owner.__dict__))
    return owner.token


def test_acquire_writes_owner_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path / "r1").acquire()
    data = json.loads((tmp_path / "r1" / LOCK_FILE).read_text())
    assert data["host"] == socket.gethostname() and data["pid"] == os.getpid()
    assert abs(data["heartbeat"] - time.time()) < 5
    lock.release()
    assert not (tmp_path / "r1" / LOCK_FILE).exists()


def test_second_acquire_is_refused_naming_the_owner_and_changes_nothing(tmp_path):
    with RunLock(tmp_path / "r1"):
        before = (tmp_path / "r1" / LOCK_FILE).read_bytes()
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path / "r1").acquire()
        msg = str(err.value)
        assert "r1" in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert (tmp_path / "r1" / LOCK_FILE).read_bytes() == before
    assert not (tmp_path / "r1" / LOCK_FILE).exists()


def _contender(run_dir: str, barrier, results, release) -> None:
    barrier.wait()
    try:
        lock = RunLock(run_dir).acquire()
    except RunLocked:
        results.put("refused")
        return
    results.put("acquired")
    # keep it until every other contender has tried (the parent says so), however slow they are
    release.wait(60)
    lock.release()


def _race(run_dir: Path, n: int = 6) -> list[str]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    release = ctx.Event()
    procs = [ctx.Process(target=_contender, args=(str(run_dir), barrier, results, release)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in range(n)]
    finally:
        release.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return outcomes


@pytest.mark.integration
def test_concurrent_acquire_exactly_one_wins(tmp_path):
    outcomes = _race(tmp_path / "race")
    assert sorted(outcomes) == ["acquired"] + ["refused"] * 5


@pytest.mark.integration
def test_concurrent_takeover_of_a_stale_lock_exactly_one_wins(tmp_path):
    _foreign_lock(tmp_path / "race", heartbeat_age=3600)
    outcomes = _race(tmp_path / "race")
    assert sorted(outcomes) == ["acquired"] + ["refused"] * 5


def test_live_lock_of_another_host_is_refused(tmp_path):
    _foreign_lock(tmp_path / "r", heartbeat_age=5)
    with pytest.raises(RunLocked, match="other-host.example"):
        RunLock(tmp_path / "r", stale_after=60).acquire()


def test_stale_lock_of_another_host_is_taken_over_with_a_warning(tmp_path, caplog):
    _foreign_lock(tmp_path / "r", heartbeat_age=120)
    lock = RunLock(tmp_path / "r", stale_after=60).acquire()
    assert json.loads((tmp_path / "r" / LOCK_FILE).read_text())["token"] == lock.owner.token
    assert "took over the stale lock" in caplog.text and "no heartbeat for" in caplog.text
    lock.release()


@pytest.mark.integration
def test_lock_of_a_dead_driver_on_this_host_is_taken_over_at_once(tmp_path):
    ctx = mp.get_context("fork")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    _foreign_lock(tmp_path / "r", heartbeat_age=1, host=socket.gethostname(), pid=p.pid)
    lock = RunLock(tmp_path / "r", stale_after=3600).acquire()
    lock.release()


def test_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    # The owner's pid now belongs to this very process, but the recorded start time is another process's.
    now = time.time()
    owner = LockOwner(token="t-old", host=socket.gethostname(), pid=os.getpid(), pid_started=12345.0,
                      acquired=now, heartbeat=now)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK_FILE).write_text(json.dumps(owner.__dict__))
    RunLock(tmp_path / "r", stale_after=3600).acquire().release()


def test_half_written_lock_counts_as_live_until_its_mtime_is_old(tmp_path):
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / LOCK_FILE
    path.write_text("{not json")
    with pytest.raises(RunLocked):
        RunLock(tmp_path / "r", stale_after=60).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    RunLock(tmp_path / "r", stale_after=60).acquire().release()


def test_heartbeat_refreshes_and_detects_a_takeover(tmp_path):
    clock = [1000.0]
    lock = RunLock(tmp_path / "r", stale_after=60, clock=lambda: clock[0]).acquire()
    clock[0] += 30
    assert lock.refresh()
    assert json.loads(lock.path.read_text())["heartbeat"] == 1030.0
    # The driver stalls past the stale limit and another one takes over; the stalled one must notice.
    other = RunLock(tmp_path / "r", stale_after=60, clock=lambda: clock[0] + 100).acquire()
    assert not lock.refresh() and lock.lost.is_set()
    lock.release()  # must not remove the new owner's lock
    assert json.loads(other.path.read_text())["token"] == other.owner.token
    other.release()


def test_heartbeat_thread_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path / "r", heartbeat=0.2).acquire().start_heartbeat()
    first = json.loads(lock.path.read_text())["heartbeat"]
    wait_for(lambda: json.loads(lock.path.read_text())["heartbeat"] > first, 60,  # 60: only a dead thread
             "the heartbeat thread to refresh the lock", poll=0.05)
    lock.release()
    assert not lock.path.exists()


def test_driver_refuses_a_locked_run_before_touching_it(tmp_path, capsys):
    """`unimo train` on a run held by a live driver: refused, no MLflow run, no checkpoints, no Ray."""
    from data_pipeline.synthetic import write_synthetic_dataset
    from orchestrator.cli import main

    # real inputs: the pre-flight passes, the lock refuses
    data = write_synthetic_dataset(str(tmp_path / "data"), n_pairs=20, n_text=20, n_images=20, n_eval=10,
                                   samples_per_shard=10)
    run_dir = tmp_path / "runs" / "busy"
    with RunLock(run_dir):
        rc = main(["train", str(ROOT / "configs" / "debug.yaml"), "run.name=busy",
                   f"run.storage={tmp_path / 'runs'}",
                   f"data.pair.urls={data['pair']}", f"data.text.urls={data['text']}",
                   f"data.image.urls={data['image']}", f"data.eval_pairs={data['eval']}",
                   f"data.tokenizer={data['tokenizer']}",
                   "tracking.uri=" + f"sqlite:///{tmp_path / 'other.db'}"])
        assert rc == 1
        assert "run busy is locked by a live driver" in capsys.readouterr().err
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    assert not (tmp_path / "runs" / "mlflow.db").exists()


# ----- the lock on s3:// run storage (moto's S3 server on loopback) -----------------------------------------
@pytest.fixture(scope="module")
def s3_runs():
    """The URL of a run prefix in a fresh bucket on a loopback S3 server."""
    import boto3

    from tests.integration.services import s3_server

    with s3_server():
        boto3.client("s3").create_bucket(Bucket="locks")
        yield "s3://locks/runs"


def _s3_lock_owner(url: str) -> dict | None:
    from trainer.storage import read_text

    text = read_text(f"{url}/{LOCK_FILE}")
    return json.loads(text) if text else None


def test_s3_lock_refuses_a_second_driver_and_is_released(s3_runs):
    from orchestrator.runlock import S3RunLock

    url = f"{s3_runs}/one"
    lock = RunLock(url).acquire()
    assert isinstance(lock, S3RunLock) and _s3_lock_owner(url)["token"] == lock.owner.token
    with pytest.raises(RunLocked, match=f"run one is locked by a live driver .*lock file {url}/{LOCK_FILE}"):
        RunLock(url).acquire()
    assert _s3_lock_owner(url)["token"] == lock.owner.token  # the refused driver changed nothing
    lock.release()
    assert _s3_lock_owner(url) is None


def test_s3_lock_stale_takeover_heartbeat_and_loss(s3_runs, caplog):
    clock = [1000.0]
    url = f"{s3_runs}/stale"
    first = RunLock(url, stale_after=60, clock=lambda: clock[0]).acquire()
    clock[0] += 30
    assert first.refresh() and _s3_lock_owner(url)["heartbeat"] == 1030.0
    # A driver on another machine sees no heartbeat for > 60 s and takes over (conditional on the ETag it
    # read).
    second = RunLock(url, stale_after=60, clock=lambda: clock[0] + 100).acquire()
    assert "took over the stale lock" in caplog.text
    assert not first.refresh() and first.lost.is_set()  # the stalled driver's If-Match write is refused
    first.release()  # must not delete the new owner's lock
    assert _s3_lock_owner(url)["token"] == second.owner.token
    second.release()
    assert _s3_lock_owner(url) is None


def test_s3_lock_contenders_one_wins(s3_runs):
    import concurrent.futures

    url = f"{s3_runs}/race"

    def contend(_):
        try:
            return RunLock(url).acquire()
        except RunLocked:
            return None

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(contend, range(6)))
    winners = [lock for lock in got if lock is not None]
    assert len(winners) == 1
    winners[0].release()


def test_train_on_a_missing_bucket_fails_at_start_naming_it(s3_runs, capsys):
    """Run storage: `unimo train` with run.storage in a bucket that does not exist stops before the lock,
    MLflow or Ray, naming the URL; no secret in the message."""
    from orchestrator.cli import main
    from tests.integration.services import FAKE_AWS

    rc = main(["train", str(ROOT / "configs" / "debug.yaml"), "run.name=r", "run.storage=s3://no-bucket/runs",
               "data.pair.urls=/nonexistent/p", "data.text.urls=/nonexistent/t",
               "data.image.urls=/nonexistent/i"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "run.storage s3://no-bucket/runs/r: bucket 'no-bucket' does not exist" in err, err
    assert FAKE_AWS["AWS_SECRET_ACCESS_KEY"] not in err
