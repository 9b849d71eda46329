"""A seeded fault campaign (issue #27): random schedules of faults against short debug runs, each checked
against an uninterrupted reference run.

    python bench/fault_campaign.py --schedules 10 --seed 1 [--steps 16] [--storage auto|local|s3]
    python bench/fault_campaign.py --replay 123456        # one failing schedule again, by its seed

Setup once: a small synthetic data set, run storage in a temporary folder, configs/debug.yaml with 2 workers
x 1 CPU, eval off, log_every=1, a checkpoint every 4 steps, keep_last=2, K steps; one uninterrupted run of K
steps gives the reference weights. Each schedule draws 1-3 faults from MENU with its own seeded RNG and
applies them across attempts of `unimo train` (same run name), rerunning until the run has reached step K.
In-job faults hold the ranks at the chosen step with the fault gate (trainer/fault_gate.py), so the fault
lands at that step however fast the machine; disk faults are applied between attempts. Then the invariants
(``check_*`` below): weights at K bitwise equal to the reference, every sample delivered exactly once, one
MLflow run with steps 1..K once each, nothing lost that the schedule did not destroy, and the run folder
resumes once more to K+2. A driver SIGKILL also checks the run lock: while the driver lives, a second driver
of the run is refused and changes nothing; the next attempt says it took over the dead driver's lock.

Some faults need services of their own, started for the schedules that draw them: an S3 outage needs the run
on S3 (moto's server on loopback, reached through an outage switch, tests/integration/outage_proxy.py); an
MLflow outage an MLflow server on loopback; a full disk a small tmpfs as the ranks' TMPDIR, where they stage
each save. A schedule that changes the number of workers (2 -> 1 -> 2) is compared with a reference run that
made the same changes at the same steps (computed once per pattern): weights cannot be bitwise equal across
a world-size change to a run that never made it.

The campaign's code is importable: ``Setup.create(...)`` and ``run_schedule(seed, faults, setup)`` run one
schedule and return a ``Result`` (tests/integration/test_fault_campaign.py runs three fixed ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.integration.recipes import DEBUG_CONFIG, STARTUP_S, small_run  # noqa: E402
from tests.orchestrator.faults import (consumed, differing_tensors, driver, fp32_weights,  # noqa: E402
                                       shard_sizes, state_with_cursor, wait_for)

# In-job faults happen during an attempt (at a moment held by the fault gate); disk faults between attempts.
# A worker SIGKILL lands before a step, or inside checkpoint work: half-way into a save (shards written, no
# manifest), before the upload, before retention (rank 0), or in a resume (checkpoint verified, not loaded).
# Service faults: S3 connections reset from the upload of a checkpoint on, for a while; the MLflow server
# killed before one step and started again before a later one; the ranks' TMPDIR filled before a step so
# that the next save cannot fit; the driver stopped (SIGTERM) at one step and the run resumed with 1 worker,
# stopped again at a later step and resumed with 2 (``resize`` then its ``resize_back``).
IN_JOB = ("worker_kill", "kill_in_save", "kill_before_upload", "kill_before_prune", "kill_in_restore",
          "driver_term", "driver_kill", "s3_outage", "mlflow_outage", "disk_full", "resize")
FOLLOW_UP = ("resize_back",)  # not drawn: queued by the fault before it
ON_DISK = ("truncate", "manifest", "tear_optim")
MENU = IN_JOB + ON_DISK
# The fault gate's phase of each in-job fault (trainer/fault_gate.py).
PHASE = {"worker_kill": "step", "driver_term": "step", "driver_kill": "step", "kill_in_save": "save",
         "kill_before_upload": "upload", "kill_before_prune": "prune", "kill_in_restore": "restore",
         "s3_outage": "upload", "mlflow_outage": "step", "disk_full": "step", "resize": "step",
         "resize_back": "step"}
# What `unimo train` must exit with after each in-job fault (None: a clean attempt): a killed worker is
# restarted inside the job; a save that cannot fit on the disk is a user error, never retried (exit 1, with
# the error naming the folder and the bytes); a resize stops the driver like a SIGTERM.
EXPECTED_RC = {None: 0, **{kind: 0 for kind in IN_JOB}, "driver_term": 75, "driver_kill": -signal.SIGKILL,
               "disk_full": 1, "resize": 75, "resize_back": 75}
MAX_ATTEMPTS = 8
EVERY = 4
KEEP_LAST = 2
RUN_NAME = "campaign"
# the sources tests/integration/test_faults_node.py checks exactly once
TRACKED_SOURCES = (("pair", "pairs"), ("image", "images"))
BUCKET = "unimo-campaign"
# The full disk: a tmpfs that holds several saves of the debug model (about 3.9 MB per rank) and the
# universal conversion of an elastic resume; filled until less than one rank's save is free.
DISK_BYTES = 96 << 20
DISK_LEFT = 1 << 20
NO_SPACE = "not enough free space in"  # the start of NoSpaceForCheckpoint's message
# How long an S3 outage lasts (drawn): from a blip that a client's first retries ride out, to longer than
# s3fs's own retries of a listing or a delete (a few seconds), within the upload's budget
# (checkpoint.upload_attempts, about a minute and a half).
S3_OUTAGE_S = (1.0, 45.0)


@dataclasses.dataclass
class S3Services:
    """moto's S3 server on loopback with one bucket, and the outage switch the trainer reaches it through.
    The campaign process itself (its checks, the disk faults) talks to moto directly."""

    server: object
    proxy: object

    @classmethod
    def start(cls) -> S3Services:
        import boto3

        from tests.integration.outage_proxy import OutageProxy
        from tests.integration.services import FAKE_AWS, S3Server

        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
        server = S3Server()
        server.start()
        os.environ.update(FAKE_AWS)
        os.environ["AWS_ENDPOINT_URL"] = server.url
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        return cls(server, OutageProxy(server.port).start())

    def trainer_env(self) -> dict[str, str]:
        from tests.integration.services import FAKE_AWS

        return {**FAKE_AWS, "AWS_ENDPOINT_URL": self.proxy.url}

    def stop(self) -> None:
        self.proxy.close()
        self.server.stop()


@dataclasses.dataclass
class Setup:
    """What every schedule shares: the data, a work folder, the plan length, the reference weights (and those
    of each world-size pattern met), where run storage goes, and the S3 services once a schedule needed
    them."""

    data: Path
    work: Path
    steps: int
    reference: dict | None = None
    storage: str = "local"  # local: a folder; s3: every run on S3; auto: on S3 when a schedule needs it
    references: dict = dataclasses.field(default_factory=dict)  # world-size pattern -> weights at K
    s3: S3Services | None = None

    @classmethod
    def create(cls, work: Path, steps: int, data: Path | None = None, storage: str = "local") -> Setup:
        """Writes the synthetic data set under ``work`` unless ``data`` is given (the tests' session one)."""
        if data is None:
            from data_pipeline.synthetic import write_synthetic_dataset

            data = work / "data"
            write_synthetic_dataset(str(data), n_pairs=400, n_text=400, n_images=400, n_eval=100,
                                    samples_per_shard=100)
        return cls(Path(data), Path(work), steps, storage=storage)

    def s3_services(self) -> S3Services:
        if self.s3 is None:
            self.s3 = S3Services.start()
        return self.s3

    def close(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None

    def argv(self, name: str, storage: Path | str, steps: int | None = None, workers: int = 2,
             extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        extra = [f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1",
                 f"checkpoint.keep_last={KEEP_LAST}", *extra]
        return ["train", DEBUG_CONFIG, *small_run(name, storage, str(self.data), steps=steps or self.steps,
                                                  every=EVERY, extra=extra)]

    def run_reference(self) -> float:
        """One uninterrupted run of K steps; keeps its consolidated weights at K. Returns its wall time."""
        storage, t0 = self.work / "reference", time.monotonic()
        with driver(self.argv("reference", storage), self.work / "reference.log") as d:
            rc = d.wait(timeout=STARTUP_S)
            if rc != 0:
                raise RuntimeError(f"the reference run failed ({rc}):\n{d.tail()}")
        self.reference = fp32_weights(step_dir(storage / "reference", self.steps))
        return time.monotonic() - t0

    def pattern_reference(self, pattern: tuple[tuple[int, int, int], ...]) -> dict:
        """The weights at K of a run whose steps were trained by these world sizes, ``((workers, first, last),
        ...)``, and by nothing else in between: one job per segment, each but the last stopped after its last
        step with a SIGTERM held before it (the driver saves that step and exits 75), the next job resuming
        from there with its number of workers. Computed once per pattern."""
        if pattern in self.references:
            return self.references[pattern]
        from trainer import fault_gate

        name = "ref-" + "-".join(f"{w}x{first}_{last}" for w, first, last in pattern)
        storage = self.work / name
        shutil.rmtree(storage, ignore_errors=True)
        storage.mkdir(parents=True)
        for i, (workers, _, last) in enumerate(pattern):
            final = i == len(pattern) - 1
            gate = storage / f"gate{i}"
            env = {} if final else {"UNIMO_FAULT_GATE": f"{last}:{gate}"}
            with driver(self.argv(name, storage, workers=workers), storage / f"job{i}.log", env=env) as d:
                if not final:
                    wait_for(lambda: fault_gate.reached(gate, tuple(range(workers))), STARTUP_S,
                             f"the ranks before step {last}", d)
                    d.proc.send_signal(signal.SIGTERM)
                    wait_for(lambda: (storage / name / "STOP").exists(), 60, "the driver's STOP request", d)
                    fault_gate.release(gate)
                rc = d.wait(timeout=STARTUP_S)
            if rc != (0 if final else 75):
                raise RuntimeError(f"the reference run of {name} exited {rc} in job {i}; log "
                                   f"{storage / f'job{i}.log'}")
        self.references[pattern] = fp32_weights(step_dir(storage / name, self.steps))
        return self.references[pattern]


@dataclasses.dataclass
class Fault:
    """One fault of a schedule: its kind and a number in [0, 1) that picks its step or target when applied
    (the targets depend on what is on disk then, so they are chosen then, from the schedule's own draw)."""

    kind: str
    u: tuple[float, float, float] = (0.5, 0.5, 0.5)
    done: str = ""  # what was actually done, e.g. "worker_kill@11"
    follow: Fault | None = None  # the fault this one queued (a resize's way back)

    def describe(self) -> str:
        return (self.done or f"{self.kind} (not applied)") + (f" -> {self.follow.describe()}" if self.follow
                                                               else "")


@dataclasses.dataclass
class Result:
    seed: int
    faults: list[Fault]
    attempts: list[int] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)
    run_dir: Path | None = None
    storage: str = "local"

    @property
    def passed(self) -> bool:
        return not self.failures

    def fault_list(self) -> str:
        return ", ".join(f.describe() for f in self.faults)


@dataclasses.dataclass
class Schedule:
    """One schedule's run and what its attempts share: where the run lives (a local folder or an s3:// URL),
    the local folder of logs, gates and the MLflow database, the number of workers of the next attempt, the
    environment and overrides of every attempt, and which world size trained each step that is kept."""

    setup: Setup
    storage: Path  # local: logs, gates, mlflow.db; the run folder too unless the run is on S3
    run: str  # the run folder: storage/campaign, or s3://BUCKET/s<seed>/campaign
    workers: int = 2
    env: dict = dataclasses.field(default_factory=dict)
    extra: list = dataclasses.field(default_factory=list)
    trained: dict = dataclasses.field(default_factory=dict)  # step -> the world size that trained it
    damaged: dict = dataclasses.field(default_factory=dict)  # step folder -> what identified it when damaged
    stale_lock_pid: int | None = None  # a SIGKILLed driver's, whose lock the next attempt must take over
    mlflow: object = None  # the MLflow server, for a schedule with an MLflow outage
    disk: object = None  # the small tmpfs, for a schedule with a full disk

    @property
    def remote(self) -> bool:
        return "://" in self.run

    @property
    def run_storage(self) -> str:
        """What run.storage is set to (the run folder's parent)."""
        return self.run.rsplit("/", 1)[0]

    def argv(self, steps: int | None = None, workers: int | None = None) -> list[str]:
        return self.setup.argv(RUN_NAME, self.run_storage, steps, workers or self.workers, self.extra)

    def local(self) -> Path:
        """The run folder to read: itself, or a fresh copy of its checkpoints from S3 (moto, directly)."""
        if not self.remote:
            return Path(self.run)
        from trainer import storage as run_storage

        mirror = self.storage / "mirror" / RUN_NAME
        shutil.rmtree(mirror, ignore_errors=True)
        mirror.mkdir(parents=True)
        if run_storage.list_names(run_storage.join(self.run, "checkpoints")):
            run_storage.download(run_storage.join(self.run, "checkpoints"), mirror / "checkpoints",
                                 progress=False)
        return mirror

    def push(self, local_file: Path) -> None:
        """Makes the run's copy of a mirrored file what the mirror now holds (a damaged file, or none)."""
        if not self.remote:
            return
        from trainer import storage as run_storage

        rel = local_file.relative_to(self.storage / "mirror" / RUN_NAME).as_posix()
        bucket, key = self._key(rel)
        client = run_storage.s3_client()
        if local_file.exists():
            client.put_object(Bucket=bucket, Key=key, Body=local_file.read_bytes())
        else:
            client.delete_object(Bucket=bucket, Key=key)

    def _key(self, rel: str) -> tuple[str, str]:
        bucket, _, prefix = self.run[len("s3://"):].partition("/")
        return bucket, f"{prefix}/{rel}"

    def identity(self, folder_name: str) -> object:
        """What tells one step folder from a later one of the same name (saved again after this one was moved
        aside): its inode, or on S3 the newest modification time of its objects."""
        if not self.remote:
            return (Path(self.run) / "checkpoints" / folder_name).stat().st_ino
        from trainer import storage as run_storage

        bucket, prefix = self._key(f"checkpoints/{folder_name}/")
        pages = run_storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                   Prefix=prefix)
        return max((o["LastModified"] for page in pages for o in page.get("Contents", [])), default=None)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.kill()
        if self.disk is not None:
            self.disk.unmount()
        tmp = self.env.get("TMPDIR")
        if tmp and self.disk is None:
            shutil.rmtree(tmp, ignore_errors=True)


def open_schedule(setup: Setup, storage: Path, faults: list[Fault], seed: int) -> Schedule:
    """The schedule's run and services: on S3 when the campaign says so or (``auto``) an S3 outage is
    drawn, an MLflow server for an MLflow outage, a tmpfs TMPDIR for a full disk. A fault whose service cannot
    be had here is marked skipped, with the reason."""
    kinds = {f.kind for f in faults}
    on_s3 = setup.storage == "s3" or (setup.storage == "auto" and "s3_outage" in kinds)
    if on_s3:
        from trainer import storage as run_storage

        services = setup.s3_services()
        run = f"s3://{BUCKET}/s{seed}/{RUN_NAME}"
        run_storage.delete(f"s3://{BUCKET}/s{seed}")  # a replay starts afresh
        sched = Schedule(setup, storage, run, env=services.trainer_env(),
                         extra=[f"tracking.uri=sqlite:///{storage / 'mlflow.db'}"])
        # The ranks' temporary files (the S3 restore cache, the MLflow spool of a run on S3) in a folder of
        # this schedule's, not shared with the other schedules' run of the same name.
        sched.env["TMPDIR"] = tempfile.mkdtemp(prefix="uct-", dir="/tmp")
    else:
        sched = Schedule(setup, storage, str(storage / RUN_NAME))
        for f in faults:
            if f.kind == "s3_outage":
                f.done = "s3_outage (skipped: run storage is local; --storage s3 or auto)"
    try:
        if "disk_full" in kinds:
            from tests.integration.services import SmallDisk

            try:
                sched.disk = SmallDisk(DISK_BYTES).mount()
                if sched.env.get("TMPDIR"):
                    shutil.rmtree(sched.env["TMPDIR"], ignore_errors=True)
                sched.env["TMPDIR"] = str(sched.disk.path)
            except OSError as err:
                print(f"[campaign] disk_full skipped: {err} (needs root or CAP_SYS_ADMIN)", flush=True)
                for f in faults:
                    if f.kind == "disk_full":
                        f.done = "disk_full (skipped: cannot mount a tmpfs)"
        if "mlflow_outage" in kinds:
            from tests.integration.services import MlflowServer

            sched.mlflow = MlflowServer(storage).start()
            sched.extra = [e for e in sched.extra if not e.startswith("tracking.uri=")]
            sched.extra.append(f"tracking.uri={sched.mlflow.uri}")
    except BaseException:
        sched.close()
        raise
    return sched


# ----- the schedule -----------------------------------------------------------------------------------------
def schedule_seed(campaign_seed: int, index: int) -> int:
    """The seed of schedule ``index`` of a campaign (what --replay takes)."""
    return random.Random(campaign_seed * 1_000_003 + index).randrange(1_000_000)


def draw_faults(seed: int) -> list[Fault]:
    """1-3 faults from MENU; in-job ones first, since a run that has reached K has no step left to hold."""
    rng = random.Random(seed)
    faults = [Fault(rng.choice(MENU), (rng.random(), rng.random(), rng.random()))
              for _ in range(rng.randint(1, 3))]
    return sorted(faults, key=lambda f: f.kind not in IN_JOB)


class InvariantBroken(AssertionError):
    """An invariant found broken in the middle of an attempt, where no problem string can be returned."""


def run_schedule(seed: int, setup: Setup, faults: list[Fault] | None = None, *,
                 check_resume: bool = True) -> Result:
    """Runs one schedule in a fresh run folder and checks the invariants; never raises for a failed check."""
    faults = draw_faults(seed) if faults is None else faults
    result = Result(seed, faults)
    storage = setup.work / f"s{seed}"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    t0 = time.monotonic()
    sched = None
    try:
        sched = open_schedule(setup, storage, faults, seed)
        result.storage = "s3" if sched.remote else "local"
        result.run_dir = Path(sched.run) if not sched.remote else storage / "mirror" / RUN_NAME
        _attempts(sched, result)
        if not result.failures:
            _check_all(sched, result, check_resume)
    except InvariantBroken as err:  # found during an attempt (the run lock beside a live driver)
        result.failures.append(f"invariant: {err}")
    except Exception as err:  # a harness error is reported as the schedule's failure, with the seed
        result.failures.append(f"harness: {type(err).__name__}: {err}")
    finally:
        if sched is not None:
            sched.close()
    result.wall_s = time.monotonic() - t0
    return result


def _attempts(sched: Schedule, result: Result) -> None:
    """Attempts until every fault is applied and a finish follows the last one (at most MAX_ATTEMPTS)."""
    setup = sched.setup
    queue, owed, n = list(result.faults), 0, 0
    while n < MAX_ATTEMPTS:
        fault = queue.pop(0) if queue and queue[0].kind in IN_JOB + FOLLOW_UP else None
        if fault is not None and fault.done:
            continue  # marked skipped when the schedule opened (a service this machine cannot give)
        resumed = _resume_step(sched.run)
        holds = _holds(setup, sched.run, fault) if fault is not None else []
        if fault is not None and not holds:
            fault.done = f"{fault.kind} (skipped: {SKIPPED.get(fault.kind) or SKIPPED[PHASE[fault.kind]]})"
            fault = None
            if resumed == setup.steps and owed == 0:
                # the run is at K and owes no job to a damage: an attempt now would only start and stop
                owed = _damage_queued(sched, queue, owed)
                if not queue and owed == 0:
                    return
                continue
        n += 1
        workers = sched.workers
        stale_lock_pid, sched.stale_lock_pid = sched.stale_lock_pid, None  # left by the attempt before
        rc = _one_attempt(sched, fault, holds, n)
        result.attempts.append(rc)
        reached = _resume_step(sched.run)
        for step in range(resumed + 1, reached + 1):  # what this attempt trained and kept
            sched.trained[step] = workers
        expected = EXPECTED_RC[fault.kind if fault else None]
        if rc != expected:
            result.failures.append(f"attempt {n} ({fault.done if fault else 'clean'}) exited {rc}, "
                                   f"expected {expected}; log {sched.storage / f'attempt{n}.log'}")
            return
        if stale_lock_pid is not None:
            problem = _took_over_stale_lock(sched, n, stale_lock_pid, resumed)
            if problem:
                result.failures.append(f"attempt {n}: {problem}")
                return
        if fault is not None:
            problem = _after(sched, fault, queue, n)
            if problem:
                result.failures.append(f"attempt {n} ({fault.done}): {problem}")
                return
        owed = max(0, owed - 1)
        if n == 1 and fault is None and setup.reference is None and reached == setup.steps:
            # an uninterrupted first attempt is the reference when the setup has none (the tests)
            setup.reference = fp32_weights(step_dir(sched.local(), setup.steps))
        owed = _damage_queued(sched, queue, owed)
        if not queue and owed == 0 and reached == setup.steps:
            return
    result.failures.append(f"finish: step {setup.steps} not reached in {MAX_ATTEMPTS} attempts")


def _damage_queued(sched: Schedule, queue: list[Fault], owed: int) -> int:
    """Applies the disk faults at the head of ``queue``; returns how many more jobs the run owes them."""
    while queue and queue[0].kind in ON_DISK:
        disk = queue.pop(0)
        _damage(sched, disk)
        owed = max(owed, 2 if disk.kind == "tear_optim" else 1)  # the issue: two more jobs after the tear
    return owed


def _took_over_stale_lock(sched: Schedule, n: int, pid: int, resumed: int) -> str:
    """After a driver SIGKILL: attempt ``n`` said it took over the dead driver's lock, and its first resume
    was from the newest valid checkpoint the dead driver left (step ``resumed``; none: from scratch). Returns
    a problem, or ""."""
    out = (sched.storage / f"attempt{n}.log").read_text(errors="replace")
    if not re.search(rf"took over the stale lock of run {RUN_NAME} .*\bpid {pid},", out):
        return f"it did not say it took over the stale lock of the killed driver (pid {pid})"
    first = re.search(r"resumed from \S+ at step (\d+)", out)
    if resumed and (first is None or int(first.group(1)) != resumed):
        return (f"after the driver kill it did not resume from step {resumed}, the newest valid checkpoint "
                f"(first resume: {first.group(0) if first else 'none'})")
    return ""


def _after(sched: Schedule, fault: Fault, queue: list[Fault], n: int) -> str:
    """What follows an attempt with ``fault`` before the next one: the full disk freed (after checking that
    the product said why it stopped), the number of workers changed. Returns a problem, or ""."""
    if fault.kind == "disk_full":
        sched.disk.free()
        if NO_SPACE not in (sched.storage / f"attempt{n}.log").read_text(errors="replace"):
            return f"the attempt did not stop with NoSpaceForCheckpoint ('{NO_SPACE} ...')"
    elif fault.kind == "resize":
        sched.workers = 1
        fault.follow = Fault("resize_back", (fault.u[1], fault.u[2], 0.5))
        queue.insert(0, fault.follow)
    elif fault.kind == "resize_back":
        sched.workers = 2
    return ""


SKIPPED = {"step": "no step left to hold", "save": "no checkpoint left to save",
           "upload": "no checkpoint left to save", "prune": "no checkpoint left to save",
           "restore": "no resume left to hold", "disk_full": "no save with a known size left",
           "mlflow_outage": "fewer than two steps left", "resize": "fewer than two steps left"}


def _pick(steps: list[int], u: float) -> int:
    return steps[int(u * len(steps))]


def _holds(setup: Setup, run_dir: Path | str, fault: Fault) -> list[tuple[str, int]]:
    """The moments (phase, step) the attempt holds for ``fault``, in the order the run meets them, drawn
    from its ``u[0]`` among those this attempt still reaches ([] when there is none): any step before K; a
    step that saves (and then prunes); the resume of this attempt, or when it starts from scratch, the
    resume that follows a worker kill at a step after the first checkpoint (two failures back to back).
    An MLflow outage holds two steps (the server goes before the first and comes back before the second,
    drawn by ``u[1]``); a full disk a step after which a save follows whose size the ranks know (their first
    save of this attempt or the checkpoint they resumed from); a resize a step with at least one more step
    before K, for the way back."""
    resumed = _resume_step(run_dir)
    phase = PHASE[fault.kind]
    if phase == "restore":
        if 0 < resumed < setup.steps:
            return [("restore", resumed)]
        steps = list(range(max(resumed, EVERY) + 1, setup.steps))
        if not steps:
            return []
        step = _pick(steps, fault.u[0])
        return [("step", step), ("restore", (step - 1) // EVERY * EVERY)]
    if fault.kind == "mlflow_outage":
        steps = list(range(resumed + 1, setup.steps - 1))
        if not steps:
            return []
        down = _pick(steps, fault.u[0])
        return [("step", down), ("step", _pick(list(range(down + 1, setup.steps)), fault.u[1]))]
    if fault.kind == "disk_full":
        steps = list(range(max(resumed, EVERY) + 1, setup.steps + 1))
    elif fault.kind == "resize":
        steps = list(range(resumed + 1, setup.steps - 1))
    elif phase == "step":
        steps = list(range(resumed + 1, setup.steps))
    else:  # retention runs after every save too
        steps = [s for s in range(resumed + 1, setup.steps + 1) if s % EVERY == 0]
    return [(phase, _pick(steps, fault.u[0]))] if steps else []


def _resume_step(run_dir: Path | str) -> int:
    """The step of the newest valid checkpoint of the run folder (a local folder or an s3:// URL; an S3 one
    is verified in a temporary copy)."""
    from trainer.checkpoint import newest_valid

    if "://" not in str(run_dir):
        root = Path(run_dir) / "checkpoints"
        found = newest_valid(root) if root.is_dir() else None
        return found.step if found else 0
    with tempfile.TemporaryDirectory(prefix="campaign-verify-") as cache:
        found = newest_valid(f"{run_dir}/checkpoints", Path(cache))
    return found.step if found else 0


def _one_attempt(sched: Schedule, fault: Fault | None, holds: list[tuple[str, int]], n: int) -> int:
    """One `unimo train`; an in-job fault holds the ranks at its moments, strikes, then opens the gates."""
    gates = [sched.storage / f"gate{n}-{i}" for i in range(len(holds))]
    spec = ",".join(f"{phase}@{step}:{gate}" for (phase, step), gate in zip(holds, gates))
    env = {**sched.env, **({"UNIMO_FAULT_GATE": spec} if holds else {})}
    if fault is not None:
        fault.done = f"{fault.kind}@" + "+".join(f"{ph}{st}" if ph != "step" else str(st) for ph, st in holds)
        if sched.remote:
            fault.done += " (S3)"
    with driver(sched.argv(), sched.storage / f"attempt{n}.log", env=env) as d:
        if fault is None:
            return d.wait(timeout=STARTUP_S)
        if fault.kind in STRIKES:
            return STRIKES[fault.kind](d, sched, gates, holds, fault)
        for hold, gate in zip(holds, gates):  # a worker killed at each moment in turn
            _kill_held(d, gate, _wait_held(d, gate, hold, sched.workers), fault)
        return d.wait(timeout=STARTUP_S)


def _wait_held(d, gate: Path, hold: tuple[str, int], workers: int = 2) -> tuple[int, ...]:
    from trainer import fault_gate

    phase, step = hold
    ranks = (0,) if phase == "prune" else tuple(range(workers))  # only rank 0 prunes
    wait_for(lambda: fault_gate.reached(gate, ranks), STARTUP_S,
             f"ranks {ranks} at the {phase} of step {step}", d)
    return ranks


def _kill_held(d, gate: Path, ranks: tuple[int, ...], fault: Fault) -> None:
    """SIGKILLs one held worker (drawn by ``u[1]``) and opens the gate: the restarted group finds it open."""
    from trainer import fault_gate

    pids = fault_gate.held_pids(gate, ranks)
    os.kill(pids[int(fault.u[1] * len(pids))], signal.SIGKILL)
    fault_gate.release(gate)


def _wait_logged(d, sched: Schedule, step: int) -> None:
    """Until MLflow has step ``step``: a step before the fault is delivered, so that one logged again, or
    one lost, would show in the run's history."""
    if step > 0:
        wait_for(lambda: step in mlflow_steps(sched.storage, RUN_NAME)[1], 120, f"step {step} in MLflow", d)


def _strike_worker_kill(d, sched: Schedule, gates: list[Path], holds, fault: Fault) -> int:
    from trainer import fault_gate

    _wait_held(d, gates[0], holds[0], sched.workers)
    step = holds[0][1]
    workers = wait_for(lambda: len(d.train_workers()) == 2 and d.train_workers(), 60, "2 train workers", d)
    _wait_logged(d, sched, step - 1)  # a retrained step would show up twice if logged again
    os.kill(workers[int(fault.u[1] * 2)].pid, signal.SIGKILL)
    fault_gate.release(gates[0])  # the restarted group passes the gate
    return d.wait(timeout=STARTUP_S)


def _strike_driver_term(d, sched: Schedule, gates: list[Path], holds, fault: Fault) -> int:
    """SIGTERM to the driver held before a step (also how a resize stops the run at its step)."""
    from trainer import fault_gate
    from trainer import storage as run_storage

    _wait_held(d, gates[0], holds[0], sched.workers)
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: run_storage.exists(run_storage.join(sched.run, "STOP")), 60, "the driver's STOP request",
             d)
    fault_gate.release(gates[0])  # rank 0 sees the request at the end of this step, saves and stops
    return d.wait(timeout=STARTUP_S)


def _strike_driver_kill(d, sched: Schedule, gates: list[Path], holds, fault: Fault) -> int:
    """SIGKILL to the driver held before a step; first, while it lives, a second driver of the run must be
    refused and change nothing (the run lock). The next attempt must take over the dead driver's lock."""
    _wait_held(d, gates[0], holds[0], sched.workers)
    _second_driver_is_refused(sched, d.log_path.with_name(d.log_path.stem + "-second.log"))
    sched.stale_lock_pid = d.proc.pid
    d.kill()
    # Ray's workers share the dead driver's fate; none may train on beside the next attempt.
    wait_for(lambda: not any(n.startswith(("ray::RayTrainWorker", "ray::TrainController", "raylet"))
                             for n in d.leftover_names()), 60, "the dead driver's Ray workers to exit")
    return d.proc.returncode


def _second_driver_is_refused(sched: Schedule, log: Path) -> None:
    """A second `unimo train` of a run whose driver lives exits 1 naming the lock, and leaves
    the lock's owner and the run's MLflow run as they were; raises (the schedule's failure) otherwise. It runs
    under the same harness as an attempt, so whatever it might start is killed with it."""
    from trainer import storage as run_storage

    lock = run_storage.join(sched.run, "run.lock")

    def owner() -> str | None:  # the lock's owner token (its heartbeat time changes while the driver lives)
        text = run_storage.read_text(lock)
        return json.loads(text)["token"] if text else None

    def mlflow_run() -> str | None:
        return run_storage.read_text(run_storage.join(sched.run, "mlflow_run.json"))

    before = (owner(), mlflow_run())
    with driver(sched.argv(), log, env=sched.env) as second:
        rc = second.wait(timeout=STARTUP_S)
        said = second.output()
    if rc != 1 or f"run {RUN_NAME} is locked by a live driver" not in said:
        raise InvariantBroken(f"a second driver beside a live one exited {rc}, not refused by the run lock: "
                             f"{said[-1500:]}")
    if before[0] is None or (owner(), mlflow_run()) != before:
        raise InvariantBroken(f"the refused second driver changed the run lock's owner or the MLflow run "
                             f"(was {before})")


def _strike_s3_outage(d, sched: Schedule, gates: list[Path], holds, fault: Fault) -> int:
    """The ranks held with step S's local save complete, before its upload; S3 goes down (every connection
    reset, open or new) and the ranks go on: the upload, retention and whatever else reaches S3 meet the
    outage. It lasts a drawn time (``u[1]``, S3_OUTAGE_S), or less if the job ends first; then S3 answers
    again. The connections the proxy reset say whether a client met it (and retried: more than one)."""
    from trainer import fault_gate

    proxy = sched.setup.s3.proxy
    _wait_held(d, gates[0], holds[0], sched.workers)
    lo, hi = S3_OUTAGE_S
    length = lo + fault.u[1] * (hi - lo)
    started = time.monotonic()
    proxy.outage()
    try:
        fault_gate.release(gates[0])
        with contextlib.suppress(subprocess.TimeoutExpired):  # the job ending cuts the outage short
            d.proc.wait(timeout=length)
    finally:
        proxy.restore()
    fault.done += f" ({time.monotonic() - started:.0f} s, {proxy.refused} connections reset)"
    return d.wait(timeout=STARTUP_S)


def _strike_mlflow_outage(d, sched: Schedule, gates: list[Path], holds, fault: Fault) -> int:
    """The MLflow server SIGKILLed while the ranks are held before step A (step A-1 delivered), started again
    on the same port and database while they are held before step B: steps A..B-1, and any checkpoint among
    them, run with the server down, whatever the machine's speed."""
    from trainer import fault_gate

    (_, down), (_, up) = holds
    _wait_held(d, gates[0], holds[0], sched.workers)
    _wait_logged(d, sched, down - 1)
    sched.mlflow.kill()
    fault_gate.release(gates[0])
    try:
        _wait_held(d, gates[1], holds[1], sched.workers)
    finally:
        sched.mlflow.start()  # back even if the run failed meanwhile: the checks read the database
    fault_gate.release(gates[1])
    return d.wait(timeout=STARTUP_S)


def _strike_disk_full(d, sched: Schedule, gates: list[Path], holds, fault: Fault) -> int:
    """The ranks' TMPDIR (where each rank stages its save before the upload) filled while they are held
    before step S, until less than one rank's save is free: the next save must be refused, naming the disk,
    and the job end (a user error: a restart on the same disk cannot help). The disk is freed after the
    job (``_after``)."""
    from trainer import fault_gate

    _wait_held(d, gates[0], holds[0], sched.workers)
    wrote = sched.disk.fill(leave=DISK_LEFT)
    fault.done += f" ({wrote >> 20} MiB filler)"
    fault_gate.release(gates[0])
    return d.wait(timeout=STARTUP_S)


STRIKES = {"worker_kill": _strike_worker_kill, "driver_term": _strike_driver_term,
           "driver_kill": _strike_driver_kill, "s3_outage": _strike_s3_outage,
           "mlflow_outage": _strike_mlflow_outage, "disk_full": _strike_disk_full,
           "resize": _strike_driver_term, "resize_back": _strike_driver_term}


# ----- disk faults ------------------------------------------------------------------------------------------
def step_folders(run_dir: Path) -> list[Path]:
    from trainer.checkpoint import STEP_DIR

    root = run_dir / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)) if root.is_dir() else []


