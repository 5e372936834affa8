"""Desired state → the iptables-restore input kube-proxy's iptables mode would write.

The output follows upstream's `syncProxyRules` rule for rule (chain names, option order,
comments, marks, probabilities, `recent` affinity), so `iptables-save` reads like kube-proxy's.
The one deliberate difference: upstream walks a Go map, so its service order is random; here
service ports are sorted by name and protocol, making the output byte-identical for the same
input.

The words it writes (chain names and their hash, the jumps from the built-in chains, the
restore-document layout with hooks and canaries) are `vocabulary`'s, shared with the parser,
the kernel view and ipvs mode.

Rendering is split per service port (`render_service_port`) so the sync loop can keep the text
of unchanged Services and only re-render what changed; `assemble_ruleset` stitches the pieces
into one `*filter … COMMIT *nat … COMMIT` document, optionally leaving out the chains of
Services that did not change (upstream's partial sync).

Layout (upstream: `pkg/proxy/iptables/proxier.go`, `syncProxyRules`):

    nat PREROUTING/OUTPUT → KUBE-SERVICES ─┬─ cluster IP ─→ KUBE-SVC-/KUBE-SVL-* → KUBE-SEP-* (DNAT)
                                           ├─ external IP ─────────→ KUBE-EXT-* → SVC/SVL
                                           ├─ LB IP ──→ KUBE-FW-* (source ranges) → KUBE-EXT-*
                                           └─ (last) local dst ────→ KUBE-NODEPORTS → KUBE-EXT-*
    nat POSTROUTING → KUBE-POSTROUTING: MASQUERADE what KUBE-MARK-MASQ marked
    filter: KUBE-SERVICES / KUBE-EXTERNAL-SERVICES REJECT or DROP services without endpoints,
            KUBE-PROXY-FIREWALL drops LB traffic the KUBE-FW- chain did not accept,
            KUBE-NODEPORTS accepts health-check node ports, KUBE-FORWARD accepts marked traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pyproxy.iptables.vocabulary import (
    CANARY_DECLARATION,
    FILTER_CHAINS,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FIREWALL,
    KUBE_MARK_MASQ,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    MANGLE_CANARY,
    NAT_CHAINS,
    JumpRule,
    TableSection,
    declarations,
    endpoint_chain,
    external_chain,
    firewall_chain,
    fixed_filter_rules,
    fixed_nat_rules,
    hook_inserts,
    is_service_chain,
    local_chain,
    restore_document,
    service_chain,
)
from pyproxy.model import IPFamily
from pyproxy.policy import traffic_paths
from pyproxy.proxystate import (
    LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
    LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER,
    ProxierConfig,
    ServicePortState,
    port_order,
    service_order,
)
from pyproxy.serviceport import EndpointInfo, ServicePortName

NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
_NODEPORTS_RULE = f"-A {KUBE_SERVICES} -m comment --comment {NODEPORTS_COMMENT}"


def probability(n: int) -> str:
    """Go's fmt.Sprintf("%0.10f", 1/n)."""
    return f"{1.0 / n:0.10f}"


# --- one service port ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePortRules:
    """The rules one service port contributes, already as restore-text lines ("\\n"-ended)."""

    name: ServicePortName
    #: Filter-table lines (REJECT/DROP, firewall DROP, health-check ACCEPT).
    filter_text: str
    #: nat KUBE-SERVICES / KUBE-NODEPORTS lines: rewritten on every sync.
    dispatch_text: str
    #: The service's own nat chains (SVC/SVL/EXT/FW/SEP) and their rules.
    chains: tuple[str, ...]
    chains_text: str
    #: Counts for metrics: rules in filter, and in nat (dispatch + own chains).
    filter_rules: int
    nat_rules: int
    #: Upstream's "has no local endpoints" cases, for the no_local_endpoints metric.
    no_local_internal: bool
    no_local_external: bool


def _local_detect(config: ProxierConfig, negate: bool) -> str:
    """kube-proxy's ClusterCIDR local-traffic detector (callers check it is configured)."""
    return f"{'! ' if negate else ''}-s {config.cluster_cidr}"


