"""UDP conntrack cleanup against the real kernel: real flows, real DNAT, real deletions.

A netlab cluster with one node (pods a1, a2 answering UDP on 5353) and an external client that
routes the Service CIDR to node-a. node-a gets minimal hand-written DNAT rules for the UDP
ClusterIP; the cleaner runs inside node-a's namespace, as pyproxy does on a node. The client
keeps one UDP flow (fixed source port) and the tests check which pod answers it: without the
cleanup the old conntrack entry keeps the flow where it was, with it the flow moves.

The synthetic-table tests fill node-a's conntrack with `conntrack -R` and check the decoder at
scale (10,000 flows) and against pyroute2's.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Sequence

import pytest
from netlab import Cluster, Node, Reply, Result, Serve, udp_ask
from netlab.fixtures import cluster_fixture

from pyproxy.conntrack import (
    CleanupResult,
    ConntrackCleaner,
    NetlinkConntrack,
    Pyroute2Conntrack,
)
from pyproxy.conntrack_plan import IPPROTO_UDP, Flow, cleanup_needed
from pyproxy.model import IPFamily, Protocol, format_endpoint
from pyproxy.policy import categorize_endpoints
from pyproxy.proxystate import ServicePortState
from pyproxy.serviceport import EndpointInfo, ServicePortInfo, ServicePortName

pytestmark = pytest.mark.kernel

# node-a forwards the client's un-NATed datagrams back out of the interface they came in on,
# and so sends ICMP redirects; a client that obeyed would bypass node-a from then on.
NO_REDIRECTS = {
    f"net.{ipv}.conf.{dev}.accept_redirects": 0
    for ipv in ("ipv4", "ipv6")
    for dev in ("all", "default")
}
cluster = cluster_fixture(
    {"a": ("a1", "a2")}, serve=Serve(tcp=(), udp=(5353,)), sysctls={"client": NO_REDIRECTS}
)
bare = cluster_fixture({"a": ()}, serve=None)

FAMILIES = pytest.mark.parametrize("fam", [4, 6], ids=["ipv4", "ipv6"])
SERVICE_IP = {4: "10.96.0.10", 6: "fd00:96::10"}
SERVICE_CIDR = {4: "10.96.0.0/16", 6: "fd00:96::/112"}
PORT, TARGET, CLIENT_PORT = 53, 5353, 40053


def family(fam: int) -> IPFamily:
    return IPFamily.IPv4 if fam == 4 else IPFamily.IPv6


def state(
    fam: int, endpoint_ips: Sequence[str], *, terminating: Sequence[str] = ()
) -> ServicePortState:
    """The UDP service port `t/dns:dns` on SERVICE_IP:53 with these endpoints on 5353; those
    also in `terminating` are terminating but still serving."""
    info = ServicePortInfo(
        name=ServicePortName("t", "dns", "dns", Protocol.UDP),
        cluster_ip=ipaddress.ip_address(SERVICE_IP[fam]),
        port=PORT,
    )
    eps = tuple(
        EndpointInfo.make(
            ipaddress.ip_address(ep),
            TARGET,
            is_local=True,
            node_name="node-a",
            ready=ep not in terminating,
            terminating=ep in terminating,
        )
        for ep in sorted(endpoint_ips)
    )
    return ServicePortState(
        info, eps, categorize_endpoints(eps, info, node_name="node-a", zone=None)
    )


def program(node: Node, fam: int, endpoint_ips: Sequence[str]) -> None:
    """Replace node's nat table: SERVICE_IP:53/udp DNATed at random to the endpoints (if any).

    Without endpoints there is no rule at all, like a node whose rules are not there yet: the
    datagram is routed on (the LAN router answers "net unreachable") and its flow is confirmed
    without NAT, which is what keeps 0 -> N Services blackholed.
    """
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":TEST-SVC - [0:0]",
        # kube-proxy's masquerade rule: also what turns conntrack on in a namespace whose nat
        # table would otherwise have no NAT rule at all (the no-endpoints case below).
        "-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE",
        f"-A PREROUTING -d {SERVICE_IP[fam]} -p udp -m udp --dport {PORT} -j TEST-SVC",
    ]
    for i, ep in enumerate(endpoint_ips):
        left = len(endpoint_ips) - i
        chance = f"-m statistic --mode random --probability {1 / left:.5f} " if left > 1 else ""
        to = format_endpoint(ipaddress.ip_address(ep), TARGET)
        lines.append(f"-A TEST-SVC {chance}-p udp -j DNAT --to-destination {to}")
    lines.append("COMMIT")
    tool = "iptables-nft-restore" if fam == 4 else "ip6tables-nft-restore"
    node.run([tool], input="\n".join(lines) + "\n")


def ask(c: Cluster, fam: int) -> Result:
    """One datagram of the client's steady flow (always the same source port)."""
    return udp_ask(c.client, SERVICE_IP[fam], PORT, timeout=1.5, src_port=CLIENT_PORT)


