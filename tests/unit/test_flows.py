"""Flow tables: what happens to a packet, traced through the rendered rules.

Spec: reference/kube-proxy.md §a and §f. The tables are upstream's packet-flow tests from
pkg/proxy/iptables/proxier_test.go (TestTracePacket, TestNoEndpointsReject, TestClusterIPGeneral,
TestLoadBalancer, TestNodePorts, TestHealthCheckNodePort, TestExternalTrafficPolicyLocal/Cluster,
TestInternalTrafficPolicy, TestTerminatingEndpointsTrafficPolicyLocal/Cluster,
TestInternalExternalMasquerade), run against the golden states, whose Services use the same
names, addresses and endpoints (renumbered where several upstream tests share one state).
Upstream's tracer semantics: nat KUBE-SERVICES first (every load-balancing branch collected),
then filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-NODEPORTS, KUBE-PROXY-FIREWALL; the
output is the endpoints and/or ACCEPT/REJECT/DROP, plus whether the packet was marked for
masquerading. Node: test-node, 192.168.0.2 (+ 192.168.1.2, 192.168.99.11, 2001:db8::1,
2001:db8:1::2 local), pods 10.0.0.0/8 / fd00:10::/64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import pytest
from support import (
    EXTERNAL_CLIENT,
    EXTERNAL_CLIENT_BLOCKED,
    EXTERNAL_CLIENT_IPV6,
    GOLDEN_DIR,
    NODE_IP,
    NODE_IP_ALT,
    NODE_IPV6,
    NODE_IPV6_ALT,
    POD_IP,
    POD_IPV6,
    family_ruleset,
    golden_args,
    load_objects,
    render,
    trace,
)

from pyproxy.iptables.tracer import Ruleset


@dataclass(frozen=True)
class Flow:
    name: str
    src: str
    dst: str
    port: int
    output: str
    masq: bool = False
    protocol: str = "tcp"


@functools.cache
def ruleset(state: str, extra: tuple[str, ...] = (), family: str = "IPv4") -> Ruleset:
    path = GOLDEN_DIR / f"{state}.yaml"
    return family_ruleset(render(load_objects(path), (*golden_args(path), *extra)), family)


def check(rs: Ruleset, flow: Flow) -> None:
    t = trace(rs, flow.src, flow.dst, flow.port, flow.protocol)
    assert (t.output, t.masquerade) == (flow.output, flow.masq), (
        f"{flow.name}: {flow.protocol} {flow.src} -> {flow.dst}:{flow.port}\n{t.describe()}"
    )


def flow_params(flows: list[Flow]) -> list[object]:
    return [pytest.param(f, id=f.name) for f in flows]


# --- overall: TestTracePacket, TestLoadBalancer, TestNoEndpointsReject ------------------------

OVERALL = [
    Flow("no match", "10.0.0.2", "10.0.0.3", 80, ""),
    Flow("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80"),
    Flow("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80"),
    Flow("LOCAL, KUBE-MARK-MASQ", NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", masq=True),
    Flow("DROP", EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP"),
    Flow("ACCEPT (NodePortHealthCheck)", NODE_IP, NODE_IP, 30000, "ACCEPT"),
    Flow("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT"),
    Flow("eTP Local, no local endpoint: pod short-circuit", POD_IP, "1.2.3.4", 80, "10.180.0.2:80"),
    Flow("eTP Local, no local endpoint: external NodePort", EXTERNAL_CLIENT, NODE_IP, 3001, "DROP"),
    Flow("hairpin", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", masq=True),
    Flow("source range accepted", EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.3:80", masq=True),
    Flow("source range blocked", EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP"),
    Flow(
        "NodePort bypasses source ranges",
        EXTERNAL_CLIENT_BLOCKED,
        NODE_IP,
        3002,
        "10.180.0.3:80",
        masq=True,
    ),
    Flow(
        "ClientIP affinity: all endpoints possible (no recent state)",
        POD_IP,
        "172.30.0.49",
        80,
        "10.180.0.91:8080, 10.180.0.92:8080, 10.180.0.93:8080",
    ),
    # TestLoadBalancer (ns7: LB 1.2.3.7 and 5.6.7.7, NodePort 3007, ranges incl. the node's)
    Flow("pod to cluster IP", POD_IP, "172.30.0.47", 80, "10.180.0.7:80"),
    Flow("external to nodePort", EXTERNAL_CLIENT, NODE_IP, 3007, "10.180.0.7:80", masq=True),
    Flow(
        "nodePort bypasses LoadBalancerSourceRanges",
        EXTERNAL_CLIENT_BLOCKED,
        NODE_IP,
        3007,
        "10.180.0.7:80",
        masq=True,
    ),
    Flow("accepted external to LB1", EXTERNAL_CLIENT, "1.2.3.7", 80, "10.180.0.7:80", masq=True),
    Flow("accepted external to LB2", EXTERNAL_CLIENT, "5.6.7.7", 80, "10.180.0.7:80", masq=True),
    Flow("blocked external to LB1", EXTERNAL_CLIENT_BLOCKED, "1.2.3.7", 80, "DROP"),
    Flow("blocked external to LB2", EXTERNAL_CLIENT_BLOCKED, "5.6.7.7", 80, "DROP"),
    Flow("pod to LB1 (blocked by LoadBalancerSourceRanges)", POD_IP, "1.2.3.7", 80, "DROP"),
    Flow("pod to LB2 (blocked by LoadBalancerSourceRanges)", POD_IP, "5.6.7.7", 80, "DROP"),
    Flow(
        "node to LB1 (allowed by LoadBalancerSourceRanges)",
        NODE_IP,
        "1.2.3.7",
        80,
        "10.180.0.7:80",
        masq=True,
    ),
    Flow(
        "node to LB2 (allowed by LoadBalancerSourceRanges)",
        NODE_IP,
        "5.6.7.7",
        80,
        "10.180.0.7:80",
        masq=True,
    ),
    Flow(
        "same node to LB1, SNATted to LB1 (implicitly allowed)",
        "1.2.3.7",
        "1.2.3.7",
        80,
        "10.180.0.7:80",
        masq=True,
    ),
    Flow(
        "same node to LB2, SNATted to LB2 (implicitly allowed)",
        "5.6.7.7",
        "5.6.7.7",
        80,
        "10.180.0.7:80",
        masq=True,
    ),
    # TestNoEndpointsReject (ns8: cluster IP .48, externalIP 192.168.99.11, LB 1.2.3.8, NP 3008)
    Flow("pod to cluster IP with no endpoints", POD_IP, "172.30.0.48", 80, "REJECT"),
    Flow(
        "external to external IP with no endpoints", EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT"
    ),
    Flow("pod to NodePort with no endpoints", POD_IP, NODE_IP, 3008, "REJECT"),
    Flow("external to NodePort with no endpoints", EXTERNAL_CLIENT, NODE_IP, 3008, "REJECT"),
    Flow("pod to LoadBalancer IP with no endpoints", POD_IP, "1.2.3.8", 80, "REJECT"),
    Flow("external to LoadBalancer IP with no endpoints", EXTERNAL_CLIENT, "1.2.3.8", 80, "REJECT"),
]


@pytest.mark.parametrize("flow", flow_params(OVERALL))
def test_overall_flows(flow: Flow) -> None:
    check(ruleset("overall"), flow)


# --- traffic policies: TestInternalTrafficPolicy, TestExternalTrafficPolicyLocal/Cluster -----

TRAFFIC_POLICIES = [
    Flow(
        "iTP cluster: pod to ClusterIP hits all endpoints",
        POD_IP,
        "172.30.1.4",
        80,
        "10.0.1.8:80, 10.0.1.9:80",
    ),
    Flow(
        "iTP local, one local endpoint: pod to ClusterIP hits only it",
        POD_IP,
        "172.30.1.2",
        80,
        "10.0.1.3:80",
    ),
    Flow(
        "iTP local, two local endpoints: pod to ClusterIP hits both",
        POD_IP,
        "172.30.1.3",
        80,
        "10.0.1.5:80, 10.0.1.6:80",
    ),
    Flow("iTP local, no local endpoints: DROP", POD_IP, "172.30.1.1", 80, "DROP"),
    Flow(
        "iTP local does not change masquerading (node source)",
        NODE_IP,
        "172.30.1.2",
        80,
        "10.0.1.3:80",
        masq=True,
    ),
    # TestExternalTrafficPolicyLocal (etp-local: 172.30.2.1, ext 192.168.99.11, LB 1.2.3.4, 3001)
    Flow(
        "eTP Local: pod to cluster IP hits both endpoints, unmasqueraded",
        POD_IP,
        "172.30.2.1",
        80,
        "10.180.0.1:80, 10.180.2.1:80",
    ),
    Flow(
        "eTP Local: pod to external IP hits both endpoints, unmasqueraded",
        POD_IP,
        "192.168.99.11",
        80,
        "10.180.0.1:80, 10.180.2.1:80",
    ),
    Flow(
        "eTP Local: external to external IP hits only local endpoint, unmasqueraded",
        EXTERNAL_CLIENT,
        "192.168.99.11",
        80,
        "10.180.2.1:80",
    ),
    Flow(
        "eTP Local: pod to LB IP hits both endpoints, unmasqueraded",
        POD_IP,
        "1.2.3.4",
        80,
        "10.180.0.1:80, 10.180.2.1:80",
    ),
    Flow(
        "eTP Local: external to LB IP hits only local endpoint, unmasqueraded",
        EXTERNAL_CLIENT,
        "1.2.3.4",
        80,
        "10.180.2.1:80",
    ),
    Flow(
        "eTP Local: pod to NodePort hits both endpoints, unmasqueraded",
        POD_IP,
        NODE_IP,
        3001,
        "10.180.0.1:80, 10.180.2.1:80",
    ),
    Flow(
        "eTP Local: external to NodePort hits only local endpoint, unmasqueraded",
        EXTERNAL_CLIENT,
        NODE_IP,
        3001,
        "10.180.2.1:80",
    ),
    Flow(
        "eTP Local: node to NodePort is short-circuited and masqueraded",
        NODE_IP,
        NODE_IP,
        3001,
        "10.180.0.1:80, 10.180.2.1:80",
        masq=True,
    ),
    Flow("eTP Local: health check node port accepted", EXTERNAL_CLIENT, NODE_IP, 30000, "ACCEPT"),
    # TestExternalTrafficPolicyCluster (etp-cluster: 172.30.2.2, 192.168.99.12, 1.2.3.5, 3002)
    Flow(
        "eTP Cluster: pod to cluster IP hits both endpoints, unmasqueraded",
        POD_IP,
        "172.30.2.2",
        80,
        "10.180.0.2:80, 10.180.2.2:80",
    ),
    Flow(
        "eTP Cluster: pod to external IP hits both endpoints, masqueraded",
        POD_IP,
        "192.168.99.12",
        80,
        "10.180.0.2:80, 10.180.2.2:80",
        masq=True,
    ),
    Flow(
        "eTP Cluster: external to external IP hits both endpoints, masqueraded",
        EXTERNAL_CLIENT,
        "192.168.99.12",
        80,
        "10.180.0.2:80, 10.180.2.2:80",
        masq=True,
    ),
    Flow(
        "eTP Cluster: pod to LB IP hits both endpoints, masqueraded",
        POD_IP,
        "1.2.3.5",
        80,
        "10.180.0.2:80, 10.180.2.2:80",
        masq=True,
    ),
    Flow(
        "eTP Cluster: external to LB IP hits both endpoints, masqueraded",
        EXTERNAL_CLIENT,
        "1.2.3.5",
        80,
        "10.180.0.2:80, 10.180.2.2:80",
        masq=True,
    ),
    Flow(
        "eTP Cluster: pod to NodePort hits both endpoints, masqueraded",
        POD_IP,
        NODE_IP,
        3002,
        "10.180.0.2:80, 10.180.2.2:80",
        masq=True,
    ),
    Flow(
        "eTP Cluster: external to NodePort hits both endpoints, masqueraded",
        EXTERNAL_CLIENT,
        NODE_IP,
        3002,
        "10.180.0.2:80, 10.180.2.2:80",
        masq=True,
    ),
    Flow("eTP Cluster: no health check node port", EXTERNAL_CLIENT, NODE_IP, 30002, ""),
    # both policies Local, remote endpoints only
    Flow("both Local, remote only: pod to cluster IP DROP", POD_IP, "172.30.3.1", 80, "DROP"),
    Flow(
        "both Local, remote only: external to NodePort DROP", EXTERNAL_CLIENT, NODE_IP, 3031, "DROP"
    ),
    Flow(
        "both Local, remote only: pod to NodePort short-circuited",
        POD_IP,
        NODE_IP,
        3031,
        "10.0.3.1:80, 10.0.3.2:80",
    ),
    Flow(
        "both Local, remote only: node to NodePort short-circuited, masqueraded",
        NODE_IP,
        NODE_IP,
        3031,
        "10.0.3.1:80, 10.0.3.2:80",
        masq=True,
    ),
    # both policies Local, no endpoints at all
    Flow("no endpoints: cluster IP REJECT", POD_IP, "172.30.3.2", 80, "REJECT"),
    Flow("no endpoints: LB REJECT", EXTERNAL_CLIENT, "1.2.3.6", 80, "REJECT"),
    Flow("no endpoints: NodePort REJECT", EXTERNAL_CLIENT, NODE_IP, 3032, "REJECT"),
    Flow(
        "no endpoints: health check node port still accepted",
        EXTERNAL_CLIENT,
        NODE_IP,
        30033,
        "ACCEPT",
    ),
]


@pytest.mark.parametrize("flow", flow_params(TRAFFIC_POLICIES))
def test_traffic_policy_flows(flow: Flow) -> None:
    check(ruleset("traffic-policies"), flow)


# --- TestInternalExternalMasquerade: 30 flows x {detector, none} x {masqueradeAll, not} -------

_NODE_TO_NODEPORT_ETP_LOCAL_PORT = 3001  # sic: upstream's flow uses svc1's NodePort here
MASQUERADE_BASE = [
    Flow("pod to ClusterIP", POD_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80"),
    Flow("pod to NodePort", POD_IP, NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    Flow("pod to LB", POD_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    Flow("node to ClusterIP", NODE_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    Flow("node to NodePort", NODE_IP, NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    Flow(
        "localhost to NodePort",
        "127.0.0.1",
        "127.0.0.1",
        3001,
        "10.180.0.1:80, 10.180.1.1:80",
        True,
    ),
    Flow("node to LB", NODE_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    Flow(
        "external to ClusterIP",
        EXTERNAL_CLIENT,
        "172.30.0.41",
        80,
        "10.180.0.1:80, 10.180.1.1:80",
        True,
    ),
    Flow(
        "external to NodePort", EXTERNAL_CLIENT, NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True
    ),
    Flow("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    Flow(
        "pod to ClusterIP with eTP:Local", POD_IP, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80"
    ),
    Flow("pod to NodePort with eTP:Local", POD_IP, NODE_IP, 3002, "10.180.0.2:80, 10.180.1.2:80"),
    Flow("pod to LB with eTP:Local", POD_IP, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80"),
    Flow(
        "node to ClusterIP with eTP:Local",
        NODE_IP,
        "172.30.0.42",
        80,
        "10.180.0.2:80, 10.180.1.2:80",
        True,
    ),
    Flow(
        "node to NodePort with eTP:Local",
        NODE_IP,
        NODE_IP,
        _NODE_TO_NODEPORT_ETP_LOCAL_PORT,
        "10.180.0.1:80, 10.180.1.1:80",
        True,
    ),
    Flow(
        "localhost to NodePort with eTP:Local",
        "127.0.0.1",
        "127.0.0.1",
        3002,
        "10.180.0.2:80, 10.180.1.2:80",
        True,
    ),
    Flow("node to LB with eTP:Local", NODE_IP, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    Flow(
        "external to ClusterIP with eTP:Local",
        EXTERNAL_CLIENT,
        "172.30.0.42",
        80,
        "10.180.0.2:80, 10.180.1.2:80",
        True,
    ),
    Flow("external to NodePort with eTP:Local", EXTERNAL_CLIENT, NODE_IP, 3002, "10.180.0.2:80"),
    Flow("external to LB with eTP:Local", EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.2:80"),
    Flow("pod to ClusterIP with iTP:Local", POD_IP, "172.30.0.43", 80, "10.180.0.3:80"),
    Flow(
        "pod to NodePort with iTP:Local",
        POD_IP,
        NODE_IP,
        3003,
        "10.180.0.3:80, 10.180.1.3:80",
        True,
    ),
    Flow(
        "pod to LB with iTP:Local", POD_IP, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True
    ),
    Flow("node to ClusterIP with iTP:Local", NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    Flow(
        "node to NodePort with iTP:Local",
        NODE_IP,
        NODE_IP,
        3003,
        "10.180.0.3:80, 10.180.1.3:80",
        True,
    ),
    Flow(
        "localhost to NodePort with iTP:Local",
        "127.0.0.1",
        "127.0.0.1",
        3003,
        "10.180.0.3:80, 10.180.1.3:80",
        True,
    ),
    Flow(
        "node to LB with iTP:Local", NODE_IP, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True
    ),
    Flow(
        "external to ClusterIP with iTP:Local",
        EXTERNAL_CLIENT,
        "172.30.0.43",
        80,
        "10.180.0.3:80",
        True,
    ),
    Flow(
        "external to NodePort with iTP:Local",
        EXTERNAL_CLIENT,
        NODE_IP,
        3003,
        "10.180.0.3:80, 10.180.1.3:80",
        True,
    ),
    Flow(
        "external to LB with iTP:Local",
        EXTERNAL_CLIENT,
        "9.10.11.12",
        80,
        "10.180.0.3:80, 10.180.1.3:80",
        True,
    ),
]
_CLUSTER_IP_FLOWS = ("node to ClusterIP", "external to ClusterIP")
_POD_CLUSTER_IP = ("pod to ClusterIP",)
_NO_SHORT_CIRCUIT = {
    "pod to NodePort with eTP:Local": "10.180.0.2:80",
    "pod to LB with eTP:Local": "10.180.0.2:80",
}


def _with_suffixes(names: tuple[str, ...]) -> set[str]:
    return {n + s for n in names for s in ("", " with eTP:Local", " with iTP:Local")}


MASQUERADE_VARIANTS = {
    # variant: (extra flags, {flow: masq override}, {flow: output override})
    "base": (("--cluster-cidr", "10.0.0.0/8"), {}, {}),
    # Without a detector all cluster-IP traffic is assumed to come from pods (no masquerade),
    # and there is no pod short-circuit for eTP=Local, so pods get only local endpoints.
    "no LocalTrafficDetector": (
        (),
        dict.fromkeys(_with_suffixes(_CLUSTER_IP_FLOWS), False),
        _NO_SHORT_CIRCUIT,
    ),
    "masqueradeAll": (
        ("--cluster-cidr", "10.0.0.0/8", "--masquerade-all"),
        dict.fromkeys(_with_suffixes(_POD_CLUSTER_IP), True),
        {},
    ),
    "masqueradeAll, no LocalTrafficDetector": (
        ("--masquerade-all",),
        dict.fromkeys(_with_suffixes(_POD_CLUSTER_IP), True),
        _NO_SHORT_CIRCUIT,
    ),
}


def _masquerade_cases() -> list[object]:
    params = []
    for variant, (_, masq, output) in MASQUERADE_VARIANTS.items():
        for flow in MASQUERADE_BASE:
            f = flow
            if flow.name in masq:
                assert masq[flow.name] != flow.masq, "override must change something"
                f = replace(f, masq=masq[flow.name])
            if flow.name in output:
                f = replace(f, output=output[flow.name])
            params.append(pytest.param(variant, f, id=f"{variant}: {flow.name}"))
    return params


def _masquerade_ruleset(variant: str) -> Ruleset:
    args = ("--hostname-override", "test-node", "--node-ip", NODE_IP, "--node-ip", NODE_IP_ALT)
    objects = load_objects(GOLDEN_DIR / "masquerade-all-no-detector.yaml")
    return family_ruleset(render(objects, (*args, *MASQUERADE_VARIANTS[variant][0])))


@pytest.mark.parametrize(("variant", "flow"), _masquerade_cases())
def test_internal_external_masquerade(variant: str, flow: Flow) -> None:
    check(_cached_masquerade_ruleset(variant), flow)


_cached_masquerade_ruleset = functools.cache(_masquerade_ruleset)


# --- TestNodePorts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePortCase:
    variant: str
    ipv6: bool
    localhost_works: bool
    alt_node_ip_works: bool


NODEPORT_CASES = [
    NodePortCase("localhost-enabled", False, True, True),
    NodePortCase("localhost-disabled", False, False, True),
    NodePortCase("addresses-with-localhost", False, True, False),
    NodePortCase("addresses-localhost-disabled", False, False, False),
    NodePortCase("addresses-multiple", False, False, True),
    NodePortCase("primary", False, False, False),
    NodePortCase("localhost-enabled", True, False, True),
    NodePortCase("localhost-disabled", True, False, True),
    NodePortCase("addresses-multiple", True, False, False),
]


def _nodeport_flows(case: NodePortCase) -> list[Flow]:
    if case.ipv6:
        svc, ep1, ep2 = "fd00:172:30::41", "[fd00:10:180::1]:80", "[fd00:10:180::2:1]:80"
        pod, ext, node_ip, alt, lo = POD_IPV6, EXTERNAL_CLIENT_IPV6, NODE_IPV6, NODE_IPV6_ALT, "::1"
    else:
        svc, ep1, ep2 = "172.30.0.41", "10.180.0.1:80", "10.180.2.1:80"
        pod, ext, node_ip, alt, lo = POD_IP, EXTERNAL_CLIENT, NODE_IP, NODE_IP_ALT, "127.0.0.1"
    both = f"{ep1}, {ep2}"
    return [
        Flow("pod to cluster IP", pod, svc, 80, both),
        Flow("external to nodePort", ext, node_ip, 3001, both, masq=True),
        Flow("node to nodePort", node_ip, node_ip, 3001, both, masq=True),
        Flow(
            "localhost to nodePort",
            lo,
            lo,
            3001,
            *((both, True) if case.localhost_works else ("", False)),
        ),
        Flow(
            "external to nodePort on secondary IP",
            ext,
            alt,
            3001,
            *((both, True) if case.alt_node_ip_works else ("", False)),
        ),
    ]


@pytest.mark.parametrize(
    "case", NODEPORT_CASES, ids=lambda c: f"{'ipv6' if c.ipv6 else 'ipv4'}, {c.variant}"
)
def test_node_ports(case: NodePortCase) -> None:
    state = "nodeports-ipv6" if case.ipv6 else "nodeports"
    path = GOLDEN_DIR / f"{state}.yaml"
    variant_args = next(
        line.partition(":")[2].split()
        for line in path.read_text().splitlines()
        if line.startswith(f"# variant {case.variant}:")
    )
    rs = ruleset(state, tuple(variant_args), "IPv6" if case.ipv6 else "IPv4")
    for flow in _nodeport_flows(case):
        check(rs, flow)


# --- TestClusterIPGeneral and slices ----------------------------------------------------------

PROTOCOLS = [
    Flow("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80"),
    Flow("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", masq=True),
    Flow(
        "clusterIP with multiple endpoints",
        "10.180.0.2",
        "172.30.0.42",
        80,
        "10.180.0.1:80, 10.180.2.1:80",
    ),
    Flow(
        "clusterIP with TargetPort",
        "10.180.0.2",
        "172.30.0.42",
        443,
        "10.180.0.1:8443, 10.180.2.1:8443",
    ),
    Flow(
        "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
        "10.180.0.2",
        "172.30.0.42",
        53,
        "10.180.0.1:5353, 10.180.2.1:5353",
    ),
    Flow(
        "clusterIP with TCP, UDP, and SCTP on same port (UDP)",
        "10.180.0.2",
        "172.30.0.42",
        53,
        "10.180.0.1:53, 10.180.2.1:53",
        protocol="udp",
    ),
    Flow(
        "clusterIP with TCP, UDP, and SCTP on same port (SCTP)",
        "10.180.0.2",
        "172.30.0.42",
        53,
        "10.180.0.1:53, 10.180.2.1:53",
        protocol="sctp",
    ),
    Flow(
        "TCP-only port does not match UDP traffic",
        "10.180.0.2",
        "172.30.0.42",
        80,
        "",
        protocol="udp",
    ),
    Flow("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, ""),
    Flow(
        "endpoints from several slices, duplicate counted once",
        POD_IP,
        "172.30.0.43",
        80,
        "10.180.3.1:8080, 10.180.3.2:8080, 10.180.3.3:8080, 10.180.3.4:9090",
    ),
    Flow(
        "slice port of the other protocol is not used",
        POD_IP,
        "172.30.0.43",
        80,
        "",
        protocol="udp",
    ),
    Flow("port no slice has: REJECT", POD_IP, "172.30.0.44", 53, "REJECT", protocol="udp"),
    Flow("the other port still works", POD_IP, "172.30.0.44", 80, "10.180.4.1:80"),
]


@pytest.mark.parametrize("flow", flow_params(PROTOCOLS))
def test_protocol_and_slice_flows(flow: Flow) -> None:
    check(ruleset("protocols-and-slices"), flow)


# --- ipMode Proxy -----------------------------------------------------------------------------

IPMODE = [
    Flow("ipMode Proxy LB IP gets no rule", EXTERNAL_CLIENT, "1.2.3.4", 80, ""),
    Flow("VIP-mode LB IP (unset)", EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.1:80", masq=True),
    Flow("VIP-mode LB IP (explicit)", EXTERNAL_CLIENT, "1.2.3.9", 80, "10.180.0.1:80", masq=True),
    Flow("VIP-mode LB IP, blocked source", EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP"),
    Flow("only Proxy-mode IP: nothing for it", EXTERNAL_CLIENT, "1.2.3.5", 80, ""),
    Flow(
        "only Proxy-mode IP: NodePort still works",
        EXTERNAL_CLIENT,
        NODE_IP,
        3002,
        "10.180.0.2:80",
        masq=True,
    ),
]


@pytest.mark.parametrize("flow", flow_params(IPMODE))
def test_lb_ip_mode_flows(flow: Flow) -> None:
    check(ruleset("lb-ipmode-proxy"), flow)


# --- terminating endpoints --------------------------------------------------------------------

TERMINATING = [
    # TestTerminatingEndpointsTrafficPolicyLocal
    Flow(
        "local, ready endpoints exist: pod to clusterIP",
        POD_IP,
        "172.30.1.1",
        80,
        "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
    ),
    Flow(
        "local, ready endpoints exist: external to LB",
        EXTERNAL_CLIENT,
        "1.2.3.1",
        80,
        "10.0.1.1:80, 10.0.1.2:80",
    ),
    Flow(
        "local, only terminating endpoints exist: pod to clusterIP",
        POD_IP,
        "172.30.1.2",
        80,
        "10.0.2.5:80",
    ),
    Flow(
        "local, only terminating endpoints exist: external to LB",
        EXTERNAL_CLIENT,
        "1.2.3.2",
        80,
        "10.0.2.2:80, 10.0.2.3:80",
    ),
    Flow(
        "local, terminating endpoints on remote node: pod to clusterIP",
        POD_IP,
        "172.30.1.3",
        80,
        "10.0.3.5:80",
    ),
    Flow(
        "local, terminating endpoints on remote node: external to LB",
        EXTERNAL_CLIENT,
        "1.2.3.3",
        80,
        "DROP",
    ),
    Flow("local, no usable endpoints: pod to clusterIP", POD_IP, "172.30.1.4", 80, "REJECT"),
    Flow("local, no usable endpoints: external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT"),
    # TestTerminatingEndpointsTrafficPolicyCluster
    Flow(
        "cluster, ready endpoints exist: pod to clusterIP",
        POD_IP,
        "172.30.2.1",
        80,
        "10.0.5.1:80, 10.0.5.2:80, 10.0.5.5:80",
    ),
    Flow(
        "cluster, ready endpoints exist: external to LB",
        EXTERNAL_CLIENT,
        "1.2.4.1",
        80,
        "10.0.5.1:80, 10.0.5.2:80, 10.0.5.5:80",
        masq=True,
    ),
    Flow(
        "cluster, only terminating endpoints exist: pod to clusterIP",
        POD_IP,
        "172.30.2.2",
        80,
        "10.0.6.2:80, 10.0.6.3:80, 10.0.6.5:80",
    ),
    Flow(
        "cluster, only terminating endpoints exist: external to LB",
        EXTERNAL_CLIENT,
        "1.2.4.2",
        80,
        "10.0.6.2:80, 10.0.6.3:80, 10.0.6.5:80",
        masq=True,
    ),
    Flow(
        "cluster, terminating endpoints on remote node: pod to clusterIP",
        POD_IP,
        "172.30.2.3",
        80,
        "10.0.7.5:80",
    ),
    Flow(
        "cluster, terminating endpoints on remote node: external to LB",
        EXTERNAL_CLIENT,
        "1.2.4.3",
        80,
        "10.0.7.5:80",
        masq=True,
    ),
    Flow("cluster, no usable endpoints: pod to clusterIP", POD_IP, "172.30.2.4", 80, "REJECT"),
    Flow("cluster, no usable endpoints: external to LB", EXTERNAL_CLIENT, "1.2.4.4", 80, "REJECT"),
    Flow(
        "affinity, serving terminating endpoints used",
        POD_IP,
        "172.30.3.1",
        80,
        "10.0.9.1:80, 10.0.9.2:80",
    ),
]


@pytest.mark.parametrize("flow", flow_params(TERMINATING))
def test_terminating_flows(flow: Flow) -> None:
    check(ruleset("terminating"), flow)


def test_terminating_after_endpoints_deleted() -> None:
    """Upstream deletes the slices after each case: everything is then REJECTed."""
    path = GOLDEN_DIR / "terminating.yaml"
    services = [o for o in load_objects(path) if o["kind"] == "Service"]
    rs = family_ruleset(render(services, golden_args(path)))
    for cip, lb in (
        ("172.30.1.1", "1.2.3.1"),
        ("172.30.1.3", "1.2.3.3"),
        ("172.30.2.2", "1.2.4.2"),
    ):
        check(rs, Flow("pod to clusterIP after endpoints deleted", POD_IP, cip, 80, "REJECT"))
        check(rs, Flow("external to LB after endpoints deleted", EXTERNAL_CLIENT, lb, 80, "REJECT"))


# --- topology ---------------------------------------------------------------------------------

TOPOLOGY = [
    Flow("hints for the node's zone", POD_IP, "172.30.0.41", 80, "10.1.2.3:80, 10.1.2.6:80"),
    Flow(
        "an endpoint without hints: no filtering",
        POD_IP,
        "172.30.0.42",
        80,
        "10.1.3.3:80, 10.1.3.4:80",
    ),
    Flow(
        "no hint for the node's zone: no filtering",
        POD_IP,
        "172.30.0.43",
        80,
        "10.1.4.3:80, 10.1.4.4:80",
    ),
    Flow(
        "eTP Local external traffic ignores topology",
        EXTERNAL_CLIENT,
        NODE_IP,
        3044,
        "10.0.0.0:80, 10.0.0.1:80",
    ),
    Flow(
        "cluster traffic is topology-filtered",
        "10.0.5.5",
        NODE_IP,
        3044,
        "10.0.0.0:80, 10.0.0.2:80",
    ),
]


@pytest.mark.parametrize("flow", flow_params(TOPOLOGY))
def test_topology_flows(flow: Flow) -> None:
    check(ruleset("topology"), flow)


# --- dual-stack -------------------------------------------------------------------------------

DUAL_V4 = [
    Flow("IPv4 pod to cluster IP", POD_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.0.2:80"),
    Flow(
        "IPv4 external to LB, in range",
        EXTERNAL_CLIENT,
        "1.2.3.4",
        80,
        "10.180.0.1:80, 10.180.0.2:80",
        masq=True,
    ),
    Flow("IPv4 node to LB: node IP not in ranges", NODE_IP, "1.2.3.4", 80, "DROP"),
    Flow("IPv4 single-stack service", POD_IP, "172.30.0.42", 80, "10.180.1.1:80"),
    Flow(
        "localhost NodePort works on IPv4",
        "127.0.0.1",
        "127.0.0.1",
        3001,
        "10.180.0.1:80, 10.180.0.2:80",
        masq=True,
    ),
]
DUAL_V6 = [
    Flow(
        "IPv6 pod to cluster IP",
        POD_IPV6,
        "fd00:172:30::41",
        80,
        "[fd00:10:180::1]:80, [fd00:10:180::2]:80",
    ),
    Flow(
        "IPv6 external IP",
        EXTERNAL_CLIENT_IPV6,
        "2001:db8:99::22",
        80,
        "[fd00:10:180::1]:80, [fd00:10:180::2]:80",
        masq=True,
    ),
    Flow("IPv6 external to LB, not in range", EXTERNAL_CLIENT_IPV6, "2001:db8:ff::4", 80, "DROP"),
    Flow(
        "IPv6 client in range",
        "2001:db8::99",
        "2001:db8:ff::4",
        80,
        "[fd00:10:180::1]:80, [fd00:10:180::2]:80",
        masq=True,
    ),
    Flow(
        "IPv6 node to LB (node IP in range)",
        NODE_IPV6,
        "2001:db8:ff::4",
        80,
        "[fd00:10:180::1]:80, [fd00:10:180::2]:80",
        masq=True,
    ),
    Flow(
        "IPv6 same node to LB, SNATted to LB",
        "2001:db8:ff::4",
        "2001:db8:ff::4",
        80,
        "[fd00:10:180::1]:80, [fd00:10:180::2]:80",
        masq=True,
    ),
    Flow(
        "IPv6-only UDP service",
        POD_IPV6,
        "fd00:172:30::43",
        53,
        "[fd00:10:182::1]:5353, [fd00:10:182::2]:5353",
        protocol="udp",
    ),
    Flow(
        "IPv6 NodePort",
        EXTERNAL_CLIENT_IPV6,
        NODE_IPV6,
        3001,
        "[fd00:10:180::1]:80, [fd00:10:180::2]:80",
        masq=True,
    ),
    Flow("no localhost NodePorts on IPv6", "::1", "::1", 3001, ""),
]


@pytest.mark.parametrize("flow", flow_params(DUAL_V4))
def test_dual_stack_ipv4_flows(flow: Flow) -> None:
    check(ruleset("dual-stack"), flow)


@pytest.mark.parametrize("flow", flow_params(DUAL_V6))
def test_dual_stack_ipv6_flows(flow: Flow) -> None:
    check(ruleset("dual-stack", (), "IPv6"), flow)
