"""Real services on loopback for integration tests: moto's S3 server and an MLflow tracking server."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEUNIMOTEST000",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-unimo-do-not-leak-0123456789",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# Ports for the servers the tests start. Not the kernel's pick (bind to port 0): that comes from the ephemeral
# range, where every outgoing connection also takes its source port, so a port freed here could be taken by a
# client before the server binds it. Above that range (Linux: 32768-60999) only servers that name their port
# bind (Ray's worker ports are 10002-19999, cluster/local_cluster.py's blocks 20000-32000). A reservation file
# per port keeps two pytest workers (or processes) from handing out the same one; reservations older than
# PORT_LEASE_S are reused.
PORT_RANGE = (61000, 65500)
PORT_LEASE_S = 900
PORT_DIR = Path(tempfile.gettempdir()) / "unimo-test-ports"


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and reserved for this caller among the test processes."""
    PORT_DIR.mkdir(exist_ok=True)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(2000):
        port = rng.randrange(*PORT_RANGE)
        if not _reserve(port):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use by something outside the tests: keep the reservation, try another
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE} (reservations in {PORT_DIR})")


def _reserve(port: int) -> bool:
    path = PORT_DIR / str(port)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime < PORT_LEASE_S:
                return False
            path.unlink()
        except FileNotFoundError:
            pass
        return _reserve_once(path)
    os.close(fd)
    return True


def _reserve_once(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def wildcard_listeners(root_pid: int) -> list[str]:
    """Sockets that ``root_pid`` or any of its descendants listens on at every interface (0.0.0.0 or ::),
    as "process name: address" - a server reachable from whatever network reaches the machine."""
    import psutil

    root = psutil.Process(root_pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except psutil.Error:  # ended meanwhile
            continue
        found += [f"{name} (pid {proc.pid}): {c.laddr.ip}:{c.laddr.port}" for c in conns
                  if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("0.0.0.0", "::")]
    return found


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s")
            time.sleep(0.3)


class S3Server:
    """moto's S3 server on 127.0.0.1; stop() and start() again on the same port keep the stored objects (an
    outage, for the retry tests)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self):
        if self._server is not None:
            self._server.stop()
            self._server = None


@contextmanager
def s3_server():
    """moto's threaded S3 server on 127.0.0.1 with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with aws_env(endpoint):
            yield endpoint
    finally:
        server.stop()


@contextmanager
def aws_env(endpoint: str):
    """FAKE_AWS credentials and AWS_ENDPOINT_URL=endpoint in the environment; the previous values restored."""
    old = {k: os.environ.get(k) for k in [*FAKE_AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def mlflow_server(workdir: Path, port: int | None = None):
    """An MLflow tracking server (SQLite backend, local artifacts) on 127.0.0.1."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"]
    log = open(workdir / "mlflow-server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120)
        yield uri
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def upload_folder(local: Path, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


class MlflowServer:
    """An MLflow tracking server on 127.0.0.1 (SQLite backend ``<workdir>/mlflow.db``, local artifacts) that
    can be killed outright (a crash, not a graceful stop) and started again on the same port over the same
    database: an outage that loses nothing the server had stored."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port, self.proc = workdir, port or free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", str(self.workdir / "mlflow-artifacts"), "--workers", "1"]
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        with open(self.workdir / "mlflow-server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        wait_http(f"{self.uri}/health", timeout=timeout)
        return self

    def kill(self) -> None:
        """SIGKILLs the server's whole process group (its gunicorn/uvicorn workers too)."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.proc = None


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted at a fresh short folder under /tmp (a short path: the trainer's
    TMPDIR holds unix sockets, whose paths are capped at 107 bytes), which ``fill`` makes nearly full with a
    file of its own and ``free`` empties again. Mounting needs root or CAP_SYS_ADMIN: ``mount`` raises
    OSError with the reason where that is missing."""

    def __init__(self, size: int):
        self.size = size
        self.path: Path | None = None

    def mount(self) -> SmallDisk:
        path = Path(tempfile.mkdtemp(prefix="ucd-", dir="/tmp"))
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            path.rmdir()
            raise OSError(f"cannot mount a tmpfs at {path}: {(done.stderr or done.stdout).strip()}")
        self.path = path
        return self

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def fill(self, leave: int) -> int:
        """Writes a filler file until only ``leave`` bytes are free; returns the bytes it wrote."""
        import shutil

        free = shutil.disk_usage(self.path).free
        size = max(0, free - leave)
        with open(self.filler, "ab") as f:
            for _ in range(size // (1 << 20)):
                f.write(b"\0" * (1 << 20))
            f.write(b"\0" * (size % (1 << 20)))
        return size

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.path is None:
            return
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        try:
            self.path.rmdir()
        except OSError:
            pass  # still busy (a lazy unmount finishes later); an empty folder in /tmp is left
        self.path = None
