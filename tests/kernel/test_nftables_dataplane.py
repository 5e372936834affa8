"""Real packets through the table `pyproxy --proxy-mode nftables --state FILE --once` programs.

The same netlab cluster and state as the iptables-mode dataplane tests (node-a with pods a1,
a2, a3; node-b with b1, b2; an external client on the LAN), plus the ServiceCIDRs, programmed
by nftables mode on both nodes. The tests check which endpoint answered and which source
address the backend saw, and the nftables-mode-only behaviours: unallocated ClusterIPs of the
service CIDR are dropped and undefined ports of a ClusterIP are rejected.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from netlab import Cluster, Refused, Reply, Timeout, http_get, spread, tcp_ask, udp_ask
from netlab.fixtures import cluster_fixture
from test_iptables_dataplane import (
    A1,
    A2,
    A3,
    BASE_STATE,
    CLIENT,
    CLUSTER_CIDRS,
    HTTP,
    LAYOUT,
    NODE_A,
    NODE_B,
    eps,
    name,
    state,
    svc,
)

pytestmark = pytest.mark.kernel

SERVICE_CIDRS = """\
- apiVersion: networking.k8s.io/v1
  kind: ServiceCIDR
  metadata: {name: kubernetes}
  spec: {cidrs: [10.96.0.0/16, "fd00:96::/112"]}
