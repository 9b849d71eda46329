"""Local multi-node Ray on 127.0.0.1: a head and worker nodes, each one `ray start --block` process group."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Set on every node this module starts (see docs/CLUSTER.md, "Several Ray nodes on one machine").
NODE_ENV = {
    # Without it Ray rewrites 127.0.0.1 to the machine's external address, and traffic leaves loopback.
    # (It also makes Ray's CLI refuse worker nodes; _ray_start.py works around that.)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A local node has no traffic to drain; the default makes every SIGTERM wait up to 30 s first.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    # Ray Train's controller notices a finished or failed worker group at its next poll (2 s by default);
    # the nodes of one machine run a few workers, for which a poll every 0.5 s costs nothing measurable.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray starts its workers at nice 15, for nodes that run nothing but Ray. The nodes of a local cluster
    # share one machine with whatever else runs there, and at 15 any busy process at normal priority starves
    # the training workers (scaling.worker_niceness says the same for the embedded Ray).
    "RAY_worker_niceness": "0",
}
# Inherited variables that would point a node at another cluster, or override this cluster's token
# (RAY_AUTH_TOKEN takes precedence over RAY_AUTH_TOKEN_PATH in Ray's token loader).
_SCRUBBED_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)

# Each node gets its own slice of worker ports: nodes sharing Ray's default range (10002-19999) would hand
# the same port to two core workers. Drawn below the kernel's ephemeral range, where bind(0) ports never land.
_WORKER_PORT_RANGE = (20000, 32000)
DEFAULT_WORKER_PORTS = 64
# Ray's default object store is 30% of RAM per node; several nodes on one laptop would claim it all.
DEFAULT_OBJECT_STORE_BYTES = 512 * 1024**2
DEFAULT_STATE_FILE = Path(tempfile.gettempdir()) / f"unimo_local_cluster_{os.getuid()}.json"


class LocalClusterError(RuntimeError):
    """A node failed to start or to become ready; the message carries the tail of its log."""


class _Ports:
    """Loopback ports that are free now and not yet handed to another node started by this process."""

    def __init__(self) -> None:
        self._taken: set[int] = set()

    def one(self) -> int:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
            if port not in self._taken:
                self._taken.add(port)
                return port
        raise LocalClusterError("no free loopback port found")

    def block(self, count: int) -> int:
        """First port of `count` consecutive free ports."""
        lo, hi = _WORKER_PORT_RANGE
        for _ in range(200):
            start = random.randrange(lo, hi - count)
            span = range(start, start + count)
            if not self._taken.intersection(span) and all(_port_free(p) for p in span):
                self._taken.update(span)
                return start
        raise LocalClusterError(f"no {count} consecutive free ports in {lo}-{hi}")


_PORTS = _Ports()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` and has not exited. A zombie has exited
    (its reaping is pending, and in a container whose init does not reap, may never come): it holds no port or
    memory."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 19 and fields[19] == start and fields[0] != "Z"


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below `root` (Linux /proc; empty elsewhere).

    The raylet puts each core worker in a process group of its own, so killpg on the node's group misses them;
    they are found through the parent links instead, which must be read before the leader dies and they are
    re-parented. The start time guards the later kill against a pid reused in between.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        start = _start_time(pid)
        if start is not None:
            found[pid] = start
        stack.extend(children.get(pid, []))
    return found


def _kill_listed(procs: dict[int, str], timeout: float = 5.0) -> None:
    """SIGKILL each listed process still running, then wait (bounded) until none is: a kill is not instant."""
    for pid, start in procs.items():
        if _running(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_running(pid, start) for pid, start in procs.items()) and time.monotonic() < deadline:
        time.sleep(0.05)


def _tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(kw_only=True)
class _NodeProcess:
    """One `ray start --block` leader; started in its own session, so its pid is also its process group id."""

    name: str
    pid: int
    temp_dir: str
    log_path: str
    ports: dict[str, int] = field(default_factory=dict)
    _popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return _pid_alive(self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop this node: SIGTERM its leader, wait, then SIGKILL whatever is left of its process group.

        The leader stops its raylet with SIGTERM, and a raylet that exits that way unregisters from the GCS,
        so the node shows as dead at once instead of after the GCS health checks time out.
        """
        procs = _descendants(self.pid)
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            self._wait(timeout)
        # Whatever outlived a clean exit or the timeout: the group, and core workers in groups of their own.
        _kill_group(self.pid)
        _kill_listed(procs)
        self._wait(5.0)

    def kill(self) -> None:
        """SIGKILL the node's process group and every process below it at once, as a lost machine vanishes."""
        procs = _descendants(self.pid)
        _kill_group(self.pid)
        _kill_listed(procs)
        self._wait(5.0)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=timeout)
            return
        while _pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.2)

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it would deep-copy the Popen handle.
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass(kw_only=True)
class WorkerNode(_NodeProcess):
    """A worker node; `resource` is a custom resource (1 unit) that only this node has, to pin tasks on it."""

    resource: str


