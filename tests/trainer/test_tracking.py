"""MetricLogger against in-process fake MLflow clients: outages, spilling to disk, replay, order, no loss."""

from __future__ import annotations

import threading

import pytest

from trainer.metric_logger import MetricLogger, metric_key, spooled_segments


class FakeClient:
    """Records what reaches 'MLflow'; fails while ``down`` or for its first ``fail_first`` calls."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.down = False
        self.calls = 0
        self.metrics: list[tuple[str, str, float, int]] = []  # (run_id, key, value, step) in arrival order
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None, str]] = []
        self.lock = threading.Lock()

    def _maybe_fail(self):
        self.calls += 1
        if self.down or self.calls <= self.fail_first:
            raise ConnectionError("connection refused")

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        with self.lock:
            self._maybe_fail()
            self.metrics += [(run_id, m.key, m.value, m.step) for m in metrics]
            self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, local_path, artifact_path=None):
        with self.lock:
            self._maybe_fail()
            with open(local_path) as f:
                self.artifacts.append((local_path.rsplit("/", 1)[-1], artifact_path, f.read()))


def expected(steps: int, keys=("loss/total", "lr", "eval/i2t_R@1")) -> list[tuple[str, float, int]]:
    return [(metric_key(k), float(s * 10 + i), s) for s in range(1, steps + 1) for i, k in enumerate(keys)]


def log_steps(logger: MetricLogger, first: int, last: int, keys=("loss/total", "lr", "eval/i2t_R@1")) -> None:
    for s in range(first, last + 1):
        logger.log({k: s * 10 + i for i, k in enumerate(keys)}, s)


def received(client: FakeClient) -> list[tuple[str, float, int]]:
    return [(k, v, s) for _, k, v, s in client.metrics]


def test_fails_n_times_then_succeeds_without_losing_or_reordering(tmp_path):
    client = FakeClient(fail_first=4)
    logger = MetricLogger("fake://", "run1", flush_seconds=0.01, client=client, max_backoff=0.05,
                          spool_dir=tmp_path)
    log_steps(logger, 1, 200)
    assert logger.close(timeout=20)
    assert received(client) == expected(200)
    assert logger.failures >= 4 and logger.delivered == 600
    assert {r for r, *_ in client.metrics} == {"run1"}


def test_logging_while_sending_keeps_order(tmp_path):
    client = FakeClient()
    logger = MetricLogger("fake://", "run1", flush_seconds=0.001, client=client, spool_dir=tmp_path,
                          max_in_memory=64)
    log_steps(logger, 1, 3000)  # the sender drains concurrently; chunks close and spill as they fill
    assert logger.close(timeout=30)
    assert received(client) == expected(3000)


def test_long_outage_spills_to_disk_with_bounded_memory_then_delivers_everything(tmp_path):
    client = FakeClient()
    client.down = True
    logger = MetricLogger("fake://", "run1", flush_seconds=0.01, client=client, max_backoff=0.05,
                          spool_dir=tmp_path, max_in_memory=300)
    peak = 0
    for s in range(1, 2001):
        log_steps(logger, s, s)
        peak = max(peak, logger._in_memory)
    assert peak <= 300 + 3  # one step's metrics can overshoot before the spill
    assert logger.spilled > 5000 and spooled_segments(tmp_path)
    assert logger.pending() == 6000
    client.down = False
    assert logger.flush(timeout=30)
    assert received(client) == expected(2000)
    assert not spooled_segments(tmp_path)  # delivered segments are removed
    logger.close()


def test_undelivered_at_shutdown_are_spooled_and_sent_first_by_the_next_logger(tmp_path):
    down = FakeClient()
    down.down = True
    first = MetricLogger("fake://", "run1", flush_seconds=0.01, client=down, max_backoff=0.05,
                         spool_dir=tmp_path)
    log_steps(first, 1, 40)
    assert not first.close(timeout=0.3)
    assert spooled_segments(tmp_path) and down.metrics == []

    up = FakeClient()
    second = MetricLogger("fake://", "run1", flush_seconds=0.01, client=up, spool_dir=tmp_path)
    assert second.pending() == 120
    log_steps(second, 41, 60)
    assert second.close(timeout=20)
    assert received(up) == expected(60)
    assert not spooled_segments(tmp_path)


def test_partly_sent_segment_resumes_after_its_sent_marker(tmp_path):
    """A crash after some batches of a spooled segment went out: the next logger sends only the rest."""
    client = FakeClient()
    client.down = True
    first = MetricLogger("fake://", "run1", flush_seconds=0.01, client=client, max_backoff=0.05,
                         spool_dir=tmp_path)
    log_steps(first, 1, 700)  # 2100 metrics: three batches of at most 1000
    assert not first.close(timeout=0.2)
    (segment,) = spooled_segments(tmp_path)
    segment.with_name(segment.name + ".sent").write_text("1000")  # as if the first batch had been delivered
    up = FakeClient()
    second = MetricLogger("fake://", "run1", flush_seconds=0.01, client=up, spool_dir=tmp_path)
    assert second.close(timeout=20)
    assert received(up) == expected(700)[1000:]


def test_run_created_late_receives_everything_logged_before(tmp_path):
    client = FakeClient()
    answers = iter([None, None, "late-run"])
    logger = MetricLogger("fake://", None, flush_seconds=0.01, client=client, max_backoff=0.05,
                          spool_dir=tmp_path, resolve_run=lambda c: next(answers, "late-run"))
    log_steps(logger, 1, 30)
    assert logger.close(timeout=20)
    assert logger.run_id == "late-run"
    assert received(client) == expected(30)
    assert {r for r, *_ in client.metrics} == {"late-run"}


def test_tags_and_artifacts_are_retried_until_delivered(tmp_path):
    client = FakeClient(fail_first=2)
    logger = MetricLogger("fake://", "run1", flush_seconds=0.01, client=client, max_backoff=0.05,
                          spool_dir=tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"step": 5}')
    logger.set_tags({"unimo.nodes": 2})
    logger.log_artifact(manifest, "checkpoints/step_00000005")
    manifest.unlink()  # the loop deletes its checkpoint folder right after: the logger kept a copy
    logger.log_text("a cat\na dog\n", "eval/captions_step_00000005.txt")
    assert logger.close(timeout=20)
    assert client.tags == {"unimo.nodes": "2"}
    assert client.artifacts == [("manifest.json", "checkpoints/step_00000005", '{"step": 5}'),
                                ("captions_step_00000005.txt", "eval", "a cat\na dog\n")]


class RefusingClient(FakeClient):
    """A server that refuses one metric's content (HTTP 400) but takes the rest."""

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if any(m.key == "poison" for m in metrics):
            err = RuntimeError("INVALID_PARAMETER_VALUE: poison")
            err.error_code = "INVALID_PARAMETER_VALUE"
            raise err
        super().log_batch(run_id, metrics, params, tags, synchronous)


