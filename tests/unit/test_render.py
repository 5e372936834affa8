"""Renderer properties the golden files cannot show on their own.

Spec: reference/kube-proxy.md §a row 27 and §b ("Large-cluster mode drops -m comment from SEP
and SVC-to-SEP rules (not from KUBE-SERVICES rules)", jump table, fixed rules, per service port
steps 1-10) and §f (checkIPTablesRuleJumps, tracePacket). Random valid states are checked for
structure and against a small independent oracle of where cluster-IP and NodePort traffic goes.
"""

from __future__ import annotations

import ipaddress
import random
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import EndpointSpec, PortSpec, RandomState, random_states
from support import (
    BASE_ARGS,
    EXTERNAL_CLIENT,
    EXTERNAL_CLIENT_IPV6,
    NODE_IP,
    NODE_IPV6,
    POD_IP,
    POD_IPV6,
    cluster_of,
    endpoint,
    endpoint_slice,
    port,
    render,
    rules_of,
    sections,
    service,
    slice_port,
    trace,
    without_hooks,
)

from pyproxy.iptables.render import Ruleset, render_ruleset
from pyproxy.iptables.tracer import check_jumps, parse_ruleset
from pyproxy.iptables.vocabulary import JumpRule, jump_rules
from pyproxy.model import IPFamily
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import ProxierConfig, desired_state

# --- large-cluster mode (upstream TestSyncProxyRulesLargeClusterMode) ---------------------------

THRESHOLD = 1000  # upstream largeClusterEndpointsThreshold


def _big_services(n_per_service: int) -> list[dict[str, object]]:
    objects: list[dict[str, object]] = [
        service("ns1", "svc1", "172.30.0.41", [port("p80", 80)]),
        service("ns2", "svc2", "172.30.0.42", [port("p8080", 8080)]),
        service("ns3", "svc3", "172.30.0.43", [port("p8081", 8081)]),
    ]
    objects.append(
        endpoint_slice(
            "ns1",
            "svc1",
            [f"10.0.{i % 256}.{i // 256}" for i in range(n_per_service)],
            [slice_port("p80", 80)],
        )
    )
    objects.append(
        endpoint_slice(
            "ns2",
            "svc2",
            [f"10.1.{i % 256}.{i // 256}" for i in range(n_per_service)],
            [slice_port("p8080", 8080)],
        )
    )
    return objects


def _count_dnat(text: str) -> tuple[int, int]:
    lines = [
        line for line in text.splitlines() if line.startswith("-A KUBE-SEP-") and "-j DNAT" in line
    ]
    return len(lines), sum("--comment" in line for line in lines)


