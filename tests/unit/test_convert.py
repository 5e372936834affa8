"""API objects → model, and what happens to bad input.

Spec: reference/kube-proxy.md §a rows 3, 3b, 9, 11, 17, 34 and §e "Endpoint semantics"; the
issue's "Bad input" paragraph: an object with a missing or invalid field is skipped and reported
as an InvalidObject naming kind, namespace/name and field; every other object is still used;
nothing a user can put in a name can reach the iptables-restore input.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from support import (
    endpoint,
    endpoint_slice,
    node,
    port,
    render,
    sections,
    service,
    slice_port,
)

from pyproxy.cli import main
from pyproxy.convert import (
    endpoint_slice_from_api,
    node_from_api,
    service_from_api,
    state_from_objects,
)
from pyproxy.errors import InvalidObject, StateFileError
from pyproxy.iptables.tracer import parse_ruleset
from pyproxy.model import (
    IPFamily,
    LoadBalancerIngress,
    LoadBalancerIPMode,
    NamespacedName,
    Protocol,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)
from pyproxy.sources.statefile import load_state, read_objects

ip = ipaddress.ip_address
net = ipaddress.ip_network


# --- Services -------------------------------------------------------------------------------


def test_cluster_ip_service() -> None:
    svc = service_from_api(
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            [port("p80", 80), port("dns", 53, "UDP"), port("sctp", 9, "SCTP")],
        )
    )
    assert svc is not None
    assert svc.namespaced_name == NamespacedName("ns1", "svc1")
    assert svc.type is ServiceType.CLUSTER_IP
    assert svc.cluster_ips == (ip("172.30.0.41"),)
    assert svc.ports == (
        ServicePort("p80", Protocol.TCP, 80),
        ServicePort("dns", Protocol.UDP, 53),
        ServicePort("sctp", Protocol.SCTP, 9),
    )
    assert svc.session_affinity_timeout is None
    assert svc.external_traffic_policy is TrafficPolicy.CLUSTER
    assert svc.internal_traffic_policy is TrafficPolicy.CLUSTER
    assert not svc.externally_accessible


def test_protocol_defaults_to_tcp_and_target_port_is_not_read() -> None:
    obj = service("ns1", "svc1", "172.30.0.41")
    obj["spec"]["ports"] = [{"name": "", "port": 80, "targetPort": "http"}]
    svc = service_from_api(obj)
    assert svc is not None
    assert svc.ports == (ServicePort("", Protocol.TCP, 80),)


def test_cluster_ip_without_cluster_ips_list() -> None:
    obj = service("ns1", "svc1", "172.30.0.41")
    del obj["spec"]["clusterIPs"]
    svc = service_from_api(obj)
    assert svc is not None
    assert svc.cluster_ips == (ip("172.30.0.41"),)


def test_dual_stack_service() -> None:
    svc = service_from_api(service("ns1", "svc1", ["fd00:172:30::41", "172.30.0.41"]))
    assert svc is not None
    assert svc.cluster_ips == (ip("fd00:172:30::41"), ip("172.30.0.41"))


def test_load_balancer_service_fields() -> None:
    svc = service_from_api(
        service(
            "ns2",
            "svc2",
            "172.30.0.42",
            [port("p80", 80, node_port=3001)],
            type="LoadBalancer",
            etp="Local",
            itp="Local",
            hcnp=30000,
            external_ips=["192.168.99.22"],
            lb_ingress=[
                "1.2.3.4",
                {"ip": "5.6.7.8", "ipMode": "Proxy"},
                {"ip": "5.6.7.9", "ipMode": "VIP"},
                {"hostname": "lb.example.com"},
            ],
            source_ranges=[" 203.0.113.0/25", "192.168.0.0/24 "],
            trafficDistribution="PreferClose",
        )
    )
    assert svc is not None
    assert svc.type is ServiceType.LOAD_BALANCER
    assert svc.ports == (ServicePort("p80", Protocol.TCP, 80, node_port=3001),)
    assert svc.external_ips == (ip("192.168.99.22"),)
    # hostname-only ingress has nothing to program.
    assert svc.load_balancer_ingress == (
        LoadBalancerIngress(ip("1.2.3.4"), LoadBalancerIPMode.VIP),
        LoadBalancerIngress(ip("5.6.7.8"), LoadBalancerIPMode.PROXY),
        LoadBalancerIngress(ip("5.6.7.9"), LoadBalancerIPMode.VIP),
    )
    # Whitespace around source ranges is trimmed (upstream TestLoadBalancer regression case).
    assert svc.load_balancer_source_ranges == (net("203.0.113.0/25"), net("192.168.0.0/24"))
    assert svc.external_traffic_policy is TrafficPolicy.LOCAL
    assert svc.internal_traffic_policy is TrafficPolicy.LOCAL
    assert svc.health_check_node_port == 30000
    assert svc.externally_accessible
    assert svc.external_policy_local
    assert svc.needs_health_check
    assert svc.traffic_distribution == "PreferClose"


def test_external_traffic_policy_needs_external_access() -> None:
    """ExternalPolicyLocal is false for a ClusterIP Service without externalIPs."""
    svc = service_from_api(service("ns1", "svc1", "172.30.0.41", etp="Local"))
    assert svc is not None
    assert not svc.external_policy_local
    with_ext = service_from_api(
        service("ns1", "svc1", "172.30.0.41", etp="Local", external_ips=["192.168.99.22"])
    )
    assert with_ext is not None
    assert with_ext.external_policy_local
    # Only LoadBalancer Services get a health-check node port.
    nodeport = service_from_api(
        service("ns1", "svc1", "172.30.0.41", type="NodePort", etp="Local", hcnp=30000)
    )
    assert nodeport is not None
    assert nodeport.external_policy_local
    assert not nodeport.needs_health_check


def test_session_affinity_default_and_explicit_timeout() -> None:
    default = service_from_api(service("ns1", "svc1", "172.30.0.41", affinity=True))
    assert default is not None
    assert default.session_affinity_timeout == 10800
    explicit = service_from_api(service("ns1", "svc1", "172.30.0.41", affinity_timeout=300))
    assert explicit is not None
    assert explicit.session_affinity_timeout == 300
    none = service("ns1", "svc1", "172.30.0.41")
    none["spec"]["sessionAffinity"] = "None"
    svc = service_from_api(none)
    assert svc is not None
    assert svc.session_affinity_timeout is None


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(service("ns", "headless", "None"), id="headless"),
        pytest.param(service("ns", "unallocated", ""), id="no-cluster-ip"),
        pytest.param(
            service("ns", "ext", "172.30.55.4", type="ExternalName", externalName="foo.bar.com"),
            id="external-name-with-cluster-ip",
        ),
        pytest.param(
            service(
                "ns",
                "other",
                "172.30.0.9",
                labels={"service.kubernetes.io/service-proxy-name": "some-other-proxy"},
            ),
            id="service-proxy-name-label",
        ),
        pytest.param(
            service(
                "ns", "other", "172.30.0.9", labels={"service.kubernetes.io/service-proxy-name": ""}
            ),
            id="service-proxy-name-label-empty-value",
        ),
    ],
)
def test_ignored_services(obj: dict[str, Any]) -> None:
    assert service_from_api(obj) is None


def test_headless_service_without_cluster_ips_field() -> None:
    obj = service("ns", "headless", "None")
    del obj["spec"]["clusterIPs"]
    assert service_from_api(obj) is None


# --- EndpointSlices -------------------------------------------------------------------------


def test_endpoint_slice() -> None:
    obj = endpoint_slice(
        "ns1",
        "svc1",
        [
            endpoint("10.180.0.1", "test-node", zone="zone-a", zones=["zone-a"]),
            {"addresses": ["10.180.0.2", "10.180.0.99"]},  # only addresses[0] is used
            endpoint("10.180.0.3", "node-2", ready=False, serving=True, terminating=True),
            endpoint("10.180.0.4", nodes=["test-node"]),
        ],
        [slice_port("p80", 8080), slice_port("dns", 53, "UDP")],
        name="svc1-abcde",
    )
    obj["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2024-01-01T00:00:00Z"
    }
    es = endpoint_slice_from_api(obj)
    assert es is not None
    assert es.name == "svc1-abcde"
    assert es.service == NamespacedName("ns1", "svc1")
    assert es.address_type is IPFamily.IPv4
    assert [(p.name, p.protocol, p.port) for p in es.ports] == [
        ("p80", Protocol.TCP, 8080),
        ("dns", Protocol.UDP, 53),
    ]
    e1, e2, e3, e4 = es.endpoints
    assert e1.address == ip("10.180.0.1")
    assert e1.node_name == "test-node"
    assert e1.zone == "zone-a"
    assert e1.zone_hints == frozenset({"zone-a"})
    assert e2.address == ip("10.180.0.2")
    assert e2.node_name is None
    # Condition defaults: ready = nil or true; serving = nil or true; terminating = true only.
    assert (e1.ready, e1.serving, e1.terminating) == (True, True, False)
    assert (e3.ready, e3.serving, e3.terminating) == (False, True, True)
    assert e4.node_hints == frozenset({"test-node"})
    assert es.last_change_trigger_time == 1704067200.0


def test_endpoint_slice_port_without_name_or_number_is_ignored() -> None:
    obj = endpoint_slice("ns1", "svc1", ["10.180.0.1"])
    obj["ports"] = [
        {"port": 80, "protocol": "TCP"},
        {"name": "p", "protocol": "TCP"},
        {"name": "zero", "port": 0, "protocol": "TCP"},
        slice_port(),
    ]
    es = endpoint_slice_from_api(obj)
    assert es is not None
    assert [(p.name, p.port) for p in es.ports] == [("p80", 80)]


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(
            endpoint_slice(
                "ns", "svc", ["10.0.0.1"], labels={"service.kubernetes.io/headless": ""}
            ),
            id="headless-label",
        ),
        pytest.param(
            endpoint_slice(
                "ns",
                "svc",
                ["10.0.0.1"],
                labels={"service.kubernetes.io/service-proxy-name": "other"},
            ),
            id="service-proxy-name-label",
        ),
        pytest.param(
            endpoint_slice("ns", "svc", [{"addresses": ["a.example.com"]}], address_type="FQDN"),
            id="fqdn",
        ),
    ],
)
def test_ignored_endpoint_slices(obj: dict[str, Any]) -> None:
    assert endpoint_slice_from_api(obj) is None


def test_endpoint_of_the_other_family_is_dropped_and_reported() -> None:
    """Upstream skips (and reports) an endpoint whose address is not of the slice's family."""
    obj = endpoint_slice(
        "ns1", "svc1", ["10.180.0.1", "fd00:10:180::2", "10.180.0.3"], name="svc1-x"
    )
    problems: list[InvalidObject] = []
    es = endpoint_slice_from_api(obj, problems)
    assert es is not None
    assert [str(e.address) for e in es.endpoints] == ["10.180.0.1", "10.180.0.3"]
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.kind, problem.namespace, problem.name) == ("EndpointSlice", "ns1", "svc1-x")
    assert problem.field == "endpoints[1].addresses[0]"


