"""`unimo train`: a scaling.address that cannot be joined is an error naming it and what to check."""

from __future__ import annotations

import pytest

from orchestrator.driver import init_ray
from trainer.config import load_config


def init_error(monkeypatch, address: str, ray_says: str) -> str:
    """init_ray's error when Ray refuses ``address`` with the text ``ray_says``."""
    import ray

    def refuse(*args, **kwargs):
        raise ConnectionError(ray_says)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(RuntimeError) as err:
        init_ray(load_config(None, [f"scaling.address={address}"]))
    return str(err.value)


def test_unreachable_cluster_address_is_named(monkeypatch):
    msg = init_error(monkeypatch, "10.9.8.7:6379", "Could not find any running Ray instance")
    assert "cannot reach the Ray cluster at 10.9.8.7:6379" in msg
    assert "head is running" in msg and "RAY_AUTH_TOKEN" in msg


def test_the_error_carries_no_secret(monkeypatch):
    """Ray's own text can echo credentials (a token in the environment, user:password in an address)."""
    token = "tok-0123456789abcdef"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    address = "ray://admin:hunter2pass@10.9.8.7:10001"
    msg = init_error(monkeypatch, address, f"authentication failed for token {token} at {address}")
    assert "10.9.8.7:10001" in msg
    assert token not in msg and "hunter2pass" not in msg
