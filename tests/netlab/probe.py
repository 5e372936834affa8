"""Client side: ask a backend (through whatever the kernel does in between) who answered.

Every probe returns one of: `Reply(name, peer_ip, peer_port)` (the backend's name and the source
address it saw), `Refused` (RST / ICMP port unreachable), `Unreachable` (no route, ICMP host or
net unreachable), `Timeout`, or `Failed` (anything else, with details).

`where` is anything with a `.name` that is a namespace name (Netns, Node, Pod, Host) or the
namespace name itself.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from .ns import CHILD_ENV, call_in_netns


class _HasName(Protocol):
    name: str


Where = _HasName | str


@dataclass(frozen=True, slots=True)
class Reply:
    name: str  # backend name (the pod that answered)
    peer_ip: str  # source address the backend saw (masqueraded or not)
    peer_port: int

    @property
    def ok(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Refused:
    detail: str = ""

    ok = False


@dataclass(frozen=True, slots=True)
class Unreachable:
    detail: str = ""

    ok = False


@dataclass(frozen=True, slots=True)
class Timeout:
    detail: str = ""

    ok = False


@dataclass(frozen=True, slots=True)
class Failed:
    detail: str = ""

    ok = False


Result = Reply | Refused | Unreachable | Timeout | Failed


def _ns_name(where: Where) -> str:
    return where if isinstance(where, str) else where.name


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_answer(text: str) -> Result:
    """Parse a backend answer `NAME IP:PORT` / `NAME [IP6]:PORT`."""
    try:
        name, hostport = text.strip().split(" ", 1)
        host, port = hostport.rsplit(":", 1)
        return Reply(name, host.strip("[]"), int(port))
    except ValueError:
        return Failed(f"unexpected answer {text!r}")


def _errno_result(e: OSError) -> Result:
    if e.errno == errno.ECONNREFUSED:
        return Refused(str(e))
    if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Unreachable(str(e))
    if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
        return Timeout(str(e))
    return Failed(repr(e))


# ---- curl ----------------------------------------------------------------------------------------


def http_get(
    where: Where,
    ip: str,
    port: int,
    timeout: float = 2,
    *,
    src: str | None = None,
    src_port: int | None = None,
    path: str = "/",
) -> Result:
    """GET http://IP:PORT/ with curl inside namespace `where`.

    curl exit 7 means "could not connect": its message tells refused from unreachable.
    Exit 28 is the --max-time timeout.
    """
    url = f"http://{_hostport(ip, port)}{path}"
    argv = ["ip", "netns", "exec", _ns_name(where), "curl", "-sS", "-v", "-g", "--noproxy", "*"]
    argv += ["--max-time", str(timeout)]
    if src is not None:
        argv += ["--interface", src]
    if src_port is not None:
        argv += ["--local-port", str(src_port)]
    argv.append(url)
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout + 5, env=CHILD_ENV, check=False
        )
    except subprocess.TimeoutExpired:
        return Timeout("curl did not exit")
    # -v: stderr has "* connect to IP port N failed: Connection refused" (the final
    # "curl: (7) ..." line only says "Couldn't connect to server" in curl >= 7.84).
    lines = cp.stderr.splitlines()
    keep = ("curl:", "* connect to", "* Failed", "* Immediate")
    err = "\n".join(ln for ln in lines if ln.startswith(keep))
    if cp.returncode == 0:
        return parse_answer(cp.stdout)
    if cp.returncode == 7:
        low = err.lower()
        if "connection refused" in low:
            return Refused(err)
        if "no route" in low or "unreachable" in low:
            return Unreachable(err)
        return Failed(err)
    if cp.returncode == 28:
        return Timeout(err)
    return Failed(f"curl rc={cp.returncode}: {err}")


# ---- in-process sockets (fast; no subprocess) ------------------------------------------------


def _bound_socket(
    ns: str, family: int, kind: int, src: str | None, src_port: int | None
) -> socket.socket:
    s = call_in_netns(ns, socket.socket, family, kind)
    try:
        if src is not None or src_port is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src or ("::" if family == socket.AF_INET6 else "0.0.0.0"), src_port or 0))
    except BaseException:
        s.close()
        raise
    return s


def tcp_ask(
    where: Where,
    ip: str,
    port: int,
    timeout: float = 2,
    *,
    src: str | None = None,
    src_port: int | None = None,
) -> Result:
    """Like `http_get` but with a socket opened in the namespace by this process (no curl)."""
    deadline = time.monotonic() + timeout
    try:
        s = _bound_socket(_ns_name(where), _family(ip), socket.SOCK_STREAM, src, src_port)
    except OSError as e:
        return _errno_result(e)
    with s:
        try:
            s.settimeout(timeout)
            s.connect((ip, port))
            s.sendall(f"GET / HTTP/1.0\r\nHost: {_hostport(ip, port)}\r\n\r\n".encode())
            data = b""
            while True:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            return _errno_result(e)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return Failed(f"not an HTTP response: {data[:200]!r}")
    return parse_answer(body.decode(errors="replace"))


def udp_ask(
    where: Where,
    ip: str,
    port: int,
    timeout: float = 2,
    *,
    src: str | None = None,
    src_port: int | None = None,
    payload: bytes = b"who?",
) -> Result:
    """Send one datagram from namespace `where`; wait for the answer.

    The socket is connected, so only an answer from IP:PORT counts (i.e. the reverse NAT must
    work) and an ICMP port unreachable comes back as `Refused`.
    """
    try:
        s = _bound_socket(_ns_name(where), _family(ip), socket.SOCK_DGRAM, src, src_port)
    except OSError as e:
        return _errno_result(e)
    with s:
        try:
            s.settimeout(timeout)
            s.connect((ip, port))
            s.send(payload)
            data = s.recv(65536)
        except OSError as e:
            return _errno_result(e)
    return parse_answer(data.decode(errors="replace"))


def sctp_ask(
    where: Where, ip: str, port: int, timeout: float = 2, *, src_port: int | None = None
) -> Result:
    """One SCTP association (one-to-one style socket): send a message, read the answer."""
    deadline = time.monotonic() + timeout
    try:
        s = call_in_netns(
            _ns_name(where), socket.socket, _family(ip), socket.SOCK_STREAM, socket.IPPROTO_SCTP
        )
    except OSError as e:
        return Failed(f"no SCTP here: {e}")
    with s:
        try:
            if src_port is not None:
                s.bind(("::" if ":" in ip else "0.0.0.0", src_port))
            s.settimeout(timeout)
            s.connect((ip, port))
            s.sendall(b"who?")
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            data = s.recv(65536)
        except OSError as e:
            return _errno_result(e)
    return parse_answer(data.decode(errors="replace"))


def ask(
    where: Where, ip: str, port: int, proto: str = "tcp", timeout: float = 2, **kw: object
) -> Result:
    """Dispatch on protocol: "tcp" (in-process HTTP), "curl", "udp", "sctp"."""
    if proto == "tcp":
        return tcp_ask(where, ip, port, timeout, **kw)  # type: ignore[arg-type]
    if proto == "curl":
        return http_get(where, ip, port, timeout, **kw)  # type: ignore[arg-type]
    if proto == "udp":
        return udp_ask(where, ip, port, timeout, **kw)  # type: ignore[arg-type]
    if proto == "sctp":
        return sctp_ask(where, ip, port, timeout, **kw)  # type: ignore[arg-type]
    raise ValueError(f"unknown proto {proto!r}")


def label(result: Result) -> str:
    """The backend name for a Reply, `<Refused>` / `<Timeout>` / ... otherwise."""
    return result.name if isinstance(result, Reply) else f"<{type(result).__name__}>"


def spread(
    where: Where, ip: str, port: int, n: int = 50, *, proto: str = "tcp", timeout: float = 2
) -> Counter[str]:
    """Ask `n` times (new connection / new source port each time); count who answered.

    Failures are counted under `<Refused>`, `<Timeout>`, `<Unreachable>`, `<Failed>`.
    """
    return Counter(label(ask(where, ip, port, proto, timeout)) for _ in range(n))