def answered_by(result: Result) -> str:
    assert isinstance(result, Reply), result
    return result.name


def clean(
    node: Node, fam: int, previous: ServicePortState, current: ServicePortState
) -> CleanupResult:
    """Run the cleaner inside the node's network namespace."""

    def run() -> CleanupResult:
        return ConntrackCleaner(family(fam)).clean(previous=[previous], current=[current])

    return node.call(run)


def conntrack(node: Node, *args: str) -> str:
    return node.run(["conntrack", *args], check=False).stdout


@FAMILIES
def test_flow_to_a_removed_endpoint_moves_to_the_remaining_one(cluster: Cluster, fam: int) -> None:
    node = cluster.node("a")
    pods = {name: cluster.pod(name).addr(fam) for name in ("a1", "a2")}
    cluster.client_route(SERVICE_CIDR[fam], "a")
    program(node, fam, list(pods.values()))

    removed = answered_by(ask(cluster, fam))
    remaining = next(name for name in pods if name != removed)
    for _ in range(3):  # the flow is sticky: conntrack, not the random rule, decides
        assert answered_by(ask(cluster, fam)) == removed

    # The endpoint leaves the Service: the rules no longer mention it...
    program(node, fam, [pods[remaining]])
    # ...but the flow's conntrack entry still does (this is what the cleanup is for).
    assert answered_by(ask(cluster, fam)) == removed

    before = state(fam, list(pods.values()))
    after = state(fam, [pods[remaining]])
    result = clean(node, fam, before, after)
    assert (result.stale, result.deleted) == (1, 1), result
    assert answered_by(ask(cluster, fam)) == remaining

    # The new flow is valid: cleaning again (e.g. after the next sync) leaves it alone.
    assert clean(node, fam, after, after).deleted == 0
    assert answered_by(ask(cluster, fam)) == remaining


@FAMILIES
def test_flow_cached_before_there_were_endpoints_is_cleared(cluster: Cluster, fam: int) -> None:
    node = cluster.node("a")
    a1 = cluster.pod("a1").addr(fam)
    cluster.client_route(SERVICE_CIDR[fam], "a")

    program(node, fam, [])
    assert not isinstance(ask(cluster, fam), Reply)
    program(node, fam, [a1])
    # UDP 0 -> N: the un-DNATed entry keeps the flow blackholed although the rule is there.
    assert not isinstance(ask(cluster, fam), Reply)
    udp = conntrack(node, "-L", "-p", "udp", "-f", "ipv4" if fam == 4 else "ipv6")
    assert f"sport={CLIENT_PORT}" in udp, udp

    result = clean(node, fam, state(fam, []), state(fam, [a1]))
    assert (result.stale, result.deleted) == (1, 1), result
    assert answered_by(ask(cluster, fam)) == "a1"