def test_ipv6_slice_with_ipv4_address_is_dropped_and_reported() -> None:
    obj = endpoint_slice("ns1", "svc1", ["10.180.0.1"], address_type="IPv6")
    problems: list[InvalidObject] = []
    es = endpoint_slice_from_api(obj, problems)
    assert es is not None
    assert es.endpoints == ()
    assert [p.field for p in problems] == ["endpoints[0].addresses[0]"]


# --- Nodes ----------------------------------------------------------------------------------


def test_node() -> None:
    obj = node("test-node", ["192.168.0.2"], **{"topology.kubernetes.io/zone": "zone-a"})
    obj["status"]["addresses"] = [
        {"type": "Hostname", "address": "test-node"},
        {"type": "ExternalIP", "address": "203.0.113.9"},
        {"type": "InternalIP", "address": "192.168.0.2"},
        {"type": "InternalIP", "address": "2001:db8::1"},
    ]
    n = node_from_api(obj)
    assert n.name == "test-node"
    # InternalIP first, then ExternalIP, as kube-proxy orders them.
    assert n.addresses == (ip("192.168.0.2"), ip("2001:db8::1"), ip("203.0.113.9"))
    assert n.zone == "zone-a"
    assert not n.being_deleted


def test_node_being_deleted() -> None:
    deleting = node()
    deleting["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert node_from_api(deleting).being_deleted
    tainted = node()
    tainted["spec"] = {
        "taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]
    }
    assert node_from_api(tainted).being_deleted


# --- leading zeros (upstream TestBadIPs) ----------------------------------------------------


def test_leading_zero_ips_are_normalised() -> None:
    svc = service_from_api(
        service(
            "ns1",
            "svc1",
            "172.30.0.041",
            [port("p80", 80, node_port=3001)],
            type="LoadBalancer",
            lb_ingress=["1.2.3.004"],
            external_ips=["192.168.099.022"],
            source_ranges=["203.0.113.000/025"],
        )
    )
    assert svc is not None
    assert svc.cluster_ips == (ip("172.30.0.41"),)
    assert svc.external_ips == (ip("192.168.99.22"),)
    assert svc.load_balancer_ingress[0].ip == ip("1.2.3.4")
    assert svc.load_balancer_source_ranges == (net("203.0.113.0/25"),)
    es = endpoint_slice_from_api(endpoint_slice("ns1", "svc1", ["10.180.00.001"]))
    assert es is not None
    assert es.endpoints[0].address == ip("10.180.0.1")


def test_leading_zero_ips_are_normalised_in_the_rules() -> None:
    """The whole of upstream's TestBadIPs: the restore input only has normalised addresses."""
    out = render(
        [
            service(
                "ns1",
                "svc1",
                "172.30.0.041",
                [port("p80", 80, node_port=3001)],
                type="LoadBalancer",
                lb_ingress=["1.2.3.004"],
                external_ips=["192.168.099.022"],
                source_ranges=["203.0.113.000/025"],
            ),
            endpoint_slice("ns1", "svc1", ["10.180.00.001"]),
        ]
    )
    text = sections(out)["IPv4"]
    for normalised in (
        "-d 172.30.0.41 ",
        "-d 192.168.99.22 ",
        "-d 1.2.3.4 ",
        "-s 203.0.113.0/25 ",
        "-s 10.180.0.1 ",
        "--to-destination 10.180.0.1:80",
    ):
        assert normalised in text
    for bad in ("041", "099", "022", "004", "000/025", "00.001"):
        assert bad not in text
    assert "KUBE-SEP-SXIVWICOYRO3J4NJ" in text  # hashed from the normalised endpoint


# --- invalid objects ------------------------------------------------------------------------


def _svc(cluster_ip: str = "172.30.0.99", **kw: Any) -> dict[str, Any]:
    return service("ns1", "bad", cluster_ip, **kw)


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of obj with the dotted path (list indices as numbers) set to value."""
    out = copy.deepcopy(obj)
    cur: Any = out
    parts = path.split(".")
    for part in parts[:-1]:
        cur = cur[int(part)] if part.isdigit() else cur.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        cur[int(last)] = value
    else:
        cur[last] = value
    return out


INVALID_SERVICES = [
    # (id, object, field)
    ("bad-cluster-ip", _svc(cluster_ip="172.30.0.300"), "spec.clusterIPs[0]"),
    ("bad-cluster-ip-text", service("ns1", "bad", "not-an-ip"), "spec.clusterIPs[0]"),
    (
        "two-ipv4-cluster-ips",
        service("ns1", "bad", ["172.30.0.1", "172.30.0.2"]),
        "spec.clusterIPs",
    ),
    ("bad-external-ip", _svc(external_ips=["192.168.99.256"]), "spec.externalIPs[0]"),
    (
        "bad-lb-ingress-ip",
        _svc(type="LoadBalancer", lb_ingress=["1.2.3.4.5"]),
        "status.loadBalancer.ingress[0].ip",
    ),
    (
        "bad-lb-ip-mode",
        _svc(type="LoadBalancer", lb_ingress=[{"ip": "1.2.3.4", "ipMode": "Tunnel"}]),
        "status.loadBalancer.ingress[0].ipMode",
    ),
    ("port-zero", _svc(ports=[port("p", 0)]), "spec.ports[0].port"),
    ("port-too-big", _svc(ports=[port("p", 65536)]), "spec.ports[0].port"),
    ("port-negative", _svc(ports=[port("p", -1)]), "spec.ports[0].port"),
    ("port-not-a-number", _svc(ports=[port("p", "80")]), "spec.ports[0].port"),  # type: ignore[arg-type]
    ("port-missing", _svc(ports=[{"name": "p", "protocol": "TCP"}]), "spec.ports[0].port"),
    ("node-port-too-big", _svc(ports=[port("p", 80, node_port=70000)]), "spec.ports[0].nodePort"),
    ("unknown-protocol", _svc(ports=[port("p", 80, "ICMP")]), "spec.ports[0].protocol"),
    ("lowercase-protocol", _svc(ports=[port("p", 80, "tcp")]), "spec.ports[0].protocol"),
    (
        "duplicate-port-names",
        _svc(ports=[port("p", 80), port("p", 81)]),
        "spec.ports[1].name",
    ),
    (
        "missing-port-name-multi-port",
        _svc(ports=[port("a", 80), port("", 81)]),
        "spec.ports[1].name",
    ),
    ("port-name-with-quote", _svc(ports=[port('p"80', 80)]), "spec.ports[0].name"),
    ("port-name-with-space", _svc(ports=[port("p 80", 80)]), "spec.ports[0].name"),
    ("port-name-with-newline", _svc(ports=[port("p\n80", 80)]), "spec.ports[0].name"),
    ("port-name-uppercase", _svc(ports=[port("P80", 80)]), "spec.ports[0].name"),
    ("name-with-quote", service("ns1", 'svc"1', "172.30.0.99"), "metadata.name"),
    ("name-with-space", service("ns1", "svc 1", "172.30.0.99"), "metadata.name"),
    (
        "name-with-newline",
        service("ns1", "svc\n-A INPUT -j ACCEPT", "172.30.0.99"),
        "metadata.name",
    ),
    ("name-missing", _with(_svc(), "metadata.name", None), "metadata.name"),
    ("namespace-with-quote", service('ns"1', "svc1", "172.30.0.99"), "metadata.namespace"),
    ("namespace-with-slash", service("ns/1", "svc1", "172.30.0.99"), "metadata.namespace"),
    ("unknown-type", _svc(type="Magic"), "spec.type"),
    ("unknown-etp", _svc(etp="Nearby"), "spec.externalTrafficPolicy"),
    ("unknown-itp", _svc(itp="Nearby"), "spec.internalTrafficPolicy"),
    ("unknown-affinity", _with(_svc(), "spec.sessionAffinity", "Cookie"), "spec.sessionAffinity"),
    (
        "affinity-timeout-zero",
        _svc(affinity_timeout=0),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
    ),
    (
        "affinity-timeout-too-long",
        _svc(affinity_timeout=86401),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
    ),
    (
        "affinity-timeout-not-a-number",
        _with(
            _svc(affinity_timeout=10), "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "1h"
        ),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
    ),
    ("hcnp-too-big", _svc(hcnp=65536), "spec.healthCheckNodePort"),
    ("ports-not-a-list", _with(_svc(), "spec.ports", "80"), "spec.ports"),
]


@pytest.mark.parametrize(
    ("obj", "field"), [pytest.param(o, f, id=i) for i, o, f in INVALID_SERVICES]
)
def test_invalid_service_names_kind_object_and_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as info:
        service_from_api(obj)
    problem = info.value
    assert problem.kind == "Service"
    assert problem.field == field
    meta = obj["metadata"]
    assert problem.namespace == meta["namespace"]
    assert problem.name == (meta["name"] or "")
    # The message names all three, for the warning log line.
    assert "Service" in str(problem)
    assert field in str(problem)


def _es(**kw: Any) -> dict[str, Any]:
    return endpoint_slice("ns1", "svc1", ["10.180.0.1"], name="svc1-bad", **kw)


INVALID_SLICES = [
    ("unknown-address-type", _es(address_type="IPv5"), "addressType"),
    (
        "missing-service-name-label",
        _with(_es(), "metadata.labels", {}),
        "metadata.labels[kubernetes.io/service-name]",
    ),
    (
        "service-name-label-with-quote",
        _with(_es(), "metadata.labels", {"kubernetes.io/service-name": 'svc"1'}),
        "metadata.labels[kubernetes.io/service-name]",
    ),
    ("name-with-newline", _with(_es(), "metadata.name", "svc1\nCOMMIT"), "metadata.name"),
    ("namespace-with-space", _with(_es(), "metadata.namespace", "ns 1"), "metadata.namespace"),
    ("port-name-with-quote", _es(ports=[slice_port('p"80')]), "ports[0].name"),
    ("port-out-of-range", _es(ports=[slice_port("p80", 65536)]), "ports[0].port"),
    ("port-unknown-protocol", _es(ports=[slice_port("p80", 80, "GRE")]), "ports[0].protocol"),
    (
        "duplicate-port-names",
        _es(ports=[slice_port("p80", 80), slice_port("p80", 81)]),
        "ports[1].name",
    ),
    (
        "condition-not-a-bool",
        _with(_es(), "endpoints", [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]),
        "endpoints[0].conditions.ready",
    ),
]


@pytest.mark.parametrize(("obj", "field"), [pytest.param(o, f, id=i) for i, o, f in INVALID_SLICES])
def test_invalid_endpoint_slice_names_kind_object_and_field(
    obj: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidObject) as info:
        endpoint_slice_from_api(obj)
    problem = info.value
    assert problem.kind == "EndpointSlice"
    assert problem.field == field
    assert problem.namespace == obj["metadata"]["namespace"]
    assert problem.name == obj["metadata"]["name"]


def test_bad_endpoint_address_is_reported_per_endpoint() -> None:
    obj = endpoint_slice("ns1", "svc1", ["10.180.0.1", "10.180.0.999", "10.180.0.3"])
    obj["endpoints"].append({"addresses": []})
    problems: list[InvalidObject] = []
    es = endpoint_slice_from_api(obj, problems)
    assert es is not None
    assert [str(e.address) for e in es.endpoints] == ["10.180.0.1", "10.180.0.3"]
    assert [p.field for p in problems] == ["endpoints[1].addresses[0]", "endpoints[3].addresses"]


def test_invalid_node() -> None:
    with pytest.raises(InvalidObject) as info:
        node_from_api(node('test"node'))
    assert (info.value.kind, info.value.field) == ("Node", "metadata.name")
    bad_ip = node("test-node", ["192.168.0.256"])
    with pytest.raises(InvalidObject) as info:
        node_from_api(bad_ip)
    assert info.value.field == "status.addresses[0].address"


def test_invalid_source_range_is_ignored_like_upstream() -> None:
    """reference §a row 8: loadBalancerSourceRanges are "whitespace trimmed, invalid ignored".

    Upstream (MapCIDRsByIPFamily) drops a range it cannot parse and keeps the Service with the
    remaining ranges; it does not drop the whole Service.
    """
    svc = service_from_api(
        service(
            "ns1",
            "svc1",
            "172.30.0.41",
            type="LoadBalancer",
            lb_ingress=["1.2.3.4"],
            source_ranges=[" 203.0.113.0/25", "not-a-cidr", "10.0.0.0/33"],
        )
    )
    assert svc is not None
    assert svc.load_balancer_source_ranges == (net("203.0.113.0/25"),)


def test_invalid_objects_do_not_affect_others() -> None:
    good_svc = service("ns1", "good", "172.30.0.41")
    good_es = endpoint_slice("ns1", "good", ["10.180.0.1"])
    bad_svc = service("ns1", "bad", "172.30.0.300")
    bad_es = endpoint_slice("ns1", "bad", ["10.180.0.2"], ports=[slice_port("p80", 65536)])
    bad_node = node('other"node')
    good_node = node("test-node", ["192.168.0.2"])
    cluster, problems = state_from_objects(
        [bad_svc, good_svc, bad_es, good_es, bad_node, good_node, {"kind": "ConfigMap"}]
    )
    assert set(cluster.services) == {NamespacedName("ns1", "good")}
    assert set(cluster.endpoint_slices) == {NamespacedName("ns1", "good-1")}
    assert set(cluster.nodes) == {"test-node"}
    assert [(p.kind, p.namespace, p.name, p.field) for p in problems] == [
        ("Service", "ns1", "bad", "spec.clusterIPs[0]"),
        ("EndpointSlice", "ns1", "bad-1", "ports[0].port"),
        ("Node", "", 'other"node', "metadata.name"),
    ]


def test_ignored_objects_are_not_problems() -> None:
    objects = [
        service("ns", "headless", "None"),
        service("ns", "ext", "172.30.55.4", type="ExternalName", externalName="x.example.com"),
        service(
            "ns",
            "other",
            "172.30.0.9",
            labels={"service.kubernetes.io/service-proxy-name": "foo"},
        ),
        endpoint_slice(
            "ns", "headless", ["10.0.0.1"], labels={"service.kubernetes.io/headless": ""}
        ),
        endpoint_slice(
            "ns", "other", ["10.0.0.2"], labels={"service.kubernetes.io/service-proxy-name": "foo"}
        ),
    ]
    cluster, problems = state_from_objects(objects)
    assert problems == []
    assert cluster.services == {}
    assert cluster.endpoint_slices == {}
    out = render(objects)
    assert "KUBE-SVC-" not in out
    assert "ns/" not in out


# --- injection ------------------------------------------------------------------------------

_hostile = st.text(
    alphabet=st.sampled_from(list("abz09-.\"' \n\t\\/:;#*-_AZ\r\x00")), min_size=1, max_size=12
)


@given(namespace=_hostile, name=_hostile, port_name=_hostile, slice_name=_hostile)
def test_nothing_in_a_name_reaches_the_rules_unvalidated(
    namespace: str, name: str, port_name: str, slice_name: str
) -> None:
    """Every name either is a valid DNS label/subdomain (and renders to parseable rules whose
    comments are exactly `ns/name:port`), or makes its object invalid and absent."""
    objects = [
        service(
            namespace, name, "172.30.0.41", [port(port_name, 80, node_port=30080)], type="NodePort"
        ),
        endpoint_slice(
            namespace, name, ["10.180.0.1"], [slice_port(port_name, 80)], name=slice_name
        ),
    ]
    cluster, problems = state_from_objects(objects)
    out = render([o for o in objects if _is_valid(o)])
    for family_text in sections(out).values():
        ruleset = parse_ruleset(family_text)  # structurally valid restore input
        assert ruleset.table("nat") is not None
        for line in family_text.splitlines():
            assert "\r" not in line
            assert "\x00" not in line
            if "--comment" in line:
                assert line.count('"') % 2 == 0, line
    if cluster.services:
        spn = f"{namespace}/{name}:{port_name}" if port_name else f"{namespace}/{name}"
        assert f'"{spn} ' in out
    else:
        assert problems


def _is_valid(obj: dict[str, Any]) -> bool:
    _, problems = state_from_objects([obj])
    return not problems


# --- state files ----------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "state.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_kubectl_list(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        apiVersion: v1
        kind: List
        metadata: {resourceVersion: ""}
        items:
        - apiVersion: v1
          kind: Service
          metadata: {name: svc1, namespace: ns1}
          spec: {clusterIP: 172.30.0.41, ports: [{name: p80, port: 80, protocol: TCP}]}
        - apiVersion: discovery.k8s.io/v1
          kind: EndpointSlice
          metadata: {name: svc1-abc, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
          addressType: IPv4
          endpoints: [{addresses: [10.180.0.1], conditions: {ready: true}}]
          ports: [{name: p80, port: 80, protocol: TCP}]
        - apiVersion: v1
          kind: Node
          metadata: {name: test-node}
          status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
        """,
    )
    cluster, problems = load_state(path)
    assert problems == []
    assert set(cluster.services) == {NamespacedName("ns1", "svc1")}
    assert set(cluster.endpoint_slices) == {NamespacedName("ns1", "svc1-abc")}
    assert set(cluster.nodes) == {"test-node"}


