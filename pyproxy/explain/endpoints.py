"""Which endpoints each service port uses on this node, and why not the others.

The choice itself is `proxystate.service_state` (the renderer's own `policy.categorize_endpoints`);
this module only puts a reason on every endpoint the policy left out. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyproxy.explain.report import (
    WHY_FAMILY_NOT_SERVED,
    WHY_NOT_READY,
    WHY_OTHER_FAMILY,
    WHY_OTHER_NODE,
    WHY_POLICY,
    WHY_PORT_NAME,
    WHY_TERMINATING,
    WHY_TOPOLOGY_NODE,
    WHY_TOPOLOGY_ZONE,
    EndpointPortUse,
    EndpointView,
    ServiceExtras,
    Usage,
    join,
    port_label,
)
from pyproxy.model import (
    Endpoint,
    EndpointSlice,
    IPFamily,
    Service,
    ServicePort,
    format_endpoint,
)
from pyproxy.policy import TopologyMode, available_for_topology
from pyproxy.proxystate import ProxierConfig, ServicePortState
from pyproxy.serviceport import EndpointInfo, ServicePortName


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What the endpoint, connection and diagnosis code read about the Service explained: its
    spec, the node's config per family, and the policy's choice per service port."""

    service: Service
    extras: ServiceExtras
    configs: Mapping[IPFamily, ProxierConfig]
    states: Mapping[tuple[IPFamily, ServicePortName], ServicePortState]
    slices: tuple[EndpointSlice, ...]

    @property
    def families(self) -> tuple[IPFamily, ...]:
        return tuple(IPFamily.of(ip) for ip in self.service.cluster_ips)

    def spn(self, sp: ServicePort) -> ServicePortName:
        svc = self.service
        return ServicePortName(svc.namespace, svc.name, sp.name, sp.protocol)


def _why_not(
    info: EndpointInfo,
    state: ServicePortState,
    *,
    local_policy: bool,
    policy_name: str,
    config: ProxierConfig,
) -> Usage:
    """Explain an endpoint `categorize_endpoints` left out of the chain this traffic uses."""
    if not info.ready and not (info.serving and info.terminating):
        what = "terminating and not serving" if info.terminating else "not ready"
        return Usage(False, WHY_NOT_READY, f"{what}")
    if not info.ready:
        return Usage(
            False,
            WHY_TERMINATING,
            "terminating: serving-terminating endpoints are used only when no endpoint is ready",
        )
    if local_policy and not info.is_local:
        where = f"on node {info.node_name}" if info.node_name else "on no node (nodeName unset)"
        return Usage(
            False,
            WHY_OTHER_NODE,
            f"{where}, and {policy_name} is Local: only endpoints on {config.node_name} are used",
        )
    mode = state.categorized.topology
    if not available_for_topology(info, mode, node_name=config.node_name, zone=config.zone):
        if mode is TopologyMode.PREFER_SAME_NODE:
            return Usage(
                False,
                WHY_TOPOLOGY_NODE,
                f"topology hints send it to node(s) {join(sorted(info.node_hints))},"
                f" not {config.node_name}",
            )
        return Usage(
            False,
            WHY_TOPOLOGY_ZONE,
            f"topology hint for zone(s) {join(sorted(info.zone_hints))}; this node is in zone"
            f" {config.zone}",
        )
    return Usage(False, WHY_POLICY, "not selected by the endpoint policy")


def _usage(
    info: EndpointInfo,
    chosen: Sequence[EndpointInfo],
    state: ServicePortState,
    *,
    local_policy: bool,
    policy_name: str,
    config: ProxierConfig,
) -> Usage:
    if any(ep.endpoint == info.endpoint for ep in chosen):
        if not info.ready:
            return Usage(True, WHY_TERMINATING, "terminating, used because no endpoint is ready")
        if local_policy:
            return Usage(True, "", f"on this node; {policy_name} Local")
        return Usage(True)
    return _why_not(info, state, local_policy=local_policy, policy_name=policy_name, config=config)


def _endpoint_port_use(
    ctx: ServiceContext, endpoint_slice: EndpointSlice, ep: Endpoint, sp: ServicePort
) -> EndpointPortUse:
    label = port_label(sp.name, sp.protocol)
    family = endpoint_slice.address_type
    slice_port = next(
        (p for p in endpoint_slice.ports if p.name == sp.name and p.protocol is sp.protocol), None
    )
    target = None if slice_port is None else format_endpoint(ep.address, slice_port.port)
    external_possible = ctx.service.externally_accessible

    def same(usage: Usage) -> EndpointPortUse:
        return EndpointPortUse(label, target, usage, usage if external_possible else None)

    if family not in ctx.families:
        return same(
            Usage(
                False,
                WHY_OTHER_FAMILY,
                f"{family.value} address, but the Service has no {family.value} cluster IP",
            )
        )
    config = ctx.configs.get(family)
    if config is None:
        return same(
            Usage(
                False,
                WHY_FAMILY_NOT_SERVED,
                f"this node has no {family.value} address, so it writes no {family.value} rules",
            )
        )
    if slice_port is None or target is None:
        have = join(
            (f"{p.name or '(unnamed)'}/{p.protocol.value}" for p in endpoint_slice.ports),
            "no ports",
        )
        return same(
            Usage(
                False,
                WHY_PORT_NAME,
                f"its EndpointSlice has no port named {sp.name!r} ({sp.protocol.value});"
                f" it has {have}",
            )
        )
    state = ctx.states[(family, ctx.spn(sp))]
    info = next(e for e in state.endpoints if e.endpoint == target)
    cat = state.categorized
    internal_local = state.info.internal_policy_local
    internal = _usage(
        info,
        cat.local if internal_local else cat.cluster,
        state,
        local_policy=internal_local,
        policy_name="internalTrafficPolicy",
        config=config,
    )
    external = None
    if state.info.externally_accessible:
        external_local = state.info.external_policy_local
        external = _usage(
            info,
            cat.local if external_local else cat.cluster,
            state,
            local_policy=external_local,
            policy_name="externalTrafficPolicy",
            config=config,
        )
    return EndpointPortUse(label, target, internal, external)


def endpoint_views(ctx: ServiceContext, ports: Sequence[ServicePort]) -> tuple[EndpointView, ...]:
    views = []
    for endpoint_slice in ctx.slices:
        config = ctx.configs.get(endpoint_slice.address_type)
        for ep in endpoint_slice.endpoints:
            views.append(
                EndpointView(
                    address=str(ep.address),
                    family=endpoint_slice.address_type,
                    slice=endpoint_slice.name,
                    node=ep.node_name,
                    zone=ep.zone,
                    local=config is not None and ep.node_name == config.node_name,
                    ready=ep.ready,
                    serving=ep.serving,
                    terminating=ep.terminating,
                    zone_hints=tuple(sorted(ep.zone_hints)),
                    node_hints=tuple(sorted(ep.node_hints)),
                    ports=tuple(_endpoint_port_use(ctx, endpoint_slice, ep, sp) for sp in ports),
                )
            )
    return tuple(views)
