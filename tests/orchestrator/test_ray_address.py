"""B12 for `unimo train`: a scaling.address that cannot be joined is an error naming it and what to check."""

from __future__ import annotations

import pytest

from orchestrator.driver import init_ray
from trainer.config import load_config


def test_unreachable_cluster_address_is_named(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    cfg = load_config(None, ["scaling.address=10.9.8.7:6379"])
    with pytest.raises(RuntimeError) as err:
        init_ray(cfg)
    msg = str(err.value)
    assert "cannot reach the Ray cluster at 10.9.8.7:6379" in msg
    assert "head is running" in msg and "RAY_AUTH_TOKEN" in msg
