"""What the driver tells a person (issue #26): one paragraph for a failed run with the log that holds the
tracebacks, the tracking server's URL (not `mlflow ui`) for a server, and a stop that cannot reach a step
boundary ends the run, saying so."""

from __future__ import annotations

import os
import signal
import time

import pytest
from ray.train.v2.api.exceptions import WorkerGroupError

from data_pipeline.errors import UserError
from data_pipeline.storage_io import DataReadError, DataSourceError
from orchestrator import driver
from orchestrator.tracking_setup import split_credentials
from tests.integration.recipes import DEBUG_CONFIG
from trainer.config import load_config


def test_the_summary_names_a_tracking_server_and_mlflow_ui_only_for_a_local_store():
    server = driver.tracking_hint("http://alice:s3cr3t-pass@mlflow.example:5000")
    assert server == ["MLflow UI         : http://***@mlflow.example:5000"]
    local = "\n".join(driver.tracking_hint("sqlite:////runs/mlflow.db"))
    assert "ui --backend-store-uri sqlite:////runs/mlflow.db" in local
    database = "\n".join(driver.tracking_hint("postgresql://mlflow:pg-s3cret@db.example:5432/mlflow"))
    assert "pg-s3cret" not in database and "postgresql://***@db.example:5432/mlflow" in database


def test_the_summary_links_the_run_page_in_mlflows_model_training_view(tmp_path):
    from orchestrator.tracking_setup import open_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_client(uri)
    run = client.create_run(client.create_experiment("e")).info
    page = driver.run_page(uri, run.run_id)
    assert page == f"/#/experiments/{run.experiment_id}/runs/{run.run_id}?workflowType=machine_learning"
    assert driver.tracking_hint(uri, page)[1].endswith(f"browse http://127.0.0.1:5000{page}")
    assert driver.run_page(uri, None) == "" and driver.run_page(uri, "no-such-run") == ""


def test_the_summary_states_held_out_retrieval_against_chance_and_the_demo_the_heads_against_guessing():
    from orchestrator.demo import what_it_learnt

    metrics = {"eval/t2i_R@1": 0.458, "eval/i2t_R@1": 0.56, "eval/candidates": 100.0, "loss/itm": 0.49,
               "loss/grounding": 0.313, "loss/itc": 0.74}
    assert driver.held_out_line(metrics) == ("text->image R@1 0.458 among 100 images (chance 0.010), "
                                             "image->text R@1 0.560")
    assert driver.held_out_line({"loss/itc": 0.7}) == ""  # no evaluation at the end: no line
    # 1 matching row in 3 -> entropy 0.637; one image of 2 per phrase -> log 2
    assert what_it_learnt(metrics) == ("final losses of the cross-modal heads: itm 0.490 (guessing: 0.637), "
                                       "grounding 0.313 (guessing: 0.693)")
    assert what_it_learnt({"loss/itc": 0.7}) == ""  # a plan without the cross-modal heads


def test_a_user_error_from_a_worker_is_its_own_paragraph_and_names_the_log(tmp_path):
    cfg = load_config(DEBUG_CONFIG, ["run.name=r1"])
    err = DataSourceError("no shards (*.tar) found under /data/pairs: point it at ...")
    err.detail = "Traceback (most recent call last):\n  File loader.py ...\nDataSourceError: no shards"
    out = driver.failed_run_error(WorkerGroupError("ray's text", {0: err, 1: RuntimeError("gloo")}), tmp_path,
                                  cfg)
    assert isinstance(out, UserError)
    text, log = str(out).split(" (full traceback: ")
    assert text == "no shards (*.tar) found under /data/pairs: point it at ..."
    logged = open(log.rstrip(")")).read()
    assert "File loader.py" in logged and log.startswith(str(tmp_path / "logs" / "error-"))


def test_a_worker_lost_after_the_stop_request_ends_the_run_stopped_not_failed(tmp_path, capsys):
    """A spot reclaim kills a worker during a restore, after SIGTERM asked the run to stop: no new worker
    group (the failure policy), and the run ends as stopped (exit 75, MLflow KILLED, resumable from its
    newest checkpoint), not failed: `unimo submit --max-resubmits` resubmits a stopped run and gives a failed
    one up. A user error after a stop is still one; a failure without a stop request still fails the run."""
    from trainer import checkpoint as ckpt

    lost = WorkerGroupError("ray's text", {1: RuntimeError("the node was reclaimed")})
    assert driver.stopped_as_asked(lost, stop_requested=True)
    assert not driver.stopped_as_asked(lost, stop_requested=False)
    user = WorkerGroupError("ray's text", {0: DataSourceError("no shards")})
    assert not driver.stopped_as_asked(user, stop_requested=True)

    folder = tmp_path / "checkpoints" / ckpt.step_dir_name(4)
    folder.mkdir(parents=True)
    ckpt.write_manifest(folder, {}, 4)
    out = driver.stopped_outcome(tmp_path, "sqlite:///x.db", "run-1")
    assert out.stopped_early and driver.exit_code(out) == driver.EXIT_PREEMPTED
    assert out.metrics["step"] == 4 and out.checkpoint.endswith("step_00000004")
    assert "resumes it from its newest checkpoint (step 4)" in capsys.readouterr().out


def test_other_failures_are_summed_up_by_their_last_lines(tmp_path):
    cfg = load_config(DEBUG_CONFIG, ["run.name=r1", "scaling.max_failures=2"])
    err = WorkerGroupError("...", {0: DataReadError("could not read s3://b/x after 9 attempts"),
                                   1: RuntimeError("Traceback ...\n  File x\nRuntimeError: gloo reset")})
    out = str(driver.failed_run_error(err, tmp_path, cfg))
    assert out.startswith("training failed (the worker group was retried up to scaling.max_failures=2 "
                          "times in a row without a new checkpoint): ")
    assert "could not read s3://b/x after 9 attempts" in out and "RuntimeError: gloo reset" in out
    assert "(full traceback: " in out


