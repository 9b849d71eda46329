"""Which worker-group failures Ray Train retries: transient faults, budgeted per window of progress.

Ray Train's default policy restarts the worker group after any worker error, up to
``FailureConfig.max_failures`` times over the whole run: the 4th spread-out fault of a week-long run (an ECC
error, a NCCL timeout, a reclaimed node) would end it. Here ``scaling.max_failures`` counts *consecutive*
failures without a new checkpoint: a failure after the run saved a newer checkpoint than at the previous
failure starts the count again, so a long run survives many spread-out faults while a crash loop (failing
before it ever saves) still stops. ``scaling.max_total_failures`` (0 = none) caps all failures of one job.

A ``UserError`` raised in any worker (a config or data mistake, an incompatible checkpoint, a full disk) ends
the job at once: a restart cannot fix it. So does any failure after the driver was asked to stop (its STOP
file exists): a stop means stop, never a new worker group. An error of unknown kind is retried (it may be
transient). An elastic job decides each worker-group (re)start from the nodes alive at that moment
(``FreshViewElasticPolicy``); a fixed-size job on an embedded Ray asks no autoscaler for its workers
(``NoAutoscalerFixedPolicy``). Controller failures (a worker group that cannot be placed) are bounded by
``FailureConfig.controller_failure_limit`` in a row (the driver sets it from ``UNIMO_CLUSTER_WAIT_S``; a
worker group that ran starts the count again); preemptions that Ray Train detects by
``FailureConfig.max_preemption_failures`` (unlimited by default).
"""

from __future__ import annotations

import logging

import ray
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
    AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2._internal.util import time_monotonic
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


def newest_saved_step(checkpoints_root: str | None) -> int:
    """The step of the newest complete checkpoint under ``checkpoints_root`` (-1: none, or unreadable)."""
    if not checkpoints_root:
        return -1
    from trainer import checkpoint as ckpt

    try:
        found = ckpt.newest_complete(checkpoints_root)
        return found.step if found else -1
    except OSError as err:  # storage unreachable: no progress seen, the failure counts
        log.warning("could not list %s: %s", checkpoints_root, err)
        return -1


class UserErrorFailurePolicy(DefaultFailurePolicy):
    """Ray's default policy, except that user errors and failures after a stop request are never retried, and
    worker-group failures are counted per window of progress (see the module's docstring)."""

    def __init__(self, failure_config, stop_file: str | None = None, checkpoints_root: str | None = None,
                 max_total_failures: int = 0):
        super().__init__(failure_config)
        self.stop_file = stop_file
        self.checkpoints_root = checkpoints_root
        self.max_total_failures = max_total_failures
        self.total_failures = 0
        self.step_at_last_failure = newest_saved_step(checkpoints_root)

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
        if isinstance(training_failed_error, WorkerGroupError):
            if self._over_total():
                return FailureDecision.RAISE
            self._new_window_if_progress()
            # A worker group ran, so the cluster placed one: the count of start failures (a worker group
            # that cannot be placed: a node lost until the autoscaler replaces it) is of failures in a row,
            # as controller_failure_limit means "UNIMO_CLUSTER_WAIT_S without a group". Ray's count runs over
            # the whole job: a node lost once a day, replaced in two start timeouts, ended a week-long run on
            # day 3.
            self._controller_failures = 0  # DefaultFailurePolicy's counter (Ray 2.60)
        return super().make_decision(training_failed_error)

    def _over_total(self) -> bool:
        self.total_failures += 1
        if 0 < self.max_total_failures < self.total_failures:
            log.info("[unimo] failure %d of this job: over scaling.max_total_failures=%d, not retrying",
                     self.total_failures, self.max_total_failures)
            return True
        return False

    def _new_window_if_progress(self) -> None:
        """Ray's count of worker-group failures starts again when a newer checkpoint was saved since the
        previous failure: ``max_failures`` then bounds failures in a row without progress."""
        step = newest_saved_step(self.checkpoints_root)
        if step > self.step_at_last_failure:
            if self._worker_group_failures:
                log.info("[unimo] a checkpoint (step %d) was saved since the last failure: the failure count "
                         "starts again", step)
            self._worker_group_failures = 0  # DefaultFailurePolicy's counter (Ray 2.60)
        self.step_at_last_failure = max(step, self.step_at_last_failure)


