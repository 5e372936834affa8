"""The node-local desired state: what one IP family's proxier on this node must implement.

`ProxierConfig` holds the per-family facts about this node and the flags that shape rules
(node IPs, zone, local-traffic detection, masquerade settings, nodeport addresses). From it and
the cluster state, `service_state` computes, per Service, each service port with its endpoints
already categorized by the endpoint policy. Renderers take only this, so every backend and
`pyproxy explain` agree on what "this node would use" means.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from pyproxy.model import (
    ClusterState,
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    NamespacedName,
    Service,
)
from pyproxy.policy import CategorizedEndpoints, categorize_endpoints
from pyproxy.serviceport import (
    EndpointInfo,
    ServicePortInfo,
    endpoints_for_family,
    service_ports_for_family,
)

#: Upstream's largeClusterEndpointsThreshold: above this many endpoints, comments are dropped.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

#: Upstream's nfacct counter names (pkg/proxy/metrics): the iptables rules count packets into
#: them with `-m nfacct --nfacct-name NAME`, and /metrics reads them back on every scrape.
LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER = "localhost_nps_accepted_pkts"
CT_STATE_INVALID_DROPPED_NFACCT_COUNTER = "ct_state_invalid_dropped_pkts"
NFACCT_COUNTERS = (
    CT_STATE_INVALID_DROPPED_NFACCT_COUNTER,
    LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER,
)


@dataclass(frozen=True, slots=True)
class ProxierConfig:
    """Everything about this node and the flags that one family's rules depend on."""

    family: IPFamily
    node_name: str
    #: This family's addresses of this node; the first one is the primary node IP.
    node_ips: tuple[IPAddress, ...] = ()
    zone: str | None = None
    #: `--cluster-cidr` of this family (ClusterCIDR local-traffic detection), or None.
    cluster_cidr: IPNetwork | None = None
    masquerade_all: bool = False
    masquerade_bit: int = 14
    #: `--iptables-localhost-nodeports`, already forced off where it cannot apply.
    localhost_nodeports: bool = True
    #: `--nodeport-addresses` of this family; empty means every local address.
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    #: This family's addresses of the host's interfaces, matched against the nodeport CIDRs as
    #: upstream's GetNodeIPs does (an address need not be a node IP to take NodePorts). Filled
    #: in by the shell for real syncs; empty in a dry run, where the node IPs stand in.
    interface_ips: tuple[IPAddress, ...] = ()
    #: The PreferSameTrafficDistribution feature gate (node hints): on by default in 1.34.
    prefer_same_node: bool = True
    #: `nf_conntrack_tcp_be_liberal` was set on the host (drops the INVALID rule).
    conntrack_tcp_be_liberal: bool = False
    #: The nfacct counters the shell could ensure at start (upstream's nfAcctCounters set to
    #: true); only rules whose counter exists get `-m nfacct`, so without nfacct the rules are
    #: exactly those of a host without it. Empty in a dry run and with --once.
    nfacct_counters: frozenset[str] = frozenset()

    @property
    def primary_node_ip(self) -> IPAddress | None:
        return self.node_ips[0] if self.node_ips else None

    @property
    def masquerade_mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def nodeport_ips(self) -> tuple[IPAddress, ...] | None:
        """Node IPs NodePorts answer on, or None for "every local address"."""
        if not self.nodeport_addresses or any(n.prefixlen == 0 for n in self.nodeport_addresses):
            return None
        # The loopback interface is a local interface too; the renderer decides if it may be used.
        loopback = ipaddress.ip_address("127.0.0.1" if self.family is IPFamily.IPv4 else "::1")
        candidates = dict.fromkeys((loopback, *self.node_ips, *self.interface_ips))
        return tuple(ip for ip in candidates if any(ip in net for net in self.nodeport_addresses))


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """One service port with its endpoints and how this node would use them."""

    info: ServicePortInfo
    endpoints: tuple[EndpointInfo, ...]
    categorized: CategorizedEndpoints


