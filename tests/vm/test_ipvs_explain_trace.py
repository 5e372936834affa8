"""`pyproxy trace --proxy-mode ipvs` against a node programmed by `pyproxy --once`, in the VM.

Node a is programmed with `pyproxy --proxy-mode ipvs --once --state FILE`; then, in the node's
namespace, `python -m pyproxy.explain trace --proxy-mode ipvs` with the same state must report
no drift (IPVS and chains) and name the real servers that real connections from a pod reach.
After `ipvsadm -d` removes one real server by hand, trace names exactly that real server as
missing, and real connections no longer reach it.

    hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm -p no:cacheprovider -k explain
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from netlab import Cluster, Node, Reply, tcp_ask
from netlab.fixtures import cluster_fixture

from tests.vm.test_ipvs_flags import PYPROXY_TIMEOUT, pyproxy_once, state_file, svc

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ip_vs")]

VIP = "10.96.0.30"
explain_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)}, scope="module")


def endpoints(c: Cluster) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "t",
            "name": "web-x",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [c.pod(p).ip], "nodeName": node, "conditions": {"ready": True}}
            for p, node in (("a1", c.node("a").node_name), ("b1", c.node("b").node_name))
        ],
    }


def trace(node: Node, state: Path, src: str) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "pyproxy.explain",
        "trace",
        "--proxy-mode",
        "ipvs",
        "--src",
        src,
        "--dst",
        VIP,
        "--port",
        "80",
        "--state",
        str(state),
        "--hostname-override",
        node.node_name,
        "--node-ip",
        node.ip,
        "--cluster-cidr",
        "10.244.0.0/16",
        "--iptables-backend",
        "nft",
        "-o",
        "json",
    ]
    result = node.run(argv, check=False, timeout=PYPROXY_TIMEOUT)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def answered_by(c: Cluster, n: int = 8) -> set[str]:
    """The pod IPs that answer `n` new connections from pod a2 to the VIP (rr: all of them)."""
    ips = {p: c.pod(p).ip for p in ("a1", "a2", "b1")}
    seen = set()
    for _ in range(n):
        reply = tcp_ask(c.pod("a2"), VIP, 80)
        assert isinstance(reply, Reply), reply
        seen.add(ips.get(reply.name, reply.name))
    return seen


def test_trace_sees_no_drift_then_the_deleted_real_server(
    explain_cluster: Cluster, tmp_path: Path
) -> None:
    c = explain_cluster
    node = c.node("a")
    state = state_file(tmp_path, "web", [svc("web", VIP, 80), endpoints(c)])
    pyproxy_once(node, state)
    a1, b1 = c.pod("a1").ip, c.pod("b1").ip

    before = trace(node, state, c.pod("a2").ip)
    ipvs = before["ipvs"]
    assert ipvs["drift"] == {"checked": True, "items": []}, ipvs["drift"]
    assert before["drift"] == {"checked": True, "chains": []}, before["drift"]
    match = ipvs["match"]
    assert (match["virtual_server"], match["outcome"]) == (f"{VIP}:80/TCP", "answered")
    reals = {r["endpoint"] for r in match["real_servers"]}
    assert reals == {f"{a1}:8080", f"{b1}:8080"}
    assert answered_by(c) == {ip.rsplit(":", 1)[0] for ip in reals}

    node.run(["ipvsadm", "-d", "-t", f"{VIP}:80", "-r", f"{b1}:8080"])
    after = trace(node, state, c.pod("a2").ip)
    items = after["ipvs"]["drift"]["items"]
    assert items == [
        {
            "kind": "missing",
            "item": "real server",
            "name": f"{VIP}:80/TCP -> {b1}:8080",
            "detail": "not in the kernel",
        }
    ]
    assert [r["endpoint"] for r in after["ipvs"]["match"]["real_servers"]] == [f"{a1}:8080"]
    assert answered_by(c) == {a1}
