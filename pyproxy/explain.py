"""Why a Service does or does not answer from this node: `pyproxy explain` and `pyproxy trace`.

"My Service does not answer" is the most common networking support question, and kube-proxy's
only answer is raw iptables-save output. pyproxy knows the desired state and the rules, so it can
answer in plain words. Nothing here decides anything on its own:

- which endpoints this node uses comes from `proxystate.service_state`, i.e. the same
  `policy.categorize_endpoints` the renderer uses; this module only *explains* an endpoint the
  policy left out (not ready, terminating, another node under a Local policy, a topology hint
  for another zone or node, no slice port of that name, another address family);
- what happens to a connection comes from running the packet tracer (`iptables.tracer`) over the
  rules pyproxy would program (the renderer's own output, assembled as a full sync does, with the
  jumps from the built-in chains), starting at PREROUTING/OUTPUT with conntrack state NEW, as
  the kernel would. Only the Services whose rules can match the traced packets are rendered
  (same result, see `_family_rules`; a test checks it against the whole ruleset), so a rule is
  named by its chain and text, not by its position;
- drift compares the rules pyproxy would program with `iptables-save` output, chain by chain,
  after parsing both with `iptables.restore_text` (counters, option order and iptables-save's
  spellings such as `/32`, `--set-xmark`, `--mask`, `--reject-with` do not count as drift).

Pure: no I/O. The shell (`explain_cli`) loads the state, reads iptables-save and prints.

JSON (`Explanation.to_json`, `PacketReport.to_json`; keys are stable, new keys may be added):

    explain: {service, found, absent_reason, type, cluster_ips, external_ips,
              load_balancer_ingress: [{ip, ip_mode}], load_balancer_source_ranges,
              external_traffic_policy, internal_traffic_policy, session_affinity_timeout,
              health_check_node_port, traffic_distribution, selector,
              ports: [{name, protocol, port, node_port, target_port}],
              node: {name, zone, known, ips, families, cluster_cidrs, nodeport_ips},
              source: {given, families: {IPv4: {address, kind, from_node, example}}},
              endpoint_slices: [{name, address_type, ports: [{name, protocol, port}], endpoints}],
              endpoints: [{address, family, slice, node, zone, local, ready, serving,
                           terminating, zone_hints, node_hints, used,
                           ports: [{service_port, target,
                                    internal: {used, code, reason},
                                    external: {used, code, reason} | null}]}],
              policy: [{family, service_port, endpoints, cluster, local, topology, has_any}],
              connections: [{kind, family, address, port, protocol, service_port, source,
                             source_kind, from_node, outcome, reason, endpoints:
                             [{endpoint, probability, masquerade}], masquerade,
                             masquerade_reason, decided_by, rule, path, warnings, notes}],
              diagnoses: [{code, severity, message}]}
    trace:   {src, dst, port, protocol, family, from_node, ctstate, verdict, filter_verdict,
              backend (added by the CLI: legacy or nft),
              endpoints: [{endpoint, probability, masquerade}], masquerade, path,
              steps: [{table, chain, index, action, target, rule, note, depth}], warnings,
              drift: null | {checked, chains: [{table, chain, kind, detail, missing_rules,
                                              unexpected_rules}]}}

`connections[].outcome` is one of `answered` (DNAT to `endpoints`), `rejected` (ICMP, the
client sees "connection refused"), `dropped` (the client times out), `accepted` (a filter rule
accepted it without DNAT, e.g. a health-check node port), `not-handled` (no pyproxy rule
matches: the packet goes on to the address as if pyproxy did not exist) and `not-applicable`
(the source cannot reach that address at all, e.g. another IP family). Diagnosis codes are the
`Code` values below; `drift.chains[].kind` is `missing`, `unexpected`, `different` or
`missing-hook`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pyproxy.errors import InvalidObject
from pyproxy.iptables.render import (
    KUBE_EXTERNAL_SERVICES,
    KUBE_MARK_MASQ,
    KUBE_PROXY_FIREWALL,
    assemble_ruleset,
    is_large_cluster,
    is_service_chain,
    jump_rules,
    port_order,
    render_ruleset,
    render_service_port,
    service_order,
)
from pyproxy.iptables.restore_text import (
    AddressMatch,
    MarkTarget,
    PortMatch,
    RecentMatch,
    Rule,
    Ruleset,
    Statistic,
    Table,
    parse_rule,
    parse_ruleset,
)
from pyproxy.iptables.tracer import Step, StepAction, Trace, Verdict, trace_packet
from pyproxy.model import (
    ClusterState,
    Endpoint,
    EndpointSlice,
    IPAddress,
    IPFamily,
    LoadBalancerIPMode,
    NamespacedName,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    format_endpoint,
)
from pyproxy.policy import TopologyMode, available_for_topology
from pyproxy.proxystate import (
    ProxierConfig,
    ServicePortState,
    desired_state,
    service_state,
    slices_by_service,
)
from pyproxy.serviceport import EndpointInfo, ServicePortName, service_ports_for_family

#: The made-up client used when no source is given and no --cluster-cidr says what a pod is.
EXAMPLE_EXTERNAL_CLIENT: Mapping[IPFamily, str] = {
    IPFamily.IPv4: "203.0.113.1",
    IPFamily.IPv6: "2001:db8:ffff::1",
}
#: The conntrack state traced packets carry: a new connection, as the first packet of one.
TRACE_CTSTATE = "NEW"


class Severity(enum.StrEnum):
    ERROR = "error"  # the Service (or this address of it) cannot work as configured
    WARNING = "warning"  # works, but not the way one would expect
    INFO = "info"


class Code(enum.StrEnum):
    """Misconfigurations and notable facts `pyproxy explain` recognises."""

    SERVICE_NOT_FOUND = "service-not-found"
    SERVICE_IGNORED = "service-ignored"
    NODE_NOT_FOUND = "node-not-found"
    SELECTOR_MATCHES_NO_PODS = "selector-matches-no-pods"
    NO_SELECTOR_NO_ENDPOINTS = "no-selector-no-endpoints"
    PORT_NAME_MISMATCH = "port-name-mismatch"
    ENDPOINTS_NOT_READY = "endpoints-not-ready"
    ONLY_TERMINATING_ENDPOINTS = "only-terminating-endpoints"
    NO_LOCAL_ENDPOINTS = "no-local-endpoints"
    SOURCE_RANGE_EXCLUDES_CLIENT = "source-range-excludes-client"
    PORT_NOT_IN_SERVICE = "port-not-in-service"
    NODEPORT_ADDRESS_EXCLUDED = "nodeport-address-excluded"
    OTHER_IP_FAMILY = "other-ip-family"
    FAMILY_NOT_SERVED = "family-not-served"
    INVALID_OBJECT = "invalid-object"
    TOPOLOGY = "topology"
    PROXY_IP_MODE = "lb-ip-mode-proxy"


class Outcome(enum.StrEnum):
    ANSWERED = "answered"
    REJECTED = "rejected"
    DROPPED = "dropped"
    ACCEPTED = "accepted"
    NOT_HANDLED = "not-handled"
    NOT_APPLICABLE = "not-applicable"


class AddressKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "externalIP"
    LOAD_BALANCER = "LoadBalancer"


class SourceKind(enum.StrEnum):
    POD = "pod"  # inside --cluster-cidr
    NODE = "node"  # one of this node's addresses: the packet starts in OUTPUT
    EXTERNAL = "external"


# Reasons an endpoint is not used (EndpointPortUse.internal/external .code).
WHY_NOT_READY = "not-ready"
WHY_TERMINATING = "terminating"
WHY_OTHER_NODE = "other-node-local-policy"
WHY_TOPOLOGY_ZONE = "topology-other-zone"
WHY_TOPOLOGY_NODE = "topology-other-node"
WHY_PORT_NAME = "port-name-mismatch"
WHY_OTHER_FAMILY = "other-address-family"
WHY_FAMILY_NOT_SERVED = "family-not-served"
WHY_POLICY = "not-selected"


# --- input the converter does not keep ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceExtras:
    """Facts about the Service's API object that the model leaves out, read by the shell.

    `selector` None means unknown; an empty mapping means the Service has no selector.
    `target_ports` maps (port name, protocol) to the targetPort as written ("8080", "web").
    `absent_reason` says why a Service present in the API is not in the model (headless,
    ExternalName, another proxy's label).
    """

    selector: Mapping[str, str] | None = None
    target_ports: Mapping[tuple[str, Protocol], str] = field(default_factory=dict)
    absent_reason: str | None = None


# --- the result --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Diagnosis:
    code: Code
    severity: Severity
    message: str

    def to_json(self) -> dict[str, object]:
        return {"code": str(self.code), "severity": str(self.severity), "message": self.message}


@dataclass(frozen=True, slots=True)
class Usage:
    """Whether one kind of traffic (internal: cluster IP; external: node ports, external and
    LB IPs) reaches an endpoint from this node; `code`/`reason` say why not (or a note)."""

    used: bool
    code: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"used": self.used, "code": self.code or None, "reason": self.reason or None}


@dataclass(frozen=True, slots=True)
class EndpointPortUse:
    service_port: str  # "http/TCP" ("" name: "TCP")
    target: str | None  # "10.0.0.1:8080", or None when the slice has no such port
    internal: Usage
    external: Usage | None  # None: the Service is not externally accessible

    def to_json(self) -> dict[str, object]:
        return {
            "service_port": self.service_port,
            "target": self.target,
            "internal": self.internal.to_json(),
            "external": None if self.external is None else self.external.to_json(),
        }


@dataclass(frozen=True, slots=True)
class EndpointView:
    address: str
    family: IPFamily
    slice: str
    node: str | None
    zone: str | None
    local: bool
    ready: bool
    serving: bool
    terminating: bool
    zone_hints: tuple[str, ...]
    node_hints: tuple[str, ...]
    ports: tuple[EndpointPortUse, ...]

    @property
    def used(self) -> bool:
        return any(
            p.internal.used or (p.external is not None and p.external.used) for p in self.ports
        )

    def to_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "family": self.family.value,
            "slice": self.slice,
            "node": self.node,
            "zone": self.zone,
            "local": self.local,
            "ready": self.ready,
            "serving": self.serving,
            "terminating": self.terminating,
            "zone_hints": list(self.zone_hints),
            "node_hints": list(self.node_hints),
            "used": self.used,
            "ports": [p.to_json() for p in self.ports],
        }


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """What `categorize_endpoints` decided for one service port in one family."""

    family: IPFamily
    service_port: str
    endpoints: tuple[str, ...]
    cluster: tuple[str, ...]
    local: tuple[str, ...]
    topology: TopologyMode
    has_any: bool

    def to_json(self) -> dict[str, object]:
        return {
            "family": self.family.value,
            "service_port": self.service_port,
            "endpoints": list(self.endpoints),
            "cluster": list(self.cluster),
            "local": list(self.local),
            "topology": self.topology.value,
            "has_any": self.has_any,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint a connection may land on."""

    endpoint: str
    probability: float
    masquerade: bool

    def to_json(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "probability": round(self.probability, 6),
            "masquerade": self.masquerade,
        }


@dataclass(frozen=True, slots=True)
class Connection:
    """A new connection from the source to one address of the Service, as the rules treat it."""

    kind: AddressKind
    family: IPFamily
    address: str
    port: int
    protocol: Protocol
    service_port: str | None  # None: the port is not one of the Service's
    source: str
    source_kind: SourceKind
    from_node: bool
    outcome: Outcome
    reason: str
    endpoints: tuple[Candidate, ...] = ()
    masquerade: bool = False
    masquerade_reason: str = ""
    decided_by: str | None = None  # "filter/KUBE-SERVICES #3"
    rule: str | None = None
    path: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: Extra facts about an answered connection (ClientIP affinity, the eTP Local short-circuit).
    notes: tuple[str, ...] = ()
    trace: Trace | None = field(default=None, compare=False, repr=False)

    @property
    def target(self) -> str:
        address = format_endpoint(ipaddress.ip_address(self.address), self.port)
        return f"{address}/{self.protocol.value}"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "family": self.family.value,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol.value,
            "service_port": self.service_port,
            "source": self.source,
            "source_kind": str(self.source_kind),
            "from_node": self.from_node,
            "outcome": str(self.outcome),
            "reason": self.reason,
            "endpoints": [c.to_json() for c in self.endpoints],
            "masquerade": self.masquerade,
            "masquerade_reason": self.masquerade_reason or None,
            "decided_by": self.decided_by,
            "rule": self.rule,
            "path": list(self.path),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


@dataclass(frozen=True, slots=True)
class NodeSummary:
    name: str
    zone: str | None
    known: bool  # the Node object is in the cluster state
    ips: tuple[IPAddress, ...]
    families: tuple[IPFamily, ...]
    cluster_cidrs: tuple[str, ...]
    nodeport_ips: tuple[IPAddress, ...] | None  # None: every local address

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "zone": self.zone,
            "known": self.known,
            "ips": [str(ip) for ip in self.ips],
            "families": [f.value for f in self.families],
            "cluster_cidrs": list(self.cluster_cidrs),
            "nodeport_ips": None
            if self.nodeport_ips is None
            else [str(ip) for ip in self.nodeport_ips],
        }