def sync(node: Node, fam: int, before: ServicePortState, after: ServicePortState) -> int | None:
    """What the controller does in a sync: write the rules for the endpoints `after` uses, then
    clean conntrack if `cleanup_needed` says so; the number of flows deleted, None if skipped."""
    program(node, fam, [str(ep.ip) for ep in after.categorized.all_reachable])
    if not cleanup_needed([before], [after]):
        return None
    return clean(node, fam, before, after).deleted


@FAMILIES
def test_flow_leaves_an_endpoint_removed_after_terminating(cluster: Cluster, fam: int) -> None:
    """Issue 16: the endpoint leaves the rules while still serving, then goes away."""
    node = cluster.node("a")
    pods = {name: cluster.pod(name).addr(fam) for name in ("a1", "a2")}
    ips = list(pods.values())
    cluster.client_route(SERVICE_CIDR[fam], "a")
    ready = state(fam, ips)
    program(node, fam, ips)
    leaving = answered_by(ask(cluster, fam))
    staying = next(name for name in pods if name != leaving)

    # Step 1: terminating but serving. The rules drop it; its flow is valid and kept.
    draining = state(fam, ips, terminating=[pods[leaving]])
    assert sync(node, fam, ready, draining) is None
    assert answered_by(udp_ask(cluster.client, SERVICE_IP[fam], PORT, timeout=1.5)) == staying
    assert answered_by(ask(cluster, fam)) == leaving

    # Step 2: removed. The rules stay as they were; the flow is stale and must go.
    gone = state(fam, [pods[staying]])
    deleted = sync(node, fam, draining, gone)
    assert answered_by(ask(cluster, fam)) == staying
    assert deleted == 1


# ---- synthetic tables ----------------------------------------------------------------------------

CLIENT4, CLIENT6 = "172.30.0.100", "fd00:30::100"
EP_A = {4: "10.244.1.11", 6: "fd00:244:1::11"}
EP_B = {4: "10.244.1.12", 6: "fd00:244:1::12"}


def insert_line(src: str, sport: int, dst: tuple[str, int], reply: tuple[str, int]) -> str:
    """`conntrack -R` line: a UDP flow src:sport -> dst whose replies come from `reply`."""
    return (
        f"-I -p udp -s {src} -d {dst[0]} --sport {sport} --dport {dst[1]}"
        f" -r {reply[0]} -q {src} --reply-port-src {reply[1]} --reply-port-dst {sport}"
        " -t 600 -u SEEN_REPLY"
    )


def load(node: Node, lines: Sequence[str]) -> None:
    node.run(["conntrack", "-R", "-"], input="\n".join(lines) + "\n", timeout=120)


def test_ten_thousand_flows_scanned_and_a_quarter_deleted(bare: Cluster) -> None:
    node = bare.node("a")
    svc, a, b = SERVICE_IP[4], EP_A[4], EP_B[4]
    lines = [
        insert_line(CLIENT4, 10000 + i, (svc, PORT), (a if i % 4 == 0 else b, TARGET))
        for i in range(10_000)
    ]
    # Things the cleanup must not touch: TCP to the same frontend via the removed endpoint,
    # UDP to a non-service address, and IPv6 flows (another family's table view).
    lines += [
        f"-I -p tcp -s {CLIENT4} -d {svc} --sport 20000 --dport {PORT} -r {a} -q {CLIENT4}"
        f" --reply-port-src {TARGET} --reply-port-dst 20000 -t 600 --state ESTABLISHED",
        insert_line(CLIENT4, 20001, ("8.8.8.8", PORT), ("8.8.8.8", PORT)),
        insert_line(CLIENT6, 20002, (SERVICE_IP[6], PORT), (EP_A[6], TARGET)),
    ]
    load(node, lines)
    assert conntrack(node, "-C").strip() == "10003"

    started = time.monotonic()
    result = clean(node, 4, state(4, [a, b]), state(4, [b]))
    elapsed = time.monotonic() - started
    print(f"\nconntrack cleanup: {result} (wall {elapsed:.3f} s)")
    assert (result.scanned, result.stale, result.deleted) == (10_001, 2_500, 2_500)
    assert not result.interrupted
    # pyroute2 needs 10-20 s for this; the netlink table well under one. Generous bound.
    assert result.seconds < 5

    def listed(*args: str) -> list[str]:
        return [line for line in conntrack(node, "-L", *args).splitlines() if "src=" in line]

    assert conntrack(node, "-C").strip() == str(10_003 - 2_500)
    assert listed("-p", "udp", "-f", "ipv4", "-r", a) == []
    assert len(listed("-p", "udp", "-f", "ipv4", "-r", b)) == 7_500
    assert len(listed("-p", "tcp", "-r", a)) == 1  # TCP is never touched
    assert len(listed("-p", "udp", "-d", "8.8.8.8")) == 1
    assert len(listed("-p", "udp", "-f", "ipv6")) == 1


