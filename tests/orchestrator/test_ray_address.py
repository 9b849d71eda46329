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


def test_the_error_carries_no_secret(monkeypatch):
    """Ray's own text can echo credentials (a token in the environment, user:password in an address)."""
    import ray

    token = "tok-0123456789abcdef"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)

    def refuse(*args, **kwargs):
        raise ConnectionError(f"authentication failed for token {token} at ray://admin:hunter2pass@10.9.8.7:10001")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    cfg = load_config(None, ["scaling.address=ray://admin:hunter2pass@10.9.8.7:10001"])
    with pytest.raises(RuntimeError) as err:
        init_ray(cfg)
    msg = str(err.value)
    assert "10.9.8.7:10001" in msg
    assert token not in msg and "hunter2pass" not in msg
