"""UDP conntrack cleanup: which flows are stale (pure), and the cleaner over a fake table.

The planning table reads like kube-proxy's cleanup_test.go: one family's service ports after a
sync, a flow as conntrack shows it (original destination, reply source), stale or not.
The netlink decoder is checked on hand-made ctnetlink messages (the kernel tests use real ones).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import replace

import pytest
from fakes import FakeConntrack

from pyproxy import conntrack as ct
from pyproxy.conntrack import ConntrackCleaner, NetlinkConntrack
from pyproxy.conntrack_plan import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Flow,
    allowed_endpoints,
    is_stale,
    stale_flows,
)
from pyproxy.errors import KernelError
from pyproxy.model import IPFamily, NamespacedName, Protocol
from pyproxy.policy import categorize_endpoints
from pyproxy.proxystate import ServicePortState
from pyproxy.serviceport import EndpointInfo, ServicePortInfo, ServicePortName

ip = ipaddress.ip_address

# ---- builders ------------------------------------------------------------------------------------


def port_state(
    name: str,
    cluster_ip: str,
    port: int,
    endpoints: Sequence[str | EndpointInfo] = (),
    *,
    protocol: Protocol = Protocol.UDP,
    node_port: int = 0,
    external_ips: Sequence[str] = (),
    lb_vips: Sequence[str] = (),
    target: int = 5353,
) -> ServicePortState:
    """A service port `ns/name:p` with endpoints given as IPs (on `target`) or EndpointInfo."""
    info = ServicePortInfo(
        name=ServicePortName("ns", name, "p", protocol),
        cluster_ip=ip(cluster_ip),
        port=port,
        node_port=node_port,
        external_ips=tuple(ip(a) for a in external_ips),
        load_balancer_vips=tuple(ip(a) for a in lb_vips),
    )
    eps = tuple(
        e if isinstance(e, EndpointInfo) else EndpointInfo.make(ip(e), target, is_local=False)
        for e in endpoints
    )
    eps = tuple(sorted(eps, key=lambda e: e.endpoint))
    categorized = categorize_endpoints(eps, info, node_name="node-a", zone=None)
    return ServicePortState(info, eps, categorized)


def flow(
    dst: str, reply_src: str, *, src: str = "10.244.9.9:40000", proto: int = IPPROTO_UDP
) -> Flow:
    """A flow from `src` to `dst` whose replies come from `reply_src` (all `ip:port`)."""
    (s, sp), (d, dp), (r, rp) = hostport(src), hostport(dst), hostport(reply_src)
    return Flow(proto, s, sp, d, dp, r, rp)


def hostport(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`10.0.0.1:53` / `[fd00::1]:53` → (address, port)."""
    host, _, number = text.rpartition(":")
    return ip(host.strip("[]")), int(number)


# ---- the planning table --------------------------------------------------------------------------

# After the sync:
#   ns/dns   UDP 10.96.0.10:53, externalIP 203.0.113.10, LB VIP 192.0.2.10, nodePort 30053;
#            endpoints 10.244.2.11:5353 (ready) and 10.244.3.11:5353 (serving, terminating);
#            10.244.1.11:5353 was removed in this sync, 10.244.4.11 is terminating, not serving.
#   ns/idle  UDP 10.96.0.20:53, no endpoints.
#   ns/web   TCP 10.96.0.30:80, endpoint 10.244.1.11:8080.
#   ns/stats UDP 10.96.0.40:30053: its *port* equals dns's nodePort.
# Before it there was also ns/gone: UDP 10.96.0.50:53, nodePort 30099 (deleted in this sync).
REMOVED, KEPT, TERMINATING, NOT_SERVING = "10.244.1.11", "10.244.2.11", "10.244.3.11", "10.244.4.11"
CURRENT = [
    port_state(
        "dns",
        "10.96.0.10",
        53,
        [
            KEPT,
            EndpointInfo.make(ip(TERMINATING), 5353, is_local=False, ready=False, terminating=True),
            EndpointInfo.make(
                ip(NOT_SERVING), 5353, is_local=False, ready=False, serving=False, terminating=True
            ),
        ],
        node_port=30053,
        external_ips=["203.0.113.10"],
        lb_vips=["192.0.2.10"],
    ),
    port_state("idle", "10.96.0.20", 53),
    port_state("web", "10.96.0.30", 80, ["10.244.1.11"], protocol=Protocol.TCP, target=8080),
    port_state("stats", "10.96.0.40", 30053, ["10.244.5.11"]),
]
PREVIOUS = [
    port_state(
        "dns",
        "10.96.0.10",
        53,
        [REMOVED, KEPT],
        node_port=30053,
        external_ips=["203.0.113.10"],
        lb_vips=["192.0.2.10"],
    ),
    port_state("gone", "10.96.0.50", 53, ["10.244.6.11"], node_port=30099),
    *CURRENT[1:],
]

