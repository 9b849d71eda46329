"""Fixtures of the orchestrator tests: a synthetic eval set, an MLflow run and a real checkpoint of that
run."""

from __future__ import annotations

import pytest

from tests.orchestrator.checkpoints import STEP, write_checkpoint


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Synthetic eval shards + tokenizer, an MLflow run (SQLite store) and a checkpoint that run made."""
    from data_pipeline.synthetic import write_synthetic_dataset
    from orchestrator.tracking_setup import open_client

    root = tmp_path_factory.mktemp("eval")
    urls = write_synthetic_dataset(str(root / "data"), n_pairs=0, n_text=0, n_images=0, n_eval=24,
                                   samples_per_shard=12)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = open_client(uri)
    run_id = client.create_run(client.create_experiment("unimo")).info.run_id
    ckpt = write_checkpoint(root / "runs" / "exp1", urls["tokenizer"], step=STEP, run_id=run_id)
    classes = root / "classes.txt"
    classes.write_text("# the shapes of the synthetic world\ncircle\nsquare\n"
                       "triangle: a picture of a triangle\n")
    return {"data": str(root / "data" / "eval"), "ckpt": ckpt, "uri": uri, "run_id": run_id,
            "classes": str(classes), "root": root}
