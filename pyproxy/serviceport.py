"""Service ports and endpoints as one single-family proxier sees them.

Upstream runs one proxier per IP family; each sees a Service as a set of ServicePortInfo (one per
`spec.ports` entry, with only that family's cluster IP, external IPs, LB IPs and source ranges)
and the endpoints of each port gathered from the Service's EndpointSlices of that family, matched
by port name and protocol. This module computes exactly those two views, per Service, so the
shell can recompute only the Services that changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from pyproxy.model import (
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    LoadBalancerIPMode,
    NamespacedName,
    Protocol,
    Service,
    format_endpoint,
)

_T = TypeVar("_T", IPAddress, IPNetwork)


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """`ns/name:port` (or `ns/name` for an unnamed port) plus the protocol."""

    namespace: str
    name: str
    port: str
    protocol: Protocol

    @property
    def namespaced_name(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    """One port of one Service in one IP family, with upstream's derived predicates."""

    name: ServicePortName
    cluster_ip: IPAddress
    port: int
    node_port: int = 0
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_vips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    #: ClientIP affinity timeout, or None without session affinity.
    session_affinity_timeout: int | None = None
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    @property
    def externally_accessible(self) -> bool:
        return self.node_port != 0 or bool(self.load_balancer_vips) or bool(self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Even with externalTrafficPolicy Local, Cluster endpoints implement short-circuiting.
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (
            self.external_policy_local and self.externally_accessible
        )


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One endpoint of one service port; `endpoint` is `ip:port` / `[ip]:port`."""

    endpoint: str
    ip: IPAddress
    port: int
    is_local: bool
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()

    @staticmethod
    def make(
        ip: IPAddress,
        port: int,
        *,
        is_local: bool,
        ready: bool = True,
        serving: bool = True,
        terminating: bool = False,
        node_name: str | None = None,
        zone: str | None = None,
        zone_hints: frozenset[str] = frozenset(),
        node_hints: frozenset[str] = frozenset(),
    ) -> EndpointInfo:
        return EndpointInfo(
            format_endpoint(ip, port),
            ip,
            port,
            is_local,
            ready,
            serving,
            terminating,
            node_name,
            zone,
            zone_hints,
            node_hints,
        )


def _of_family(items: Iterable[_T], family: IPFamily) -> tuple[_T, ...]:
    return tuple(item for item in items if IPFamily.of(item) is family)


def service_ports_for_family(service: Service, family: IPFamily) -> tuple[ServicePortInfo, ...]:
    """The service ports one family's proxier has for `service` (none without a cluster IP)."""
    cluster_ip = next((ip for ip in service.cluster_ips if IPFamily.of(ip) is family), None)
    if cluster_ip is None:
        return ()
    external_ips = _of_family(service.external_ips, family)
    # Proxy-mode load balancers get no local rules: traffic must really go through the LB.
    vips = _of_family(
        (i.ip for i in service.load_balancer_ingress if i.ip_mode is LoadBalancerIPMode.VIP),
        family,
    )
    source_ranges = _of_family(service.load_balancer_source_ranges, family)
    hcnp = service.health_check_node_port if service.needs_health_check else 0
    return tuple(
        ServicePortInfo(
            name=ServicePortName(service.namespace, service.name, port.name, port.protocol),
            cluster_ip=cluster_ip,
            port=port.port,
            node_port=port.node_port,
            external_ips=external_ips,
            load_balancer_vips=vips,
            load_balancer_source_ranges=source_ranges,
            session_affinity_timeout=service.session_affinity_timeout,
            external_policy_local=service.external_policy_local,
            internal_policy_local=service.internal_policy_local,
            health_check_node_port=hcnp,
        )
        for port in service.ports
    )


def endpoints_for_family(
    slices: Iterable[EndpointSlice], family: IPFamily, node_name: str
) -> dict[ServicePortName, tuple[EndpointInfo, ...]]:
    """Endpoints per service port from one Service's slices, as upstream's EndpointSliceCache.

    Slices of the other family are ignored; an endpoint listed by several slices counts once
    (a local copy wins); each port's endpoints are sorted by `ip:port` text as upstream does.
    """
    merged: dict[ServicePortName, dict[str, EndpointInfo]] = {}
    for endpoint_slice in sorted(slices, key=lambda s: s.name):
        if endpoint_slice.address_type is not family:
            continue
        for port in endpoint_slice.ports:
            spn = ServicePortName(
                endpoint_slice.namespace, endpoint_slice.service_name, port.name, port.protocol
            )
            bucket = merged.setdefault(spn, {})
            for ep in endpoint_slice.endpoints:
                is_local = ep.node_name == node_name
                info = EndpointInfo.make(
                    ep.address,
                    port.port,
                    is_local=is_local,
                    ready=ep.ready,
                    serving=ep.serving,
                    terminating=ep.terminating,
                    node_name=ep.node_name,
                    zone=ep.zone,
                    zone_hints=ep.zone_hints,
                    node_hints=ep.node_hints,
                )
                if info.endpoint not in bucket or is_local:
                    bucket[info.endpoint] = info
    return {
        spn: tuple(sorted(bucket.values(), key=lambda e: e.endpoint))
        for spn, bucket in merged.items()
    }