def step_dir(run_dir: Path, step: int) -> Path:
    from trainer.checkpoint import step_dir_name

    return run_dir / "checkpoints" / step_dir_name(step)


def _damage(sched: Schedule, fault: Fault) -> None:
    """Damages a file of a checkpoint between attempts (on S3: in a copy, then the object replaced or
    deleted)."""
    run_dir = sched.local()
    folders = step_folders(run_dir)
    if not folders:
        fault.done = f"{fault.kind} (skipped: no checkpoint)"
        return
    if fault.kind == "tear_optim":  # the report: the newest checkpoint's rank-1 optimizer shard
        folder = folders[-1]
        target = folder / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        if not target.exists():  # saved by one rank (a resize): its only optimizer shard
            target = folder / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        with open(target, "r+b") as f:
            f.truncate(1000)
        fault.done = f"tear_optim {folder.name}/{target.name}"
    else:
        folder = folders[int(fault.u[0] * len(folders))]
        if fault.kind == "manifest":
            target = folder / "manifest.json"
            text = target.read_text()
            target.write_text(text[: int(fault.u[1] * len(text))])  # cut short: unreadable JSON
            fault.done = f"manifest {folder.name} cut to {int(fault.u[1] * len(text))} B"
        else:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            target = files[int(fault.u[1] * len(files))]
            rel = target.relative_to(folder)
            if fault.u[2] < 0.3:
                target.unlink()
                fault.done = f"delete {folder.name}/{rel}"
            else:
                size = int(target.stat().st_size * (fault.u[2] - 0.3) / 0.7)
                with open(target, "r+b") as f:
                    f.truncate(size)
                fault.done = f"truncate {folder.name}/{rel} to {size} B"
    sched.push(target)
    sched.damaged[folder.name] = sched.identity(folder.name)


