"""Ray start-up on a busy machine: Ray's own start-up timeout is retried once, with the load and what to
do."""

import logging

import pytest

from orchestrator.ray_startup import busy_advice, is_startup_timeout, with_startup_retry

RAY_TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet "
               "failed to startup or the GCS has become overloaded.")


def flaky(failures: list[Exception]):
    calls = []

    def start():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "started"
    return start, calls


def test_a_start_up_timeout_is_retried_once_and_said(caplog):
    start, calls = flaky([Exception(RAY_TIMEOUT)])
    cleaned = []
    with caplog.at_level(logging.WARNING, logger="unimo.ray"):
        assert with_startup_retry(start, "the embedded Ray", cleanup=lambda: cleaned.append(1)) == "started"
    assert len(calls) == 2 and cleaned == [1]
    line = caplog.records[-1].getMessage()
    assert "the embedded Ray timed out" in line and "load average" in line and "machine is busy" in line


def test_a_second_timeout_is_raised():
    start, calls = flaky([Exception(RAY_TIMEOUT), Exception(RAY_TIMEOUT)])
    with pytest.raises(Exception, match="timed out during startup"):
        with_startup_retry(start, "x")
    assert len(calls) == 2


def test_other_start_up_errors_are_not_retried():
    start, calls = flaky([ValueError("num_cpus must be > 0")])
    with pytest.raises(ValueError):
        with_startup_retry(start, "x")
    assert len(calls) == 1


def test_what_counts_as_a_start_up_timeout():
    assert is_startup_timeout(RAY_TIMEOUT)
    assert is_startup_timeout("lc-node-b exited while waiting for registration with the GCS; log ...")
    assert not is_startup_timeout("address already in use")
    assert "Retrying once" in busy_advice("the head")
