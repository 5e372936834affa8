"""pyproxy as the node agent against a real kube-apiserver + etcd, with real packets.

pyproxy runs as a process in netlab's node-a namespace (it programs that namespace's iptables)
and reaches the API server through a loopback bridge (see agent.py).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml
from agent import (
    A1,
    B1,
    NODE_A,
    Agent,
    answers,
    api_state,
    chains,
    eventually,
    make_service,
    node_a_dry_run,
    running_agent,
    set_endpoints,
)
from netlab import Cluster, Reply, tcp_ask, udp_ask
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

node_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})


@pytest.fixture
def agent(node_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path) -> Iterator[Agent]:
    node_cluster.client_route("192.0.2.0/24", "a")
    with running_agent(
        node_cluster, control_plane.server, control_plane.kubeconfig_proxy, tmp_path
    ) as a:
        yield a


def test_service_lifecycle_follows_the_api(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(api, namespace, "web", "10.96.1.10")
    set_endpoints(api, namespace, "web", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.10", 80, 3) == {"a1"}, what="first answer")

    set_endpoints(api, namespace, "web", [(A1, "node-a"), (B1, "node-b")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.10", 80, 30) == {"a1", "b1"}, what="2 eps")
    set_endpoints(api, namespace, "web", [(B1, "node-b")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.10", 80, 10) == {"b1"}, what="1 ep")

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
    eventually(
        lambda: answers(c.client, NODE_A, 30080, 3) == {"b1"},
        what="NodePort",
        explain=lambda: agent.diagnose(lambda: answers(c.client, NODE_A, 30080, 3)),
    )

    core.patch_namespaced_service("web", namespace, {"spec": {"type": "LoadBalancer"}})
    core.patch_namespaced_service_status(
        "web", namespace, {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}}
    )
    # Probes start before the rule exists: node-a routes them on to the LAN router (no
    # answer, or net unreachable); once the rule is there they must be answered. (A client
    # that took node-a's ICMP redirect would bypass it for 5 minutes: netlab hosts ignore
    # redirects; tests/kernel/test_rule_gap.py.)
    eventually(
        lambda: answers(c.client, "192.0.2.10", 80, 3) == {"b1"},
        what="LB IP",
        explain=lambda: agent.diagnose(lambda: answers(c.client, "192.0.2.10", 80, 3)),
    )

    chains_before = agent.save().count(":KUBE-SVC-")
    core.delete_namespaced_service("web", namespace)
    # Gone means no answer and no REJECT either: the cluster IP is routed on, untranslated, to
    # the LAN router, which has no route for it (ICMP net unreachable, or nothing when the
    # router's ICMP rate limit holds it back).
    eventually(
        lambda: answers(c.pod("a2"), "10.96.1.10", 80, 2) <= {"Unreachable", "Timeout"},
        what="gone",
    )
    eventually(lambda: agent.save().count(":KUBE-SVC-") == chains_before - 1, what="chain gone")


def test_survives_api_server_outage(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    c = agent.cluster
    make_service(api, namespace, "web", "10.96.1.20")
    set_endpoints(api, namespace, "web", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.20", 80, 2) == {"a1"})
    control_plane.stop_apiserver()
    try:
        for _ in range(10):
            assert answers(c.pod("a2"), "10.96.1.20", 80, 2) == {"a1"}
            time.sleep(0.3)
    finally:
        control_plane.start_apiserver()
    set_endpoints(api, namespace, "web", [(B1, "node-b")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.20", 80, 5) == {"b1"}, 30, "after outage")
    assert agent.proc is not None and agent.proc.poll() is None


def test_kill_during_burst_then_converges_to_dry_run(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    c = agent.cluster
    make_service(api, namespace, "stable", "10.96.1.30")
    set_endpoints(api, namespace, "stable", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.30", 80, 2) == {"a1"})

    failures: list[object] = []
    for i in range(20):
        make_service(api, namespace, f"burst{i}", f"10.96.2.{i + 1}")
        set_endpoints(api, namespace, f"burst{i}", [(A1, "node-a"), (B1, "node-b")])
        if i == 8:
            agent.stop(signal.SIGKILL)
        r = tcp_ask(c.pod("a2"), "10.96.1.30", 80, timeout=1)
        if not isinstance(r, Reply):
            failures.append(r)
    for i in range(0, 20, 3):
        kubernetes.client.CoreV1Api(api).delete_namespaced_service(f"burst{i}", namespace)
    agent.start()
    state = tmp_path / "dump.yaml"
    state.write_text(yaml.safe_dump(api_state(api)))
    expected = node_a_dry_run(state)
    want = chains(expected)
    eventually(lambda: chains(agent.save()) == want, 30, "kernel == dry-run")
    for _ in range(10):
        r = tcp_ask(c.pod("a2"), "10.96.1.30", 80, timeout=1)
        if not isinstance(r, Reply):
            failures.append(r)
    assert failures == []


def test_relist_after_compaction_drops_nothing(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    c = agent.cluster
    make_service(api, namespace, "one", "10.96.1.40")
    set_endpoints(api, namespace, "one", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.40", 80, 2) == {"a1"})
    control_plane.stop_apiserver()
    control_plane.compact_etcd()
    control_plane.start_apiserver()
    make_service(api, namespace, "two", "10.96.1.41")
    set_endpoints(api, namespace, "two", [(B1, "node-b")])
    control_plane.compact_etcd()
    eventually(lambda: answers(c.pod("a2"), "10.96.1.41", 80, 2) == {"b1"}, 30, "new service")
    assert answers(c.pod("a2"), "10.96.1.40", 80, 5) == {"a1"}


def test_udp_flow_moves_when_its_endpoint_goes(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(api, namespace, "dns", "10.96.1.53", proto="UDP", port=53)
    set_endpoints(api, namespace, "dns", [(A1, "node-a")], port=5353, proto="UDP")
    eventually(lambda: isinstance(udp_ask(c.pod("a2"), "10.96.1.53", 53, 1, src_port=40000), Reply))
    first = udp_ask(c.pod("a2"), "10.96.1.53", 53, 1, src_port=40000)
    assert isinstance(first, Reply) and first.name == "a1"
    set_endpoints(api, namespace, "dns", [(B1, "node-b")], port=5353, proto="UDP")

    def moved() -> bool:
        r = udp_ask(c.pod("a2"), "10.96.1.53", 53, 1, src_port=40000)
        return isinstance(r, Reply) and r.name == "b1"

    eventually(moved, 10, "steady UDP flow answered by the remaining endpoint")

    # The flow to a1 was deleted by the conntrack reconciler, and counted (the counter is
    # bumped just after the deletion, so a scrape may briefly lag the packet).
    def deleted() -> float:
        metrics = agent.get("http://127.0.0.1:10249/metrics")[1]
        prefix = 'kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} '
        values = [float(ln[len(prefix) :]) for ln in metrics.splitlines() if ln.startswith(prefix)]
        return values[0] if values else 0.0

    eventually(lambda: deleted() >= 1, 5, "conntrack_reconciler_deleted_entries_total >= 1")
    metrics = agent.get("http://127.0.0.1:10249/metrics")[1]
    assert 'kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family="IPv4"}' in metrics


def test_health_metrics_and_health_check_node_port(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    make_service(
        api,
        namespace,
        "lb",
        "10.96.1.60",
        spec={
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32060,
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30060}],
        },
    )
    set_endpoints(api, namespace, "lb", [(B1, "node-b")])
    # Without its Node object the node is not eligible: /healthz 503, /livez 200 (upstream).
    eventually(lambda: agent.get("http://127.0.0.1:10256/livez")[0] == 200, what="livez")
    # The first sync must have run before the node's ineligibility shows: wait for it.
    eventually(lambda: agent.get("http://127.0.0.1:10256/healthz")[0] == 503, what="503")
    code, body = agent.get("http://127.0.0.1:10256/healthz")
    assert code == 503 and json.loads(body)["nodeEligible"] is False
    core = kubernetes.client.CoreV1Api(api)
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    try:
        eventually(lambda: agent.get("http://127.0.0.1:10256/healthz")[0] == 200, what="healthz")
    finally:
        core.delete_node("node-a")
    code, body = agent.get("http://127.0.0.1:10256/healthz")
    doc = json.loads(body)
    assert doc["healthy"] is True and "lastUpdated" in doc and "nodeEligible" in doc

    eventually(lambda: agent.get(f"http://{NODE_A}:32060/")[0] == 503, what="hcnp 503")
    assert json.loads(agent.get(f"http://{NODE_A}:32060/")[1])["localEndpoints"] == 0
    set_endpoints(api, namespace, "lb", [(A1, "node-a"), (B1, "node-b")])
    eventually(lambda: agent.get(f"http://{NODE_A}:32060/")[0] == 200, what="hcnp 200")
    assert json.loads(agent.get(f"http://{NODE_A}:32060/")[1]) == {
        "service": {"namespace": namespace, "name": "lb"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }

    code, metrics = agent.get("http://127.0.0.1:10249/metrics")
    assert code == 200
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_iptables_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_network_programming_duration_seconds",
    ):
        assert name in metrics, name
    assert agent.get("http://127.0.0.1:10249/proxyMode") == (200, "iptables")


def test_bad_objects_are_logged_and_skipped(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    # Invalid for pyproxy although the API server accepts it: the service-name label is a
    # valid label value but no Service name (upper case, underscores). Sent first, so the
    # Services below are synced after it arrived.
    disc = kubernetes.client.DiscoveryV1Api(api)
    disc.create_namespaced_endpoint_slice(
        namespace,
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "stray",
                "labels": {"kubernetes.io/service-name": "Not_A_Service"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [B1], "nodeName": "node-b"}],
        },
    )
    make_service(api, namespace, "good", "10.96.1.70")
    set_endpoints(api, namespace, "good", [(A1, "node-a")])
    # A slice whose port name matches no Service port: the Service has no endpoints.
    make_service(api, namespace, "mismatch", "10.96.1.71")
    set_endpoints(api, namespace, "mismatch", [(B1, "node-b")], port_name="nope")
    eventually(lambda: answers(c.pod("a2"), "10.96.1.70", 80, 2) == {"a1"})
    eventually(lambda: answers(c.pod("a2"), "10.96.1.71", 80, 2) == {"Refused"}, what="REJECT")
    assert agent.proc is not None and agent.proc.poll() is None

    def skipped() -> list[dict[str, object]]:
        lines = (json.loads(x) for x in agent.text().splitlines() if x.startswith("{"))
        return [e for e in lines if e.get("event") == "skipping invalid object"]

    eventually(lambda: bool(skipped()), what="the invalid slice logged", explain=agent.text)
    assert [(e["kind"], e["object"], e["field"]) for e in skipped()][:1] == [
        ("EndpointSlice", f"{namespace}/stray", "metadata.labels[kubernetes.io/service-name]")
    ]


def test_sigterm_leaves_rules_in_place(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(api, namespace, "web", "10.96.1.80")
    set_endpoints(api, namespace, "web", [(A1, "node-a")])
    eventually(lambda: answers(c.pod("a2"), "10.96.1.80", 80, 2) == {"a1"})
    started = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert answers(c.pod("a2"), "10.96.1.80", 80, 5) == {"a1"}