def _service_to_endpoint_rules(
    out: list[str],
    state: ServicePortState,
    chain: str,
    endpoints: Sequence[EndpointInfo],
    large_cluster_mode: bool,
) -> None:
    info = state.info
    spn = str(info.name)

    def comment(ep: EndpointInfo) -> str:
        return "" if large_cluster_mode else f' -m comment --comment "{spn} -> {ep.endpoint}"'

    if info.session_affinity_timeout is not None:
        for ep in endpoints:
            sep = endpoint_chain(info.name, ep.endpoint)
            out.append(
                f"-A {chain}{comment(ep)} -m recent --name {sep} --rcheck"
                f" --seconds {info.session_affinity_timeout} --reap -j {sep}"
            )
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        sep = endpoint_chain(info.name, ep.endpoint)
        if i < n - 1:
            out.append(
                f"-A {chain}{comment(ep)} -m statistic --mode random"
                f" --probability {probability(n - i)} -j {sep}"
            )
        else:
            out.append(f"-A {chain}{comment(ep)} -j {sep}")


def render_service_port(  # noqa: PLR0912, PLR0915 - reason in the docstring
    state: ServicePortState, config: ProxierConfig, *, large_cluster_mode: bool = False
) -> ServicePortRules:
    """Upstream's per-service-port body of syncProxyRules, for one service port.

    Long on purpose: it follows upstream's per-service-port body of syncProxyRules (proxier.go)
    statement for statement, so the two read side by side, and the order of its statements is the
    order of the output.
    """
    info = state.info
    cat = state.categorized
    spn_obj = info.name
    spn = str(spn_obj)
    proto = info.protocol.lower
    match = f"-m {proto} -p {proto}"
    detector = config.cluster_cidr is not None

    cluster_policy_chain = service_chain(spn_obj)
    local_policy_chain = local_chain(spn_obj)
    ext_chain = external_chain(spn_obj)
    fw_chain = firewall_chain(spn_obj)

    uses_cluster_policy_chain = bool(cat.cluster) and info.uses_cluster_endpoints
    uses_local_policy_chain = bool(cat.local) and info.uses_local_endpoints

    has_endpoints = cat.has_any
    paths = traffic_paths(info, cat)
    internal_chain = local_policy_chain if paths.internal_local else cluster_policy_chain
    has_internal = paths.has_internal
    external_policy_chain = local_policy_chain if paths.external_local else cluster_policy_chain
    has_external = paths.has_external

    # The EXT chain also carries the local-traffic short-circuit, so it exists whenever any
    # endpoint does, even without externally usable ones.
    uses_ext_chain = has_endpoints and info.externally_accessible
    uses_fw_chain = (
        has_endpoints and bool(info.load_balancer_vips) and bool(info.load_balancer_source_ranges)
    )
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    if not has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = f'"{spn} has no endpoints"'
    else:
        internal_target = external_target = ""
        internal_comment = external_comment = ""
        if not has_internal:
            internal_target = "DROP"
            internal_comment = f'"{spn} has no local endpoints"'
        if not has_external:
            external_target = "DROP"
            external_comment = f'"{spn} has no local endpoints"'

    filt: list[str] = []
    dispatch: list[str] = []
    port = info.port

    # Cluster IP.
    if has_internal:
        dispatch.append(
            f'-A {KUBE_SERVICES} -m comment --comment "{spn} cluster IP" {match}'
            f" -d {info.cluster_ip} --dport {port} -j {internal_chain}"
        )
    else:
        filt.append(
            f"-A {KUBE_SERVICES} -m comment --comment {internal_comment} {match}"
            f" -d {info.cluster_ip} --dport {port} -j {internal_target}"
        )

    # External IPs.
    for ip in info.external_ips:
        if has_endpoints:
            dispatch.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{spn} external IP" {match}'
                f" -d {ip} --dport {port} -j {ext_chain}"
            )
        if not has_external:
            filt.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {match}"
                f" -d {ip} --dport {port} -j {external_target}"
            )

    # Load-balancer ingress IPs.
    for ip in info.load_balancer_vips:
        if has_endpoints:
            dispatch.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{spn} loadbalancer IP" {match}'
                f" -d {ip} --dport {port} -j {lb_chain}"
            )
        if uses_fw_chain:
            filt.append(
                f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{spn} traffic not accepted by'
                f' {fw_chain}" {match} -d {ip} --dport {port} -j DROP'
            )
    if not has_external:
        for ip in info.load_balancer_vips:
            filt.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {match}"
                f" -d {ip} --dport {port} -j {external_target}"
            )

    # NodePorts: not subject to loadBalancerSourceRanges, as upstream.
    if info.node_port:
        if has_endpoints:
            if (
                config.localhost_nodeports
                and config.family is IPFamily.IPv4
                and LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER in config.nfacct_counters
            ):
                # Same target as the rule below; it only counts localhost NodePort packets
                # (kubeproxy_iptables_localhost_nodeports_accepted_packets_total).
                dispatch.append(
                    f"-A {KUBE_NODEPORTS} -m comment --comment {spn} {match} -d 127.0.0.0/8"
                    f" --dport {info.node_port}"
                    f" -m nfacct --nfacct-name {LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER}"
                    f" -j {ext_chain}"
                )
            dispatch.append(
                f"-A {KUBE_NODEPORTS} -m comment --comment {spn} {match}"
                f" --dport {info.node_port} -j {ext_chain}"
            )
        if not has_external:
            filt.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment}"
                f" -m addrtype --dst-type LOCAL {match}"
                f" --dport {info.node_port} -j {external_target}"
            )

    # Health-check node port: accepted whether or not there are local endpoints.
    if info.health_check_node_port:
        filt.append(
            f'-A {KUBE_NODEPORTS} -m comment --comment "{spn} health check node port"'
            f" -m tcp -p tcp --dport {info.health_check_node_port} -j ACCEPT"
        )

    chains: list[str] = []
    rules: list[str] = []

    # Masquerade off-cluster (or all) traffic to the cluster IP: it may bounce off-node.
    if has_internal:
        args = (
            f'-m comment --comment "{spn} cluster IP" {match} -d {info.cluster_ip} --dport {port}'
        )
        if config.masquerade_all:
            rules.append(f"-A {internal_chain} {args} -j {KUBE_MARK_MASQ}")
        elif detector:
            rules.append(
                f"-A {internal_chain} {args} {_local_detect(config, True)} -j {KUBE_MARK_MASQ}"
            )

    if uses_ext_chain:
        chains.append(ext_chain)
        if not info.external_policy_local:
            # Endpoints may be on another node: masquerade so replies come back through us.
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn}'
                f' external destinations" -j {KUBE_MARK_MASQ}'
            )
        else:
            if detector:
                # Pod → external destination acts as if it went out to the LB and came back.
                rules.append(
                    f'-A {ext_chain} -m comment --comment "pod traffic for {spn} external'
                    f' destinations" {_local_detect(config, False)} -j {cluster_policy_chain}'
                )
            # The node's own traffic uses a local address as source: masquerade and route it
            # to any endpoint.
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn}'
                f' external destinations" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}'
            )
            rules.append(
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn}'
                f' external destinations" -m addrtype --src-type LOCAL -j {cluster_policy_chain}'
            )
        if has_external:
            rules.append(f"-A {ext_chain} -j {external_policy_chain}")

    if uses_fw_chain:
        chains.append(fw_chain)
        fw_args = f'-A {fw_chain} -m comment --comment "{spn} loadbalancer IP"'
        node_ip = config.primary_node_ip
        allow_from_node = False
        for cidr in info.load_balancer_source_ranges:
            rules.append(f"{fw_args} -s {cidr} -j {ext_chain}")
            if node_ip is not None and node_ip.version == cidr.version and node_ip in cidr:
                allow_from_node = True
        if allow_from_node:
            # A node reaching a VIP bound locally loops back with the VIP as source.
            for ip in info.load_balancer_vips:
                rules.append(f"{fw_args} -s {ip} -j {ext_chain}")
        rules.append(
            f'-A {fw_chain} -m comment --comment "other traffic to {spn} will be dropped by'
            f' {KUBE_PROXY_FIREWALL}"'
        )

    if uses_cluster_policy_chain:
        chains.append(cluster_policy_chain)
        _service_to_endpoint_rules(
            rules, state, cluster_policy_chain, cat.cluster, large_cluster_mode
        )
    if uses_local_policy_chain:
        chains.append(local_policy_chain)
        _service_to_endpoint_rules(rules, state, local_policy_chain, cat.local, large_cluster_mode)

    sep_comment = "" if large_cluster_mode else f" -m comment --comment {spn}"
    for ep in cat.all_reachable:
        sep = endpoint_chain(spn_obj, ep.endpoint)
        chains.append(sep)
        # Hairpin: an endpoint reaching itself through the service must be masqueraded.
        rules.append(f"-A {sep}{sep_comment} -s {ep.ip} -j {KUBE_MARK_MASQ}")
        affinity = (
            f" -m recent --name {sep} --set" if info.session_affinity_timeout is not None else ""
        )
        rules.append(
            f"-A {sep}{sep_comment}{affinity} {match} -j DNAT --to-destination {ep.endpoint}"
        )

    def text(lines: list[str]) -> str:
        return "".join(line + "\n" for line in lines)

    return ServicePortRules(
        name=spn_obj,
        filter_text=text(filt),
        dispatch_text=text(dispatch),
        chains=tuple(chains),
        chains_text=text(rules),
        filter_rules=len(filt),
        nat_rules=len(dispatch) + len(rules),
        no_local_internal=has_endpoints and not has_internal,
        no_local_external=has_endpoints and not has_external,
    )


