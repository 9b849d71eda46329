"""A seeded fault campaign (issue #27): random schedules of faults against short debug runs, each checked
against an uninterrupted reference run.

    python bench/fault_campaign.py --schedules 10 --seed 1 [--steps 16]
    python bench/fault_campaign.py --replay 123456        # one failing schedule again, by its seed

Setup once: a small synthetic data set, run storage in a temporary folder, configs/debug.yaml with 2 workers
x 1 CPU, eval off, log_every=1, a checkpoint every 4 steps, keep_last=2, K steps; one uninterrupted run of K
steps gives the reference weights. Each schedule draws 1-3 faults from MENU with its own seeded RNG and
applies them across attempts of `unimo train` (same run name), rerunning until the run has reached step K.
In-job faults hold both ranks at the chosen step with the fault gate (trainer/fault_gate.py), so the fault
lands at that step however fast the machine; disk faults are applied between attempts. Then the invariants
(``check_*`` below): weights at K bitwise equal to the reference, every sample delivered exactly once, one
MLflow run with steps 1..K once each, nothing lost that the schedule did not destroy, and the run folder
resumes once more to K+2.

The campaign's code is importable: ``Setup.create(...)`` and ``run_schedule(seed, faults, setup)`` run one
schedule and return a ``Result`` (tests/integration/test_fault_campaign.py runs three fixed ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import signal
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
IN_JOB = ("worker_kill", "kill_in_save", "kill_before_upload", "kill_before_prune", "kill_in_restore",
          "driver_term", "driver_kill")
ON_DISK = ("truncate", "manifest", "tear_optim")
MENU = IN_JOB + ON_DISK
# The fault gate's phase of each in-job fault (trainer/fault_gate.py).
PHASE = {"worker_kill": "step", "driver_term": "step", "driver_kill": "step", "kill_in_save": "save",
         "kill_before_upload": "upload", "kill_before_prune": "prune", "kill_in_restore": "restore"}
# What `unimo train` must exit with after each in-job fault (None: a clean attempt): a killed worker is
# restarted inside the job.
EXPECTED_RC = {None: 0, **{kind: 0 for kind in IN_JOB}, "driver_term": 75, "driver_kill": -signal.SIGKILL}
MAX_ATTEMPTS = 8
EVERY = 4
KEEP_LAST = 2
# the sources tests/integration/test_faults_node.py checks exactly once
TRACKED_SOURCES = (("pair", "pairs"), ("image", "images"))


@dataclasses.dataclass
class Setup:
    """What every schedule shares: the data, a work folder, the plan length and the reference weights."""

    data: Path
    work: Path
    steps: int
    reference: dict | None = None

    @classmethod
    def create(cls, work: Path, steps: int, data: Path | None = None) -> Setup:
        """Writes the synthetic data set under ``work`` unless ``data`` is given (the tests' session one)."""
        if data is None:
            from data_pipeline.synthetic import write_synthetic_dataset

            data = work / "data"
            write_synthetic_dataset(str(data), n_pairs=400, n_text=400, n_images=400, n_eval=100,
                                    samples_per_shard=100)
        return cls(Path(data), Path(work), steps)

    def argv(self, name: str, storage: Path, steps: int | None = None) -> list[str]:
        extra = ["scaling.num_workers=2", "scaling.cpus_per_worker=1", f"checkpoint.keep_last={KEEP_LAST}"]
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


@dataclasses.dataclass
class Fault:
    """One fault of a schedule: its kind and a number in [0, 1) that picks its step or target when applied
    (the targets depend on what is on disk then, so they are chosen then, from the schedule's own draw)."""

    kind: str
    u: tuple[float, float, float] = (0.5, 0.5, 0.5)
    done: str = ""  # what was actually done, e.g. "worker_kill@11"


@dataclasses.dataclass
class Result:
    seed: int
    faults: list[Fault]
    attempts: list[int] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)
    run_dir: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def fault_list(self) -> str:
        return ", ".join(f.done or f"{f.kind} (not applied)" for f in self.faults)


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