CASES = [
    # endpoint removed: flows DNATed to it are stale, on every frontend; the remaining is kept
    ("clusterIP -> removed endpoint", flow("10.96.0.10:53", f"{REMOVED}:5353"), True),
    ("clusterIP -> remaining endpoint", flow("10.96.0.10:53", f"{KEPT}:5353"), False),
    ("externalIP -> removed endpoint", flow("203.0.113.10:53", f"{REMOVED}:5353"), True),
    ("externalIP -> remaining endpoint", flow("203.0.113.10:53", f"{KEPT}:5353"), False),
    ("LB VIP -> removed endpoint", flow("192.0.2.10:53", f"{REMOVED}:5353"), True),
    ("LB VIP -> remaining endpoint", flow("192.0.2.10:53", f"{KEPT}:5353"), False),
    # NodePort: any destination address with the nodePort
    ("nodeIP:nodePort -> removed", flow("172.30.0.2:30053", f"{REMOVED}:5353"), True),
    ("nodeIP:nodePort -> remaining", flow("172.30.0.2:30053", f"{KEPT}:5353"), False),
    ("other local IP:nodePort -> removed", flow("192.168.99.1:30053", f"{REMOVED}:5353"), True),
    ("127.0.0.1:nodePort -> removed", flow("127.0.0.1:30053", f"{REMOVED}:5353"), True),
    # 0 -> N: flows cached un-DNATed while there was nothing to DNAT to
    ("clusterIP not DNATed (0->N)", flow("10.96.0.10:53", "10.96.0.10:53"), True),
    ("externalIP not DNATed (0->N)", flow("203.0.113.10:53", "203.0.113.10:53"), True),
    ("LB VIP not DNATed (0->N)", flow("192.0.2.10:53", "192.0.2.10:53"), True),
    ("nodePort not DNATed (0->N)", flow("172.30.0.2:30053", "172.30.0.2:30053"), True),
    # serving endpoints stay allowed whatever their readiness; non-serving ones do not
    ("serving terminating endpoint", flow("10.96.0.10:53", f"{TERMINATING}:5353"), False),
    ("not serving endpoint", flow("10.96.0.10:53", f"{NOT_SERVING}:5353"), True),
    ("endpoint IP on an old port", flow("10.96.0.10:53", f"{KEPT}:5300"), True),
    # never touched: other destinations, other ports, other protocols
    ("not a service IP", flow("8.8.8.8:53", "8.8.8.8:53"), False),
    ("pod IP directly", flow(f"{REMOVED}:5353", f"{REMOVED}:5353"), False),
    ("clusterIP, other port", flow("10.96.0.10:54", f"{REMOVED}:5353"), False),
    ("TCP to the UDP frontend", flow("10.96.0.10:53", f"{REMOVED}:5353", proto=IPPROTO_TCP), False),
    ("TCP service", flow("10.96.0.30:80", "10.244.7.7:8080", proto=IPPROTO_TCP), False),
    # no serving endpoints: un-DNATed flows are left alone, DNATed ones (scale to zero) cleared
    ("no endpoints, not DNATed", flow("10.96.0.20:53", "10.96.0.20:53"), False),
    ("no endpoints, DNATed to a gone pod", flow("10.96.0.20:53", "10.244.8.8:5353"), True),
    # deleted since the previous sync: the same
    ("deleted service, DNATed", flow("10.96.0.50:53", "10.244.6.11:5353"), True),
    ("deleted service, not DNATed", flow("10.96.0.50:53", "10.96.0.50:53"), False),
    ("deleted nodePort, DNATed", flow("172.30.0.2:30099", "10.244.6.11:5353"), True),
    ("deleted nodePort, not DNATed", flow("8.8.4.4:30099", "8.8.4.4:30099"), False),
    # a Service IP frontend is judged by its own endpoints, not by an equal nodePort number
    ("clusterIP port == other nodePort", flow("10.96.0.40:30053", "10.244.5.11:5353"), False),
    ("... and its own stale flow", flow("10.96.0.40:30053", f"{KEPT}:5353"), True),
]


