"""pyproxy's agent exports every kubeproxy_* metric kube-proxy v1.34.4 exported on the same node.

kube_proxy_metric_names.json is what `hack/metrics_parity.py` scraped from upstream kube-proxy
(iptables mode, a few Services, one endpoint change, /healthz and /livez asked); the table is
docs/metrics-parity.md. Here the agent runs against the real apiserver through a similar
sequence, and its /metrics must contain every one of those families with at least one sample,
except those listed in NOT_EXPORTED (none today).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from agent import A1, Agent, eventually, make_service, running_agent, set_endpoints
from netlab import Cluster
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

KUBE_PROXY_NAMES = Path(__file__).with_name("kube_proxy_metric_names.json")
#: kubeproxy_* families kube-proxy exports and pyproxy does not, with the reason (README).
NOT_EXPORTED: dict[str, str] = {}

node_cluster = cluster_fixture({"a": ("a1",)})


@pytest.fixture
def agent(node_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path) -> Iterator[Agent]:
    with running_agent(
        node_cluster, control_plane.server, control_plane.kubeconfig_proxy, tmp_path
    ) as a:
        yield a


def exported(text: str) -> set[str]:
    """Families with at least one sample (a histogram's samples folded into its family)."""
    histograms = {
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# TYPE ") and line.endswith(" histogram")
    }
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample = line.split("{", 1)[0].split(" ", 1)[0]
            for suffix in ("_bucket", "_sum", "_count"):
                if sample.removesuffix(suffix) in histograms:
                    sample = sample.removesuffix(suffix)
            names.add(sample)
    return names


def test_every_kube_proxy_metric_is_exported(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    expected = set(json.loads(KUBE_PROXY_NAMES.read_text())["iptables"]) - set(NOT_EXPORTED)
    assert "kubeproxy_iptables_localhost_nodeports_accepted_packets_total" in expected
    make_service(
        api,
        namespace,
        "lb",
        "10.96.1.70",
        spec={
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30070}],
        },
    )
    # Endpoints elsewhere only: no_local_endpoints; later a change with a trigger time.
    set_endpoints(api, namespace, "lb", [("10.244.2.11", "node-b")])
    eventually(
        lambda: (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{"
            in agent.get("http://127.0.0.1:10249/metrics")[1]
        ),
        what="first sync",
    )
    disc = kubernetes.client.DiscoveryV1Api(api)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    disc.patch_namespaced_endpoint_slice(
        "lb-x",
        namespace,
        {
            "metadata": {"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now}},
            "endpoints": [
                {"addresses": ["10.244.2.11"], "nodeName": "node-b"},
                {"addresses": [A1], "nodeName": "node-a"},
            ],
        },
    )
    for path in ("/healthz", "/livez"):
        agent.get(f"http://127.0.0.1:10256{path}")

    def missing() -> set[str]:
        return expected - exported(agent.get("http://127.0.0.1:10249/metrics")[1])

    eventually(
        lambda: not missing(), what="every kube-proxy metric", explain=lambda: str(missing())
    )
