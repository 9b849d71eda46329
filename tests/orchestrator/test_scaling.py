"""Unit tests of what the driver hands Ray Train: ScalingConfig (fixed/elastic), FailureConfig, storage, the
lock."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import driver
from trainer.config import load_config
from trainer.config_loader import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def test_fixed_size_scaling():
    cfg = load_config(DEBUG, ["scaling.num_workers=2", "scaling.cpus_per_worker=3",
                              "scaling.placement_strategy=SPREAD"])
    sc = driver.scaling_config_of(cfg)
    assert sc.num_workers == 2 and not sc.elasticity_enabled
    assert sc.resources_per_worker == {"CPU": 3} and sc.placement_strategy == "SPREAD" and not sc.use_gpu


def test_elastic_scaling_and_gpus():
    cfg = load_config(DEBUG, ["scaling.num_workers=4", "scaling.min_workers=2",
                              "train.global_micro_batches=12", "scaling.use_gpu=true"])
    sc = driver.scaling_config_of(cfg)
    assert sc.num_workers == (2, 4) and sc.elasticity_enabled
    assert sc._resources_per_worker_not_none == {"CPU": 1, "GPU": 1}


def test_min_workers_equal_to_num_workers_is_fixed():
    cfg = load_config(DEBUG, ["scaling.num_workers=2", "scaling.min_workers=2"])
    assert driver.scaling_config_of(cfg).num_workers == 2


def test_elastic_range_must_split_the_global_batch():
    with pytest.raises(ConfigError, match=r"divisible by every worker count.*not by \[3\]"):
        load_config(DEBUG, ["scaling.num_workers=4", "scaling.min_workers=3", "train.global_micro_batches=4"])
    with pytest.raises(ConfigError, match="min_workers"):
        load_config(DEBUG, ["scaling.num_workers=2", "scaling.min_workers=3"])


def test_fit_hands_ray_the_failure_policy_and_run_storage_and_holds_the_lock(tmp_path, monkeypatch):
    import orchestrator.failure_policy as policy
    import orchestrator.preflight as preflight
    import orchestrator.tracking_setup as tracking

    seen = {}

    class FakeTrainer:
        def __init__(self, fn, **kwargs):
            seen.update(kwargs)

        def fit(self):
            seen["locked_during_fit"] = (tmp_path / "runs" / "r1" / "run.lock").exists()
            return SimpleNamespace(error=None, checkpoint=None, metrics={"step": 1})

    monkeypatch.setattr(policy, "GuardedTorchTrainer", FakeTrainer)
    monkeypatch.setattr(driver, "init_ray", lambda cfg: None)
    monkeypatch.setattr(preflight, "check_cluster", lambda cfg: None)
    monkeypatch.setattr(preflight, "check_shared_sqlite", lambda uri: None)
    monkeypatch.setattr(tracking, "ensure_run", lambda *a, **k: "rid")
    monkeypatch.setattr(tracking, "finish_run", lambda *a, **k: "rid")
    cfg = load_config(DEBUG, ["run.name=r1", f"run.storage={tmp_path / 'runs'}", "scaling.max_failures=7",
                              "data.pair.urls=/x", "data.text.urls=/x", "data.image.urls=/x"])
    driver.fit(cfg, preflight=False)  # the data paths are fake
    rc = seen["run_config"]
    assert rc.failure_config.max_failures == 7
    assert rc.checkpoint_config.num_to_keep is None  # the CheckpointManager alone prunes (issue #27)
    # a worker group that cannot be placed is not retried without end (Ray's default), and after a stop
    # request no group starts again (the policy reads the STOP file)
    assert rc.failure_config.controller_failure_limit == 5
    assert seen["stop_file"] == str((tmp_path / "runs" / "r1" / "STOP").resolve())
    # the failure budget's window of progress is the newest checkpoint there
    assert seen["checkpoints_root"] == str((tmp_path / "runs" / "r1" / "checkpoints").resolve())
    assert seen["max_total_failures"] == 0
    from orchestrator.process_group import BoundStoreTorchConfig

    assert isinstance(seen["torch_config"], BoundStoreTorchConfig)  # rendezvous on the node's address
    assert rc.name == "checkpoints" and Path(rc.storage_path) == (tmp_path / "runs" / "r1").resolve()
    assert seen["scaling_config"].num_workers == 2
    assert seen["locked_during_fit"] and not (tmp_path / "runs" / "r1" / "run.lock").exists()
