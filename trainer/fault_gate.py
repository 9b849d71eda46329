"""A gate that holds the training loop before a chosen step, so that a fault test injects its fault at a step
the test controls rather than racing the run ("kill a worker after checkpoint 10" misses on a fast machine:
the run may be over by then).

``UNIMO_FAULT_GATE=STEP:FOLDER[,STEP:FOLDER...]`` (set by a test; forwarded to the workers by the driver):
before running step STEP, each rank writes ``FOLDER/reached-rank<R>`` and waits until ``FOLDER/open`` exists,
then goes on (several gates let a test act twice at steps it controls, e.g. stop a service and later bring it
back). The test waits for the ``reached`` file (an event), injects its fault, and opens the gate; a restarted
worker group that comes back to STEP finds it open. Unset, it costs one dictionary lookup per step. The wait
is bounded (``UNIMO_FAULT_GATE_TIMEOUT_S``, default 600 s) so a forgotten gate ends in a named error, not a
hang.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "UNIMO_FAULT_GATE"
OPEN = "open"
TIMEOUT_ENV = "UNIMO_FAULT_GATE_TIMEOUT_S"


def parse(value: str | None) -> dict[int, Path]:
    """The gates named by the setting, by step (empty when unset)."""
    gates: dict[int, Path] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        step, sep, folder = item.strip().partition(":")
        if not sep or not step.strip().isdigit() or not folder:
            raise ValueError(f"{ENV}={value!r}: expected STEP:FOLDER[,STEP:FOLDER...], e.g. 11:/tmp/gate")
        gates[int(step)] = Path(folder)
    return gates


def wait_at(step: int, rank: int, environ: dict[str, str] | None = None, poll_s: float = 0.05) -> None:
    """Holds rank ``rank`` before ``step`` while the gate named by the environment is closed."""
    folder = parse((os.environ if environ is None else environ).get(ENV)).get(step)
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _reached_name(rank)).write_text(f"{os.getpid()}\n")
    limit = float((os.environ if environ is None else environ).get(TIMEOUT_ENV, "600"))
    deadline = time.monotonic() + limit
    while not (folder / OPEN).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault gate before step {step} ({folder}) was not opened within {limit:g} s")
        time.sleep(poll_s)


# ----- the test's side --------------------------------------------------------------------------------------
def _reached_name(rank: int) -> str:
    return f"reached-rank{rank}"


def reached(folder: Path, ranks: tuple[int, ...] = (0, 1)) -> bool:
    """Whether every rank of ``ranks`` is held at the gate in ``folder``."""
    return all((Path(folder) / _reached_name(r)).exists() for r in ranks)


def release(folder: Path) -> None:
    """Opens the gate in ``folder``: held ranks go on, and ranks that come to it later pass."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / OPEN).touch()
