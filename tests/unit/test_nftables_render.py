"""nftables mode's renderer against upstream's own expectations (kube-proxy v1.34.4).

- `pyproxy --dry-run --proxy-mode nftables` on upstream's TestOverallNFTablesRules objects equals
  upstream's expected Dump after upstream's sortNFTablesTransaction (helpers_test.go), and so do
  the feature cases below (built from the Go tests' objects).
- Chain-name bases equal upstream's Test_servicePortChainNameBase /
  Test_servicePortEndpointChainNameBase values (hash, IPv6 dots, truncation).
- The dump is knftables' order (chains, sets, maps sorted; rules per chain) and every chain a
  rule or map element jumps/goes to exists (upstream's structure checks).
"""

from __future__ import annotations

import re

import pytest
from support import (
    GOLDEN_DIR,
    endpoint,
    endpoint_slice,
    golden_args,
    load_objects,
    port,
    render,
    review_header,
    sections,
    service,
    strip_review_header,
    update_golden_requested,
)

from pyproxy.model import IPFamily, Protocol
from pyproxy.nftables.render import (
    endpoint_chain_name_base,
    is_service_chain_name,
    service_port_chain_name_base,
)
from pyproxy.serviceport import ServicePortName

NFT_GOLDEN = GOLDEN_DIR / "nftables"