# ----- invariants -------------------------------------------------------------------------------------------
def mlflow_steps(storage: Path, run_name: str, metric: str = "loss/total") -> tuple[int, list[int]]:
    """(MLflow runs of ``run_name``, sorted steps of ``metric`` with repeats) in the schedule's database
    (the run's default store, or the database behind the schedule's MLflow server)."""
    from mlflow.tracking import MlflowClient

    db = storage / "mlflow.db"
    if not db.exists():
        return 0, []
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("unimo")
    runs = client.search_runs([experiment.experiment_id], f"tags.`unimo.run_name` = '{run_name}'") \
        if experiment else []
    history = client.get_metric_history(runs[0].info.run_id, metric) if len(runs) == 1 else []
    return len(runs), sorted(m.step for m in history)


def world_size_pattern(trained: dict[int, int], steps: int) -> tuple[tuple[int, int, int], ...]:
    """``trained`` (step -> world size) as segments ``((workers, first, last), ...)`` over steps 1..K."""
    segments: list[list[int]] = []
    for step in range(1, steps + 1):
        workers = trained.get(step, 2)
        if segments and segments[-1][0] == workers:
            segments[-1][2] = step
        else:
            segments.append([workers, step, step])
    return tuple(tuple(s) for s in segments)


def check_weights(sched: Schedule, run_dir: Path) -> str:
    """Bitwise equal to the uninterrupted reference; where some kept steps were trained by 1 worker (a
    resize), to the reference run that trained the same steps with the same world sizes (a resume at the
    same world size is bitwise neutral, which the other schedules check, so only that pattern matters)."""
    setup = sched.setup
    pattern = world_size_pattern(sched.trained, setup.steps)
    uniform = len(pattern) == 1 and pattern[0][0] == 2
    reference = setup.reference if uniform else setup.pattern_reference(pattern)
    got = fp32_weights(step_dir(run_dir, setup.steps))
    differing = differing_tensors(reference, got)
    where = "" if reference is setup.reference else f" (reference of the world sizes {pattern})"
    return f"{len(differing)}/{len(got)} fp32 tensors differ{where}, e.g. {differing[:2]}" if differing \
        else ""