@dataclass(kw_only=True)
class HeadInfo(_NodeProcess):
    """The head node and what a client needs to reach it."""

    address: str  # GCS address for ray.init(address=...) and `ray start --address`
    dashboard_url: str  # Jobs API / dashboard, for JobSubmissionClient and `ray job submit --address`
    root_dir: str  # holds every node's temp dir, logs and the token file; removed by stop_all
    auth_token: str | None  # None when started with auth=False
    token_path: str | None
    workers: list[WorkerNode] = field(default_factory=list)

    def client_env(self) -> dict[str, str]:
        """Variables for a client process (driver, Jobs client) talking to this cluster."""
        env = {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": NODE_ENV["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"],
            "RAY_USAGE_STATS_ENABLED": NODE_ENV["RAY_USAGE_STATS_ENABLED"],
            "RAY_AUTH_MODE": "token" if self.auth_token else "disabled",
        }
        if self.auth_token:
            env["RAY_AUTH_TOKEN"] = self.auth_token
        return env

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard / Jobs API (e.g. `JobSubmissionClient(url, headers=...)`)."""
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["workers"] = [w.to_dict() for w in self.workers]
        d.pop("auth_token")  # the state file points at token_path; the token itself stays in that 0600 file
        return d


def _ray_start_cmd() -> list[str]:
    # Our interpreter, so the nodes run the Ray this process would import; run as a script path, so it works
    # whatever the node's cwd and sys.path. See _ray_start.py for why it is not plain `ray start`.
    return [sys.executable, str(Path(__file__).with_name("_ray_start.py")), "start", "--block"]


def _node_env(auth: bool, token_path: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(NODE_ENV)
    # Set on every node, not only the head: `ray start --address` never turns token mode on by itself, and
    # a head left unset would silently enable it whenever ~/.ray/auth_token happens to exist.
    env["RAY_AUTH_MODE"] = "token" if auth else "disabled"
    if auth and token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    env.update(extra or {})
    return env


def _common_args(
    node_dir: Path,
    ports: dict[str, int],
    num_cpus: int,
    num_gpus: int,
    resources: dict[str, float] | None,
    object_store_memory: int,
    name: str,
) -> list[str]:
    args = [
        f"--node-ip-address={LOOPBACK}",
        f"--node-name={name}",
        f"--temp-dir={node_dir}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        f"--object-store-memory={object_store_memory}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--min-worker-port={ports['min_worker']}",
        f"--max-worker-port={ports['max_worker']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        "--disable-usage-stats",
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def _node_ports(worker_ports: int) -> dict[str, int]:
    first = _PORTS.block(worker_ports)
    ports = {
        k: _PORTS.one()
        for k in (
            "node_manager",
            "object_manager",
            "dashboard_agent_listen",
            "dashboard_agent_grpc",
            "metrics_export",
            "runtime_env_agent",
        )
    }
    ports.update(min_worker=first, max_worker=first + worker_ports - 1)
    return ports


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path, cwd: str | Path | None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        # A new session makes the leader a process-group leader: one killpg reaches what stays in its group.
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd or os.getcwd(),
        )


def _http_get_json(url: str, headers: dict[str, str], timeout: float = 5.0):
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _wait_until(predicate, node: _NodeProcess, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not node.running:
            raise LocalClusterError(
                f"{node.name} exited while waiting for {what}; log {node.log_path}:\n{_tail(node.log_path)}"
            )
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            if predicate():
                return
        time.sleep(0.5)
    raise LocalClusterError(
        f"{node.name}: timed out after {timeout:g}s waiting for {what}; log "
        f"{node.log_path}:\n{_tail(node.log_path)}"
    )


def node_states(head: HeadInfo, timeout: float = 5.0) -> list[dict]:
    """Every node the GCS knows, alive or dead, from the dashboard's state API (no `import ray` needed).

    Each dict has at least node_id, node_ip, node_name, is_head_node, state ("ALIVE" / "DEAD").
    """
    body = _http_get_json(
        f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=true", head.auth_headers(), timeout
    )
    if not body.get("result", True):
        raise LocalClusterError(f"state API error: {body.get('msg')}")
    return body["data"]["result"]["result"]


def wait_for_node_state(head: HeadInfo, name: str, state: str = "ALIVE", timeout: float = 60.0) -> dict:
    """Block until the node called `name` reports `state` ("ALIVE" or "DEAD"); returns its entry."""
    deadline = time.monotonic() + timeout
    last: list[dict] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
            last = node_states(head)
            # A restarted node may reuse a name; the newest entry is the one that counts.
            match = sorted(
                (n for n in last if n.get("node_name") == name), key=lambda n: n.get("start_time_ms") or 0
            )
            if match and match[-1].get("state") == state:
                return match[-1]
        time.sleep(0.5)
    raise LocalClusterError(f"node {name!r} did not reach {state} in {timeout:g}s; last seen: {last}")


def start_head(*args, **kwargs) -> HeadInfo:
    """Start a head node on 127.0.0.1 (see _start_head_once); a Ray start-up timeout on a busy machine is
    logged with the load and retried once (orchestrator/ray_startup.py)."""
    from orchestrator.ray_startup import with_startup_retry

    return with_startup_retry(lambda: _start_head_once(*args, **kwargs), "the local cluster's head node")


def _start_head_once(
    num_cpus: int = 1,
    *,
    num_gpus: int = 0,
    resources: dict[str, float] | None = None,
    auth: bool = True,
    auth_token: str | None = None,
    root_dir: str | Path | None = None,
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    worker_ports: int = DEFAULT_WORKER_PORTS,
    ready_timeout: float = 90.0,
    extra_env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> HeadInfo:
    """Start a head node on 127.0.0.1 with free ports and a fresh temp dir; returns once its raylet is ALIVE.

    Job entrypoints submitted to this cluster run in `cwd` (default: the current directory), as they run in
    the directory where `ray start` was run.

    auth=True (the default) runs the cluster in token mode with `auth_token` (a new random one if None),
    written to a 0600 file under root_dir and handed to every node through RAY_AUTH_TOKEN_PATH, so
    ~/.ray/auth_token, which other Ray instances on this machine may read, is neither read nor written.
    """
    if root_dir is None:
        # Short on purpose: Ray's unix sockets live under it, and socket paths are capped at 107 bytes.
        root = Path(tempfile.mkdtemp(prefix=f"ray_lc_{os.getpid()}_", dir="/tmp"))
    else:
        root = Path(root_dir)
        root.mkdir(parents=True, exist_ok=True)
    token_path = None
    if auth:
        auth_token = auth_token or secrets.token_hex(32)
        token_path = root / "auth_token"
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(auth_token)
    else:
        auth_token = None
    node_dir = root / "head"
    node_dir.mkdir(exist_ok=True)
    ports = _node_ports(worker_ports)
    ports.update(
        {
            k: _PORTS.one()
            for k in ("gcs", "dashboard", "ray_client_server", "autoscaler_metrics", "dashboard_metrics")
        }
    )
    cmd = (
        _ray_start_cmd()
        + [
            "--head",
            f"--port={ports['gcs']}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['ray_client_server']}",
        ]
        + _common_args(node_dir, ports, num_cpus, num_gpus, resources, object_store_memory, "lc-head")
    )
    # These two have no `ray start` flag; their fixed defaults (44217, 44227) would clash between clusters.
    env = _node_env(
        auth,
        str(token_path) if token_path else None,
        {
            "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]),
            "DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
            **(extra_env or {}),
        },
    )
    log_path = root / "head.log"
    proc = _spawn(cmd, env, log_path, cwd)
    head = HeadInfo(
        name="lc-head",
        pid=proc.pid,
        temp_dir=str(node_dir),
        log_path=str(log_path),
        ports=ports,
        _popen=proc,
        address=f"{LOOPBACK}:{ports['gcs']}",
        dashboard_url=f"http://{LOOPBACK}:{ports['dashboard']}",
        root_dir=str(root),
        auth_token=auth_token,
        token_path=str(token_path) if token_path else None,
    )
    try:
        # gcs_healthz is one of the dashboard's public paths, so this works before the token is proven; the
        # node-list call that follows is authenticated and checks the token end to end.
        _wait_until(lambda: _dashboard_healthy(head), head, ready_timeout, "the dashboard")
        _wait_until(
            lambda: any(n.get("state") == "ALIVE" for n in node_states(head)),
            head,
            ready_timeout,
            "the head raylet",
        )
    except BaseException:
        stop_all(head)
        raise
    return head


def _dashboard_healthy(head: HeadInfo) -> bool:
    req = urllib.request.Request(f"{head.dashboard_url}/api/gcs_healthz")
    with urllib.request.urlopen(req, timeout=2.0) as resp:
        return resp.status == 200


def add_worker(head: HeadInfo, *args, **kwargs) -> WorkerNode:
    """Start a worker node that joins `head` (see _add_worker_once); a Ray start-up timeout on a busy machine
    is logged with the load and retried once."""
    from orchestrator.ray_startup import with_startup_retry

    return with_startup_retry(lambda: _add_worker_once(head, *args, **kwargs), "a local cluster worker node")


def _add_worker_once(
    head: HeadInfo,
    num_cpus: int = 1,
    *,
    num_gpus: int = 0,
    resources: dict[str, float] | None = None,
    name: str | None = None,
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    worker_ports: int = DEFAULT_WORKER_PORTS,
    ready_timeout: float = 90.0,
    extra_env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> WorkerNode:
    """Start a worker node that joins `head`; returns once the GCS lists it ALIVE.

    The node is named `name` (default lc-worker-<n>) and owns one unit of a custom resource of the same
    name with '-' turned into '_', so a test can place work on it and later stop exactly that node.
    """
    index = len(head.workers) + 1
    name = name or f"lc-worker-{index}"
    resource = name.replace("-", "_")
    node_dir = Path(head.root_dir) / f"w{index}"
    node_dir.mkdir(exist_ok=True)
    ports = _node_ports(worker_ports)
    cmd = (
        _ray_start_cmd()
        + [f"--address={head.address}"]
        + _common_args(
            node_dir,
            ports,
            num_cpus,
            num_gpus,
            {**(resources or {}), resource: 1.0},
            object_store_memory,
            name,
        )
    )
    env = _node_env(head.auth_token is not None, head.token_path, extra_env)
    log_path = Path(head.root_dir) / f"{name}.log"
    proc = _spawn(cmd, env, log_path, cwd)
    worker = WorkerNode(
        name=name,
        pid=proc.pid,
        temp_dir=str(node_dir),
        log_path=str(log_path),
        ports=ports,
        _popen=proc,
        resource=resource,
    )
    head.workers.append(worker)
    try:
        _wait_until(
            lambda: any(n.get("node_name") == name and n.get("state") == "ALIVE" for n in node_states(head)),
            worker,
            ready_timeout,
            "registration with the GCS",
        )
    except BaseException:
        worker.stop()
        head.workers.remove(worker)  # a retry (add_worker) must not find the failed node in the list
        raise
    return worker


def stop_all(head: HeadInfo, *, remove: bool = True, timeout: float = 20.0) -> None:
    """Stop every worker node, then the head; remove root_dir (temp dirs, logs, token) unless remove=False."""
    for worker in reversed(head.workers):
        worker.stop(timeout)
    head.stop(timeout)
    if remove:
        shutil.rmtree(head.root_dir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(
    workers: int = 1, head_cpus: int = 1, worker_cpus: int = 1, **head_kwargs
) -> Iterator[HeadInfo]:
    """A head plus `workers` worker nodes for the duration of a with-block; always torn down."""
    head = start_head(head_cpus, **head_kwargs)
    try:
        for _ in range(workers):
            add_worker(head, worker_cpus)
        yield head
    finally:
        stop_all(head)


# ---- CLI: the nodes outlive the command; a JSON state file lets `down` find them again. ----


def _looks_like_ours(pid: int, temp_dir: str) -> bool:
    """Guard against a stale state file: only signal a pid still running `ray start` on our temp dir."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "start" in cmdline and temp_dir in cmdline


