"""The cluster state as the watches report it, and which Services changed since the last sync.

Event handlers only record (as upstream's OnServiceUpdate / OnEndpointSliceUpdate do): each event
converts one object into the model, updates the current state and marks the Service it belongs to
as changed. The sync takes a `Changes` snapshot, which says exactly which Services to recompute,
so the work per sync follows the size of the change, not the size of the cluster.

Pure and single-threaded; the controller serialises access with a lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.convert import (
    endpoint_slice_from_api,
    node_from_api,
    service_cidr_from_api,
    service_from_api,
)
from pyproxy.errors import InvalidObject
from pyproxy.model import EndpointSlice, IPNetwork, NamespacedName, Node, Service, ServiceCIDR

KINDS = ("Service", "EndpointSlice", "Node", "ServiceCIDR")


def _key(obj: Mapping[str, object]) -> NamespacedName:
    metadata = obj.get("metadata")
    meta = metadata if isinstance(metadata, Mapping) else {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    return NamespacedName(
        namespace if isinstance(namespace, str) else "", name if isinstance(name, str) else ""
    )


@dataclass(slots=True)
class Changes:
    """What one sync must do."""

    #: Services whose Service or EndpointSlices changed (None: recompute everything).
    services: set[NamespacedName] | None
    #: The node object changed (IPs, zone, eligibility): everything must be recomputed.
    node_changed: bool
    #: Earliest last-change-trigger-time per changed Service, for network programming latency.
    trigger_times: dict[NamespacedName, float]
    service_changes: int
    endpoint_changes: int
    #: The ServiceCIDR ranges changed (only watched in nftables mode): hand them over.
    service_cidrs_changed: bool = False


@dataclass
class ChangeTracker:
    node_name: str
    services: dict[NamespacedName, Service] = field(default_factory=dict)
    slices: dict[NamespacedName, EndpointSlice] = field(default_factory=dict)
    slices_by_service: dict[NamespacedName, dict[NamespacedName, EndpointSlice]] = field(
        default_factory=dict
    )
    node: Node | None = None
    #: ServiceCIDRs by name (networking.k8s.io/v1; watched in nftables mode only).
    service_cidrs: dict[str, ServiceCIDR] = field(default_factory=dict)
    problems: list[InvalidObject] = field(default_factory=list)
    _changed: set[NamespacedName] = field(default_factory=set)
    _all_changed: bool = True
    _node_changed: bool = True
    _service_cidrs_changed: bool = False
    _trigger_times: dict[NamespacedName, float] = field(default_factory=dict)
    _service_changes: int = 0
    _endpoint_changes: int = 0
    service_changes_total: int = 0
    endpoint_changes_total: int = 0

    # --- recording -------------------------------------------------------------------

    def _set_service(self, key: NamespacedName, service: Service | None) -> None:
        old = self.services.get(key)
        if old == service:
            return
        if service is None:
            self.services.pop(key, None)
        else:
            self.services[key] = service
        self._changed.add(key)
        self._service_changes += 1
        self.service_changes_total += 1

    def _set_slice(self, key: NamespacedName, new: EndpointSlice | None) -> None:
        old = self.slices.get(key)
        if old == new:
            return
        for es in (old, new):
            if es is None:
                continue
            self._changed.add(es.service)
            if es is new and es.last_change_trigger_time is not None:
                first = self._trigger_times.get(es.service, math.inf)
                self._trigger_times[es.service] = min(first, es.last_change_trigger_time)
        if old is not None:
            bucket = self.slices_by_service.get(old.service, {})
            bucket.pop(key, None)
            if not bucket:
                self.slices_by_service.pop(old.service, None)
        if new is None:
            self.slices.pop(key, None)
        else:
            self.slices[key] = new
            self.slices_by_service.setdefault(new.service, {})[key] = new
        self._endpoint_changes += 1
        self.endpoint_changes_total += 1

    def _set_node(self, node: Node | None) -> None:
        if node != self.node:
            self.node = node
            self._node_changed = True

    def _set_service_cidr(self, name: str, cidr: ServiceCIDR | None) -> None:
        if self.service_cidrs.get(name) != cidr:
            if cidr is None:
                del self.service_cidrs[name]
            else:
                self.service_cidrs[name] = cidr
            self._service_cidrs_changed = True

    def all_service_cidrs(self) -> tuple[IPNetwork, ...]:
        """Every ServiceCIDR's ranges, deduplicated and sorted (as ClusterState's)."""
        cidrs = {c for sc in self.service_cidrs.values() for c in sc.cidrs}
        return tuple(sorted(cidrs, key=lambda c: (c.version, c.network_address, c.prefixlen)))

    def _convert(self, kind: str, obj: Mapping[str, object]) -> object:
        """The model object, or None if ignored or invalid (invalid ones are recorded)."""
        try:
            if kind == "Service":
                return service_from_api(obj, self.problems)
            if kind == "EndpointSlice":
                return endpoint_slice_from_api(obj, self.problems)
            if kind == "Node":
                node = node_from_api(obj)
                return node if node.name == self.node_name else None
            if kind == "ServiceCIDR":
                return service_cidr_from_api(obj)
        except InvalidObject as problem:
            self.problems.append(problem)
        return None

    def event(self, kind: str, event_type: str, obj: Mapping[str, object]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        key = _key(obj)
        value = None if event_type == "DELETED" else self._convert(kind, obj)
        if kind == "Service":
            self._set_service(key, value if isinstance(value, Service) else None)
        elif kind == "EndpointSlice":
            self._set_slice(key, value if isinstance(value, EndpointSlice) else None)
        elif kind == "Node" and key.name == self.node_name:
            self._set_node(value if isinstance(value, Node) else None)
        elif kind == "ServiceCIDR":
            self._set_service_cidr(key.name, value if isinstance(value, ServiceCIDR) else None)

    def replace(self, kind: str, objects: Iterable[Mapping[str, object]]) -> None:
        """A complete list (first list, or relist after 410): objects not in it are gone."""
        seen: set[NamespacedName] = set()
        for obj in objects:
            key = _key(obj)
            seen.add(key)
            self.event(kind, "ADDED", obj)
        if kind == "Service":
            for key in [k for k in self.services if k not in seen]:
                self._set_service(key, None)
        elif kind == "EndpointSlice":
            for key in [k for k in self.slices if k not in seen]:
                self._set_slice(key, None)
        elif kind == "Node" and NamespacedName("", self.node_name) not in seen:
            self._set_node(None)
        elif kind == "ServiceCIDR":
            for name in [n for n in self.service_cidrs if NamespacedName("", n) not in seen]:
                self._set_service_cidr(name, None)

    # --- taking ----------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return (
            self._all_changed
            or self._node_changed
            or self._service_cidrs_changed
            or bool(self._changed)
        )

    @property
    def pending_counts(self) -> tuple[int, int]:
        """(service changes, endpoint changes) not yet synced."""
        return self._service_changes, self._endpoint_changes

    def take(self) -> Changes:
        changes = Changes(
            services=None if self._all_changed else set(self._changed),
            node_changed=self._node_changed,
            trigger_times=dict(self._trigger_times),
            service_changes=self._service_changes,
            endpoint_changes=self._endpoint_changes,
            service_cidrs_changed=self._service_cidrs_changed,
        )
        self._changed.clear()
        self._trigger_times.clear()
        self._all_changed = self._node_changed = self._service_cidrs_changed = False
        self._service_changes = self._endpoint_changes = 0
        return changes

    def requeue(self, changes: Changes) -> None:
        """A sync failed: what it took is pending again (and everything, to be safe)."""
        self._all_changed = True
        self._node_changed = self._node_changed or changes.node_changed
        self._service_cidrs_changed = self._service_cidrs_changed or changes.service_cidrs_changed
        for name, when in changes.trigger_times.items():
            self._trigger_times[name] = min(self._trigger_times.get(name, math.inf), when)

    def take_problems(self) -> list[InvalidObject]:
        problems, self.problems = self.problems, []
        return problems

    def snapshot(
        self,
    ) -> tuple[dict[NamespacedName, Service], dict[NamespacedName, tuple[EndpointSlice, ...]]]:
        """(Services, their EndpointSlices) as they are now, for computing states outside the
        lock while events keep coming in (the model objects are frozen: a shallow copy)."""
        return dict(self.services), {
            name: tuple(bucket.values()) for name, bucket in self.slices_by_service.items()
        }

    def slices_of(self, name: NamespacedName) -> Iterable[EndpointSlice]:
        return self.slices_by_service.get(name, {}).values()
