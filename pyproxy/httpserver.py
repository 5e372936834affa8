"""The small HTTP servers kube-proxy runs, and pyproxy with it: healthz, metrics, health-check
node ports.

Shared by pyproxy.healthcheck and pyproxy.metrics (which is why it is a module of its own: the
two used to import each other): stdlib `ThreadingHTTPServer`, one daemon thread per request,
routes that return an `HTTPResponse`, and an accept loop that a wake-up socket ends
immediately, so stopping never waits for a poll interval. Every listener sets SO_REUSEADDR
(as Go's listeners do), so a restarted agent rebinds its ports at once despite the TIME_WAIT
connections its predecessor left behind.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from typing import NamedTuple, TypeAlias
from urllib.parse import urlsplit

import structlog

logger = structlog.get_logger("pyproxy.httpserver")


class HTTPResponse(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes


Route: TypeAlias = Callable[[], HTTPResponse]

JSON_HEADERS = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}
_NOT_FOUND = HTTPResponse(
    404,
    {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"},
    b"404 page not found\n",  # Go's http.NotFound body
)
_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - recognising wildcards, not binding


def parse_bind_address(text: str) -> tuple[str, int] | None:
    """`IP:PORT`, `[IPv6]:PORT` or `:PORT` into (host, port); "" (disabled) into None.

    Raises ValueError for anything else."""
    text = text.strip()
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"invalid bind address {text!r} (want IP:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        ip_address(host)  # ValueError if not an IP
    return host, int(port_text)


def _socket_family(host: str) -> tuple[socket.AddressFamily, str, bool]:
    """(address family, host to bind, dual-stack?) for a bind host.

    Go listens dual-stack for a wildcard address ("0.0.0.0", "::" or ""), so pyproxy does too
    when the host has IPv6; a specific address binds only that address."""
    if host in _WILDCARDS:
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, "::", True
        return socket.AF_INET, "0.0.0.0", False  # noqa: S104 - binding all addresses is the point
    family = socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
    return family, host, False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, host: str, port: int, routes: Mapping[str, Route], fallback: Route | None
    ) -> None:
        family, bind_host, dual_stack = _socket_family(host)
        self.address_family = family
        self.routes = routes
        self.fallback = fallback
        super().__init__((bind_host, port), _Handler, bind_and_activate=False)
        try:
            if dual_stack:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise
        # The accept loop only accepts after select said so; non-blocking keeps a connection
        # reset before accept() from blocking the loop (and stop()).
        self.socket.setblocking(False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn(), a DNS lookup that can
        # hang when DNS is down; nothing here needs it. Overriding it also drops socketserver's
        # SO_REUSEADDR, which must stay: the connections of the previous process (kubelet
        # probes, load-balancer checks) sit in TIME_WAIT on this port for 60 s after it exits,
        # and without the option a restarted agent cannot bind until they expire. Go's
        # net.Listen sets it too; it still refuses a port another socket listens on.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        logger.debug("http request failed", client=str(client_address), exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "pyproxy"
    sys_version = ""
    #: A client that stalls cannot hold a thread for longer than this.
    timeout = 10

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    # Go's handlers answer any method the same way.
    do_POST = do_GET

    def _respond(self, *, with_body: bool) -> None:
        path = urlsplit(self.path).path
        route = self.server.routes.get(path, self.server.fallback)
        response = _NOT_FOUND if route is None else route()
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        # Probes arrive every few seconds; an access log line each would drown real logs.
        pass


class Listener:
    """One bound socket, served by an accept thread until close()."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        routes: Mapping[str, Route],
        fallback: Route | None = None,
    ) -> None:
        self._server = _HTTPServer(host, port, routes, fallback)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._run, name=f"pyproxy-{name}-{port}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return str(self._server.server_address[0]), int(self._server.server_address[1])

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                events = selector.select()
                if any(key.data == "wake" for key, _ in events):
                    return
                # Readable listening socket: accept and hand off to a request thread.
                self._server.handle_request()

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()


class HTTPService:
    """A small HTTP server on a `--*-bind-address`; an empty address disables it."""

    def __init__(self, name: str, bind_address: str, routes: Mapping[str, Route]) -> None:
        self.name = name
        self.bind_address = bind_address
        self._address = parse_bind_address(bind_address)
        self._routes = dict(routes)
        self._listener: Listener | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound (host, port) while running; useful with port 0."""
        return self._listener.address if self._listener is not None else None

    def start(self) -> None:
        """Bind and serve in the background. Raises OSError if the address cannot be bound."""
        if self._address is None or self._listener is not None:
            return
        host, port = self._address
        try:
            self._listener = Listener(self.name, host, port, self._routes)
        except OSError as err:
            logger.error(
                "failed to start http server",
                server=self.name,
                address=self.bind_address,
                error=str(err),
            )
            raise
        logger.info(
            "started http server",
            server=self.name,
            address=self.bind_address,
            port=self._listener.address[1],
        )

    def start_retrying(self, stop: threading.Event, interval: float = 5.0) -> None:
        """Start now if the address can be bound, else keep trying every `interval` seconds in
        the background until it can or `stop` is set, as kube-proxy's servers do: the proxy
        this one replaces on the node (a rollout, a switch from or to kube-proxy) may hold the
        port a little longer, and without /healthz the pod would never turn Ready."""
        try:
            self.start()
        except OSError:
            threading.Thread(
                target=self._retry, args=(stop, interval), daemon=True, name=f"{self.name}-retry"
            ).start()

    def _retry(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                self.start()
            except OSError:
                continue  # start() logged it
            return

    def stop(self) -> None:
        """Close the listening socket now; requests already being answered still finish."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
