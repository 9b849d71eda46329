"""A gate that holds the training loop before a chosen step, so that a fault test injects its fault at a step
the test controls rather than racing the run ("kill a worker after checkpoint 10" misses on a fast machine:
the run may be over by then).

``UNIMO_FAULT_GATE=[PHASE@]STEP:FOLDER[,...]`` (set by a test; forwarded to the workers by the driver):
before running step STEP, each rank writes ``FOLDER/reached-rank<R>`` and waits until ``FOLDER/open`` exists,
then goes on (several gates let a test act twice at steps it controls, e.g. stop a service and later bring it
back). The test waits for the ``reached`` file (an event), injects its fault, and opens the gate; a restarted
worker group that comes back to STEP finds it open. Unset, it costs one dictionary lookup per step. The wait
is bounded (``UNIMO_FAULT_GATE_TIMEOUT_S``, default 600 s) so a forgotten gate ends in a named error, not a
hang.

PHASE picks another moment than the start of a step (trainer/checkpointing/manager.py), so that a fault lands
inside checkpoint work: ``save`` (this rank's DeepSpeed shards written, its cursor file and rank 0's manifest
not yet), ``upload`` (the local save complete, not yet handed to Ray Train's upload), ``prune`` (rank 0 only:
the checkpoint uploaded, retention not yet run) and ``restore`` (STEP is the checkpoint being resumed from: it
was found and verified, nothing loaded yet).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "UNIMO_FAULT_GATE"
OPEN = "open"
TIMEOUT_ENV = "UNIMO_FAULT_GATE_TIMEOUT_S"


PHASES = ("step", "save", "upload", "prune", "restore")


def parse(value: str | None) -> dict[tuple[str, int], Path]:
    """The gates named by the setting, by (phase, step) (empty when unset)."""
    gates: dict[tuple[str, int], Path] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        where, sep, folder = item.strip().partition(":")
        phase, _, step = where.rpartition("@")
        phase = phase or "step"
        if not sep or not step.strip().isdigit() or not folder or phase not in PHASES:
            raise ValueError(f"{ENV}={value!r}: expected [PHASE@]STEP:FOLDER[,...] with PHASE one of "
                             f"{', '.join(PHASES)}, e.g. 11:/tmp/gate or save@8:/tmp/gate")
        gates[(phase, int(step))] = Path(folder)
    return gates


def wait_at(step: int, rank: int, environ: dict[str, str] | None = None, poll_s: float = 0.05,
            phase: str = "step") -> None:
    """Holds rank ``rank`` at ``phase`` of ``step`` while the gate named by the environment is closed."""
    folder = parse((os.environ if environ is None else environ).get(ENV)).get((phase, step))
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _reached_name(rank)).write_text(f"{os.getpid()}\n")
    limit = float((os.environ if environ is None else environ).get(TIMEOUT_ENV, "600"))
    deadline = time.monotonic() + limit
    where = f"before step {step}" if phase == "step" else f"at the {phase} of step {step}"
    while not (folder / OPEN).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault gate {where} ({folder}) was not opened within {limit:g} s")
        time.sleep(poll_s)


# ----- the test's side --------------------------------------------------------------------------------------
def _reached_name(rank: int) -> str:
    return f"reached-rank{rank}"


def reached(folder: Path, ranks: tuple[int, ...] = (0, 1)) -> bool:
    """Whether every rank of ``ranks`` is held at the gate in ``folder``."""
    return all((Path(folder) / _reached_name(r)).exists() for r in ranks)


def held_pids(folder: Path, ranks: tuple[int, ...] = (0, 1)) -> list[int]:
    """The process ids of the ranks held at the gate in ``folder``, in rank order."""
    return [int((Path(folder) / _reached_name(r)).read_text()) for r in ranks]


def release(folder: Path) -> None:
    """Opens the gate in ``folder``: held ranks go on, and ranks that come to it later pass."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / OPEN).touch()