def run_schedule(seed: int, setup: Setup, faults: list[Fault] | None = None, *,
                 check_resume: bool = True) -> Result:
    """Runs one schedule in a fresh run folder and checks the invariants; never raises for a failed check."""
    faults = draw_faults(seed) if faults is None else faults
    result = Result(seed, faults)
    storage = setup.work / f"s{seed}"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    run_dir = result.run_dir = storage / "campaign"
    damaged: dict[str, int] = {}  # step folder -> inode of the folder the schedule damaged
    t0 = time.monotonic()
    try:
        _attempts(setup, storage, run_dir, result, damaged)
        if not result.failures:
            _check_all(setup, storage, run_dir, result, damaged, check_resume)
    except Exception as err:  # a harness error is reported as the schedule's failure, with the seed
        result.failures.append(f"harness: {type(err).__name__}: {err}")
    result.wall_s = time.monotonic() - t0
    return result


def _attempts(setup: Setup, storage: Path, run_dir: Path, result: Result, damaged: dict[str, int]) -> None:
    """Attempts until every fault is applied and a finish follows the last one (at most MAX_ATTEMPTS)."""
    queue, owed, n = list(result.faults), 0, 0
    while n < MAX_ATTEMPTS:
        fault = queue.pop(0) if queue and queue[0].kind in IN_JOB else None
        holds = _holds(setup, run_dir, fault) if fault is not None else []
        if fault is not None and not holds:
            fault.done = f"{fault.kind} (skipped: {SKIPPED[PHASE[fault.kind]]})"
            fault = None
        n += 1
        rc = _one_attempt(setup, storage, run_dir, fault, holds, n)
        result.attempts.append(rc)
        expected = EXPECTED_RC[fault.kind if fault else None]
        if rc != expected:
            result.failures.append(f"attempt {n} ({fault.done if fault else 'clean'}) exited {rc}, "
                                   f"expected {expected}; log {storage / f'attempt{n}.log'}")
            return
        owed = max(0, owed - 1)
        if n == 1 and fault is None and setup.reference is None and _resume_step(run_dir) == setup.steps:
            # an uninterrupted first attempt is the reference when the setup has none (the tests)
            setup.reference = fp32_weights(step_dir(run_dir, setup.steps))
        while queue and queue[0].kind in ON_DISK:
            disk = queue.pop(0)
            _damage(run_dir, disk, damaged)
            owed = max(owed, 2 if disk.kind == "tear_optim" else 1)  # the issue: two more jobs after the tear
        if not queue and owed == 0 and _resume_step(run_dir) == setup.steps:
            return
    result.failures.append(f"finish: step {setup.steps} not reached in {MAX_ATTEMPTS} attempts")


SKIPPED = {"step": "no step left to hold", "save": "no checkpoint left to save",
           "upload": "no checkpoint left to save", "prune": "no checkpoint left to save",
           "restore": "no resume left to hold"}


def _pick(steps: list[int], u: float) -> int:
    return steps[int(u * len(steps))]


def _holds(setup: Setup, run_dir: Path, fault: Fault) -> list[tuple[str, int]]:
    """The moments (phase, step) the attempt holds for ``fault``, in the order the run meets them, drawn
    from its ``u[0]`` among those this attempt still reaches ([] when there is none): any step before K; a
    step that saves (and then prunes); the resume of this attempt, or when it starts from scratch, the
    resume that follows a worker kill at a step after the first checkpoint (two failures back to back)."""
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
    if phase == "step":
        steps = list(range(resumed + 1, setup.steps))
    else:  # retention runs after every save too
        steps = [s for s in range(resumed + 1, setup.steps + 1) if s % EVERY == 0]
    return [(phase, _pick(steps, fault.u[0]))] if steps else []


