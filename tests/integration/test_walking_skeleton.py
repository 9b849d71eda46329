"""End to end through the real parts: S3 (moto) and MLflow servers on loopback, Ray Train, DeepSpeed
ZeRO-3."""

from __future__ import annotations

import json

import pytest

from tests.integration.recipes import DEBUG_CONFIG, data_overrides
from tests.integration.services import FAKE_AWS, mlflow_server, s3_server, upload_folder

pytestmark = pytest.mark.integration


def test_train_two_zero3_workers_from_s3_into_mlflow(synthetic_data, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    with s3_server(), mlflow_server(tmp_path / "mlflow") as tracking_uri:
        upload_folder(synthetic_data, "unimo-data", "demo")
        s3 = "s3://unimo-data/demo"
        # pairs as two weighted corpora (2 shards each, one per rank's stream): the mix reaches MLflow per
        # corpus
        corpora = (f"data.pair.corpora=[{{name: a, urls: '{s3}/pairs/shard-{{000000..000001}}.tar', "
                   f"weight: 1}}, {{name: b, urls: '{s3}/pairs/shard-{{000002..000003}}.tar', weight: 3}}]")
        argv = ["train", DEBUG_CONFIG, "run.name=skeleton", f"run.storage={tmp_path / 'runs'}",
                *data_overrides(s3), "data.pair.urls=", corpora,
                "stages=[{name: unimodal, steps: 10, objectives: {mlm_text: 1, mim: 1, itc: 1}},"
                " {name: crossmodal, steps: 20, objectives: {itc: 1, mlm_pair: 1}}]",
                "optimizer.warmup_steps=5", "train.log_every=1", "checkpoint.every_steps=15",
                "model.vision.image_size=32",  # the flavor's own size: the demo's 48 px costs ~15% more
                f"tracking.uri={tracking_uri}", "tracking.experiment=skeleton"]
        try:
            assert main(argv) == 0
        finally:
            ray.shutdown()

        # A checkpoint exists, with a manifest listing both ranks' ZeRO-3 shards.
        ckpts = sorted((tmp_path / "runs" / "skeleton" / "checkpoints").glob("step_*"))
        assert [c.name for c in ckpts] == ["step_00000015", "step_00000030"]
        manifest = json.loads((ckpts[-1] / "manifest.json").read_text())
        shards = [f for f in manifest["files"] if "zero_pp_rank" in f and "model_states" in f]
        assert len(shards) == 2
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
        assert state["step"] == 30 and state["world_size"] == 2

        # MLflow holds exactly one run with every objective's loss, and the loss went down.
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name("skeleton")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert state["mlflow_run_id"] == run.info.run_id
        for name in ("loss/mlm_text", "loss/mim", "loss/itc", "loss/mlm_pair", "loss/total"):
            assert name in run.data.metrics, name
        itc = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss/itc"),
                                       key=lambda m: m.step)]
        assert len(itc) == 30
        assert sum(itc[-5:]) / 5 < sum(itc[:5]) / 5, itc
        params = run.data.params
        assert params["model.flavor"] == "debug"
        assert params["data.weights.pair.a"] == "0.25" and params["data.weights.pair.b"] == "0.75"
        metrics = run.data.metrics
        assert (metrics["pipeline/corpus/pair/a/share"] == 0.25
                and metrics["pipeline/corpus/pair/a/weight"] == 0.25)
        assert metrics["pipeline/corpus/pair/b/samples"] == 3 * metrics["pipeline/corpus/pair/a/samples"] > 0
        # No credential reaches MLflow params or tags.
        blob = json.dumps({"params": params, "tags": run.data.tags})
        assert FAKE_AWS["AWS_SECRET_ACCESS_KEY"] not in blob and FAKE_AWS["AWS_ACCESS_KEY_ID"] not in blob
