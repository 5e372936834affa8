"""Hand-made TCP segments that conntrack calls INVALID, for tests of the INVALID drop rule.

A segment with both SYN and FIN set is an invalid flag combination for conntrack's tcp_error(),
so it never gets a conntrack entry and its ctstate is INVALID wherever it is seen. The header is
built here (with a correct checksum, so it is not dropped as corrupt first) and sent through a
raw IPv4 socket, the kernel adding the IP header with the sender's own address.
"""

from __future__ import annotations

import socket
import struct

from .cluster import Host


def syn_fin_segment(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A 20-byte TCP header with SYN+FIN, checksummed over the IPv4 pseudo-header."""

    def header(checksum: int) -> bytes:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x03, 1024, checksum, 0)

    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
    data = pseudo + header(0)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return header(~total & 0xFFFF)


def send_syn_fin(host: Host, dst: str, dport: int, count: int, first_sport: int = 41001) -> None:
    """Send `count` SYN+FIN segments from `host` (its IPv4 address) to dst:dport."""

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
            for sport in range(first_sport, first_sport + count):
                raw.sendto(syn_fin_segment(host.ip, dst, sport, dport), (dst, 0))

    host.call(send)