def _resume_step(run_dir: Path) -> int:
    from trainer.checkpoint import newest_valid

    found = newest_valid(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    return found.step if found else 0


def _one_attempt(setup: Setup, storage: Path, run_dir: Path, fault: Fault | None,
                 holds: list[tuple[str, int]], n: int) -> int:
    """One `unimo train`; an in-job fault holds the ranks at its moments, strikes, then opens the gates."""
    gates = [storage / f"gate{n}-{i}" for i in range(len(holds))]
    spec = ",".join(f"{phase}@{step}:{gate}" for (phase, step), gate in zip(holds, gates))
    env = {"UNIMO_FAULT_GATE": spec} if holds else {}
    if fault is not None:
        fault.done = f"{fault.kind}@" + "+".join(f"{ph}{st}" if ph != "step" else str(st) for ph, st in holds)
    with driver(setup.argv(run_dir.name, storage), storage / f"attempt{n}.log", env=env) as d:
        if fault is None:
            return d.wait(timeout=STARTUP_S)
        if fault.kind in STRIKES:  # one hold before a step
            _wait_held(d, gates[0], holds[0])
            return STRIKES[fault.kind](d, run_dir, gates[0], holds[0][1], fault)
        for hold, gate in zip(holds, gates):  # a worker killed at each moment in turn
            _kill_held(d, gate, _wait_held(d, gate, hold), fault)
        return d.wait(timeout=STARTUP_S)


def _wait_held(d, gate: Path, hold: tuple[str, int]) -> tuple[int, ...]:
    from trainer import fault_gate

    phase, step = hold
    ranks = (0,) if phase == "prune" else (0, 1)  # only rank 0 prunes
    wait_for(lambda: fault_gate.reached(gate, ranks), STARTUP_S,
             f"ranks {ranks} at the {phase} of step {step}", d)
    return ranks


def _kill_held(d, gate: Path, ranks: tuple[int, ...], fault: Fault) -> None:
    """SIGKILLs one held worker (drawn by ``u[1]``) and opens the gate: the restarted group finds it open."""
    from trainer import fault_gate

    pids = fault_gate.held_pids(gate, ranks)
    os.kill(pids[int(fault.u[1] * len(pids))], signal.SIGKILL)
    fault_gate.release(gate)


def _strike_worker_kill(d, run_dir: Path, gate: Path, step: int, fault: Fault) -> int:
    from trainer import fault_gate

    workers = wait_for(lambda: len(d.train_workers()) == 2 and d.train_workers(), 60, "2 train workers", d)
    if step > 1:  # the step before is in MLflow, so a retrained step would show up twice if logged again
        wait_for(lambda: step - 1 in mlflow_steps(run_dir.parent, run_dir.name)[1], 120,
                 f"step {step - 1} in MLflow", d)
    os.kill(workers[int(fault.u[1] * 2)].pid, signal.SIGKILL)
    fault_gate.release(gate)  # the restarted group passes the gate
    return d.wait(timeout=STARTUP_S)


def _strike_driver_term(d, run_dir: Path, gate: Path, step: int, fault: Fault) -> int:
    from trainer import fault_gate

    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: (run_dir / "STOP").exists(), 60, "the driver's STOP request", d)
    fault_gate.release(gate)  # rank 0 sees the request at the end of this step, saves and stops
    return d.wait(timeout=STARTUP_S)


def _strike_driver_kill(d, run_dir: Path, gate: Path, step: int, fault: Fault) -> int:
    d.kill()
    # Ray's workers share the dead driver's fate; none may train on beside the next attempt.
    wait_for(lambda: not any(n.startswith(("ray::RayTrainWorker", "ray::TrainController", "raylet"))
                             for n in d.leftover_names()), 60, "the dead driver's Ray workers to exit")
    return d.proc.returncode


STRIKES = {"worker_kill": _strike_worker_kill, "driver_term": _strike_driver_term,
           "driver_kill": _strike_driver_kill}


# ----- disk faults ------------------------------------------------------------------------------------------
def step_folders(run_dir: Path) -> list[Path]:
    from trainer.checkpoint import STEP_DIR

    root = run_dir / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)) if root.is_dir() else []


def step_dir(run_dir: Path, step: int) -> Path:
    from trainer.checkpoint import step_dir_name

    return run_dir / "checkpoints" / step_dir_name(step)