def test_typed_lists_without_item_kinds(tmp_path: Path) -> None:
    """`kubectl get services -o yaml` prints a ServiceList whose items have no `kind`."""
    path = _write(
        tmp_path,
        """\
        apiVersion: v1
        kind: ServiceList
        items:
        - metadata: {name: svc1, namespace: ns1}
          spec: {clusterIP: 172.30.0.41, ports: [{name: p80, port: 80}]}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSliceList
        items:
        - metadata: {name: svc1-abc, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
          addressType: IPv4
          endpoints: [{addresses: [10.180.0.1]}]
          ports: [{name: p80, port: 80, protocol: TCP}]
        ---
        apiVersion: v1
        kind: NodeList
        items:
        - metadata: {name: test-node}
        """,
    )
    objects = read_objects(path)
    assert [o["kind"] for o in objects] == ["Service", "EndpointSlice", "Node"]
    cluster, problems = load_state(path)
    assert problems == []
    assert len(cluster.services) == len(cluster.endpoint_slices) == len(cluster.nodes) == 1


def test_multi_document_yaml_and_json(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: svc1, namespace: ns1}
        spec: {clusterIP: 172.30.0.41, ports: [{name: p80, port: 80}]}
        ---
        # an empty document is fine
        ---
        apiVersion: v1
        kind: List
        items:
        - apiVersion: v1
          kind: Service
          metadata: {name: svc2, namespace: ns1}
          spec: {clusterIP: 172.30.0.42, ports: [{name: p80, port: 80}]}
        """,
    )
    cluster, problems = load_state(path)
    assert problems == []
    assert set(cluster.services) == {NamespacedName("ns1", "svc1"), NamespacedName("ns1", "svc2")}
    json_path = _write(
        tmp_path,
        '{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Service",'
        ' "metadata": {"name": "svc1", "namespace": "ns1"},'
        ' "spec": {"clusterIP": "172.30.0.41", "ports": [{"port": 80}]}}]}',
        "state.json",
    )
    cluster, problems = load_state(json_path)
    assert problems == []
    assert set(cluster.services) == {NamespacedName("ns1", "svc1")}


def test_invalid_objects_in_a_file_are_reported_not_fatal(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        kind: List
        items:
        - {kind: Service, metadata: {name: bad, namespace: ns1}, spec: {clusterIP: 1.2.3}}
        - kind: Service
          metadata: {name: good, namespace: ns1}
          spec: {clusterIP: 172.30.0.41, ports: [{port: 80}]}
        """,
    )
    cluster, problems = load_state(path)
    assert set(cluster.services) == {NamespacedName("ns1", "good")}
    assert [(p.kind, p.name, p.field) for p in problems] == [
        ("Service", "bad", "spec.clusterIPs[0]")
    ]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"kind: List\nitems: [\n", id="unterminated-flow-sequence"),
        pytest.param(b"a: b: c\n", id="bad-mapping"),
        pytest.param(b"\t- tab indented\n", id="tab"),
        pytest.param(b"- just\n- a list\n", id="top-level-list"),
        pytest.param(b"just a string\n", id="top-level-scalar"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
    ],
)
def test_unparsable_state_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.yaml"
    path.write_bytes(content)
    with pytest.raises(StateFileError):
        load_state(path)