def check_exactly_once(setup: Setup, run_dir: Path, argv: list[str]) -> str:
    from trainer.config import load_config

    cfg = load_config(DEBUG_CONFIG, argv[2:])
    state = state_with_cursor(step_dir(run_dir, setup.steps))  # trainer state + merged data cursor
    problems = []
    for source, folder in TRACKED_SOURCES:
        want = cfg.total_steps * cfg.train.global_micro_batches * getattr(cfg.data, source).batch_size
        got = consumed(state, source, shard_sizes(setup.data / folder))
        if got != want:
            problems.append(f"{source}: {got} distinct samples, expected {want}")
    return "; ".join(problems)


def check_mlflow(storage: Path, last: int) -> str:
    runs, steps = mlflow_steps(storage, RUN_NAME)
    if runs != 1:
        return f"{runs} MLflow runs for {RUN_NAME}"
    if steps != list(range(1, last + 1)):
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        missing = sorted(set(range(1, last + 1)) - set(steps))
        return f"loss/total steps: repeated {repeated}, missing {missing}"
    return ""


def check_nothing_lost(sched: Schedule, run_dir: Path) -> str:
    """Step K is there and verifies; every step folder the schedule did not damage verifies; retention kept
    keep_last of them."""
    from trainer.checkpoint import TornCheckpoint, verify

    setup = sched.setup
    folders = step_folders(run_dir)
    problems = []
    if step_dir(run_dir, setup.steps) not in folders:
        problems.append(f"no checkpoint of step {setup.steps}")
    for folder in folders:
        if folder.name in sched.damaged and sched.damaged[folder.name] == sched.identity(folder.name):
            continue  # the schedule damaged it and no attempt needed it again
        try:
            verify(folder)
        except TornCheckpoint as err:
            problems.append(str(err))
    if len(folders) > KEEP_LAST and retention_deferred(sched):
        pass  # retention could not reach storage (an outage): the next job's start prunes, checked by 4
    elif len(folders) != KEEP_LAST:
        problems.append(f"{len(folders)} step folders, keep_last={KEEP_LAST}: {[f.name for f in folders]}")
    return "; ".join(problems)


