"""The cluster as pyproxy sees it: Services, EndpointSlices and Nodes, already validated.

These types are what `convert` produces from API objects and what the node-local state
(`proxystate`) is computed from. Nothing here knows Kubernetes JSON field names, and nothing
here does I/O: every value is frozen, so a snapshot can be shared between the sync loop, the
renderers and `pyproxy explain` without copying.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The label kube-proxy's informers use to ignore objects handled by another service proxy.
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
#: The label the EndpointSlice controller puts on slices of headless Services.
LABEL_HEADLESS = "service.kubernetes.io/headless"
#: The label naming the Service an EndpointSlice belongs to.
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
#: The node label topology hints are matched against.
LABEL_TOPOLOGY_ZONE = "topology.kubernetes.io/zone"
#: The annotation the EndpointSlice controller sets to when the change was triggered.
ANNOTATION_LAST_CHANGE_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"

#: Default ClientIP affinity timeout (3 hours), as the API server defaults it.
DEFAULT_AFFINITY_TIMEOUT_SECONDS = 10800


class Protocol(enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lower(self) -> str:
        return self.value.lower()


class IPFamily(enum.Enum):
    IPv4 = "IPv4"
    IPv6 = "IPv6"

    @staticmethod
    def of(ip: IPAddress | IPNetwork) -> IPFamily:
        return IPFamily.IPv4 if ip.version == 4 else IPFamily.IPv6


class ServiceType(enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(enum.Enum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class LoadBalancerIPMode(enum.Enum):
    VIP = "VIP"
    PROXY = "Proxy"


@dataclass(frozen=True, slots=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of a Service's `spec.ports`."""

    name: str
    protocol: Protocol
    port: int
    node_port: int = 0


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    ip: IPAddress
    ip_mode: LoadBalancerIPMode = LoadBalancerIPMode.VIP


@dataclass(frozen=True, slots=True)
class Service:
    """A Service that has a cluster IP (headless and ExternalName ones never get here)."""

    namespace: str
    name: str
    type: ServiceType
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    #: ClientIP affinity timeout in seconds, or None for no session affinity.
    session_affinity_timeout: int | None = None
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    health_check_node_port: int = 0
    #: `spec.trafficDistribution`, kept for explanations; kube-proxy acts on slice hints only.
    traffic_distribution: str | None = None

    @property
    def namespaced_name(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    @property
    def externally_accessible(self) -> bool:
        """As upstream's apiservice.ExternallyAccessible: NodePort, LoadBalancer, or externalIPs."""
        return self.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) or (
            self.type is ServiceType.CLUSTER_IP and bool(self.external_ips)
        )

    @property
    def external_policy_local(self) -> bool:
        return self.externally_accessible and self.external_traffic_policy is TrafficPolicy.LOCAL

    @property
    def internal_policy_local(self) -> bool:
        return self.internal_traffic_policy is TrafficPolicy.LOCAL

    @property
    def needs_health_check(self) -> bool:
        return self.type is ServiceType.LOAD_BALANCER and self.external_policy_local


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a slice; only `addresses[0]` matters, as for kube-proxy."""

    address: IPAddress
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: IPFamily
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]
    #: `endpoints.kubernetes.io/last-change-trigger-time`, seconds since the epoch, if set.
    last_change_trigger_time: float | None = None

    @property
    def service(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    #: Node addresses, InternalIP ones first, then ExternalIP ones (kube-proxy's order).
    addresses: tuple[IPAddress, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    being_deleted: bool = False

    @property
    def zone(self) -> str | None:
        return self.labels.get(LABEL_TOPOLOGY_ZONE)


@dataclass(frozen=True, slots=True)
class ServiceCIDR:
    """A networking.k8s.io/v1 ServiceCIDR: ranges cluster IPs are allocated from. nftables
    mode drops traffic to addresses in them that no Service has."""

    name: str
    cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything the proxy reads from the API, keyed for incremental updates."""

    services: Mapping[NamespacedName, Service] = field(default_factory=dict)
    #: EndpointSlices keyed by (namespace, slice name).
    endpoint_slices: Mapping[NamespacedName, EndpointSlice] = field(default_factory=dict)
    nodes: Mapping[str, Node] = field(default_factory=dict)
    service_cidrs: Mapping[str, ServiceCIDR] = field(default_factory=dict)

    def all_service_cidrs(self) -> tuple[IPNetwork, ...]:
        """Every ServiceCIDR's ranges, deduplicated and sorted (upstream joins an unordered
        set; sorting makes the rule text stable)."""
        cidrs = {c for sc in self.service_cidrs.values() for c in sc.cidrs}
        return tuple(sorted(cidrs, key=lambda c: (c.version, c.network_address, c.prefixlen)))


def format_endpoint(ip: IPAddress, port: int) -> str:
    """Go's net.JoinHostPort: `10.0.0.1:80`, `[fd00::1]:80`."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