def test_a_refused_metric_does_not_stall_the_ones_behind_it(tmp_path):
    client = RefusingClient()
    logger = MetricLogger("fake://", "run1", flush_seconds=0.01, client=client, spool_dir=tmp_path)
    logger.log({"a": 1, "poison": 2, "b": 3}, 1)
    logger.log({"a": 4}, 2)
    assert logger.close(timeout=10)
    assert received(client) == [("a", 1.0, 1), ("b", 3.0, 1), ("a", 4.0, 2)]
    assert logger.rejected == 1


@pytest.mark.parametrize("name, key", [("eval/i2t_R@1", "eval/i2t_R_at_1"), ("loss/itc", "loss/itc"),
                                       ("system/host#1/cpu", "system/host_1/cpu"), ("/a//b/", "a/b")])
def test_metric_names_are_made_valid_for_mlflow(name, key):
    from mlflow.utils.validation import _validate_metric_name

    assert metric_key(name) == key
    _validate_metric_name(key)  # raises if MLflow would refuse it


def test_log_returns_while_the_server_hangs(tmp_path):
    """The training step never waits for MLflow: 500 steps are logged while the server's first call is still
    hanging (an event, not a stopwatch: the call returns only when the test lets it)."""
    entered, hang = threading.Event(), threading.Event()

    class Hanging(FakeClient):
        def log_batch(self, *a, **k):
            entered.set()
            hang.wait(60)
            raise TimeoutError("read timed out")

    logger = MetricLogger("fake://", "run1", flush_seconds=0.01, client=Hanging(), spool_dir=tmp_path)
    log_steps(logger, 1, 1)
    assert entered.wait(60), "the logger's thread never called the server"
    steps = threading.Thread(target=log_steps, args=(logger, 2, 500), daemon=True)
    steps.start()
    steps.join(60)  # returns at once unless logging waits for the call, which hangs until hang is set
    finished = not steps.is_alive()
    hang.set()
    assert finished, "logging a step waited for the hanging MLflow call"
    logger.close(timeout=0.1)


