"""Every config field is documented where it is declared, and `unimo config show NAME --doc` prints it."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from trainer import shipped_configs
from trainer.config import RunConfig, load_config
from trainer.config_docs import ambiguous_comments, field_docs, render, undocumented
from trainer.config_loader import to_dict


def _config_classes(cls: type, seen: set | None = None) -> list[type]:
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    out = [cls]
    for tp in typing.get_type_hints(cls).values():
        for inner in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(inner):
                out += _config_classes(inner, seen)
    return out


def test_every_field_of_the_tree_is_documented_without_ambiguity():
    assert undocumented(RunConfig) == []
    assert [a for cls in _config_classes(RunConfig) for a in ambiguous_comments(cls)] == []


def test_docs_come_from_comments_above_beside_and_from_the_class_docstring():
    from data_pipeline.config import CorpusConfig
    from trainer.config import CheckpointConfig, TrackingConfig

    assert field_docs(CheckpointConfig)["keep_every"].startswith("additionally keep every M-th")  # beside
    assert field_docs(CheckpointConfig)["upload_attempts"].startswith("Tries per S3 request")  # above
    assert "relative to the other corpora" in field_docs(CorpusConfig)["weight"]  # the class docstring
    # two lines above
    assert field_docs(TrackingConfig)["log_model"].endswith("MLflow logged model of the run")


@pytest.mark.parametrize("name", shipped_configs.shipped_names())
def test_the_documented_print_is_the_resolved_config(name):
    cfg = load_config(name, [])
    text = render(cfg)
    # the same tree, comments aside
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    keys = [line for line in text.splitlines() if ":" in line.split("#")[0]]
    undocumented_lines = [line for line in keys if "  # " not in line]
    assert not undocumented_lines, undocumented_lines[:5]


def test_cli_prints_the_documented_config(capsys):
    from orchestrator.cli import main

    assert main(["config", "show", "debug", "optimizer.lr=0.01", "--doc"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.01  # peak learning rate" in out
    assert "  schedule: cosine  # cosine | linear | constant" in out
