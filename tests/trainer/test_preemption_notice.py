"""The cloud's advance notice (trainer/preemption_notice.py), against a fake instance metadata service on
127.0.0.1 that speaks AWS's IMDSv2 and GCP's metadata protocol."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer import preemption
from trainer.preemption_notice import NoticeWatcher

pytestmark = pytest.mark.integration  # a server on 127.0.0.1 (seconds)

ACTION = '{"action": "terminate", "time": "2026-12-06T18:00:00Z"}'


class FakeMetadata(BaseHTTPRequestHandler):
    """404 / FALSE until the test sets ``server.reclaim``; refuses requests without the provider's headers."""

    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: str = "") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._answer(200, "tok")
        return self._answer(400)

    def do_GET(self):
        self.server.gets += 1
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != "tok":
                return self._answer(401)
            return self._answer(200, ACTION) if self.server.reclaim else self._answer(404)
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._answer(403)
            return self._answer(200, "TRUE" if self.server.reclaim else "FALSE")
        return self._answer(404)


@pytest.fixture
def metadata():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    server.reclaim, server.gets = False, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    preemption._requested.clear()
    try:
        yield server
    finally:
        server.shutdown()
        preemption._requested.clear()


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_a_notice_requests_the_stop_and_no_notice_does_not(metadata, provider, capfd):
    watcher = NoticeWatcher(provider, 0.05, base=f"http://127.0.0.1:{metadata.server_port}").start()
    try:
        wait_until(lambda: watcher.polls >= 3)  # answered "no reclaim" three times
        assert not preemption.requested()
        metadata.reclaim = True
        wait_until(preemption.requested)
    finally:
        watcher.stop()
    assert f"{provider} preemption notice" in capfd.readouterr().err
    assert watcher.notice == (ACTION if provider == "aws" else "preempted")


def test_an_unreachable_service_is_reported_once_and_requests_nothing(caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    preemption._requested.clear()
    watcher = NoticeWatcher("aws", 0.01, base=f"http://127.0.0.1:{port}").start()
    try:
        wait_until(lambda: watcher.polls >= 3)
    finally:
        watcher.stop()
    assert not preemption.requested()
    assert sum("cannot reach the aws metadata service" in r.getMessage() for r in caplog.records) == 1