def test_unreadable_state_file(tmp_path: Path) -> None:
    with pytest.raises(StateFileError):
        load_state(tmp_path / "missing.yaml")
    with pytest.raises(StateFileError):
        load_state(tmp_path)  # a directory


def test_cli_exits_non_zero_and_prints_no_rules_for_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("kind: List\nitems: [\n")
    rc = main(
        ["--dry-run", "--state", str(path), "--hostname-override", "n", "--node-ip", "10.0.0.1"]
    )
    assert rc == 1
    out = capsys.readouterr().out
    assert "*nat" not in out
    assert "*filter" not in out


# --- IP fields: only plain addresses reach the rules ------------------------------------------

ZONE_INJECTION = "fd00::1%x\n-A INPUT -j ACCEPT"


def _v6_service(**kw: Any) -> dict[str, Any]:
    return service("ns1", "svc1", ["fd00:172:30::41"], [port("p80", 80)], **kw)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        pytest.param(
            service("ns1", "svc1", ["fd00:172:30::41%eth0"]), "spec.clusterIPs[0]", id="cluster-ip"
        ),
        pytest.param(
            _v6_service(external_ips=["fd00::22%eth0"]), "spec.externalIPs[0]", id="external-ip"
        ),
        pytest.param(
            _v6_service(type="LoadBalancer", lb_ingress=["2001:db8:ff::4%lb"]),
            "status.loadBalancer.ingress[0].ip",
            id="lb-ingress",
        ),
    ],
)
def test_ipv6_zone_is_not_an_ip(obj: dict[str, Any], field: str) -> None:
    """Go's net.ParseIP (ParseIPSloppy) has no `%zone` form: such a value is not an IP."""
    with pytest.raises(InvalidObject) as info:
        service_from_api(obj)
    assert info.value.field == field


