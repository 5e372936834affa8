"""Real packets for the features otherwise only checked through the tracer and the goldens.

A netlab cluster (tests/netlab): node-a with pods a1, a2, a3; node-b with pods b1, b2; an
external client on the LAN. pyproxy programs the nodes from a state file (`--once`, or the
real node agent for the health-check node port), and each test checks which endpoint answered,
with a control in the same test showing that the probe would have been answered otherwise:

- SCTP in iptables mode, and TCP, UDP and SCTP sharing one port number (this kernel has no SCTP
  sockets, so the SCTP probe is a raw INIT chunk and the endpoints capture it raw: the packet
  that arrives shows where the rules sent it);
- `--nodeport-addresses` with a CIDR and with `primary`;
- LoadBalancer `ipMode: Proxy` (no DNAT of the LB IP) beside `ipMode: VIP`;
- zone hints (trafficDistribution PreferClose) and node hints (PreferSameNode) choosing the
  endpoints, and no filtering when a hint is missing;
- IPs written with leading zeros;
- headless, ExternalName and another proxy's Services ignored;
- the health-check node port answered by pyproxy's own health server through the rules' ACCEPT
  while the node's INPUT policy drops everything else.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from netlab import Cluster, Node, Refused, Reply, Unreachable, spread, tcp_ask, udp_ask
from netlab.fixtures import cluster_fixture
from netlab.ns import call_in_netns

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
STATE_AGENT = Path(__file__).with_name("state_agent.py")
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/48"
LAYOUT = {"a": ("a1", "a2", "a3"), "b": ("b1", "b2")}
A1, A2, A3 = "10.244.1.11", "10.244.1.12", "10.244.1.13"
B1, B2 = "10.244.2.11", "10.244.2.12"
NODE_A, NODE_B, CLIENT = "172.30.0.2", "172.30.0.3", "172.30.0.100"
#: A second address on node-a's LAN interface, for --nodeport-addresses.
NODE_A_SECOND = "172.30.0.202"

Obj = dict[str, Any]


# --- API objects (plain dicts; the state file is JSON, which is YAML) ---------------------


def service(name: str, cluster_ip: str | None, ports: Sequence[Obj], **spec: Any) -> Obj:
    status = spec.pop("status", None)
    labels = spec.pop("labels", None)
    body: Obj = {"ports": list(ports), **spec}
    if cluster_ip is not None:
        body["clusterIP"] = cluster_ip
        body["clusterIPs"] = [cluster_ip]
    meta: Obj = {"namespace": "t", "name": name}
    if labels:
        meta["labels"] = labels
    obj: Obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}
    if status is not None:
        obj["status"] = status
    return obj


def port(name: str, number: int, protocol: str = "TCP", node_port: int | None = None) -> Obj:
    out: Obj = {"name": name, "port": number, "protocol": protocol}
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def endpoint(ip: str, node: str, **extra: Any) -> Obj:
    return {"addresses": [ip], "nodeName": node, "conditions": {"ready": True}, **extra}


def slice_(
    service_name: str,
    endpoints: Sequence[Obj],
    ports: Sequence[Obj],
    *,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "t",
            "name": name or f"{service_name}-x",
            "labels": {"kubernetes.io/service-name": service_name, **(labels or {})},
        },
        "addressType": "IPv4",
        "ports": list(ports),
        "endpoints": list(endpoints),
    }


def node_object(name: str, zone: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
    }


def write_state(path: Path, items: Sequence[Obj]) -> Path:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}))
    return path


HTTP = [port("http", 80)]
HTTP_EP = [port("http", 8080)]


def node_flags(node: Node) -> list[str]:
    return [
        "--hostname-override", node.node_name,
        "--node-ip", node.ip,
        "--cluster-cidr", CLUSTER_CIDRS,
        "--iptables-backend", "nft",
    ]  # fmt: skip


def program(
    cluster: Cluster,
    tmp: Path,
    items: Sequence[Obj],
    *,
    nodes: Sequence[str] = ("a",),
    extra: Sequence[str] = (),
) -> None:
    """`pyproxy --once` with these objects on each node; asserts it succeeded."""
    path = write_state(tmp / "state.json", items)
    for key in nodes:
        node = cluster.node(key)
        result = node.run(
            [sys.executable, "-m", "pyproxy", "--once", "--state", str(path),
             *node_flags(node), *extra],
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def name(result: object) -> str:
    assert isinstance(result, Reply), f"expected an answer, got {result!r}"
    return result.name


# The LAN router answers every packet it cannot route with ICMP net unreachable, without the
# default rate limit (one per second per peer), so "not translated" is seen at once, every time.
packet_cluster = cluster_fixture(
    LAYOUT, scope="module", sysctls={"lan": {"net.ipv4.icmp_ratelimit": 0}}
)


@pytest.fixture(scope="module")
def net(packet_cluster: Cluster) -> Cluster:
    c = packet_cluster
    c.client_route("192.0.2.0/24", "a")
    c.client_route("198.51.100.0/24", "a")
    c.client_route("10.96.0.0/16", "a")
    c.node("a").ip_cmd("addr", "add", f"{NODE_A_SECOND}/24", "dev", "eth0")
    return c


# --- SCTP, and TCP/UDP/SCTP on one port number --------------------------------------------

_CRC32C_TABLE: list[int] = []


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), SCTP's checksum (RFC 9260 appendix A)."""
    if not _CRC32C_TABLE:
        for i in range(256):
            crc = i
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
            _CRC32C_TABLE.append(crc)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def sctp_init(src_port: int, dst_port: int, tag: int) -> bytes:
    """An SCTP packet holding one INIT chunk (verification tag 0, as an INIT must have), with a
    valid checksum: conntrack only starts tracking an association on such a packet. `tag`
    (the initiate tag) identifies the packet even where masquerading changes the port."""
    init = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65535, 1, 1, 1)
    header = struct.pack("!HHII", src_port, dst_port, 0, 0)
    checksum = _crc32c(header + init)
    # The CRC goes into the packet least significant byte first (RFC 9260 appendix A).
    return struct.pack("!HHI", src_port, dst_port, 0) + struct.pack("<I", checksum) + init


