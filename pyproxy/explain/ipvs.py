"""`pyproxy explain` and `pyproxy trace` in IPVS mode: virtual servers, real servers, ipsets.

In IPVS mode a Service is answered by a kernel virtual server, not by a chain of iptables
rules, so the iptables verdicts of `connections` do not say what happens. This module reads the
same pure plan `pyproxy --dry-run --proxy-mode ipvs` prints (`ipvs.plan.plan_ipvs`) and reports:

- per service port, its virtual servers (scheduler, persistence timeout for ClientIP
  affinity), their real servers with weights, and why an endpoint of the port is not one (the
  reason `endpoints` already gives: not ready, on another node under a Local policy, ...);
- the ipset entries the port adds and the iptables rules that exist only because of them
  (rules are written per non-empty set, so these are the rules of a plan with this port alone
  minus those of a plan with no Service);
- a verdict per virtual server where the plan decides it: answered by its real servers,
  rejected (no real server: IPVS answers ICMP port unreachable), or dropped by
  loadBalancerSourceRanges (KUBE-SOURCE-RANGES-FIREWALL ends in DROP);
- for `trace`: the kernel's virtual server a packet matches, and drift between the plan and
  the kernel (virtual servers, real servers and their weights, ipset members, kube-ipvs0
  addresses). Unexpected virtual servers are only those pyproxy owns (`diff.owned_by_pyproxy`),
  as the proxier itself would delete them; chains are compared by `iptables.drift` as in
  iptables mode.

The JSON is additive: an `ipvs` key next to the iptables-mode report, which stays unchanged
(keys stable, new keys may be added):

    explain: ipvs: {scheduler,
                    ports: [{family, service_port,
                             virtual_servers: [{virtual_server, kind, scheduler,
                                                persistence_timeout, bound,
                                                real_servers: [{endpoint, weight}],
                                                outcome, reason}],
                             not_real_servers: [{endpoint, reason}],
                             ipset_entries: [{set, member}],
                             rules: [{table, rule}]}]}
    trace:   ipvs: {match: {virtual_server, matched, scheduler, persistence_timeout,
                            real_servers: [{endpoint, weight}], outcome, reason},
                    drift: null | {checked, items: [{kind, item, name, detail}]}}

`outcome` is `answered`, `rejected` or `dropped` as in iptables mode, or (trace) `not-ipvs`
when no virtual server has that protocol/address/port. Drift `kind` is `missing`,
`unexpected` or `different`; `item` is `virtual server`, `real server`, `ipset`,
`ipset member` or `address` (on kube-ipvs0). In the text of `trace`, the iptables steps cannot
evaluate `-m set` matches (the tracer does not read ipset contents): the IPVS lines decide.

Pure: the shell reads the kernel (`ipvs.kernel`) and passes a `KernelState` in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyproxy.explain.report import (
    Explanation,
    SourceChoice,
    SourceKind,
    join,
    plural,
    port_label,
)
from pyproxy.ipvs import ipsets
from pyproxy.ipvs.diff import CurrentVirtualServer, KernelState, owned_by_pyproxy
from pyproxy.ipvs.plan import (
    IpvsPlan,
    PlannedVirtualServer,
    VirtualServer,
    VirtualServerKey,
    VirtualServerKind,
    ipvsadm_service_line,
    normalize_scheduler,
    plan_ipvs,
)
from pyproxy.model import ClusterState, IPAddress, IPFamily, NamespacedName, Protocol
from pyproxy.proxystate import ProxierConfig, ServicePortState, desired_state

ANSWERED = "answered"
REJECTED = "rejected"
DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class RealServerView:
    endpoint: str
    weight: int

    def to_json(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "weight": self.weight}


@dataclass(frozen=True, slots=True)
class VirtualServerView:
    """One virtual server of a service port, and what a new connection to it meets."""

    virtual_server: str  # upstream's VirtualServer.String(): 10.96.0.10:80/TCP
    kind: VirtualServerKind
    scheduler: str
    #: sessionAffinity ClientIP: the persistence timeout in seconds; None otherwise.
    persistence_timeout: int | None
    #: Bound on kube-ipvs0 (node IPs and addresses already local elsewhere are not).
    bound: bool
    real_servers: tuple[RealServerView, ...]
    outcome: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "virtual_server": self.virtual_server,
            "kind": self.kind.value,
            "scheduler": self.scheduler,
            "persistence_timeout": self.persistence_timeout,
            "bound": self.bound,
            "real_servers": [r.to_json() for r in self.real_servers],
            "outcome": self.outcome,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class NotRealServer:
    """An endpoint of the port that is no real server of any of its virtual servers."""

    endpoint: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class IpvsPortView:
    family: IPFamily
    service_port: str  # "http/TCP"
    virtual_servers: tuple[VirtualServerView, ...]
    not_real_servers: tuple[NotRealServer, ...]
    #: (set name, member) the port adds, in upstream's set order.
    ipset_entries: tuple[tuple[str, str], ...]
    #: (table, rule) written only because those sets are not empty.
    rules: tuple[tuple[str, str], ...]

    def to_json(self) -> dict[str, object]:
        return {
            "family": self.family.value,
            "service_port": self.service_port,
            "virtual_servers": [v.to_json() for v in self.virtual_servers],
            "not_real_servers": [n.to_json() for n in self.not_real_servers],
            "ipset_entries": [{"set": s, "member": m} for s, m in self.ipset_entries],
            "rules": [{"table": t, "rule": r} for t, r in self.rules],
        }


@dataclass(frozen=True, slots=True)
class IpvsExplanation:
    scheduler: str
    ports: tuple[IpvsPortView, ...]

    def to_json(self) -> dict[str, object]:
        return {"scheduler": self.scheduler, "ports": [p.to_json() for p in self.ports]}


# --- explain ------------------------------------------------------------------------------


def _rule_lines(plan: IpvsPlan) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for table, text in (("nat", plan.rules.nat_text), ("filter", plan.rules.filter_text)):
        out.extend((table, line) for line in text.splitlines() if line.startswith("-A "))
    return out


def _source(explanation: Explanation, family: IPFamily) -> SourceChoice | None:
    return explanation.sources.get(family)


def _verdict(
    vs: PlannedVirtualServer,
    state: ServicePortState,
    choice: SourceChoice | None,
    no_local_external: frozenset[str],
) -> tuple[str, str]:
    if not vs.real_servers:
        return REJECTED, "no real servers: IPVS answers ICMP port unreachable (connection refused)"
    source = None if choice is None else ipaddress.ip_address(choice.address)
    if (
        vs.kind is not VirtualServerKind.CLUSTER_IP
        and choice is not None
        and choice.kind is SourceKind.EXTERNAL
        and str(state.info.name.namespaced_name) in no_local_external
    ):
        # Upstream keeps the Cluster endpoints for local pods (k8s PR 97081), but traffic from
        # outside is not masqueraded: the replies bypass this node and never reach the client.
        return DROPPED, (
            "externalTrafficPolicy is Local and no endpoint is on this node: IPVS sends the"
            " connection to another node's endpoint without masquerading it, so the reply"
            " bypasses this node and the client times out"
        )
    ranges = state.info.load_balancer_source_ranges
    if (
        vs.kind is VirtualServerKind.LOAD_BALANCER
        and ranges
        and source is not None
        and not any(source.version == r.version and source in r for r in ranges)
    ):
        return DROPPED, (
            f"source {source} is outside loadBalancerSourceRanges"
            f" ({join(str(r) for r in ranges)}): KUBE-SOURCE-RANGES-FIREWALL drops it"
        )
    reals = join(r.endpoint for r in vs.real_servers)
    count = plural(len(vs.real_servers), "real server")
    return ANSWERED, f"by {count} ({vs.server.scheduler}): {reals}"


def _not_real_servers(
    explanation: Explanation, label: str, family: IPFamily, reals: set[str]
) -> tuple[NotRealServer, ...]:
    out = []
    for ep in explanation.endpoints:
        if ep.family is not family:
            continue
        for use in ep.ports:
            if use.service_port != label or (use.target is not None and use.target in reals):
                continue
            usage = use.internal if not use.internal.used else use.external
            reason = usage.reason if usage is not None and usage.reason else "not used"
            out.append(NotRealServer(use.target or ep.address, reason))
    return tuple(out)


def _port_view(
    state: ServicePortState,
    config: ProxierConfig,
    *,
    plan: IpvsPlan,
    baseline: set[tuple[str, str]],
    scheduler: str,
    explanation: Explanation,
) -> IpvsPortView:
    info = state.info
    label = port_label(info.name.port, info.protocol)
    alone = plan_ipvs([state], config, scheduler)
    source = _source(explanation, config.family)
    servers = []
    reals: set[str] = set()
    for vs in plan.virtual_servers:
        if vs.service != info.name:
            continue
        outcome, reason = _verdict(vs, state, source, plan.no_local_external)
        reals.update(r.endpoint for r in vs.real_servers)
        servers.append(
            VirtualServerView(
                str(vs.key),
                vs.kind,
                vs.server.scheduler,
                vs.server.timeout if vs.server.persistent else None,
                vs.bind,
                tuple(RealServerView(r.endpoint, r.weight) for r in vs.real_servers),
                outcome,
                reason,
            )
        )
    entries = tuple(
        (s.spec.name, m)
        for s in alone.ipsets
        if s.spec.base != ipsets.IPVS_IPS or s.members
        for m in s.sorted_members
    )
    rules = tuple(r for r in _rule_lines(alone) if r not in baseline)
    return IpvsPortView(
        config.family,
        label,
        tuple(servers),
        _not_real_servers(explanation, label, config.family, reals),
        entries,
        rules,
    )


def explain_ipvs(
    cluster: ClusterState,
    configs: Sequence[ProxierConfig],
    name: NamespacedName,
    explanation: Explanation,
    scheduler: str,
) -> IpvsExplanation:
    """The `ipvs` section of `explanation` (same node configs, same selected ports)."""
    ports: list[IpvsPortView] = []
    wanted = {(p.family, p.service_port) for p in explanation.policy}
    for config in configs:
        states = desired_state(cluster, config)
        plan = plan_ipvs([p for ps in states.values() for p in ps], config, scheduler)
        baseline = set(_rule_lines(plan_ipvs([], config, scheduler)))
        for state in states.get(name, ()):
            label = port_label(state.info.name.port, state.info.protocol)
            if (config.family, label) not in wanted:  # the ports explained (--port)
                continue
            ports.append(
                _port_view(
                    state,
                    config,
                    plan=plan,
                    baseline=baseline,
                    scheduler=scheduler,
                    explanation=explanation,
                )
            )
    return IpvsExplanation(scheduler=normalize_scheduler(scheduler), ports=tuple(ports))


def format_ipvs(section: IpvsExplanation) -> str:
    """Plain text for the terminal (appended after the iptables-mode report)."""
    lines = [
        f"IPVS mode (scheduler {section.scheduler}): the connections above are traced through"
        " iptables mode's rules; in IPVS mode a virtual server answers instead:"
    ]
    if not section.ports:
        lines.append("  no virtual servers for this Service on this node")
    for port in section.ports:
        lines.append(f"  {port.service_port} ({port.family.value}):")
        for vs in port.virtual_servers:
            persistence = (
                f", persistent {vs.persistence_timeout}s"
                if vs.persistence_timeout is not None
                else ""
            )
            lines.append(
                f"    virtual server {vs.virtual_server} [{vs.kind.value}]"
                f" {vs.scheduler}{persistence}: {vs.outcome}: {vs.reason}"
            )
            lines.extend(f"      -> {r.endpoint} weight {r.weight}" for r in vs.real_servers)
        for n in port.not_real_servers:
            lines.append(f"    not a real server: {n.endpoint}: {n.reason}")
        for set_name, member in port.ipset_entries:
            lines.append(f"    ipset {set_name}: {member}")
        for table, rule in port.rules:
            lines.append(f"    {table}: {rule}")
    return "".join(line + "\n" for line in lines)


# --- trace --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IpvsDrift:
    """One difference between the plan and the kernel."""

    kind: str  # missing | unexpected | different
    item: str  # virtual server | real server | ipset | ipset member | address
    name: str
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "item": self.item, "name": self.name, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.kind} {self.item} {self.name}: {self.detail}"


def _describe(server: VirtualServer) -> str:
    return " ".join(ipvsadm_service_line(server).split()[2:])


def _server_drift(
    key: VirtualServerKey, want: PlannedVirtualServer, have: CurrentVirtualServer
) -> list[IpvsDrift]:
    out = []
    if have.server != want.server:
        out.append(
            IpvsDrift(
                "different",
                "virtual server",
                str(key),
                f"kernel has {_describe(have.server)}, pyproxy would program"
                f" {_describe(want.server)}",
            )
        )
    wanted = {r.endpoint: r for r in want.real_servers}
    current = {r.endpoint: r for r in have.real_servers}
    for endpoint in sorted(wanted.keys() - current.keys()):
        out.append(IpvsDrift("missing", "real server", f"{key} -> {endpoint}", "not in the kernel"))
    for endpoint in sorted(current.keys() - wanted.keys()):
        rs = current[endpoint]
        out.append(
            IpvsDrift(
                "unexpected",
                "real server",
                f"{key} -> {endpoint}",
                f"weight {rs.weight}, not an endpoint pyproxy would use"
                + (" (draining)" if rs.weight == 0 else ""),
            )
        )
    for endpoint in sorted(wanted.keys() & current.keys()):
        if wanted[endpoint].weight != current[endpoint].weight:
            out.append(
                IpvsDrift(
                    "different",
                    "real server",
                    f"{key} -> {endpoint}",
                    f"weight {current[endpoint].weight} in the kernel,"
                    f" {wanted[endpoint].weight} wanted",
                )
            )
    return out


def ipvs_drift(plan: IpvsPlan, state: KernelState) -> tuple[IpvsDrift, ...]:
    """What differs between `plan` (one family) and the kernel, as the proxier's diff would
    change it (draining real servers are reported: the proxier removes them later)."""
    out: list[IpvsDrift] = []
    wanted = plan.by_key
    current = {k: v for k, v in state.virtual_servers.items() if k.family is plan.family}
    for key in sorted(wanted.keys() | current.keys(), key=lambda k: k.sort_key):
        want = wanted.get(key)
        have = current.get(key)
        if want is None and have is not None:
            if owned_by_pyproxy(key, state):
                out.append(
                    IpvsDrift(
                        "unexpected",
                        "virtual server",
                        str(key),
                        f"{plural(len(have.real_servers), 'real server')}; no Service wants it",
                    )
                )
        elif want is not None and have is None:
            out.append(
                IpvsDrift(
                    "missing",
                    "virtual server",
                    str(key),
                    f"for {want.service} ({want.kind.value}),"
                    f" {plural(len(want.real_servers), 'real server')}",
                )
            )
        elif want is not None and have is not None:
            out.extend(_server_drift(key, want, have))
    for planned in plan.ipsets:
        have_set = state.ipsets.get(planned.spec.name)
        if have_set is None:
            out.append(IpvsDrift("missing", "ipset", planned.spec.name, "set not in the kernel"))
            continue
        for member in planned.sorted_members:
            if member not in have_set.members:
                out.append(IpvsDrift("missing", "ipset member", planned.spec.name, member))
        for member in sorted(have_set.members - planned.members, key=ipsets.member_sort_key):
            out.append(IpvsDrift("unexpected", "ipset member", planned.spec.name, member))
    bound = {ip for ip in state.bound_addresses if IPFamily.of(ip) is plan.family}
    for ip in sorted(set(plan.bind_addresses) - bound, key=int):
        out.append(IpvsDrift("missing", "address", str(ip), "not bound on kube-ipvs0"))
    for ip in sorted(bound - set(plan.bind_addresses), key=int):
        out.append(IpvsDrift("unexpected", "address", str(ip), "bound on kube-ipvs0"))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class IpvsMatch:
    """The kernel's virtual server for (protocol, dst, port), if any."""

    virtual_server: str
    matched: bool
    scheduler: str
    persistence_timeout: int | None
    real_servers: tuple[RealServerView, ...]
    outcome: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "virtual_server": self.virtual_server,
            "matched": self.matched,
            "scheduler": self.scheduler,
            "persistence_timeout": self.persistence_timeout,
            "real_servers": [r.to_json() for r in self.real_servers],
            "outcome": self.outcome,
            "reason": self.reason,
        }


