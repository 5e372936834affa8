"""The addresses a client can reach a Service on, and what happens to a new connection to each.

The verdict is never inferred: each connection is traced (`iptables.tracer`) through the rules
pyproxy would program, and this module only turns the walk into an outcome and a reason an
operator can act on. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyproxy.explain.endpoints import ServiceContext
from pyproxy.explain.report import (
    TRACE_CTSTATE,
    AddressKind,
    Candidate,
    Connection,
    EndpointView,
    Outcome,
    SourceChoice,
    SourceKind,
    join,
    plural,
    port_label,
    trace_path,
)
from pyproxy.iptables.restore_text import Ruleset, parse_rule
from pyproxy.iptables.tracer import Step, StepAction, Trace, Verdict, trace_packet
from pyproxy.iptables.vocabulary import (
    KUBE_EXTERNAL_SERVICES,
    KUBE_MARK_MASQ,
    KUBE_PROXY_FIREWALL,
)
from pyproxy.model import (
    IPAddress,
    IPFamily,
    LoadBalancerIPMode,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
)
from pyproxy.proxystate import ProxierConfig
from pyproxy.serviceport import service_ports_for_family

#: The made-up client used when no source is given and no --cluster-cidr says what a pod is.
EXAMPLE_EXTERNAL_CLIENT: Mapping[IPFamily, str] = {
    IPFamily.IPv4: "203.0.113.1",
    IPFamily.IPv6: "2001:db8:ffff::1",
}


def _location(step: Step) -> str:
    """`table/chain` of a rule. Not its position: explain leaves out rules that cannot match
    the traced packets, so positions would not be the kernel's; the rule text identifies it."""
    return f"{step.table}/{step.chain}"


def _comment(step: Step) -> str:
    if not step.rule:
        return ""
    try:
        return parse_rule(step.rule).comment or ""
    except ValueError:
        return ""


def _example_pod_ip(config: ProxierConfig, avoid: set[IPAddress]) -> IPAddress | None:
    cidr = config.cluster_cidr
    if cidr is None:
        return None
    for offset in range(2, 258):
        if offset >= cidr.num_addresses:
            break
        ip = cidr.network_address + offset
        if ip not in avoid:
            return ip
    return None


def choose_source(
    source: str | None, family: IPFamily, config: ProxierConfig, avoid: set[IPAddress]
) -> SourceChoice | None:
    """The source for this family's connections; None when `source` is of the other family."""
    if source == "node":
        ip = config.primary_node_ip
        if ip is None:
            return None
        return SourceChoice(str(ip), SourceKind.NODE, True, False)
    if source is not None:
        given = ipaddress.ip_address(source)
        if IPFamily.of(given) is not family:
            return None
        return SourceChoice(
            str(given), _source_kind(given, config), given in config.node_ips, False
        )
    pod = _example_pod_ip(config, avoid)
    if pod is not None:
        return SourceChoice(str(pod), SourceKind.POD, False, True)
    external = ipaddress.ip_address(EXAMPLE_EXTERNAL_CLIENT[family])
    return SourceChoice(str(external), SourceKind.EXTERNAL, False, True)


def _source_kind(ip: IPAddress, config: ProxierConfig) -> SourceKind:
    if ip in config.node_ips or ip.is_loopback:
        return SourceKind.NODE
    if config.cluster_cidr is not None and ip in config.cluster_cidr:
        return SourceKind.POD
    return SourceKind.EXTERNAL


@dataclass(frozen=True, slots=True)
class Target:
    """One address:port a client may use to reach the Service (cluster IP, a node IP's
    NodePort, an external or load-balancer IP)."""

    kind: AddressKind
    address: IPAddress
    port: int
    protocol: Protocol
    service_port: ServicePort | None
    #: A reason to report instead of tracing (e.g. ipMode Proxy), with its outcome.
    untraced: tuple[Outcome, str] | None = None


