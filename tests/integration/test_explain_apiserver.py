"""`pyproxy explain` and `pyproxy trace` reading the cluster from a real kube-apiserver.

explain: the objects are created through the API and the command lists them with the proxy's
own credentials (`--kubeconfig`), as an operator would run it. trace: pyproxy runs as the node
agent in netlab's node-a; `pyproxy trace --kubeconfig ...` inside that namespace follows a packet
through the rules the agent programmed, checks them against what the API says pyproxy should
program (no drift), then sees a rule deleted by hand as drift naming its chain.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from agent import (
    A1,
    A2,
    B1,
    CLUSTER_CIDRS,
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

pytestmark = [pytest.mark.integration]

NODE_FLAGS = ["--hostname-override", "node-a", "--node-ip", NODE_A, "--cluster-cidr", CLUSTER_CIDRS]


def create_service(
    api: kubernetes.client.ApiClient, ns: str, name: str, ip: str, port_name: str = "p"
) -> None:
    """A Service selecting pods labelled app=NAME, port 80 → 8080."""
    port = {"name": port_name, "port": 80, "targetPort": 8080, "protocol": "TCP"}
    make_service(api, ns, name, ip, spec={"selector": {"app": name}, "ports": [port]})


def explain(kubeconfig: Path, ns: str, service: str, *extra: str, code: int = 0) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pyproxy", "explain", service, "--namespace", ns]
    argv += ["--kubeconfig", str(kubeconfig), *NODE_FLAGS, *extra, "-o", "json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == code, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def codes(ex: dict[str, Any]) -> set[str]:
    return {d["code"] for d in ex["diagnoses"]}


def test_explain_reads_the_api_with_the_proxy_identity(
    control_plane: ControlPlane, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    create_service(api, namespace, "web", "10.96.7.10")
    set_endpoints(api, namespace, "web", [(A1, "node-a"), (B1, "node-b")], not_ready={B1})
    create_service(api, namespace, "nopods", "10.96.7.11")
    create_service(api, namespace, "renamed", "10.96.7.12", port_name="http")
    set_endpoints(api, namespace, "renamed", [(A1, "node-a")], port_name="web")

    ex = explain(control_plane.kubeconfig_proxy, namespace, "web")
    assert (ex["service"], ex["found"], ex["type"]) == (f"{namespace}/web", True, "ClusterIP")
    assert ex["cluster_ips"] == ["10.96.7.10"]
    assert ex["selector"] == {"app": "web"}
    usage = {e["address"]: (e["node"], e["used"]) for e in ex["endpoints"]}
    assert usage == {A1: ("node-a", True), B1: ("node-b", False)}
    (b1,) = [e for e in ex["endpoints"] if e["address"] == B1]
    assert b1["ports"][0]["internal"]["code"] == "not-ready"
    (cip,) = [c for c in ex["connections"] if c["kind"] == "ClusterIP"]
    assert (cip["outcome"], [e["endpoint"] for e in cip["endpoints"]]) == (
        "answered",
        [f"{A1}:8080"],
    )

    # The usual misconfigurations, recognised from what the API server returns.
    ex = explain(control_plane.kubeconfig_proxy, namespace, "nopods")
    assert "selector-matches-no-pods" in codes(ex)
    assert {c["outcome"] for c in ex["connections"]} == {"rejected"}
    ex = explain(control_plane.kubeconfig_proxy, namespace, "renamed")
    assert "port-name-mismatch" in codes(ex)
    ex = explain(control_plane.kubeconfig_proxy, namespace, "web", "--from", "fd00::7")
    assert "other-ip-family" in codes(ex)
    assert {c["outcome"] for c in ex["connections"]} == {"not-applicable"}

    # A Service that does not exist is said so, with exit code 1.
    ex = explain(control_plane.kubeconfig_proxy, namespace, "missing", code=1)
    assert ex["found"] is False
    assert "service-not-found" in codes(ex)


node_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})


@pytest.fixture
def agent(node_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path) -> Iterator[Agent]:
    with running_agent(
        node_cluster, control_plane.server, control_plane.kubeconfig_proxy, tmp_path
    ) as a:
        yield a


def trace(agent: Agent, *args: str) -> dict[str, Any]:
    """`pyproxy trace` inside node-a, with drift checked against the API's desired state."""
    argv = [sys.executable, "-m", "pyproxy", "trace", *args, "--kubeconfig", str(agent.kubeconfig)]
    argv += [*NODE_FLAGS, "--iptables-backend", "nft", "-o", "json"]
    result = agent.node.run(argv, check=False)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


@pytest.mark.kernel
def test_trace_checks_the_agents_rules_against_the_api(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    create_service(api, namespace, "web", "10.96.7.20")
    set_endpoints(api, namespace, "web", [(A1, "node-a"), (B1, "node-b")])
    c = agent.cluster
    eventually(lambda: answers(c.pod("a2"), "10.96.7.20", 80, 20) == {"a1", "b1"}, what="2 eps")

    report = trace(agent, "--src", A2, "--dst", "10.96.7.20", "--port", "80")
    assert report["verdict"] == "DNAT"
    assert sorted(e["endpoint"] for e in report["endpoints"]) == [f"{A1}:8080", f"{B1}:8080"]
    assert report["drift"] == {"checked": True, "chains": []}

    # Delete b1's DNAT rule by hand: trace follows the kernel and names the drifted chain.
    dnat_b1 = next(
        line
        for line in agent.node.run(["iptables-nft", "-t", "nat", "-S"]).stdout.splitlines()
        if line.startswith("-A KUBE-SEP-")
        and f"--to-destination {B1}:8080" in line
        and f"{namespace}/web:p" in line
    )
    agent.node.run(["iptables-nft", "-t", "nat", "-D", *shlex.split(dnat_b1)[1:]])
    report = trace(agent, "--src", A2, "--dst", "10.96.7.20", "--port", "80")
    assert [(d["chain"], d["kind"]) for d in report["drift"]["chains"]] == [
        (dnat_b1.split()[1], "different")
    ]
    assert [e["endpoint"] for e in report["endpoints"]] == [f"{A1}:8080"]