# --- the whole ruleset --------------------------------------------------------------------


def nodeports_jump_rules(config: ProxierConfig) -> list[str]:
    """The last rule(s) of nat KUBE-SERVICES: local destinations go to KUBE-NODEPORTS."""
    ips = config.nodeport_ips
    if ips is None:
        dest = "-m addrtype --dst-type LOCAL"
        # Localhost NodePorts never work on IPv6, and on IPv4 only with route_localnet.
        if config.family is IPFamily.IPv6:
            dest += " ! -d ::1/128"
        elif not config.localhost_nodeports:
            dest += " ! -d 127.0.0.0/8"
        return [f"{_NODEPORTS_RULE} {dest} -j {KUBE_NODEPORTS}"]
    rules = []
    for ip in ips:
        if ip.is_loopback and (config.family is IPFamily.IPv6 or not config.localhost_nodeports):
            continue
        rules.append(f"{_NODEPORTS_RULE} -d {ip} -j {KUBE_NODEPORTS}")
    return rules


@dataclass(frozen=True, slots=True)
class Ruleset:
    """One family's rules: upstream's filter and nat buffers, plus what they imply."""

    filter_chains: tuple[str, ...]
    filter_text: str
    #: Chains declared (flushed and refilled) in this input.
    nat_chains: tuple[str, ...]
    nat_text: str
    #: Every per-service nat chain that must exist after this sync (written or not).
    active_nat_chains: frozenset[str]
    filter_rules: int
    nat_rules: int
    no_local_internal: int
    no_local_external: int

    def document(
        self,
        *,
        stale_chains: Iterable[str] = (),
        hooks: Iterable[JumpRule] = (),
        canary: bool = False,
    ) -> str:
        """The iptables-restore --noflush input: this ruleset, missing hooks inserted at the top
        of their built-in chains, stale service chains flushed and deleted, and (canary) the
        empty KUBE-PROXY-CANARY chains whose disappearance reveals a flush by someone else."""
        stale = sorted(c for c in set(stale_chains) - self.active_nat_chains if is_service_chain(c))
        return restore_document(
            [
                TableSection("filter", self.filter_chains, self.filter_text),
                TableSection(
                    "nat",
                    (*self.nat_chains, *stale),
                    self.nat_text,
                    "".join(f"-X {c}\n" for c in stale),
                ),
            ],
            hooks=hooks,
            canary=canary,
        )

    @property
    def text(self) -> str:
        return self.document()