def address_targets(
    service: Service,
    family: IPFamily,
    config: ProxierConfig,
    ports: Sequence[ServicePort],
    unmatched_port: tuple[int, Protocol] | None,
) -> list[Target]:
    infos = {(i.name.port, i.protocol): i for i in service_ports_for_family(service, family)}
    proxy_lb = [
        i.ip
        for i in service.load_balancer_ingress
        if i.ip_mode is LoadBalancerIPMode.PROXY and IPFamily.of(i.ip) is family
    ]
    out: list[Target] = []

    def add(sp: ServicePort | None, port: int, node_port: int, protocol: Protocol) -> None:
        info = None if sp is None else infos.get((sp.name, sp.protocol))
        cluster_ip = (
            info.cluster_ip
            if info is not None
            else next(ip for ip in service.cluster_ips if IPFamily.of(ip) is family)
        )
        out.append(Target(AddressKind.CLUSTER_IP, cluster_ip, port, protocol, sp))
        if node_port:
            out.extend(
                Target(AddressKind.NODE_PORT, ip, node_port, protocol, sp) for ip in config.node_ips
            )
        external_ips = [ip for ip in service.external_ips if IPFamily.of(ip) is family]
        out.extend(Target(AddressKind.EXTERNAL_IP, ip, port, protocol, sp) for ip in external_ips)
        vips = [
            i.ip
            for i in service.load_balancer_ingress
            if i.ip_mode is LoadBalancerIPMode.VIP and IPFamily.of(i.ip) is family
        ]
        out.extend(Target(AddressKind.LOAD_BALANCER, ip, port, protocol, sp) for ip in vips)
        out.extend(
            Target(
                AddressKind.LOAD_BALANCER,
                ip,
                port,
                protocol,
                sp,
                (
                    Outcome.NOT_HANDLED,
                    "ipMode Proxy: kube-proxy writes no rules for this address; the load"
                    " balancer must forward the traffic to a node port",
                ),
            )
            for ip in proxy_lb
        )

    if unmatched_port is not None:
        port, protocol = unmatched_port
        # The same port on every address, NodePort included: where would such a packet go?
        has_node_ports = service.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
        add(None, port, port if has_node_ports else 0, protocol)
        return out
    for sp in ports:
        add(sp, sp.port, sp.node_port, sp.protocol)
    return out


def _short_circuited(trace: Trace) -> bool:
    return any(
        s.action is StepAction.JUMPED and _comment(s).startswith("pod traffic for")
        for s in trace.steps
    )


def _masquerade_reason(trace: Trace, kind: AddressKind, service: Service) -> str:
    for step in trace.steps:
        if step.action is not StepAction.JUMPED or step.target != KUBE_MARK_MASQ:
            continue
        try:
            rule = parse_rule(step.rule)
        except ValueError:
            continue
        comment = rule.comment or ""
        where = f" ({_location(step)})"
        if step.chain.startswith("KUBE-SEP-"):
            return (
                "hairpin: the endpoint is the source itself, so the reply must come back"
                " through this node" + where
            )
        if "masquerade LOCAL traffic" in comment:
            return "the connection comes from this node itself" + where
        if "masquerade traffic for" in comment:
            return (
                "externalTrafficPolicy is Cluster: the endpoint may be on another node, so the"
                " client address is replaced by this node's and replies come back through it"
                + where
            )
        if rule.source is not None and rule.source.negated:
            return (
                f"the source is outside --cluster-cidr {rule.source.value} (not a pod), so"
                " replies might not come back through this node" + where
            )
        if rule.source is None and "cluster IP" in comment:
            return "--masquerade-all is set" + where
        return f"{comment or 'marked for masquerade'}{where}"
    if (
        kind is not AddressKind.CLUSTER_IP
        and service.external_policy_local
        and not _short_circuited(trace)
    ):
        return "not masqueraded: externalTrafficPolicy Local keeps the client address"
    return ""


def _summarise_no_endpoints(ctx: ServiceContext, views: Sequence[EndpointView], label: str) -> str:
    if not ctx.slices:
        return "the Service has no EndpointSlices"
    mine = [p for v in views for p in v.ports if p.service_port == label]
    listed = [p for p in mine if p.target is not None]
    if not mine:
        return "its EndpointSlices list no endpoints"
    if not listed:
        return f"no EndpointSlice has a port named {label}"
    return f"none of its {plural(len(listed), 'endpoint')} is ready"


def _drop_reason(
    ctx: ServiceContext,
    views: Sequence[EndpointView],
    step: Step,
    *,
    conn_source: SourceChoice,
    target: Target,
    config: ProxierConfig,
) -> str:
    comment = _comment(step)
    verdict = step.target or "DROP"
    where = f" ({_location(step)})"
    label = (
        port_label(target.service_port.name, target.service_port.protocol)
        if target.service_port is not None
        else ""
    )
    if comment.endswith("has no endpoints"):
        return (
            f"{comment}: {_summarise_no_endpoints(ctx, views, label)}; the client gets ICMP"
            " port unreachable (connection refused)" + where
        )
    if comment.endswith("has no local endpoints"):
        nodes = sorted(
            {
                v.node or "no node"
                for v in views
                for p in v.ports
                if p.service_port == label and p.target is not None and (v.ready or v.serving)
            }
        )
        policy = (
            "externalTrafficPolicy"
            if step.chain == KUBE_EXTERNAL_SERVICES
            else "internalTrafficPolicy"
        )
        text = (
            f"{comment}: {policy} is Local and no endpoint is on {config.node_name}"
            f" (endpoints are on {join(nodes)}); the packet is dropped, so the client times out"
        )
        if policy == "externalTrafficPolicy" and ctx.service.needs_health_check:
            text += (
                f" (load balancers should skip this node: its health check node port"
                f" {ctx.service.health_check_node_port} answers 503)"
            )
        return text + where
    if step.chain == KUBE_PROXY_FIREWALL:
        ranges = join(str(n) for n in ctx.service.load_balancer_source_ranges)
        return (
            f"source {conn_source.address} is not in loadBalancerSourceRanges ({ranges});"
            " the packet is dropped" + where
        )
    if "block incoming localnet connections" in comment:
        return "connections to 127.0.0.0/8 from other hosts are blocked (CVE-2020-8558)" + where
    return f"{verdict} by {_location(step)}" + (f": {comment}" if comment else "")


