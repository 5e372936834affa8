"""The IPVS plan: virtual servers, real servers, bound addresses, ipsets and iptables rules.

Spec: reference/kube-proxy.md §a (ipvs column) and §c (IPVS mode layout); upstream's
pkg/proxy/ipvs/proxier.go syncProxyRules / syncEndpoint / writeIptablesRules. The node is
upstream's fake one: `test-node`, node IPs 192.168.0.2 and 192.168.1.2, pod CIDR 10.0.0.0/8.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from support import (
    NODE_IP,
    NODE_IP_ALT,
    TEST_NODE,
    cluster_of,
    endpoint,
    endpoint_slice,
    node,
    port,
    service,
    slice_port,
)

from pyproxy.ipvs import ipsets
from pyproxy.ipvs.plan import (
    FLAG_PERSISTENT,
    FLAG_SOURCE_HASH,
    SCHEDULERS,
    IpvsPlan,
    PlannedVirtualServer,
    RealServer,
    VirtualServerKey,
    VirtualServerKind,
    normalize_scheduler,
    plan_ipvs,
)
from pyproxy.ipvs.rules import ipvs_jump_rules
from pyproxy.model import IPAddress, IPFamily, Protocol
from pyproxy.proxystate import ProxierConfig, desired_state

ip = ipaddress.ip_address
net = ipaddress.ip_network

CONFIG = ProxierConfig(
    family=IPFamily.IPv4,
    node_name=TEST_NODE,
    node_ips=(ip(NODE_IP), ip(NODE_IP_ALT)),
    cluster_cidr=net("10.0.0.0/8"),
)
CONFIG6 = ProxierConfig(
    family=IPFamily.IPv6,
    node_name=TEST_NODE,
    node_ips=(ip("2001:db8::1"),),
    cluster_cidr=net("fd00:10::/64"),
)


def make_plan(
    *objects: Mapping[str, Any],
    config: ProxierConfig = CONFIG,
    scheduler: str = "rr",
    local: Sequence[str] | None = None,
) -> IpvsPlan:
    cluster = cluster_of(objects)
    states = [p for ports in desired_state(cluster, config).values() for p in ports]
    addresses = None if local is None else [ip(a) for a in local]
    return plan_ipvs(states, config, scheduler, local_addresses=addresses)


def vs(plan: IpvsPlan, address: str, port_number: int, proto: str = "TCP") -> PlannedVirtualServer:
    key = VirtualServerKey(Protocol(proto), ip(address), port_number)
    found = plan.by_key.get(key)
    assert found is not None, f"no virtual server {key}; have {[str(k) for k in plan.by_key]}"
    return found


def reals(planned: PlannedVirtualServer) -> list[str]:
    return [rs.endpoint for rs in planned.real_servers]


def members(plan: IpvsPlan, base: str) -> set[str]:
    return set(plan.ipset(base).members)


def keys(plan: IpvsPlan) -> set[str]:
    return {str(k) for k in plan.by_key}


def nat_rules(plan: IpvsPlan) -> list[str]:
    return plan.rules.nat_text.splitlines()


def filter_rules(plan: IpvsPlan) -> list[str]:
    return plan.rules.filter_text.splitlines()


WEB = (
    service("ns1", "web", "10.96.0.10", [port("http", 80)]),
    endpoint_slice(
        "ns1",
        "web",
        [endpoint("10.0.1.1", TEST_NODE), endpoint("10.0.2.1", "other-node")],
        [slice_port("http", 8080)],
    ),
)


# --- ClusterIP ----------------------------------------------------------------------------


def test_cluster_ip_virtual_server_real_servers_and_bound_address() -> None:
    plan = make_plan(*WEB)
    web = vs(plan, "10.96.0.10", 80)
    assert web.kind is VirtualServerKind.CLUSTER_IP
    assert web.bind
    assert web.server.scheduler == "rr"
    assert web.server.flags == 0
    assert web.server.timeout == 0
    # Real servers come from the slice's target port, weight 1.
    assert web.real_servers == (
        RealServer(ip("10.0.1.1"), 8080, 1),
        RealServer(ip("10.0.2.1"), 8080, 1),
    )
    assert plan.bind_addresses == (ip("10.96.0.10"),)
    assert members(plan, ipsets.CLUSTER_IP) == {"10.96.0.10,tcp:80"}
    assert members(plan, ipsets.IPVS_IPS) == {"10.96.0.10"}
    # Only this node's endpoint takes part in the hairpin (loop-back) masquerade.
    assert members(plan, ipsets.LOOP_BACK) == {"10.0.1.1,tcp:8080,10.0.1.1"}
    assert keys(plan) == {"10.96.0.10:80/TCP"}  # no NodePort, no external IPs


@pytest.mark.parametrize("proto", ["TCP", "UDP", "SCTP"])
def test_every_protocol_gets_its_own_virtual_server(proto: str) -> None:
    plan = make_plan(
        service("ns1", "dns", "10.96.0.53", [port("p53", 53, proto)]),
        endpoint_slice("ns1", "dns", ["10.0.1.5"], [slice_port("p53", 5353, proto)]),
    )
    assert reals(vs(plan, "10.96.0.53", 53, proto)) == ["10.0.1.5:5353"]
    assert members(plan, ipsets.CLUSTER_IP) == {f"10.96.0.53,{proto.lower()}:53"}


def test_same_port_different_protocols_are_separate_virtual_servers() -> None:
    plan = make_plan(
        service("ns1", "dns", "10.96.0.53", [port("udp", 53, "UDP"), port("tcp", 53, "TCP")]),
        endpoint_slice(
            "ns1", "dns", ["10.0.1.5"], [slice_port("udp", 5353, "UDP"), slice_port("tcp", 5354)]
        ),
    )
    assert reals(vs(plan, "10.96.0.53", 53, "UDP")) == ["10.0.1.5:5353"]
    assert reals(vs(plan, "10.96.0.53", 53, "TCP")) == ["10.0.1.5:5354"]
    assert plan.bind_addresses == (ip("10.96.0.53"),)


def test_service_without_endpoints_keeps_an_empty_virtual_server() -> None:
    # Upstream ipvs mode: the virtual server exists with no real servers (no REJECT rule).
    plan = make_plan(service("ns1", "empty", "10.96.0.30", [port("p80", 80)]))
    assert vs(plan, "10.96.0.30", 80).real_servers == ()
    assert plan.bind_addresses == (ip("10.96.0.30"),)


def test_duplicate_endpoints_across_slices_are_one_real_server() -> None:
    plan = make_plan(
        WEB[0],
        endpoint_slice("ns1", "web", ["10.0.2.1"], [slice_port("http", 8080)], name="web-1"),
        endpoint_slice("ns1", "web", ["10.0.2.1"], [slice_port("http", 8080)], name="web-2"),
    )
    assert reals(vs(plan, "10.96.0.10", 80)) == ["10.0.2.1:8080"]


# --- session affinity and schedulers --------------------------------------------------------


def test_client_ip_affinity_makes_every_virtual_server_persistent() -> None:
    plan = make_plan(
        service(
            "ns1",
            "sticky",
            "10.96.0.80",
            [port("p80", 80, node_port=30080)],
            type="NodePort",
            external_ips=["198.51.100.8"],
            affinity_timeout=300,
        ),
        endpoint_slice("ns1", "sticky", ["10.0.1.1"]),
    )
    for planned in plan.virtual_servers:
        assert planned.server.flags == FLAG_PERSISTENT
        assert planned.server.timeout == 300
    assert len(plan.virtual_servers) == 4  # cluster IP, external IP, 2 node IPs


def test_default_affinity_timeout_is_three_hours() -> None:
    plan = make_plan(
        service("ns1", "sticky", "10.96.0.80", [port()], affinity=True),
        endpoint_slice("ns1", "sticky", ["10.0.1.1"]),
    )
    assert vs(plan, "10.96.0.80", 80).server.timeout == 10800


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_scheduler_is_set_on_every_virtual_server(scheduler: str) -> None:
    plan = make_plan(*WEB, scheduler=scheduler)
    server = vs(plan, "10.96.0.10", 80).server
    assert server.scheduler == scheduler
    # mh hashes on the source port too (upstream's FlagSourceHash); no other one sets flags.
    assert server.flags == (FLAG_SOURCE_HASH if scheduler == "mh" else 0)


def test_mh_with_affinity_sets_both_flags() -> None:
    plan = make_plan(
        service("ns1", "sticky", "10.96.0.80", [port()], affinity_timeout=60),
        endpoint_slice("ns1", "sticky", ["10.0.1.1"]),
        scheduler="mh",
    )
    assert vs(plan, "10.96.0.80", 80).server.flags == FLAG_PERSISTENT | FLAG_SOURCE_HASH


def test_scheduler_names() -> None:
    assert normalize_scheduler("") == "rr"
    assert normalize_scheduler(" wrr ") == "wrr"
    with pytest.raises(ValueError, match="unknown IPVS scheduler 'fastest'"):
        normalize_scheduler("fastest")


# --- NodePort -----------------------------------------------------------------------------


NODEPORT = (
    service("ns1", "np", "10.96.0.40", [port("p80", 80, node_port=30040)], type="NodePort"),
    endpoint_slice("ns1", "np", [endpoint("10.0.1.4", TEST_NODE), endpoint("10.0.2.4", "other")]),
)


def test_node_port_virtual_server_per_local_address() -> None:
    plan = make_plan(*NODEPORT, local=["192.168.0.2", "10.244.0.1", "127.0.0.1", "::1"])
    # Every usable local address of the family, loopback never (no localhost NodePorts).
    assert keys(plan) == {"10.96.0.40:80/TCP", "10.244.0.1:30040/TCP", "192.168.0.2:30040/TCP"}
    np = vs(plan, "192.168.0.2", 30040)
    assert np.kind is VirtualServerKind.NODE_PORT
    assert not np.bind
    assert reals(np) == ["10.0.1.4:80", "10.0.2.4:80"]
    assert plan.bind_addresses == (ip("10.96.0.40"),)  # node IPs are never bound
    assert members(plan, ipsets.NODE_PORT_TCP) == {"30040"}
    assert members(plan, ipsets.NODE_PORT_LOCAL_TCP) == set()


def test_node_ports_default_to_the_configured_node_ips_when_addresses_are_unknown() -> None:
    plan = make_plan(*NODEPORT)
    assert {"192.168.0.2:30040/TCP", "192.168.1.2:30040/TCP"} <= keys(plan)


def test_nodeport_addresses_select_local_addresses() -> None:
    config = ProxierConfig(
        family=IPFamily.IPv4,
        node_name=TEST_NODE,
        node_ips=(ip(NODE_IP),),
        nodeport_addresses=(net("192.168.1.0/24"), net("127.0.0.0/8")),
    )
    plan = make_plan(*NODEPORT, config=config, local=["192.168.0.2", "192.168.1.2", "127.0.0.1"])
    assert keys(plan) == {"10.96.0.40:80/TCP", "192.168.1.2:30040/TCP"}


def test_ipv6_link_local_addresses_get_no_node_port() -> None:
    plan = make_plan(
        service("ns1", "np", "fd00:96::40", [port("p80", 80, node_port=30040)], type="NodePort"),
        endpoint_slice("ns1", "np", ["fd00:10::4"], address_type="IPv6"),
        config=CONFIG6,
        local=["2001:db8::1", "fe80::1", "::1", "192.168.0.2"],
    )
    assert keys(plan) == {"[fd00:96::40]:80/TCP", "[2001:db8::1]:30040/TCP"}


@pytest.mark.parametrize("proto", ["UDP", "SCTP"])
def test_node_port_sets_per_protocol(proto: str) -> None:
    plan = make_plan(
        service(
            "ns1",
            "np",
            "10.96.0.40",
            [port("p80", 80, proto, node_port=30040)],
            type="NodePort",
            etp="Local",
        ),
        endpoint_slice(
            "ns1", "np", [endpoint("10.0.1.4", TEST_NODE)], [slice_port("p80", 80, proto)]
        ),
    )
    cluster_set, local_set = ipsets.NODE_PORT_SETS[Protocol(proto)]
    if proto == "SCTP":
        # hash:ip,port: one member per node IP.
        expected = {"192.168.0.2,sctp:30040", "192.168.1.2,sctp:30040"}
        match = "dst,dst"
    else:
        expected = {"30040"}
        match = "dst"
    assert members(plan, cluster_set) == expected
    assert members(plan, local_set) == expected
    lower = proto.lower()
    local_comment = plan.ipset(local_set).spec.comment
    cluster_comment = plan.ipset(cluster_set).spec.comment
    assert [r for r in nat_rules(plan) if r.startswith("-A KUBE-NODE-PORT")] == [
        f'-A KUBE-NODE-PORT -p {lower} -m comment --comment "{local_comment}"'
        f" -m set --match-set {local_set} {match} -j RETURN",
        f'-A KUBE-NODE-PORT -p {lower} -m comment --comment "{cluster_comment}"'
        f" -m set --match-set {cluster_set} {match} -j KUBE-MARK-MASQ",
    ]


# --- externalIPs and load balancers ------------------------------------------------------------


def test_external_ip_is_bound_unless_it_is_a_local_address() -> None:
    objects = (
        service(
            "ns1",
            "ext",
            "10.96.0.70",
            [port()],
            external_ips=["198.51.100.70", "192.168.0.2"],
        ),
        endpoint_slice("ns1", "ext", ["10.0.2.7"]),
    )
    plan = make_plan(*objects, local=["192.168.0.2"])
    assert vs(plan, "198.51.100.70", 80).bind
    assert not vs(plan, "192.168.0.2", 80).bind
    assert plan.bind_addresses == (ip("10.96.0.70"), ip("198.51.100.70"))
    assert members(plan, ipsets.EXTERNAL_IP) == {"198.51.100.70,tcp:80", "192.168.0.2,tcp:80"}
    assert members(plan, ipsets.EXTERNAL_IP_LOCAL) == set()
    assert reals(vs(plan, "198.51.100.70", 80)) == ["10.0.2.7:80"]


def test_external_ip_with_local_policy_goes_to_the_local_set() -> None:
    plan = make_plan(
        service("ns1", "ext", "10.96.0.70", [port()], external_ips=["198.51.100.70"], etp="Local"),
        endpoint_slice("ns1", "ext", [endpoint("10.0.1.7", TEST_NODE), endpoint("10.0.2.7", "x")]),
    )
    assert members(plan, ipsets.EXTERNAL_IP) == set()
    assert members(plan, ipsets.EXTERNAL_IP_LOCAL) == {"198.51.100.70,tcp:80"}
    assert reals(vs(plan, "198.51.100.70", 80)) == ["10.0.1.7:80"]
    assert reals(vs(plan, "10.96.0.70", 80)) == ["10.0.1.7:80", "10.0.2.7:80"]


def test_load_balancer_ip_sets_and_virtual_server() -> None:
    plan = make_plan(
        service(
            "ns1",
            "lb",
            "10.96.0.50",
            [port("p80", 80, node_port=30050)],
            type="LoadBalancer",
            lb_ingress=["192.0.2.50"],
        ),
        endpoint_slice("ns1", "lb", ["10.0.2.5"]),
    )
    lb = vs(plan, "192.0.2.50", 80)
    assert lb.kind is VirtualServerKind.LOAD_BALANCER
    assert lb.bind
    assert members(plan, ipsets.LOAD_BALANCER) == {"192.0.2.50,tcp:80"}
    assert members(plan, ipsets.LOAD_BALANCER_LOCAL) == set()
    assert members(plan, ipsets.LOAD_BALANCER_FW) == set()
    assert plan.bind_addresses == (ip("10.96.0.50"), ip("192.0.2.50"))


def test_load_balancer_ip_mode_proxy_gets_no_virtual_server() -> None:
    plan = make_plan(
        service(
            "ns1",
            "lb",
            "10.96.0.50",
            [port()],
            type="LoadBalancer",
            lb_ingress=[{"ip": "192.0.2.50", "ipMode": "Proxy"}],
        ),
        endpoint_slice("ns1", "lb", ["10.0.2.5"]),
    )
    assert keys(plan) == {"10.96.0.50:80/TCP"}
    assert members(plan, ipsets.LOAD_BALANCER) == set()


def _source_ranges_plan(ranges: list[str]) -> IpvsPlan:
    return make_plan(
        service(
            "ns1",
            "fw",
            "10.96.0.60",
            [port("p80", 80, node_port=30060)],
            type="LoadBalancer",
            lb_ingress=["192.0.2.60"],
            source_ranges=ranges,
        ),
        endpoint_slice("ns1", "fw", ["10.0.2.6"]),
    )


def test_load_balancer_source_ranges() -> None:
    plan = _source_ranges_plan(["203.0.113.0/25", "198.51.100.0/24"])
    assert members(plan, ipsets.LOAD_BALANCER_FW) == {"192.0.2.60,tcp:80"}
    assert members(plan, ipsets.LOAD_BALANCER_SOURCE_CIDR) == {
        "192.0.2.60,tcp:80,203.0.113.0/25",
        "192.0.2.60,tcp:80,198.51.100.0/24",
    }
    # The node is not in the ranges: it may not use the LB IP either (KUBE-IPVS-OUT-FILTER).
    assert members(plan, ipsets.LOAD_BALANCER_SOURCE_IP) == set()
    assert (
        "-A KUBE-IPVS-OUT-FILTER -s 192.0.2.60 -m ipvs --vaddr 192.0.2.60 --vproto tcp"
        " --vport 80 -j DROP"
    ) in filter_rules(plan)
    fw = [r for r in filter_rules(plan) if "FIREWALL" in r.split()[1]]
    assert fw == [
        '-A KUBE-PROXY-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port'
        ' for load balancer with sourceRange" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst'
        " -j KUBE-SOURCE-RANGES-FIREWALL",
        '-A KUBE-SOURCE-RANGES-FIREWALL -m comment --comment "Kubernetes service load balancer'
        ' ip + port + source cidr for packet filter purpose" -m set --match-set'
        " KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j RETURN",
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
    ]
    # NodePorts are not subject to source ranges: nothing about 30060 in the firewall sets.
    assert vs(plan, NODE_IP, 30060).real_servers


def test_load_balancer_source_range_containing_the_node_allows_the_lb_ip_as_source() -> None:
    plan = _source_ranges_plan(["192.168.0.0/16"])
    assert members(plan, ipsets.LOAD_BALANCER_SOURCE_IP) == {"192.0.2.60,tcp:80,192.0.2.60"}
    assert not any(r.startswith("-A KUBE-IPVS-OUT-FILTER") for r in filter_rules(plan))


def test_host_source_range_is_written_as_ipset_prints_it() -> None:
    plan = _source_ranges_plan(["203.0.113.7/32"])
    assert members(plan, ipsets.LOAD_BALANCER_SOURCE_CIDR) == {"192.0.2.60,tcp:80,203.0.113.7"}


def test_two_services_claiming_one_external_ip_port_first_one_wins() -> None:
    plan = make_plan(
        service("ns1", "a", "10.96.0.1", [port()], external_ips=["198.51.100.1"]),
        endpoint_slice("ns1", "a", ["10.0.2.1"]),
        service("ns1", "b", "10.96.0.2", [port()], external_ips=["198.51.100.1"]),
        endpoint_slice("ns1", "b", ["10.0.2.2"]),
    )
    assert reals(vs(plan, "198.51.100.1", 80)) == ["10.0.2.1:80"]
    assert str(vs(plan, "198.51.100.1", 80).service) == "ns1/a:p80"


# --- endpoint policy ----------------------------------------------------------------------

LOCAL_LB = (
    service(
        "ns1",
        "local",
        "10.96.0.50",
        [port("p80", 80, node_port=30050)],
        type="LoadBalancer",
        etp="Local",
        hcnp=32050,
        lb_ingress=["192.0.2.50"],
    ),
)


def test_external_traffic_policy_local_uses_local_endpoints_for_external_addresses() -> None:
    plan = make_plan(
        *LOCAL_LB,
        endpoint_slice(
            "ns1", "local", [endpoint("10.0.1.5", TEST_NODE), endpoint("10.0.2.5", "x")]
        ),
    )
    assert reals(vs(plan, "192.0.2.50", 80)) == ["10.0.1.5:80"]
    assert reals(vs(plan, NODE_IP, 30050)) == ["10.0.1.5:80"]
    # ClusterIP traffic is not affected by the external policy.
    assert reals(vs(plan, "10.96.0.50", 80)) == ["10.0.1.5:80", "10.0.2.5:80"]
    assert members(plan, ipsets.LOAD_BALANCER_LOCAL) == {"192.0.2.50,tcp:80"}
    assert members(plan, ipsets.NODE_PORT_LOCAL_TCP) == {"30050"}
    assert members(plan, ipsets.HEALTH_CHECK_NODE_PORT) == {"32050"}
    assert plan.no_local_external == frozenset()


def test_local_policy_without_local_endpoints_falls_back_to_cluster_endpoints() -> None:
    # Upstream (k8s PR 97081): local pods can still use the service; the metric counts it.
    plan = make_plan(*LOCAL_LB, endpoint_slice("ns1", "local", [endpoint("10.0.2.5", "x")]))
    assert reals(vs(plan, "192.0.2.50", 80)) == ["10.0.2.5:80"]
    assert reals(vs(plan, NODE_IP, 30050)) == ["10.0.2.5:80"]
    assert plan.no_local_external == {"ns1/local"}
    assert plan.no_local_internal == frozenset()


def test_internal_traffic_policy_local() -> None:
    objects = (
        service("ns1", "itp", "10.96.0.90", [port()], itp="Local"),
        endpoint_slice("ns1", "itp", [endpoint("10.0.1.9", TEST_NODE), endpoint("10.0.2.9", "x")]),
    )
    assert reals(vs(make_plan(*objects), "10.96.0.90", 80)) == ["10.0.1.9:80"]
    remote_only = make_plan(objects[0], endpoint_slice("ns1", "itp", [endpoint("10.0.2.9", "x")]))
    # Not externally accessible: the cluster endpoints are not even computed, so nothing.
    assert vs(remote_only, "10.96.0.90", 80).real_servers == ()
    assert remote_only.no_local_internal == {"ns1/itp"}


def test_terminating_endpoints_are_used_when_none_is_ready() -> None:
    plan = make_plan(
        service("ns1", "rolling", "10.96.0.100", [port()]),
        endpoint_slice(
            "ns1",
            "rolling",
            [
                endpoint("10.0.2.1", "x", ready=False, serving=True, terminating=True),
                endpoint("10.0.2.2", "x", ready=False, serving=False, terminating=True),
            ],
        ),
    )
    assert reals(vs(plan, "10.96.0.100", 80)) == ["10.0.2.1:80"]


def test_ready_endpoints_win_over_terminating_ones() -> None:
    plan = make_plan(
        service("ns1", "rolling", "10.96.0.100", [port()]),
        endpoint_slice(
            "ns1",
            "rolling",
            [
                endpoint("10.0.2.1", "x", ready=False, serving=True, terminating=True),
                endpoint("10.0.2.3", "x"),
            ],
        ),
    )
    assert reals(vs(plan, "10.96.0.100", 80)) == ["10.0.2.3:80"]


def test_topology_zone_hints_narrow_cluster_endpoints() -> None:
    config = ProxierConfig(
        family=IPFamily.IPv4, node_name=TEST_NODE, node_ips=(ip(NODE_IP),), zone="zone-a"
    )
    plan = make_plan(
        service("ns1", "topo", "10.96.0.110", [port()]),
        endpoint_slice(
            "ns1",
            "topo",
            [
                endpoint("10.0.1.1", "n1", zones=["zone-a"]),
                endpoint("10.0.2.1", "n2", zones=["zone-b"]),
            ],
        ),
        node(TEST_NODE, **{"topology.kubernetes.io/zone": "zone-a"}),
        config=config,
    )
    assert reals(vs(plan, "10.96.0.110", 80)) == ["10.0.1.1:80"]


# --- iptables rules -------------------------------------------------------------------------


def test_cluster_ip_masquerade_rule_variants() -> None:
    comment = '-m comment --comment "Kubernetes service cluster ip + port for masquerade purpose"'
    prefix = f"-A KUBE-SERVICES {comment} -m set --match-set KUBE-CLUSTER-IP"
    detector = make_plan(*WEB)
    assert f"{prefix} dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ" in nat_rules(detector)
    config_all = ProxierConfig(
        family=IPFamily.IPv4, node_name=TEST_NODE, node_ips=(ip(NODE_IP),), masquerade_all=True
    )
    assert f"{prefix} dst,dst -j KUBE-MARK-MASQ" in nat_rules(make_plan(*WEB, config=config_all))
    config_none = ProxierConfig(family=IPFamily.IPv4, node_name=TEST_NODE, node_ips=(ip(NODE_IP),))
    assert f"{prefix} src,dst -j KUBE-MARK-MASQ" in nat_rules(make_plan(*WEB, config=config_none))


def test_rules_matching_empty_sets_are_not_written() -> None:
    plan = make_plan(*WEB)
    nat = nat_rules(plan)
    assert not any("--match-set KUBE-LOAD-BALANCER" in r or "KUBE-NODE-PORT-" in r for r in nat)
    assert not any("KUBE-EXTERNAL-IP" in r for r in nat)
    # The fixed ones are always there, in upstream's order.
    assert nat[0] == "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN"
    assert "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT" in nat
    assert "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ" in nat
    assert nat[-1] == "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"
    filt = filter_rules(plan)
    assert filt[-1] == (
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst"
        " -j REJECT"
    )
    # ipvs mode never had iptables mode's ctstate INVALID drop.
    assert not any("INVALID" in r for r in filt)


def test_hairpin_masquerade_comes_first_in_postrouting() -> None:
    postrouting = [r for r in nat_rules(make_plan(*WEB)) if r.startswith("-A KUBE-POSTROUTING")]
    assert postrouting == [
        '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip'
        ' for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src'
        " -j MASQUERADE",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully",
    ]


def test_external_ip_rules() -> None:
    plan = make_plan(
        service("ns1", "ext", "10.96.0.70", [port()], external_ips=["198.51.100.70"]),
        endpoint_slice("ns1", "ext", ["10.0.2.7"]),
    )
    ext = [r for r in nat_rules(plan) if "KUBE-EXTERNAL-IP " in r]
    match = (
        '-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for'
        ' masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst'
    )
    assert ext == [
        f"{match} -j KUBE-MARK-MASQ",
        f"{match} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
        f"{match} -m addrtype --dst-type LOCAL -j ACCEPT",
    ]


def test_document_declares_every_chain_and_hooks() -> None:
    plan = make_plan(*WEB)
    doc = plan.rules.document(hooks=ipvs_jump_rules(CONFIG), canary=True)
    assert doc.startswith("*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n*nat\n")
    for chain in ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER"):
        assert f":{chain} - [0:0]\n" in doc
    for chain in ("KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-IPVS-FILTER"):
        assert f":{chain} - [0:0]\n" in doc
    assert (
        '-I INPUT 1 -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER' in doc
    )
    assert doc.endswith("COMMIT\n")
    # Every jump target exists (a chain of ours, or a built-in target).
    declared = {line[1:].split()[0] for line in doc.splitlines() if line.startswith(":")}
    builtin = {"RETURN", "ACCEPT", "DROP", "REJECT", "MASQUERADE", "MARK"}
    for line in doc.splitlines():
        if " -j " in line:
            target = line.split(" -j ")[1].split()[0]
            assert target in declared | builtin, line


# --- IPv6 -----------------------------------------------------------------------------------


def test_ipv6_sets_are_renamed_and_truncated() -> None:
    plan = make_plan(
        service("ns1", "web", "fd00:96::10", [port("http", 80)]),
        endpoint_slice(
            "ns1", "web", ["fd00:10::1"], [slice_port("http", 8080)], address_type="IPv6"
        ),
        config=CONFIG6,
    )
    names = [s.spec.name for s in plan.ipsets]
    assert all(n.startswith("KUBE-6-") and len(n) <= 31 for n in names)
    assert "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS" in names  # upstream's 31-character cut
    assert members(plan, ipsets.CLUSTER_IP) == {"fd00:96::10,tcp:80"}
    assert plan.ipset(ipsets.CLUSTER_IP).spec.create_line == (
        "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536 comment"
    )
    assert nat_rules(plan)[0] == "-A KUBE-SERVICES -s ::1/128 -j RETURN"
    assert "--match-set KUBE-6-CLUSTER-IP dst,dst ! -s fd00:10::/64" in plan.rules.nat_text
    assert plan.bind_addresses == (ip("fd00:96::10"),)


def test_the_other_familys_addresses_are_ignored() -> None:
    plan = make_plan(
        service("ns1", "dual", ["10.96.0.5", "fd00:96::5"], [port()]),
        endpoint_slice("ns1", "dual", ["10.0.1.5"], name="v4"),
        endpoint_slice("ns1", "dual", ["fd00:10::5"], name="v6", address_type="IPv6"),
        config=CONFIG6,
    )
    assert keys(plan) == {"[fd00:96::5]:80/TCP"}
    assert reals(vs(plan, "fd00:96::5", 80)) == ["[fd00:10::5]:80"]


def _addresses(plan: IpvsPlan) -> list[IPAddress]:
    return list(plan.bind_addresses)


def test_output_is_sorted_and_deterministic() -> None:
    objects = [*WEB, *NODEPORT]
    first = make_plan(*objects)
    second = make_plan(*reversed(objects))
    assert first == second
    sort_keys = [v.key.sort_key for v in first.virtual_servers]
    assert sort_keys == sorted(sort_keys)
    assert _addresses(first) == sorted(_addresses(first), key=int)
