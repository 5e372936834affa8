"""The agent's nfacct-based metrics follow real packets (real apiserver, real kernel).

pyproxy runs in node-a as the node agent (see agent.py). A NodePort Service with its endpoint
on node-a comes from the API; connections from node-a to 127.0.0.1:NODEPORT must raise
`kubeproxy_iptables_localhost_nodeports_accepted_packets_total` by one each (the nat rule counts
a connection's first packet), and SYN+FIN segments from pod a2 to pod a1, forwarded by node-a,
must raise `kubeproxy_iptables_ct_state_invalid_dropped_packets_total` by one each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from agent import A1, Agent, eventually, make_service, running_agent, set_endpoints
from netlab import Cluster, Reply, http_get
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture
from netlab.rawtcp import send_syn_fin

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

node_cluster = cluster_fixture({"a": ("a1", "a2")})

LOCALHOST = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
INVALID = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"
NODE_PORT = 30090


@pytest.fixture
def agent(node_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path) -> Iterator[Agent]:
    with running_agent(
        node_cluster, control_plane.server, control_plane.kubeconfig_proxy, tmp_path
    ) as a:
        yield a


def scrape(agent: Agent) -> dict[str, float]:
    code, body = agent.get("http://127.0.0.1:10249/metrics")
    assert code == 200
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def localhost_answer(agent: Agent) -> str | None:
    reply = http_get(agent.node, "127.0.0.1", NODE_PORT)
    return reply.name if isinstance(reply, Reply) else None


def test_nfacct_metrics_count_real_packets(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    c = agent.cluster
    make_service(
        api,
        namespace,
        "np",
        "10.96.1.90",
        spec={
            "type": "NodePort",
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": NODE_PORT}],
        },
    )
    set_endpoints(api, namespace, "np", [(A1, "node-a")])
    eventually(lambda: localhost_answer(agent) == "a1", what="localhost NodePort answers")

    before = scrape(agent)
    assert before[LOCALHOST] >= 1  # the connection that answered above
    assert "# TYPE " + LOCALHOST + " counter" in agent.get("http://127.0.0.1:10249/metrics")[1]
    for _ in range(3):
        assert localhost_answer(agent) == "a1"
    # Connections to the node's own address are NodePort traffic, but not localhost's.
    reply = http_get(agent.node, agent.node.ip, NODE_PORT)
    assert isinstance(reply, Reply) and reply.name == "a1", reply
    after = scrape(agent)
    assert after[LOCALHOST] == before[LOCALHOST] + 3

    send_syn_fin(c.pod("a2"), c.pod("a1").ip, 8080, 4)
    assert scrape(agent)[INVALID] == before[INVALID] + 4
