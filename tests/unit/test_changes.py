"""ChangeTracker: events are recorded per Service, and a sync takes exactly what changed."""

from __future__ import annotations

from pyproxy.changes import ChangeTracker
from pyproxy.model import NamespacedName


def service(name: str, ip: str, ns: str = "ns") -> dict[str, object]:
    return {
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIPs": [ip], "ports": [{"name": "p", "port": 80}]},
    }


def eslice(name: str, svc: str, ips: list[str], trigger: str | None = None) -> dict[str, object]:
    meta: dict[str, object] = {
        "namespace": "ns",
        "name": name,
        "labels": {"kubernetes.io/service-name": svc},
    }
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


def test_first_take_is_everything_then_only_what_changed() -> None:
    t = ChangeTracker("node-a")
    t.replace("Service", [service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    t.replace("EndpointSlice", [eslice("a-1", "a", ["10.0.0.1"])])
    first = t.take()
    assert first.services is None and first.node_changed
    assert not t.pending

    t.event("EndpointSlice", "MODIFIED", eslice("a-1", "a", ["10.0.0.2"], "2026-01-01T00:00:00Z"))
    changes = t.take()
    assert changes.services == {NamespacedName("ns", "a")}
    assert changes.endpoint_changes == 1 and changes.service_changes == 0
    assert NamespacedName("ns", "a") in changes.trigger_times
    assert [s.endpoints[0].address.exploded for s in t.slices_of(NamespacedName("ns", "a"))] == [
        "10.0.0.2"
    ]


def test_identical_update_is_not_a_change() -> None:
    t = ChangeTracker("node-a")
    t.replace("Service", [service("a", "10.96.0.1")])
    t.take()
    t.event("Service", "MODIFIED", service("a", "10.96.0.1"))
    assert not t.pending


def test_relist_removes_what_disappeared() -> None:
    t = ChangeTracker("node-a")
    t.replace("Service", [service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    t.replace("EndpointSlice", [eslice("b-1", "b", ["10.0.0.1"])])
    t.take()
    t.replace("Service", [service("a", "10.96.0.1")])
    t.replace("EndpointSlice", [])
    changes = t.take()
    assert changes.services == {NamespacedName("ns", "b")}
    assert NamespacedName("ns", "b") not in t.services
    assert list(t.slices_of(NamespacedName("ns", "b"))) == []


def test_invalid_object_is_recorded_and_others_kept() -> None:
    t = ChangeTracker("node-a")
    t.replace("Service", [service("a", "10.96.0.1"), service("bad", "10.96.0.999")])
    assert set(t.services) == {NamespacedName("ns", "a")}
    problems = t.take_problems()
    assert len(problems) == 1 and problems[0].field == "spec.clusterIPs[0]"
    # An object that becomes invalid is removed (as if deleted), and its Service resynced.
    t.take()
    t.event("Service", "MODIFIED", service("a", "nonsense"))
    assert t.take().services == {NamespacedName("ns", "a")}
    assert NamespacedName("ns", "a") not in t.services


def test_failed_sync_requeues_everything() -> None:
    t = ChangeTracker("node-a")
    t.replace("Service", [service("a", "10.96.0.1")])
    t.take()
    t.event("Service", "DELETED", service("a", "10.96.0.1"))
    changes = t.take()
    t.requeue(changes)
    assert t.take().services is None


def test_only_this_nodes_node_object_counts() -> None:
    t = ChangeTracker("node-a")
    t.take()
    t.event("Node", "ADDED", {"kind": "Node", "metadata": {"name": "node-b"}})
    assert not t.pending
    t.event(
        "Node",
        "ADDED",
        {
            "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        },
    )
    assert t.take().node_changed and t.node is not None and t.node.zone == "z1"


def service_cidr(name: str, *cidrs: str) -> dict[str, object]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def test_service_cidrs_are_tracked_and_a_bad_one_is_skipped_and_named() -> None:
    t = ChangeTracker("node-a")
    t.replace("ServiceCIDR", [service_cidr("b", "10.97.0.0/24"), service_cidr("a", "10.96.0.0/16")])
    first = t.take()
    assert first.service_cidrs_changed
    assert [str(c) for c in t.all_service_cidrs()] == ["10.96.0.0/16", "10.97.0.0/24"]
    # The same list again is no change; no Service is marked either way.
    t.replace("ServiceCIDR", [service_cidr("a", "10.96.0.0/16"), service_cidr("b", "10.97.0.0/24")])
    again = t.take()
    assert not again.service_cidrs_changed and again.services == set()

    t.event("ServiceCIDR", "MODIFIED", service_cidr("b", "10.97.0.0/99"))
    changes = t.take()
    assert changes.service_cidrs_changed and changes.services == set()
    assert [str(c) for c in t.all_service_cidrs()] == ["10.96.0.0/16"]
    (problem,) = t.take_problems()
    assert problem.kind == "ServiceCIDR" and problem.name == "b"

    # A failed sync puts the change back.
    t.event("ServiceCIDR", "DELETED", service_cidr("a", "10.96.0.0/16"))
    t.requeue(t.take())
    assert t.take().service_cidrs_changed and t.all_service_cidrs() == ()
