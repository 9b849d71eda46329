"""One MLflow run per job across a resubmission: continuous steps, tags, artifacts, no secret anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.recipes import DEBUG_CONFIG, ONE_WORKER, jobs_bound, small_run
from tests.integration.services import FAKE_AWS, mlflow_server

pytestmark = pytest.mark.integration


def train(argv: list[str]) -> None:
    import ray

    from orchestrator.cli import main

    try:
        assert main(["train", DEBUG_CONFIG, *argv]) == 0
    finally:
        ray.shutdown()


def all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


@jobs_bound(2)  # two jobs in a row (see jobs_bound)
def test_resubmitted_job_continues_the_same_run_without_gaps_or_secrets(synthetic_data, tmp_path,
                                                                        monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    for key, value in FAKE_AWS.items():  # credentials in the environment must reach nothing that is logged
        monkeypatch.setenv(key, value)
    storage = tmp_path / "runs"
    with mlflow_server(tmp_path / "mlflow") as uri:
        # the run's continuity in MLflow is rank 0's and the driver's work: ONE_WORKER
        tracking = [f"tracking.uri={uri}", "tracking.experiment=resume", "tracking.system_metrics_seconds=1",
                    "tracking.flush_seconds=0.5", *ONE_WORKER]
        train(small_run("job", storage, str(synthetic_data), steps=6, every=3, extra=tracking, evaluate=True))
        # The same run name with a longer plan: resumes from the step-6 checkpoint and logs steps 7..10.
        train(small_run("job", storage, str(synthetic_data), steps=10, every=5,
                        extra=[*tracking, "tracking.log_model=true"], evaluate=True))

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
        assert len(runs) == 1
        run_id = runs[0].info.run_id
        assert json.loads((storage / "job" / "mlflow_run.json").read_text())["run_id"] == run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["unimo.state"] == "finished"

        # Metric history: every step once; nothing was redone because the first job ended at its checkpoint.
        for key in ("loss/total", "loss/itc", "perf/achieved_tflops", "throughput/text_tokens_per_s"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 11)), key
        assert sorted(m.step for m in client.get_metric_history(run_id, "eval/i2t_R_at_1")) == [6, 10]
        system = [k for k in run.data.metrics if k.startswith("system/")]
        assert any(k.endswith("/cpu_percent") for k in system)
        assert any(k.endswith("/memory_used_gb") for k in system)

        tags = run.data.tags
        assert tags["unimo.restarts"] == "1" and tags["unimo.attempts"] == "2"
        assert tags["unimo.world_size"] == "1" and tags["unimo.nodes"] == "1"
        assert tags["unimo.flavor"] == "debug" and tags["unimo.resumed_from_step"] == "6"
        assert len(tags["mlflow.source.git.commit"]) >= 7

        files = all_artifacts(client, run_id)
        for expected in ("config/resolved_config.json", "config/stage_plan.json",
                         "config/restart_1/resolved_config.json", "config/restart_1/stage_plan.json",
                         "checkpoints/step_00000003/manifest.json", "checkpoints/step_00000006/manifest.json",
                         "checkpoints/step_00000010/manifest.json"):
            assert expected in files, (expected, files)
        assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= set(files)
        assert tags["unimo.exported_step"] == "10"
        # ... and the same export as a logged model of the run (MLflow 3's Models tab), an output at step 10
        models = client.search_logged_models([runs[0].info.experiment_id])
        assert [(m.source_run_id, m.status.name) for m in models] == [(run_id, "READY")], models
        assert models[0].model_id == tags["unimo.logged_model_id"] and models[0].tags["unimo.step"] == "10"
        model_files = {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= model_files, model_files
        assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(models[0].model_id, 10)]
        plan = json.loads(Path(client.download_artifacts(run_id, "config/restart_1/stage_plan.json",
                                                         str(tmp_path))).read_text())
        assert plan[-1]["last_step"] == 10
        captions = [f for f in files if f.startswith("eval/captions_step_")]
        assert captions, files  # sample captions of the final evaluations

        # No credential in params, tags, metric names, any artifact's content, the logs (the driver's and,
        # through Ray's log forwarding, the workers') or any file of the run folder (checkpoints, state,
        # manifests).
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / "downloaded")))
        blobs = [json.dumps({"params": run.data.params, "tags": tags, "metrics": sorted(run.data.metrics)})]
        blobs += [p.read_text(errors="replace") for p in local.rglob("*") if p.is_file()]
        logs = capfd.readouterr()
        assert "resumed from" in logs.out + logs.err  # the logs were captured, workers' lines included
        blobs += [logs.out, logs.err]
        run_files = [p for p in (storage / "job").rglob("*") if p.is_file()]
        assert any(p.name == "trainer_state.json" for p in run_files)
        blobs += [p.read_text(errors="replace") for p in run_files]
        for secret in (FAKE_AWS["AWS_SECRET_ACCESS_KEY"], FAKE_AWS["AWS_ACCESS_KEY_ID"]):
            assert not any(secret in blob for blob in blobs)
        assert run.data.params["model.flavor"] == "debug"