@dataclass(slots=True)
class StreamedRuleset:
    """What `stream_document` wrote; complete once its iterator is exhausted."""

    active_nat_chains: set[str] = field(default_factory=set)
    filter_rules: int = 0
    nat_rules: int = 0
    no_local_internal: int = 0
    no_local_external: int = 0


def stream_document(
    ports: Iterable[ServicePortRules],
    config: ProxierConfig,
    summary: StreamedRuleset,
    *,
    write_chains: Callable[[ServicePortRules], bool] | None = None,
    stale_chains: Collection[str] = (),
    hooks: Iterable[JumpRule] = (),
    canary: bool = False,
    random_fully: bool = True,
) -> Iterator[str]:
    """The input of `assemble_ruleset(ports, write_chains=...).document(...)`, in pieces that
    iptables-restore can parse while the next ones are still being rendered.

    Same chains and the same rules in each chain, laid out for streaming: iptables-restore takes
    a chain declaration anywhere before the first rule naming that chain, so each service
    port's chains are declared right before its rules; the stale chains, only known once every
    active one has been seen, are flushed and deleted at the end; and the nat table comes first,
    the filter table (whose few per-service lines are collected on the way) after it. Each
    table is still applied atomically at its COMMIT; between the two commits the nat table is
    new and the filter table old, as the other way round happens in upstream's order.
    `ports` is consumed lazily, in order; `summary` is filled in as it goes. `write_chains`
    false leaves a service port's own chains out, as in `assemble_ruleset`.
    """
    hooks = tuple(hooks)
    canary_decl = CANARY_DECLARATION if canary else ""
    if canary:
        yield MANGLE_CANARY
    nat_fixed = fixed_nat_rules(config, random_fully=random_fully)
    yield "".join(
        [
            "*nat\n",
            canary_decl,
            declarations(NAT_CHAINS),
            *(line + "\n" for line in nat_fixed),
        ]
    )
    before, after = fixed_filter_rules(config)
    filter_parts: list[str] = [line + "\n" for line in before]
    active = summary.active_nat_chains
    n_nat = len(nat_fixed)
    n_filter = len(before) + len(after)
    for rules in ports:
        if write_chains is None or write_chains(rules):
            yield declarations(rules.chains) + rules.dispatch_text
            yield rules.chains_text
        else:  # unchanged in the kernel (a partial sync): only the dispatch rules
            yield rules.dispatch_text
        if rules.filter_text:
            filter_parts.append(rules.filter_text)
        active.update(rules.chains)
        n_filter += rules.filter_rules
        n_nat += rules.nat_rules
        summary.no_local_internal += rules.no_local_internal
        summary.no_local_external += rules.no_local_external
    tail = nodeports_jump_rules(config)
    summary.nat_rules = n_nat + len(tail)
    summary.filter_rules = n_filter
    stale = sorted(c for c in set(stale_chains) - active if is_service_chain(c))
    filter_chains = [*FILTER_CHAINS, *([KUBE_FIREWALL] if before else [])]
    yield "".join(
        [
            *(line + "\n" for line in tail),
            declarations(stale),
            *(f"-X {c}\n" for c in stale),
            hook_inserts(hooks, "nat"),
            "COMMIT\n*filter\n",
            canary_decl,
            declarations(filter_chains),
            *filter_parts,
            *(line + "\n" for line in after),
            hook_inserts(hooks, "filter"),
            "COMMIT\n",
        ]
    )