@dataclass(frozen=True, slots=True)
class SourceChoice:
    address: str
    kind: SourceKind
    from_node: bool
    example: bool  # made up by explain, not given by the user

    def to_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "kind": str(self.kind),
            "from_node": self.from_node,
            "example": self.example,
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    service: NamespacedName
    node: NodeSummary
    found: bool = True
    absent_reason: str | None = None
    spec: Service | None = None
    extras: ServiceExtras = field(default_factory=ServiceExtras)
    source_given: str | None = None
    sources: Mapping[IPFamily, SourceChoice] = field(default_factory=dict)
    slices: tuple[EndpointSlice, ...] = ()
    endpoints: tuple[EndpointView, ...] = ()
    policy: tuple[PortPolicy, ...] = ()
    connections: tuple[Connection, ...] = ()
    diagnoses: tuple[Diagnosis, ...] = ()

    @property
    def codes(self) -> tuple[Code, ...]:
        return tuple(d.code for d in self.diagnoses)

    def to_json(self) -> dict[str, object]:
        svc = self.spec
        extras = self.extras
        out: dict[str, object] = {
            "service": str(self.service),
            "found": self.found,
            "absent_reason": self.absent_reason,
        }
        if svc is not None:
            out.update(
                {
                    "type": svc.type.value,
                    "cluster_ips": [str(ip) for ip in svc.cluster_ips],
                    "external_ips": [str(ip) for ip in svc.external_ips],
                    "load_balancer_ingress": [
                        {"ip": str(i.ip), "ip_mode": i.ip_mode.value}
                        for i in svc.load_balancer_ingress
                    ],
                    "load_balancer_source_ranges": [
                        str(n) for n in svc.load_balancer_source_ranges
                    ],
                    "external_traffic_policy": svc.external_traffic_policy.value,
                    "internal_traffic_policy": svc.internal_traffic_policy.value,
                    "session_affinity_timeout": svc.session_affinity_timeout,
                    "health_check_node_port": svc.health_check_node_port,
                    "traffic_distribution": svc.traffic_distribution,
                    "selector": None if extras.selector is None else dict(extras.selector),
                    "ports": [
                        {
                            "name": p.name,
                            "protocol": p.protocol.value,
                            "port": p.port,
                            "node_port": p.node_port,
                            "target_port": extras.target_ports.get((p.name, p.protocol)),
                        }
                        for p in svc.ports
                    ],
                }
            )
        out.update(
            {
                "node": self.node.to_json(),
                "source": {
                    "given": self.source_given,
                    "families": {f.value: s.to_json() for f, s in self.sources.items()},
                },
                "endpoint_slices": [
                    {
                        "name": s.name,
                        "address_type": s.address_type.value,
                        "ports": [
                            {"name": p.name, "protocol": p.protocol.value, "port": p.port}
                            for p in s.ports
                        ],
                        "endpoints": len(s.endpoints),
                    }
                    for s in self.slices
                ],
                "endpoints": [e.to_json() for e in self.endpoints],
                "policy": [p.to_json() for p in self.policy],
                "connections": [c.to_json() for c in self.connections],
                "diagnoses": [d.to_json() for d in self.diagnoses],
            }
        )
        return out


