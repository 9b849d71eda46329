"""The worker-group failure policy (orchestrator/failure_policy.py): user errors and failures after a stop are
never retried; everything else is left to Ray Train's default policy and its max_failures."""

from __future__ import annotations

import pickle

import ray.train
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from data_pipeline.errors import TransientError, UserError
from data_pipeline.storage_io import DataReadError, DataSourceError
from orchestrator.failure_policy import UserErrorFailurePolicy, user_error_of


def group_error(*errors: BaseException) -> WorkerGroupError:
    return WorkerGroupError("worker errors", dict(enumerate(errors)))


def test_error_kinds():
    assert issubclass(DataSourceError, UserError) and issubclass(DataReadError, TransientError)
    assert not issubclass(DataReadError, UserError)


def test_the_user_error_behind_a_worker_group_failure():
    err = DataSourceError("no shards (*.tar) found under /data/pairs")
    assert user_error_of(group_error(RuntimeError("gloo: connection reset"), err)) is err
    assert user_error_of(group_error(RuntimeError("gloo"), DataReadError("could not read"))) is None
    assert user_error_of(ControllerError(err)) is err


def test_a_user_error_in_a_worker_is_never_retried():
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=3))
    err = group_error(DataSourceError("no shards (*.tar) found under /data/pairs"),
                      RuntimeError("collateral"))
    assert policy.make_decision(err) == FailureDecision.RAISE


def test_other_failures_are_retried_up_to_max_failures():
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=2))
    decisions = [policy.make_decision(group_error(DataReadError("outage"))) for _ in range(3)]
    assert decisions == [FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]


def test_no_retry_after_a_stop_request(tmp_path):
    stop = tmp_path / "STOP"
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=3), str(stop))
    assert policy.make_decision(group_error(DataReadError("outage"))) == FailureDecision.RETRY
    stop.write_text("SIGTERM\n")
    assert policy.make_decision(group_error(DataReadError("outage"))) == FailureDecision.RAISE


def test_the_policy_and_a_user_error_travel_to_the_controller():
    """Ray pickles the policy into the controller actor and a worker's error back; the detail rides along."""
    policy = pickle.loads(pickle.dumps(UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=1),
                                                              "/x/STOP")))
    assert policy.stop_file == "/x/STOP"
    err = DataSourceError("no shards")
    err.detail = "Traceback ..."
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, UserError) and back.detail == "Traceback ..." and str(back) == "no shards"