def match_virtual_server(state: KernelState, protocol: Protocol, dst: str, port: int) -> IpvsMatch:
    """Which kernel virtual server a new connection to dst:port meets, and its real servers
    (weight 0 ones take no new connections)."""
    key = VirtualServerKey(protocol, ipaddress.ip_address(dst), port)
    have = state.virtual_servers.get(key)
    if have is None:
        return IpvsMatch(
            str(key), False, "", None, (), "not-ipvs", "no virtual server: IPVS does not touch it"
        )
    reals = tuple(RealServerView(r.endpoint, r.weight) for r in have.real_servers)
    live = [r.endpoint for r in have.real_servers if r.weight > 0]
    server = have.server
    timeout = server.timeout if server.persistent else None
    if not live:
        return IpvsMatch(
            str(key),
            True,
            server.scheduler,
            timeout,
            reals,
            REJECTED,
            "no real server with weight > 0: IPVS answers ICMP port unreachable",
        )
    return IpvsMatch(
        str(key),
        True,
        server.scheduler,
        timeout,
        reals,
        ANSWERED,
        f"by {plural(len(live), 'real server')} ({server.scheduler}): {join(live)}",
    )


@dataclass(frozen=True, slots=True)
class IpvsTrace:
    match: IpvsMatch
    drift: tuple[IpvsDrift, ...] | None  # None: not checked

    def to_json(self) -> dict[str, object]:
        return {
            "match": self.match.to_json(),
            "drift": None
            if self.drift is None
            else {"checked": True, "items": [d.to_json() for d in self.drift]},
        }


