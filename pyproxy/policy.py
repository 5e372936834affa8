"""Which endpoints a service port sends traffic to from this node: upstream's CategorizeEndpoints.

One pure function, documented rule by rule, shared by every backend and by `pyproxy explain`:

- Cluster endpoints (used for Cluster traffic policy): the ready endpoints, narrowed by topology
  when topology can be used; if there are none, the serving-and-terminating ones.
- Local endpoints (used for Local traffic policy): this node's ready endpoints; if there are none,
  this node's serving-and-terminating ones.
- All reachable: the union, i.e. every endpoint that needs a KUBE-SEP chain on this node.
- has_any: the service has a usable endpoint anywhere (else its traffic is rejected).

Topology: PreferSameNode (node hints, behind a feature gate as upstream: beta and on by default
in 1.34) when every ready endpoint has node hints and one is for this node; else PreferSameZone
when every ready endpoint has zone hints and the node's zone label matches one. Hints are set
by the EndpointSlice controller from `spec.trafficDistribution` or the topology-mode annotation;
kube-proxy only reads the hints.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pyproxy.serviceport import EndpointInfo, ServicePortInfo


class TopologyMode(enum.Enum):
    NONE = "none"
    PREFER_SAME_ZONE = "PreferSameZone"
    PREFER_SAME_NODE = "PreferSameNode"


@dataclass(frozen=True, slots=True)
class CategorizedEndpoints:
    cluster: tuple[EndpointInfo, ...]
    local: tuple[EndpointInfo, ...]
    all_reachable: tuple[EndpointInfo, ...]
    has_any: bool
    topology: TopologyMode = TopologyMode.NONE


def topology_mode(
    endpoints: Sequence[EndpointInfo],
    *,
    node_name: str,
    zone: str | None,
    prefer_same_node: bool = True,
) -> TopologyMode:
    """Which topology filter applies to the Cluster endpoints, as upstream's canUseTopology."""
    ready = [ep for ep in endpoints if ep.ready]
    if not ready:
        return TopologyMode.NONE
    if (
        prefer_same_node
        and all(ep.node_hints for ep in ready)
        and any(node_name in ep.node_hints for ep in ready)
    ):
        return TopologyMode.PREFER_SAME_NODE
    if not all(ep.zone_hints for ep in ready) or not zone:
        return TopologyMode.NONE
    if any(zone in ep.zone_hints for ep in ready):
        return TopologyMode.PREFER_SAME_ZONE
    return TopologyMode.NONE


def available_for_topology(
    ep: EndpointInfo, mode: TopologyMode, *, node_name: str, zone: str | None
) -> bool:
    if mode is TopologyMode.PREFER_SAME_NODE:
        return node_name in ep.node_hints
    if mode is TopologyMode.PREFER_SAME_ZONE:
        return zone is not None and zone in ep.zone_hints
    return True


def categorize_endpoints(
    endpoints: Sequence[EndpointInfo],
    svc: ServicePortInfo,
    *,
    node_name: str,
    zone: str | None,
    prefer_same_node: bool = True,
) -> CategorizedEndpoints:
    """Split `endpoints` (sorted by `ip:port`) for `svc` as seen from this node."""
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    has_any = False
    mode = TopologyMode.NONE

    if svc.uses_cluster_endpoints:
        mode = topology_mode(
            endpoints, node_name=node_name, zone=zone, prefer_same_node=prefer_same_node
        )
        cluster = tuple(
            ep
            for ep in endpoints
            if ep.ready and available_for_topology(ep, mode, node_name=node_name, zone=zone)
        )
        if not cluster:
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)

    if not svc.uses_local_endpoints:
        return CategorizedEndpoints(cluster, (), cluster, has_any, mode)

    has_local_ready = has_local_serving_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            has_local_ready = has_local_ready or ep.is_local
        elif ep.serving and ep.terminating:
            has_any = True
            has_local_serving_terminating = has_local_serving_terminating or ep.is_local

    use_serving_terminating = False
    if has_local_ready:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.ready)
    elif has_local_serving_terminating:
        use_serving_terminating = True
        local = tuple(ep for ep in endpoints if ep.is_local and ep.serving and ep.terminating)

    if not svc.uses_cluster_endpoints:
        return CategorizedEndpoints(cluster, local, local, has_any, mode)
    if mode is TopologyMode.NONE and not use_serving_terminating:
        # Cluster endpoints are then every ready endpoint: a superset of the local ones.
        return CategorizedEndpoints(cluster, local, cluster, has_any, mode)
    merged = {ep.endpoint: ep for ep in cluster}
    merged.update((ep.endpoint, ep) for ep in local)
    all_reachable = tuple(sorted(merged.values(), key=lambda e: e.endpoint))
    return CategorizedEndpoints(cluster, local, all_reachable, has_any, mode)


@dataclass(frozen=True, slots=True)
class TrafficPaths:
    """Where internal and external traffic to one service port go, for every renderer:
    the Local policy chain (`*_local`) or the Cluster one, and whether it finds an endpoint
    there (`has_*`; without one it is rejected or dropped)."""

    internal_local: bool
    has_internal: bool
    external_local: bool
    has_external: bool


def traffic_paths(info: ServicePortInfo, categorized: CategorizedEndpoints) -> TrafficPaths:
    """The internal/external traffic policies applied to `categorized` (upstream's proxiers
    each compute this inline; iptables and nftables modes share it here)."""
    has_endpoints = categorized.has_any
    has_local = bool(categorized.local)
    return TrafficPaths(
        internal_local=info.internal_policy_local,
        has_internal=has_endpoints and (has_local or not info.internal_policy_local),
        external_local=info.external_policy_local,
        has_external=has_endpoints and (has_local or not info.external_policy_local),
    )