RETENTION_DEFERRED = "retention after the save of step"  # the product's warning when it cannot reach storage


def retention_deferred(sched: Schedule) -> bool:
    """Whether an attempt's retention could not reach storage and left the folders to the next save."""
    return any(RETENTION_DEFERRED in log.read_text(errors="replace")
               for log in sched.storage.glob("attempt*.log"))


def check_resumes_again(sched: Schedule) -> str:
    """The run folder takes one more job (to K+2, 2 workers) that resumes at K, logging K+1 and K+2 once
    each."""
    more = sched.setup.steps + 2
    with driver(sched.argv(steps=more, workers=2), sched.storage / "resume_check.log", env=sched.env) as d:
        rc = d.wait(timeout=STARTUP_S)
        out = d.output()
    if rc != 0:
        return f"exited {rc}: {out[-500:]}"
    if f"at step {sched.setup.steps}" not in out:
        return f"did not resume at step {sched.setup.steps}"
    folders = step_folders(sched.local())
    if len(folders) != KEEP_LAST:  # whatever an outage left to prune is gone now
        return f"{len(folders)} step folders after it, keep_last={KEEP_LAST}: {[f.name for f in folders]}"
    return check_mlflow(sched.storage, more)


def _check_all(sched: Schedule, result: Result, check_resume: bool) -> None:
    setup = sched.setup
    run_dir = sched.local()
    checks = [("1 weights", lambda: check_weights(sched, run_dir)),
              ("2 exactly-once", lambda: check_exactly_once(setup, run_dir, sched.argv())),
              ("3 mlflow", lambda: check_mlflow(sched.storage, setup.steps)),
              ("5 nothing-lost", lambda: check_nothing_lost(sched, run_dir))]
    if check_resume:  # last: it adds steps to the run
        checks.append(("4 resumes-again", lambda: check_resumes_again(sched)))
    for name, check in checks:
        try:
            problem = check()
        except Exception as err:  # a check that cannot even read the run folder fails that invariant
            problem = f"{type(err).__name__}: {err}"
        if problem:
            result.failures.append(f"{name}: {problem}")


