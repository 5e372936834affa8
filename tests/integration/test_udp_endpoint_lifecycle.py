"""A client's UDP flow follows its endpoint through a pod's whole deletion, as with kube-proxy.

Upstream's e2e "[sig-network] Conntrack should be able to preserve UDP traffic when server pod
cycles for a ClusterIP service" failed with pyproxy (issue 16): the deleted pod's endpoint first
turns terminating-but-serving (the rules drop it, its flows stay valid), then disappears (its
flows are stale, the rules do not change), and the cleanup, triggered by rule changes only,
never looked again. Here the same two steps go through the real apiserver into the agent on
node-a, and a client in pod a2 keeps one UDP flow (fixed source port) all along.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from agent import A1, B1, Agent, eventually, make_service, running_agent, set_endpoints
from netlab import Cluster, Reply, Result, udp_ask
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

node_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})

SERVICE_IP, PORT, TARGET = "10.96.1.55", 53, 5353
STEADY_PORT = 40055  # the client's flow: always this source port


@pytest.fixture(params=["iptables", "nftables"])
def agent(
    request: pytest.FixtureRequest,
    node_cluster: Cluster,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> Iterator[Agent]:
    """The agent in each mode that deletes stale UDP flows (ipvs mode: tests/vm)."""
    with running_agent(
        node_cluster,
        control_plane.server,
        control_plane.kubeconfig_proxy,
        tmp_path,
        ["--proxy-mode", request.param],
    ) as a:
        yield a


def answered_by(result: Result) -> str:
    return result.name if isinstance(result, Reply) else type(result).__name__


def test_udp_flow_leaves_an_endpoint_removed_after_terminating(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    client = agent.cluster.pod("a2")

    def steady() -> str:
        return answered_by(udp_ask(client, SERVICE_IP, PORT, 1, src_port=STEADY_PORT))

    def fresh() -> str:  # a new flow each time (ephemeral source port): what the rules pick now
        return answered_by(udp_ask(client, SERVICE_IP, PORT, 1))

    def endpoints(eps: list[tuple[str, str]], terminating: tuple[str, ...] = ()) -> None:
        set_endpoints(api, namespace, "dns", eps, port=TARGET, proto="UDP", terminating=terminating)

    make_service(api, namespace, "dns", SERVICE_IP, proto="UDP", port=PORT)
    endpoints([(A1, "node-a")])
    eventually(lambda: steady() == "a1", what="the steady flow answered by a1")

    # Step 1: a1's pod is being deleted: terminating but still serving, b1 ready. The rules
    # send new flows to b1 only; the steady flow to a1 is still valid and is kept (upstream
    # deletes flows to non-serving endpoints only).
    endpoints([(A1, "node-a"), (B1, "node-b")], terminating=(A1,))
    eventually(lambda: {fresh() for _ in range(6)} == {"b1"}, what="new flows go to b1 only")
    assert steady() == "a1"

    # Step 2: a1 is gone. The rules do not change (they already had b1 only), but the steady
    # flow is now stale and must be deleted, so that its next datagram reaches b1.
    endpoints([(B1, "node-b")])
    eventually(
        lambda: steady() == "b1",
        15,
        "the steady flow moved to b1 after a1 was removed",
        explain=lambda: agent.diagnose(steady),
    )
    assert {steady() for _ in range(3)} == {"b1"}
