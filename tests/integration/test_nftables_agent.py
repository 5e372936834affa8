"""`pyproxy --proxy-mode nftables` as the node agent against a real kube-apiserver + etcd.

pyproxy runs in netlab's node-a namespace (it programs that namespace's `ip kube-proxy` table)
and reaches the API server through the loopback bridge of agent.py; every check is a real
packet from a pod or the client namespace, or the table as the kernel has it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from agent import (
    A1,
    B1,
    NODE_A,
    Agent,
    answers,
    eventually,
    make_service,
    running_agent,
    set_endpoints,
)
from netlab import Cluster
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture

from pyproxy.nftables.proxier import STALE_CHAIN_DELAY

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

node_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})

KUBE_PROXY_NAMES = Path(__file__).with_name("kube_proxy_metric_names.json")
#: A ServiceCIDR of the test's own, apart from the API server's 10.96.0.0/16 (nft would merge
#: adjacent ranges into one interval); no Service has an address in it.
EXTRA_CIDR = "10.99.0.0/24"
UNALLOCATED = "10.99.0.5"


def nft(agent: Agent, *args: str) -> str:
    return agent.node.run(["nft", *args], check=False).stdout


def table(agent: Agent) -> str:
    return nft(agent, "list", "table", "ip", "kube-proxy")


def diagnose(agent: Agent) -> str:
    return f"--- node-a ip kube-proxy\n{table(agent)}\n{agent.diagnose()}"


@pytest.fixture
def agent(node_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path) -> Iterator[Agent]:
    # iptables mode's leftovers from an earlier run: nftables mode removes them once its own
    # rules are in (upstream's platformCleanup).
    node = node_cluster.node("a")
    node.run(["iptables-nft", "-t", "nat", "-N", "KUBE-SERVICES"])
    portals = ["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
    node.run(["iptables-nft", "-t", "nat", "-A", "PREROUTING", *portals])
    with running_agent(
        node_cluster,
        control_plane.server,
        control_plane.kubeconfig_proxy,
        tmp_path,
        # A short sync period: the table check (the canary's equivalent) runs every period.
        ["--proxy-mode", "nftables", "--iptables-sync-period", "2s"],
    ) as a:
        yield a


def test_service_lifecycle_in_nftables_mode(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(api, namespace, "web", "10.96.1.10")
    set_endpoints(api, namespace, "web", [(A1, "node-a")])
    eventually(
        lambda: answers(c.pod("a2"), "10.96.1.10", 80, 3) == {"a1"},
        what="first answer",
        explain=lambda: diagnose(agent),
    )
    assert "vmap @service-ips" in table(agent)
    # The other modes' leftovers went once nftables mode's rules were in.
    eventually(
        lambda: "KUBE-SERVICES" not in agent.node.run(["iptables-nft-save", "-t", "nat"]).stdout,
        what="iptables leftovers removed",
    )

    set_endpoints(api, namespace, "web", [(A1, "node-a"), (B1, "node-b")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.10", 80, 30) == {"a1", "b1"}, what="2 eps")
    set_endpoints(api, namespace, "web", [(B1, "node-b")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.10", 80, 10) == {"b1"}, what="1 ep")

    # A port the Service does not have on its (allocated) cluster IP: rejected.
    assert answers(c.pod("a2"), "10.96.1.10", 81, 2) == {"Refused"}

    core = kubernetes.client.CoreV1Api(api)
    core.patch_namespaced_service(
        "web",
        namespace,
        {
            "spec": {
                "type": "NodePort",
                "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}],
            }
        },
    )
    # nftables mode's NodePorts answer on the primary node IP (--nodeport-addresses primary).
    eventually(
        lambda: answers(c.client, NODE_A, 30080, 3) == {"b1"},
        what="NodePort",
        explain=lambda: diagnose(agent),
    )

    core.delete_namespaced_service("web", namespace)
    # The cluster IP is now an unallocated address of the API server's ServiceCIDR
    # (10.96.0.0/16, the `kubernetes` ServiceCIDR): dropped, not routed on.
    eventually(
        lambda: answers(c.pod("a2"), "10.96.1.10", 80, 2) == {"Timeout"},
        what="gone: dropped",
        explain=lambda: diagnose(agent),
    )
    eventually(lambda: answers(c.client, NODE_A, 30080, 2) != {"b1"}, what="NodePort gone")
    # Its chains were flushed at once; as upstream, the next sync at least a second later
    # deletes them (here: the one another Service's creation causes).
    assert f"{namespace}/web/" in table(agent)
    time.sleep(STALE_CHAIN_DELAY + 0.5)
    make_service(api, namespace, "other", "10.96.1.13")
    eventually(
        lambda: "10.96.1.13" in (t := table(agent)) and f"{namespace}/web/" not in t,
        what="stale chains deleted",
        explain=lambda: diagnose(agent),
    )


def test_unallocated_address_of_a_service_cidr_is_dropped(
    agent: Agent, api: kubernetes.client.ApiClient
) -> None:
    c = agent.cluster
    eventually(lambda: "vmap @service-ips" in table(agent), what="first sync")
    networking = kubernetes.client.NetworkingV1Api(api)
    body = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": "extra-test-range"},
        "spec": {"cidrs": [EXTRA_CIDR]},
    }
    # Before: not a service address; node-a routes it on, untranslated, to the LAN router,
    # which has no route for it (ICMP net unreachable, when the router's ICMP rate limit lets
    # one through).
    eventually(lambda: answers(c.pod("a2"), UNALLOCATED, 80, 1) == {"Unreachable"}, what="control")
    networking.create_service_cidr(body)
    try:
        eventually(
            lambda: (
                EXTRA_CIDR in nft(agent, "list", "chain", "ip", "kube-proxy", "cluster-ips-check")
            ),
            what="ServiceCIDR in the rules",
            explain=lambda: diagnose(agent),
        )
        assert answers(c.pod("a2"), UNALLOCATED, 80, 3) == {"Timeout"}
    finally:
        networking.delete_service_cidr("extra-test-range")
    # Gone from the API: gone from the rules.
    eventually(
        lambda: (
            EXTRA_CIDR not in nft(agent, "list", "chain", "ip", "kube-proxy", "cluster-ips-check")
        ),
        what="ServiceCIDR removed from the rules",
    )


@pytest.mark.parametrize(
    "damage", ["flush table ip kube-proxy", "delete table ip kube-proxy", "flush ruleset"]
)
def test_damaged_table_is_repaired(
    damage: str, agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(api, namespace, "web", "10.96.1.11")
    set_endpoints(api, namespace, "web", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.11", 80, 3) == {"a1"}, what="first answer")
    agent.node.run(["nft", *damage.split()])
    assert "vmap @service-ips" not in table(agent)
    # The periodic table check notices and forces a full sync.
    eventually(
        lambda: answers(c.pod("a2"), "10.96.1.11", 80, 3) == {"a1"},
        30,
        what="repaired",
        explain=lambda: diagnose(agent),
    )
    assert "canary gone" in agent.text()


def test_metrics_have_the_nftables_mode_names(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(api, namespace, "web", "10.96.1.12")
    set_endpoints(api, namespace, "web", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.12", 80, 3) == {"a1"}, what="answer")
    set_endpoints(api, namespace, "web", [(A1, "node-a"), (B1, "node-b")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.12", 80, 20) == {"a1", "b1"}, what="2 eps")

    code, text = agent.get("http://127.0.0.1:10249/metrics")
    assert code == 200
    exported = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    # Everything kube-proxy v1.34.4 exported in nftables mode (hack/metrics_parity.py) ...
    expected = set(json.loads(KUBE_PROXY_NAMES.read_text())["nftables"])
    assert expected <= exported, expected - exported
    assert {
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
    } <= exported
    # ... and no iptables-mode metric.
    assert not {n for n in exported if "iptables" in n}, exported
    # A full and a partial sync happened, and were timed as such. Which of the syncs above were
    # partial depends on how the events were coalesced (a sync that also handled the first
    # lists or a ServiceCIDR is full), so one more endpoint change is made if none was yet.
    assert 'kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"}' in text
    partial = 'kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv4"}'
    set_endpoints(api, namespace, "web", [(B1, "node-b")])
    eventually(
        lambda: partial in agent.get("http://127.0.0.1:10249/metrics")[1], what="a partial sync"
    )
    assert agent.get("http://127.0.0.1:10249/proxyMode") == (200, "nftables")
