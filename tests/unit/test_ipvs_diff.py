"""Kernel state vs IPVS plan → operations: order, minimality, ownership, graceful termination.

Spec: the module docstring of pyproxy/ipvs/diff.py; upstream's graceful_termination.go
(delete at once for UDP/SCTP or without connections, else weight 0 and retry) and
cleanLegacyService (pyproxy deletes only its own virtual servers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from support import TEST_NODE, cluster_of, endpoint, endpoint_slice, port, service, slice_port

from pyproxy.ipvs import ipsets
from pyproxy.ipvs.diff import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    CurrentRealServer,
    CurrentVirtualServer,
    DeleteRealServer,
    DeleteVirtualServer,
    Diff,
    DrainRealServer,
    KernelState,
    Phase,
    RealServerRef,
    RestoreIpsets,
    RestoreIptables,
    UnbindAddress,
    UpdateRealServer,
    UpdateVirtualServer,
    cleanup_operations,
    diff,
    owned_by_pyproxy,
    real_server_ref,
)
from pyproxy.ipvs.ipsets import CurrentIpset
from pyproxy.ipvs.plan import IpvsPlan, VirtualServer, VirtualServerKey, plan_ipvs
from pyproxy.model import IPFamily, Protocol
from pyproxy.proxystate import ProxierConfig, desired_state

ip = ipaddress.ip_address
CONFIG = ProxierConfig(
    family=IPFamily.IPv4,
    node_name=TEST_NODE,
    node_ips=(ip("192.168.0.2"),),
    cluster_cidr=ipaddress.ip_network("10.0.0.0/8"),
)


def make_plan(*objects: Mapping[str, Any], scheduler: str = "rr") -> IpvsPlan:
    states = [p for ps in desired_state(cluster_of(objects), CONFIG).values() for p in ps]
    return plan_ipvs(states, CONFIG, scheduler)


def applied(
    plan: IpvsPlan,
    *,
    connections: Mapping[str, tuple[int, int]] | None = None,
    weights: Mapping[str, int] | None = None,
) -> KernelState:
    """The kernel state after `plan` was applied (connections/weights by "vs/rs" key)."""
    connections = connections or {}
    weights = weights or {}
    servers = {}
    for planned in plan.virtual_servers:
        reals = []
        for rs in planned.real_servers:
            ref = f"{planned.key}/{rs.endpoint}"
            active, inactive = connections.get(ref, (0, 0))
            reals.append(
                CurrentRealServer(
                    rs.address, rs.port, weights.get(ref, rs.weight), active, inactive
                )
            )
        servers[planned.key] = CurrentVirtualServer(planned.server, tuple(reals))
    sets = {s.spec.name: CurrentIpset(s.spec.type.value, s.members) for s in plan.ipsets}
    return KernelState(servers, frozenset(plan.bind_addresses), sets)


def with_real_servers(
    state: KernelState, key: VirtualServerKey, extra: Iterable[CurrentRealServer]
) -> KernelState:
    servers = dict(state.virtual_servers)
    current = servers[key]
    servers[key] = CurrentVirtualServer(current.server, (*current.real_servers, *extra))
    return KernelState(servers, state.bound_addresses, state.ipsets)


def key(address: str, port_number: int, proto: str = "TCP") -> VirtualServerKey:
    return VirtualServerKey(Protocol(proto), ip(address), port_number)


def ops_of(d: Diff, kind: type) -> list[Any]:
    return [op for op in d.operations if isinstance(op, kind)]


def web(endpoints: Iterable[str], proto: str = "TCP") -> tuple[dict[str, Any], ...]:
    return (
        service("ns1", "web", "10.96.0.10", [port("http", 80, proto)]),
        endpoint_slice(
            "ns1",
            "web",
            [endpoint(e, "other") for e in endpoints],
            [slice_port("http", 8080, proto)],
        ),
    )


WEB_KEY = key("10.96.0.10", 80)


# --- from nothing, and nothing to do ------------------------------------------------------------


def test_empty_kernel_gets_everything_in_phase_order() -> None:
    plan = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    d = diff(KernelState(), plan, iptables_document="*nat\nCOMMIT\n")
    kinds = [type(op).__name__ for op in d.operations]
    assert kinds == [
        "AddVirtualServer",
        "AddRealServer",
        "AddRealServer",
        "RestoreIpsets",
        "RestoreIptables",
        "BindAddress",
    ]
    restore = ops_of(d, RestoreIpsets)[0]
    assert restore.created == len(plan.ipsets)  # every set, also the empty ones
    assert "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80 comment" in restore.text
    assert restore.text.index("create ") < restore.text.index("add ")
    assert ops_of(d, BindAddress) == [BindAddress(ip("10.96.0.10"))]


def test_kernel_that_matches_needs_nothing() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    d = diff(applied(plan), plan)
    assert d.operations == ()
    assert not d


def test_phases_never_go_backwards() -> None:
    old = make_plan(
        *web(["10.0.2.1", "10.0.2.2"]),
        service("ns1", "gone", "10.96.0.99", [port()]),
        endpoint_slice("ns1", "gone", ["10.0.2.9"]),
    )
    new = make_plan(
        *web(["10.0.2.2", "10.0.2.3"]),
        service("ns1", "new", "10.96.0.98", [port()]),
        endpoint_slice("ns1", "new", ["10.0.2.8"]),
    )
    d = diff(applied(old), new, iptables_document="x")
    phases = [op.phase for op in d.operations]
    assert phases == sorted(phases)
    assert set(phases) == {
        Phase.UNBIND,
        Phase.DELETE_REAL_SERVERS,
        Phase.DELETE_VIRTUAL_SERVERS,
        Phase.VIRTUAL_SERVERS,
        Phase.REAL_SERVERS,
        Phase.IPSETS,
        Phase.IPTABLES,
        Phase.BIND,
    }


# --- only what changed ----------------------------------------------------------------------------


def test_endpoint_added_is_one_real_server() -> None:
    before = make_plan(*web(["10.0.2.1"]))
    after = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    d = diff(applied(before), after)
    server = after.by_key[WEB_KEY].server
    assert d.operations == (AddRealServer(server, after.by_key[WEB_KEY].real_servers[1]),)


def test_scheduler_or_affinity_change_updates_the_virtual_server_in_place() -> None:
    before = make_plan(*web(["10.0.2.1"]))
    after = make_plan(*web(["10.0.2.1"]), scheduler="wrr")
    d = diff(applied(before), after)
    assert d.operations == (UpdateVirtualServer(after.by_key[WEB_KEY].server),)


def test_removed_service_unbinds_deletes_and_cleans_its_set_members() -> None:
    before = make_plan(*web(["10.0.2.1"]))
    after = make_plan()
    d = diff(applied(before), after)
    assert [type(op) for op in d.operations] == [
        UnbindAddress,
        DeleteVirtualServer,
        RestoreIpsets,
    ]
    text = ops_of(d, RestoreIpsets)[0].text
    assert "del KUBE-CLUSTER-IP 10.96.0.10,tcp:80" in text
    assert "del KUBE-IPVS-IPS 10.96.0.10" in text
    assert "create" not in text
    assert "add " not in text


def test_members_printed_differently_by_the_kernel_are_not_rewritten() -> None:
    plan = make_plan(
        service(
            "ns1",
            "fw",
            "10.96.0.60",
            [port()],
            type="LoadBalancer",
            lb_ingress=["192.0.2.60"],
            source_ranges=["203.0.113.7/32"],
        ),
        endpoint_slice("ns1", "fw", ["10.0.2.6"]),
    )
    state = applied(plan)
    name = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
    printed = CurrentIpset("hash:ip,port,net", frozenset({"192.0.2.60,TCP:80,203.0.113.7/32"}))
    state = KernelState(
        state.virtual_servers, state.bound_addresses, {**state.ipsets, name: printed}
    )
    assert diff(state, plan).operations == ()


def test_other_family_and_foreign_addresses_and_sets_are_left_alone() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    state = applied(plan)
    foreign_set = CurrentIpset("hash:ip", frozenset({"1.2.3.4"}))
    state = KernelState(
        state.virtual_servers,
        state.bound_addresses | {ip("fd00:96::10")},
        {**state.ipsets, "SOMEONE-ELSE": foreign_set},
    )
    assert diff(state, plan).operations == ()


# --- ownership ----------------------------------------------------------------------------------


def foreign(address: str, port_number: int, proto: str = "TCP") -> CurrentVirtualServer:
    return CurrentVirtualServer(VirtualServer(key(address, port_number, proto), "wlc"))


def test_virtual_servers_that_are_not_pyproxys_are_never_removed() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    state = applied(plan)
    servers = dict(state.virtual_servers)
    for vs in (foreign("172.16.0.1", 80), foreign("192.168.0.2", 31000), foreign("fd00::1", 80)):
        servers[vs.key] = vs
    d = diff(KernelState(servers, state.bound_addresses, state.ipsets), plan)
    assert d.operations == ()


def test_pyproxys_virtual_servers_are_recognised_after_a_restart() -> None:
    old = make_plan(
        *web(["10.0.2.1"]),
        service(
            "ns1",
            "np",
            "10.96.0.40",
            [port("p80", 80, node_port=30040), port("sctp", 90, "SCTP", node_port=30090)],
            type="NodePort",
            external_ips=["192.168.0.2"],  # a local address: not bound, but in the set
        ),
        endpoint_slice("ns1", "np", ["10.0.2.4"]),
    )
    state = applied(old)
    # Node IP x nodePort (port in KUBE-NODE-PORT-TCP), SCTP (ip,sctp:port in the -HASH set),
    # an unbound external IP (in KUBE-EXTERNAL-IP), a cluster IP (bound).
    for k in (
        key("192.168.0.2", 30040),
        key("192.168.0.2", 30090, "SCTP"),
        key("192.168.0.2", 80),
        key("10.96.0.40", 80),
    ):
        assert owned_by_pyproxy(k, state), k
    assert not owned_by_pyproxy(key("192.168.0.2", 30041), state)
    assert not owned_by_pyproxy(key("192.168.0.2", 30040, "UDP"), state)
    d = diff(state, make_plan())
    deleted = {str(op.virtual_server.key) for op in ops_of(d, DeleteVirtualServer)}
    assert deleted == {str(k) for k in old.by_key}


def test_a_wanted_virtual_server_someone_else_made_is_taken_over() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    state = KernelState({WEB_KEY: foreign("10.96.0.10", 80)})
    d = diff(state, plan)
    assert ops_of(d, UpdateVirtualServer) == [UpdateVirtualServer(plan.by_key[WEB_KEY].server)]
    assert len(ops_of(d, AddRealServer)) == 1


def test_cleanup_deletes_only_pyproxys_virtual_servers_of_the_family() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    state = applied(plan)
    servers = {**state.virtual_servers, key("172.16.0.1", 80): foreign("172.16.0.1", 80)}
    state = KernelState(servers, state.bound_addresses, state.ipsets)
    assert cleanup_operations(state, IPFamily.IPv4) == (
        DeleteVirtualServer(plan.by_key[WEB_KEY].server),
    )
    assert cleanup_operations(state, IPFamily.IPv6) == ()


# --- --ipvs-exclude-cidrs ------------------------------------------------------------------------


def two_services() -> tuple[dict[str, Any], ...]:
    """web (10.96.0.10, outside the excluded CIDR) and kept (10.97.0.10, inside)."""
    return (
        *web(["10.0.2.1"]),
        service("ns1", "kept", "10.97.0.10", [port("http", 80)]),
        endpoint_slice("ns1", "kept", ["10.0.2.2"], [slice_port("http", 8080)]),
    )


EXCLUDED = (ipaddress.ip_network("10.97.0.0/16"),)
KEPT_KEY = key("10.97.0.10", 80)


def test_a_stale_virtual_server_of_ours_inside_an_excluded_cidr_is_never_deleted() -> None:
    state = applied(make_plan(*two_services()))
    assert owned_by_pyproxy(KEPT_KEY, state)  # so only the exclusion keeps it
    d = diff(state, make_plan(), exclude_cidrs=EXCLUDED)
    assert [op.virtual_server.key for op in ops_of(d, DeleteVirtualServer)] == [WEB_KEY]
    # Its address is still unbound and its set members removed, as upstream.
    assert {op.address for op in ops_of(d, UnbindAddress)} == {ip("10.96.0.10"), ip("10.97.0.10")}
    assert "del KUBE-CLUSTER-IP 10.97.0.10,tcp:80" in ops_of(d, RestoreIpsets)[0].text
    # The control: without the exclusion, both go.
    plain = diff(state, make_plan())
    assert {op.virtual_server.key for op in ops_of(plain, DeleteVirtualServer)} == {
        WEB_KEY,
        KEPT_KEY,
    }


def test_a_foreign_virtual_server_pyproxy_would_claim_survives_inside_an_excluded_cidr() -> None:
    # A virtual server someone else made on an address bound on kube-ipvs0: the ownership rule
    # claims it, the exclusion keeps it (and the other family's CIDRs change nothing).
    plan = make_plan(*web(["10.0.2.1"]))
    state = applied(plan)
    servers = {**state.virtual_servers, KEPT_KEY: foreign("10.97.0.10", 80)}
    state = KernelState(servers, state.bound_addresses | {ip("10.97.0.10")}, state.ipsets)
    assert ops_of(diff(state, plan), DeleteVirtualServer) == [
        DeleteVirtualServer(foreign("10.97.0.10", 80).server)
    ]
    for cidrs in (EXCLUDED, (ipaddress.ip_network("10.97.0.10/32"),)):
        assert ops_of(diff(state, plan, exclude_cidrs=cidrs), DeleteVirtualServer) == []
    v6_only = (ipaddress.ip_network("::/0"),)
    assert len(ops_of(diff(state, plan, exclude_cidrs=v6_only), DeleteVirtualServer)) == 1


def test_a_wanted_virtual_server_inside_an_excluded_cidr_is_still_programmed() -> None:
    before = make_plan(*two_services())
    after = make_plan(
        *web(["10.0.2.1"]),
        service("ns1", "kept", "10.97.0.10", [port("http", 80)], affinity=True),
        endpoint_slice("ns1", "kept", ["10.0.2.3"], [slice_port("http", 8080)]),
    )
    d = diff(applied(before), after, exclude_cidrs=EXCLUDED)
    assert ops_of(d, UpdateVirtualServer) == [UpdateVirtualServer(after.by_key[KEPT_KEY].server)]
    assert [op.real_server.endpoint for op in ops_of(d, AddRealServer)] == ["10.0.2.3:8080"]
    assert [op.real_server.endpoint for op in ops_of(d, DeleteRealServer)] == ["10.0.2.2:8080"]
    new = diff(KernelState(), after, exclude_cidrs=EXCLUDED)
    assert KEPT_KEY in {op.virtual_server.key for op in ops_of(new, AddVirtualServer)}


# --- graceful termination -------------------------------------------------------------------------

REF = RealServerRef("10.96.0.10:80/TCP", "10.0.2.1:8080")


def test_removed_tcp_real_server_without_connections_is_deleted_at_once() -> None:
    before = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    after = make_plan(*web(["10.0.2.2"]))
    d = diff(applied(before), after)
    (op,) = d.operations
    assert isinstance(op, DeleteRealServer)
    assert op.reason == "no connections"
    assert op.real_server.endpoint == "10.0.2.1:8080"
    assert d.draining == {}


def test_removed_tcp_real_server_with_connections_drains_then_is_deleted() -> None:
    before = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    after = make_plan(*web(["10.0.2.2"]))
    busy = applied(before, connections={"10.96.0.10:80/TCP/10.0.2.1:8080": (1, 2)})

    # 1. Weight 0: no new connections, the existing ones go on.
    d1 = diff(busy, after, now=100.0)
    (op,) = d1.operations
    assert isinstance(op, DrainRealServer)
    assert op.real_server.weight == 0
    assert op.connections == 3
    assert d1.draining == {REF: 100.0}

    # 2. Still busy, now at weight 0: nothing to do; draining keeps its start time.
    draining_state = applied(
        before,
        connections={"10.96.0.10:80/TCP/10.0.2.1:8080": (0, 1)},
        weights={"10.96.0.10:80/TCP/10.0.2.1:8080": 0},
    )
    d2 = diff(draining_state, after, draining=d1.draining, now=160.0)
    assert d2.operations == ()
    assert d2.draining == {REF: 100.0}

    # 3. Connections gone: deleted.
    idle = applied(before, weights={"10.96.0.10:80/TCP/10.0.2.1:8080": 0})
    d3 = diff(idle, after, draining=d2.draining, now=220.0)
    (op,) = d3.operations
    assert isinstance(op, DeleteRealServer)
    assert op.reason == "drained"
    assert d3.draining == {}


def test_draining_real_server_is_deleted_after_the_timeout() -> None:
    before = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    after = make_plan(*web(["10.0.2.2"]))
    busy = applied(
        before,
        connections={"10.96.0.10:80/TCP/10.0.2.1:8080": (5, 0)},
        weights={"10.96.0.10:80/TCP/10.0.2.1:8080": 0},
    )
    assert diff(busy, after, draining={REF: 0.0}, now=899.0, drain_timeout=900).operations == ()
    d = diff(busy, after, draining={REF: 0.0}, now=900.0, drain_timeout=900)
    (op,) = d.operations
    assert isinstance(op, DeleteRealServer)
    assert op.reason == "drain timeout"
    assert d.draining == {}


@pytest.mark.parametrize("proto", ["UDP", "SCTP"])
def test_udp_and_sctp_real_servers_are_deleted_at_once(proto: str) -> None:
    before = make_plan(*web(["10.0.2.1", "10.0.2.2"], proto))
    after = make_plan(*web(["10.0.2.2"], proto))
    busy = applied(before, connections={f"10.96.0.10:80/{proto}/10.0.2.1:8080": (3, 3)})
    (op,) = diff(busy, after).operations
    assert isinstance(op, DeleteRealServer)
    assert op.reason == "removed"


def test_draining_real_server_that_comes_back_gets_its_weight_back() -> None:
    plan = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    draining = applied(
        plan,
        connections={"10.96.0.10:80/TCP/10.0.2.1:8080": (1, 0)},
        weights={"10.96.0.10:80/TCP/10.0.2.1:8080": 0},
    )
    d = diff(draining, plan, draining={REF: 5.0}, now=10.0)
    (op,) = d.operations
    assert isinstance(op, UpdateRealServer)
    assert op.real_server.weight == 1
    assert op.real_server.endpoint == "10.0.2.1:8080"
    assert d.draining == {}


def test_after_a_restart_a_weight_zero_real_server_keeps_draining_from_now() -> None:
    before = make_plan(*web(["10.0.2.1", "10.0.2.2"]))
    after = make_plan(*web(["10.0.2.2"]))
    state = applied(
        before,
        connections={"10.96.0.10:80/TCP/10.0.2.1:8080": (1, 0)},
        weights={"10.96.0.10:80/TCP/10.0.2.1:8080": 0},
    )
    d = diff(state, after, draining={}, now=42.0)
    assert d.operations == ()
    assert d.draining == {REF: 42.0}


def test_a_deleted_virtual_server_takes_its_draining_real_servers_with_it() -> None:
    before = make_plan(*web(["10.0.2.1"]))
    state = applied(before, connections={"10.96.0.10:80/TCP/10.0.2.1:8080": (1, 0)})
    d = diff(state, make_plan(), draining={REF: 1.0}, now=2.0)
    assert not ops_of(d, DeleteRealServer)
    assert not ops_of(d, DrainRealServer)
    assert len(ops_of(d, DeleteVirtualServer)) == 1
    assert d.draining == {}


def test_foreign_real_server_weight_is_reset() -> None:
    # Upstream resets weights on its first sync after a restart; here on every sync.
    plan = make_plan(*web(["10.0.2.1"]))
    state = applied(plan, weights={"10.96.0.10:80/TCP/10.0.2.1:8080": 7})
    (op,) = diff(state, plan).operations
    assert isinstance(op, UpdateRealServer)
    assert op.real_server.weight == 1


def test_real_server_ref_text() -> None:
    assert real_server_ref(key("fd00::1", 80), ip("fd00::2"), 8080) == RealServerRef(
        "[fd00::1]:80/TCP", "[fd00::2]:8080"
    )


def test_extra_real_server_in_the_kernel_for_a_new_endpoint_set() -> None:
    plan = make_plan(*web(["10.0.2.2"]))
    state = with_real_servers(
        applied(plan), WEB_KEY, [CurrentRealServer(ip("10.0.2.9"), 8080, 1, 0, 0)]
    )
    (op,) = diff(state, plan).operations
    assert isinstance(op, DeleteRealServer)
    assert op.real_server.endpoint == "10.0.2.9:8080"


def test_iptables_document_is_written_when_given() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    d = diff(applied(plan), plan, iptables_document="*nat\nCOMMIT\n")
    assert d.operations == (RestoreIptables("*nat\nCOMMIT\n"),)


def test_new_virtual_server_is_added_before_its_real_servers_and_bound_last() -> None:
    plan = make_plan(*web(["10.0.2.1"]))
    d = diff(KernelState(), plan)
    order = [type(op) for op in d.operations if not isinstance(op, RestoreIpsets)]
    assert order == [AddVirtualServer, AddRealServer, BindAddress]
    assert ipsets.IPVS_IPS in {s.spec.base for s in plan.ipsets}
