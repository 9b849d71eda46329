"""Shared pytest setup: keep every service on loopback and telemetry off; GPU tests skip without a GPU."""

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# The MLflow servers the integration tests start need no job runners (as `unimo mlflow`, see
# orchestrator/cli.py).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# DeepSpeed's op builds in this environment's own folder, as the trainer and scripts/setup_env.sh use it
# (tests that start DeepSpeed without the trainer's engine builder get it too; see trainer/ds_extensions.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(__import__("sys").prefix, "torch_extensions"))


VERSIONED = ("torch", "deepspeed", "ray", "mlflow", "boto3", "botocore", "s3fs", "moto", "pyarrow", "numpy",
             "transformers")


def pytest_report_header(config):
    """The environment the tests ran in: a failure report says which releases it was."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"
    return "unimo test environment: " + ", ".join(f"{name} {v(name)}" for name in VERSIONED)


# Fixtures that start a server: a test that uses one belongs to the integration tier whatever its file says.
SERVICE_FIXTURES = {"s3_server", "s3_data", "s3_runs"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- the unit tier: no service, no subprocess --------------------------------------------------------------
# A test without the `integration` (or `gpu`) marker belongs to the fast unit tier, which must not start
# processes or servers. Rather than trusting the markers, the tier is enforced: while such a test runs (its
# fixtures included), starting a subprocess, forking, or listening on a socket raises. A test that needs any
# of them is an integration test and must say so with @pytest.mark.integration.


class UnitTierViolation(RuntimeError):
    """A test outside the integration tier started a process or a server."""


def _is_unit(item) -> bool:
    return not (item.get_closest_marker("integration") or item.get_closest_marker("gpu"))


def _refuser(item, what):
    def refuse(*args, **kwargs):
        raise UnitTierViolation(f"{item.nodeid}: a unit test {what}. Unit tests start no process or server; "
                                "mark the test @pytest.mark.integration if it needs one.")
    return refuse


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if os.environ.get("UNIMO_UNIT_GUARD", "1") == "0" or not _is_unit(item):
        yield
        return
    import _posixsubprocess
    import multiprocessing.util
    import platform
    import socket
    import subprocess

    # The standard library asks `uname -p` once per process, the first time anything reads the platform
    # (mlflow's import does): that is not the test starting a process, so it is answered before the guard goes
    # up.
    platform.platform()

    saved = [(subprocess.Popen, "_execute_child", subprocess.Popen._execute_child),
             (_posixsubprocess, "fork_exec", _posixsubprocess.fork_exec),
             (multiprocessing.util, "spawnv_passfds", multiprocessing.util.spawnv_passfds),
             (os, "fork", os.fork), (os, "posix_spawn", os.posix_spawn),
             (socket.socket, "listen", socket.socket.listen)]
    subprocess.Popen._execute_child = _refuser(item, "started a subprocess")
    _posixsubprocess.fork_exec = _refuser(item, "started a subprocess")
    multiprocessing.util.spawnv_passfds = _refuser(item, "spawned a process")
    os.fork = _refuser(item, "forked a process")
    os.posix_spawn = _refuser(item, "spawned a process")
    socket.socket.listen = _refuser(item, "listened on a socket (a server)")
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


# ---- a timeline of the run (UNIMO_TEST_TIMELINE=FILE): when each test started and ended, on which worker ---
_TIMELINE_HERE: list[bool] = []  # False in xdist's controller: its workers write the lines


def pytest_configure(config):
    _TIMELINE_HERE.append(not (getattr(config.option, "numprocesses", None)
                               and not hasattr(config, "workerinput")))


def pytest_runtest_logstart(nodeid, location):
    _timeline("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _timeline("end", nodeid)


_WORKER: list[str] = []  # this pytest worker's name, read once (a test may change os.environ)


def _timeline(event: str, nodeid: str) -> None:
    path = os.environ.get("UNIMO_TEST_TIMELINE")
    if path and _TIMELINE_HERE and _TIMELINE_HERE[0]:
        import time

        if not _WORKER:
            _WORKER.append(os.environ.get("PYTEST_XDIST_WORKER", "main"))
        with open(path, "a") as f:
            f.write(f"{time.time():.1f} {_WORKER[0]} {event} {nodeid}\n")
