"""Real packets through what IpvsProxier programs, inside the IPVS test VM.

A netlab cluster (tests/netlab): node-a with pods a1, a2, a3; node-b with pods b1, b2; an
external client on the LAN. An IpvsProxier per node and family runs in this process, switched
into the node's network namespace for each sync (netlab's `Netns.call`), from states built with
pyproxy.convert, as the DaemonSet would program every node. The tests check which endpoint
answered and which source address the backend saw.

    hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytest
from netlab import (
    Cluster,
    Node,
    Refused,
    Reply,
    Serve,
    Timeout,
    sctp_ask,
    spread,
    tcp_ask,
    udp_ask,
)
from netlab.fixtures import cluster_fixture

from pyproxy.convert import state_from_objects
from pyproxy.iptables.restore import Iptables
from pyproxy.ipvs.diff import DeleteRealServer, DrainRealServer
from pyproxy.ipvs.proxier import IpvsProxier, cleanup
from pyproxy.model import IPFamily, NamespacedName
from pyproxy.proxier import SyncResult
from pyproxy.proxystate import ProxierConfig, desired_state

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ip_vs")]

LAYOUT = {"a": ("a1", "a2", "a3"), "b": ("b1", "b2")}
A1, A2, A3 = "10.244.1.11", "10.244.1.12", "10.244.1.13"
B1, B2 = "10.244.2.11", "10.244.2.12"
NODE_A, NODE_B, CLIENT = "172.30.0.2", "172.30.0.3", "172.30.0.100"
CLUSTER_CIDR = {IPFamily.IPv4: "10.244.0.0/16", IPFamily.IPv6: "fd00:244::/48"}

Obj = dict[str, Any]


# --- API objects (what `kubectl get -o yaml` would show) ------------------------------------


def svc(name: str, ip: str | Sequence[str], ports: Sequence[Obj], **spec: Any) -> Obj:
    ips = [ip] if isinstance(ip, str) else list(ip)
    status = spec.pop("status", None)
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "t", "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips, "ports": list(ports)}
        | spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def tcp(port: int, node_port: int | None = None, name: str = "http", proto: str = "TCP") -> Obj:
    out: Obj = {"name": name, "port": port, "protocol": proto}
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def eps(
    service: str,
    endpoints: Sequence[tuple[str, str]],
    port: int = 8080,
    *,
    proto: str = "TCP",
    family: str = "IPv4",
    name: str | None = None,
    port_name: str = "http",
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "t",
            "name": name or f"{service}-x",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": [{"name": port_name, "port": port, "protocol": proto}],
        "endpoints": [
            {"addresses": [ip], "nodeName": node, "conditions": {"ready": True}}
            for ip, node in endpoints
        ],
    }


def lb(ip: str) -> Obj:
    return {"loadBalancer": {"ingress": [{"ip": ip}]}}


BASE = [
    svc("web", "10.96.0.10", [tcp(80)]),
    eps("web", [(A1, "node-a"), (B1, "node-b"), (B2, "node-b")]),
    svc("dns", "10.96.0.53", [tcp(53, name="dns", proto="UDP")]),
    eps("dns", [(A1, "node-a"), (B1, "node-b")], 5353, proto="UDP", port_name="dns"),
    svc("self", "10.96.0.20", [tcp(80)]),
    eps("self", [(A3, "node-a")]),
    svc("np", "10.96.0.40", [tcp(80, 30040)], type="NodePort"),
    eps("np", [(B1, "node-b")]),
    svc(
        "local",
        "10.96.0.50",
        [tcp(80, 30050)],
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=32050,
        status=lb("192.0.2.50"),
    ),
    eps("local", [(A1, "node-a")]),
    svc("lbc", "10.96.0.55", [tcp(80, 30055)], type="LoadBalancer", status=lb("192.0.2.55")),
    eps("lbc", [(B2, "node-b")]),
    svc(
        "lb-open",
        "10.96.0.60",
        [tcp(80, 30060)],
        type="LoadBalancer",
        loadBalancerSourceRanges=["172.30.0.96/28"],
        status=lb("192.0.2.60"),
    ),
    eps("lb-open", [(B2, "node-b")]),
    svc(
        "lb-closed",
        "10.96.0.61",
        [tcp(80, 30061)],
        type="LoadBalancer",
        loadBalancerSourceRanges=["203.0.113.0/24"],
        status=lb("192.0.2.61"),
    ),
    eps("lb-closed", [(B2, "node-b")]),
    svc("ext", "10.96.0.70", [tcp(80)], externalIPs=["198.51.100.70"]),
    eps("ext", [(B1, "node-b")]),
    svc(
        "sticky",
        "10.96.0.80",
        [tcp(80)],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
    ),
    eps("sticky", [(A1, "node-a"), (B1, "node-b"), (B2, "node-b")]),
    svc("itp", "10.96.0.90", [tcp(80)], internalTrafficPolicy="Local"),
    eps("itp", [(A1, "node-a"), (B1, "node-b")]),
    svc("dual", ["10.96.0.110", "fd00:96::110"], [tcp(80)], ipFamilies=["IPv4", "IPv6"]),
    eps("dual", [(A1, "node-a"), (B1, "node-b")], name="dual-v4"),
    eps("dual", [("fd00:244:2::11", "node-b")], family="IPv6", name="dual-v6"),
]


# --- the proxies ------------------------------------------------------------------------------


class NodeProxy:
    """IpvsProxier for each family of one netlab node, syncing inside the node's namespace."""

    def __init__(
        self,
        node: Node,
        *,
        scheduler: str = "rr",
        drain_timeout: float = 900,
        families: Sequence[IPFamily] = (IPFamily.IPv4,),
    ) -> None:
        self.node = node
        self.proxiers: dict[IPFamily, IpvsProxier] = {}
        for family in families:
            node_ip = node.ip if family is IPFamily.IPv4 else node.ip6
            config = ProxierConfig(
                family=family,
                node_name=node.node_name,
                node_ips=(ipaddress.ip_address(node_ip),),
                cluster_cidr=ipaddress.ip_network(CLUSTER_CIDR[family]),
            )
            self.proxiers[family] = IpvsProxier(
                config,
                Iptables(family, "nft"),
                scheduler=scheduler,
                drain_timeout=drain_timeout,
            )

    @property
    def v4(self) -> IpvsProxier:
        return self.proxiers[IPFamily.IPv4]

    def sync(
        self, objects: Sequence[Obj], changed: set[NamespacedName] | None = None
    ) -> dict[IPFamily, SyncResult]:
        cluster, problems = state_from_objects(objects)
        assert problems == [], [str(p) for p in problems]
        results = {}
        for family, proxier in self.proxiers.items():
            states = desired_state(cluster, proxier.config)
            results[family] = self.node.call(proxier.sync, states, changed)
        return results