def _raw_sctp(ns: str) -> socket.socket:
    s = call_in_netns(ns, socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_SCTP)
    s.setblocking(False)
    return s


def sctp_probe(
    cluster: Cluster, sender: str, dst: str, dst_port: int, src_port: int, *, wait: float = 2.0
) -> dict[str, tuple[str, str, int]]:
    """Send one SCTP INIT from pod `sender` with source port `src_port` (unique per call);
    return, per pod that received it, (source ip, destination ip, destination port) of what
    arrived. The source may be masqueraded (`--random-fully` changes the port too), so the
    packet is recognised by its initiate tag, the source port sent."""
    listeners = {p: _raw_sctp(cluster.pod(p).name) for p in cluster.pods if p != sender}
    out = _raw_sctp(cluster.pod(sender).name)
    try:
        out.sendto(sctp_init(src_port, dst_port, tag=src_port), (dst, 0))
        seen: dict[str, tuple[str, str, int]] = {}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not seen:
            for pod, s in listeners.items():
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    continue
                ihl = (data[0] & 0x0F) * 4
                src, dst_ip = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
                dport = struct.unpack("!H", data[ihl + 2 : ihl + 4])[0]
                # SCTP header (12 bytes), then the INIT chunk's header (4), then its tag.
                chunk_type = data[ihl + 12]
                tag = struct.unpack("!I", data[ihl + 16 : ihl + 20])[0]
                if chunk_type == 1 and tag == src_port:
                    seen[pod] = (src, dst_ip, dport)
            time.sleep(0.01)
        return seen
    finally:
        out.close()
        for s in listeners.values():
            s.close()


def test_tcp_udp_and_sctp_on_one_port_number_each_reach_their_own_endpoints(
    net: Cluster, tmp_path: Path
) -> None:
    """One Service, port 80 in three protocols, each protocol's slice with another endpoint:
    every protocol is dispatched to its own KUBE-SVC chain and target port."""
    items = [
        service(
            "multi",
            "10.96.0.10",
            [port("t", 80, "TCP"), port("u", 80, "UDP"), port("s", 80, "SCTP")],
        ),
        slice_("multi", [endpoint(B1, "node-b")], [port("t", 8080, "TCP")], name="multi-tcp"),
        slice_("multi", [endpoint(A1, "node-a")], [port("u", 5353, "UDP")], name="multi-udp"),
        slice_("multi", [endpoint(B2, "node-b")], [port("s", 7000, "SCTP")], name="multi-sctp"),
    ]
    program(net, tmp_path, items)
    assert set(spread(net.pod("a2"), "10.96.0.10", 80, 10)) == {"b1"}
    assert {name(udp_ask(net.pod("a2"), "10.96.0.10", 80)) for _ in range(5)} == {"a1"}
    assert sctp_probe(net, "a2", "10.96.0.10", 80, 40001) == {"b2": (A2, B2, 7000)}
    # Control: straight to the pod, the same probe arrives untranslated (the capture works),
    # and to a port the Service does not have nothing is translated.
    assert sctp_probe(net, "a2", B1, 7000, 40002) == {"b1": (A2, B1, 7000)}
    assert sctp_probe(net, "a2", "10.96.0.10", 81, 40003, wait=1.0) == {}