def is_large_cluster(total_endpoints: int) -> bool:
    return total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD


def assemble_ruleset(
    ports: Iterable[ServicePortRules],
    config: ProxierConfig,
    *,
    write_chains: Callable[[ServicePortRules], bool] | None = None,
    random_fully: bool = True,
) -> Ruleset:
    """Stitch per-service-port rules (already in output order) into one family's ruleset.

    `write_chains(rules)` false leaves that service port's own chains out of the input: they are
    unchanged in the kernel (upstream's partial sync). They still count as active.
    """
    before, after = fixed_filter_rules(config)
    filter_chains = list(FILTER_CHAINS)
    if before:
        filter_chains.append(KUBE_FIREWALL)
    filter_parts: list[str] = [line + "\n" for line in before]

    nat_fixed = fixed_nat_rules(config, random_fully=random_fully)
    nat_chains: list[str] = list(NAT_CHAINS)
    nat_parts: list[str] = [line + "\n" for line in nat_fixed]

    active: set[str] = set()
    n_filter = len(before) + len(after)
    n_nat = len(nat_fixed)
    no_local_internal = no_local_external = 0
    for rules in ports:
        filter_parts.append(rules.filter_text)
        nat_parts.append(rules.dispatch_text)
        active.update(rules.chains)
        if write_chains is None or write_chains(rules):
            nat_chains.extend(rules.chains)
            nat_parts.append(rules.chains_text)
        n_filter += rules.filter_rules
        n_nat += rules.nat_rules
        no_local_internal += rules.no_local_internal
        no_local_external += rules.no_local_external

    tail = nodeports_jump_rules(config)
    n_nat += len(tail)
    filter_parts.extend(line + "\n" for line in after)
    nat_parts.extend(line + "\n" for line in tail)
    return Ruleset(
        filter_chains=tuple(filter_chains),
        filter_text="".join(filter_parts),
        nat_chains=tuple(nat_chains),
        nat_text="".join(nat_parts),
        active_nat_chains=frozenset(active),
        filter_rules=n_filter,
        nat_rules=n_nat,
        no_local_internal=no_local_internal,
        no_local_external=no_local_external,
    )


def render_ruleset(
    states: Iterable[ServicePortState], config: ProxierConfig, *, random_fully: bool = True
) -> Ruleset:
    """The full restore input for a family from its service port states (any order)."""
    ordered = sorted(
        states, key=lambda s: (service_order(s.info.name.namespaced_name), port_order(s))
    )
    large = is_large_cluster(sum(len(s.endpoints) for s in ordered))
    rendered = [render_service_port(s, config, large_cluster_mode=large) for s in ordered]
    return assemble_ruleset(rendered, config, random_fully=random_fully)
