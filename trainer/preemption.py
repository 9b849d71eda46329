"""Preemption on the workers: a SIGTERM to a training worker saves a checkpoint at the next step, then stops.

A spot reclaim or a node drain signals the processes of the node, not only the driver (which has its own
handler, ``orchestrator.driver.sigterm_as_exit``). Ray's worker process answers SIGTERM by exiting at once,
which Ray Train treats as a failed worker (a restart from the last checkpoint, losing the steps since). Here
the first SIGTERM during training only sets a flag; the step loop shares it with the other ranks in the
all-reduce it already does for the driver's STOP file (``Trainer.control_flags``), every rank saves at the
same step, and the run ends "preempted" (exit status EXIT_PREEMPTED), to be resumed by resubmitting it. A
second SIGTERM, or one outside the step loop, gets Ray's own handler (exit now).

``install`` runs in each Ray Train worker process as its ``worker_process_setup_hook`` (set by the driver), in
the main thread, just before Ray's task loop installs Ray's handler; Ray installs it through
``ray._private.utils.set_sigterm_handler``, which ``install`` redirects so that Ray's handler becomes the
fallback instead of replacing ours. If a Ray release installs it another way, the worker exits on SIGTERM as
before and tests/integration/test_preemption.py fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

# The exit status of a job that was preempted (a SIGTERM to the driver or a worker: it saved a checkpoint and
# stopped before its last step): EX_TEMPFAIL, "try again". Non-zero, so a KubeRay RayJob's retry, a
# scheduler or `unimo submit --max-resubmits` resubmits it; the Jobs API reports it FAILED (a job stopped with
# `unimo jobs stop` is STOPPED instead).
EXIT_PREEMPTED = 75

_requested = threading.Event()
_training = threading.Event()
_fallback: Any = signal.SIG_DFL


def requested() -> bool:
    """Whether this process got a SIGTERM while training (it stays requested)."""
    return _requested.is_set()


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Marks the step loop as running: a SIGTERM meanwhile asks for a checkpoint instead of ending the
    process."""
    _training.set()
    try:
        yield
    finally:
        _training.clear()


def request(reason: str) -> None:
    """Asks for the same stop as a first SIGTERM (a checkpoint at the next step, then the run ends preempted);
    ``reason`` is printed once. Used by the cloud's advance notice (trainer/preemption_notice.py)."""
    if not _requested.is_set():
        _requested.set()
        print(f"[unimo] {reason} (pid {os.getpid()}): saving a checkpoint at the next step, then stopping",
              file=sys.stderr, flush=True)


def on_sigterm(signum: int, frame: Any) -> None:
    """First SIGTERM while training: request the stop; otherwise do what the process did before (Ray:
    exit)."""
    if _training.is_set() and not _requested.is_set():
        _requested.set()
        print(f"[unimo] SIGTERM on worker pid {os.getpid()}: saving a checkpoint at the next step, then "
              "stopping (send SIGTERM again to exit now)", file=sys.stderr, flush=True)
        return
    _run_fallback(signum, frame)


def _run_fallback(signum: int, frame: Any) -> None:
    if callable(_fallback):
        _fallback(signum, frame)
    elif _fallback != signal.SIG_IGN:  # the default action: terminate by the signal
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _keep_ours(handler: Callable[[int, Any], Any]) -> None:
    """Stands in for Ray's ``set_sigterm_handler``: Ray's handler becomes the fallback, ours stays
    installed."""
    global _fallback
    _fallback = handler


def install() -> None:
    """The Ray Train workers' ``worker_process_setup_hook`` (main thread, before Ray's task loop starts)."""
    global _fallback
    import ray._private.utils as ray_utils

    _fallback = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_sigterm)
    ray_utils.set_sigterm_handler = _keep_ours


# What the driver passes to Ray Train for its workers (a dotted path: the workers import it themselves).
SETUP_HOOK = f"{__name__}.install"