class GuardedTorchTrainer(TorchTrainer):
    """TorchTrainer whose controller uses UserErrorFailurePolicy. (Ray 2.60 builds its default policy in
    ``fit`` and hands every keyword to ``_initialize_and_run_controller``, where it is swapped.)

    It also leaves out Ray Train's helpers that a unimo job does not use, each an actor process (about a
    CPU-second to start) per job or worker group: the Ray Datasets manager always (unimo streams its own
    data), and for an ``embedded`` Ray the placement-group cleaner, which guards a long-lived cluster against
    a controller that died holding its workers' reservation (an embedded Ray ends with its driver), and which
    needs the dashboard's state API. And it swaps the scaling policy (``scaling_policy_for``): an elastic job
    counts the live nodes afresh, a fixed-size job on an embedded Ray asks no autoscaler.
    """

    def __init__(self, *args, stop_file: str | None = None, checkpoints_root: str | None = None,
                 max_total_failures: int = 0, embedded: bool = False, **kwargs):
        self._unimo_policy_args = (stop_file, checkpoints_root, max_total_failures)
        self._unimo_embedded = embedded
        super().__init__(*args, **kwargs)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserErrorFailurePolicy(
            self.run_config.failure_config, *self._unimo_policy_args)
        controller_init_kwargs["scaling_policy"] = scaling_policy_for(
            controller_init_kwargs.get("scaling_policy"), self._unimo_embedded)
        controller_init_kwargs["callbacks"] = unused_helpers_left_out(
            controller_init_kwargs.get("callbacks") or [], self._unimo_embedded)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def unused_helpers_left_out(callbacks: list, embedded: bool) -> list:
    """Ray Train's default callbacks without the ones whose helper actors a unimo job never uses."""
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    unused = (DatasetsCallback, PlacementGroupCleanerCallback) if embedded else (DatasetsCallback,)
    return [cb for cb in callbacks if not isinstance(cb, unused)]


def scaling_policy_for(policy, embedded: bool):
    """The scaling policy the controller gets: an elastic one deciding each (re)start from a fresh view of the
    nodes (FreshViewElasticPolicy); a fixed-size one on an ``embedded`` Ray without the autoscaling
    coordinator (NoAutoscalerFixedPolicy); any other as Ray made it."""
    if type(policy) is ElasticScalingPolicy:
        return FreshViewElasticPolicy(scaling_config=policy.scaling_config)
    if embedded and type(policy) is FixedScalingPolicy:
        return NoAutoscalerFixedPolicy(scaling_config=policy.scaling_config)
    return policy


class NoAutoscalerFixedPolicy(FixedScalingPolicy):
    """Ray's fixed-size policy, without registering the workers' resources with Ray Data's autoscaling
    coordinator.

    The coordinator is an actor that passes resource requests on to the cluster's autoscaler (it starts nodes
    for the workers). An embedded Ray is this one machine, with no autoscaler to start anything, yet Ray 2.60
    started the actor (a process importing Ray Data: ~1.4 CPU-seconds per job on the 2-core VM,
    docs/BENCHMARKS.md) and asked it again every 20 s. On a cluster (``scaling.address``) Ray's policy is
    kept: there the request is how an autoscaling cluster grows to fit the job. An elastic job keeps the
    coordinator too: it counts the nodes alive from it.
    """

    def after_controller_start(self, train_run_context) -> None:
        self._requester_id = f"train-{train_run_context.run_id}"  # as Ray's; no coordinator client is made

    def _maybe_send_resource_request(self) -> None:
        pass  # no autoscaler to ask; Ray's asserts a coordinator client


class FreshViewElasticPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, except that the size of a worker group about to (re)start is counted on the nodes
    alive now.

    Ray 2.60's policy asks Ray Data's autoscaling coordinator, whose view of the nodes is refreshed every
    20 s: after a node is lost it restarted at the old size, and the group waited for a placement that could
    not happen until Ray Train's worker-group start timeout (60 s) ended it. The coordinator recomputes on
    request ("callers that turn the answer into node pins want this"), and a decision to start a group is such
    a caller. At most once per RECOMPUTE_EVERY_S: a recompute lists the cluster's nodes.
    """

    RECOMPUTE_EVERY_S = 2.0

    def __init__(self, scaling_config):
        super().__init__(scaling_config)
        self._latest_recompute = float("-inf")

    def make_decision_for_non_running_worker_group(self):
        now = time_monotonic()
        if now - self._latest_recompute >= self.RECOMPUTE_EVERY_S:
            self._latest_recompute = now
            try:
                self._latest_reserved_resources = ray.get(
                    self._autoscaling_coordinator.get_reserved_resources.remote(self._requester_id,
                                                                                  recompute=True),
                    timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
                self._latest_reserved_resources_query_time = now
            except Exception as err:  # Ray's own cached view decides, as it would without this class
                log.warning("[unimo] no fresh view of the nodes before a worker-group start: %s", err)
        return super().make_decision_for_non_running_worker_group()