"""
NFT_STATE = BASE_STATE + SERVICE_CIDRS


def program(
    cluster: Cluster, tmp: Path, text: str, *, nodes: Sequence[str] = ("a", "b")
) -> list[str]:
    """`pyproxy --proxy-mode nftables --once` with `text` as state on each node; returns the
    log output (stderr) of each run and asserts it succeeded."""
    path = tmp / "state.yaml"
    path.write_text(text)
    logs = []
    for key in nodes:
        node = cluster.node(key)
        result = node.run(
            [
                sys.executable, "-m", "pyproxy", "--proxy-mode", "nftables", "--once",
                "--state", str(path), "--hostname-override", node.node_name,
                "--node-ip", node.ip, "--node-ip", node.ip6, "--cluster-cidr", CLUSTER_CIDRS,
            ],
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        logs.append(result.stderr + result.stdout)
    return logs


def table(cluster: Cluster, key: str, family: str = "ip") -> str:
    return cluster.node(key).run(["nft", "list", "table", family, "kube-proxy"]).stdout


def canonical_table(cluster: Cluster, key: str, family: str = "ip") -> object:
    """`nft -j list table` without handles, objects by kind and name, each chain's rules in
    order, set and map elements sorted: equal exactly when the two tables behave the same
    (listing order follows handles, which a re-created base chain changes)."""
    doc = json.loads(
        cluster.node(key).run(["nft", "-j", "list", "table", family, "kube-proxy"]).stdout
    )
    objects: list[tuple[str, str, str]] = []
    rules: dict[str, list[str]] = {}
    for item in doc["nftables"]:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "rule":
            rules.setdefault(body["chain"], []).append(json.dumps(body, sort_keys=True))
            continue
        if "elem" in body:
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        objects.append((kind, body.get("name", ""), json.dumps(body, sort_keys=True)))
    return sorted(objects), rules


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nft-dataplane")


nft_cluster = cluster_fixture(LAYOUT, scope="module")
fresh_cluster = cluster_fixture(LAYOUT)


@pytest.fixture(scope="module")
def net(nft_cluster: Cluster, tmp_module: Path) -> Cluster:
    c = nft_cluster
    c.client_route("192.0.2.0/24", "a")
    c.client_route("198.51.100.0/24", "a")
    c.client_route("10.96.0.0/16", "a")
    program(c, tmp_module, NFT_STATE)
    return c


# --- ClusterIP ---------------------------------------------------------------------------


def test_the_table_is_nftables_mode_and_no_iptables_rules(net: Cluster) -> None:
    text = table(net, "a")
    assert "map service-ips" in text and "chain services" in text
    assert "KUBE-SERVICES" not in net.node("a").run(["iptables-nft-save"]).stdout


def test_cluster_ip_spreads_over_every_endpoint_without_masquerade(net: Cluster) -> None:
    assert set(spread(net.pod("a2"), "10.96.0.10", 80, 60)) == {"a1", "b1", "b2"}
    for _ in range(6):
        reply = tcp_ask(net.pod("a2"), "10.96.0.10", 80)
        assert isinstance(reply, Reply) and reply.peer_ip == A2


def test_udp_cluster_ip(net: Cluster) -> None:
    seen = {name(udp_ask(net.pod("a2"), "10.96.0.53", 53)) for _ in range(20)}
    assert seen <= {"a1", "b1"} and seen


def test_hairpin_pod_reaches_itself_masqueraded(net: Cluster) -> None:
    reply = tcp_ask(net.pod("a3"), "10.96.0.20", 80)
    assert name(reply) == "a3"
    assert isinstance(reply, Reply) and reply.peer_ip != A3


def test_service_without_endpoints_is_refused_at_once(net: Cluster) -> None:
    assert isinstance(tcp_ask(net.pod("a2"), "10.96.0.30", 80, timeout=2), Refused)
    assert isinstance(http_get(net.client, NODE_A, 30030, timeout=2), Refused)


def test_undefined_port_of_a_cluster_ip_is_rejected(net: Cluster) -> None:
    """cluster-ips-check: an allocated ClusterIP on a port no Service defines."""
    assert isinstance(tcp_ask(net.pod("a2"), "10.96.0.10", 9999, timeout=2), Refused)


def test_unallocated_cluster_ip_is_dropped(net: Cluster) -> None:
    """cluster-ips-check: an address of the ServiceCIDR that no Service has."""
    assert isinstance(tcp_ask(net.pod("a2"), "10.96.0.222", 80, timeout=1.5), Timeout)


def test_off_cluster_client_to_cluster_ip_is_masqueraded(net: Cluster) -> None:
    reply = tcp_ask(net.client, "10.96.0.10", 80)
    assert name(reply) in {"a1", "b1", "b2"}
    assert isinstance(reply, Reply) and reply.peer_ip != CLIENT


def test_internal_traffic_policy_local_uses_only_this_nodes_endpoint(net: Cluster) -> None:
    assert set(spread(net.pod("a2"), "10.96.0.90", 80, 20)) == {"a1"}
    assert set(spread(net.pod("b2"), "10.96.0.90", 80, 20)) == {"b1"}


def test_serving_terminating_endpoints_are_used_when_none_is_ready(net: Cluster) -> None:
    assert name(tcp_ask(net.pod("a2"), "10.96.0.100", 80)) == "b1"


def test_client_ip_affinity_sticks(net: Cluster) -> None:
    first = name(tcp_ask(net.pod("a2"), "10.96.0.80", 80))
    assert all(name(tcp_ask(net.pod("a2"), "10.96.0.80", 80)) == first for _ in range(15))
    # The affinity set of the chosen endpoint now holds the client (a per-endpoint set).
    assert "10.244.1.12" in table(net, "a")
    # Without affinity the same client spreads (control: the test can fail).
    assert len(set(spread(net.pod("a2"), "10.96.0.10", 80, 30))) > 1


def test_dual_stack_each_family_uses_its_own_endpoints(net: Cluster) -> None:
    assert set(spread(net.pod("a2"), "10.96.0.110", 80, 20)) == {"a1", "b1"}
    assert set(spread(net.pod("a2"), "fd00:96::110", 80, 10)) == {"b1"}


# --- NodePort, LoadBalancer, externalIPs --------------------------------------------------


def test_node_port_from_outside_is_masqueraded(net: Cluster) -> None:
    for node_ip in (NODE_A, NODE_B):
        reply = tcp_ask(net.client, node_ip, 30040)
        assert name(reply) == "b1"
        assert isinstance(reply, Reply) and reply.peer_ip != CLIENT


def test_external_traffic_policy_local_keeps_client_ip(net: Cluster) -> None:
    for target, port in ((NODE_A, 30050), ("192.0.2.50", 80)):
        reply = tcp_ask(net.client, target, port)
        assert name(reply) == "a1"
        assert isinstance(reply, Reply) and reply.peer_ip == CLIENT


def test_external_traffic_policy_local_drops_on_a_node_without_local_endpoints(
    net: Cluster,
) -> None:
    assert isinstance(tcp_ask(net.client, NODE_B, 30050, timeout=1.5), Timeout)


def test_load_balancer_source_ranges(net: Cluster) -> None:
    assert name(tcp_ask(net.client, "192.0.2.60", 80)) == "b2"
    assert isinstance(tcp_ask(net.client, "192.0.2.61", 80, timeout=1.5), Timeout)
    # NodePorts are not subject to the source ranges (as upstream).
    assert name(tcp_ask(net.client, NODE_A, 30061)) == "b2"


def test_external_ip(net: Cluster) -> None:
    reply = tcp_ask(net.client, "198.51.100.70", 80)
    assert name(reply) == "b1"


# --- runs ---------------------------------------------------------------------------------


def test_second_run_is_idempotent_and_a_removed_service_leaves_nothing(
    fresh_cluster: Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    two = state(
        svc("web", "10.96.0.10", HTTP),
        eps("web", [(A1, "node-a")]),
        svc("gone", "10.96.0.11", HTTP, "sessionAffinity: ClientIP\n"),
        eps("gone", [(A2, "node-a")]),
    )
    program(c, tmp_path, two, nodes=("a",))
    first = canonical_table(c, "a")
    assert "/gone/" in table(c, "a") and "affinity-" in table(c, "a")
    logs = program(c, tmp_path, two, nodes=("a",))
    assert canonical_table(c, "a") == first
    assert '"stale_chains_flushed":0' in logs[0], logs[0]
    # A restart keeps the affinity sets (and the clients they remember) when unchanged.
    assert name(tcp_ask(c.pod("a3"), "10.96.0.11", 80)) == "a2"
    assert "10.244.1.13" in table(c, "a")
    program(c, tmp_path, two, nodes=("a",))
    assert "10.244.1.13" in table(c, "a")
    # A new timeout re-creates the set (an `add set` alone would keep the old one).
    assert "timeout 3h" in table(c, "a")
    shorter = two.replace(
        "sessionAffinity: ClientIP\n",
        "sessionAffinity: ClientIP\n    sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n",
    )
    assert shorter != two
    program(c, tmp_path, shorter, nodes=("a",))
    assert "timeout 5m" in table(c, "a") and "timeout 3h" not in table(c, "a")

    one = state(svc("web", "10.96.0.10", HTTP), eps("web", [(A1, "node-a")]))
    program(c, tmp_path, one, nodes=("a",))
    after = table(c, "a")
    assert "/gone/" not in after and "affinity-" not in after
    assert name(tcp_ask(c.pod("a3"), "10.96.0.10", 80)) == "a1"
    # The port of the removed Service's ClusterIP is no longer served.
    assert not isinstance(tcp_ask(c.pod("a3"), "10.96.0.11", 80, timeout=1.5), Reply)


def test_cleanup_removes_only_our_tables(fresh_cluster: Cluster, tmp_path: Path) -> None:
    c = fresh_cluster
    node = c.node("a")
    node.run(["nft", "add table inet someone-else"])
    program(c, tmp_path, NFT_STATE, nodes=("a",))
    result = node.run([sys.executable, "-m", "pyproxy", "--cleanup"], check=False)
    assert result.returncode == 0, result.stderr
    tables = node.run(["nft", "list", "tables"]).stdout
    assert "kube-proxy" not in tables
    assert "table inet someone-else" in tables


def test_switching_modes_removes_the_other_modes_rules(
    fresh_cluster: Cluster, tmp_path: Path
) -> None:
    """kube-proxy's platformCleanup: nftables mode removes iptables (and IPVS) mode's rules,
    iptables mode removes nftables mode's table."""
    c = fresh_cluster
    node = c.node("a")
    one = state(svc("web", "10.96.0.10", HTTP), eps("web", [(A1, "node-a")]))
    path = tmp_path / "state.yaml"
    path.write_text(one)
    iptables_once = [
        sys.executable, "-m", "pyproxy", "--once", "--state", str(path),
        "--hostname-override", node.node_name, "--node-ip", node.ip,
        "--iptables-backend", "nft",
    ]  # fmt: skip
    result = node.run(iptables_once, check=False)
    assert result.returncode == 0, result.stderr
    assert "KUBE-SERVICES" in node.run(["iptables-nft-save", "-t", "nat"]).stdout

    program(c, tmp_path, one, nodes=("a",))
    assert "KUBE-SVC-" not in node.run(["iptables-nft-save", "-t", "nat"]).stdout
    assert name(tcp_ask(c.pod("a2"), "10.96.0.10", 80)) == "a1"

    result = node.run(iptables_once, check=False)
    assert result.returncode == 0, result.stderr
    assert "kube-proxy" not in node.run(["nft", "list", "tables"]).stdout
    assert name(tcp_ask(c.pod("a2"), "10.96.0.10", 80)) == "a1"
