"""`pyproxy trace`'s pure half: one new connection through iptables-save text, plus drift.

Pure: the shell (`cli`) reads iptables-save and, for drift, builds what pyproxy would program
(`service.desired_document`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pyproxy.explain.report import TRACE_CTSTATE, PacketReport
from pyproxy.iptables.drift import ruleset_drift
from pyproxy.iptables.restore_text import parse_ruleset
from pyproxy.iptables.tracer import trace_packet
from pyproxy.model import IPFamily, Protocol


def trace_saved(
    saved_text: str,
    *,
    src: str,
    dst: str,
    port: int,
    protocol: Protocol = Protocol.TCP,
    local_ips: Iterable[str] = (),
    from_node: bool = False,
    masquerade_mark: int = 0x4000,
    desired_text: str | None = None,
) -> PacketReport:
    """Trace one new connection through iptables-save text; with `desired_text` (what
    pyproxy would program, see `desired_document`) also report drift.

    Raises ValueError for bad or mixed-family addresses, RulesetParseError for bad text.
    """
    src_ip = ipaddress.ip_address(src)
    dst_ip = ipaddress.ip_address(dst)
    if src_ip.version != dst_ip.version:
        raise ValueError(
            f"source {src} and destination {dst} are of different IP families: a packet"
            " cannot change family"
        )
    family = IPFamily.of(dst_ip)
    trace = trace_packet(
        parse_ruleset(saved_text),
        src=str(src_ip),
        dst=str(dst_ip),
        dport=port,
        protocol=protocol.lower,
        local_ips=list(local_ips),
        from_node=from_node,
        ctstate=TRACE_CTSTATE,
        masquerade_mark=masquerade_mark,
    )
    drift = None if desired_text is None else ruleset_drift(desired_text, saved_text, family)
    return PacketReport(str(src_ip), str(dst_ip), port, protocol, family, from_node, trace, drift)