#: upstream NewFakeProxier (IPv4) in nftables mode.
NFT_ARGS = (
    "--proxy-mode", "nftables",
    "--hostname-override", "test-node",
    "--node-ip", "192.168.0.2",
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

_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


def sort_transaction(text: str) -> list[str]:
    """Upstream's sortNFTablesTransaction: drop blank and '#' lines; by object type, then
    object name; rules keep their order, other lines sort by whole text."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]

    def key(line: str) -> tuple[int, str, str]:
        words = line.split(" ")
        kind = words[1]
        return (-_ORDER.get(kind, 0), words[4], "" if kind == "rule" else line)

    return sorted(lines, key=key)


def upstream_expected(name: str) -> list[str]:
    return sort_transaction((NFT_GOLDEN / f"upstream-{name}.txt").read_text())


def ipv4_dump(objects: list[dict[str, object]], args: tuple[str, ...] = NFT_ARGS) -> str:
    return sections(render(objects, args))["IPv4"]


def test_overall_matches_upstream() -> None:
    path = NFT_GOLDEN / "overall.yaml"
    out = sections(render(load_objects(path), golden_args(path)))
    assert list(out) == ["IPv4"]
    assert sort_transaction(out["IPv4"]) == upstream_expected("TestOverallNFTablesRules")


def test_dump_order_is_knftables_order() -> None:
    """Dump: table, chains, sets, maps (each sorted), rules chain by chain, then elements."""
    path = NFT_GOLDEN / "overall.yaml"
    lines = ipv4_dump(load_objects(path), tuple(golden_args(path))).splitlines()
    kinds = [line.split(" ")[1] for line in lines]
    order = ["table", "chain", "set", "map", "rule", "element"]
    firsts = [kinds.index(k) for k in order]
    assert firsts == sorted(firsts)
    for kind in ("chain", "set", "map"):
        names = [line.split(" ")[4] for line in lines if line.split(" ")[1] == kind]
        assert names == sorted(names), kind
    rule_chains = [line.split(" ")[4] for line in lines if line.startswith("add rule ")]
    assert rule_chains == sorted(rule_chains)  # grouped by chain, chains in name order


def test_every_target_exists() -> None:
    path = NFT_GOLDEN / "overall.yaml"
    text = ipv4_dump(load_objects(path), tuple(golden_args(path)))
    chains = {line.split(" ")[4] for line in text.splitlines() if line.startswith("add chain ")}
    sets = {
        line.split(" ")[4]
        for line in text.splitlines()
        if line.startswith(("add set ", "add map "))
    }
    targets = set(re.findall(r"(?:goto|jump) ([\w./-]+)", text))
    assert targets <= chains, targets - chains
    assert set(re.findall(r"@([\w./-]+)", text)) <= sets
    # Every service chain is the target of something (no orphans in a full render).
    assert {c for c in chains if is_service_chain_name(c)} <= targets


# --- feature cases from upstream's tests (objects as in the Go test; expected verbatim) ------


def test_no_endpoints_reject() -> None:
    """TestNoEndpointsReject: every address of a Service without endpoints rejects."""
    objects = [
        SERVICE_CIDR,
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port(node_port=3001)],
            type="LoadBalancer",
            external_ips=["192.168.99.11"],
            lb_ingress=["1.2.3.4"],
        ),
    ]
    text = ipv4_dump(objects)
    assert "add element ip kube-proxy cluster-ips { 172.30.0.41 }" in text
    for key in ("172.30.0.41 . tcp . 80", "192.168.99.11 . tcp . 80", "1.2.3.4 . tcp . 80"):
        assert (
            f'add element ip kube-proxy no-endpoint-services {{ {key} comment "ns1/svc1:p80"'
            " : goto reject-chain }" in text
        )
    assert (
        'add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment "ns1/svc1:p80"'
        " : goto reject-chain }" in text
    )
    assert "service-ips {" not in text.replace("add map ip kube-proxy service-ips {", "")
    assert not [line for line in text.splitlines() if "/svc1/" in line]


def test_bad_ips_are_normalized() -> None:
    """TestBadIPs: leading zeros in IPs and CIDRs are written canonically."""
    objects = [
        SERVICE_CIDR,
        service(
            "ns1",
            "svc1",
            "172.30.0.041",
            [port(node_port=3001)],
            type="LoadBalancer",
            external_ips=["192.168.099.022"],
            lb_ingress=["1.2.3.004"],
            source_ranges=["203.0.113.000/025"],
        ),
        endpoint_slice("ns1", "svc1", ["10.180.00.001"]),
    ]
    # upstream TestBadIPs' expected, after baseRules:
    expected = """
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
add chain ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto service-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add chain ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80 ip saddr != { 203.0.113.0/25 } drop
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 192.168.99.22 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy firewall-ips { 1.2.3.4 . tcp . 80 : goto firewall-ULMVA6XW-ns1/svc1/tcp/p80 }
"""  # noqa: E501 - upstream's lines, verbatim
    base = (NFT_GOLDEN / "upstream-TestOverallNFTablesRules.txt").read_text()
    base_rules = base[: base.index("# svc1")]
    assert sort_transaction(ipv4_dump(objects)) == sort_transaction(base_rules + expected)


def test_etp_local_without_local_endpoints_drops_external() -> None:
    """TestExternalTrafficPolicyLocal shape: a remote-only endpoint; external addresses drop
    (after the short-circuits), the cluster IP still goes to the service chain."""
    objects = [
        SERVICE_CIDR,
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port(node_port=3001)],
            type="LoadBalancer",
            etp="Local",
            lb_ingress=["1.2.3.4"],
            hcnp=30000,
        ),
        endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1", "other-node")]),
    ]
    text = ipv4_dump(objects)
    assert 'no-endpoint-nodeports { tcp . 3001 comment "ns1/svc1:p80" : drop }' in text
    assert 'no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns1/svc1:p80" : drop }' in text
    ext = [
        line for line in text.splitlines() if line.startswith("add rule ip kube-proxy external-")
    ]
    assert [line.split(" ", 5)[5] for line in ext] == [
        "ip saddr 10.0.0.0/8 goto service-ULMVA6XW-ns1/svc1/tcp/p80"
        ' comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        "fib saddr type local goto service-ULMVA6XW-ns1/svc1/tcp/p80"
        ' comment "short-circuit local traffic"',
    ]


def test_etp_local_with_local_endpoint_uses_local_chain() -> None:
    objects = [
        service("ns1", "svc1", "172.30.0.41", [port(node_port=3001)], type="NodePort", etp="Local"),
        endpoint_slice(
            "ns1", "svc1", [endpoint("10.180.0.1", "test-node"), endpoint("10.180.0.2", "other")]
        ),
    ]
    text = ipv4_dump(objects)
    local = [line for line in text.splitlines() if line.startswith("add rule ip kube-proxy local-")]
    assert len(local) == 1 and "numgen random mod 1 vmap" in local[0]
    assert "__10.180.0.1/80" in local[0]
    assert "goto local-" in text.split("external-")[-1] or any(
        line.endswith(" goto " + local[0].split(" ")[4]) for line in text.splitlines()
    )
    # No cluster-ips-check drop rule without ServiceCIDR objects.
    assert "Drop traffic to unallocated ClusterIPs" not in text


def test_itp_local_without_local_endpoints_drops_cluster_ip() -> None:
    """TestInternalTrafficPolicy: ITP Local and no local endpoint → cluster IP dropped."""
    objects = [
        service("ns1", "svc1", "172.30.0.41", itp="Local"),
        endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1", "other-node")]),
    ]
    text = ipv4_dump(objects)
    assert 'no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : drop }' in text
    assert "/svc1/" not in text


def test_masquerade_all_and_ipv6() -> None:
    objects = [
        service("ns1", "svc1", "fd00:10:96::41", affinity_timeout=60),
        endpoint_slice("ns1", "svc1", [endpoint("fd00:10::1", "test-node")], address_type="IPv6"),
    ]
    args = (
        "--proxy-mode", "nftables", "--hostname-override", "test-node",
        "--node-ip", "2001:db8::1", "--masquerade-all",
    )  # fmt: skip
    text = sections(render(objects, args))["IPv6"]
    base = next(w.removeprefix("endpoint-") for w in text.split() if w.startswith("endpoint-"))
    assert base.endswith("-ns1/svc1/tcp/p80__fd00.10..1/80")
    assert (
        f"add set ip6 kube-proxy affinity-{base}"
        " { type ipv6_addr ; flags dynamic,timeout ; timeout 60s ; }" in text
    )
    assert "ip6 daddr fd00:10:96::41 jump mark-for-masquerade" in text
    assert f"update @affinity-{base} {{ ip6 saddr }}" in text
    assert "meta l4proto tcp dnat to [fd00:10::1]:80" in text
    # --nodeport-addresses defaults to primary in nftables mode.
    assert "add element ip6 kube-proxy nodeport-ips { 2001:db8::1 }" in text


def test_nodeport_addresses_all() -> None:
    objects = [service("ns1", "svc1", "172.30.0.41")]
    text = ipv4_dump(objects, (*NFT_ARGS[:-1], "0.0.0.0/0"))
    assert "nodeport-ips" not in text
    assert (
        "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8"
        " meta l4proto . th dport vmap @service-nodeports" in text
    )
    assert (
        "add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8"
        " meta l4proto . th dport vmap @no-endpoint-nodeports" in text
    )


def test_firewall_allows_lb_ips_when_node_in_source_ranges() -> None:
    objects = [
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port(node_port=3001)],
            type="LoadBalancer",
            lb_ingress=["1.2.3.4", "5.6.7.8"],
            source_ranges=["192.168.0.0/24", "203.0.113.0/25"],
        ),
    ]
    text = ipv4_dump(objects)
    assert "ip saddr != { 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 } drop" in text


# --- chain names ------------------------------------------------------------------------------


def _spn(port_name: str, protocol: Protocol = Protocol.TCP, ns: str = "testing",
         name: str = "service") -> ServicePortName:  # fmt: skip
    return ServicePortName(ns, name, port_name, protocol)


LONG = (
    "very-long-namespace-name-abcdefghijklmnopqrstuvwxyz0123456789xx",
    "very-long-service-name-why-would-you-even-do-this-i-mean-really",
    "port-443-providing-the-hypertext-transmission-protocol-with-tls",
)


@pytest.mark.parametrize(
    ("spn", "expected"),
    [
        (_spn("http"), "P4ZYZVCF-testing/service/tcp/http"),
        (_spn("https"), "LZBRENCP-testing/service/tcp/https"),
        (
            _spn(LONG[2], Protocol.SCTP, LONG[0], LONG[1]),
            f"KR6NACJP-{LONG[0]}/{LONG[1]}/sctp/{LONG[2]}",
        ),
    ],
)
def test_service_chain_name_base(spn: ServicePortName, expected: str) -> None:
    """Upstream's Test_servicePortChainNameBase."""
    assert service_port_chain_name_base(spn) == expected


def _ep(ip: str, port_number: int) -> str:
    """The endpoint text as upstream's test writes it (not re-formatted)."""
    return f"[{ip}]:{port_number}" if ":" in ip else f"{ip}:{port_number}"


@pytest.mark.parametrize(
    ("spn", "ep", "expected"),
    [
        (_spn("http"), _ep("10.180.0.1", 80), "JO2XBXZR-testing/service/tcp/http__10.180.0.1/80"),
        (_spn("http"), _ep("10.180.0.2", 80), "5S6H3H22-testing/service/tcp/http__10.180.0.2/80"),
        (
            _spn("http"),
            _ep("fd80:abcd:12::a1b2:c3d4:e5f6:9999", 80),
            "U7E2ET36-testing/service/tcp/http__fd80.abcd.12..a1b2.c3d4.e5f6.9999/80",
        ),
        (
            _spn(LONG[2], Protocol.SCTP, LONG[0], LONG[1]),
            _ep("1234:5678:9abc:def0::abc:1234", 443),
            f"5YS7AFEA-{LONG[0]}/{LONG[1]}/sctp/{LONG[2]}__1234.5678.9abc.def0..abc.1234/443",
        ),
        (
            _spn(LONG[2], Protocol.SCTP, LONG[0], LONG[1]),
            _ep("1234:5678:9abc:def0::abcd:1234:5678", 443),
            f"CI6C53Q3-{LONG[0]}/{LONG[1]}/sctp/{LONG[2]}__1234.5678.9abc.def0..abcd.1234...",
        ),
        (
            _spn(LONG[2], Protocol.SCTP, LONG[0], LONG[1]),
            _ep("1234:5678:9abc:def0::abcd:1234:8765", 443),
            f"2FLXFK6X-{LONG[0]}/{LONG[1]}/sctp/{LONG[2]}__1234.5678.9abc.def0..abcd.1234...",
        ),
    ],
)
def test_endpoint_chain_name_base(spn: ServicePortName, ep: str, expected: str) -> None:
    """Upstream's Test_servicePortEndpointChainNameBase (IPv6 ':' → '.', truncation)."""
    assert endpoint_chain_name_base(spn, ep) == expected


def test_service_cidrs_of_other_family_are_ignored() -> None:
    """OnServiceCIDRsChanged: each family's proxier keeps only its own family's CIDRs."""
    cidrs = dict(SERVICE_CIDR, spec={"cidrs": ["172.30.0.0/16", "fd00:10:96::/112"]})
    other = {
        **SERVICE_CIDR,
        "metadata": {"name": "extra"},
        "spec": {"cidrs": ["172.50.0.0/16", "fd00:172:30::/112"]},
    }
    text = ipv4_dump([cidrs, other, service("ns1", "svc1", "172.30.0.41")])
    assert "ip daddr { 172.30.0.0/16,172.50.0.0/16 } drop" in text


def test_agent_builds_nftables_proxiers_in_nftables_mode() -> None:
    """The agent's factory builds NftablesProxier (never iptables rules) in nftables mode."""
    from pyproxy.cli import proxier_factory
    from pyproxy.nftables.proxier import NftablesProxier
    from pyproxy.options import parse_options
    from pyproxy.proxystate import ProxierConfig

    options = parse_options(["--proxy-mode", "nftables", "--hostname-override", "n"])
    proxier = proxier_factory(options, "nft")(ProxierConfig(IPFamily.IPv4, "n"))
    assert isinstance(proxier, NftablesProxier)


def test_service_cidr_objects_are_validated() -> None:
    """convert: a ServiceCIDR with a bad CIDR is an invalid object (skipped, named), the
    others are kept; nothing else about the state changes."""
    from pyproxy.convert import state_from_objects

    bad = {**SERVICE_CIDR, "metadata": {"name": "bad"}, "spec": {"cidrs": ["10.96.0.0/99"]}}
    cluster, problems = state_from_objects([SERVICE_CIDR, bad, service("ns1", "s", "172.30.0.9")])
    assert [(p.kind, p.name, p.field) for p in problems] == [
        ("ServiceCIDR", "bad", "spec.cidrs[0]")
    ]
    assert [str(c) for c in cluster.all_service_cidrs()] == ["172.30.0.0/16"]
    assert len(cluster.services) == 1


def test_dual_stack_golden() -> None:
    """A reviewed golden (tests/golden/nftables/dual-stack.nft, `## ` notes on top) of the
    dry-run for the shared dual-stack state; UPDATE_GOLDEN=1 rewrites it and fails."""
    state = GOLDEN_DIR / "dual-stack.yaml"
    expected_path = NFT_GOLDEN / "dual-stack.nft"
    out = render(load_objects(state), ["--proxy-mode", "nftables", *golden_args(state)])
    header = review_header(expected_path.read_text())
    if update_golden_requested():
        expected_path.write_text(header + out)
        pytest.fail(f"rewrote {expected_path}; review and commit it")
    assert out == strip_review_header(expected_path.read_text())