# --- small helpers -----------------------------------------------------------------------


def port_label(name: str, protocol: Protocol) -> str:
    """`http/TCP`, or `TCP` for an unnamed port."""
    return f"{name}/{protocol.value}" if name else protocol.value


def _describe_port(sp: ServicePort, extras: ServiceExtras) -> str:
    text = f"{sp.port}/{sp.protocol.value}"
    if sp.name:
        text = f"{sp.name!r} ({text}"
        closing = ")"
    else:
        text = f"({text}"
        closing = ")"
    target = extras.target_ports.get((sp.name, sp.protocol))
    if target is not None:
        text += f", targetPort {target!r}" if not target.isdigit() else f", targetPort {target}"
    if sp.node_port:
        text += f", nodePort {sp.node_port}"
    return text + closing


def _join(items: Iterable[str], empty: str = "none") -> str:
    values = list(items)
    return ", ".join(values) if values else empty


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


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


def _path(trace: Trace) -> tuple[str, ...]:
    """Every chain the walk entered, in order: `nat/PREROUTING`, `nat/KUBE-SERVICES`, ..."""
    seen: dict[str, None] = {}
    for step in trace.steps:
        if step.action is StepAction.ENTER:
            seen.setdefault(f"{step.table}/{step.chain}", None)
        elif (
            step.action in (StepAction.JUMPED, StepAction.GOTO, StepAction.BRANCHED) and step.target
        ):
            seen.setdefault(f"{step.table}/{step.target}", None)
    return tuple(seen)


