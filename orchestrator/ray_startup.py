"""Ray start-up that survives a busy machine: one retry, said out loud, when Ray's own start-up wait times
out.

Ray gives a new node's raylet 30 s to register with the GCS (a constant in Ray, no setting). On a loaded
machine - a 2-core CI runner at load 10, a head node busy with another job - that wait can run out although
nothing is wrong, and `ray.init` or `ray start` fail with "The current node timed out during startup ... or
the GCS has become overloaded". Such a failure is retried once, after a log line that gives the load and what
to do; any other start-up error is raised at once. Used by the embedded Ray of `unimo train`
(orchestrator/driver.py) and by cluster/local_cluster.py.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger("unimo.ray")

# What Ray says when a node's start-up wait ran out (ray/_private/node.py), and the GCS RPC deadline that a
# starved raylet hits first.
STARTUP_TIMEOUT_MARKERS = ("timed out during startup", "GCS has become overloaded",
                           "waiting for registration with the GCS", "Deadline Exceeded")


def is_startup_timeout(err: BaseException | str) -> bool:
    text = str(err)
    return any(marker in text for marker in STARTUP_TIMEOUT_MARKERS)


def load_note() -> str:
    """'load average 9.8 on 2 cores' (or '' where the platform has no load average)."""
    try:
        load1, _, _ = os.getloadavg()
    except OSError:
        return ""
    return f"load average {load1:.1f} on {os.cpu_count() or 1} cores"


def busy_advice(what: str) -> str:
    load = load_note()
    return (f"{what} timed out during Ray's start-up ({load or 'load unknown'}): the machine is busy. "
            "Retrying once. If it happens again, wait for the other work on this machine to finish, or give "
            "the run a machine of its own.")


def with_startup_retry(start: Callable[[], T], what: str, cleanup: Callable[[], None] | None = None,
                       attempts: int = 2) -> T:
    """Runs ``start()``; a Ray start-up timeout is logged with the load and retried (``attempts`` in all).

    ``cleanup`` undoes a half-done start (``ray.shutdown``, stopping a node's leftovers) before the retry.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == attempts or not is_startup_timeout(err):
                raise
            log.warning(busy_advice(what))
            if cleanup is not None:
                cleanup()
    raise AssertionError("unreachable")