def trace_connection(
    ctx: ServiceContext,
    views: Sequence[EndpointView],
    ruleset: Ruleset,
    *,
    config: ProxierConfig,
    target: Target,
    source: SourceChoice,
) -> Connection:
    svc_port = (
        None
        if target.service_port is None
        else port_label(target.service_port.name, target.service_port.protocol)
    )
    base = Connection(
        kind=target.kind,
        family=config.family,
        address=str(target.address),
        port=target.port,
        protocol=target.protocol,
        service_port=svc_port,
        source=source.address,
        source_kind=source.kind,
        from_node=source.from_node,
        outcome=Outcome.NOT_HANDLED,
        reason="",
    )
    if target.untraced is not None:
        outcome, reason = target.untraced
        return dataclasses.replace(base, outcome=outcome, reason=reason)
    trace = trace_packet(
        ruleset,
        src=source.address,
        dst=str(target.address),
        dport=target.port,
        protocol=target.protocol.lower,
        local_ips=[str(ip) for ip in config.node_ips],
        from_node=source.from_node,
        ctstate=TRACE_CTSTATE,
        # A new packet that met only pyproxy's rules carries no mark yet.
        mark=0,
        masquerade_mark=int(config.masquerade_mark, 16),
    )
    base = dataclasses.replace(
        base,
        path=trace_path(trace),
        warnings=trace.warnings,
        trace=trace,
        masquerade=trace.masquerade,
    )
    if trace.verdict in (Verdict.REJECT, Verdict.DROP):
        step = next(
            s
            for s in reversed(trace.steps)
            if s.action is StepAction.VERDICT and s.target == str(trace.verdict)
        )
        outcome = Outcome.REJECTED if trace.verdict is Verdict.REJECT else Outcome.DROPPED
        return dataclasses.replace(
            base,
            outcome=outcome,
            reason=_drop_reason(ctx, views, step, conn_source=source, target=target, config=config),
            decided_by=_location(step),
            rule=step.rule,
        )
    if trace.verdict is Verdict.DNAT:
        candidates = tuple(
            Candidate(b.endpoint, b.probability, b.masquerade) for b in trace.branches
        )
        n = len(candidates)
        reason = (
            f"DNAT to {candidates[0].endpoint}"
            if n == 1
            else f"DNAT to one of {n} endpoints, picked at random per connection"
        )
        notes: list[str] = []
        if _short_circuited(trace):
            notes.append(
                "a pod reaching an external address of an externalTrafficPolicy Local Service"
                " is short-circuited to every endpoint, as if it had left and come back in"
            )
        if ctx.service.session_affinity_timeout is not None:
            notes.append(
                f"ClientIP affinity keeps a client on its first endpoint for"
                f" {ctx.service.session_affinity_timeout}s"
            )
        reason = "; ".join([reason, *notes])
        dnat = next(s for s in trace.steps if s.action is StepAction.DNAT)
        return dataclasses.replace(
            base,
            outcome=Outcome.ANSWERED,
            reason=reason,
            notes=tuple(notes),
            endpoints=candidates,
            masquerade_reason=_masquerade_reason(trace, target.kind, ctx.service),
            decided_by=_location(dnat),
            rule=dnat.rule,
        )
    if trace.verdict is Verdict.ACCEPT:
        step = next(
            s
            for s in reversed(trace.steps)
            if s.action is StepAction.VERDICT and s.target == "ACCEPT"
        )
        comment = _comment(step)
        return dataclasses.replace(
            base,
            outcome=Outcome.ACCEPTED,
            reason=f"accepted by {_location(step)}" + (f": {comment}" if comment else ""),
            decided_by=_location(step),
            rule=step.rule,
        )
    return dataclasses.replace(
        base,
        outcome=Outcome.NOT_HANDLED,
        reason=_not_handled_reason(ctx, config, target),
    )


def _not_handled_reason(ctx: ServiceContext, config: ProxierConfig, target: Target) -> str:
    where = (
        "the node itself, where nothing of pyproxy listens"
        if target.address in config.node_ips
        else f"{target.address} unchanged, as if there were no Service"
    )
    text = (
        f"no pyproxy rule matches {target.port}/{target.protocol.value}: the packet goes to {where}"
    )
    if target.kind is AddressKind.NODE_PORT and target.service_port is not None:
        npips = config.nodeport_ips
        if npips is not None and target.address not in npips:
            text = (
                f"NodePorts are served only on {join(str(ip) for ip in npips)}"
                f" (--nodeport-addresses), not on {target.address}; {text}"
            )
    return text
