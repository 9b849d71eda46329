"""A loopback TCP forwarder that can be switched into an outage, to make a real server (moto's S3) fail for a
while without stopping it.

moto keeps its buckets in the memory of its process: stopping it to simulate an outage would also lose every
object, which no real S3 outage does. So the trainer talks to this proxy instead, and the proxy forwards each
connection to the server byte for byte. ``outage()`` resets every open connection (TCP RST, what a client
sees when a load balancer or the server's host drops it) and resets each new one as soon as it is accepted,
counting them; ``restore()`` forwards again, on the same port. A client's retry loop is thus hit for real (its
connection errors, its backoff) while the server and its state stay untouched.

Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

from tests.integration.services import free_port


def reset(sock: socket.socket) -> None:
    """Closes ``sock`` with a TCP RST instead of an orderly FIN (SO_LINGER with a zero timeout). Shutting the
    read side first wakes a pump blocked in recv() on it (close() alone does not, on Linux) and sends
    nothing."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # already closed by its other pump, or never connected
    sock.close()


class OutageProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``; ``outage()`` / ``restore()`` switch it."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.down = False
        self.refused = 0  # connections reset since the last outage() began
        self.forwarded = 0  # connections forwarded, all told
        self._changed = threading.Condition()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._ended: set[tuple[socket.socket, socket.socket]] = set()  # pairs one of whose pumps has ended
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept_loop, name="outage-proxy", daemon=True)

    def start(self) -> OutageProxy:
        self._thread.start()
        return self

    def __enter__(self) -> OutageProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- the switch -------------------------------------------------------------------------------------
    def outage(self) -> None:
        """From now on every connection is reset: the open ones at once, new ones as soon as accepted."""
        with self._changed:
            self.down, self.refused = True, 0
            pairs, self._pairs = list(self._pairs), set()
        for client, upstream in pairs:
            reset(client)
            reset(upstream)

    def restore(self) -> None:
        with self._changed:
            self.down = False

    def wait_refused(self, count: int, timeout: float) -> bool:
        """Waits until the outage has reset ``count`` connections (a client retried through it); False when
        ``timeout`` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.refused >= count, timeout)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._listener.close()
        with self._changed:
            pairs, self._pairs = list(self._pairs), set()
        for client, upstream in pairs:
            reset(client)
            reset(upstream)

    # ----- forwarding -------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            # a bounded wait, so that close() ends the loop (closing a socket does not wake accept())
            if not select.select([self._listener], [], [], 0.2)[0]:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._changed:
                down = self.down
                if down:
                    self.refused += 1
                    self._changed.notify_all()
            if down:
                reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                reset(client)  # the server itself is not there: the client sees what it would see
                continue
            pair = (client, upstream)
            with self._changed:
                self._pairs.add(pair)
                self.forwarded += 1
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        """Copies one direction until EOF or an error; then half-closes the other side (HTTP clients may
        close their sending side and still read the reply). The second pump to end closes the pair."""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # reset by an outage, or by the other side
        with self._changed:
            first = pair not in self._ended
            if first:
                self._ended.add(pair)
                return
            self._ended.discard(pair)
            self._pairs.discard(pair)
        for sock in pair:
            sock.close()
