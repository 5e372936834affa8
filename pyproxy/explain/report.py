"""The report `pyproxy explain` and `pyproxy trace` print: plain data, and its JSON.

The model is separate from the code that fills it in so that the formatter, the JSON output and
the tests read one vocabulary. Pure: no I/O.

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
`missing-hook` (`iptables.drift.ChainDrift`).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.iptables.drift import ChainDrift
from pyproxy.iptables.tracer import StepAction, Trace
from pyproxy.model import (
    EndpointSlice,
    IPAddress,
    IPFamily,
    NamespacedName,
    Protocol,
    Service,
    ServicePort,
    format_endpoint,
)
from pyproxy.policy import TopologyMode

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
        return trace_path(self.trace)

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


def port_label(name: str, protocol: Protocol) -> str:
    """`http/TCP`, or `TCP` for an unnamed port."""
    return f"{name}/{protocol.value}" if name else protocol.value


def describe_port(sp: ServicePort, extras: ServiceExtras) -> str:
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


def join(items: Iterable[str], empty: str = "none") -> str:
    values = list(items)
    return ", ".join(values) if values else empty


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def trace_path(trace: Trace) -> tuple[str, ...]:
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
