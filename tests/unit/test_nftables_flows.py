"""Upstream's nftables packet-flow tables, traced through pyproxy's nftables-mode output.

Objects and expected results are upstream's (pkg/proxy/nftables/proxier_test.go v1.34.4:
TestClusterIPGeneral, TestLoadBalancer, TestExternalTrafficPolicyLocal,
TestExternalTrafficPolicyCluster), traced with upstream's tracer semantics (nft_tracer.py):
the output is the endpoint(s) the packet may reach, or DROP / REJECT, and whether it would be
masqueraded.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from nft_tracer import TraceError, trace_packet
from strategies import PortSpec, RandomState, random_states
from support import (
    EXTERNAL_CLIENT,
    EXTERNAL_CLIENT_BLOCKED,
    EXTERNAL_CLIENT_IPV6,
    LOCAL_IPS,
    NODE_IP,
    NODE_IPV6,
    POD_IP,
    POD_IPV6,
    TEST_NODE,
    endpoint,
    endpoint_slice,
    port,
    render,
    sections,
    service,
    slice_port,
)
from test_render import (  # iptables mode's independent oracle, shared on purpose
    _in_ranges,
    _oracle_cluster_ip,
    _oracle_external_ip,
    _oracle_lb_ip,
    _oracle_node_port,
)

#: upstream NewFakeProxier (IPv4), nftables mode.
NFT_ARGS = (
    "--proxy-mode", "nftables",
    "--hostname-override", TEST_NODE,
    "--node-ip", NODE_IP,
    "--node-ip", "192.168.1.2",
    "--cluster-cidr", "10.0.0.0/8",
    "--nodeport-addresses", "192.168.0.2/32",
)  # fmt: skip
SERVICE_CIDR = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "ServiceCIDR",
    "metadata": {"name": "kubernetes"},
    "spec": {"cidrs": ["172.30.0.0/16"]},
}

Flow = tuple[str, str, str, int, str, bool]  # (source, protocol, dest, port, output, masq)


def run_flows(objects: list[dict[str, Any]], flows: list[Flow]) -> None:
    dump = sections(render([SERVICE_CIDR, *objects], NFT_ARGS))["IPv4"]
    failures = []
    for src, proto, dst, dport, want, want_masq in flows:
        matches, output, masq = trace_packet(
            dump, src, proto, dst, dport, node_ips=frozenset(LOCAL_IPS)
        )
        if (output, masq) != (want, want_masq):
            failures.append(
                f"{src} -> {dst}:{dport}/{proto}: got {output!r} masq={masq}, want {want!r}"
                f" masq={want_masq}; matched:\n  " + "\n  ".join(matches)
            )
    assert not failures, "\n".join(failures)


def test_tracer_rejects_rules_it_does_not_know() -> None:
    """The tracer fails on anything unexpected instead of skipping it (can fail)."""
    dump = "add chain ip kube-proxy nat-prerouting\nadd rule ip kube-proxy nat-prerouting meta mark 1 accept\n"  # noqa: E501
    with pytest.raises(TraceError):
        trace_packet(dump + "add chain ip kube-proxy filter-prerouting-pre-dnat\n", "1.1.1.1",
                     "tcp", "2.2.2.2", 80, node_ips=frozenset())  # fmt: skip


def test_cluster_ip_general() -> None:
    svc2_ports = [
        port("http", 80),
        port("https", 443, target_port=8443),
        port("dns-udp", 53, "UDP"),
        port("dns-tcp", 53, "TCP", target_port=5353),
        port("dns-sctp", 53, "SCTP"),
    ]
    slice2_ports = [
        slice_port("http", 80),
        slice_port("https", 8443),
        slice_port("dns-udp", 53, "UDP"),
        slice_port("dns-tcp", 5353, "TCP"),
        slice_port("dns-sctp", 53, "SCTP"),
    ]
    objects = [
        service("ns1", "svc1", "172.30.0.41", [port("http", 80)]),
        service("ns2", "svc2", "172.30.0.42", svc2_ports),
        endpoint_slice(
            "ns1", "svc1", [endpoint("10.180.0.1", TEST_NODE)], [slice_port("http", 80)]
        ),
        endpoint_slice(
            "ns2",
            "svc2",
            [endpoint("10.180.0.1", TEST_NODE), endpoint("10.180.2.1", "node2")],
            slice2_ports,
        ),
    ]
    src = "10.180.0.2"
    both = "10.180.0.1:{p}, 10.180.2.1:{p}"
    run_flows(
        objects,
        [
            (src, "tcp", "172.30.0.41", 80, "10.180.0.1:80", False),
            ("10.180.0.1", "tcp", "172.30.0.41", 80, "10.180.0.1:80", True),  # hairpin
            (src, "tcp", "172.30.0.42", 80, both.format(p=80), False),
            (src, "tcp", "172.30.0.42", 443, both.format(p=8443), False),
            (src, "tcp", "172.30.0.42", 53, both.format(p=5353), False),
            (src, "udp", "172.30.0.42", 53, both.format(p=53), False),
            (src, "sctp", "172.30.0.42", 53, both.format(p=53), False),
            (src, "udp", "172.30.0.42", 80, "REJECT", False),  # TCP-only port
            (src, "tcp", "172.30.0.41", 443, "REJECT", False),  # svc2's port on svc1
            (src, "tcp", "172.30.0.50", 80, "DROP", False),  # unallocated cluster IP
        ],
    )


def test_load_balancer() -> None:
    objects = [
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port("p80", 80, node_port=3001)],
            type="LoadBalancer",
            lb_ingress=["1.2.3.4", "5.6.7.8"],
            source_ranges=["192.168.0.0/24", " 203.0.113.0/25"],
        ),
        endpoint_slice("ns1", "svc1", ["10.180.0.1"]),
    ]
    ep = "10.180.0.1:80"
    run_flows(
        objects,
        [
            ("10.0.0.2", "tcp", "172.30.0.41", 80, ep, False),
            (EXTERNAL_CLIENT, "tcp", NODE_IP, 3001, ep, True),
            (EXTERNAL_CLIENT_BLOCKED, "tcp", NODE_IP, 3001, ep, True),  # NodePort bypasses
            (EXTERNAL_CLIENT, "tcp", "1.2.3.4", 80, ep, True),
            (EXTERNAL_CLIENT, "tcp", "5.6.7.8", 80, ep, True),
            (EXTERNAL_CLIENT_BLOCKED, "tcp", "1.2.3.4", 80, "DROP", False),
            (EXTERNAL_CLIENT_BLOCKED, "tcp", "5.6.7.8", 80, "DROP", False),
            ("10.0.0.2", "tcp", "1.2.3.4", 80, "DROP", False),
            ("10.0.0.2", "tcp", "5.6.7.8", 80, "DROP", False),
            (NODE_IP, "tcp", "1.2.3.4", 80, ep, True),
            (NODE_IP, "tcp", "5.6.7.8", 80, ep, True),
            ("1.2.3.4", "tcp", "1.2.3.4", 80, ep, True),  # SNATted to the LB IP: allowed
            ("5.6.7.8", "tcp", "5.6.7.8", 80, ep, True),
        ],
    )


def _policy_service(etp: str) -> list[dict[str, Any]]:
    return [
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port("p80", 80, node_port=3001, target_port=80)],
            type="LoadBalancer",
            etp=etp,
            external_ips=["192.168.99.11"],
            lb_ingress=["1.2.3.4"],
            hcnp=30000 if etp == "Local" else None,
        ),
        endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1"), endpoint("10.180.2.1", TEST_NODE)]),
    ]


def test_external_traffic_policy_local() -> None:
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    pod = "10.0.0.2"
    run_flows(
        _policy_service("Local"),
        [
            (pod, "tcp", "172.30.0.41", 80, both, False),
            (pod, "tcp", "192.168.99.11", 80, both, False),
            (EXTERNAL_CLIENT, "tcp", "192.168.99.11", 80, local, False),
            (pod, "tcp", "1.2.3.4", 80, both, False),
            (EXTERNAL_CLIENT, "tcp", "1.2.3.4", 80, local, False),
            (pod, "tcp", NODE_IP, 3001, both, False),
            (EXTERNAL_CLIENT, "tcp", NODE_IP, 3001, local, False),
        ],
    )


def test_external_traffic_policy_cluster() -> None:
    both = "10.180.0.1:80, 10.180.2.1:80"
    pod = "10.0.0.2"
    run_flows(
        _policy_service("Cluster"),
        [
            (pod, "tcp", "172.30.0.41", 80, both, False),
            (pod, "tcp", "192.168.99.11", 80, both, True),
            (EXTERNAL_CLIENT, "tcp", "192.168.99.11", 80, both, True),
            (pod, "tcp", "1.2.3.4", 80, both, True),
            (EXTERNAL_CLIENT, "tcp", "1.2.3.4", 80, both, True),
            (pod, "tcp", NODE_IP, 3001, both, True),
            (EXTERNAL_CLIENT, "tcp", NODE_IP, 3001, both, True),
        ],
    )


@pytest.mark.parametrize(
    ("family", "nodeport_addresses", "allow_alt_node_ip"),
    [
        ("IPv4", "192.168.0.2/32,2001:db8::1/128", False),
        ("IPv4", "192.168.0.0/24,192.168.1.0/24,2001:db8::/64", True),
        ("IPv6", "192.168.0.2/32,2001:db8::1/128", False),
        ("IPv6", "192.168.0.0/24,192.168.1.0/24,2001:db8::/64,2001:db8:1::2/128", True),
    ],
)
def test_node_ports(family: str, nodeport_addresses: str, allow_alt_node_ip: bool) -> None:
    """Upstream's TestNodePorts (the fake proxier's default --nodeport-addresses, then a
    list that also admits the secondary node IP)."""
    v4 = family == "IPv4"
    svc_ip = "172.30.0.41" if v4 else "fd00:172:30::41"
    ep1, ep2 = ("10.180.0.1", "10.180.2.1") if v4 else ("fd00:10:180::1", "fd00:10:180::2:1")
    node_ip, alt_ip = ("192.168.0.2", "192.168.1.2") if v4 else ("2001:db8::1", "2001:db8:1::2")
    pod, client = ("10.0.0.2", EXTERNAL_CLIENT) if v4 else ("fd00:10::2", "2600:5200::1")
    objects = [
        {**SERVICE_CIDR, "spec": {"cidrs": ["172.30.0.0/16", "fd00:10:96::/112"]}},
        service("ns1", "svc1", svc_ip, [port("p80", 80, node_port=3001)], type="NodePort"),
        endpoint_slice(
            "ns1",
            "svc1",
            [endpoint(ep1), endpoint(ep2, TEST_NODE)],
            address_type=family,
        ),
    ]
    args = [
        "--proxy-mode", "nftables", "--hostname-override", TEST_NODE,
        "--node-ip", "192.168.0.2", "--node-ip", "192.168.1.2",
        "--node-ip", "2001:db8::1", "--node-ip", "2001:db8:1::2",
        "--cluster-cidr", "10.0.0.0/8,fd00:10::/64",
        "--nodeport-addresses", nodeport_addresses,
    ]  # fmt: skip
    dump = sections(render(objects, args))[family]

    def fmt(ip: str) -> str:
        return f"{ip}:80" if v4 else f"[{ip}]:80"

    both = f"{fmt(ep1)}, {fmt(ep2)}"
    flows: list[tuple[str, str, int, str, bool]] = [
        (pod, svc_ip, 80, both, False),
        (client, node_ip, 3001, both, True),
        (node_ip, node_ip, 3001, both, True),
        (client, alt_ip, 3001, both if allow_alt_node_ip else "", allow_alt_node_ip),
    ]
    for src, dst, dport, want, want_masq in flows:
        _, output, masq = trace_packet(dump, src, "tcp", dst, dport, node_ips=frozenset(LOCAL_IPS))
        assert (output, masq) == (want, want_masq), (src, dst, dport)


# --- random states: the same independent oracle as iptables mode's (tests/unit/test_render.py)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_random_states_flow_like_iptables_mode(state: RandomState) -> None:
    """For random states, every address of every service port traces (upstream's tracer
    semantics) to what the oracle iptables mode is checked against says: the same endpoints,
    verdicts and masquerading. (Probes stay off nftables mode's documented differences:
    NodePorts only on the primary node IP, no undefined ports or unallocated addresses.)"""
    args = [a for a in state.args if not a.startswith("--iptables-localhost-nodeports")]
    per_family = sections(render(state.objects, ["--proxy-mode", "nftables", *args]))
    masquerade_all = "--masquerade-all" in args
    local = frozenset(LOCAL_IPS)
    for spec in state.ports:
        if spec.family not in per_family:
            continue
        dump = per_family[spec.family]
        pod, ext, node_ip = (
            (POD_IPV6, EXTERNAL_CLIENT_IPV6, NODE_IPV6)
            if spec.family == "IPv6"
            else (POD_IP, EXTERNAL_CLIENT, NODE_IP)
        )
        proto = spec.protocol.lower()

        def flow(
            src: str, dst: str, dport: int, dump: str = dump, proto: str = proto
        ) -> tuple[str, bool]:
            _, output, masq = trace_packet(dump, src, proto, dst, dport, node_ips=local)
            return output, masq

        got = flow(pod, spec.cluster_ip, spec.port)
        assert got == _oracle_cluster_ip(spec, masquerade_all), (spec, got)
        if spec.node_port:
            got = flow(ext, node_ip, spec.node_port)
            assert got == _oracle_node_port(spec), (spec, got)
        for ip in spec.external_ips:
            got = flow(ext, ip, spec.port)
            assert got == _oracle_external_ip(spec), (spec, got)
        for ip, mode in spec.lb_ips:
            for src in (ext, ip):
                got = flow(src, ip, spec.port)
                assert got == _nft_oracle_lb_ip(spec, mode, src, node_ip), (spec, src, got)


def _nft_oracle_lb_ip(spec: PortSpec, mode: str | None, src: str, node_ip: str) -> tuple[str, bool]:
    """iptables mode's oracle, plus nftables mode's one difference here: the firewall chain
    exists whether or not there are endpoints, so a source outside loadBalancerSourceRanges
    is dropped before a Service without endpoints would reject it."""
    if mode != "Proxy" and spec.source_ranges:
        allowed = _in_ranges(src, spec.source_ranges) or (
            _in_ranges(node_ip, spec.source_ranges) and src in {ip for ip, _ in spec.lb_ips}
        )
        if not allowed:
            return "DROP", False
    return _oracle_lb_ip(spec, mode, src, node_ip)