def format_ipvs_trace(trace: IpvsTrace) -> str:
    m = trace.match
    lines = [
        "IPVS mode: the iptables steps above cannot evaluate ipset matches; the IPVS table"
        " decides:",
        f"IPVS: {m.virtual_server}: {m.outcome}: {m.reason}",
    ]
    lines.extend(f"  -> {r.endpoint} weight {r.weight}" for r in m.real_servers)
    if trace.drift is None:
        lines.append("IPVS drift: not checked (pass --state or --kubeconfig)")
    elif not trace.drift:
        lines.append("IPVS drift: none (the kernel has what pyproxy would program)")
    else:
        lines.append(f"IPVS drift: {plural(len(trace.drift), 'difference')}")
        lines.extend(f"  {d}" for d in trace.drift)
    return "".join(line + "\n" for line in lines)


def trace_ipvs(
    state: KernelState,
    *,
    dst: str,
    port: int,
    protocol: Protocol,
    plan: IpvsPlan | None = None,
) -> IpvsTrace:
    """The IPVS half of `pyproxy trace --proxy-mode ipvs`: the virtual server matched, and
    (with `plan`) drift."""
    return IpvsTrace(
        match_virtual_server(state, protocol, dst, port),
        None if plan is None else ipvs_drift(plan, state),
    )


def states_plan(
    states: Mapping[NamespacedName, Sequence[ServicePortState]],
    config: ProxierConfig,
    scheduler: str,
    local_addresses: Sequence[IPAddress] | None = None,
) -> IpvsPlan:
    """The node's plan, as the proxier computes it in a sync."""
    return plan_ipvs(
        [p for ps in states.values() for p in ps],
        config,
        scheduler,
        local_addresses=local_addresses,
    )
