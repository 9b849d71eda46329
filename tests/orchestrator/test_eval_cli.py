"""`unimo eval` driven through the real CLI on the synthetic data set and a real ZeRO-3 checkpoint (and its
export): retrieval, zero-shot classification, captions, JSON, MLflow logging at the checkpoint's step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from tests.orchestrator.checkpoints import STEP
from trainer import evaluation
from trainer.checkpoint import MANIFEST

# Integration tier: a real ZeRO-3 checkpoint written by a child process (tests/orchestrator/checkpoints.py).
pytestmark = pytest.mark.integration

pytest.importorskip("deepspeed")
RETRIEVAL = [f"eval/{d}_R@{k}" for d in ("i2t", "t2i", "itm_i2t", "itm_t2i") for k in (1, 5, 10)]


def run_json(capsys, *argv) -> dict:
    rc = main(["eval", *map(str, argv), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert out.out.lstrip().startswith("{"), out.out[:2000]
    return json.loads(out.out)


def test_eval_checkpoint_reports_what_trainer_evaluation_computes(world, capsys):
    from data_pipeline.loader import build_eval_pairs
    from trainer.export import load_model

    out = run_json(capsys, world["ckpt"], "--data", world["data"], "--rerank", 3, "--captions", 2)
    assert out["kind"] == "checkpoint" and out["step"] == STEP
    m = out["metrics"]
    assert m["eval/candidates"] == 24 and m["eval/texts"] > 24  # every image once, all of its captions
    assert all(0.0 <= m[k] <= 1.0 for k in RETRIEVAL)
    assert [c["key"] for c in out["captions"]] == ["shard-000000/000000000", "shard-000000/000000001"]
    assert all(isinstance(c["caption"], str) and c["reference"] for c in out["captions"])

    # the same figures as trainer.evaluation on the checkpoint's weights (what training logs as eval/*)
    loaded = load_model(world["ckpt"])
    es = build_eval_pairs(world["data"], seq_len=32, image_size=loaded.model.cfg.vision.image_size,
                          tokenizer=loaded.tokenizer)
    expected = evaluation.retrieval_metrics(loaded.model.eval(),
                                            {k: v for k, v in es.items() if isinstance(v, torch.Tensor)}, 3)
    assert {k: m[k] for k in expected} == pytest.approx(expected)


def test_eval_table_zero_shot_from_captions_and_from_a_json_field(world, capsys):
    argv = ["eval", str(world["ckpt"]), "--data", world["data"], "--classes", world["classes"],
            "--captions", "1"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "image->text  ITC" in table and "R@10" in table and "ITM" not in table  # no --rerank, no ITM rows
    assert "zero-shot classification: 3 classes, 24 labelled images" in table
    assert "top-1" in table and "sample captions:" in table

    by_field = run_json(capsys, world["ckpt"], "--data", world["data"], "--classes", world["classes"],
                        "--label-field", "tags", "--captions", 0)["metrics"]
    assert by_field["eval/zeroshot_images"] == 24 and by_field["eval/zeroshot_classes"] == 3
    assert 0.0 <= by_field["eval/zeroshot_top1"] <= by_field["eval/zeroshot_top5"] == 1.0  # 3 classes < 5
    # a field no class matches leaves every image out, and says so
    none = run_json(capsys, world["ckpt"], "--data", world["data"], "--classes", world["classes"],
                    "--label-field", "id", "--captions", 0)["metrics"]
    assert none["eval/zeroshot_images"] == 0 and none["eval/zeroshot_unlabelled"] == 24
    assert "eval/zeroshot_top1" not in none


def test_eval_of_an_export_equals_eval_of_its_checkpoint(world, capsys, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(world["ckpt"]), str(out)]) == 0
    capsys.readouterr()
    a = run_json(capsys, world["ckpt"], "--data", world["data"], "--captions", 2)
    b = run_json(capsys, out, "--data", world["data"], "--captions", 2)
    assert b["kind"] == "export" and b["step"] == STEP
    assert b["metrics"] == pytest.approx(a["metrics"]) and b["captions"] == a["captions"]


def test_eval_mlflow_logs_to_the_run_that_made_the_checkpoint_at_its_step(world, capsys, tmp_path):
    from orchestrator.tracking_setup import open_client

    assert main(["eval", str(world["ckpt"]), "--data", world["data"], "--mlflow", "--tracking-uri",
                 world["uri"], "--classes", world["classes"], "--captions", "2"]) == 0
    client = open_client(world["uri"])
    history = client.get_metric_history(world["run_id"], "offline_eval/i2t_R_at_1")
    assert [h.step for h in history] == [STEP]
    assert client.get_metric_history(world["run_id"], "offline_eval/zeroshot_top1")[0].step == STEP
    files = {f.path for f in client.list_artifacts(world["run_id"], f"offline_eval/step_{STEP:08d}")}
    assert files == {f"offline_eval/step_{STEP:08d}/{n}"
                     for n in ("table.txt", "results.json", "captions.tsv")}
    table = Path(client.download_artifacts(world["run_id"], f"offline_eval/step_{STEP:08d}/table.txt",
                                           tmp_path))
    assert "zero-shot classification" in table.read_text()

    # an export has no run of its own: a new, finished run in the named experiment gets the figures
    out = tmp_path / "export"
    assert main(["export", str(world["ckpt"]), str(out)]) == 0
    assert main(["eval", str(out), "--data", world["data"], "--mlflow", "--tracking-uri", world["uri"],
                 "--experiment", "offline", "--captions", "0"]) == 0
    experiment = client.get_experiment_by_name("offline")
    # MLflow's model-training view
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["unimo.eval_of"] == str(out) and runs[0].data.tags["unimo.step"] == str(STEP)
    assert [h.step for h in client.get_metric_history(runs[0].info.run_id, "offline_eval/t2i_R_at_5")] == \
        [STEP]


def test_eval_of_a_checkpoint_and_data_on_s3_equals_the_local_eval(world, capsys):
    from tests.integration.services import s3_server, upload_folder

    local = run_json(capsys, world["ckpt"], "--data", world["data"], "--captions", 1)
    with s3_server():
        capsys.readouterr()  # moto's start-up line on stdout is not the command's
        upload_folder(world["ckpt"], "ckpts", "runs/exp1/checkpoints/" + world["ckpt"].name)
        upload_folder(Path(world["data"]), "data", "eval")
        remote = run_json(capsys, f"s3://ckpts/runs/exp1/checkpoints/{world['ckpt'].name}", "--data",
                          "s3://data/eval", "--captions", 1)
    assert remote["source"].startswith("s3://ckpts/") and remote["step"] == STEP
    assert remote["metrics"] == pytest.approx(local["metrics"]) and remote["captions"] == local["captions"]


def test_eval_refuses_a_torn_checkpoint_and_a_missing_tokenizer(world, capsys, tmp_path):
    torn = tmp_path / "step_torn"
    shutil.copytree(world["ckpt"], torn)
    (torn / MANIFEST).unlink()
    assert main(["eval", str(torn), "--data", world["data"]]) == 1
    assert "neither a checkpoint" in capsys.readouterr().err
    assert main(["eval", str(world["ckpt"]), "--data", world["data"], "--tokenizer",
                 str(tmp_path / "no.json")]) == 1
    err = capsys.readouterr().err
    assert "no.json" in err and "--tokenizer" in err

