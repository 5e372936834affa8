"""Real packets through the rules `pyproxy --state FILE --once` programs (iptables mode).

A netlab cluster (tests/netlab): node-a with pods a1, a2, a3; node-b with pods b1, b2; an
external client on the LAN. pyproxy programs both nodes from the same state file, as the
DaemonSet would, and the tests check which endpoint answered and which source address the
backend saw (so masquerading is observed, not assumed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from netlab import Cluster, Refused, Reply, Timeout, http_get, spread, tcp_ask, udp_ask
from netlab.fixtures import cluster_fixture

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/48"
LAYOUT = {"a": ("a1", "a2", "a3"), "b": ("b1", "b2")}

# Pod addresses from the netlab plan.
A1, A2, A3 = "10.244.1.11", "10.244.1.12", "10.244.1.13"
B1, B2 = "10.244.2.11", "10.244.2.12"
NODE_A, NODE_B, CLIENT = "172.30.0.2", "172.30.0.3", "172.30.0.100"


def svc(name: str, ip: str | list[str], ports: str, extra: str = "", status: str = "") -> str:
    ips = ip if isinstance(ip, list) else [ip]
    return (
        textwrap.dedent(f"""\
        - apiVersion: v1
          kind: Service
          metadata: {{namespace: t, name: {name}}}
          spec:
            clusterIPs: [{", ".join(f'"{i}"' for i in ips)}]
            ports: {ports}
        """)
        + textwrap.indent(textwrap.dedent(extra), "    ")
        + (textwrap.indent(textwrap.dedent(status), "  ") if status else "")
    )


def eps(
    service: str,
    endpoints: Sequence[tuple[str, str] | tuple[str, str, str]],
    ports: str = "[{name: http, port: 8080, protocol: TCP}]",
    *,
    family: str = "IPv4",
    slice_name: str | None = None,
) -> str:
    """endpoints: (ip, node) or (ip, node, 'terminating')."""
    lines = []
    for ep in endpoints:
        cond = (
            "{ready: false, serving: true, terminating: true}"
            if len(ep) == 3
            else "{ready: true, serving: true, terminating: false}"
        )
        lines.append(f'  - {{addresses: ["{ep[0]}"], nodeName: {ep[1]}, conditions: {cond}}}')
    body = "\n".join(lines) if lines else "  []"
    return (
        textwrap.dedent(f"""\
        - apiVersion: discovery.k8s.io/v1
          kind: EndpointSlice
          metadata:
            namespace: t
            name: {slice_name or service + "-x"}
            labels: {{kubernetes.io/service-name: {service}}}
          addressType: {family}
          ports: {ports}
          endpoints:
        """)
        + body
        + "\n"
    )


def state(*items: str) -> str:
    return "apiVersion: v1\nkind: List\nitems:\n" + "".join(items)


HTTP = "[{name: http, port: 80, protocol: TCP}]"


def np_port(node_port: int) -> str:
    return f"[{{name: http, port: 80, nodePort: {node_port}, protocol: TCP}}]"


BASE_STATE = state(
    # Spread over three endpoints on both nodes; a second port with its own target port.
    svc(
        "web",
        "10.96.0.10",
        "[{name: http, port: 80, protocol: TCP}, {name: alt, port: 81, protocol: TCP}]",
    ),
    eps(
        "web",
        [(A1, "node-a"), (B1, "node-b"), (B2, "node-b")],
        "[{name: http, port: 8080, protocol: TCP}, {name: alt, port: 8081, protocol: TCP}]",
    ),
    # UDP.
    svc("dns", "10.96.0.53", "[{name: dns, port: 53, protocol: UDP}]"),
    eps("dns", [(A1, "node-a"), (B1, "node-b")], "[{name: dns, port: 5353, protocol: UDP}]"),
    # Hairpin: a3 is the only endpoint of its own Service.
    svc("self", "10.96.0.20", HTTP),
    eps("self", [(A3, "node-a")]),
    # No endpoints at all.
    svc("empty", "10.96.0.30", np_port(30030), "type: NodePort\n"),
    # NodePort, externalTrafficPolicy Cluster, endpoints only on node-b.
    svc("np", "10.96.0.40", np_port(30040), "type: NodePort\n"),
    eps("np", [(B1, "node-b")]),
    # NodePort + LB, externalTrafficPolicy Local, endpoint only on node-a.
    svc(
        "local",
        "10.96.0.50",
        np_port(30050),
        "type: LoadBalancer\nexternalTrafficPolicy: Local\nhealthCheckNodePort: 32050\n",
        "status: {loadBalancer: {ingress: [{ip: 192.0.2.50}]}}\n",
    ),
    eps("local", [(A1, "node-a")]),
    # LB with source ranges: one admits the client, one does not.
    svc(
        "lb-open",
        "10.96.0.60",
        np_port(30060),
        "type: LoadBalancer\nloadBalancerSourceRanges: [172.30.0.96/28]\n",
        "status: {loadBalancer: {ingress: [{ip: 192.0.2.60}]}}\n",
    ),
    eps("lb-open", [(B2, "node-b")]),
    svc(
        "lb-closed",
        "10.96.0.61",
        np_port(30061),
        "type: LoadBalancer\nloadBalancerSourceRanges: [203.0.113.0/24]\n",
        "status: {loadBalancer: {ingress: [{ip: 192.0.2.61}]}}\n",
    ),
    eps("lb-closed", [(B2, "node-b")]),
    # externalIPs.
    svc("ext", "10.96.0.70", HTTP, "externalIPs: [198.51.100.70]\n"),
    eps("ext", [(B1, "node-b")]),
    # ClientIP affinity.
    svc(
        "sticky",
        "10.96.0.80",
        HTTP,
        "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n",
    ),
    eps("sticky", [(A1, "node-a"), (B1, "node-b"), (B2, "node-b")]),
    # internalTrafficPolicy Local.
    svc("itp", "10.96.0.90", HTTP, "internalTrafficPolicy: Local\n"),
    eps("itp", [(A1, "node-a"), (B1, "node-b")]),
    # Only serving+terminating endpoints: still used.
    svc("rolling", "10.96.0.100", HTTP),
    eps("rolling", [(B1, "node-b", "terminating")]),
    # Dual-stack.
    svc("dual", ["10.96.0.110", "fd00:96::110"], HTTP),
    eps("dual", [(A1, "node-a"), (B1, "node-b")], slice_name="dual-v4"),
    eps("dual", [("fd00:244:2::11", "node-b")], family="IPv6", slice_name="dual-v6"),
)


def program(
    cluster: Cluster,
    tmp: Path,
    text: str,
    *,
    nodes: Sequence[str] = ("a", "b"),
    extra: Sequence[str] = (),
    backend: str = "nft",
) -> list[subprocess.CompletedProcess[str]]:
    """`pyproxy --once` with `text` as state on each node; asserts it succeeded."""
    path = tmp / "state.yaml"
    path.write_text(text)
    results = []
    for key in nodes:
        node = cluster.node(key)
        result = node.run(
            [
                sys.executable,
                "-m",
                "pyproxy",
                "--once",
                "--state",
                str(path),
                "--hostname-override",
                node.node_name,
                "--node-ip",
                node.ip,
                "--node-ip",
                node.ip6,
                "--cluster-cidr",
                CLUSTER_CIDRS,
                "--iptables-backend",
                backend,
                *extra,
            ],
            check=False,
        )
        assert result.returncode == 0, result.stderr
        results.append(result)
    return results


def save(cluster: Cluster, key: str, tool: str = "iptables-nft-save") -> str:
    return cluster.node(key).run([tool]).stdout


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dataplane")


programmed_cluster = cluster_fixture(LAYOUT, scope="module")


@pytest.fixture(scope="module")
def net(programmed_cluster: Cluster, tmp_module: Path) -> Cluster:
    c = programmed_cluster
    c.client_route("192.0.2.0/24", "a")
    c.client_route("198.51.100.0/24", "a")
    c.client_route("10.96.0.0/16", "a")
    program(c, tmp_module, BASE_STATE)
    return c


fresh_cluster = cluster_fixture(LAYOUT)


def name(result: object) -> str:
    assert isinstance(result, Reply), f"expected an answer, got {result!r}"
    return result.name


# --- ClusterIP ---------------------------------------------------------------------------


def test_cluster_ip_spreads_over_every_endpoint_without_masquerade(net: Cluster) -> None:
    answers = spread(net.pod("a2"), "10.96.0.10", 80, 60)
    assert set(answers) == {"a1", "b1", "b2"}
    # Pod-to-service traffic keeps the pod's source address on every endpoint.
    for _ in range(6):
        reply = tcp_ask(net.pod("a2"), "10.96.0.10", 80)
        assert isinstance(reply, Reply) and reply.peer_ip == A2


def test_second_port_uses_the_slice_target_port(net: Cluster) -> None:
    # Port 81 maps to the slice port named "alt" (8081); backends answer on both ports.
    reply = http_get(net.pod("a2"), "10.96.0.10", 81)
    assert name(reply) in {"a1", "b1", "b2"}
    assert isinstance(reply, Reply) and reply.peer_ip == A2


def test_cluster_ip_from_the_other_node(net: Cluster) -> None:
    assert set(spread(net.pod("b2"), "10.96.0.10", 80, 40)) == {"a1", "b1", "b2"}


def test_udp_cluster_ip(net: Cluster) -> None:
    seen = {name(udp_ask(net.pod("a2"), "10.96.0.53", 53)) for _ in range(20)}
    assert seen <= {"a1", "b1"} and seen


def test_hairpin_pod_reaches_itself_masqueraded(net: Cluster) -> None:
    reply = tcp_ask(net.pod("a3"), "10.96.0.20", 80)
    assert name(reply) == "a3"
    assert isinstance(reply, Reply) and reply.peer_ip != A3  # SNAT, or the reply would bypass DNAT


def test_service_without_endpoints_is_refused_at_once(net: Cluster) -> None:
    assert isinstance(tcp_ask(net.pod("a2"), "10.96.0.30", 80, timeout=2), Refused)
    assert isinstance(http_get(net.client, NODE_A, 30030, timeout=2), Refused)


def test_off_cluster_client_to_cluster_ip_is_masqueraded(net: Cluster) -> None:
    # The client routes 10.96.0.0/16 via node-a; its source is outside --cluster-cidr.
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
    for target in (NODE_A, "192.0.2.50"):
        port = 30050 if target == NODE_A else 80
        reply = tcp_ask(net.client, target, port)
        assert name(reply) == "a1"
        assert isinstance(reply, Reply) and reply.peer_ip == CLIENT


def test_external_traffic_policy_local_drops_on_a_node_without_local_endpoints(
    net: Cluster,
) -> None:
    assert isinstance(tcp_ask(net.client, NODE_B, 30050, timeout=1.5), Timeout)
    # Controls: the same node port answers on the node with the local endpoint, and node-b
    # answers the client on a Cluster-policy node port (so the drop is the policy's doing).
    assert name(tcp_ask(net.client, NODE_A, 30050)) == "a1"
    assert name(tcp_ask(net.client, NODE_B, 30040)) == "b1"


def test_external_traffic_policy_local_short_circuits_pod_traffic(net: Cluster) -> None:
    # A pod on node-b (no local endpoint) reaching the LB IP still gets an answer.
    assert name(tcp_ask(net.pod("b2"), "192.0.2.50", 80)) == "a1"


def test_load_balancer_source_ranges(net: Cluster) -> None:
    assert name(tcp_ask(net.client, "192.0.2.60", 80)) == "b2"
    assert isinstance(tcp_ask(net.client, "192.0.2.61", 80, timeout=1.5), Timeout)
    # NodePorts are not subject to loadBalancerSourceRanges (upstream behaviour).
    assert name(tcp_ask(net.client, NODE_A, 30061)) == "b2"


def test_external_ip(net: Cluster) -> None:
    reply = tcp_ask(net.client, "198.51.100.70", 80)
    assert name(reply) == "b1"
    assert isinstance(reply, Reply) and reply.peer_ip != CLIENT


def test_localhost_node_port(net: Cluster) -> None:
    reply = http_get(net.node("a"), "127.0.0.1", 30040)
    assert name(reply) == "b1"


def test_health_check_node_port_is_accepted_by_the_rules(net: Cluster) -> None:
    rules = save(net, "a")
    assert '--comment "t/local:http health check node port" -m tcp --dport 32050 -j ACCEPT' in rules


# --- changes, flags, cleanup --------------------------------------------------------------


def test_changes_follow_and_stale_chains_are_deleted(
    fresh_cluster: Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    two = state(svc("web", "10.96.0.10", HTTP), eps("web", [(A1, "node-a"), (B1, "node-b")]))
    program(c, tmp_path, two)
    assert set(spread(c.pod("a2"), "10.96.0.10", 80, 30)) == {"a1", "b1"}
    seps_before = {
        line.split()[0][1:] for line in save(c, "a").splitlines() if line.startswith(":KUBE-SEP-")
    }
    assert len(seps_before) == 2

    program(c, tmp_path, state(svc("web", "10.96.0.10", HTTP), eps("web", [(B1, "node-b")])))
    assert set(spread(c.pod("a2"), "10.96.0.10", 80, 20)) == {"b1"}
    seps_after = {
        line.split()[0][1:] for line in save(c, "a").splitlines() if line.startswith(":KUBE-SEP-")
    }
    assert len(seps_after) == 1 and seps_after < seps_before

    program(c, tmp_path, state())
    rules = save(c, "a")
    assert "KUBE-SVC-" not in rules and "KUBE-SEP-" not in rules
    assert not isinstance(tcp_ask(c.pod("a2"), "10.96.0.10", 80, timeout=1), Reply)


def test_running_twice_changes_nothing(fresh_cluster: Cluster, tmp_path: Path) -> None:
    program(fresh_cluster, tmp_path, BASE_STATE, nodes=("a",))
    first = save(fresh_cluster, "a")
    program(fresh_cluster, tmp_path, BASE_STATE, nodes=("a",))
    strip = lambda text: [x for x in text.splitlines() if not x.startswith("#")]  # noqa: E731
    assert strip(save(fresh_cluster, "a")) == strip(first)


def test_masquerade_all(fresh_cluster: Cluster, tmp_path: Path) -> None:
    c = fresh_cluster
    one = state(svc("web", "10.96.0.10", HTTP), eps("web", [(B1, "node-b")]))
    program(c, tmp_path, one)
    reply = tcp_ask(c.pod("a2"), "10.96.0.10", 80)
    assert isinstance(reply, Reply) and reply.peer_ip == A2
    program(c, tmp_path, one, extra=["--masquerade-all"])
    reply = tcp_ask(c.pod("a2"), "10.96.0.10", 80)
    assert isinstance(reply, Reply) and reply.peer_ip == NODE_A


def test_legacy_backend_works_too(fresh_cluster: Cluster, tmp_path: Path) -> None:
    c = fresh_cluster
    one = state(svc("web", "10.96.0.10", HTTP), eps("web", [(B1, "node-b")]))
    program(c, tmp_path, one, nodes=("a",), backend="legacy")
    assert "KUBE-SVC-" in save(c, "a", "iptables-legacy-save")
    assert name(tcp_ask(c.pod("a2"), "10.96.0.10", 80)) == "b1"


def test_cleanup_removes_ours_and_keeps_foreign_rules(
    fresh_cluster: Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    node = c.node("a")
    node.run(["iptables-nft", "-t", "nat", "-N", "SOMEONE-ELSE"])
    node.run(["iptables-nft", "-t", "nat", "-A", "SOMEONE-ELSE", "-j", "RETURN"])
    node.run(["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"])
    program(c, tmp_path, BASE_STATE, nodes=("a",))
    assert "KUBE-SERVICES" in save(c, "a")
    result = node.run([sys.executable, "-m", "pyproxy", "--cleanup", "--iptables-backend", "nft"])
    assert result.returncode == 0
    rules = save(c, "a")
    assert "KUBE-" not in rules
    assert "SOMEONE-ELSE" in rules and "--dport 9 -j ACCEPT" in rules


def test_bad_state_file_programs_nothing(fresh_cluster: Cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("items: [\n")
    result = fresh_cluster.node("a").run(
        [
            sys.executable,
            "-m",
            "pyproxy",
            "--once",
            "--state",
            str(bad),
            "--hostname-override",
            "node-a",
            "--node-ip",
            NODE_A,
        ],
        check=False,
    )
    assert result.returncode == 1 and "cannot parse state file" in result.stderr
    assert "KUBE-" not in save(fresh_cluster, "a")


def test_invalid_object_is_skipped_and_others_still_work(
    fresh_cluster: Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    text = state(
        svc("web", "10.96.0.10", HTTP),
        eps("web", [(B1, "node-b")]),
        svc("broken", "10.96.0.999", HTTP),
    )
    [result] = program(c, tmp_path, text, nodes=("a",))
    assert "t/broken" in result.stderr and "spec.clusterIPs[0]" in result.stderr
    assert name(tcp_ask(c.pod("a2"), "10.96.0.10", 80)) == "b1"


def test_pyproxy_command_and_module_entry_points() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "pyproxy"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "--dry-run" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "pyproxy", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert out.returncode == 0 and "--hostname-override" in out.stdout
