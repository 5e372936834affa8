"""One Service's report assembled (`explain_service`), and what pyproxy would program.

This is where the cluster state meets the renderer: the rules traced are the renderer's own
output for this node, assembled as a full sync does. `service_extras` reads what the model does
not keep (selector, targetPorts, why a Service is ignored) from the raw objects. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from pyproxy.errors import InvalidObject
from pyproxy.explain.connections import (
    Target,
    address_targets,
    choose_source,
    trace_connection,
)
from pyproxy.explain.diagnoses import (
    dedupe,
    family_diagnoses,
    port_diagnoses,
    problem_diagnoses,
)
from pyproxy.explain.endpoints import ServiceContext, endpoint_views
from pyproxy.explain.report import (
    AddressKind,
    Code,
    Connection,
    Diagnosis,
    Explanation,
    NodeSummary,
    Outcome,
    PortPolicy,
    ServiceExtras,
    Severity,
    SourceChoice,
    SourceKind,
    describe_port,
    join,
    port_label,
)
from pyproxy.iptables.render import (
    assemble_ruleset,
    is_large_cluster,
    render_ruleset,
    render_service_port,
)
from pyproxy.iptables.restore_text import Ruleset, parse_ruleset
from pyproxy.iptables.vocabulary import KUBE_PROXY_FIREWALL, jump_rules
from pyproxy.model import (
    LABEL_SERVICE_PROXY_NAME,
    ClusterState,
    EndpointSlice,
    IPAddress,
    IPFamily,
    NamespacedName,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
)
from pyproxy.proxystate import (
    ProxierConfig,
    ServicePortState,
    desired_state,
    port_order,
    service_order,
    service_state,
    slices_by_service,
)
from pyproxy.serviceport import ServicePortName


def desired_document(cluster: ClusterState, config: ProxierConfig) -> str:
    """The iptables-restore input a full sync writes on a node without rules: the ruleset plus
    the jumps from the built-in chains (what `pyproxy --dry-run` prints for this family)."""
    states = desired_state(cluster, config)
    ruleset = render_ruleset((p for ports in states.values() for p in ports), config)
    return ruleset.document(hooks=jump_rules(config))


def _touches(service: Service, addresses: set[IPAddress], ports: set[int]) -> bool:
    """Whether any rule of `service` can match a packet to one of `addresses` or `ports`: its
    dispatch and filter rules match its own IPs, or (node ports, health-check node ports) a
    port on any local address."""
    ips = (
        *service.cluster_ips,
        *service.external_ips,
        *(i.ip for i in service.load_balancer_ingress),
    )
    if any(ip in addresses for ip in ips):
        return True
    node_ports = {p.node_port for p in service.ports} | {service.health_check_node_port}
    return bool((node_ports - {0}) & ports)


def _endpoint_total(
    cluster: ClusterState,
    grouped: Mapping[NamespacedName, Sequence[EndpointSlice]],
    family: IPFamily,
) -> int:
    """Upstream's endpoint count for large-cluster mode (which only drops comments), from the
    slices without categorizing them; endpoints listed twice count twice."""
    total = 0
    for svc_name, svc in cluster.services.items():
        if not any(IPFamily.of(ip) is family for ip in svc.cluster_ips):
            continue
        names = {(p.name, p.protocol) for p in svc.ports}
        for endpoint_slice in grouped.get(svc_name, ()):
            if endpoint_slice.address_type is family:
                matching = sum((p.name, p.protocol) in names for p in endpoint_slice.ports)
                total += len(endpoint_slice.endpoints) * matching
    return total


def _family_rules(
    cluster: ClusterState,
    grouped: Mapping[NamespacedName, Sequence[EndpointSlice]],
    config: ProxierConfig,
    name: NamespacedName,
    targets: Sequence[Target],
    *,
    complete: bool,
) -> tuple[Ruleset, tuple[ServicePortState, ...]]:
    """The rules pyproxy would program for this family (with the built-in chains' hooks), and
    the Service's own port states.

    Rendering a big cluster costs seconds, and a packet to the Service's addresses can only
    meet the rules of Services sharing an address with it or owning a node port equal to a
    traced port; the others are left out unless `complete`. The renderer's own functions
    assemble the result, in the renderer's order, so the rules that are there are exactly
    the ones a full sync writes.
    """
    if complete:
        family_states = desired_state(cluster, config)
        rendered = render_ruleset((p for ps in family_states.values() for p in ps), config)
        return (
            parse_ruleset(rendered.document(hooks=jump_rules(config))),
            family_states.get(name, ()),
        )
    own = service_state(cluster.services[name], grouped.get(name, ()), config)
    addresses = {t.address for t in targets} | {e.ip for s in own for e in s.endpoints}
    ports = {t.port for t in targets} | {e.port for s in own for e in s.endpoints}
    chosen = list(own)
    for other_name, other in cluster.services.items():
        if other_name != name and _touches(other, addresses, ports):
            chosen.extend(service_state(other, grouped.get(other_name, ()), config))
    chosen.sort(key=lambda s: (service_order(s.info.name.namespaced_name), port_order(s)))
    large = is_large_cluster(_endpoint_total(cluster, grouped, config.family))
    ruleset = assemble_ruleset(
        [render_service_port(s, config, large_cluster_mode=large) for s in chosen], config
    )
    return parse_ruleset(ruleset.document(hooks=jump_rules(config))), own


def _node_summary(cluster: ClusterState, configs: Sequence[ProxierConfig]) -> NodeSummary:
    name = configs[0].node_name if configs else ""
    npips: list[IPAddress] = []
    every = False
    for c in configs:
        ips = c.nodeport_ips
        if ips is None:
            every = True
        else:
            npips.extend(ips)
    return NodeSummary(
        name=name,
        zone=configs[0].zone if configs else None,
        known=name in cluster.nodes,
        ips=tuple(ip for c in configs for ip in c.node_ips),
        families=tuple(c.family for c in configs),
        cluster_cidrs=tuple(str(c.cluster_cidr) for c in configs if c.cluster_cidr is not None),
        nodeport_ips=None if every else tuple(npips),
    )


def _select_ports(
    service: Service, port: str | None, protocol: Protocol | None
) -> tuple[tuple[ServicePort, ...], tuple[int, Protocol] | None]:
    """The service ports `--port`/`--protocol` pick, or () and (port, protocol) when the port
    is not one of the Service's (the caller traces it anyway)."""
    ports = tuple(p for p in service.ports if protocol is None or p.protocol is protocol)
    if port is None:
        return ports, None
    picked = tuple(
        p
        for p in ports
        if port in (p.name, str(p.port))
        or (port.isascii() and port.isdigit() and int(port) == p.node_port)
    )
    if picked:
        return picked, None
    if port.isascii() and port.isdigit():
        return (), (int(port), protocol or Protocol.TCP)
    return (), None


def explain_service(
    cluster: ClusterState,
    configs: Sequence[ProxierConfig],
    name: NamespacedName,
    *,
    port: str | None = None,
    protocol: Protocol | None = None,
    source: str | None = None,
    extras: ServiceExtras | None = None,
    problems: Sequence[InvalidObject] = (),
    complete: bool = False,
) -> Explanation:
    """Explain `name` as seen from the node `configs` describe (one config per IP family).

    `port` picks service ports by name, port or node port; `protocol` narrows them.
    `source` is an IP address, "node" (the node itself), or None (an example pod address in
    --cluster-cidr, else an example external client). Raises ValueError for a bad `source`.
    `complete` traces over every Service's rules instead of only those that can match the
    traced packets (same result, slower; see `_family_rules`).
    """
    extras = extras or ServiceExtras()
    if source is not None and source != "node":
        ipaddress.ip_address(source)  # ValueError for the caller
    node = _node_summary(cluster, configs)
    diagnoses: list[Diagnosis] = []
    if configs and not node.known:
        diagnoses.append(
            Diagnosis(
                Code.NODE_NOT_FOUND,
                Severity.WARNING,
                f"node {node.name!r} is not in the cluster state: pass --hostname-override with"
                " the node to explain from; its zone is unknown (topology hints are ignored)",
            )
        )
    service = cluster.services.get(name)
    if service is None:
        reason = extras.absent_reason
        related = [
            p
            for p in problems
            if p.kind == "Service" and p.namespace == name.namespace and p.name == name.name
        ]
        if related:
            reason = f"the Service is invalid and skipped: {related[0].field}: {related[0].reason}"
        if reason is not None:
            diagnoses.append(Diagnosis(Code.SERVICE_IGNORED, Severity.ERROR, reason))
        else:
            elsewhere = sorted(n.namespace for n in cluster.services if n.name == name.name)
            hint = (
                f" (found in namespace(s) {', '.join(elsewhere)}: use --namespace)"
                if elsewhere
                else ""
            )
            reason = f"no Service {name} in the cluster state{hint}"
            diagnoses.append(Diagnosis(Code.SERVICE_NOT_FOUND, Severity.ERROR, reason))
        return Explanation(
            service=name,
            node=node,
            found=False,
            absent_reason=reason,
            extras=extras,
            source_given=source,
            diagnoses=dedupe(diagnoses),
        )

    config_by_family = {c.family: c for c in configs}
    grouped = slices_by_service(cluster.endpoint_slices.values())
    slices = tuple(sorted(grouped.get(name, ()), key=lambda s: s.name))
    ports, unmatched = _select_ports(service, port, protocol)
    targets = {
        family: address_targets(service, family, config, ports, unmatched)
        for family, config in config_by_family.items()
        if any(IPFamily.of(ip) is family for ip in service.cluster_ips)
    }
    rulesets: dict[IPFamily, Ruleset] = {}
    states: dict[tuple[IPFamily, ServicePortName], ServicePortState] = {}
    for family, family_config in config_by_family.items():
        ruleset, own = _family_rules(
            cluster, grouped, family_config, name, targets.get(family, ()), complete=complete
        )
        rulesets[family] = ruleset
        for state in own:
            states[(family, state.info.name)] = state
    ctx = ServiceContext(service, extras, config_by_family, states, slices)

    if port is not None and not ports:
        kinds = ", ".join(describe_port(p, extras) for p in service.ports)
        how = (
            f"; from outside the cluster a {service.type.value} Service is reached on its"
            " nodePort on the node IPs, and on its port on the cluster IP"
            if service.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
            else ""
        )
        diagnoses.append(
            Diagnosis(
                Code.PORT_NOT_IN_SERVICE,
                Severity.ERROR,
                f"port {port}{'/' + protocol.value if protocol else ''} is not a port, name or"
                f" nodePort of this Service, so no rule matches it; its ports are {kinds}{how}",
            )
        )
    shown_ports = ports or service.ports
    views = endpoint_views(ctx, shown_ports)

    policy = tuple(
        PortPolicy(
            family=family,
            service_port=port_label(spn.port, spn.protocol),
            endpoints=tuple(e.endpoint for e in state.endpoints),
            cluster=tuple(e.endpoint for e in state.categorized.cluster),
            local=tuple(e.endpoint for e in state.categorized.local),
            topology=state.categorized.topology,
            has_any=state.categorized.has_any,
        )
        for (family, spn), state in sorted(
            states.items(), key=lambda kv: (kv[0][0].value, kv[0][1].port, kv[0][1].protocol.value)
        )
        if any(sp.name == spn.port and sp.protocol is spn.protocol for sp in shown_ports)
    )

    diagnoses.extend(port_diagnoses(ctx, shown_ports, views))
    diagnoses.extend(family_diagnoses(ctx))
    diagnoses.extend(problem_diagnoses(problems, name))

    avoid: set[IPAddress] = {ep.address for s in slices for ep in s.endpoints} | {
        ip for c in configs for ip in c.node_ips
    }
    sources: dict[IPFamily, SourceChoice] = {}
    connections: list[Connection] = []
    source_families_ok = False
    for family in ctx.families:
        config = config_by_family.get(family)
        cluster_ip = next(ip for ip in service.cluster_ips if IPFamily.of(ip) is family)
        if config is None:
            connections.append(
                Connection(
                    kind=AddressKind.CLUSTER_IP,
                    family=family,
                    address=str(cluster_ip),
                    port=shown_ports[0].port if shown_ports else 0,
                    protocol=shown_ports[0].protocol if shown_ports else Protocol.TCP,
                    service_port=None,
                    source=source or "",
                    source_kind=SourceKind.EXTERNAL,
                    from_node=False,
                    outcome=Outcome.NOT_APPLICABLE,
                    reason=f"this node has no {family.value} address, so it writes no"
                    f" {family.value} rules",
                )
            )
            continue
        chosen = choose_source(source, family, config, avoid)
        if chosen is None:
            connections.append(
                Connection(
                    kind=AddressKind.CLUSTER_IP,
                    family=family,
                    address=str(cluster_ip),
                    port=shown_ports[0].port if shown_ports else 0,
                    protocol=shown_ports[0].protocol if shown_ports else Protocol.TCP,
                    service_port=None,
                    source=source or "",
                    source_kind=SourceKind.EXTERNAL,
                    from_node=source == "node",
                    outcome=Outcome.NOT_APPLICABLE,
                    reason=f"the source is not {family.value}: a connection cannot change IP"
                    f" family, so the Service's {family.value} addresses are out of its reach",
                )
            )
            continue
        source_families_ok = True
        sources[family] = chosen
        for target in targets[family]:
            conn = trace_connection(
                ctx, views, rulesets[family], config=config, target=target, source=chosen
            )
            connections.append(conn)
            if (
                conn.outcome is Outcome.DROPPED
                and conn.decided_by is not None
                and conn.decided_by.startswith(f"filter/{KUBE_PROXY_FIREWALL}")
            ):
                example = (
                    " (an example address: pass --from with the real client)"
                    if chosen.example
                    else ""
                )
                diagnoses.append(
                    Diagnosis(
                        Code.SOURCE_RANGE_EXCLUDES_CLIENT,
                        Severity.ERROR,
                        f"the client {chosen.address}{example} is not in loadBalancerSourceRanges"
                        f" ({join(str(n) for n in service.load_balancer_source_ranges)}):"
                        f" connections to {conn.address}:{conn.port} are dropped",
                    )
                )
            if (
                conn.outcome is Outcome.NOT_HANDLED
                and conn.kind is AddressKind.NODE_PORT
                and conn.service_port is not None
                and config.nodeport_ips is not None
                and target.address not in config.nodeport_ips
            ):
                diagnoses.append(
                    Diagnosis(
                        Code.NODEPORT_ADDRESS_EXCLUDED,
                        Severity.WARNING,
                        f"node IP {target.address} is not in --nodeport-addresses: NodePorts"
                        f" answer only on {join(str(ip) for ip in config.nodeport_ips)}",
                    )
                )
    if source is not None and source != "node" and not source_families_ok:
        fam = IPFamily.of(ipaddress.ip_address(source))
        diagnoses.append(
            Diagnosis(
                Code.OTHER_IP_FAMILY,
                Severity.ERROR,
                f"the source {source} is {fam.value} but the Service has only"
                f" {join(f.value for f in ctx.families)} addresses"
                + ("" if fam in ctx.configs else f" (and this node has no {fam.value} address)")
                + ": a connection cannot change IP family",
            )
        )

    return Explanation(
        service=name,
        node=node,
        spec=service,
        extras=extras,
        source_given=source,
        sources=sources,
        slices=slices,
        endpoints=views,
        policy=policy,
        connections=tuple(connections),
        diagnoses=dedupe(diagnoses),
    )


ApiObject = Mapping[str, Any]


def service_extras(objects: Sequence[ApiObject], name: NamespacedName) -> ServiceExtras:
    """What the model does not keep about the Service: selector, targetPorts, and why it is
    ignored when it is (read from the raw object, leniently: convert validates the rest)."""
    for obj in objects:
        meta = obj.get("metadata")
        if obj.get("kind") != "Service" or not isinstance(meta, Mapping):
            continue
        if meta.get("namespace") != name.namespace or meta.get("name") != name.name:
            continue
        spec = obj.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        raw_selector = spec.get("selector")
        selector = (
            {str(k): str(v) for k, v in raw_selector.items()}
            if isinstance(raw_selector, Mapping)
            else {}
        )
        target_ports: dict[tuple[str, Protocol], str] = {}
        for raw in spec.get("ports") or ():
            if not isinstance(raw, Mapping):
                continue
            try:
                protocol = Protocol(str(raw.get("protocol") or "TCP"))
            except ValueError:
                continue
            target = raw.get("targetPort")
            if target is not None:
                target_ports[(str(raw.get("name") or ""), protocol)] = str(target)
        labels = meta.get("labels")
        labels = labels if isinstance(labels, Mapping) else {}
        absent = None
        if LABEL_SERVICE_PROXY_NAME in labels:
            absent = (
                f"the Service is labelled {LABEL_SERVICE_PROXY_NAME}="
                f"{labels[LABEL_SERVICE_PROXY_NAME]}: another service proxy handles it, so"
                " pyproxy (like kube-proxy) ignores it"
            )
        elif spec.get("type") == "ExternalName":
            absent = (
                "the Service is of type ExternalName: a DNS alias (CNAME) without a cluster IP;"
                " no proxy rules exist for it"
            )
        elif _first_cluster_ip(spec) in ("None", ""):
            absent = (
                "the Service is headless (clusterIP: None): DNS returns the pod addresses"
                " directly; no proxy rules exist for it"
            )
        return ServiceExtras(selector, target_ports, absent)
    return ServiceExtras()


def _first_cluster_ip(spec: Mapping[str, Any]) -> str:
    ips = spec.get("clusterIPs")
    if isinstance(ips, list) and ips:
        return str(ips[0])
    return str(spec.get("clusterIP") or "")