# --- endpoints ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
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
                f"topology hints send it to node(s) {_join(sorted(info.node_hints))},"
                f" not {config.node_name}",
            )
        return Usage(
            False,
            WHY_TOPOLOGY_ZONE,
            f"topology hint for zone(s) {_join(sorted(info.zone_hints))}; this node is in zone"
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
    ctx: _Context, endpoint_slice: EndpointSlice, ep: Endpoint, sp: ServicePort
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
        have = _join(
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


def _endpoint_views(ctx: _Context, ports: Sequence[ServicePort]) -> tuple[EndpointView, ...]:
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


# --- connections -------------------------------------------------------------------------


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


def _choose_source(
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
class _Target:
    kind: AddressKind
    address: IPAddress
    port: int
    protocol: Protocol
    service_port: ServicePort | None
    #: A reason to report instead of tracing (e.g. ipMode Proxy), with its outcome.
    untraced: tuple[Outcome, str] | None = None


def _targets(
    service: Service,
    family: IPFamily,
    config: ProxierConfig,
    ports: Sequence[ServicePort],
    unmatched_port: tuple[int, Protocol] | None,
) -> list[_Target]:
    infos = {(i.name.port, i.protocol): i for i in service_ports_for_family(service, family)}
    proxy_lb = [
        i.ip
        for i in service.load_balancer_ingress
        if i.ip_mode is LoadBalancerIPMode.PROXY and IPFamily.of(i.ip) is family
    ]
    out: list[_Target] = []

    def add(sp: ServicePort | None, port: int, node_port: int, protocol: Protocol) -> None:
        info = None if sp is None else infos.get((sp.name, sp.protocol))
        cluster_ip = (
            info.cluster_ip
            if info is not None
            else next(ip for ip in service.cluster_ips if IPFamily.of(ip) is family)
        )
        out.append(_Target(AddressKind.CLUSTER_IP, cluster_ip, port, protocol, sp))
        if node_port:
            out.extend(
                _Target(AddressKind.NODE_PORT, ip, node_port, protocol, sp)
                for ip in config.node_ips
            )
        external_ips = [ip for ip in service.external_ips if IPFamily.of(ip) is family]
        out.extend(_Target(AddressKind.EXTERNAL_IP, ip, port, protocol, sp) for ip in external_ips)
        vips = [
            i.ip
            for i in service.load_balancer_ingress
            if i.ip_mode is LoadBalancerIPMode.VIP and IPFamily.of(i.ip) is family
        ]
        out.extend(_Target(AddressKind.LOAD_BALANCER, ip, port, protocol, sp) for ip in vips)
        out.extend(
            _Target(
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


def _summarise_no_endpoints(ctx: _Context, views: Sequence[EndpointView], label: str) -> str:
    if not ctx.slices:
        return "the Service has no EndpointSlices"
    mine = [p for v in views for p in v.ports if p.service_port == label]
    listed = [p for p in mine if p.target is not None]
    if not mine:
        return "its EndpointSlices list no endpoints"
    if not listed:
        return f"no EndpointSlice has a port named {label}"
    return f"none of its {_plural(len(listed), 'endpoint')} is ready"


def _drop_reason(
    ctx: _Context,
    views: Sequence[EndpointView],
    step: Step,
    *,
    conn_source: SourceChoice,
    target: _Target,
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
            f" (endpoints are on {_join(nodes)}); the packet is dropped, so the client times out"
        )
        if policy == "externalTrafficPolicy" and ctx.service.needs_health_check:
            text += (
                f" (load balancers should skip this node: its health check node port"
                f" {ctx.service.health_check_node_port} answers 503)"
            )
        return text + where
    if step.chain == KUBE_PROXY_FIREWALL:
        ranges = _join(str(n) for n in ctx.service.load_balancer_source_ranges)
        return (
            f"source {conn_source.address} is not in loadBalancerSourceRanges ({ranges});"
            " the packet is dropped" + where
        )
    if "block incoming localnet connections" in comment:
        return "connections to 127.0.0.0/8 from other hosts are blocked (CVE-2020-8558)" + where
    return f"{verdict} by {_location(step)}" + (f": {comment}" if comment else "")


def _connection(
    ctx: _Context,
    views: Sequence[EndpointView],
    ruleset: Ruleset,
    *,
    config: ProxierConfig,
    target: _Target,
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
        path=_path(trace),
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


def _not_handled_reason(ctx: _Context, config: ProxierConfig, target: _Target) -> str:
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
                f"NodePorts are served only on {_join(str(ip) for ip in npips)}"
                f" (--nodeport-addresses), not on {target.address}; {text}"
            )
    return text


# --- diagnoses ---------------------------------------------------------------------------


def _port_diagnoses(
    ctx: _Context, ports: Sequence[ServicePort], views: Sequence[EndpointView]
) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    total = sum(len(s.endpoints) for s in ctx.slices)
    if not ctx.slices or total == 0:
        what = "no EndpointSlices" if not ctx.slices else "EndpointSlices with no endpoints"
        if ctx.extras.selector is not None and not ctx.extras.selector:
            out.append(
                Diagnosis(
                    Code.NO_SELECTOR_NO_ENDPOINTS,
                    Severity.ERROR,
                    f"the Service has no selector and {what}: someone must create its"
                    " EndpointSlices (labelled kubernetes.io/service-name); until then every"
                    " connection is rejected",
                )
            )
        else:
            selector = (
                ""
                if not ctx.extras.selector
                else " ("
                + ",".join(f"{k}={v}" for k, v in sorted(ctx.extras.selector.items()))
                + ")"
            )
            out.append(
                Diagnosis(
                    Code.SELECTOR_MATCHES_NO_PODS,
                    Severity.ERROR,
                    f"the Service has {what}: its selector{selector} matches no pods (check"
                    " the pods' labels and namespace); every connection is rejected",
                )
            )
        return out

    served = [f for f in ctx.families if f in ctx.configs]
    for sp in ports:
        label = port_label(sp.name, sp.protocol)
        slice_ports = {
            (p.name, p.protocol)
            for s in ctx.slices
            if s.address_type in served and s.endpoints
            for p in s.ports
        }
        listed = any(s.endpoints and s.address_type in served for s in ctx.slices)
        if listed and (sp.name, sp.protocol) not in slice_ports:
            same_name = [p for p in slice_ports if p[0] == sp.name]
            have = _join(sorted(port_label(n, p) for n, p in slice_ports), "no ports")
            target = ctx.extras.target_ports.get((sp.name, sp.protocol))
            hint = ""
            if same_name:
                hint = " (same name, other protocol)"
            elif target is not None and not target.isdigit():
                hint = (
                    f"; targetPort {target!r} is a name: the pods must declare a container port"
                    f" named {target!r}, or the EndpointSlice controller leaves this port out"
                )
            elif target is not None:
                hint = f" (targetPort {target})"
            out.append(
                Diagnosis(
                    Code.PORT_NAME_MISMATCH,
                    Severity.ERROR,
                    f"Service port {_describe_port(sp, ctx.extras)} has no matching port in the"
                    f" EndpointSlices, which list {have}{hint}; connections to this port are"
                    " rejected",
                )
            )
            continue
        for family in served:
            state = ctx.states.get((family, ctx.spn(sp)))
            if state is None or not state.endpoints:
                continue
            eps = state.endpoints
            cat = state.categorized
            fam = f" ({family.value})" if len(served) > 1 else ""
            if not any(e.ready for e in eps):
                n_terminating = sum(e.serving and e.terminating for e in eps)
                terminating = _plural(n_terminating, "serving-terminating endpoint") + (
                    " is" if n_terminating == 1 else " are"
                )
                if cat.has_any:
                    out.append(
                        Diagnosis(
                            Code.ONLY_TERMINATING_ENDPOINTS,
                            Severity.WARNING,
                            f"port {label}{fam}: no endpoint is ready; {terminating} used"
                            " meanwhile (rollout or scale-down in progress?)",
                        )
                    )
                else:
                    out.append(
                        Diagnosis(
                            Code.ENDPOINTS_NOT_READY,
                            Severity.ERROR,
                            f"port {label}{fam}: all {_plural(len(eps), 'endpoint')} are not"
                            " ready (readiness probe failing, or pods starting); connections are"
                            " rejected",
                        )
                    )
                continue
            info = state.info
            config = ctx.configs[family]
            remote = _join(sorted({e.node_name or "no node" for e in eps if e.ready}))
            if info.external_policy_local and info.externally_accessible and not cat.local:
                out.append(
                    Diagnosis(
                        Code.NO_LOCAL_ENDPOINTS,
                        Severity.WARNING,
                        f"port {label}{fam}: externalTrafficPolicy is Local and this node"
                        f" ({config.node_name}) has no endpoint (they are on {remote}):"
                        " external traffic to node ports, external IPs and load-balancer IPs is"
                        " dropped here; pods and the node itself still reach the Service",
                    )
                )
            if info.internal_policy_local and not cat.local:
                out.append(
                    Diagnosis(
                        Code.NO_LOCAL_ENDPOINTS,
                        Severity.ERROR,
                        f"port {label}{fam}: internalTrafficPolicy is Local and this node"
                        f" ({config.node_name}) has no endpoint (they are on {remote}):"
                        " connections to the cluster IP from here are dropped",
                    )
                )
            if cat.topology is not TopologyMode.NONE:
                skipped = [
                    e.endpoint
                    for e in eps
                    if e.ready
                    and not available_for_topology(
                        e, cat.topology, node_name=config.node_name, zone=config.zone
                    )
                ]
                if skipped:
                    out.append(
                        Diagnosis(
                            Code.TOPOLOGY,
                            Severity.INFO,
                            f"port {label}{fam}: topology ({cat.topology.value}) keeps this"
                            f" node's cluster traffic on {_join(e.endpoint for e in cat.cluster)};"
                            f" {_join(skipped)} are hinted for other zones or nodes",
                        )
                    )
    return out


def _family_diagnoses(ctx: _Context) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    svc = ctx.service
    families = set(ctx.families)
    for family in ctx.families:
        if family not in ctx.configs:
            out.append(
                Diagnosis(
                    Code.FAMILY_NOT_SERVED,
                    Severity.WARNING,
                    f"this node has no {family.value} address (--node-ip or the Node object),"
                    f" so it writes no {family.value} rules: the Service's {family.value}"
                    " addresses do not work from here",
                )
            )
    other = [s for s in ctx.slices if s.address_type not in families and s.endpoints]
    for endpoint_slice in other:
        slice_family = endpoint_slice.address_type.value
        out.append(
            Diagnosis(
                Code.OTHER_IP_FAMILY,
                Severity.WARNING,
                f"EndpointSlice {endpoint_slice.name} holds {slice_family} endpoints but the"
                f" Service has no {slice_family} cluster IP (ipFamilies/ipFamilyPolicy): they"
                " are never used",
            )
        )
    for what, ips in (
        ("externalIP", svc.external_ips),
        ("load-balancer IP", tuple(i.ip for i in svc.load_balancer_ingress)),
    ):
        for ip in ips:
            fam = IPFamily.of(ip)
            if fam not in families:
                out.append(
                    Diagnosis(
                        Code.OTHER_IP_FAMILY,
                        Severity.ERROR,
                        f"{what} {ip} is {fam.value} but the Service has no {fam.value}"
                        " cluster IP: no rules are written for it",
                    )
                )
    for ingress in svc.load_balancer_ingress:
        if ingress.ip_mode is LoadBalancerIPMode.PROXY:
            out.append(
                Diagnosis(
                    Code.PROXY_IP_MODE,
                    Severity.INFO,
                    f"load-balancer IP {ingress.ip} has ipMode Proxy: traffic to it must go"
                    " through the load balancer, which forwards to node ports",
                )
            )
    return out


def _problem_diagnoses(problems: Sequence[InvalidObject], name: NamespacedName) -> list[Diagnosis]:
    """Objects the converter skipped that belong to this Service (slices by name prefix: the
    EndpointSlice controller names them `<service>-<suffix>`)."""
    out = []
    for p in problems:
        if p.namespace != name.namespace:
            continue
        if p.kind == "EndpointSlice" and (
            p.name == name.name or p.name.startswith(f"{name.name}-")
        ):
            other_family = p.field.endswith("addresses[0]") and " is not an " in p.reason
            out.append(
                Diagnosis(
                    Code.OTHER_IP_FAMILY if other_family else Code.INVALID_OBJECT,
                    Severity.WARNING,
                    f"EndpointSlice {p.name}: {p.field}: {p.reason}; that endpoint is skipped",
                )
            )
    return out


def _dedupe(diagnoses: Iterable[Diagnosis]) -> tuple[Diagnosis, ...]:
    return tuple(dict.fromkeys(diagnoses))


# --- entry points ------------------------------------------------------------------------


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
    targets: Sequence[_Target],
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
            diagnoses=_dedupe(diagnoses),
        )

    config_by_family = {c.family: c for c in configs}
    grouped = slices_by_service(cluster.endpoint_slices.values())
    slices = tuple(sorted(grouped.get(name, ()), key=lambda s: s.name))
    ports, unmatched = _select_ports(service, port, protocol)
    targets = {
        family: _targets(service, family, config, ports, unmatched)
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
    ctx = _Context(service, extras, config_by_family, states, slices)

    if port is not None and not ports:
        kinds = ", ".join(_describe_port(p, extras) for p in service.ports)
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
    views = _endpoint_views(ctx, shown_ports)

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

    diagnoses.extend(_port_diagnoses(ctx, shown_ports, views))
    diagnoses.extend(_family_diagnoses(ctx))
    diagnoses.extend(_problem_diagnoses(problems, name))

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
        chosen = _choose_source(source, family, config, avoid)
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
            conn = _connection(
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
                        f" ({_join(str(n) for n in service.load_balancer_source_ranges)}):"
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
                        f" answer only on {_join(str(ip) for ip in config.nodeport_ips)}",
                    )
                )
    if source is not None and source != "node" and not source_families_ok:
        fam = IPFamily.of(ipaddress.ip_address(source))
        diagnoses.append(
            Diagnosis(
                Code.OTHER_IP_FAMILY,
                Severity.ERROR,
                f"the source {source} is {fam.value} but the Service has only"
                f" {_join(f.value for f in ctx.families)} addresses"
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
        diagnoses=_dedupe(diagnoses),
    )


# --- trace and drift ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainDrift:
    """One chain whose kernel rules differ from what pyproxy would program."""

    table: str
    chain: str
    kind: str  # "missing", "unexpected", "different", "missing-hook"
    detail: str
    missing_rules: tuple[str, ...] = ()  # pyproxy would write these; the kernel lacks them
    unexpected_rules: tuple[str, ...] = ()  # the kernel has these; pyproxy would not write them

    def to_json(self) -> dict[str, object]:
        return {
            "table": self.table,
            "chain": self.chain,
            "kind": self.kind,
            "detail": self.detail,
            "missing_rules": list(self.missing_rules),
            "unexpected_rules": list(self.unexpected_rules),
        }


_PROTOCOL_MODULES = frozenset({"tcp", "udp", "sctp", "udplite", "comment"})
_ALL_ONES = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}


def _norm_address(match: AddressMatch | None) -> AddressMatch | None:
    if match is None:
        return None
    nets = match.networks
    if nets is None:
        return match
    return AddressMatch(",".join(str(n) for n in nets), match.negated)


def _norm_ports(match: PortMatch | None) -> PortMatch | None:
    if match is None:
        return None
    return PortMatch("", match.ranges, match.negated)


def _norm_statistic(stat: Statistic | None) -> Statistic | None:
    if stat is None:
        return None
    probability = stat.probability
    if probability is not None:
        # The kernel keeps probability * 2^31 as an integer; iptables-save prints it back
        # with 11 decimals, so 0.3333333333 comes back as 0.33333333349.
        with contextlib.suppress(ValueError):
            probability = str(round(float(probability) * 0x80000000))
    return Statistic(stat.mode, probability, stat.every, stat.packet)


def _norm_recent(recent: RecentMatch | None) -> RecentMatch | None:
    if recent is None:
        return None
    mask = recent.mask
    if mask is not None and mask in _ALL_ONES.values():
        mask = None
    return dataclasses.replace(recent, mask=mask)


def _norm_mark_target(target: MarkTarget | None) -> MarkTarget | None:
    """Every MARK spelling as the kernel's (value, mask) pair: new = (old & ~mask) ^ value."""
    if target is None:
        return None
    full = 0xFFFFFFFF
    if target.op == "or":
        return MarkTarget("set-xmark", target.value, target.value)
    if target.op == "xor":
        return MarkTarget("set-xmark", target.value, 0)
    if target.op == "and":
        return MarkTarget("set-xmark", 0, ~target.value & full)
    if target.op == "set-mark":
        return MarkTarget("set-xmark", target.value, (target.mask | target.value) & full)
    return target


def normalize_rule(rule: Rule, family: IPFamily) -> Rule:
    """`rule` with everything iptables-save may spell differently made canonical."""
    reject_with = rule.reject_with
    if rule.target == "REJECT" and reject_with is None:
        reject_with = (
            "icmp-port-unreachable" if family is IPFamily.IPv4 else "icmp6-port-unreachable"
        )
    return dataclasses.replace(
        rule,
        raw="",
        source=_norm_address(rule.source),
        destination=_norm_address(rule.destination),
        dport=_norm_ports(rule.dport),
        sport=_norm_ports(rule.sport),
        statistic=_norm_statistic(rule.statistic),
        recent=_norm_recent(rule.recent),
        set_mark=_norm_mark_target(rule.set_mark),
        reject_with=reject_with,
        modules=tuple(sorted(set(rule.modules) - _PROTOCOL_MODULES)),
        unknown=tuple(sorted(rule.unknown)),
        unknown_target=tuple(sorted(rule.unknown_target)),
    )


def _our_chains(table: Table, desired: bool) -> set[str]:
    """Chains pyproxy owns in `table`: everything it declares (desired) or, in the kernel, the
    fixed KUBE-* chains and the per-service chains. Built-in chains are checked for our hooks
    only: other software owns the rest of them."""
    builtin = table.builtin_chains
    if desired:
        return {c.name for c in table.chains if c.name not in builtin and not c.deleted}
    return {
        c.name
        for c in table.chains
        if not c.deleted
        and (
            (table.name == "nat" and is_service_chain(c.name))
            or c.name
            in (
                "KUBE-SERVICES",
                "KUBE-EXTERNAL-SERVICES",
                "KUBE-FORWARD",
                "KUBE-NODEPORTS",
                "KUBE-PROXY-FIREWALL",
                "KUBE-POSTROUTING",
                "KUBE-MARK-MASQ",
            )
        )
    }


def _rule_diff(
    want: Sequence[Rule], have: Sequence[Rule], family: IPFamily
) -> tuple[list[str], list[str]]:
    want_n = [normalize_rule(r, family) for r in want]
    have_n = [normalize_rule(r, family) for r in have]
    missing = [w.raw for w, n in zip(want, want_n, strict=True) if n not in have_n]
    unexpected = [h.raw for h, n in zip(have, have_n, strict=True) if n not in want_n]
    return missing, unexpected


def ruleset_drift(desired_text: str, actual_text: str, family: IPFamily) -> tuple[ChainDrift, ...]:
    """Chains (filter and nat) where the kernel (`actual_text`, iptables-save) differs from what
    pyproxy would program (`desired_text`, see `desired_document`).

    Raises RulesetParseError when either text is not iptables-restore/-save data.
    """
    desired = parse_ruleset(desired_text)
    actual = parse_ruleset(actual_text)
    out: list[ChainDrift] = []
    for table_name in ("filter", "nat"):
        want_table = desired.table(table_name) or Table(table_name)
        have_table = actual.table(table_name) or Table(table_name)
        want = _our_chains(want_table, True)
        # KUBE-FIREWALL is kubelet's too: only ours to check when we would write it.
        have = _our_chains(have_table, False) | {
            n for n in want if (c := have_table.chain(n)) is not None and not c.deleted
        }
        for name in sorted(want | have):
            want_chain = want_table.chain(name)
            have_chain = have_table.chain(name)
            if name not in have or have_chain is None:
                rules = () if want_chain is None else want_chain.lines
                out.append(
                    ChainDrift(
                        table_name,
                        name,
                        "missing",
                        f"chain missing in the kernel ({_plural(len(rules), 'rule')} expected)",
                        missing_rules=tuple(rules),
                    )
                )
                continue
            if name not in want or want_chain is None:
                out.append(
                    ChainDrift(
                        table_name,
                        name,
                        "unexpected",
                        "chain in the kernel that pyproxy would not program (stale, or added by"
                        f" hand; {_plural(len(have_chain.lines), 'rule')})",
                        unexpected_rules=have_chain.lines,
                    )
                )
                continue
            want_rules = [normalize_rule(r, family) for r in want_chain.rules]
            have_rules = [normalize_rule(r, family) for r in have_chain.rules]
            if want_rules == have_rules:
                continue
            missing, unexpected = _rule_diff(want_chain.rules, have_chain.rules, family)
            parts = []
            if missing:
                parts.append(f"{_plural(len(missing), 'rule')} missing")
            if unexpected:
                parts.append(f"{_plural(len(unexpected), 'unexpected rule')}")
            if not parts:
                parts.append(
                    "same rules in another order or number"
                    f" (kernel {len(have_rules)}, pyproxy {len(want_rules)})"
                )
            out.append(
                ChainDrift(
                    table_name,
                    name,
                    "different",
                    ", ".join(parts),
                    tuple(missing),
                    tuple(unexpected),
                )
            )
        # Our jumps from the built-in chains (only their presence: the chains are shared).
        for name in sorted(want_table.builtin_chains):
            want_chain = want_table.chain(name)
            if want_chain is None or not want_chain.lines:
                continue
            have_chain = have_table.chain(name)
            have_rules = (
                [] if have_chain is None else [normalize_rule(r, family) for r in have_chain.rules]
            )
            absent = [
                r.raw for r in want_chain.rules if normalize_rule(r, family) not in have_rules
            ]
            if absent:
                out.append(
                    ChainDrift(
                        table_name,
                        name,
                        "missing-hook",
                        f"{_plural(len(absent), 'jump')} to pyproxy's chains missing",
                        missing_rules=tuple(absent),
                    )
                )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PacketReport:
    """`pyproxy trace`: one packet through the kernel's rules, plus drift when checked."""

    src: str
    dst: str
    port: int
    protocol: Protocol
    family: IPFamily
    from_node: bool
    trace: Trace
    drift: tuple[ChainDrift, ...] | None = None  # None: not checked

    @property
    def path(self) -> tuple[str, ...]:
        return _path(self.trace)

    def to_json(self) -> dict[str, object]:
        t = self.trace
        return {
            "src": self.src,
            "dst": self.dst,
            "port": self.port,
            "protocol": self.protocol.value,
            "family": self.family.value,
            "from_node": self.from_node,
            "ctstate": TRACE_CTSTATE,
            "verdict": str(t.verdict),
            "filter_verdict": None if t.filter_verdict is None else str(t.filter_verdict),
            "endpoints": [
                Candidate(b.endpoint, b.probability, b.masquerade).to_json() for b in t.branches
            ],
            "masquerade": t.masquerade,
            "path": list(self.path),
            "steps": [
                {
                    "table": s.table,
                    "chain": s.chain,
                    "index": s.index,
                    "action": str(s.action),
                    "target": s.target,
                    "rule": s.rule or None,
                    "note": s.note or None,
                    "depth": s.depth,
                }
                for s in t.steps
            ],
            "warnings": list(t.warnings),
            "drift": None
            if self.drift is None
            else {"checked": True, "chains": [d.to_json() for d in self.drift]},
        }


def trace_saved(
    saved_text: str,
    *,
    src: str,
    dst: str,
    port: int,
    protocol: Protocol = Protocol.TCP,
    local_ips: Iterable[str] = (),
    from_node: bool = False,
    masquerade_mark: int = 0x4000,
    desired_text: str | None = None,
) -> PacketReport:
    """Trace one new connection through iptables-save text; with `desired_text` (what
    pyproxy would program, see `desired_document`) also report drift.

    Raises ValueError for bad or mixed-family addresses, RulesetParseError for bad text.
    """
    src_ip = ipaddress.ip_address(src)
    dst_ip = ipaddress.ip_address(dst)
    if src_ip.version != dst_ip.version:
        raise ValueError(
            f"source {src} and destination {dst} are of different IP families: a packet"
            " cannot change family"
        )
    family = IPFamily.of(dst_ip)
    trace = trace_packet(
        parse_ruleset(saved_text),
        src=str(src_ip),
        dst=str(dst_ip),
        dport=port,
        protocol=protocol.lower,
        local_ips=list(local_ips),
        from_node=from_node,
        ctstate=TRACE_CTSTATE,
        masquerade_mark=masquerade_mark,
    )
    drift = None if desired_text is None else ruleset_drift(desired_text, saved_text, family)
    return PacketReport(str(src_ip), str(dst_ip), port, protocol, family, from_node, trace, drift)
