"""`pyproxy trace` against the rules really programmed in a node's network namespace.

A netlab cluster (node-a: a1, a2; node-b: b1). pyproxy programs node-a from a state file
(`python -m pyproxy --once --state F`), then `trace` (run inside node-a, reading iptables-save)
must follow a packet to the endpoints real packets reach, report no drift, and, once the rules
are tampered with by hand (a KUBE-SEP- rule deleted, a REJECT rule added), report the drift
naming the chain while its trace shows what the tampered kernel now does. A new sync repairs it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from netlab import Cluster, Refused, Reply, spread, tcp_ask
from netlab.fixtures import cluster_fixture

pytestmark = pytest.mark.kernel

A1, A2, B1 = "10.244.1.11", "10.244.1.12", "10.244.2.11"
B1_6 = "fd00:244:2::11"
NODE_A = "172.30.0.2"
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/48"
WEB, EMPTY, NP, WEB6 = "10.96.0.10", "10.96.0.30", "10.96.0.40", "fd00:96::10"

STATE = textwrap.dedent("""\
    apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: Service
      metadata: {namespace: t, name: web}
      spec:
        clusterIPs: ["10.96.0.10", "fd00:96::10"]
        ports: [{name: http, port: 80, protocol: TCP}]
    - apiVersion: discovery.k8s.io/v1
      kind: EndpointSlice
      metadata: {namespace: t, name: web-v4, labels: {kubernetes.io/service-name: web}}
      addressType: IPv4
      ports: [{name: http, port: 8080, protocol: TCP}]
      endpoints:
      - {addresses: ["10.244.1.11"], nodeName: node-a, conditions: {ready: true}}
      - {addresses: ["10.244.2.11"], nodeName: node-b, conditions: {ready: true}}
    - apiVersion: discovery.k8s.io/v1
      kind: EndpointSlice
      metadata: {namespace: t, name: web-v6, labels: {kubernetes.io/service-name: web}}
      addressType: IPv6
      ports: [{name: http, port: 8080, protocol: TCP}]
      endpoints:
      - {addresses: ["fd00:244:2::11"], nodeName: node-b, conditions: {ready: true}}
    - apiVersion: v1
      kind: Service
      metadata: {namespace: t, name: empty}
      spec:
        clusterIPs: ["10.96.0.30"]
        ports: [{name: http, port: 80, protocol: TCP}]
    - apiVersion: v1
      kind: Service
      metadata: {namespace: t, name: np}
      spec:
        type: NodePort
        clusterIPs: ["10.96.0.40"]
        ports: [{name: http, port: 80, nodePort: 30040, protocol: TCP}]
    - apiVersion: discovery.k8s.io/v1
      kind: EndpointSlice
      metadata: {namespace: t, name: np-x, labels: {kubernetes.io/service-name: np}}
      addressType: IPv4
      ports: [{name: http, port: 8080, protocol: TCP}]
      endpoints:
      - {addresses: ["10.244.2.11"], nodeName: node-b, conditions: {ready: true}}
    """)

traced_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})


def node_flags(cluster: Cluster, state: Path) -> list[str]:
    a = cluster.node("a")
    return [
        "--state", str(state), "--hostname-override", a.node_name,
        "--node-ip", a.ip, "--node-ip", a.ip6, "--cluster-cidr", CLUSTER_CIDRS,
    ]  # fmt: skip


def program(cluster: Cluster, state: Path, backend: str = "nft") -> None:
    result = cluster.node("a").run(
        [sys.executable, "-m", "pyproxy", "--once", *node_flags(cluster, state),
         "--iptables-backend", backend],
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def trace(
    cluster: Cluster, state: Path | None, *args: str, backend: str = "nft", json_out: bool = True
) -> Any:
    """Run `pyproxy trace` inside node-a (with drift checking when `state` is given)."""
    argv = [sys.executable, "-m", "pyproxy.explain", "trace", *args]
    argv += ["--iptables-backend", backend]
    if state is not None:
        argv += node_flags(cluster, state)
    if json_out:
        argv += ["-o", "json"]
    result = cluster.node("a").run(argv, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if json_out else result.stdout


def iptables(cluster: Cluster, *args: str, tool: str = "iptables-nft") -> str:
    return cluster.node("a").run([tool, *args]).stdout


@pytest.fixture
def programmed(traced_cluster: Cluster, tmp_path: Path) -> tuple[Cluster, Path]:
    state = tmp_path / "state.yaml"
    state.write_text(STATE)
    program(traced_cluster, state)
    return traced_cluster, state


def endpoints(report: dict[str, Any]) -> list[str]:
    return [e["endpoint"] for e in report["endpoints"]]


def test_trace_follows_the_kernel_rules_and_sees_no_drift(programmed: tuple[Cluster, Path]) -> None:
    c, state = programmed
    report = trace(c, state, "--src", A2, "--dst", WEB, "--port", "80")
    assert report["verdict"] == "DNAT"
    assert report["backend"] == "nft"
    assert endpoints(report) == [f"{A1}:8080", f"{B1}:8080"]
    assert [e["probability"] for e in report["endpoints"]] == [0.5, 0.5]
    assert report["masquerade"] is False  # a pod inside --cluster-cidr keeps its address
    path = report["path"]
    assert path[:2] == ["nat/PREROUTING", "nat/KUBE-SERVICES"]
    assert path[2].startswith("nat/KUBE-SVC-")
    assert all(p.startswith("nat/KUBE-SEP-") for p in path[3:5])
    assert path[5] == "filter/FORWARD"
    assert report["drift"] == {"checked": True, "chains": []}
    # What real packets do agrees with the trace.
    assert set(spread(c.pod("a2"), WEB, 80, 30)) == {"a1", "b1"}

    # IPv6: its own rules, its own family's save, no drift either.
    report6 = trace(c, state, "--src", "fd00:244:1::12", "--dst", WEB6, "--port", "80")
    assert endpoints(report6) == [f"[{B1_6}]:8080"]
    assert report6["drift"] == {"checked": True, "chains": []}


def test_reject_nodeport_and_from_node_paths(programmed: tuple[Cluster, Path]) -> None:
    c, state = programmed
    report = trace(c, state, "--src", A2, "--dst", EMPTY, "--port", "80")
    assert report["verdict"] == "REJECT"
    assert report["path"][-1] == "filter/KUBE-SERVICES"
    reject = [s for s in report["steps"] if s["action"] == "verdict"][-1]
    assert '"t/empty:http has no endpoints"' in reject["rule"]
    assert isinstance(tcp_ask(c.pod("a2"), EMPTY, 80, timeout=2), Refused)

    # An external client to the NodePort: masqueraded, DNAT to b1.
    report = trace(c, None, "--src", "172.30.0.100", "--dst", NODE_A, "--port", "30040")
    assert (report["verdict"], endpoints(report), report["masquerade"]) == (
        "DNAT",
        [f"{B1}:8080"],
        True,
    )
    assert "nat/KUBE-NODEPORTS" in report["path"]
    assert report["drift"] is None
    # The node itself: OUTPUT chains, its own address as source.
    report = trace(c, None, "--from-node", "--dst", WEB, "--port", "80")
    assert report["from_node"] is True
    assert report["src"] == NODE_A
    assert report["path"][0] == "nat/OUTPUT"
    assert report["path"][-1].startswith("filter/")


def test_tampering_is_reported_as_drift_naming_the_chain(programmed: tuple[Cluster, Path]) -> None:
    c, state = programmed
    saved = iptables(c, "-t", "nat", "-S")
    dnat_b1 = next(
        line
        for line in saved.splitlines()
        if line.startswith("-A KUBE-SEP-")
        and f"--to-destination {B1}:8080" in line
        and "t/web:http" in line
    )
    sep_b1 = dnat_b1.split()[1]

    # 1. Delete the DNAT rule of b1's endpoint chain by hand.
    iptables(c, "-t", "nat", "-D", *shlex.split(dnat_b1)[1:])
    report = trace(c, state, "--src", A2, "--dst", WEB, "--port", "80")
    assert report["drift"]["chains"] == [
        {
            "table": "nat",
            "chain": sep_b1,
            "kind": "different",
            "detail": "1 rule missing",
            "missing_rules": report["drift"]["chains"][0]["missing_rules"],
            "unexpected_rules": [],
        }
    ]
    (missing,) = report["drift"]["chains"][0]["missing_rules"]
    assert f"--to-destination {B1}:8080" in missing
    # The trace shows the tampered kernel: b1's branch no longer translates anything.
    assert endpoints(report) == [f"{A1}:8080"]
    assert f"nat/{sep_b1}" in report["path"]

    # The text output warns and names the chain.
    text = trace(c, state, "--src", A2, "--dst", WEB, "--port", "80", json_out=False)
    assert "warning: drift" in text
    assert f"nat/{sep_b1}: different: 1 rule missing" in text

    # 2. Someone hijacks the Service with a rule of their own in front of ours.
    iptables(
        c, "-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", WEB, "-p", "tcp", "--dport", "80",
        "-j", "DNAT", "--to-destination", f"{A2}:8080",
    )  # fmt: skip
    report = trace(c, state, "--src", A1, "--dst", WEB, "--port", "80")
    assert (report["verdict"], endpoints(report)) == ("DNAT", [f"{A2}:8080"])
    first = next(s for s in report["steps"] if s["chain"] == "KUBE-SERVICES" and s["index"])
    assert (first["index"], first["action"]) == (1, "dnat")
    kinds = {(d["table"], d["chain"], d["kind"]) for d in report["drift"]["chains"]}
    assert kinds == {("nat", sep_b1, "different"), ("nat", "KUBE-SERVICES", "different")}
    hijack = next(d for d in report["drift"]["chains"] if d["chain"] == "KUBE-SERVICES")
    assert hijack["unexpected_rules"] == [
        f"-A KUBE-SERVICES -d {WEB}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {A2}:8080"
    ]
    assert hijack["missing_rules"] == []
    assert spread(c.pod("a1"), WEB, 80, 10) == {"a2": 10}

    # 3. A full sync puts pyproxy's rules back; the drift is gone.
    program(c, state)
    report = trace(c, state, "--src", A2, "--dst", WEB, "--port", "80")
    assert report["drift"]["chains"] == []
    assert endpoints(report) == [f"{A1}:8080", f"{B1}:8080"]
    assert isinstance(tcp_ask(c.pod("a2"), WEB, 80), Reply)


def test_legacy_backend(traced_cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "state.yaml"
    state.write_text(STATE)
    program(traced_cluster, state, backend="legacy")
    report = trace(
        traced_cluster, state, "--src", A2, "--dst", NP, "--port", "80", backend="legacy"
    )
    assert report["backend"] == "legacy"
    assert endpoints(report) == [f"{B1}:8080"]
    assert report["drift"]["chains"] == []
    sep = next(p for p in report["path"] if p.startswith("nat/KUBE-SEP-")).split("/")[1]
    iptables(traced_cluster, "-t", "nat", "-F", sep, tool="iptables-legacy")
    report = trace(
        traced_cluster, state, "--src", A2, "--dst", NP, "--port", "80", backend="legacy"
    )
    assert [(d["chain"], d["detail"]) for d in report["drift"]["chains"]] == [
        (sep, "2 rules missing")
    ]


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "explain"
CAPTURE_FLAGS = (
    "--hostname-override", "node-a", "--node-ip", "10.1.0.2", "--node-ip", "10.1.1.2",
    "--cluster-cidr", "10.244.0.0/16",
)  # fmt: skip


def _without_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_unit_captures_are_what_the_kernel_saves(traced_cluster: Cluster, backend: str) -> None:
    """tests/unit/test_explain.py checks drift against `policies.<backend>.save`, real
    iptables-save output; this keeps those files current (UPDATE_GOLDEN=1 rewrites them)."""
    a = traced_cluster.node("a")
    result = a.run(
        [sys.executable, "-m", "pyproxy", "--once", "--state", str(GOLDEN / "policies.yaml"),
         *CAPTURE_FLAGS, "--iptables-backend", backend],
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = "".join(
        _without_comments(a.run([f"iptables-{backend}-save", "-t", table]).stdout)
        for table in ("filter", "nat")
    )
    golden = GOLDEN / f"policies.{backend}.save"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(saved)
        # An update run never passes: the capture must be reviewed and recorded first
        # (tests/unit/test_golden_review.py, hack/review_golden.py).
        pytest.fail(f"rewrote {golden.name}: review it, then hack/review_golden.py {golden}")
    assert golden.read_text() == saved, f"{golden.name} is stale: rerun with UPDATE_GOLDEN=1"