def test_below_the_large_cluster_threshold_everything_has_comments() -> None:
    objects = _big_services(THRESHOLD // 2 - 1)
    text = sections(render(objects, (*BASE_ARGS, "--masquerade-all")))["IPv4"]
    assert _count_dnat(text) == (2 * (THRESHOLD // 2 - 1),) * 2
    assert (
        "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m comment --comment ns1/svc1:p80 -m tcp -p tcp"
        " -j DNAT --to-destination 10.0.0.0:80\n"
    ) in text


def test_exactly_at_the_threshold_is_not_large() -> None:
    objects = _big_services(THRESHOLD // 2)
    text = sections(render(objects))["IPv4"]
    assert _count_dnat(text) == (THRESHOLD, THRESHOLD)


def test_large_cluster_mode_drops_sep_and_svc_to_sep_comments() -> None:
    objects = _big_services(THRESHOLD // 2 - 1)
    objects.append(
        endpoint_slice(
            "ns3",
            "svc3",
            ["203.0.113.4", "203.0.113.8", "203.0.113.12"],
            [slice_port("p8081", 8081)],
        )
    )
    text = sections(render(objects, (*BASE_ARGS, "--masquerade-all")))["IPv4"]
    total = 2 * (THRESHOLD // 2 - 1) + 3
    assert _count_dnat(text) == (total, 0)
    lines = text.splitlines()
    # Exactly upstream's lines.
    assert (
        "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80" in lines
    )
    assert (
        "-A KUBE-SEP-RUVVH7YV3PHQBDOS -m tcp -p tcp -j DNAT --to-destination 203.0.113.4:8081"
        in lines
    )
    assert "-A KUBE-SEP-DKGQUZGBKLTPAR56 -s 10.0.0.0 -j KUBE-MARK-MASQ" in lines
    # SVC -> SEP rules lose their comments too ...
    svc_to_sep = [line for line in lines if line.startswith("-A KUBE-SVC-") and "KUBE-SEP-" in line]
    assert len(svc_to_sep) == total
    assert not any("--comment" in line for line in svc_to_sep)
    assert "-A KUBE-SVC-XPGD46QRK7WJZT7O -m statistic --mode random --probability" in text
    # ... but KUBE-SERVICES rules and the masquerade rule of the SVC chain keep theirs.
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp'
        " -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"
    ) in lines
    assert (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp'
        " -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ"
    ) in lines
    assert check_jumps(parse_ruleset(without_hooks(text))) == []


def test_large_cluster_counts_every_endpoint_not_just_ready_ones() -> None:
    """upstream: totalEndpoints sums len(endpointsMap[svc]) over service ports, ready or not."""
    objects = _big_services(THRESHOLD // 2)
    objects.append(
        endpoint_slice(
            "ns3", "svc3", [endpoint("203.0.113.4", ready=False)], [slice_port("p8081", 8081)]
        )
    )
    text = sections(render(objects))["IPv4"]
    assert _count_dnat(text) == (THRESHOLD, 0)


def test_large_cluster_mode_affinity_rules_have_no_comments() -> None:
    objects = _big_services(THRESHOLD // 2)
    objects[0] = service("ns1", "svc1", "172.30.0.41", [port("p80", 80)], affinity_timeout=60)
    objects.append(endpoint_slice("ns3", "svc3", ["203.0.113.4"], [slice_port("p8081", 8081)]))
    text = sections(render(objects))["IPv4"]
    assert (
        "-A KUBE-SVC-XPGD46QRK7WJZT7O -m recent --name KUBE-SEP-DKGQUZGBKLTPAR56 --rcheck"
        " --seconds 60 --reap -j KUBE-SEP-DKGQUZGBKLTPAR56\n"
    ) in text
    assert (
        "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m recent --name KUBE-SEP-DKGQUZGBKLTPAR56 --set"
        " -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80\n"
    ) in text


# --- fixed rules and hooks --------------------------------------------------------------------

REFERENCE_JUMPS = [
    # reference §b "Jumps from built-in chains", in order
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    ),
    (
        "filter",
        "INPUT",
        '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes service portals" -j KUBE-SERVICES',
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes service portals" -j KUBE-SERVICES',
    ),
    ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment"
        ' "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    ),
    ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    (
        "nat",
        "POSTROUTING",
        '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    ),
]
KUBELET_JUMPS = [("filter", "INPUT", "-j KUBE-FIREWALL"), ("filter", "OUTPUT", "-j KUBE-FIREWALL")]


def _hooks(rules: tuple[JumpRule, ...]) -> list[tuple[str, str, str]]:
    return [(h.table, h.chain, h.spec) for h in rules]


def test_jump_rules_are_the_reference_table() -> None:
    v4 = ProxierConfig(family=IPFamily.IPv4, node_name="n", localhost_nodeports=True)
    assert _hooks(jump_rules(v4)) == REFERENCE_JUMPS + KUBELET_JUMPS
    no_localhost = ProxierConfig(family=IPFamily.IPv4, node_name="n", localhost_nodeports=False)
    assert _hooks(jump_rules(no_localhost)) == REFERENCE_JUMPS
    v6 = ProxierConfig(family=IPFamily.IPv6, node_name="n", localhost_nodeports=True)
    assert _hooks(jump_rules(v6)) == REFERENCE_JUMPS


def test_hooks_are_prepended_so_the_last_one_ends_up_first() -> None:
    """EnsureRule(Prepend) in table order: after the inserts, each built-in chain lists our
    hooks in reverse table order."""
    text = sections(render([]))["IPv4"]
    rs = parse_ruleset(text)
    assert [r.target for r in rs.rules("filter", "INPUT")] == [
        "KUBE-FIREWALL",
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
    ]
    assert [r.target for r in rs.rules("filter", "FORWARD")] == [
        "KUBE-PROXY-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
    ]
    assert [r.target for r in rs.rules("nat", "PREROUTING")] == ["KUBE-SERVICES"]


def test_empty_cluster_fixed_rules() -> None:
    """reference §b "Fixed rules", exactly, for a node with no Services."""
    text = without_hooks(sections(render([]))["IPv4"])
    assert text == (
        "*filter\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-EXTERNAL-SERVICES - [0:0]\n"
        ":KUBE-FORWARD - [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n"
        ":KUBE-PROXY-FIREWALL - [0:0]\n"
        ":KUBE-FIREWALL - [0:0]\n"
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections"'
        " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT"
        " -j DROP\n"
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
        " -m mark --mark 0x4000/0x4000 -j ACCEPT\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "COMMIT\n"
        "*nat\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n"
        ":KUBE-POSTROUTING - [0:0]\n"
        ":KUBE-MARK-MASQ - [0:0]\n"
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n"
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully\n"
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be'
        ' the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n'
        "COMMIT\n"
    )


def test_masquerade_bit() -> None:
    text = sections(render([], (*BASE_ARGS, "--iptables-masquerade-bit", "15")))["IPv4"]
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x8000" in text
    assert "-m mark ! --mark 0x8000/0x8000 -j RETURN" in text
    assert "0x4000" not in text


def test_masquerade_without_random_fully() -> None:
    config = ProxierConfig(family=IPFamily.IPv4, node_name="n")
    text = render_ruleset([], config, random_fully=False).text
    assert (
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE\n"
    ) in text


def test_invalid_drop_rule_omitted_when_tcp_be_liberal() -> None:
    config = ProxierConfig(family=IPFamily.IPv4, node_name="n", conntrack_tcp_be_liberal=True)
    assert rules_of(render_ruleset([], config).text, "filter", "KUBE-FORWARD") == [
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
        " -m mark --mark 0x4000/0x4000 -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]


def test_health_check_node_port_accepted_without_endpoints() -> None:
    """upstream TestHealthCheckNodePort: nodePortAddresses 127.0.0.0/8, HCNP accepted from
    outside, and gone when the Service is."""
    svc = service(
        "ns1",
        "svc1",
        "172.30.0.42",
        [port("p80", 80, node_port=3001)],
        type="LoadBalancer",
        etp="Local",
        hcnp=30000,
    )
    args = (*BASE_ARGS, "--nodeport-addresses", "127.0.0.0/8")
    rs = parse_ruleset(without_hooks(sections(render([svc], args))["IPv4"]))
    t = trace(rs, "1.2.3.4", NODE_IP, 30000)
    assert (t.output, t.masquerade) == ("ACCEPT", False)
    rs = parse_ruleset(without_hooks(sections(render([], args))["IPv4"]))
    assert trace(rs, "1.2.3.4", NODE_IP, 30000).output == ""


# --- random valid states ----------------------------------------------------------------------

_PROB = re.compile(r"--probability (\S+)")


def _check_structure(state: RandomState, out: str) -> None:
    per_family = sections(out)
    assert tuple(per_family) == state.families
    for family, text in per_family.items():
        bare = without_hooks(text)
        ruleset = parse_ruleset(bare)
        assert check_jumps(ruleset) == [], family
        nat = ruleset.table("nat")
        assert nat is not None
        services = nat.chain("KUBE-SERVICES")
        assert services is not None
        assert "must be the last rule" in (services.rules[-1].comment or "")
        assert not any("must be the last rule" in (r.comment or "") for r in services.rules[:-1])
        for chain in nat.chains:
            rules = chain.rules
            if chain.name.startswith("KUBE-SEP-"):
                # hairpin masquerade first, DNAT last (reference §b step 10)
                assert len(rules) == 2, chain.name
                assert rules[0].target == "KUBE-MARK-MASQ"
                assert rules[0].source is not None
                assert rules[1].target == "DNAT"
                ep_ip = rules[1].to_destination.rpartition(":")[0].strip("[]")  # type: ignore[union-attr]
                assert rules[0].source.value == ep_ip
            if chain.name.startswith(("KUBE-SVC-", "KUBE-SVL-")):
                lb = [r for r in rules if r.target and r.target.startswith("KUBE-SEP-")]
                lb = [r for r in lb if r.recent is None]
                n = len(lb)
                assert n > 0, chain.name
                for k, r in enumerate(lb):
                    m = _PROB.search(r.raw)
                    if k < n - 1:
                        assert m is not None, r.raw
                        assert m.group(1) == f"{1.0 / (n - k):0.10f}"
                    else:
                        assert m is None, r.raw
        for line in bare.splitlines():
            if line.startswith("-A KUBE-SEP-") and "--to-destination" in line:
                dest = line.rsplit(" ", 1)[1]
                assert dest.startswith("[") == (family == "IPv6"), line
        # every address matched is of this family
        if family == "IPv4":
            assert not re.search(r" -[sd] [0-9a-f]*:", bare)
        else:
            assert ":KUBE-FIREWALL" not in bare
            assert not re.search(r" -[sd] \d+\.\d+\.\d+\.\d+", bare)


def _sorted_eps(eps: list[tuple[EndpointSpec, int]], family: str) -> str:
    texts = [f"[{e.ip}]:{p}" if family == "IPv6" else f"{e.ip}:{p}" for e, p in eps]
    return ", ".join(sorted(texts))


def _usable(eps: list[tuple[EndpointSpec, int]]) -> list[tuple[EndpointSpec, int]]:
    ready = [(e, p) for e, p in eps if e.ready]
    return ready or [(e, p) for e, p in eps if e.serving and e.terminating]


def _oracle_cluster_ip(spec: PortSpec, masquerade_all: bool) -> tuple[str, bool]:
    """A pod (not an endpoint) connecting to the cluster IP (reference §a 14-15, 18-19, 21)."""
    eps = list(spec.endpoints)
    chosen = _usable([ep for ep in eps if ep[0].local]) if spec.itp_local else _usable(eps)
    if chosen:
        return _sorted_eps(chosen, spec.family), masquerade_all
    return ("DROP" if spec.itp_local and _usable(eps) else "REJECT"), False


def _oracle_node_port(spec: PortSpec) -> tuple[str, bool]:
    """An external client connecting to the node's NodePort (reference §a 4, 12, 18-19)."""
    eps = list(spec.endpoints)
    if spec.etp_local:
        chosen = _usable([ep for ep in eps if ep[0].local])
        if chosen:
            return _sorted_eps(chosen, spec.family), False
        return ("DROP" if _usable(eps) else "REJECT"), False
    chosen = _usable(eps)
    if chosen:
        return _sorted_eps(chosen, spec.family), True
    return "REJECT", False


def _in_ranges(ip: str, ranges: tuple[str, ...]) -> bool:
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(r) for r in ranges)


def _oracle_external_ip(spec: PortSpec) -> tuple[str, bool]:
    """An external client connecting to an externalIP: as a NodePort (reference §a 10, 12)."""
    return _oracle_node_port(spec)


def _oracle_lb_ip(spec: PortSpec, mode: str | None, src: str, node_ip: str) -> tuple[str, bool]:
    """An external client connecting to an LB IP (reference §a 7-9, §b steps 3 and 8)."""
    if mode == "Proxy":
        return "", False  # no local rule at all
    usable = _usable(list(spec.endpoints))
    if spec.source_ranges and usable:
        allowed = _in_ranges(src, spec.source_ranges) or (
            _in_ranges(node_ip, spec.source_ranges) and src in {ip for ip, _ in spec.lb_ips}
        )
        if not allowed:
            return "DROP", False
    return _oracle_node_port(spec)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_random_states_structure_and_flows(state: RandomState) -> None:
    out = render(state.objects, state.args)
    _check_structure(state, out)
    per_family = sections(out)
    masquerade_all = "--masquerade-all" in state.args
    for spec in state.ports:
        if spec.family not in per_family:
            continue
        rs = parse_ruleset(without_hooks(per_family[spec.family]))
        pod, ext, node_ip = (
            (POD_IPV6, EXTERNAL_CLIENT_IPV6, NODE_IPV6)
            if spec.family == "IPv6"
            else (POD_IP, EXTERNAL_CLIENT, NODE_IP)
        )
        t = trace(rs, pod, spec.cluster_ip, spec.port, spec.protocol.lower())
        assert (t.output, t.masquerade) == _oracle_cluster_ip(spec, masquerade_all), (
            spec,
            t.describe(),
        )
        proto = spec.protocol.lower()
        if spec.node_port:
            t = trace(rs, ext, node_ip, spec.node_port, proto)
            assert (t.output, t.masquerade) == _oracle_node_port(spec), (spec, t.describe())
        for ip in spec.external_ips:
            t = trace(rs, ext, ip, spec.port, proto)
            assert (t.output, t.masquerade) == _oracle_external_ip(spec), (spec, t.describe())
        for ip, mode in spec.lb_ips:
            for src in (ext, ip):  # a client, and the node looping back with the LB IP
                t = trace(rs, src, ip, spec.port, proto)
                expected = _oracle_lb_ip(spec, mode, src, node_ip)
                assert (t.output, t.masquerade) == expected, (spec, src, t.describe())


@settings(max_examples=25, deadline=None)
@given(random_states(), st.randoms(use_true_random=False))
def test_random_states_render_byte_identically(state: RandomState, rnd: random.Random) -> None:
    first = render(state.objects, state.args)
    shuffled = list(state.objects)
    rnd.shuffle(shuffled)
    assert render(shuffled, state.args) == first
    # render_ruleset takes service ports in any order
    options = parse_options(["--dry-run", *state.args])
    cluster = cluster_of(state.objects)
    for config in proxier_configs(options, None, ()):
        ports = [p for ports in desired_state(cluster, config).values() for p in ports]
        reference = render_ruleset(ports, config).text
        rnd.shuffle(ports)
        assert render_ruleset(ports, config).text == reference
        assert isinstance(render_ruleset(ports, config), Ruleset)


# --- node identity, node addresses, nodeport addresses ----------------------------------------

NODEPORTS_LAST = (
    '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the'
    ' last rule in this chain"'
)


def _nodeports_jumps(text: str) -> list[str]:
    return [
        line.removeprefix(NODEPORTS_LAST).strip()
        for line in text.splitlines()
        if line.startswith(NODEPORTS_LAST)
    ]


def test_hostname_override_is_lower_cased_and_trimmed() -> None:
    """reference §e: node name = --hostname-override, lower-cased and trimmed."""
    objects = [
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port("p80", 80, node_port=3001)],
            type="NodePort",
            etp="Local",
        ),
        endpoint_slice(
            "ns1", "svc1", [endpoint("10.180.0.1", "test-node"), endpoint("10.180.0.2", "other")]
        ),
    ]
    args = ("--hostname-override", "  Test-Node ", "--node-ip", NODE_IP)
    rs = parse_ruleset(without_hooks(sections(render(objects, args))["IPv4"]))
    assert trace(rs, EXTERNAL_CLIENT, NODE_IP, 3001).output == "10.180.0.1:80"


def test_primary_node_ip_comes_from_the_node_object() -> None:
    """Without --node-ip the Node's InternalIP is the primary node IP (allow-from-node rule)."""
    objects = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "test-node"},
            "status": {
                "addresses": [
                    {"type": "ExternalIP", "address": "203.0.113.77"},
                    {"type": "InternalIP", "address": "192.168.0.2"},
                ]
            },
        },
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            type="LoadBalancer",
            lb_ingress=["1.2.3.4"],
            source_ranges=["192.168.0.0/24"],
        ),
        endpoint_slice("ns1", "svc1", ["10.180.0.1"]),
    ]
    text = sections(render(objects, ("--hostname-override", "test-node")))["IPv4"]
    assert (
        '-A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP"'
        " -s 1.2.3.4 -j KUBE-EXT-XPGD46QRK7WJZT7O"
    ) in text.splitlines()


def test_source_range_containing_only_a_secondary_node_ip_does_not_allow_the_lb_ip() -> None:
    """reference §b step 8: only the (primary) node IP counts."""
    objects = [
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            type="LoadBalancer",
            lb_ingress=["1.2.3.4"],
            source_ranges=["192.168.1.0/24"],
        ),
        endpoint_slice("ns1", "svc1", ["10.180.0.1"]),
    ]
    text = sections(render(objects))["IPv4"]  # node IPs 192.168.0.2 (primary), 192.168.1.2
    assert " -s 1.2.3.4 " not in text