# ----- the command ------------------------------------------------------------------------------------------
def row(result: Result) -> str:
    verdict = "passed" if result.passed else "FAILED " + "; ".join(f[:300] for f in result.failures)
    codes = ",".join(map(str, result.attempts))
    return (f"| {result.seed} | {result.fault_list()} | {len(result.attempts)} ({codes}) "
            f"| {result.wall_s:.0f} | {verdict} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", type=int, default=None, help="run only the schedule of this seed")
    parser.add_argument("--steps", type=int, default=16, help="K, the plan's total steps")
    parser.add_argument("--storage", choices=("auto", "local", "s3"), default="auto",
                        help="run storage: a local folder, an s3:// bucket on a moto server on loopback "
                             "(reached through an outage switch), or (auto) S3 only for the schedules that "
                             "draw an S3 outage")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no schedule after this many seconds (the table so far is still complete)")
    parser.add_argument("--work", type=Path, default=None, help="a folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}.items():
        os.environ.setdefault(key, value)
    work = args.work or Path(tempfile.mkdtemp(prefix="unimo-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup.create(work, args.steps, storage=args.storage)
    try:
        return _campaign(setup, args)
    finally:
        setup.close()


def _campaign(setup: Setup, args: argparse.Namespace) -> int:
    print(f"[campaign] work folder {setup.work}; storage {setup.storage}; reference run of {args.steps} "
          "steps ...", flush=True)
    print(f"[campaign] reference: {setup.run_reference():.0f} s", flush=True)
    seeds = [args.replay] if args.replay is not None else \
        [schedule_seed(args.seed, i) for i in range(args.schedules)]
    print("| seed | faults | attempts (exit codes) | wall s | result |\n|---|---|---|---|---|", flush=True)
    results, started = [], time.monotonic()
    for seed in seeds:
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            print(f"[campaign] time budget of {args.budget_s:.0f} s spent: {len(results)} of {len(seeds)} "
                  "schedules run", flush=True)
            break
        result = run_schedule(seed, setup)
        results.append(result)
        print(row(result), flush=True)
        if result.passed:
            with contextlib.suppress(OSError):
                shutil.rmtree(setup.work / f"s{seed}")  # keep only failing run folders, for forensics
    failed = [r for r in results if not r.passed]
    total = sum(r.wall_s for r in results)
    print(f"\n[campaign] {len(results)} schedule(s), {len(results) - len(failed)} passed, "
          f"{len(failed)} failed; {total:.0f} s, {total / max(1, len(results)):.0f} s per schedule",
          flush=True)
    for r in failed:
        print(f"[campaign] failed: --replay {r.seed}  faults: {r.fault_list()}  run folder: {r.run_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