@pytest.mark.parametrize("started_with_sigint", ["handled", "ignored"])
def test_a_stop_that_reaches_no_step_boundary_ends_the_run(tmp_path, monkeypatch, started_with_sigint):
    """The first SIGTERM writes the STOP file and starts the grace; when it runs out the main thread is
    interrupted (as by Ctrl-C, which Ray Train turns into an abort of its workers). Also in a process that
    a non-interactive shell started in the background (`unimo train ... &`): it inherits SIGINT ignored, and
    Python drops an interrupt then (this test, so started, spun until pytest's timeout)."""
    monkeypatch.setenv(driver.STOP_GRACE_ENV, "0.5")
    before = signal.getsignal(signal.SIGINT)
    if started_with_sigint == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # restored below, whatever happens
    try:
        _stop_without_a_step_boundary(tmp_path)
        # the disposition the process started with is back afterwards
        assert signal.getsignal(signal.SIGINT) == (signal.SIG_IGN if started_with_sigint == "ignored"
                                                   else before)
    finally:
        signal.signal(signal.SIGINT, before)


def _stop_without_a_step_boundary(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with driver.sigterm_as_exit(tmp_path) as state:
            os.kill(os.getpid(), signal.SIGTERM)
            while not state.timed_out:  # the driver would be inside trainer.fit() here
                time.sleep(0.05)
            # the interrupt arrives at the next bytecode boundary; bounded, so that a lost one fails here and
            # says so instead of spinning until pytest's timeout
            lost_after = time.monotonic() + 60
            while time.monotonic() < lost_after:
                time.sleep(0.05)
            pytest.fail(f"no KeyboardInterrupt 60 s after the grace ended (SIGINT handler: "
                        f"{signal.getsignal(signal.SIGINT)!r})")
    assert state.requested_at is not None and state.timed_out
    assert (tmp_path / "STOP").read_text().startswith("SIGTERM")
    message = driver._stop_timed_out_message(tmp_path)
    assert "WITHOUT a new checkpoint" in message and "starts from scratch" in message


def test_credentials_for_the_tracking_probe():
    bare, headers = split_credentials("http://alice:p%40ss@host:5000/prefix", environ={})
    assert bare == "http://host:5000/prefix" and headers["Authorization"] == "Basic YWxpY2U6cEBzcw=="
    _, headers = split_credentials("http://host:5000", environ={"MLFLOW_TRACKING_TOKEN": "tok"})
    assert headers == {"Authorization": "Bearer tok"}
    _, headers = split_credentials("http://host", environ={"MLFLOW_TRACKING_USERNAME": "u",
                                                            "MLFLOW_TRACKING_PASSWORD": "p"})
    assert headers == {"Authorization": "Basic dTpw"}


def test_a_worker_group_that_cannot_be_placed_names_the_resources(tmp_path):
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    cfg = load_config(DEBUG_CONFIG, ["run.name=r1", "scaling.num_workers=2", "scaling.cpus_per_worker=4"])
    out = str(driver.failed_run_error(ControllerError(WorkerGroupStartupTimeoutError(2)), tmp_path, cfg))
    assert out.startswith("scaling: the worker group (2 x 4 CPU) could not be started within "
                          "UNIMO_CLUSTER_WAIT_S=")
    assert "add nodes or lower scaling.num_workers" in out


def test_the_job_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """Ray Train's fit() sets a SIGINT handler of its own: it must not outlive the job in a process that goes
    on."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with driver.sigterm_as_exit(tmp_path):
        signal.signal(signal.SIGINT, lambda *_: None)  # as trainer.fit() does
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_storage_blip_while_clearing_the_served_stop_request_changes_no_outcome(monkeypatch, caplog):
    """The run's outcome is decided when the driver clears the stop request: an S3 error there used to end a
    finished or stopped job with exit 1."""
    def unreachable(location):
        raise OSError(f"could not reach {location}")

    monkeypatch.setattr(driver.storage, "delete", unreachable)
    driver._clear_stop_file("s3://bucket/runs/r/STOP")
    assert "could not delete the stop request s3://bucket/runs/r/STOP" in caplog.text


def test_a_driver_that_lost_the_run_s_lock_leaves_the_run_s_records_alone(tmp_path, monkeypatch, caplog):
    """Another driver took the run over (it found this one's lock stale): this one's end of job must not
    reconcile Ray's snapshot or close the MLflow run (as failed) under the driver now training it."""
    import threading

    from orchestrator import tracking_setup
    from trainer.checkpointing import records

    calls = []
    monkeypatch.setattr(records, "reconcile_run", lambda run_dir, when: calls.append(("reconcile", when)))
    monkeypatch.setattr(tracking_setup, "finish_run",
                        lambda *a, **k: calls.append(("finish", k["preempted"])))
    monkeypatch.setattr(driver, "report_goodput", lambda run_dir, start: ({}, 0))
    cfg = load_config(DEBUG_CONFIG, ["run.name=r1"])
    lost = threading.Event()
    close = dict(ok=False, stopped=False, served_stop=None, lost=lost)
    driver._close_job(cfg, tmp_path, 0.0, "sqlite:///x.db", "run-1", **close)
    assert calls == [("reconcile", "end"), ("finish", False)]  # the lock held: the job closes its records
    calls.clear()
    lost.set()
    assert driver._close_job(cfg, tmp_path, 0.0, "sqlite:///x.db", "run-1", **close) == "run-1"
    assert calls == [] and "lost the run's lock to another driver" in caplog.text