def _damage(run_dir: Path, fault: Fault, damaged: dict[str, int]) -> None:
    folders = step_folders(run_dir)
    if not folders:
        fault.done = f"{fault.kind} (skipped: no checkpoint)"
        return
    if fault.kind == "tear_optim":  # the report: the newest checkpoint's rank-1 optimizer shard
        folder = folders[-1]
        target = folder / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        with open(target, "r+b") as f:
            f.truncate(1000)
        fault.done = f"tear_optim {folder.name}"
    else:
        folder = folders[int(fault.u[0] * len(folders))]
        if fault.kind == "manifest":
            manifest = folder / "manifest.json"
            text = manifest.read_text()
            manifest.write_text(text[: int(fault.u[1] * len(text))])  # cut short: unreadable JSON
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
    damaged[folder.name] = folder.stat().st_ino


# ----- invariants -------------------------------------------------------------------------------------------
def mlflow_steps(storage: Path, run_name: str, metric: str = "loss/total") -> tuple[int, list[int]]:
    """(MLflow runs of ``run_name``, sorted steps of ``metric`` with repeats) in the run's default store."""
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


def check_weights(setup: Setup, run_dir: Path) -> str:
    got = fp32_weights(step_dir(run_dir, setup.steps))
    differing = differing_tensors(setup.reference, got)
    return f"{len(differing)}/{len(got)} fp32 tensors differ, e.g. {differing[:2]}" if differing else ""


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


def check_mlflow(storage: Path, run_dir: Path, last: int) -> str:
    runs, steps = mlflow_steps(storage, run_dir.name)
    if runs != 1:
        return f"{runs} MLflow runs for {run_dir.name}"
    if steps != list(range(1, last + 1)):
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        missing = sorted(set(range(1, last + 1)) - set(steps))
        return f"loss/total steps: repeated {repeated}, missing {missing}"
    return ""


def check_nothing_lost(setup: Setup, run_dir: Path, damaged: dict[str, int]) -> str:
    """Step K is there and verifies; every step folder the schedule did not damage verifies; retention kept
    keep_last of them."""
    from trainer.checkpoint import TornCheckpoint, verify

    folders = step_folders(run_dir)
    problems = []
    if step_dir(run_dir, setup.steps) not in folders:
        problems.append(f"no checkpoint of step {setup.steps}")
    for folder in folders:
        if damaged.get(folder.name) == folder.stat().st_ino:
            continue  # the schedule damaged it and no attempt needed it again
        try:
            verify(folder)
        except TornCheckpoint as err:
            problems.append(str(err))
    if len(folders) != KEEP_LAST:
        problems.append(f"{len(folders)} step folders, keep_last={KEEP_LAST}: {[f.name for f in folders]}")
    return "; ".join(problems)


def check_resumes_again(setup: Setup, storage: Path, run_dir: Path) -> str:
    """The run folder takes one more job (to K+2) that resumes at K, logging K+1 and K+2 once each."""
    more = setup.steps + 2
    with driver(setup.argv(run_dir.name, storage, steps=more), storage / "resume_check.log") as d:
        rc = d.wait(timeout=STARTUP_S)
        out = d.output()
    if rc != 0:
        return f"exited {rc}: {out[-500:]}"
    if f"at step {setup.steps}" not in out:
        return f"did not resume at step {setup.steps}"
    return check_mlflow(storage, run_dir, more)


def _check_all(setup: Setup, storage: Path, run_dir: Path, result: Result, damaged: dict[str, int],
               check_resume: bool) -> None:
    checks = [("1 weights", lambda: check_weights(setup, run_dir)),
              ("2 exactly-once",
               lambda: check_exactly_once(setup, run_dir, setup.argv(run_dir.name, storage))),
              ("3 mlflow", lambda: check_mlflow(storage, run_dir, setup.steps)),
              ("5 nothing-lost", lambda: check_nothing_lost(setup, run_dir, damaged))]
    if check_resume:  # last: it adds steps to the run
        checks.append(("4 resumes-again", lambda: check_resumes_again(setup, storage, run_dir)))
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
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no schedule after this many seconds (the table so far is still complete)")
    parser.add_argument("--work", type=Path, default=None, help="a folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}.items():
        os.environ.setdefault(key, value)
    work = args.work or Path(tempfile.mkdtemp(prefix="unimo-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup.create(work, args.steps)
    print(f"[campaign] work folder {work}; reference run of {args.steps} steps ...", flush=True)
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