@pytest.mark.parametrize(("flow", "stale"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_planning_table(flow: Flow, stale: bool) -> None:
    allowed = allowed_endpoints(CURRENT, previous=PREVIOUS)
    assert is_stale(flow, allowed) is stale


def test_allowed_map_in_upstream_notation() -> None:
    allowed = allowed_endpoints(CURRENT, previous=PREVIOUS)
    dns = [f"{KEPT}:5353", f"{TERMINATING}:5353"]
    assert allowed.as_text() == {
        "*:30053": dns,
        "*:30099": [],
        "10.96.0.10:53": dns,
        "10.96.0.20:53": [],
        "10.96.0.40:30053": ["10.244.5.11:5353"],
        "10.96.0.50:53": [],
        "192.0.2.10:53": dns,
        "203.0.113.10:53": dns,
    }


def test_states_per_service_mapping_is_accepted() -> None:
    by_service = {NamespacedName("ns", s.info.name.name): (s,) for s in CURRENT}
    assert allowed_endpoints(by_service) == allowed_endpoints(CURRENT)


def test_previous_never_overrides_current_endpoints() -> None:
    # A frontend that exists now keeps its current endpoints, whatever it had before.
    now = [port_state("dns", "10.96.0.10", 53, [KEPT])]
    before = [port_state("dns", "10.96.0.10", 53, [REMOVED])]
    allowed = allowed_endpoints(now, previous=before)
    assert allowed.as_text() == {"10.96.0.10:53": [f"{KEPT}:5353"]}


def test_frontend_shared_by_two_services_allows_both() -> None:
    one = port_state("one", "10.96.0.11", 53, ["10.244.1.1"], external_ips=["203.0.113.1"])
    two = port_state("two", "10.96.0.12", 53, ["10.244.1.2"], external_ips=["203.0.113.1"])
    allowed = allowed_endpoints([one, two])
    assert allowed.as_text()["203.0.113.1:53"] == ["10.244.1.1:5353", "10.244.1.2:5353"]
    assert not is_stale(flow("203.0.113.1:53", "10.244.1.2:5353"), allowed)


def test_ipv6() -> None:
    state = port_state(
        "dns6",
        "fd00:96::10",
        53,
        ["fd00:244:2::11"],
        node_port=30053,
        external_ips=["2001:db8::10"],
        lb_vips=["2001:db8::20"],
    )
    allowed = allowed_endpoints([state])
    ep = ["[fd00:244:2::11]:5353"]
    assert allowed.as_text() == {
        "*:30053": ep,
        "[2001:db8::10]:53": ep,
        "[2001:db8::20]:53": ep,
        "[fd00:96::10]:53": ep,
    }
    src = "[fd00:30::100]:40000"
    table = [
        ("[fd00:96::10]:53", "[fd00:244:1::11]:5353", True),  # removed endpoint
        ("[2001:db8::10]:53", "[fd00:244:1::11]:5353", True),
        ("[2001:db8::20]:53", "[2001:db8::20]:53", True),  # 0 -> N
        ("[fd00:30::2]:30053", "[fd00:30::2]:30053", True),
        ("[fd00:96::10]:53", "[fd00:244:2::11]:5353", False),  # remaining endpoint
        ("[fd00:30::2]:30053", "[fd00:244:2::11]:5353", False),
        ("[fd00:96::99]:53", "[fd00:244:1::11]:5353", False),  # not a service
    ]
    for dst, reply, expected in table:
        assert is_stale(flow(dst, reply, src=src), allowed) is expected, (dst, reply)


def test_no_udp_frontend_means_nothing_to_do() -> None:
    assert not allowed_endpoints([])
    assert not allowed_endpoints([CURRENT[2]])  # TCP only
    assert allowed_endpoints([CURRENT[1]])  # a UDP frontend without endpoints still counts


def test_stale_flows_keeps_order() -> None:
    flows = [flow("10.96.0.10:53", f"{REMOVED}:5353", src=f"10.0.0.1:{n}") for n in range(5)]
    flows.insert(2, flow("10.96.0.10:53", f"{KEPT}:5353"))
    picked = stale_flows(flows, allowed_endpoints(CURRENT))
    assert [f.orig_src_port for f in picked] == [0, 1, 2, 3, 4]


def test_flow_text() -> None:
    f = flow("10.96.0.10:53", f"{REMOVED}:5353", src="10.0.0.1:4000")
    assert str(f) == "proto=17 10.0.0.1:4000 -> 10.96.0.10:53 (reply from 10.244.1.11:5353)"
    assert f.dnat
    assert not flow("10.96.0.10:53", "10.96.0.10:53").dnat


# ---- the cleaner over a fake table ---------------------------------------------------------------


def test_cleaner_deletes_only_stale_flows() -> None:
    table = FakeConntrack(IPFamily.IPv4)
    # One client port per case: original tuples are unique in a real table.
    cases = [(replace(f, orig_src_port=30000 + i), stale) for i, (_, f, stale) in enumerate(CASES)]
    flows = [f for f, _ in cases]
    table.add(flows)
    result = ConntrackCleaner(IPFamily.IPv4, table).clean(previous=PREVIOUS, current=CURRENT)
    expected = [f for f, stale in cases if stale]
    assert table.deleted == expected
    assert (result.scanned, result.stale, result.deleted) == (
        sum(f.proto == IPPROTO_UDP for f in flows),
        len(expected),
        len(expected),
    )
    assert result.family is IPFamily.IPv4
    assert not result.interrupted


def test_cleaner_is_idempotent() -> None:
    table = FakeConntrack(IPFamily.IPv4)
    table.add([flow("10.96.0.10:53", f"{REMOVED}:5353"), flow("10.96.0.10:53", f"{KEPT}:5353")])
    cleaner = ConntrackCleaner(IPFamily.IPv4, table)
    assert cleaner.clean(previous=PREVIOUS, current=CURRENT).deleted == 1
    again = cleaner.clean(previous=CURRENT, current=CURRENT)
    assert (again.scanned, again.deleted) == (1, 0)


def test_cleaner_skips_the_dump_without_udp_frontends() -> None:
    table = FakeConntrack(IPFamily.IPv4)
    table.add([flow("10.96.0.30:80", "10.244.7.7:8080")])
    result = ConntrackCleaner(IPFamily.IPv4, table).clean(current=[CURRENT[2]])
    assert (result.scanned, result.deleted, table.dumps) == (0, 0, 0)


class ExpiringConntrack(FakeConntrack):
    """Every dumped flow expires before it can be deleted."""

    def udp_flows(self) -> ct.FlowDump:
        dump = super().udp_flows()
        self.flows.clear()
        return dump


def test_flows_that_expired_meanwhile_are_not_counted() -> None:
    table = ExpiringConntrack(IPFamily.IPv4)
    table.add([flow("10.96.0.10:53", f"{REMOVED}:5353")])
    result = ConntrackCleaner(IPFamily.IPv4, table).clean(current=CURRENT)
    assert (result.stale, result.deleted) == (1, 0)


def test_kernel_errors_propagate() -> None:
    table = FakeConntrack(IPFamily.IPv4, fail_with=KernelError("conntrack dump failed"))
    with pytest.raises(KernelError, match="dump failed"):
        ConntrackCleaner(IPFamily.IPv4, table).clean(current=CURRENT)


def test_cleaner_and_table_family_must_agree() -> None:
    with pytest.raises(ValueError, match="IPv6"):
        ConntrackCleaner(IPFamily.IPv4, FakeConntrack(IPFamily.IPv6))


def test_default_table_is_netlink() -> None:
    cleaner = ConntrackCleaner(IPFamily.IPv6)
    assert isinstance(cleaner.table, NetlinkConntrack)
    assert cleaner.table.family is IPFamily.IPv6


# ---- the ctnetlink decoder, on hand-made messages ------------------------------------------------

AF4, AF6 = socket.AF_INET, socket.AF_INET6


def nl_tuple(kind: int, src: str, dst: str, proto: int = IPPROTO_UDP) -> bytes:
    """A CTA_TUPLE_* (`ip:port` to `ip:port`) as the kernel writes it: IP nest, proto nest."""
    (src_ip, sport), (dst_ip, dport) = hostport(src), hostport(dst)
    s, d = ct._ADDRESS_ATTRS[AF6 if src_ip.version == 6 else AF4]
    return ct._nested(
        kind,
        ct._nested(ct.CTA_TUPLE_IP, ct._nla(s, src_ip.packed), ct._nla(d, dst_ip.packed)),
        ct._nested(
            ct.CTA_TUPLE_PROTO,
            ct._nla(ct.CTA_PROTO_NUM, bytes([proto])),
            ct._nla(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
            ct._nla(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dport)),
        ),
    )


def nl_odd_tuple(kind: int, src: str, dst: str) -> bytes:
    """The same tuple with its parts in another order: forces the generic attribute walk."""
    (src_ip, sport), (dst_ip, dport) = hostport(src), hostport(dst)
    s, d = ct._ADDRESS_ATTRS[AF6 if src_ip.version == 6 else AF4]
    return ct._nested(
        kind,
        ct._nested(
            ct.CTA_TUPLE_PROTO,
            ct._nla(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dport)),
            ct._nla(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
            ct._nla(ct.CTA_PROTO_NUM, bytes([IPPROTO_UDP])),
        ),
        ct._nested(ct.CTA_TUPLE_IP, ct._nla(d, dst_ip.packed), ct._nla(s, src_ip.packed)),
    )


def nl_entry(af: int, orig: bytes, reply: bytes, *extra: bytes, flags: int = 2) -> bytes:
    status = ct._nla(3, struct.pack("!I", 10))  # CTA_STATUS, after the tuples
    kind = ct.NFNL_SUBSYS_CTNETLINK << 8  # IPCTNL_MSG_CT_NEW, as dumps report entries
    return ct._message(kind, flags, 1, af, orig + reply + b"".join(extra) + status)


def nl_done() -> bytes:
    return struct.pack("=IHHII", 20, ct.NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def nl_error(code: int) -> bytes:
    return struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, 1, 0, -code) + b"\0" * 16


def decode(table: NetlinkConntrack, *datagrams: bytes) -> tuple[list[Flow], bool, bool]:
    flows: list[Flow] = []
    done = interrupted = False
    for data in datagrams:
        done, intr = table._decode_dump(data, flows, {})
        interrupted = interrupted or intr
    return flows, done, interrupted


def test_decode_ipv4_udp_entries() -> None:
    table = NetlinkConntrack(IPFamily.IPv4)
    orig = nl_tuple(ct.CTA_TUPLE_ORIG, "10.0.0.1:40000", "10.96.0.10:53")
    reply = nl_tuple(ct.CTA_TUPLE_REPLY, "10.244.1.11:5353", "10.0.0.1:40000")
    tcp = nl_tuple(ct.CTA_TUPLE_ORIG, "10.0.0.1:40000", "10.96.0.10:53", IPPROTO_TCP)
    zone = ct._nla(ct.CTA_ZONE, struct.pack("!H", 7))
    flows, done, interrupted = decode(
        table,
        nl_entry(AF4, orig, reply) + nl_entry(AF4, tcp, reply) + nl_entry(AF4, orig, reply, zone),
        nl_done(),
    )
    expected = flow("10.96.0.10:53", "10.244.1.11:5353", src="10.0.0.1:40000")
    assert flows == [expected, Flow(**{**_fields(expected), "zone": 7})]
    assert done
    assert not interrupted


def _fields(f: Flow) -> dict[str, object]:
    return {name: getattr(f, name) for name in Flow.__slots__}


def test_decode_ipv6_and_the_generic_attribute_walk() -> None:
    table = NetlinkConntrack(IPFamily.IPv6)
    args = ("[fd00:30::100]:40000", "[fd00:96::10]:53")
    reply = nl_tuple(ct.CTA_TUPLE_REPLY, "[fd00:244:1::11]:5353", "[fd00:30::100]:40000")
    canonical = nl_entry(AF6, nl_tuple(ct.CTA_TUPLE_ORIG, *args), reply)
    odd = nl_entry(AF6, nl_odd_tuple(ct.CTA_TUPLE_ORIG, *args), reply)
    flows, _, _ = decode(table, canonical + odd)
    expected = flow("[fd00:96::10]:53", "[fd00:244:1::11]:5353", src="[fd00:30::100]:40000")
    assert flows == [expected, expected]


def test_decode_skips_the_other_family() -> None:
    table = NetlinkConntrack(IPFamily.IPv6)
    orig = nl_tuple(ct.CTA_TUPLE_ORIG, "10.0.0.1:40000", "10.96.0.10:53")
    reply = nl_tuple(ct.CTA_TUPLE_REPLY, "10.244.1.11:5353", "10.0.0.1:40000")
    assert decode(table, nl_entry(AF4, orig, reply))[0] == []


def test_decode_reports_an_interrupted_dump() -> None:
    table = NetlinkConntrack(IPFamily.IPv4)
    orig = nl_tuple(ct.CTA_TUPLE_ORIG, "10.0.0.1:40000", "10.96.0.10:53")
    reply = nl_tuple(ct.CTA_TUPLE_REPLY, "10.244.1.11:5353", "10.0.0.1:40000")
    entry = nl_entry(AF4, orig, reply, flags=2 | ct.NLM_F_DUMP_INTR)
    flows, done, interrupted = decode(table, entry + nl_done())
    assert (len(flows), done, interrupted) == (1, True, True)


def test_decode_turns_netlink_errors_into_kernel_errors() -> None:
    table = NetlinkConntrack(IPFamily.IPv4)
    with pytest.raises(KernelError, match="needs CAP_NET_ADMIN"):
        decode(table, nl_error(errno.EPERM))
    assert decode(table, nl_error(0))[1:] == (True, False)


def test_delete_request_round_trips_through_the_decoder() -> None:
    table = NetlinkConntrack(IPFamily.IPv4)
    f = Flow(IPPROTO_UDP, ip("10.0.0.1"), 40000, ip("10.96.0.10"), 53, ip("10.96.0.10"), 53, 3)
    request = table._delete_request(9, f)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, seq) == (len(request), ct.IPCTNL_MSG_CT_DELETE, 9)
    assert flags == ct.NLM_F_REQUEST | ct.NLM_F_ACK
    # The request carries the original tuple and the zone; decode it as if it were an entry.
    top = ct._attrs(request, 20, length)
    assert ct._BE16.unpack_from(request, top[ct.CTA_ZONE][0]) == (3,)
    decoded = table._decode_tuple(request, top[ct.CTA_TUPLE_ORIG])
    assert decoded == (IPPROTO_UDP, f.orig_src.packed, 40000, f.orig_dst.packed, 53)