def test_sctp_node_port_from_outside(net: Cluster, tmp_path: Path) -> None:
    items = [
        service("sctp-np", "10.96.0.11", [port("s", 90, "SCTP", 30090)], type="NodePort"),
        slice_("sctp-np", [endpoint(A1, "node-a")], [port("s", 7000, "SCTP")]),
    ]
    program(net, tmp_path, items)
    # From a pod, through the node port of node-a: DNAT to a1 (and masqueraded, as external
    # traffic to a Cluster-policy Service is).
    got = sctp_probe(net, "a2", NODE_A, 30090, 40011)
    assert got == {"a1": (NODE_A, A1, 7000)}
    # Control: another node port number is not translated (nothing captures it).
    assert sctp_probe(net, "a2", NODE_A, 30091, 40012, wait=1.0) == {}


# --- --nodeport-addresses --------------------------------------------------------------------


def _nodeport_state() -> list[Obj]:
    return [
        service("np", "10.96.0.40", [port("http", 80, node_port=30040)], type="NodePort"),
        slice_("np", [endpoint(B1, "node-b")], HTTP_EP),
    ]


def test_nodeport_addresses_cidr_limits_the_addresses(net: Cluster, tmp_path: Path) -> None:
    program(net, tmp_path, _nodeport_state(), extra=["--nodeport-addresses", "172.30.0.200/29"])
    assert name(tcp_ask(net.client, NODE_A_SECOND, 30040)) == "b1"
    # Nothing listens on the node itself: the primary address refuses the connection.
    assert isinstance(tcp_ask(net.client, NODE_A, 30040), Refused)
    # Control: without the flag every local address answers.
    program(net, tmp_path, _nodeport_state())
    assert name(tcp_ask(net.client, NODE_A, 30040)) == "b1"
    assert name(tcp_ask(net.client, NODE_A_SECOND, 30040)) == "b1"


def test_nodeport_addresses_primary(net: Cluster, tmp_path: Path) -> None:
    program(net, tmp_path, _nodeport_state(), extra=["--nodeport-addresses", "primary"])
    assert name(tcp_ask(net.client, NODE_A, 30040)) == "b1"
    assert isinstance(tcp_ask(net.client, NODE_A_SECOND, 30040), Refused)


# --- LoadBalancer ipMode ---------------------------------------------------------------------


def test_load_balancer_ip_mode_proxy_is_not_translated(net: Cluster, tmp_path: Path) -> None:
    def lb(svc_name: str, ip: str, lb_ip: str, node_port: int, mode: str) -> list[Obj]:
        return [
            service(
                svc_name,
                ip,
                [port("http", 80, node_port=node_port)],
                type="LoadBalancer",
                status={"loadBalancer": {"ingress": [{"ip": lb_ip, "ipMode": mode}]}},
            ),
            slice_(svc_name, [endpoint(B1, "node-b")], HTTP_EP),
        ]

    program(
        net,
        tmp_path,
        [
            *lb("vip", "10.96.0.50", "192.0.2.50", 30050, "VIP"),
            *lb("proxy", "10.96.0.51", "192.0.2.51", 30051, "Proxy"),
        ],
    )
    # Control: the VIP Service's LB IP is translated, from outside and from a pod.
    assert name(tcp_ask(net.client, "192.0.2.50", 80)) == "b1"
    assert name(tcp_ask(net.pod("a2"), "192.0.2.50", 80)) == "b1"
    # ipMode Proxy: the load balancer itself must carry the traffic, so the node does not
    # translate its IP (from outside or from a pod): the packet is routed on, to the LAN
    # router, which has no route for it. Its NodePort still works.
    assert isinstance(tcp_ask(net.client, "192.0.2.51", 80, timeout=1.5), Unreachable)
    assert isinstance(tcp_ask(net.pod("a2"), "192.0.2.51", 80, timeout=1.5), Unreachable)
    assert name(tcp_ask(net.client, NODE_A, 30051)) == "b1"


# --- topology -------------------------------------------------------------------------------


def _zones() -> list[Obj]:
    return [node_object("node-a", "zone-a"), node_object("node-b", "zone-b")]


