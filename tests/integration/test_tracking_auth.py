"""Issue #26: an MLflow server behind basic auth. The start-up probe authenticates as MLflow's client does
(user-info in tracking.uri, MLFLOW_TRACKING_USERNAME/PASSWORD); wrong or missing credentials are a clear error
in seconds; no message shows the password.

The server is a real MLflow server behind a small basic-auth proxy on 127.0.0.1 (MLflow's own auth app needs
Flask-WTF, which the environment does not ship); the proxy answers 401 without the right credentials, on every
path, as MLflow's auth app does for its API.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from orchestrator.preflight import PreflightError, run_preflight
from orchestrator.tracking_setup import TrackingAuthError, check_reachable, ensure_run
from tests.integration.recipes import DEBUG_CONFIG, data_overrides
from tests.integration.services import mlflow_server
from trainer.config import load_config

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "s3cr3t-pass-word"


@contextlib.contextmanager
def basic_auth_proxy(upstream: str):
    """http://127.0.0.1:PORT forwarding to ``upstream`` only requests that carry USER:PASSWORD."""
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self):
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-auth")) as uri, basic_auth_proxy(uri) as proxy:
        yield proxy


def with_credentials(proxy: str) -> str:
    return proxy.replace("http://", f"http://{USER}:{PASSWORD}@")


def test_credentials_in_the_uri(proxied, tmp_path):
    # was: "Name or service not known" (urllib took them for a host)
    check_reachable(with_credentials(proxied))
    cfg = load_config(DEBUG_CONFIG, [f"run.storage={tmp_path}", f"tracking.uri={with_credentials(proxied)}"])
    assert ensure_run(cfg, cfg.tracking.uri, tmp_path / "debug")  # MLflow's own client, same URI


def test_credentials_in_the_environment(proxied, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    check_reachable(proxied)


def test_missing_or_wrong_credentials_are_named_without_the_password(proxied, synthetic_data, tmp_path):
    with pytest.raises(TrackingAuthError, match="HTTP 401: its credentials are missing"):
        check_reachable(proxied)
    wrong = proxied.replace("http://", f"http://{USER}:not-{PASSWORD}@")
    cfg = load_config(DEBUG_CONFIG, [f"run.storage={tmp_path}", f"tracking.uri={wrong}",
                                     *data_overrides(str(synthetic_data))])
    with pytest.raises(PreflightError) as err:
        run_preflight(cfg)
    msg = str(err.value)
    assert msg.startswith("tracking.uri=http://***@127.0.0.1:") and "were refused" in msg
    assert "MLFLOW_TRACKING_USERNAME" in msg and PASSWORD not in msg and "not-" not in msg
