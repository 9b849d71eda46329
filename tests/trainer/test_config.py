"""Unit tests of the typed config tree: defaults, YAML, dotted overrides and the errors users see."""

from pathlib import Path

import pytest

from trainer.config import RunConfig, load_config
from trainer.config_loader import ConfigError, flatten, to_dict

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_build_and_round_trip():
    cfg = RunConfig()
    assert cfg.model.flavor == "debug"
    assert [s.name for s in cfg.stages] == ["unimodal", "crossmodal"]
    from trainer.config import config_from_dict

    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.total_steps > 0
    assert cfg.train.global_micro_batches % cfg.scaling.num_workers == 0


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  flavor: debug\n  fusion: {layers: 3}\noptimizer: {lr: 0.01}\n")
    cfg = load_config(f, ["model.fusion.layers=2", "optimizer.warmup_steps=0", "run.name=x1"])
    assert cfg.model.fusion.layers == 2
    assert cfg.optimizer.lr == 0.01
    assert cfg.optimizer.warmup_steps == 0
    assert cfg.run.name == "x1"
    # fields not mentioned keep the flavor's values
    assert cfg.model.text.dim == RunConfig().model.text.dim


def test_flavor_supplies_model_defaults():
    cfg = load_config(None, ["model.flavor=small"])
    assert cfg.model.flavor == "small"
    assert cfg.model.text.layers > RunConfig().model.text.layers


def test_int_accepted_for_float_but_not_string():
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0
    # YAML 1.1 reads 5e-4 (no dot) as a string: a float field takes it as the number it is, in overrides and
    # files
    assert load_config(None, ["optimizer.lr=5e-4"]).optimizer.lr == 5e-4
    assert load_config(None, ["optimizer.weight_decay=1E-2"]).optimizer.weight_decay == 0.01
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected float, got 'fast'"):
        load_config(None, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.log_every: expected int, got '1e3'"):
        load_config(None, ["train.log_every=1e3"])  # an int field stays strict


def test_scientific_float_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 3e-4\n")
    assert load_config(str(path), []).optimizer.lr == 3e-4


@pytest.mark.parametrize("override, message", [
    ("model.fusion.layrs=2",
     r"unknown config key 'model\.fusion\.layrs'; did you mean 'model\.fusion\.layers'"),
    ("optimiser.lr=0.1", r"unknown config key 'optimiser'; did you mean 'optimizer'"),
    ("train.log_every=true", r"train\.log_every: expected int, got True"),
    ("optimizer.lr=-1", r"optimizer: lr=-1.0: must be > 0"),
    ("train.global_micro_batches=3",
     r"train\.global_micro_batches=3: must be divisible by scaling\.num_workers \(2\)"),
    ("model.flavor=huge", r"model\.flavor: unknown model flavor 'huge'; valid flavors: debug"),
    ("stages=[{name: a, steps: 0}]", r"stage 'a': steps=0: must be > 0"),
    ("stages=[{name: a, steps: 5, objectives: {itcc: 1}}]", r"unknown objective 'itcc'; did you mean 'itc'"),
    ("model.fusion.cross_layer=sideways",
     r"model\.fusion\.cross_layer: 'sideways' is not one of none, bridge"),
    ("optimizer.schedule=cosin",
     r"optimizer\.schedule: 'cosin' is not one of cosine, linear, constant; did you mean 'cosine'"),
    ("scaling.placement_strategy=ANY", r"scaling\.placement_strategy: 'ANY' is not one of PACK, SPREAD"),
    ("scaling.worker_niceness=-5", r"scaling: worker_niceness=-5: must lie in \[0, 19\]"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(None, ["model.fusion.layers"])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_stage_without_data_is_refused_before_training():
    cfg = load_config(None, ["data.text.urls="])
    with pytest.raises(ConfigError, match=r"stage 'unimodal' uses objectives on 'image' data"):
        cfg.check_ready_to_train()


def test_flatten_for_mlflow_params():
    flat = flatten(to_dict(RunConfig()))
    assert flat["model.fusion.layers"] == RunConfig().model.fusion.layers
    assert isinstance(flat["stages"], str)


def test_driver_makes_local_paths_absolute_for_workers(tmp_path, monkeypatch):
    import os

    from orchestrator.driver import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.storage=./runs", "data.pair.urls=data/pairs/shard-{0..3}.tar",
                             "data.text.urls=s3://bucket/text", "data.tokenizer=~/tok.json"])
    out = with_absolute_paths(cfg)
    assert out.run.storage == str(tmp_path / "runs")
    assert out.data.pair.urls == str(tmp_path / "data/pairs/shard-{0..3}.tar")
    assert out.data.text.urls == "s3://bucket/text"  # URLs untouched
    assert out.data.tokenizer == os.path.expanduser("~/tok.json")
    assert cfg.run.storage == "./runs"  # the caller's config is not changed