def test_zone_hints_choose_the_endpoints(net: Cluster, tmp_path: Path) -> None:
    def hinted(ip: str, node: str, zone: str) -> Obj:
        return endpoint(ip, node, zone=zone, hints={"forZones": [{"name": zone}]})

    items = [
        *_zones(),
        service("close", "10.96.0.60", HTTP, trafficDistribution="PreferClose"),
        slice_(
            "close",
            [
                hinted(A1, "node-a", "zone-a"),
                hinted(B1, "node-b", "zone-b"),
                hinted(B2, "node-b", "zone-b"),
            ],
            HTTP_EP,
        ),
        # Control: the same endpoints, one without a hint: no topology filtering at all.
        service("partial", "10.96.0.61", HTTP, trafficDistribution="PreferClose"),
        slice_(
            "partial",
            [
                hinted(A1, "node-a", "zone-a"),
                hinted(B1, "node-b", "zone-b"),
                endpoint(B2, "node-b", zone="zone-b"),
            ],
            HTTP_EP,
        ),
    ]
    program(net, tmp_path, items, nodes=("a", "b"))
    assert set(spread(net.pod("a2"), "10.96.0.60", 80, 20)) == {"a1"}
    assert set(spread(net.pod("a3"), "10.96.0.60", 80, 30)) == {"a1"}
    assert set(spread(net.pod("b2"), "10.96.0.60", 80, 30)) == {"b1", "b2"}
    assert set(spread(net.pod("a2"), "10.96.0.61", 80, 40)) == {"a1", "b1", "b2"}


def test_node_hints_choose_the_endpoint_by_default(net: Cluster, tmp_path: Path) -> None:
    """trafficDistribution PreferSameNode: the EndpointSlice controller writes node hints (and
    zone hints); PreferSameTrafficDistribution is on by default in 1.34, so node hints win."""

    def hinted(ip: str, node: str) -> Obj:
        return endpoint(
            ip,
            node,
            zone="zone-a",
            hints={"forZones": [{"name": "zone-a"}], "forNodes": [{"name": node}]},
        )

    items = [
        node_object("node-a", "zone-a"),
        node_object("node-b", "zone-a"),
        service("same-node", "10.96.0.62", HTTP, trafficDistribution="PreferSameNode"),
        slice_(
            "same-node",
            [hinted(A1, "node-a"), hinted(B1, "node-b"), hinted(B2, "node-b")],
            HTTP_EP,
        ),
    ]
    program(net, tmp_path, items, nodes=("a", "b"))
    assert set(spread(net.pod("a2"), "10.96.0.62", 80, 20)) == {"a1"}
    assert set(spread(net.pod("b1"), "10.96.0.62", 80, 30)) == {"b1", "b2"}
    # Control: with the gate off, node hints are ignored and the zone hints (every endpoint
    # in zone-a, like both nodes) leave all three endpoints.
    program(net, tmp_path, items, extra=["--feature-gates", "PreferSameTrafficDistribution=false"])
    assert set(spread(net.pod("a2"), "10.96.0.62", 80, 40)) == {"a1", "b1", "b2"}


# --- leading zeros, ignored Services --------------------------------------------------------


def test_ips_with_leading_zeros_are_read_as_decimal(net: Cluster, tmp_path: Path) -> None:
    items = [
        service(
            "zeros",
            "010.096.000.070",
            HTTP,
            externalIPs=["198.051.100.070"],
        ),
        slice_("zeros", [endpoint("010.244.001.011", "node-a")], HTTP_EP),
    ]
    program(net, tmp_path, items)
    # Decimal, as Go's ParseIPSloppy: 10.96.0.70 (octal would be 8.78.0.56) and a1's address.
    assert name(tcp_ask(net.pod("a2"), "10.96.0.70", 80)) == "a1"
    assert name(tcp_ask(net.client, "198.51.100.70", 80)) == "a1"


