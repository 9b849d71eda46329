"""The worker-group failure policy (orchestrator/failure_policy.py): user errors and failures after a stop are
never retried; other worker-group failures are budgeted per window of progress (max_failures in a row without
a new checkpoint, max_total_failures in all)."""

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


def saved(checkpoints, step: int) -> None:
    """A complete step folder (a manifest is what makes a checkpoint count)."""
    from trainer import checkpoint as ckpt

    folder = checkpoints / ckpt.step_dir_name(step)
    folder.mkdir(parents=True)
    ckpt.write_manifest(folder, {}, step)


def test_spread_out_failures_each_after_a_new_checkpoint_are_all_retried(tmp_path):
    """A week-long run: a fault every few checkpoints. With max_failures=2 the 3rd fault used to end it."""
    checkpoints = tmp_path / "checkpoints"
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=2), None, str(checkpoints))
    decisions = []
    for step in range(10, 110, 10):
        saved(checkpoints, step)
        decisions.append(policy.make_decision(group_error(RuntimeError("NCCL timeout"))))
    assert decisions == [FailureDecision.RETRY] * 10


def test_failures_in_a_row_without_a_new_checkpoint_stop_the_job(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    saved(checkpoints, 10)  # from an earlier job: no progress of this one
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=2), None, str(checkpoints))
    crash = group_error(RuntimeError("segfault at start"))
    assert [policy.make_decision(crash) for _ in range(2)] == [FailureDecision.RETRY] * 2
    saved(checkpoints, 20)  # progress: a new window
    assert [policy.make_decision(crash) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [
        FailureDecision.RAISE]


def test_start_failures_count_in_a_row_not_over_the_job(tmp_path):
    """A node lost once a day and replaced by the autoscaler within two worker-group start timeouts: each
    outage is well within UNIMO_CLUSTER_WAIT_S (controller_failure_limit start failures in a row), so a week
    of them goes on; Ray's own count ran over the whole job and ended it on day 3. Six failed starts in a
    row still end it."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    checkpoints = tmp_path / "checkpoints"
    config = ray.train.FailureConfig(max_failures=3, controller_failure_limit=5)
    policy = UserErrorFailurePolicy(config, None, str(checkpoints))
    cannot_start = ControllerError(WorkerGroupStartupTimeoutError(60))
    decisions = []
    for day in range(1, 8):
        saved(checkpoints, 1000 * day)
        decisions.append(policy.make_decision(group_error(RuntimeError("node lost"))))
        decisions += [policy.make_decision(cannot_start) for _ in range(2)]
    assert decisions == [FailureDecision.RETRY] * 21
    # day 7's two failed starts and three more: five in a row are retried, the sixth ends the job
    assert [policy.make_decision(cannot_start) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [
        FailureDecision.RAISE]


def test_max_total_failures_caps_a_job_whatever_its_progress(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=1), None, str(checkpoints),
                                    max_total_failures=3)
    decisions = []
    for step in (10, 20, 30, 40):
        saved(checkpoints, step)
        decisions.append(policy.make_decision(group_error(RuntimeError("ECC error"))))
    assert decisions == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]


def test_a_torn_newer_folder_is_no_progress(tmp_path):
    """A step folder without its manifest (a save cut short) does not open a new window."""
    checkpoints = tmp_path / "checkpoints"
    saved(checkpoints, 10)
    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=1), None, str(checkpoints))
    assert policy.make_decision(group_error(RuntimeError("x"))) == FailureDecision.RETRY
    (checkpoints / "step_00000020").mkdir()  # torn: no manifest
    assert policy.make_decision(group_error(RuntimeError("x"))) == FailureDecision.RAISE


def test_a_full_disk_or_an_incompatible_checkpoint_is_not_retried():
    """A restart on the same disk, or with the same config, meets the same error."""
    from trainer.checkpoint import IncompatibleCheckpoint, NewerCheckpoint
    from trainer.checkpointing.manager import NoSpaceForCheckpoint

    for err in (NoSpaceForCheckpoint("not enough free space in /tmp"),
                IncompatibleCheckpoint("saved with another model config"),
                NewerCheckpoint("has checkpoint schema 9")):
        policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=3))
        assert policy.make_decision(group_error(err, RuntimeError("collateral"))) == FailureDecision.RAISE


def test_a_changed_tokenizer_or_corpus_is_not_retried():
    from trainer.checkpointing.identity import DataChanged

    policy = UserErrorFailurePolicy(ray.train.FailureConfig(max_failures=3))
    assert policy.make_decision(group_error(DataChanged("tokenizer differs"))) == FailureDecision.RAISE


def test_an_elastic_job_restarts_from_a_fresh_view_of_the_nodes(monkeypatch):
    """The controller of an elastic job gets FreshViewElasticPolicy (a recompute of the coordinator's node
    view before each worker-group start, at most every 2 s; tests/integration/test_faults_node.py shows the
    effect); a fixed-size job on a cluster keeps Ray's policy. Both travel to the controller by pickle."""
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy

    from orchestrator.failure_policy import FreshViewElasticPolicy, scaling_policy_for

    class Coordinator:  # the coordinator actor's one call the policy makes, answered in this process
        def __init__(self):
            self.recomputes = []
            self.get_reserved_resources = self

        def remote(self, requester_id, recompute=False):
            self.recomputes.append(recompute)
            return {"node-a": {"CPU": 1.0}}  # what is reserved for the job: one node of 1 CPU alive

    class Client:  # Ray Train's coordinator client, as the controller's start sets it up
        def __init__(self, coordinator):
            self._autoscaling_coordinator = coordinator

        def maybe_send_resource_request(self, *args):
            pass

    elastic = ray.train.ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1})
    fixed = ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})
    assert isinstance(scaling_policy_for(create_scaling_policy(elastic), True), FreshViewElasticPolicy)
    policy = scaling_policy_for(create_scaling_policy(elastic), False)
    assert isinstance(policy, FreshViewElasticPolicy) and policy.scaling_config is elastic
    kept = create_scaling_policy(fixed)
    assert scaling_policy_for(kept, False) is kept  # a cluster's fixed-size job: Ray's own
    policy = pickle.loads(pickle.dumps(policy))
    coordinator = Coordinator()
    policy._requester_id, policy._coordinator_client = "train-x", Client(coordinator)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    decision = policy.make_decision_for_non_running_worker_group()
    policy.make_decision_for_non_running_worker_group()  # within 2 s: Ray's own (cached) query, no recompute
    assert decision.num_workers == 1  # counted on the node alive
    assert coordinator.recomputes[0] is True and coordinator.recomputes.count(True) == 1


