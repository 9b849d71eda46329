"""The fault campaign's means of making faults (bench/fault_campaign.py), each against the real thing.

The S3 outage switch (tests/integration/outage_proxy.py) against a TCP server on loopback: it forwards byte
for byte, an outage resets the open connections and every new one (counted), and after restore() the same
port forwards again while the server kept its state. The full disk (services.SmallDisk): a tmpfs filled to the
bytes asked for and emptied again; skipped, saying why, where no tmpfs can be mounted."""

from __future__ import annotations

import socket
import socketserver
import threading

import pytest

from tests.integration.outage_proxy import OutageProxy
from tests.integration.services import SmallDisk, free_port

pytestmark = pytest.mark.integration  # servers on loopback, a mounted tmpfs (about two seconds)


class Counter(socketserver.StreamRequestHandler):
    """Answers each line with the running total of the bytes the server has received (state that a restart
    of the server would lose)."""

    def handle(self):
        for line in self.rfile:
            with self.server.lock:
                self.server.total += len(line)
                total = self.server.total
            self.wfile.write(f"{total}\n".encode())


@pytest.fixture
def server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", free_port()), Counter)
    srv.daemon_threads = True
    srv.total, srv.lock = 0, threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def ask(conn: socket.socket, text: str) -> str:
    conn.sendall(text.encode() + b"\n")
    return conn.makefile("rb").readline().decode().strip()


def connect(proxy: OutageProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def fails(proxy: OutageProxy) -> bool:
    """Whether a new connection through the proxy fails (reset at connect or at the first exchange)."""
    try:
        with connect(proxy) as conn:
            ask(conn, "retry")
    except OSError:
        return True
    return False


def test_forwards_then_an_outage_resets_open_and_new_connections_then_restores(server):
    with OutageProxy(server.server_address[1]) as proxy:
        conn = connect(proxy)
        assert ask(conn, "abc") == "4"  # the server's reply, through the proxy
        big = "x" * 300_000  # more than one recv() of each pump
        assert ask(conn, big) == str(4 + len(big) + 1)

        proxy.outage()
        with pytest.raises(OSError):  # the open connection was reset under the client
            ask(conn, "again")
        conn.close()
        for _ in range(3):  # each new connection is accepted and reset at once, and counted
            assert fails(proxy)
        assert proxy.wait_refused(3, timeout=10)
        assert proxy.refused == 3
        assert not proxy.wait_refused(4, timeout=0.3)  # nobody retried a fourth time

        proxy.restore()
        with connect(proxy) as c:  # same port; the server's state survived the outage
            assert ask(c, "z") == str(4 + len(big) + 1 + 2)
        assert proxy.forwarded == 2


def test_a_client_that_half_closes_still_gets_its_reply(server):
    """HTTP clients may shut their sending side and then read: the proxy passes the FIN on, not a reset."""
    with OutageProxy(server.server_address[1]) as proxy, connect(proxy) as conn:
        conn.sendall(b"hello\n")
        conn.shutdown(socket.SHUT_WR)
        assert conn.makefile("rb").read() == b"6\n"


def test_the_small_disk_is_filled_to_what_is_left_then_freed():
    import shutil

    disk = SmallDisk(8 << 20)
    try:
        disk.mount()
    except OSError as err:
        pytest.skip(f"{err} (needs root or CAP_SYS_ADMIN)")
    try:
        assert shutil.disk_usage(disk.path).total == 8 << 20  # a filesystem of its own, of that size
        wrote = disk.fill(leave=1 << 20)
        free = shutil.disk_usage(disk.path).free
        assert wrote > 6 << 20 and (1 << 20) - 65536 <= free <= 1 << 20, free  # what is left, to a page or so
        with pytest.raises(OSError):  # more than is left does not fit
            (disk.path / "save").write_bytes(b"\0" * (2 << 20))
        (disk.path / "save").unlink()  # what did fit of it
        disk.free()
        assert shutil.disk_usage(disk.path).free > 7 << 20
    finally:
        path = disk.path
        disk.unmount()
    assert not path.exists()