def test_headless_external_name_and_other_proxy_services_are_ignored(
    net: Cluster, tmp_path: Path
) -> None:
    """Each ignored Service carries an external IP (and where it can, a cluster IP) with a
    ready endpoint: had pyproxy programmed it, the probe would be answered."""
    items = [
        # Control: an ordinary Service with the same shape answers.
        service("plain", "10.96.0.80", HTTP, externalIPs=["198.51.100.80"]),
        slice_("plain", [endpoint(A1, "node-a")], HTTP_EP),
        service("headless", "None", HTTP, externalIPs=["198.51.100.81"]),
        slice_(
            "headless",
            [endpoint(A1, "node-a")],
            HTTP_EP,
            labels={"service.kubernetes.io/headless": ""},
        ),
        service(
            "alias",
            "10.96.0.82",
            HTTP,
            type="ExternalName",
            externalName="example.invalid",
            externalIPs=["198.51.100.82"],
        ),
        slice_("alias", [endpoint(A1, "node-a")], HTTP_EP),
        service(
            "other",
            "10.96.0.83",
            HTTP,
            externalIPs=["198.51.100.83"],
            labels={"service.kubernetes.io/service-proxy-name": "someone-else"},
        ),
        slice_(
            "other",
            [endpoint(A1, "node-a")],
            HTTP_EP,
            labels={"service.kubernetes.io/service-proxy-name": "someone-else"},
        ),
    ]
    program(net, tmp_path, items)
    assert name(tcp_ask(net.pod("a2"), "10.96.0.80", 80)) == "a1"
    assert name(tcp_ask(net.client, "198.51.100.80", 80)) == "a1"
    # Not translated (nor rejected): routed on to the LAN router, which has no route.
    for ip in ("198.51.100.81", "198.51.100.82", "198.51.100.83"):
        assert isinstance(tcp_ask(net.client, ip, 80, timeout=1.5), Unreachable), ip
    for ip in ("10.96.0.82", "10.96.0.83"):
        assert isinstance(tcp_ask(net.pod("a2"), ip, 80, timeout=1.5), Unreachable), ip


# --- health-check node port ------------------------------------------------------------------


def _http(cluster: Cluster, url: str, timeout: float = 3) -> tuple[int, str]:
    """GET from the external client with curl; (0, "") when nothing answered in time."""
    result = cluster.client.run(
        ["curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}", url], check=False
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.fixture
def agent_on_a(net: Cluster, tmp_path: Path) -> Iterator[Cluster]:
    items = [
        service(
            "local",
            "10.96.0.90",
            [port("http", 80, node_port=30090)],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=32090,
            status={"loadBalancer": {"ingress": [{"ip": "192.0.2.90"}]}},
        ),
        slice_("local", [endpoint(A1, "node-a"), endpoint(B1, "node-b")], HTTP_EP),
        service(
            "remote",
            "10.96.0.91",
            [port("http", 80, node_port=30091)],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=32091,
            status={"loadBalancer": {"ingress": [{"ip": "192.0.2.91"}]}},
        ),
        slice_("remote", [endpoint(B1, "node-b")], HTTP_EP),
    ]
    path = write_state(tmp_path / "agent.json", items)
    node = net.node("a")
    proc = node.popen(
        [sys.executable, str(STATE_AGENT), str(path), *node_flags(node)],
        stdout=subprocess.PIPE,
        cwd=str(REPO),
    )
    try:
        assert proc.popen.stdout is not None
        # A generous bound on a loaded machine; a failed first sync never prints SYNCED.
        ready, _, _ = select.select([proc.popen.stdout], [], [], 120)
        line = proc.popen.stdout.readline() if ready else ""
        assert line.strip() == "SYNCED", f"agent did not sync: {line!r}\n{proc.log_text()}"
        yield net
    finally:
        node.run(["iptables-nft", "-P", "INPUT", "ACCEPT"])
        proc.stop()


def test_health_check_node_port_answers_through_the_rules(agent_on_a: Cluster) -> None:
    net = agent_on_a
    # Control: the agent's /healthz answers the client while node-a's INPUT accepts ...
    assert _http(net, f"http://{NODE_A}:10256/healthz")[0] in (200, 503)
    # ... and no longer once everything that no rule accepts is dropped. kube-proxy's rules
    # do not rely on the INPUT policy: the health-check node port's own ACCEPT lets it in.
    net.node("a").run(["iptables-nft", "-P", "INPUT", "DROP"])
    assert _http(net, f"http://{NODE_A}:10256/healthz", timeout=1.5) == (0, "")
    code, body = _http(net, f"http://{NODE_A}:32090/")
    assert code == 200, body
    assert json.loads(body) == {
        "service": {"namespace": "t", "name": "local"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }
    # No local endpoint on node-a: the load balancer is told to skip this node.
    code, body = _http(net, f"http://{NODE_A}:32091/")
    assert code == 503 and json.loads(body)["localEndpoints"] == 0
    # And the Service itself, externalTrafficPolicy Local, keeps the client's address.
    reply = tcp_ask(net.client, "192.0.2.90", 80)
    assert name(reply) == "a1" and isinstance(reply, Reply) and reply.peer_ip == CLIENT