@FAMILIES
def test_netlink_decoder_agrees_with_pyroute2(bare: Cluster, fam: int) -> None:
    node = bare.node("a")
    client = CLIENT4 if fam == 4 else CLIENT6
    lines = [
        insert_line(client, 30000 + i, (SERVICE_IP[fam], PORT), (EP_A[fam], TARGET))
        for i in range(50)
    ]
    lines += [insert_line(client, 31000, (SERVICE_IP[fam], PORT), (SERVICE_IP[fam], PORT))]
    lines += [insert_line(client, 31001, (SERVICE_IP[fam], PORT), (EP_B[fam], TARGET)) + " -w 7"]
    load(node, lines)

    def dumps() -> tuple[list[Flow], list[Flow]]:
        return (
            NetlinkConntrack(family(fam)).udp_flows().flows,
            Pyroute2Conntrack(family(fam)).udp_flows().flows,
        )

    ours, theirs = node.call(dumps)
    assert len(ours) == 52
    assert sorted(ours, key=str) == sorted(theirs, key=str)
    zoned = [f for f in ours if f.zone]
    assert [(f.zone, str(f.reply_src), f.proto) for f in zoned] == [(7, EP_B[fam], IPPROTO_UDP)]

    # Deletion by original tuple, zone included; a flow that is already gone is not counted.
    def delete() -> tuple[int, int]:
        table = NetlinkConntrack(family(fam))
        return table.delete(zoned), table.delete(zoned)

    assert node.call(delete) == (1, 0)
    assert "zone=7" not in conntrack(node, "-L", "-p", "udp", "-f", "ipv4" if fam == 4 else "ipv6")

    # Five flows that still exist (the dump order is the kernel's: the zoned one may be first).
    remaining = [f for f in ours if not f.zone][:5]

    def delete_with_pyroute2() -> int:
        return Pyroute2Conntrack(family(fam)).delete(remaining)

    assert node.call(delete_with_pyroute2) == 5
    assert len(node.call(lambda: NetlinkConntrack(family(fam)).udp_flows().flows)) == 46


def test_conntrack_tool_sees_the_same_flows(bare: Cluster) -> None:
    """The decoder's view matches `conntrack -L` field by field on a real table."""
    node = bare.node("a")
    load(
        node,
        [
            insert_line(CLIENT4, 41000 + i, (SERVICE_IP[4], PORT), (EP_A[4], TARGET))
            for i in range(3)
        ],
    )
    flows = node.call(lambda: NetlinkConntrack(IPFamily.IPv4).udp_flows().flows)
    listing = subprocess.run(
        ["ip", "netns", "exec", node.name, "conntrack", "-L", "-p", "udp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for f in flows:
        assert (
            f"src={f.orig_src} dst={f.orig_dst} sport={f.orig_src_port} dport={f.orig_dst_port}"
            f" src={f.reply_src} dst={f.orig_src} sport={f.reply_src_port}"
        ) in listing