def test_ipv6_zone_in_an_endpoint_address_is_not_an_ip() -> None:
    obj = endpoint_slice(
        "ns1", "svc1", ["fd00:10::5%eth0", "fd00:10::6"], address_type="IPv6", name="svc1-x"
    )
    problems: list[InvalidObject] = []
    es = endpoint_slice_from_api(obj, problems)
    assert es is not None
    assert [str(e.address) for e in es.endpoints] == ["fd00:10::6"]
    assert [p.field for p in problems] == ["endpoints[0].addresses[0]"]


def test_ipv6_zone_in_a_source_range_is_not_used() -> None:
    obj = _v6_service(
        type="LoadBalancer",
        lb_ingress=["2001:db8:ff::4"],
        source_ranges=["2001:db8::%x/64", "2001:db8:cafe::/48"],
    )
    # Ignored (reference §a row 8) or the whole Service invalid: never used either way.
    cluster, _ = state_from_objects([obj])
    for svc in cluster.services.values():
        assert all("%" not in str(r) for r in svc.load_balancer_source_ranges)


_ALLOWED_LINE = re.compile(r"(\*filter|\*nat|COMMIT|:KUBE-[A-Z0-9-]+ - \[0:0\]|-[AIX] [A-Z]|# )")


def _assert_no_injection(out: str) -> None:
    for family_text in sections(out).values():
        parse_ruleset(family_text)
        for line in family_text.splitlines():
            assert _ALLOWED_LINE.match(line), line
            assert "%" not in line, line
            if line.startswith("-A "):
                # pyproxy only appends to its own chains; built-in chains get `-I` hooks only.
                assert line.split()[1].startswith("KUBE-"), line