def test_artifacts_not_uploaded_at_shutdown_are_uploaded_by_the_next_logger(tmp_path):
    down = FakeClient()
    down.down = True
    first = MetricLogger("fake://", "run1", flush_seconds=0.01, client=down, max_backoff=0.05,
                         spool_dir=tmp_path)
    first.log_text("step 4 manifest", "checkpoints/step_00000004/manifest.json")
    first.log({"loss/total": 1.0}, 4)
    assert not first.close(timeout=0.2)
    up = FakeClient()
    second = MetricLogger("fake://", "run1", flush_seconds=0.01, client=up, spool_dir=tmp_path)
    assert second.pending_ops() == 1
    assert second.close(timeout=10)
    assert up.artifacts == [("manifest.json", "checkpoints/step_00000004", "step 4 manifest")]
    assert received(up) == [("loss/total", 1.0, 4)]
    assert not list((tmp_path / "artifacts").iterdir())


def test_training_experiments_open_in_mlflows_model_training_view(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.config import load_config
    from trainer.run_identity import EXPERIMENT_KIND_TAG, create_run, training_experiment

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = create_run(client, load_config(None, ["tracking.experiment=fresh"]),
                        str(tmp_path), [], commit="x")
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("older")  # made before the tag existed: tagged on the next run
    assert training_experiment(client, "older") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    training_experiment(client, "chosen")  # a kind someone set on purpose stays
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_steps_trained_again_after_a_restart_are_not_logged_twice(tmp_path):
    """A restart from the step-3 checkpoint trains steps 4-5 again: the run has them already."""
    from mlflow.tracking import MlflowClient

    from trainer.tracking import RunTracker, logged_through

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("restart")).info.run_id
    for step in range(1, 6):  # the first attempt got to step 5 before it died
        client.log_metric(run_id, "loss/total", float(step), step=step)
    assert logged_through(uri, run_id) == 5
    # its node's sampler and the driver's goodput summary got further (rank 0's steps 6-8 were still queued
    # when it was killed): those steps must be logged by the next attempt
    client.log_metric(run_id, "system/cpu_percent", 50.0, step=8)
    client.log_metric(run_id, "goodput/fraction", 0.9, step=8)
    assert logged_through(uri, run_id) == 5

    class Sent:
        def __init__(self):
            self.steps = []

        def log(self, metrics, step):
            self.steps.append(step)

    sent = Sent()
    tracker = RunTracker(metrics=sent, skip_through=logged_through(uri, run_id))
    for step in range(4, 9):  # the second attempt, from the step-3 checkpoint
        tracker.log({"loss/total": float(step)}, step)
    assert sent.steps == [6, 7, 8]
    assert logged_through(uri, None) == -1 and logged_through(uri, "no-such-run") == -1


def test_metrics_persisted_at_a_checkpoint_survive_a_kill_and_are_not_logged_again(tmp_path):
    """A checkpoint's steps are on disk before it is uploaded: a SIGKILL afterwards (no ``close``) loses none,
    and a restart that trains the steps after an older checkpoint again skips what the spool holds."""
    down = FakeClient()
    down.down = True
    first = MetricLogger("fake://", "run1", flush_seconds=0.01, client=down, max_backoff=0.05,
                         spool_dir=tmp_path)
    log_steps(first, 1, 8)
    assert first.persist() == 24 and spooled_segments(tmp_path)
    first._stop = True  # killed: its thread stops, nothing is spooled at a shutdown
    first._wake.set()
    first._thread.join(5)

    up = FakeClient()
    second = MetricLogger("fake://", "run1", flush_seconds=0.01, client=up, spool_dir=tmp_path)
    assert second.adopted_through == 8
    assert second.close(timeout=20)
    assert received(up) == expected(8)


def test_persisting_while_a_batch_is_in_flight_sends_every_metric_once_in_order(tmp_path):
    class PersistMidSend(FakeClient):
        logger, moved = None, 0

        def log_batch(self, run_id, metrics=(), **kwargs):
            if not self.metrics:  # the step loop persists while this first batch is on its way
                log_steps(self.logger, 2, 700)
                self.moved = self.logger.persist()
            super().log_batch(run_id, metrics, **kwargs)

    client = PersistMidSend()
    logger = client.logger = MetricLogger("fake://", "run1", flush_seconds=0.01, client=client,
                                          spool_dir=tmp_path)
    log_steps(logger, 1, 1)  # the first batch: step 1 alone
    assert logger.close(timeout=20)
    assert client.moved == 2100  # step 1 (in flight) and steps 2-700 went to disk
    assert received(client) == expected(700)
    assert not spooled_segments(tmp_path)
