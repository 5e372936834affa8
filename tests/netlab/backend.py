#!/usr/bin/env python3
"""A tiny backend "pod" server for kernel tests. Standalone: stdlib only, no package imports.

    ip netns exec POD python3 tests/netlab/backend.py --name a1 --tcp 8080,8081 --udp 5353

Every TCP connection gets one HTTP/1.0 response (any request, any path) whose body is
`NAME PEER_IP:PEER_PORT` (IPv6 peers as `[ip]:port`), then the connection is closed. Every UDP
datagram is answered with the same string. With --sctp, each SCTP association gets that string
once (after reading the first message) and is closed. Sockets are dual-stack (`::` with
IPV6_V6ONLY=0; IPv4 peers are reported as plain IPv4), or IPv4-only if IPv6 is disabled.

Prints `READY NAME tcp=... udp=... sctp=...` on stdout once every socket is listening, and exits
with status 3 (after printing `ERROR ...` on stderr) if a socket cannot be opened, e.g. SCTP on a
kernel without it.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
from collections.abc import Callable

HTTP_HEAD = (
    "HTTP/1.0 200 OK\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: {length}\r\n"
    "X-Backend: {name}\r\n"
    "Connection: close\r\n\r\n"
)


def answer(name: str, peer: tuple[str, int] | tuple[str, int, int, int]) -> str:
    ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{name} {host}:{peer[1]}"


def bind(kind: int, proto: int, port: int) -> socket.socket:
    try:
        s = socket.socket(socket.AF_INET6, kind, proto)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr: tuple[str, int] = ("::", port)
    except OSError as e:
        if e.errno not in (97,):  # EAFNOSUPPORT: IPv6 disabled -> IPv4 only
            raise
        s = socket.socket(socket.AF_INET, kind, proto)
        addr = ("0.0.0.0", port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    if kind == socket.SOCK_STREAM:
        s.listen(512)
    return s


def read_request(conn: socket.socket, limit: int = 65536) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def handle_http(name: str, conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        try:
            conn.settimeout(5)
            read_request(conn)
            body = answer(name, peer)
            head = HTTP_HEAD.format(length=len(body.encode()), name=name)
            conn.sendall((head + body).encode())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle_sctp(name: str, conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        try:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(answer(name, peer).encode())
        except OSError:
            pass


def accept_loop(
    name: str,
    listener: socket.socket,
    handler: Callable[[str, socket.socket, tuple[str, int]], None],
) -> None:
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            continue
        threading.Thread(target=handler, args=(name, conn, peer), daemon=True).start()


def udp_loop(name: str, sock: socket.socket) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(65536)
            sock.sendto(answer(name, peer).encode(), peer)
        except OSError:
            continue


def ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", type=ports, default=[])
    ap.add_argument("--udp", type=ports, default=[])
    ap.add_argument("--sctp", type=ports, default=[])
    args = ap.parse_args(argv)

    threads = []
    try:
        for port in args.tcp:
            s = bind(socket.SOCK_STREAM, 0, port)
            threads.append(threading.Thread(target=accept_loop, args=(args.name, s, handle_http)))
        for port in args.udp:
            s = bind(socket.SOCK_DGRAM, 0, port)
            threads.append(threading.Thread(target=udp_loop, args=(args.name, s)))
        for port in args.sctp:
            s = bind(socket.SOCK_STREAM, socket.IPPROTO_SCTP, port)
            threads.append(threading.Thread(target=accept_loop, args=(args.name, s, handle_sctp)))
    except OSError as e:
        print(f"ERROR {args.name}: {e}", file=sys.stderr, flush=True)
        return 3
    for t in threads:
        t.daemon = True
        t.start()
    join = ",".join
    print(
        f"READY {args.name} tcp={join(map(str, args.tcp))} udp={join(map(str, args.udp))}"
        f" sctp={join(map(str, args.sctp))}",
        flush=True,
    )
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
