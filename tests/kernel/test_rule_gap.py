"""Packets sent to an LB IP before its rule exists, and what they leave behind.

The integration lifecycle test once got no answer from a LoadBalancer IP for 15 s although the
rule was written. Its probes had started right after the status patch, before the sync. The
cause, reproduced in that test (probes before the rule, looped under the machine's usual load)
and built here step by step:

1. Without a rule node-a routes the client's SYN for the LB IP on, back out of the LAN
   interface it came in on, to the LAN router, and sends the client an ICMP redirect ("use
   172.30.0.1 for that address"). The router answers net unreachable, or nothing once its ICMP
   rate limit (one per second per peer) holds the error back; then the client waits.
2. The redirect for a connection's first SYN is not taken: node-a's netfilter drops it (it
   passes OUTPUT and never reaches POSTROUTING; NAT drops redirects for a flow whose NAT is not
   complete, and that SYN is still between PREROUTING and POSTROUTING), and one that gets
   through while connect() holds the socket lock is dropped by the client (TcpExtLockDroppedIcmps).
   The retransmitted SYN (1 s later, sent by a timer, same tuple) belongs to a confirmed,
   untranslated flow: its redirect gets through, and the client caches the router as next hop
   for the LB IP for 5 minutes (`ip route show cache`: `<redirected>`; `ip route show table
   all`, which the diagnosis printed, does not list it).
3. From then on the client sends to the router directly. The rule on node-a is never reached.

So the failure needed a probe that was still waiting when its SYN was retransmitted, i.e. a
router holding back its ICMP error and a 1 s probe timeout losing the race against the 1 s
retransmission timer: rare, likelier under load. Nothing pyproxy writes takes part, and
kube-proxy's rules behave the same: it is the test network's, fixed there. netlab hosts ignore
redirects (`tests/netlab/cluster.py` COMMON_SYSCTLS), as clients of LB IPs in a real network do
not sit on the node's LAN with the node as their gateway. Here the router's silence is a
blackhole route instead of its rate limit, so the ordering is built, not waited for.

What remains, and is upstream behaviour: a TCP flow (tuple) first seen during the gap stays
untranslated in conntrack (SYN_SENT: 120 s), so a retransmission of a connect() begun before
the rule is not answered. kube-proxy deletes stale UDP entries only
(`pkg/proxy/conntrack/cleanup.go`), and so does pyproxy; new connections use new source ports.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from netlab import Cluster, Reply, Serve, Timeout, Unreachable, tcp_ask
from netlab.fixtures import cluster_fixture

pytestmark = pytest.mark.kernel

LAYOUT = {"a": ("a1",), "b": ("b1",)}
LB_IP, ROUTER, NODE_A = "192.0.2.10", "172.30.0.1", "172.30.0.2"
#: The source port of the probe whose SYN is retransmitted during the gap.
GAP_PORT = 41010

cluster = cluster_fixture(LAYOUT, serve=Serve(tcp=(8080,), udp=()))
# What a Linux client does by default: take the redirect.
redirected = cluster_fixture(
    LAYOUT,
    serve=Serve(tcp=(8080,), udp=()),
    sysctls={"client": {f"net.ipv4.conf.{dev}.accept_redirects": 1 for dev in ("all", "default")}},
)

Obj = dict[str, Any]


def objects(lb_ip: str | None) -> list[Obj]:
    """demo/web as in the lifecycle test: type LoadBalancer, endpoint b1 on node-b, and the LB
    IP in its status once the load balancer has assigned one."""
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "demo", "name": "web"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.1.10",
            "clusterIPs": ["10.96.1.10"],
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}],
        },
    }
    if lb_ip is not None:
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    eps: Obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "demo",
            "name": "web-x",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.2.11"], "nodeName": "node-b", "conditions": {"ready": True}}
        ],
    }
    return [svc, eps]


def program(c: Cluster, tmp: Path, items: Sequence[Obj]) -> str:
    """`pyproxy --once` on node-a with these objects; returns node-a's rules afterwards."""
    state = tmp / "state.json"
    state.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}))
    node = c.node("a")
    result = node.run(
        [sys.executable, "-m", "pyproxy", "--once", "--state", str(state),
         "--hostname-override", "node-a", "--node-ip", NODE_A,
         "--cluster-cidr", "10.244.0.0/16", "--iptables-backend", "nft"],
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return node.run(["iptables-nft-save"]).stdout


def probe_during_the_gap(c: Cluster, tmp: Path) -> None:
    """The lifecycle test's ordering: the Service is a LoadBalancer without an LB IP yet and
    the client already probes the IP; then the IP is assigned and the rule written."""
    c.client_route("192.0.2.0/24", "a")
    assert f"-d {LB_IP}/32" not in program(c, tmp, objects(None))
    # Untranslated, the SYN goes on to the router, which has no route for it. Its answer also
    # teaches the client the router's link-layer address (a redirect needs it).
    assert isinstance(tcp_ask(c.client, LB_IP, 80, timeout=1.5), Unreachable)
    # The router holds its ICMP error back (as its rate limit did in CI): the client waits and
    # retransmits its SYN after 1 s, on the flow node-a's conntrack has confirmed untranslated.
    c.lan.ip_cmd("route", "add", "blackhole", "192.0.2.0/24")
    try:
        assert isinstance(tcp_ask(c.client, LB_IP, 80, timeout=3, src_port=GAP_PORT), Timeout)
    finally:
        c.lan.ip_cmd("route", "del", "blackhole", "192.0.2.0/24")
    assert f"-d {LB_IP}/32" in program(c, tmp, objects(LB_IP))


def route_cache(c: Cluster) -> str:
    return c.client.run(["ip", "route", "show", "cache", LB_IP]).stdout


def test_client_that_takes_redirects_is_kept_away_from_the_rule(
    redirected: Cluster, tmp_path: Path
) -> None:
    """The mechanism of the CI failure (and why netlab ignores redirects)."""
    c = redirected
    probe_during_the_gap(c, tmp_path)
    assert f"{LB_IP} via {ROUTER} dev eth0" in route_cache(c)
    assert "redirected" in route_cache(c)
    # The rule is there, but the client's packets go straight to the router.
    assert not isinstance(tcp_ask(c.client, LB_IP, 80, timeout=1.5), Reply)
    # Control: the rule does answer a sender that still routes via node-a.
    c.client.ip_cmd("route", "flush", "cache")
    assert isinstance(r := tcp_ask(c.client, LB_IP, 80), Reply) and r.name == "b1"


def test_client_that_probed_during_the_gap_is_answered_once_the_rule_exists(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    probe_during_the_gap(c, tmp_path)
    assert "redirected" not in route_cache(c)
    for _ in range(5):
        r = tcp_ask(c.client, LB_IP, 80)
        assert isinstance(r, Reply) and r.name == "b1", r
        assert r.peer_ip == NODE_A  # externalTrafficPolicy Cluster: masqueraded


def test_connect_begun_during_the_gap_stays_untranslated(cluster: Cluster, tmp_path: Path) -> None:
    """A SYN with the tuple of a flow first seen during the gap (what a retransmission of that
    connect() sends) matches the untranslated conntrack entry, so the rule never sees it.
    Upstream kube-proxy leaves TCP entries alone too; new connections take new ports."""
    c = cluster
    probe_during_the_gap(c, tmp_path)
    flows = c.node("a").run(["conntrack", "-L", "-p", "tcp", "--sport", str(GAP_PORT)]).stdout
    assert f"dst={LB_IP} sport={GAP_PORT} dport=80 [UNREPLIED] src={LB_IP}" in flows, flows
    assert isinstance(tcp_ask(c.client, LB_IP, 80, timeout=1.5, src_port=GAP_PORT), Unreachable)
    r = tcp_ask(c.client, LB_IP, 80)
    assert isinstance(r, Reply) and r.name == "b1", r
