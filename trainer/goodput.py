"""Goodput: the share of a job's wall time spent on training steps that were kept, and where the rest went.

Rank 0 of every attempt (one worker group: the first, and each restart after a fault) keeps a ledger in run
storage, ``<run>/goodput/attempt-<start>-<pid>.json``, rewritten as it goes (after every step on a local or
shared folder, at checkpoints and every minute on S3), so an attempt that is killed leaves its account up to
its last write. The driver reads the ledgers of its job at the end (``summarize``) and splits the job's wall
time into:

- ``kept``: step time of the steps the final weights descend from;
- ``lost``: step time of steps trained again after a restart (those after the checkpoint the next attempt
  resumed from);
- ``data_wait``, ``checkpoint``, ``eval``: time in the step loop waiting for batches, saving, evaluating;
- ``start_up``: from the driver's start to the first step (Ray, the worker group, the engine build, the
  restore) and from the last step to the driver's end;
- ``restart``: from the last moment a failed attempt accounted for to the next attempt's first step (the
  fault's detection, the new worker group, its engine build and restore).

``goodput = kept / wall``. The parts add up to the wall time but for ``unaccounted`` (time no ledger saw:
normally a fraction of a second); it is reported, not hidden.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer import storage

LEDGER_DIR = "goodput"
REMOTE_WRITE_S = 60.0  # S3: a PUT at most this often between checkpoints
CATEGORIES = ("kept", "lost", "data_wait", "checkpoint", "eval", "start_up", "restart")


@dataclass
class Ledger:
    """One attempt's account (rank 0). Times are wall-clock seconds since the epoch (the driver compares them
    with its own start: one machine, or NTP-synchronised nodes)."""

    start: float  # the attempt's Trainer.run entry
    first_step: int = 0  # the step it resumed from (0 for a fresh run)
    step: int = 0  # the last step it finished
    loop_start: float = 0.0  # its first step began (start-up done)
    updated: float = 0.0  # the last moment it accounted for
    ended: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: {"steps": 0.0, "data_wait": 0.0,
                                                               "checkpoint": 0.0, "eval": 0.0})
    # cumulative step seconds when each checkpoint of this attempt was saved: what a resume from it keeps
    steps_at_checkpoint: dict[str, float] = field(default_factory=dict)


class AttemptLedger:
    """Rank 0's writer of its attempt's ledger."""

    def __init__(self, run_location: str, now: float | None = None):
        self.ledger = Ledger(start=time.time() if now is None else now)
        name = f"attempt-{self.ledger.start:.3f}-{os.getpid()}.json"
        self.path = storage.join(run_location, LEDGER_DIR, name)
        self.remote = storage.is_remote(run_location)
        self._written = 0.0

    def started(self, step: int) -> None:
        self.ledger.first_step = self.ledger.step = step
        self.ledger.loop_start = self.ledger.updated = time.time()
        self._write(force=True)

    def step_done(self, step: int, step_s: float, data_s: float, eval_s: float, checkpoint_s: float,
                  saved: bool) -> None:
        s = self.ledger.seconds
        s["steps"] += step_s
        s["data_wait"] += data_s
        s["eval"] += eval_s
        s["checkpoint"] += checkpoint_s
        self.ledger.step, self.ledger.updated = step, time.time()
        if saved:
            self.ledger.steps_at_checkpoint[str(step)] = s["steps"]
        self._write(force=saved)

    def finish(self) -> None:
        self.ledger.ended, self.ledger.updated = True, time.time()
        self._write(force=True)

    def _write(self, force: bool) -> None:
        if self.remote and not force and time.time() - self._written < REMOTE_WRITE_S:
            return
        try:
            storage.write_text(self.path, json.dumps(asdict(self.ledger)))
            self._written = time.time()
        except OSError:  # storage hiccup: the account is a report, never a reason to stop training
            pass


def read_ledgers(run_location: str, since: float) -> list[Ledger]:
    """The ledgers of attempts that began at or after ``since`` (this job's), oldest first."""
    folder = storage.join(run_location, LEDGER_DIR)
    found = []
    for name in storage.list_names(folder):
        if not name.endswith(".json"):
            continue
        text = storage.read_text(storage.join(folder, name))
        try:
            ledger = Ledger(**json.loads(text)) if text else None
        except (TypeError, ValueError):
            ledger = None  # a foreign or damaged file: not this job's account
        if ledger is not None and ledger.start >= since and ledger.loop_start:
            found.append(ledger)
    return sorted(found, key=lambda a: a.start)


def _kept_steps_seconds(attempt: Ledger, resumed_at: int | None) -> float:
    """Step seconds of ``attempt`` up to the checkpoint the next attempt resumed from (all of them for the
    last attempt); a resume from an older attempt's checkpoint keeps none of this one's steps."""
    if resumed_at is None:
        return attempt.seconds["steps"]
    saved = [(int(step), secs) for step, secs in attempt.steps_at_checkpoint.items()
             if int(step) <= resumed_at]
    return max(saved)[1] if saved else 0.0


def summarize(ledgers: list[Ledger], job_start: float, job_end: float) -> dict[str, float]:
    """Seconds per category, ``wall``, ``unaccounted`` and ``goodput`` (kept / wall); {} without a ledger."""
    if not ledgers:
        return {}
    out = dict.fromkeys(CATEGORIES, 0.0)
    for i, attempt in enumerate(ledgers):
        following = ledgers[i + 1] if i + 1 < len(ledgers) else None
        kept = _kept_steps_seconds(attempt, following.first_step if following else None)
        out["kept"] += kept
        out["lost"] += attempt.seconds["steps"] - kept
        for key in ("data_wait", "checkpoint", "eval"):
            out[key] += attempt.seconds[key]
        if following is not None:
            out["restart"] += following.loop_start - attempt.updated
    out["start_up"] = (ledgers[0].loop_start - job_start) + (job_end - ledgers[-1].updated)
    wall = job_end - job_start
    out["wall"] = wall
    out["unaccounted"] = wall - sum(out[k] for k in CATEGORIES)
    out["goodput"] = out["kept"] / wall if wall > 0 else 0.0
    return out


def describe(summary: dict[str, float]) -> str:
    """One line for the end of the run."""
    parts = ", ".join(f"{k.replace('_', ' ')} {summary[k]:.0f} s" for k in CATEGORIES)
    return (f"goodput {summary['goodput']:.0%} of {summary['wall']:.0f} s wall: {parts} "
            f"(unaccounted {summary['unaccounted']:.1f} s)")


def as_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names: goodput/fraction and goodput/<category>_s."""
    metrics = {"goodput/fraction": summary["goodput"], "goodput/wall_s": summary["wall"],
               "goodput/unaccounted_s": summary["unaccounted"]}
    metrics.update({f"goodput/{k}_s": summary[k] for k in CATEGORIES})
    return metrics
