"""Which worker-group failures Ray Train retries: transient faults only, and nothing after a stop request.

Ray Train's default policy restarts the worker group after any worker error, up to
``FailureConfig.max_failures`` times: a missing data folder was tried four times and its message drowned in
four tracebacks. Here a ``UserError`` raised in any worker ends the job at once (not counted against
``scaling.max_failures``), and so does any failure after the driver was asked to stop (its STOP file exists):
a stop means stop, never a new worker group. Everything else is left to Ray's default policy (and an unknown
error is retried: it may be transient). Controller failures (a worker group that cannot be placed) are bounded
by ``FailureConfig.controller_failure_limit``, which the driver sets.
"""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import WorkerGroupError

from data_pipeline.errors import UserError

log = logging.getLogger(__name__)


def user_error_of(error: BaseException | None) -> UserError | None:
    """The UserError behind a Ray Train failure (one worker's is enough: every rank runs the same input)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, WorkerGroupError):
        for rank in sorted(error.worker_failures):
            found = user_error_of(error.worker_failures[rank])
            if found is not None:
                return found
    cause = getattr(error, "controller_failure", None)
    return user_error_of(cause) if cause is not None else None


class UserErrorFailurePolicy(DefaultFailurePolicy):
    """Ray's default policy, except that user errors and failures after a stop request are never retried."""

    def __init__(self, failure_config, stop_file: str | None = None):
        super().__init__(failure_config)
        self.stop_file = stop_file

    def _stop_requested(self) -> bool:
        if not self.stop_file:
            return False
        from trainer import storage

        try:
            return storage.exists(self.stop_file)
        except OSError as err:  # storage unreachable: decide as if no stop was asked for
            log.warning("could not check %s: %s", self.stop_file, err)
            return False

    def make_decision(self, training_failed_error) -> FailureDecision:
        user = user_error_of(training_failed_error)
        if user is not None:
            # one line here; the driver prints the message and writes the traceback to the run's log
            log.info("[unimo] a worker raised a user error: not retrying (%s)",
                     str(user).splitlines()[0][:200])
            return FailureDecision.RAISE
        if self._stop_requested():
            log.info("[unimo] a stop was requested: no new worker group after this failure")
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class GuardedTorchTrainer(TorchTrainer):
    """TorchTrainer whose controller uses UserErrorFailurePolicy. (Ray 2.60 builds its default policy in
    ``fit`` and hands every keyword to ``_initialize_and_run_controller``, where it is swapped.)"""

    def __init__(self, *args, stop_file: str | None = None, **kwargs):
        self._unimo_stop_file = stop_file
        super().__init__(*args, **kwargs)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserErrorFailurePolicy(
            self.run_config.failure_config, self._unimo_stop_file)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
