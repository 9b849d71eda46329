"""cluster/local_cluster.py: env/token plumbing without Ray, then real head and worker nodes on loopback."""

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import local_cluster as lc

ROOT = Path(__file__).resolve().parents[2]


def run_driver(head: lc.HeadInfo, code: str, timeout: float = 90) -> str:
    """Run `code` in a fresh interpreter with the cluster's client env; a driver in this process would leave
    Ray's per-process state (auth mode, global worker) behind for other tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    env.update(head.client_env())
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


# ---- without Ray processes ----


def test_ports_are_distinct_free_and_worker_ranges_contiguous():
    ports = lc._Ports()
    singles = [ports.one() for _ in range(20)]
    assert len(set(singles)) == 20
    first = ports.block(16)
    span = set(range(first, first + 16))
    assert not span & set(singles)
    assert lc._WORKER_PORT_RANGE[0] <= first and first + 16 <= lc._WORKER_PORT_RANGE[1]
    second = ports.block(16)
    assert not span & set(range(second, second + 16))


def test_node_env_scrubs_inherited_ray_settings(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "inherited-token-would-win-over-the-path")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    env = lc._node_env(True, "/tmp/x/auth_token")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/tmp/x/auth_token"
    assert "RAY_AUTH_TOKEN" not in env and "RAY_ADDRESS" not in env
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    off = lc._node_env(False, None)
    assert off["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in off


def test_head_info_client_env_headers_and_state_without_token():
    head = lc.HeadInfo(
        name="lc-head",
        pid=1,
        temp_dir="/t/head",
        log_path="/t/head.log",
        address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:2",
        root_dir="/t",
        auth_token="abc",
        token_path="/t/auth_token",
    )
    assert head.client_env()["RAY_AUTH_MODE"] == "token" and head.client_env()["RAY_AUTH_TOKEN"] == "abc"
    assert head.auth_headers() == {"Authorization": "Bearer abc"}
    state = json.loads(json.dumps(head.to_dict()))
    assert "auth_token" not in state and state["token_path"] == "/t/auth_token"
    open_head = lc.HeadInfo(
        name="h",
        pid=1,
        temp_dir="",
        log_path="",
        address="",
        dashboard_url="",
        root_dir="",
        auth_token=None,
        token_path=None,
    )
    assert open_head.client_env()["RAY_AUTH_MODE"] == "disabled" and open_head.auth_headers() == {}


@pytest.mark.integration
def test_module_imports_neither_torch_nor_ray():
    code = "import sys, cluster.local_cluster; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_ray_start_wrapper_flips_only_the_cli_view_of_the_loopback_flag():
    # Pins the Ray internals _ray_start.py relies on: a Ray upgrade that moves them fails here, not in a run.
    code = """
        import runpy, sys
        runpy.run_path("cluster/_ray_start.py", run_name="not_main")
        import ray._private.ray_constants as rc, ray._private.services as services
        import ray.scripts.scripts as scripts
        assert rc.ENABLE_RAY_CLUSTER is False, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is no longer read"
        assert scripts.ray_constants.ENABLE_RAY_CLUSTER is True
        assert services.get_node_ip_address() == "127.0.0.1"
        print("ok")
    """
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_cli_down_without_state_is_a_no_op(tmp_path, capsys):
    assert lc.main(["--state", str(tmp_path / "none.json"), "down"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        lc.main(["--help"])
    assert exit_info.value.code == 0


# ---- real nodes ----


@pytest.fixture
def head(request):
    pytest.importorskip("ray")
    node = lc.start_head(num_cpus=1)
    # A finalizer rather than code after `yield`: it runs whatever the test raised.
    request.addfinalizer(lambda: lc.stop_all(node))
    return node


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_head_and_worker_on_loopback_then_the_worker_dies(head):
    started = time.monotonic()
    worker = lc.add_worker(head, num_cpus=1)
    assert Path(worker.temp_dir).is_dir() and worker.temp_dir != head.temp_dir

    nodes = json.loads(
        run_driver(
            head,
            f"""
        import json, ray
        ray.init(address={head.address!r}, log_to_driver=False)
        @ray.remote(num_cpus=1, resources={{{worker.resource!r}: 1}})
        def where():
            import os
            return ray.get_runtime_context().get_node_id(), os.nice(0)
        node, nice = ray.get(where.remote())
        print(json.dumps({{"nodes": ray.nodes(), "task_node": node, "nice": nice}}))
    """,
        )
    )
    alive = [n for n in nodes["nodes"] if n["Alive"]]
    assert len(alive) == 2
    assert {n["NodeManagerAddress"] for n in nodes["nodes"]} == {"127.0.0.1"}
    by_name = {n["NodeName"]: n for n in alive}
    assert by_name.keys() == {"lc-head", worker.name}
    assert nodes["task_node"] == by_name[worker.name]["NodeID"]  # the custom resource pins work to that node
    assert nodes["nice"] == 0, "a local node's workers run at Ray's nice 15 (NODE_ENV: RAY_worker_niceness)"

    children = lc._descendants(worker.pid)
    worker.stop()
    assert not worker.running
    assert not [pid for pid, start in children.items() if lc._running(pid, start)], (
        "processes left behind"
    )
    dead = lc.wait_for_node_state(head, worker.name, "DEAD", timeout=30)
    assert dead["node_ip"] == "127.0.0.1"
    after = json.loads(
        run_driver(
            head,
            f"""
        import json, ray
        ray.init(address={head.address!r}, log_to_driver=False)
        print(json.dumps({{n["NodeName"]: n["Alive"] for n in ray.nodes()}}))
    """,
        )
    )
    assert after == {"lc-head": True, worker.name: False}
    assert time.monotonic() - started < 90


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_jobs_api_needs_the_token_and_runs_in_the_start_directory(head):
    url = f"{head.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url, timeout=10)
    assert missing.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(
            urllib.request.Request(url, headers={"Authorization": "Bearer nope"}), timeout=10
        )
    assert wrong.value.code == 403
    # What a client such as `unimo submit` does: only RAY_AUTH_MODE / RAY_AUTH_TOKEN in its environment.
    result = json.loads(
        run_driver(
            head,
            f"""
        import json, time
        from ray.job_submission import JobSubmissionClient
        client = JobSubmissionClient({head.dashboard_url!r})
        job = client.submit_job(entrypoint="echo CWD=$(pwd)")
        deadline = time.time() + 60
        # The log can trail the status by a moment.
        while time.time() < deadline and not (client.get_job_status(job).is_terminal()
                                              and "CWD=" in client.get_job_logs(job)):
            time.sleep(0.5)
        print(json.dumps({{"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job)}}))
    """,
        )
    )
    assert result["status"].endswith("SUCCEEDED"), result
    # Entrypoints run where `ray start` ran: the reason the image's WORKDIR holds configs/.
    assert f"CWD={os.getcwd()}\n" in result["logs"], result["logs"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_cli_up_status_down(tmp_path):
    pytest.importorskip("ray")
    state = tmp_path / "state.json"
    cli = [sys.executable, "-m", "cluster.local_cluster", "--state", str(state)]
    try:
        up = subprocess.run(
            cli + ["up", "--workers", "1"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=150
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert "export RAY_AUTH_TOKEN_PATH=" in up.stdout and "export RAY_ADDRESS=127.0.0.1:" in up.stdout
        saved = json.loads(state.read_text())
        assert "auth_token" not in saved and oct(os.stat(saved["token_path"]).st_mode & 0o777) == "0o600"
        # The nodes outlived the `up` process.
        status = subprocess.run(
            cli + ["status"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0 and status.stdout.count("ALIVE") == 2, status.stdout + status.stderr
    finally:
        down = subprocess.run(
            cli + ["down"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=90
        )
    assert down.returncode == 0, down.stderr
    pids = [saved["pid"]] + [w["pid"] for w in saved["workers"]]
    assert not any(lc._pid_alive(pid) for pid in pids)
    assert not state.exists() and not Path(saved["root_dir"]).exists()
