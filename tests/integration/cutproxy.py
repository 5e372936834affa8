"""A TCP relay that cuts its connections: the network between pyproxy and the API server failing.

It sits on the host's 127.0.0.1 between the agent's loopback bridge and kube-apiserver, and
passes bytes through untouched (TLS included: it never sees the HTTP inside). On request it
breaks connections the way a crashing load balancer or a NAT timeout does:

- `arm(n)`: the next n reads from the API server, on any connection, are forwarded only in part
  (a random prefix, possibly empty, so the cut lands inside a TLS record and the watch event it
  carries) and then the connection is reset (RST both ways);
- `cut_all()`: every open connection is reset now, idle watches included.

Every cut is counted (`cuts`), so a test can tell that its faults did happen.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from types import TracebackType

_LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN


class _Pair:
    """One relayed connection: the client's socket and ours to the server. The two pump threads
    each drop a reference when they end; the last one closes both sockets (so no thread can
    read a file descriptor that was closed and reused under it)."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.lock = threading.Lock()
        self.refs = 2
        self.broken = False

    def reset(self) -> None:
        """Make both ends RST on close, and wake both pumps (shutdown of the read side)."""
        with self.lock:
            if self.broken:
                return
            self.broken = True
            for sock in (self.client, self.server):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RD)

    def release(self) -> bool:
        with self.lock:
            self.refs -= 1
            if self.refs:
                return False
        self.client.close()
        self.server.close()
        return True


class CuttingProxy:
    """127.0.0.1:`port` relayed to 127.0.0.1:`upstream`; cuts as asked (see the module doc)."""

    def __init__(self, upstream: int, seed: int) -> None:
        self.upstream = upstream
        self.rng = random.Random(seed)  # noqa: S311 - reproducible cut points, not crypto
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._armed = 0
        self._pairs: set[_Pair] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="cutproxy", daemon=True)

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.reset()

    def arm(self, n: int) -> None:
        """Cut the next n server-to-client reads part way (see the module doc)."""
        with self._lock:
            self._armed += n

    def cut_all(self) -> int:
        """Reset every open connection now; how many there were."""
        with self._lock:
            pairs = [p for p in self._pairs if not p.broken]
            self.cuts += len(pairs)
        for pair in pairs:
            pair.reset()
        return len(pairs)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
            for src, dst, downstream in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(pair, src, dst, downstream), daemon=True
                ).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self._armed <= 0:
                return False
            self._armed -= 1
            self.cuts += 1
            return True

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or pair.broken:
                    if not pair.broken:
                        dst.shutdown(socket.SHUT_WR)  # a clean half-close passes through
                    return
                if downstream and self._take_cut():
                    dst.sendall(data[: self.rng.randrange(len(data))])
                    pair.reset()
                    return
                dst.sendall(data)
        except OSError:
            pair.reset()
        finally:
            if pair.release():
                with self._lock:
                    self._pairs.discard(pair)