#: One IP family's desired state: every Service with its service ports (what a proxier's
#: `sync` takes and `desired_state` returns). Services without ports of the family are absent.
ServiceStates: TypeAlias = Mapping[NamespacedName, tuple[ServicePortState, ...]]


def service_state(
    service: Service, slices: Iterable[EndpointSlice], config: ProxierConfig
) -> tuple[ServicePortState, ...]:
    """Every service port of `service` in `config.family`, endpoints categorized."""
    ports = service_ports_for_family(service, config.family)
    if not ports:
        return ()
    endpoints = endpoints_for_family(slices, config.family, config.node_name)
    result = []
    for info in ports:
        eps = endpoints.get(info.name, ())
        categorized = categorize_endpoints(
            eps,
            info,
            node_name=config.node_name,
            zone=config.zone,
            prefer_same_node=config.prefer_same_node,
        )
        result.append(ServicePortState(info, eps, categorized))
    return tuple(result)


def slices_by_service(
    slices: Iterable[EndpointSlice],
) -> dict[NamespacedName, list[EndpointSlice]]:
    grouped: dict[NamespacedName, list[EndpointSlice]] = defaultdict(list)
    for endpoint_slice in slices:
        grouped[endpoint_slice.service].append(endpoint_slice)
    return grouped


def desired_state(
    cluster: ClusterState, config: ProxierConfig
) -> dict[NamespacedName, tuple[ServicePortState, ...]]:
    """The whole family's desired state, Service by Service."""
    grouped = slices_by_service(cluster.endpoint_slices.values())
    states = {}
    for name, service in cluster.services.items():
        ports = service_state(service, grouped.get(name, ()), config)
        if ports:
            states[name] = ports
    return states


class LazyStates:
    """Every Service's desired state, computed on first use from a snapshot of the cluster.

    A full sync asks for the Services one by one in output order, so it can write the first
    ones' rules while the last ones are still to be computed. Non-empty states are stored into
    `into` as they are computed; once every name has been asked for, `into` is the family's
    complete state (what `desired_state` gives)."""

    def __init__(
        self,
        services: Mapping[NamespacedName, Service],
        slices: Mapping[NamespacedName, Sequence[EndpointSlice]],
        config: ProxierConfig,
        into: dict[NamespacedName, tuple[ServicePortState, ...]],
    ) -> None:
        self.services = services
        self.slices = slices
        self.config = config
        self.into = into

    def names(self) -> Iterable[NamespacedName]:
        """Every Service that may have a state (some turn out empty: other family, no ports)."""
        return self.services.keys()

    def get(self, name: NamespacedName) -> tuple[ServicePortState, ...]:
        ports = self.into.get(name)
        if ports is None:
            service = self.services.get(name)
            slices = self.slices.get(name, ())
            ports = service_state(service, slices, self.config) if service else ()
            if ports:
                self.into[name] = ports
        return ports

    def complete(self) -> dict[NamespacedName, tuple[ServicePortState, ...]]:
        """Compute every state now (for a mode that needs them all before it starts);
        returns `into`."""
        for name in self.names():
            self.get(name)
        return self.into

    def endpoints_upper_bound(self) -> int:
        """At least `count_endpoints` of the complete state, without computing it: each
        endpoint of a slice counts once per slice port (a service port takes each endpoint of
        a matching slice port at most once)."""
        return sum(
            len(es.endpoints) * max(1, len(es.ports))
            for name, slices in self.slices.items()
            if name in self.services
            for es in slices
        )


def count_endpoints(states: ServiceStates) -> int:
    """Upstream's totalEndpoints: endpoints of every existing service port, this family."""
    return sum(len(port.endpoints) for ports in states.values() for port in ports)


# --- output order -------------------------------------------------------------------------


def service_order(name: NamespacedName) -> tuple[str, str]:
    """Output order of Services (upstream's is random: it walks a Go map)."""
    return (name.namespace, name.name)


def port_order(state: ServicePortState) -> tuple[str, str]:
    """Output order of one Service's ports."""
    return (state.info.name.port, state.info.protocol.value)