def _head_from_state(state: dict) -> HeadInfo:
    workers = [WorkerNode(**w) for w in state.pop("workers", [])]
    token = (
        Path(state["token_path"]).read_text()
        if state.get("token_path") and Path(state["token_path"]).exists()
        else None
    )
    return HeadInfo(**state, auth_token=token, workers=workers)


def _env_lines(head: HeadInfo) -> list[str]:
    env = head.client_env()
    if head.token_path:
        # Point at the file rather than print the token into a terminal or shell history.
        env.pop("RAY_AUTH_TOKEN")
        env["RAY_AUTH_TOKEN_PATH"] = head.token_path
    env["RAY_ADDRESS"] = head.address
    env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
    return [f"export {k}={v}" for k, v in env.items()]


def _cmd_up(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if _pid_alive(old["pid"]) and _looks_like_ours(old["pid"], old["temp_dir"]):
            print(f"a local cluster is already up ({old['address']}); run `down` first", file=sys.stderr)
            return 1
    head = start_head(args.head_cpus, auth=not args.no_auth)
    try:
        for _ in range(args.workers):
            add_worker(head, args.worker_cpus)
    except BaseException:
        stop_all(head)
        raise
    state_file.write_text(json.dumps(head.to_dict(), indent=2))
    print(
        f"# head {head.address}, dashboard {head.dashboard_url}, {args.workers} worker node(s); "
        f"logs in {head.root_dir}; state in {state_file}"
    )
    print("\n".join(_env_lines(head)))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if not state_file.exists():
        print(f"no state file at {state_file}; nothing to stop", file=sys.stderr)
        return 0
    head = _head_from_state(json.loads(state_file.read_text()))
    for node in [*reversed(head.workers), head]:
        if _looks_like_ours(node.pid, node.temp_dir):
            node.stop()
    shutil.rmtree(head.root_dir, ignore_errors=True)
    state_file.unlink()
    print(f"stopped {1 + len(head.workers)} node(s)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state_file = Path(args.state)
    if not state_file.exists():
        print("down")
        return 1
    head = _head_from_state(json.loads(state_file.read_text()))
    for n in node_states(head):
        print(f"{n.get('node_name', '?'):16} {n['state']:6} {n['node_ip']:15} {n['node_id']}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    print("\n".join(_env_lines(_head_from_state(json.loads(Path(args.state).read_text())))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__)
    parser.add_argument("--state", default=str(DEFAULT_STATE_FILE), help="state file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes on 127.0.0.1; prints env exports")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--worker-cpus", type=int, default=1)
    up.add_argument("--no-auth", action="store_true", help="run without token authentication")
    up.set_defaults(func=_cmd_up)
    sub.add_parser("down", help="stop the nodes in the state file").set_defaults(func=_cmd_down)
    sub.add_parser("status", help="list the cluster's nodes").set_defaults(func=_cmd_status)
    sub.add_parser("env", help="print env exports for clients").set_defaults(func=_cmd_env)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
