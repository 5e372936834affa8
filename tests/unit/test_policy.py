"""Endpoint policy: upstream's CategorizeEndpoints, case by case.

Spec: reference/kube-proxy.md §e "Endpoint semantics" and §a rows 12, 14, 15, 16; the table is
upstream's TestCategorizeEndpoints (pkg/proxy/topology_test.go, reference case list 18) with
the same names and expectations, plus PreferSameNode cases derived from the reference (node
hints are honoured only with the PreferSameTrafficDistribution gate).

Expectations use upstream's convention: `cluster`/`local` None means "the service does not use
this kind of endpoints" (and the result must be empty); `all` defaults to whichever of the two
is set; `only_remote` means has_any is true even though nothing is reachable from this node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from pyproxy.model import Protocol
from pyproxy.policy import TopologyMode, categorize_endpoints, topology_mode
from pyproxy.serviceport import EndpointInfo, ServicePortInfo, ServicePortName

NODE = "test-node"


def svc(
    *,
    itp_local: bool = False,
    etp_local: bool = False,
    node_port: int = 0,
    external_ips: tuple[str, ...] = (),
    lb_ips: tuple[str, ...] = (),
) -> ServicePortInfo:
    return ServicePortInfo(
        name=ServicePortName("ns1", "svc1", "p80", Protocol.TCP),
        cluster_ip=ipaddress.ip_address("172.30.0.41"),
        port=80,
        node_port=node_port,
        external_ips=tuple(ipaddress.ip_address(i) for i in external_ips),
        load_balancer_vips=tuple(ipaddress.ip_address(i) for i in lb_ips),
        internal_policy_local=itp_local,
        external_policy_local=etp_local,
    )


def ep(
    endpoint: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
) -> EndpointInfo:
    host, _, port = endpoint.rpartition(":")
    return EndpointInfo.make(
        ipaddress.ip_address(host.strip("[]")),
        int(port),
        is_local=local,
        ready=ready,
        # upstream's test structs leave `serving` false unless set; ready implies serving here.
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name=NODE if local else "other-node",
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
    )


@dataclass
class Case:
    name: str
    service: ServicePortInfo
    endpoints: list[EndpointInfo]
    cluster: set[str] | None
    local: set[str] | None
    all: set[str] | None = None
    only_remote: bool = False
    zone: str | None = None
    prefer_same_node: bool = False
    topology: TopologyMode | None = None


A, B, C, D = "zone-a", "zone-b", "zone-c", "zone-d"

CASES = [
    # --- topology (zone hints) ---
    Case(
        "should use topology since all endpoints have hints, node has a zone label and "
        "there are endpoints for the node's zone",
        svc(),
        [
            ep("10.1.2.3:80", zones=(A,)),
            ep("10.1.2.4:80", zones=(B,)),
            ep("10.1.2.5:80", zones=(C,)),
            ep("10.1.2.6:80", zones=(A,)),
        ],
        cluster={"10.1.2.3:80", "10.1.2.6:80"},
        local=None,
        zone=A,
        topology=TopologyMode.PREFER_SAME_ZONE,
    ),
    Case(
        "externalTrafficPolicy: Local, topology ignored for Local endpoints",
        svc(etp_local=True, node_port=8080),
        [
            ep("10.1.2.3:80", zones=(A,), local=True),
            ep("10.1.2.4:80", zones=(B,), local=True),
            ep("10.1.2.5:80", zones=(C,)),
            ep("10.1.2.6:80", zones=(A,)),
        ],
        cluster={"10.1.2.3:80", "10.1.2.6:80"},
        local={"10.1.2.3:80", "10.1.2.4:80"},
        all={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"},
        zone=A,
    ),
    Case(
        "internalTrafficPolicy: Local, topology ignored for Local endpoints",
        svc(itp_local=True, node_port=8080),
        [
            ep("10.1.2.3:80", zones=(A,), local=True),
            ep("10.1.2.4:80", zones=(B,), local=True),
            ep("10.1.2.5:80", zones=(C,)),
            ep("10.1.2.6:80", zones=(A,)),
        ],
        cluster={"10.1.2.3:80", "10.1.2.6:80"},
        local={"10.1.2.3:80", "10.1.2.4:80"},
        all={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"},
        zone=A,
    ),
    Case(
        "empty node labels",
        svc(),
        [ep("10.1.2.3:80", zones=(A,))],
        cluster={"10.1.2.3:80"},
        local=None,
        zone=None,
        topology=TopologyMode.NONE,
    ),
    Case(
        "empty zone label",
        svc(),
        [ep("10.1.2.3:80", zones=(A,))],
        cluster={"10.1.2.3:80"},
        local=None,
        zone="",
        topology=TopologyMode.NONE,
    ),
    Case(
        "node in different zone, no endpoint filtering",
        svc(),
        [ep("10.1.2.3:80", zones=(A,))],
        cluster={"10.1.2.3:80"},
        local=None,
        zone=B,
        topology=TopologyMode.NONE,
    ),
    Case(
        "unready endpoint",
        svc(),
        [
            ep("10.1.2.3:80", zones=(A,)),
            ep("10.1.2.4:80", zones=(B,)),
            ep("10.1.2.5:80", zones=(C,)),
            ep("10.1.2.6:80", zones=(A,), ready=False),
        ],
        cluster={"10.1.2.3:80"},
        local=None,
        zone=A,
    ),
    Case(
        "only unready endpoints in same zone (should not filter)",
        svc(),
        [
            ep("10.1.2.3:80", zones=(A,), ready=False),
            ep("10.1.2.4:80", zones=(B,)),
            ep("10.1.2.5:80", zones=(C,)),
            ep("10.1.2.6:80", zones=(A,), ready=False),
        ],
        cluster={"10.1.2.4:80", "10.1.2.5:80"},
        local=None,
        zone=A,
        topology=TopologyMode.NONE,
    ),
    Case(
        "missing hints, no filtering applied",
        svc(),
        [
            ep("10.1.2.3:80", zones=(A,)),
            ep("10.1.2.4:80", zones=(B,)),
            ep("10.1.2.5:80"),  # endpoint is missing its hint
            ep("10.1.2.6:80", zones=(A,)),
        ],
        cluster={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"},
        local=None,
        zone=A,
        topology=TopologyMode.NONE,
    ),
    Case(
        "no hints at all (hints disabled by absence), no filtering applied",
        svc(),
        [ep("10.1.2.3:80"), ep("10.1.2.4:80")],
        cluster={"10.1.2.3:80", "10.1.2.4:80"},
        local=None,
        zone=A,
        topology=TopologyMode.NONE,
    ),
    Case(
        "multiple hints per endpoint, filtering includes any endpoint with zone included",
        svc(),
        [
            ep("10.1.2.3:80", zones=(A, B, C)),
            ep("10.1.2.4:80", zones=(B, C)),
            ep("10.1.2.5:80", zones=(B, D)),
            ep("10.1.2.6:80", zones=(C,)),
        ],
        cluster={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"},
        local=None,
        zone=C,
    ),
    Case(
        "conflicting topology and localness require merging allEndpoints",
        svc(etp_local=True, node_port=8080),
        [
            ep("10.0.0.0:80", zones=(A,), local=True),
            ep("10.0.0.1:80", zones=(B,), local=True),
            ep("10.0.0.2:80", zones=(A,)),
            ep("10.0.0.3:80", zones=(B,)),
        ],
        cluster={"10.0.0.0:80", "10.0.0.2:80"},
        local={"10.0.0.0:80", "10.0.0.1:80"},
        all={"10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"},
        zone=A,
    ),
    Case(
        "topology is not used when falling back to terminating endpoints",
        svc(),
        [
            ep("10.0.0.0:80", zones=(A,), ready=False, serving=True, terminating=True),
            ep("10.0.0.1:80", zones=(B,), ready=False, serving=True, terminating=True),
        ],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=None,
        zone=A,
        topology=TopologyMode.NONE,
    ),
    # --- internalTrafficPolicy: Local ---
    Case(
        "internalTrafficPolicy: Local, with empty endpoints",
        svc(itp_local=True),
        [],
        cluster=None,
        local=set(),
    ),
    Case(
        "internalTrafficPolicy: Local, but all endpoints are remote",
        svc(itp_local=True),
        [ep("10.0.0.0:80"), ep("10.0.0.1:80")],
        cluster=None,
        local=set(),
        only_remote=True,
    ),
    Case(
        "internalTrafficPolicy: Local, all endpoints are local",
        svc(itp_local=True),
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80", local=True)],
        cluster=None,
        local={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "internalTrafficPolicy: Local, some endpoints are local",
        svc(itp_local=True),
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
        cluster=None,
        local={"10.0.0.0:80"},
    ),
    # --- readiness and the terminating fallback ---
    Case(
        "Cluster traffic policy, endpoints not Ready",
        svc(),
        [ep("10.0.0.0:80", ready=False), ep("10.0.0.1:80", ready=False)],
        cluster=set(),
        local=None,
    ),
    Case(
        "Cluster traffic policy, some endpoints are Ready",
        svc(),
        [ep("10.0.0.0:80", ready=False), ep("10.0.0.1:80")],
        cluster={"10.0.0.1:80"},
        local=None,
    ),
    Case(
        "Cluster traffic policy, all endpoints are terminating",
        svc(),
        [
            ep("10.0.0.0:80", ready=False, serving=True, terminating=True, local=True),
            ep("10.0.0.1:80", ready=False, serving=True, terminating=True),
        ],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=None,
    ),
    Case(
        "Cluster traffic policy, ready endpoints preferred over serving+terminating ones",
        svc(),
        [
            ep("10.0.0.0:80"),
            ep("10.0.0.1:80", ready=False, serving=True, terminating=True),
            ep("10.0.0.2:80", ready=False, serving=False, terminating=True),
        ],
        cluster={"10.0.0.0:80"},
        local=None,
    ),
    Case(
        "Cluster traffic policy, not-serving terminating endpoints are never used",
        svc(),
        [ep("10.0.0.0:80", ready=False, serving=False, terminating=True, local=True)],
        cluster=set(),
        local=None,
    ),
    Case(
        "Cluster traffic policy, serving but not terminating and not ready is not a fallback",
        svc(),
        [ep("10.0.0.0:80", ready=False, serving=True, terminating=False)],
        cluster=set(),
        local=None,
    ),
    Case(
        "iTP: Local, eTP: Cluster, some endpoints local",
        svc(itp_local=True, node_port=8080),
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local={"10.0.0.0:80"},
        all={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "iTP: Cluster, eTP: Local, some endpoints local",
        svc(etp_local=True, node_port=8080),
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local={"10.0.0.0:80"},
        all={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "iTP: Local, eTP: Local, some endpoints local",
        svc(itp_local=True, etp_local=True, node_port=8080),
        [ep("10.0.0.0:80", local=True), ep("10.0.0.1:80")],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local={"10.0.0.0:80"},
        all={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "iTP: Local, eTP: Local, all endpoints remote",
        svc(itp_local=True, etp_local=True, node_port=8080),
        [ep("10.0.0.0:80"), ep("10.0.0.1:80")],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=set(),
        all={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "iTP: Local, eTP: Local, all endpoints remote and terminating",
        svc(itp_local=True, etp_local=True, node_port=8080),
        [
            ep("10.0.0.0:80", ready=False, serving=True, terminating=True),
            ep("10.0.0.1:80", ready=False, serving=True, terminating=True),
        ],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=set(),
        all={"10.0.0.0:80", "10.0.0.1:80"},
        only_remote=True,
    ),
    Case(
        "iTP: Cluster, eTP: Local, with terminating endpoints",
        svc(etp_local=True, node_port=8080),
        [
            ep("10.0.0.0:80"),
            ep("10.0.0.1:80", ready=False, serving=False, local=True),
            ep("10.0.0.2:80", ready=False, serving=True, terminating=True, local=True),
            ep("10.0.0.3:80", ready=False, serving=True, terminating=True),
        ],
        cluster={"10.0.0.0:80"},
        local={"10.0.0.2:80"},
        all={"10.0.0.0:80", "10.0.0.2:80"},
    ),
    Case(
        "Local fallback is independent of Cluster: local terminating used while remote ready",
        svc(itp_local=True),
        [
            ep("10.0.0.0:80"),
            ep("10.0.0.1:80", ready=False, serving=True, terminating=True, local=True),
        ],
        cluster=None,
        local={"10.0.0.1:80"},
    ),
    Case(
        "Local ready preferred over local serving+terminating",
        svc(etp_local=True, lb_ips=("1.2.3.4",)),
        [
            ep("10.0.1.1:80", local=True),
            ep("10.0.1.2:80", local=True),
            ep("10.0.1.3:80", ready=False, serving=True, terminating=True, local=True),
            ep("10.0.1.4:80", ready=False, serving=False, terminating=True, local=True),
            ep("10.0.1.5:80"),
        ],
        cluster={"10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"},
        local={"10.0.1.1:80", "10.0.1.2:80"},
        all={"10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"},
    ),
    Case(
        "only local serving+terminating endpoints, remote ready",
        svc(etp_local=True, lb_ips=("1.2.3.4",)),
        [
            ep("10.0.1.2:80", ready=False, serving=True, terminating=True, local=True),
            ep("10.0.1.3:80", ready=False, serving=True, terminating=True, local=True),
            ep("10.0.1.4:80", ready=False, serving=False, terminating=True, local=True),
            ep("10.0.1.5:80"),
        ],
        cluster={"10.0.1.5:80"},
        local={"10.0.1.2:80", "10.0.1.3:80"},
        all={"10.0.1.2:80", "10.0.1.3:80", "10.0.1.5:80"},
    ),
    Case(
        "terminating endpoints on remote node only, eTP Local",
        svc(etp_local=True, lb_ips=("1.2.3.4",)),
        [ep("10.0.1.5:80", ready=False, serving=True, terminating=True)],
        cluster={"10.0.1.5:80"},
        local=set(),
        all={"10.0.1.5:80"},
    ),
    Case(
        "no usable endpoints on any node",
        svc(etp_local=True, lb_ips=("1.2.3.4",)),
        [
            ep("10.0.1.5:80", ready=False, serving=False, terminating=True, local=True),
            ep("10.0.1.6:80", ready=False, serving=False, terminating=True),
        ],
        cluster=set(),
        local=set(),
        all=set(),
    ),
    Case(
        "externalTrafficPolicy ignored if not externally accessible",
        svc(etp_local=True),
        [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=None,
        all={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "externalIPs make a ClusterIP service externally accessible",
        svc(etp_local=True, external_ips=("192.168.99.11",)),
        [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local={"10.0.0.1:80"},
        all={"10.0.0.0:80", "10.0.0.1:80"},
    ),
    Case(
        "no cluster endpoints for iTP:Local internal-only service",
        svc(itp_local=True),
        [ep("10.0.0.0:80"), ep("10.0.0.1:80", local=True)],
        cluster=None,
        local={"10.0.0.1:80"},
        all={"10.0.0.1:80"},
    ),
    # --- PreferSameNode (node hints, PreferSameTrafficDistribution gate) ---
    Case(
        "node hints honoured with the gate: only endpoints hinted for this node",
        svc(),
        [
            ep("10.0.0.0:80", nodes=(NODE,), zones=(A,), local=True),
            ep("10.0.0.1:80", nodes=("node-b",), zones=(A,)),
            ep("10.0.0.2:80", nodes=("node-c",), zones=(B,)),
        ],
        cluster={"10.0.0.0:80"},
        local=None,
        zone=A,
        prefer_same_node=True,
        topology=TopologyMode.PREFER_SAME_NODE,
    ),
    Case(
        "node hints ignored without the gate: zone hints used",
        svc(),
        [
            ep("10.0.0.0:80", nodes=(NODE,), zones=(A,), local=True),
            ep("10.0.0.1:80", nodes=("node-b",), zones=(A,)),
            ep("10.0.0.2:80", nodes=("node-c",), zones=(B,)),
        ],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=None,
        zone=A,
        prefer_same_node=False,
        topology=TopologyMode.PREFER_SAME_ZONE,
    ),
    Case(
        "node hints but none for this node: fall back to zone hints",
        svc(),
        [
            ep("10.0.0.1:80", nodes=("node-b",), zones=(A,)),
            ep("10.0.0.2:80", nodes=("node-c",), zones=(B,)),
        ],
        cluster={"10.0.0.1:80"},
        local=None,
        zone=A,
        prefer_same_node=True,
        topology=TopologyMode.PREFER_SAME_ZONE,
    ),
    Case(
        "some ready endpoint without node hint: node hints not used",
        svc(),
        [
            ep("10.0.0.0:80", nodes=(NODE,), local=True),
            ep("10.0.0.1:80"),
        ],
        cluster={"10.0.0.0:80", "10.0.0.1:80"},
        local=None,
        zone=A,
        prefer_same_node=True,
        topology=TopologyMode.NONE,
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_categorize_endpoints(case: Case) -> None:
    got = categorize_endpoints(
        case.endpoints,
        case.service,
        node_name=NODE,
        zone=case.zone,
        prefer_same_node=case.prefer_same_node,
    )
    if case.cluster is None:
        assert got.cluster == (), "service does not use Cluster endpoints"
    else:
        assert {e.endpoint for e in got.cluster} == case.cluster
    if case.local is None:
        assert got.local == (), "service does not use Local endpoints"
    else:
        assert {e.endpoint for e in got.local} == case.local

    if case.cluster is not None and case.local is None:
        expected_all = case.cluster
    elif case.local is not None and case.cluster is None:
        expected_all = case.local
    else:
        assert case.all is not None, "test case must say what all_reachable is"
        expected_all = case.all
    reachable = [e.endpoint for e in got.all_reachable]
    assert set(reachable) == expected_all
    assert len(reachable) == len(set(reachable)), "all_reachable has duplicates"
    assert got.has_any == (bool(expected_all) or case.only_remote)
    if case.topology is not None:
        assert got.topology is case.topology


def test_all_reachable_is_sorted_by_endpoint_text() -> None:
    """Upstream sorts endpoints by their `ip:port` string; the merged list is deterministic."""
    eps = sorted(
        [
            ep("10.0.0.10:80", zones=(A,), local=True),
            ep("10.0.0.2:80", zones=(B,), local=True),
            ep("10.0.0.3:80", zones=(A,)),
            ep("10.0.0.4:80", zones=(B,)),
        ],
        key=lambda e: e.endpoint,
    )
    got = categorize_endpoints(eps, svc(etp_local=True, node_port=3001), node_name=NODE, zone=A)
    assert [e.endpoint for e in got.all_reachable] == ["10.0.0.10:80", "10.0.0.2:80", "10.0.0.3:80"]
    assert [e.endpoint for e in got.cluster] == ["10.0.0.10:80", "10.0.0.3:80"]


def test_topology_mode_needs_a_ready_endpoint() -> None:
    eps = [ep("10.0.0.1:80", ready=False, zones=(A,))]
    assert topology_mode(eps, node_name=NODE, zone=A) is TopologyMode.NONE
    assert topology_mode([], node_name=NODE, zone=A) is TopologyMode.NONE


def test_ipv6_endpoints() -> None:
    eps = [ep("[fd00:10:180::1]:80", local=True), ep("[fd00:10:180::2]:80")]
    got = categorize_endpoints(eps, svc(etp_local=True, node_port=3001), node_name=NODE, zone=None)
    assert [e.endpoint for e in got.local] == ["[fd00:10:180::1]:80"]
    assert [e.endpoint for e in got.cluster] == ["[fd00:10:180::1]:80", "[fd00:10:180::2]:80"]