def test_ip_fields_cannot_inject_rules() -> None:
    objects = [
        _v6_service(external_ips=[ZONE_INJECTION]),
        _v6_service(type="LoadBalancer", lb_ingress=[ZONE_INJECTION])
        | {"metadata": {"name": "svc2", "namespace": "ns1"}},
        service("ns1", "svc3", [ZONE_INJECTION]),
        service("ns1", "svc4", ["fd00:172:30::44"], [port("p80", 80)]),
        endpoint_slice(
            "ns1", "svc4", [ZONE_INJECTION, "fd00:10::6 -j ACCEPT"], address_type="IPv6"
        ),
    ]
    out = render(
        [o for o in objects if _is_valid(o)],
        ("--hostname-override", "test-node", "--node-ip", "2001:db8::1"),
    )
    _assert_no_injection(out)
    _, problems = state_from_objects(objects)
    assert len(problems) >= 4


_ip_like = st.one_of(
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(v=6).map(str), _hostile).map(lambda t: f"{t[0]}%{t[1]}"),
    st.tuples(st.ip_addresses().map(str), _hostile).map("".join),
)


@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.generate])
@example(
    cluster_ip="fd00:172:30::41", external_ip=ZONE_INJECTION, lb_ip="1.2.3.4", ep_ip="fd00:10::5"
)
@given(cluster_ip=_ip_like, external_ip=_ip_like, lb_ip=_ip_like, ep_ip=_ip_like)
def test_nothing_in_an_ip_field_reaches_the_rules_unvalidated(
    cluster_ip: str, external_ip: str, lb_ip: str, ep_ip: str
) -> None:
    family = "IPv6" if ":" in ep_ip else "IPv4"
    objects = [
        service(
            "ns1",
            "svc1",
            cluster_ip,
            [port("p80", 80, node_port=30080)],
            type="LoadBalancer",
            external_ips=[external_ip],
            lb_ingress=[lb_ip],
        ),
        endpoint_slice("ns1", "svc1", [ep_ip], address_type=family),
    ]
    args = (
        "--hostname-override",
        "test-node",
        "--node-ip",
        "192.168.0.2",
        "--node-ip",
        "2001:db8::1",
    )
    out = render([o for o in objects if _is_valid(o)], args)
    _assert_no_injection(out)
