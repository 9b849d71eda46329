"""The objective registry: each entry names a real source, loss, FLOPs head and batch parts the loader builds,
and the tables that used to be written by hand (config, loader, objectives, metrics, FLOPs) follow it."""

from __future__ import annotations

import pytest

from model import losses
from model.flavors import get_flavor
from model.flops import flops_per_sample
from model.objective_registry import OBJECTIVES, SOURCES, heads_of, names_of


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_names_a_real_source_loss_head_and_parts(name):
    from data_pipeline.batch import ALL_FEATURES, features_for

    o = OBJECTIVES[name]
    assert o.source in SOURCES and o.metric == f"loss/{name}"
    assert callable(getattr(losses, o.loss)), f"{name}: model/losses.py has no {o.loss}"
    assert o.head in heads_of(o.source)
    assert flops_per_sample(get_flavor("debug"), o.source, seq_len=16, objectives=[o.head]) > 0
    assert o.batch_parts <= ALL_FEATURES and features_for([name]) == o.batch_parts


def test_config_stages_and_the_trainer_follow_the_registry():
    from trainer.config import StageConfig
    from trainer.objectives import PAIR_OBJECTIVES, TEXT_OBJECTIVES

    assert TEXT_OBJECTIVES == names_of("text") and PAIR_OBJECTIVES == names_of("pair")
    stage = StageConfig(name="s", steps=1, objectives={n: 1.0 for n in OBJECTIVES})
    assert stage.sources() == set(SOURCES)
    with pytest.raises(ValueError, match="unknown objective 'itcc'.*itc"):
        StageConfig(name="s", steps=1, objectives={"itcc": 1.0})