DUAL = (IPFamily.IPv4, IPFamily.IPv6)


def program(c: Cluster, objects: Sequence[Obj], nodes: Sequence[str] = ("a", "b")) -> None:
    for key in nodes:
        NodeProxy(c.node(key), families=DUAL).sync(objects)


def name(result: object) -> str:
    assert isinstance(result, Reply), f"expected an answer, got {result!r}"
    return result.name


def peer(result: object) -> str:
    assert isinstance(result, Reply), f"expected an answer, got {result!r}"
    return result.peer_ip


def ipvsadm(node: Node) -> str:
    return node.run(["ipvsadm", "-Ln"]).stdout


def snapshot(node: Node) -> dict[str, str]:
    """What the kernel holds, without counters and random values."""
    ipset = "\n".join(
        line.split(" bucketsize")[0] for line in node.run(["ipset", "save"]).stdout.splitlines()
    )
    rules = "\n".join(
        line.split(" [")[0]
        for line in node.run(["iptables-nft-save"]).stdout.splitlines()
        if not line.startswith("#")
    )
    return {
        "ipvs": ipvsadm(node),
        "ipset": ipset,
        "iptables": rules,
        "addresses": node.run(["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout,
    }


shared_cluster = cluster_fixture(LAYOUT, scope="module")
fresh_cluster = cluster_fixture(LAYOUT)
sctp_cluster = cluster_fixture(LAYOUT, serve=Serve(tcp=(), udp=(), sctp=(7777,)))


@pytest.fixture(scope="module")
def net(shared_cluster: Cluster) -> Cluster:
    c = shared_cluster
    c.client_route("192.0.2.0/24", "a")
    c.client_route("198.51.100.0/24", "a")
    c.client_route("10.96.0.0/16", "a")
    started = time.monotonic()
    program(c, BASE)
    print(f"programmed both nodes in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return c


# --- ClusterIP --------------------------------------------------------------------------------


def test_cluster_ip_spreads_over_every_endpoint_without_masquerade(net: Cluster) -> None:
    assert set(spread(net.pod("a2"), "10.96.0.10", 80, 30)) == {"a1", "b1", "b2"}
    for _ in range(4):
        assert peer(tcp_ask(net.pod("a2"), "10.96.0.10", 80)) == A2
    assert set(spread(net.pod("b2"), "10.96.0.10", 80, 30)) == {"a1", "b1", "b2"}
    web = ipvsadm(net.node("a")).split("TCP  10.96.0.10:80 rr\n")[1]
    for pod_ip in (A1, B1, B2):
        assert f"-> {pod_ip}:8080" in web.split("TCP ")[0]


def test_udp_cluster_ip(net: Cluster) -> None:
    seen = {name(udp_ask(net.pod("a2"), "10.96.0.53", 53)) for _ in range(12)}
    assert seen == {"a1", "b1"}


def test_hairpin_pod_reaches_itself_masqueraded(net: Cluster) -> None:
    reply = tcp_ask(net.pod("a3"), "10.96.0.20", 80)
    assert name(reply) == "a3"
    assert peer(reply) != A3  # KUBE-LOOP-BACK masquerade, or the reply would skip IPVS


def test_off_cluster_client_to_cluster_ip_is_masqueraded(net: Cluster) -> None:
    reply = tcp_ask(net.client, "10.96.0.10", 80)
    assert name(reply) in {"a1", "b1", "b2"}
    assert peer(reply) != CLIENT


def test_other_ports_of_a_service_ip_are_rejected(net: Cluster) -> None:
    # KUBE-IPVS-FILTER: no reaching the node's own ports through a Service IP.
    assert isinstance(tcp_ask(net.pod("a2"), "10.96.0.10", 22, timeout=2), Refused)


def test_internal_traffic_policy_local(net: Cluster) -> None:
    assert set(spread(net.pod("a2"), "10.96.0.90", 80, 12)) == {"a1"}
    assert set(spread(net.pod("b2"), "10.96.0.90", 80, 12)) == {"b1"}


def test_client_ip_persistence_sticks(net: Cluster) -> None:
    first = name(tcp_ask(net.pod("a2"), "10.96.0.80", 80))
    assert all(name(tcp_ask(net.pod("a2"), "10.96.0.80", 80)) == first for _ in range(12))
    assert "TCP  10.96.0.80:80 rr persistent 300" in ipvsadm(net.node("a"))
    # Control: without persistence the same client spreads.
    assert len(set(spread(net.pod("a2"), "10.96.0.10", 80, 20))) > 1


def test_ipv6_cluster_ip(net: Cluster) -> None:
    assert set(spread(net.pod("a2"), "fd00:96::110", 80, 8)) == {"b1"}
    assert set(spread(net.pod("a2"), "10.96.0.110", 80, 16)) == {"a1", "b1"}
    assert "TCP  [fd00:96::110]:80 rr" in ipvsadm(net.node("a"))


# --- NodePort, LoadBalancer, externalIPs ------------------------------------------------------


def test_node_port_from_the_external_client_is_masqueraded(net: Cluster) -> None:
    for node_ip in (NODE_A, NODE_B):
        reply = tcp_ask(net.client, node_ip, 30040)
        assert name(reply) == "b1"
        assert peer(reply) != CLIENT


def test_load_balancer_ip_from_the_external_client(net: Cluster) -> None:
    reply = tcp_ask(net.client, "192.0.2.55", 80)
    assert name(reply) == "b2"
    assert peer(reply) != CLIENT  # externalTrafficPolicy Cluster: masqueraded


def test_external_traffic_policy_local_keeps_the_client_address(net: Cluster) -> None:
    for target, port in ((NODE_A, 30050), ("192.0.2.50", 80)):
        reply = tcp_ask(net.client, target, port)
        assert name(reply) == "a1"
        assert peer(reply) == CLIENT


def test_external_traffic_policy_local_on_a_node_without_local_endpoints(net: Cluster) -> None:
    # Upstream ipvs mode: the Cluster endpoints are used, unmasqueraded, so the reply bypasses
    # node-b and the client never completes the handshake.
    assert isinstance(tcp_ask(net.client, NODE_B, 30050, timeout=1.5), Timeout)
    # A pod on node-b still reaches the LB IP (short-circuit to the cluster endpoints).
    assert name(tcp_ask(net.pod("b2"), "192.0.2.50", 80)) == "a1"


def test_load_balancer_source_ranges(net: Cluster) -> None:
    assert name(tcp_ask(net.client, "192.0.2.60", 80)) == "b2"
    assert isinstance(tcp_ask(net.client, "192.0.2.61", 80, timeout=1.5), Timeout)
    # NodePorts are not subject to loadBalancerSourceRanges (upstream behaviour).
    assert name(tcp_ask(net.client, NODE_A, 30061)) == "b2"


def test_external_ip(net: Cluster) -> None:
    reply = tcp_ask(net.client, "198.51.100.70", 80)
    assert name(reply) == "b1"
    assert peer(reply) != CLIENT


# --- changes, graceful termination, idempotence, schedulers, cleanup ---------------------------

ECHO_SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen(64)
def serve(conn):
    with conn:
        for line in conn.makefile("rb"):
            conn.sendall(f"{name} {line.decode().strip()}\n".encode())
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def _echo(c: Cluster, pods: Sequence[str]) -> None:
    for pod in pods:
        c.pod(pod).popen([sys.executable, "-c", ECHO_SERVER, pod])
    deadline = time.monotonic() + 20
    for pod in pods:
        while True:
            with contextlib.suppress(OSError):
                s = c.node("a").socket()
                with s:
                    s.settimeout(1)
                    s.connect((c.pod(pod).ip, 9000))
                    break
            assert time.monotonic() < deadline, f"echo server in {pod} did not start"
            time.sleep(0.2)


def _ask_line(sock: socket.socket, text: str) -> str:
    sock.sendall(text.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        assert chunk, "connection closed"
        data += chunk
    return data.decode().strip()


def _drain_state(endpoints: Sequence[tuple[str, str]]) -> list[Obj]:
    return [
        svc("drain", "10.96.0.95", [tcp(90, name="echo")]),
        eps("drain", endpoints, 9000, port_name="echo"),
        svc("udp", "10.96.0.96", [tcp(53, name="dns", proto="UDP")]),
        eps("udp", endpoints, 5353, proto="UDP", port_name="dns"),
    ]


def test_removed_endpoint_drains_gracefully(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    _echo(c, ["a1", "b1"])
    proxy = NodeProxy(c.node("a"))
    both = [(A1, "node-a"), (B1, "node-b")]
    proxy.sync(_drain_state(both))

    sock = c.pod("a2").socket()
    sock.settimeout(5)
    sock.connect(("10.96.0.95", 90))
    chosen, _ = _ask_line(sock, "hello").split()
    other = "b1" if chosen == "a1" else "a1"
    remaining = [ep for ep in both if ep[0] != c.pod(chosen).ip]
    changed = {NamespacedName("t", "drain"), NamespacedName("t", "udp")}
    proxy.sync(_drain_state(remaining), changed)

    diff = proxy.v4.last_diff
    assert diff is not None
    drained = [op for op in diff.operations if isinstance(op, DrainRealServer)]
    assert [op.real_server.endpoint for op in drained] == [f"{c.pod(chosen).ip}:9000"]
    # UDP real servers are deleted at once (expire_nodest_conn ends stale flows).
    deleted = [op for op in diff.operations if isinstance(op, DeleteRealServer)]
    assert [op.real_server.endpoint for op in deleted] == [f"{c.pod(chosen).ip}:5353"]
    table = ipvsadm(c.node("a"))
    assert f"-> {c.pod(chosen).ip}:9000" in table
    assert f"{c.pod(chosen).ip}:5353" not in table

    # The open connection keeps working; new connections go to the other endpoint.
    assert _ask_line(sock, "still there?") == f"{chosen} still there?"
    for _ in range(6):
        with contextlib.closing(c.pod("a2").socket()) as s2:
            s2.settimeout(5)
            s2.connect(("10.96.0.95", 90))
            assert _ask_line(s2, "new").split()[0] == other
    assert proxy.v4.draining

    # Close with a reset (IPVS then forgets the connection after its CLOSE timeout, 10 s;
    # a FIN would leave it in TIME_WAIT for 2 minutes): the next syncs delete the real server.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    deadline = time.monotonic() + 90
    while f"-> {c.pod(chosen).ip}:9000" in ipvsadm(c.node("a")):
        assert time.monotonic() < deadline, ipvsadm(c.node("a"))
        time.sleep(2)
        proxy.sync(_drain_state(remaining), set())
    diff = proxy.v4.last_diff
    assert diff is not None
    assert [op.reason for op in diff.operations if isinstance(op, DeleteRealServer)] == ["drained"]
    assert not proxy.v4.draining


def test_running_sync_twice_changes_nothing(fresh_cluster: Cluster) -> None:
    node = fresh_cluster.node("a")
    proxy = NodeProxy(node, families=DUAL)
    proxy.sync(BASE)
    first = snapshot(node)
    # The same proxier again: nothing at all to do.
    results = proxy.sync(BASE, set())
    assert all(r.details["operations"] == 0 for r in results.values()), results
    # A new proxier (as `pyproxy --once` twice): a full sync rewrites only the iptables rules.
    results = NodeProxy(node, families=DUAL).sync(BASE)
    operations = {f: r.details["operations"] for f, r in results.items()}
    assert operations == {IPFamily.IPv4: 1, IPFamily.IPv6: 1}
    assert snapshot(node) == first


def test_scheduler_change_updates_virtual_servers_in_place(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    state = [svc("web", "10.96.0.10", [tcp(80, 30080)], type="NodePort"), BASE[1]]
    NodeProxy(c.node("a")).sync(state)
    assert "TCP  10.96.0.10:80 rr" in ipvsadm(c.node("a"))
    for scheduler, shown in (("mh", "mh (mh-port)"), ("wrr", "wrr"), ("sh", "sh"), ("lc", "lc")):
        proxy = NodeProxy(c.node("a"), scheduler=scheduler)
        proxy.sync(state)
        table = ipvsadm(c.node("a"))
        assert f"TCP  10.96.0.10:80 {shown}" in table, table
        assert f"TCP  {NODE_A}:30080 {shown}" in table, table
        answers = set(spread(c.pod("a2"), "10.96.0.10", 80, 6))
        assert answers <= {"a1", "b1", "b2"}, answers
        if scheduler == "sh":  # source hashing: one client address, one real server
            assert len(answers) == 1, answers


def test_service_and_endpoint_changes(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    proxy = NodeProxy(c.node("a"))
    web = NamespacedName("t", "web")
    proxy.sync([svc("web", "10.96.0.10", [tcp(80)]), eps("web", [(A1, "node-a"), (B1, "node-b")])])
    assert set(spread(c.pod("a2"), "10.96.0.10", 80, 16)) == {"a1", "b1"}
    proxy.sync([svc("web", "10.96.0.10", [tcp(80)]), eps("web", [(B1, "node-b")])], {web})
    assert set(spread(c.pod("a2"), "10.96.0.10", 80, 10)) == {"b1"}
    proxy.sync([], {web})
    assert "10.96.0.10" not in ipvsadm(c.node("a"))
    assert "10.96.0.10" not in c.node("a").run(["ip", "addr", "show", "kube-ipvs0"]).stdout
    assert not isinstance(tcp_ask(c.pod("a2"), "10.96.0.10", 80, timeout=1), Reply)


def test_cleanup_removes_ours_and_keeps_foreign_virtual_servers(fresh_cluster: Cluster) -> None:
    node = fresh_cluster.node("a")
    node.run(["ipvsadm", "-A", "-t", "172.16.0.1:80", "-s", "wlc"])
    node.run(["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"])
    NodeProxy(node, families=DUAL).sync(BASE)
    assert "KUBE-IPVS-FILTER" in node.run(["iptables-nft-save"]).stdout

    def run_cleanup() -> Any:
        return cleanup([Iptables(IPFamily.IPv4, "nft"), Iptables(IPFamily.IPv6, "nft")])

    result = node.call(run_cleanup)
    assert result.ipvs_available
    assert result.dummy_deleted
    table = ipvsadm(node)
    assert "172.16.0.1:80 wlc" in table
    assert "10.96." not in table
    assert NODE_A not in table
    assert "KUBE-" not in node.run(["iptables-nft-save"]).stdout
    assert "KUBE-" not in node.run(["ip6tables-nft-save"]).stdout
    assert "--dport 9 -j ACCEPT" in node.run(["iptables-nft-save"]).stdout
    assert "KUBE-" not in node.run(["ipset", "list", "-n"]).stdout
    assert node.run(["ip", "link", "show", "kube-ipvs0"], check=False).returncode != 0


def test_sctp_cluster_ip_and_node_port(sctp_cluster: Cluster) -> None:
    c = sctp_cluster
    proxy = NodeProxy(c.node("a"))
    proxy.sync(
        [
            svc("sctp", "10.96.0.77", [tcp(77, 30077, name="s", proto="SCTP")], type="NodePort"),
            eps("sctp", [(A1, "node-a"), (B1, "node-b")], 7777, proto="SCTP", port_name="s"),
        ]
    )
    assert "SCTP 10.96.0.77:77 rr" in ipvsadm(c.node("a"))
    seen = {name(sctp_ask(c.pod("a2"), "10.96.0.77", 77)) for _ in range(8)}
    assert seen == {"a1", "b1"}
    reply = sctp_ask(c.client, NODE_A, 30077)
    assert name(reply) in {"a1", "b1"}
    assert peer(reply) != CLIENT
    sets = c.node("a").run(["ipset", "save", "KUBE-NODE-PORT-SCTP-HASH"]).stdout
    assert f"add KUBE-NODE-PORT-SCTP-HASH {NODE_A},sctp:30077" in sets