def test_local_copy_of_an_endpoint_listed_twice_wins() -> None:
    """endpointslicecache: an endpoint in several slices counts once, a local copy wins."""
    for first, second in (("node-2", "test-node"), ("test-node", "node-2")):
        objects = [
            service(
                "ns1",
                "svc1",
                "172.30.0.41",
                [port("p80", 80, node_port=3001)],
                type="NodePort",
                etp="Local",
            ),
            endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1", first)], name="svc1-a"),
            endpoint_slice("ns1", "svc1", [endpoint("10.180.0.1", second)], name="svc1-b"),
        ]
        rs = parse_ruleset(without_hooks(sections(render(objects))["IPv4"]))
        t = trace(rs, EXTERNAL_CLIENT, NODE_IP, 3001)
        assert (t.output, t.masquerade) == ("10.180.0.1:80", False)


def test_nodeport_addresses_zero_cidr_means_every_local_address() -> None:
    args = (*BASE_ARGS, "--nodeport-addresses", "0.0.0.0/0")
    text = sections(render([], args))["IPv4"]
    assert _nodeports_jumps(text) == ["-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"]
    assert ":KUBE-FIREWALL - [0:0]" in text  # 0.0.0.0/0 contains the loopback


def test_nodeport_addresses_primary_is_per_family() -> None:
    args = (
        "--hostname-override",
        "test-node",
        "--node-ip",
        NODE_IP,
        "--node-ip",
        NODE_IPV6,
        "--node-ip",
        "192.168.1.2",
        "--node-ip",
        "2001:db8:1::2",
        "--nodeport-addresses",
        "primary",
    )
    out = sections(render([], args))
    assert _nodeports_jumps(out["IPv4"]) == [f"-d {NODE_IP} -j KUBE-NODEPORTS"]
    assert _nodeports_jumps(out["IPv6"]) == [f"-d {NODE_IPV6} -j KUBE-NODEPORTS"]


def test_ipv6_loopback_in_nodeport_addresses_is_skipped() -> None:
    args = (
        "--hostname-override",
        "test-node",
        "--node-ip",
        NODE_IPV6,
        "--nodeport-addresses",
        "::1/128,2001:db8::/64",
    )
    text = sections(render([], args))["IPv6"]
    assert _nodeports_jumps(text) == [f"-d {NODE_IPV6} -j KUBE-NODEPORTS"]


def test_only_the_node_families_are_rendered() -> None:
    dual_service = service("ns1", "svc1", ["172.30.0.41", "fd00:172:30::41"])
    assert list(sections(render([dual_service]))) == ["IPv4"]
    v6_args = ("--hostname-override", "test-node", "--node-ip", NODE_IPV6)
    assert list(sections(render([dual_service], v6_args))) == ["IPv6"]