def test_a_fixed_size_job_on_an_embedded_ray_asks_no_autoscaler(monkeypatch):
    """On one machine there is no autoscaler to start nodes: the controller's policy makes no autoscaling
    coordinator (an actor process per job) and sends it nothing, and still sizes the group as Ray's does. A
    cluster's job keeps Ray's policy (previous test)."""
    import asyncio
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision, create_scaling_policy
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from orchestrator.failure_policy import NoAutoscalerFixedPolicy, scaling_policy_for

    asked = []

    def no_coordinator():  # Ray's client makes the actor at its first request (and logs a failure to send)
        asked.append(1)
        raise RuntimeError("no coordinator in this test")

    monkeypatch.setattr(client, "get_or_create_autoscaling_coordinator", no_coordinator)
    fixed = ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})
    ray_s = create_scaling_policy(fixed)
    policy = pickle.loads(pickle.dumps(scaling_policy_for(ray_s, True)))  # it travels to the controller
    assert isinstance(policy, NoAutoscalerFixedPolicy)
    assert (policy.scaling_config.num_workers, policy.scaling_config.resources_per_worker) == (2, {"CPU": 1})
    run = SimpleNamespace(run_id="r1")
    policy.after_controller_start(run)
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    assert decision.resources_per_worker == {"CPU": 1}
    policy.make_decision_for_running_worker_group(None, None)
    asyncio.run(policy.before_controller_shutdown())
    policy.before_controller_abort()
    assert asked == []
    ray_s.after_controller_start(run)  # Ray's policy asks
    assert asked == [1]
