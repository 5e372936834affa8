"""Desired state → the objects of kube-proxy v1.34's nftables `kube-proxy` table, as nft text.

Upstream's `pkg/proxy/nftables` writes one table per family through knftables; its tests compare
knftables' `Fake.Dump()` (one `add table|chain|set|map|rule|element` command per line). This
module computes the same objects from the node-local desired state (`proxystate`, whose endpoint
policy is shared with every other mode) and prints them in Dump's style and order, so the
output is both `nft -f` input that creates the ruleset from nothing and comparable line by line
with upstream's expected strings.

The objects are kept as values (`ServicePortObjects`, `BaseObjects`) rather than text only, so
the kernel side (proxier.py) can diff a sync against what it wrote before: map and set elements
one by one, chains as whole rule lists. See README.md for the layout.

Deliberate difference: upstream walks a Go map, so its element order is random; here service
ports are in (namespace, name, port name, protocol) order, making the output byte-identical for
the same input.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from pyproxy.model import IPFamily, IPNetwork
from pyproxy.policy import traffic_paths
from pyproxy.proxystate import ProxierConfig, ServicePortState
from pyproxy.serviceport import EndpointInfo, ServicePortName

TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"

# Base chains (hooked into netfilter) and the regular chains they jump to.
FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NODEPORT_IPS = "nodeport-ips"
CLUSTER_IPS = "cluster-ips"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_IPS = "firewall-ips"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"


@dataclass(frozen=True, slots=True)
class BaseChain:
    name: str
    type: str
    hook: str
    #: Numeric, as knftables writes it (older nft rejects "dstnat" in the output hook).
    priority: int


#: Upstream's nftablesBaseChains (dstnat = -100, filter = 0, srcnat = 100).
BASE_CHAINS = (
    # Pre-DNAT filtering sees the LB IP a packet was sent to (loadBalancerSourceRanges).
    BaseChain(FILTER_PREROUTING_PRE_DNAT, "filter", "prerouting", -110),
    BaseChain(FILTER_OUTPUT_PRE_DNAT, "filter", "output", -110),
    BaseChain(FILTER_INPUT, "filter", "input", 0),
    BaseChain(FILTER_FORWARD, "filter", "forward", 0),
    BaseChain(FILTER_OUTPUT, "filter", "output", 0),
    BaseChain(NAT_PREROUTING, "nat", "prerouting", -100),
    BaseChain(NAT_OUTPUT, "nat", "output", -100),
    BaseChain(NAT_POSTROUTING, "nat", "postrouting", 100),
)

#: Upstream's nftablesJumpChains: (target, from base chain, extra match), in upstream's order.
JUMP_CHAINS = (
    # reject is only valid in input/forward/output hooks before kernel 5.9, hence not from
    # prerouting like firewall-check.
    (NODEPORT_ENDPOINTS_CHECK, FILTER_INPUT, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, FILTER_INPUT, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, FILTER_FORWARD, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, FILTER_OUTPUT, "ct state new"),
    (FIREWALL_CHECK, FILTER_PREROUTING_PRE_DNAT, "ct state new"),
    (FIREWALL_CHECK, FILTER_OUTPUT_PRE_DNAT, "ct state new"),
    (SERVICES, NAT_OUTPUT, ""),
    (SERVICES, NAT_PREROUTING, ""),
    (MASQUERADING, NAT_POSTROUTING, ""),
    (CLUSTER_IPS_CHECK, FILTER_FORWARD, "ct state new"),
    (CLUSTER_IPS_CHECK, FILTER_OUTPUT, "ct state new"),
)

#: The maps and sets whose elements are per service (diffed element by element).
ELEMENT_CONTAINERS = (
    CLUSTER_IPS,
    SERVICE_IPS,
    FIREWALL_IPS,
    NO_ENDPOINT_SERVICES,
    NO_ENDPOINT_NODEPORTS,
    SERVICE_NODEPORTS,
)

SERVICE_CHAIN_PREFIX = "service-"
LOCAL_CHAIN_PREFIX = "local-"
EXTERNAL_CHAIN_PREFIX = "external-"
ENDPOINT_CHAIN_PREFIX = "endpoint-"
AFFINITY_SET_PREFIX = "affinity-"
FIREWALL_CHAIN_PREFIX = "firewall-"

#: knftables.NameLengthMax - chainNamePrefixLengthMax (16): room left for the name base.
CHAIN_NAME_BASE_LENGTH_MAX = 256 - 16


def family_keyword(family: IPFamily) -> str:
    """The nft family of our table and the address match keyword: `ip` or `ip6`."""
    return "ip" if family is IPFamily.IPv4 else "ip6"


def _addr_type(family: IPFamily) -> str:
    return "ipv4_addr" if family is IPFamily.IPv4 else "ipv6_addr"


# --- names --------------------------------------------------------------------------------


def hash_and_truncate(name: str) -> str:
    """Upstream's hashAndTruncate: base32(sha256(name))[:8] + "-" + name, cut at 240."""
    # The first 8 base32 digits encode exactly the first 5 bytes of the digest.
    digest = hashlib.sha256(name.encode()).digest()[:5]
    out = base64.b32encode(digest).decode() + "-" + name
    if len(out) > CHAIN_NAME_BASE_LENGTH_MAX:
        out = out[: CHAIN_NAME_BASE_LENGTH_MAX - 3] + "..."
    return out


@functools.lru_cache(maxsize=65536)
def service_port_chain_name_base(spn: ServicePortName) -> str:
    """`HASH-namespace/name/protocol/port` ('/' is allowed in nft names, never in API names)."""
    return hash_and_truncate(f"{spn.namespace}/{spn.name}/{spn.protocol.lower}/{spn.port}")


def endpoint_chain_name_base(spn: ServicePortName, endpoint: str) -> str:
    """`HASH-namespace/name/protocol/port__IP/port` for an `ip:port` / `[ip]:port` endpoint;
    IPv6 ':' becomes '.' (not allowed in nft names)."""
    host, _, ep_port = endpoint.rpartition(":")
    ip = host.strip("[]").replace(":", ".")
    return hash_and_truncate(
        f"{spn.namespace}/{spn.name}/{spn.protocol.lower}/{spn.port}__{ip}/{ep_port}"
    )


def is_service_chain_name(chain: str) -> bool:
    """Per-service and per-endpoint chains always contain '/'; the fixed chains never do."""
    return "/" in chain


def is_affinity_set_name(name: str) -> bool:
    return name.startswith(AFFINITY_SET_PREFIX)


# --- objects ------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """Go's %q for the plain ASCII comments we write."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Element:
    """One set or map element; `value` is empty for a set element."""

    container: str
    key: tuple[str, ...]
    value: str = ""
    comment: str | None = None

    @property
    def key_text(self) -> str:
        return " . ".join(self.key)

    def add(self, family: str) -> str:
        comment = f" comment {_quote(self.comment)}" if self.comment is not None else ""
        value = f" : {self.value}" if self.value else ""
        return (
            f"add element {family} {TABLE} {self.container} {{ {self.key_text}{comment}{value} }}"
        )

    def delete(self, family: str) -> str:
        return f"delete element {family} {TABLE} {self.container} {{ {self.key_text} }}"


@dataclass(frozen=True, slots=True)
class Chain:
    """A regular chain and its rules (rule text as after `add rule <family> kube-proxy NAME`)."""

    name: str
    rules: tuple[str, ...] = ()
    comment: str | None = None

    def add(self, family: str) -> str:
        comment = f" {{ comment {_quote(self.comment)} ; }}" if self.comment else ""
        return f"add chain {family} {TABLE} {self.name}{comment}"

    def rule_lines(self, family: str) -> Iterator[str]:
        prefix = f"add rule {family} {TABLE} {self.name} "
        for rule in self.rules:
            yield prefix + rule


@dataclass(frozen=True, slots=True)
class NamedSet:
    """A set or map declaration (`kind` is "set" or "map")."""

    kind: str
    name: str
    type: str
    flags: tuple[str, ...] = ()
    timeout: int | None = None
    comment: str | None = None

    def add(self, family: str) -> str:
        parts = [f" type {self.type} ;"]
        if self.flags:
            parts.append(f" flags {','.join(self.flags)} ;")
        if self.timeout is not None:
            parts.append(f" timeout {self.timeout}s ;")
        if self.comment is not None:
            parts.append(f" comment {_quote(self.comment)} ;")
        return f"add {self.kind} {family} {TABLE} {self.name} {{{''.join(parts)} }}"


@dataclass(frozen=True, slots=True)
class ServicePortObjects:
    """What one service port contributes: its own chains and affinity sets, and its elements
    in the shared maps and sets (in upstream's insertion order)."""

    name: ServicePortName
    chains: tuple[Chain, ...]
    affinity_sets: tuple[NamedSet, ...]
    elements: tuple[Element, ...]
    #: Upstream's "has no local endpoints" cases, for the no_local_endpoints metric.
    no_local_internal: bool
    no_local_external: bool


@dataclass(frozen=True, slots=True)
class BaseObjects:
    """The fixed part of the table: base and top-level chains, maps, sets, fixed elements."""

    base_chains: tuple[BaseChain, ...]
    chains: tuple[Chain, ...]
    sets: tuple[NamedSet, ...]
    maps: tuple[NamedSet, ...]
    #: Elements of nodeport-ips (the per-service containers are filled by the services).
    elements: tuple[Element, ...]

    def base_chain_add(self, chain: BaseChain, family: str) -> str:
        return (
            f"add chain {family} {TABLE} {chain.name} {{ type {chain.type} hook {chain.hook}"
            f" priority {chain.priority} ; }}"
        )


# --- the fixed part -----------------------------------------------------------------------


def local_detect(config: ProxierConfig, *, negate: bool) -> str | None:
    """kube-proxy's ClusterCIDR local-traffic detector as an nft match, or None without one."""
    if config.cluster_cidr is None:
        return None
    ipx = family_keyword(config.family)
    return f"{ipx} saddr {'!= ' if negate else ''}{config.cluster_cidr}"


def nodeport_ips(config: ProxierConfig) -> tuple[str, ...] | None:
    """Addresses in @nodeport-ips, or None when `--nodeport-addresses` matches every address.
    Localhost NodePorts do not exist in nftables mode, so loopback is left out (upstream logs
    an error for it)."""
    ips = config.nodeport_ips
    if ips is None:
        return None
    return tuple(str(ip) for ip in ips if not ip.is_loopback)


def render_base(config: ProxierConfig, service_cidrs: Sequence[IPNetwork] = ()) -> BaseObjects:
    """Upstream's setupNFTables, for a table created from nothing.

    Long on purpose: it follows upstream's setupNFTables (nftables/proxier.go) statement for
    statement, so the two read side by side, and the order of its statements is the order of the
    output.
    """
    family = config.family
    ipx = family_keyword(family)
    addr = _addr_type(family)
    no_localhost = "ip daddr != 127.0.0.0/8" if family is IPFamily.IPv4 else "ip6 daddr != ::1"
    mark = config.masquerade_mark
    rules: dict[str, list[str]] = {}

    def rule(chain: str, text: str) -> None:
        rules.setdefault(chain, []).append(text)

    for target, source, extra in JUMP_CHAINS:
        rule(source, f"{extra} jump {target}".lstrip())
    rule(MARK_MASQ, f"mark set mark or {mark}")
    rule(MASQUERADING, f"mark and {mark} == 0 return")
    rule(MASQUERADING, f"mark set mark xor {mark}")
    rule(MASQUERADING, "masquerade fully-random")
    rule(
        CLUSTER_IPS_CHECK,
        f"{ipx} daddr @{CLUSTER_IPS} reject comment"
        f" {_quote('Reject traffic to invalid ports of ClusterIPs')}",
    )
    cidrs = [c for c in service_cidrs if IPFamily.of(c) is family]
    if cidrs:
        rule(
            CLUSTER_IPS_CHECK,
            f"{ipx} daddr {{ {','.join(map(str, cidrs))} }} drop comment"
            f" {_quote('Drop traffic to unallocated ClusterIPs')}",
        )
    nodeports = nodeport_ips(config)
    rule(REJECT_CHAIN, "reject")
    rule(
        SERVICE_ENDPOINTS_CHECK,
        f"{ipx} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",
    )
    if nodeports is None:
        rule(
            NODEPORT_ENDPOINTS_CHECK,
            f"{no_localhost} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",
        )
    else:
        rule(
            NODEPORT_ENDPOINTS_CHECK,
            f"{ipx} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",
        )
    rule(FIREWALL_CHECK, f"{ipx} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}")
    rule(SERVICES, f"{ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}")
    if nodeports is None:
        rule(
            SERVICES,
            f"fib daddr type local {no_localhost} meta l4proto . th dport vmap"
            f" @{SERVICE_NODEPORTS}",
        )
    else:
        rule(
            SERVICES,
            f"{ipx} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
        )

    regular = (
        NODEPORT_ENDPOINTS_CHECK,
        SERVICE_ENDPOINTS_CHECK,
        FIREWALL_CHECK,
        SERVICES,
        MASQUERADING,
        CLUSTER_IPS_CHECK,
        MARK_MASQ,
        REJECT_CHAIN,
    )
    # Base chains carry rules too: they are Chain entries here, declared from `base_chains`.
    chains = tuple(
        Chain(
            name,
            tuple(rules.get(name, ())),
            "helper for @no-endpoint-services / @no-endpoint-nodeports"
            if name == REJECT_CHAIN
            else None,
        )
        for name in (*regular, *(b.name for b in BASE_CHAINS))
    )
    sets = [NamedSet("set", CLUSTER_IPS, addr, comment="Active ClusterIPs")]
    if nodeports is not None:
        sets.append(NamedSet("set", NODEPORT_IPS, addr, comment="IPs that accept NodePort traffic"))
    full_key = f"{addr} . inet_proto . inet_service : verdict"
    port_key = "inet_proto . inet_service : verdict"
    maps = (
        NamedSet(
            "map",
            NO_ENDPOINT_SERVICES,
            full_key,
            comment="vmap to drop or reject packets to services with no endpoints",
        ),
        NamedSet(
            "map",
            NO_ENDPOINT_NODEPORTS,
            port_key,
            comment="vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        NamedSet(
            "map",
            FIREWALL_IPS,
            full_key,
            comment="destinations that are subject to LoadBalancerSourceRanges",
        ),
        NamedSet(
            "map",
            SERVICE_IPS,
            full_key,
            comment="ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        NamedSet("map", SERVICE_NODEPORTS, port_key, comment="NodePort traffic"),
    )
    elements = tuple(Element(NODEPORT_IPS, (ip,)) for ip in nodeports or ())
    return BaseObjects(BASE_CHAINS, chains, tuple(sets), maps, elements)


# --- one service port ---------------------------------------------------------------------


def _service_to_endpoint_rules(
    ipx: str,
    affinity: bool,
    endpoints: Sequence[EndpointInfo],
    bases: Mapping[str, str],
) -> list[str]:
    """Upstream's writeServiceToEndpointRules: affinity lookups, then the numgen vmap.
    `bases` maps each endpoint (`ip:port`) to its chain name base."""
    out = []
    if affinity:
        for ep in endpoints:
            base = bases[ep.endpoint]
            out.append(
                f"{ipx} saddr @{AFFINITY_SET_PREFIX}{base} goto {ENDPOINT_CHAIN_PREFIX}{base}"
            )
    elements = " , ".join(
        f"{i} : goto {ENDPOINT_CHAIN_PREFIX}{bases[ep.endpoint]}" for i, ep in enumerate(endpoints)
    )
    out.append(f"numgen random mod {len(endpoints)} vmap {{ {elements} }}")
    return out


def render_service_port(state: ServicePortState, config: ProxierConfig) -> ServicePortObjects:  # noqa: PLR0912, PLR0915 - reason in the docstring
    """Upstream's per-service-port body of syncProxyRules (nftables), for one service port.

    Long on purpose: it follows upstream's per-service-port body of syncProxyRules
    (nftables/proxier.go) statement for statement, so the two read side by side, and the order of
    its statements is the order of the output.
    """
    info = state.info
    cat = state.categorized
    spn = info.name
    ipx = family_keyword(config.family)
    proto = info.protocol.lower
    port = str(info.port)
    name_base = service_port_chain_name_base(spn)
    spn_text = str(spn)
    affinity = info.session_affinity_timeout is not None

    cluster_policy_chain = SERVICE_CHAIN_PREFIX + name_base
    local_policy_chain = LOCAL_CHAIN_PREFIX + name_base
    external_chain = EXTERNAL_CHAIN_PREFIX + name_base
    fw_chain = FIREWALL_CHAIN_PREFIX + name_base

    uses_cluster_policy_chain = bool(cat.cluster) and info.uses_cluster_endpoints
    uses_local_policy_chain = bool(cat.local) and info.uses_local_endpoints

    has_endpoints = cat.has_any
    paths = traffic_paths(info, cat)
    internal_chain = local_policy_chain if paths.internal_local else cluster_policy_chain
    has_internal = paths.has_internal
    external_policy_chain = local_policy_chain if paths.external_local else cluster_policy_chain
    has_external = paths.has_external

    # The external chain carries the local-traffic short-circuits, so it exists whenever any
    # endpoint does, even without externally usable ones.
    uses_external_chain = has_endpoints and info.externally_accessible
    # Unlike iptables mode, the firewall chain does not depend on having endpoints.
    uses_fw_chain = bool(info.load_balancer_vips) and bool(info.load_balancer_source_ranges)

    if not has_endpoints:
        internal_verdict = external_verdict = f"goto {REJECT_CHAIN}"
    else:
        internal_verdict = external_verdict = "drop"

    # Chains in upstream's ensureChain order; rules appended as upstream adds them.
    chain_rules: dict[str, list[str]] = {}
    ep_bases = {ep.endpoint: endpoint_chain_name_base(spn, ep.endpoint) for ep in cat.all_reachable}
    for ep in cat.all_reachable:
        chain_rules[ENDPOINT_CHAIN_PREFIX + ep_bases[ep.endpoint]] = []
    if uses_cluster_policy_chain:
        chain_rules[cluster_policy_chain] = []
    if uses_local_policy_chain:
        chain_rules[local_policy_chain] = []
    if uses_external_chain:
        chain_rules[external_chain] = []
    if uses_fw_chain:
        chain_rules[fw_chain] = []

    elements: list[Element] = [Element(CLUSTER_IPS, (str(info.cluster_ip),))]
    if has_internal:
        elements.append(
            Element(SERVICE_IPS, (str(info.cluster_ip), proto, port), f"goto {internal_chain}")
        )
    else:
        elements.append(
            Element(
                NO_ENDPOINT_SERVICES,
                (str(info.cluster_ip), proto, port),
                internal_verdict,
                spn_text,
            )
        )
    for ip in info.external_ips:
        if has_endpoints:
            elements.append(Element(SERVICE_IPS, (str(ip), proto, port), f"goto {external_chain}"))
        if not has_external:
            # No endpoints at all (reject) or none for external traffic (drop whatever the
            # external chain did not short-circuit).
            elements.append(
                Element(NO_ENDPOINT_SERVICES, (str(ip), proto, port), external_verdict, spn_text)
            )
    for ip in info.load_balancer_vips:
        if has_endpoints:
            elements.append(Element(SERVICE_IPS, (str(ip), proto, port), f"goto {external_chain}"))
        if uses_fw_chain:
            elements.append(Element(FIREWALL_IPS, (str(ip), proto, port), f"goto {fw_chain}"))
    if not has_external:
        for ip in info.load_balancer_vips:
            elements.append(
                Element(NO_ENDPOINT_SERVICES, (str(ip), proto, port), external_verdict, spn_text)
            )
    if info.node_port:
        node_port = str(info.node_port)
        if has_endpoints:
            # NodePorts are not subject to loadBalancerSourceRanges (as upstream).
            elements.append(
                Element(SERVICE_NODEPORTS, (proto, node_port), f"goto {external_chain}")
            )
        if not has_external:
            elements.append(
                Element(NO_ENDPOINT_NODEPORTS, (proto, node_port), external_verdict, spn_text)
            )

    if has_internal:
        # Masquerade off-cluster (or all) traffic to the cluster IP: it may bounce off-node.
        if config.masquerade_all:
            chain_rules[internal_chain].append(f"{ipx} daddr {info.cluster_ip} jump {MARK_MASQ}")
        elif (not_local := local_detect(config, negate=True)) is not None:
            chain_rules[internal_chain].append(
                f"{ipx} daddr {info.cluster_ip} {not_local} jump {MARK_MASQ}"
            )

    if uses_external_chain:
        ext = chain_rules[external_chain]
        if not info.external_policy_local:
            # Endpoints may be on another node: masquerade so replies come back through us.
            ext.append(f"jump {MARK_MASQ}")
        else:
            if (local := local_detect(config, negate=False)) is not None:
                # Pod → external destination acts as if it went out to the LB and came back.
                ext.append(
                    f"{local} goto {cluster_policy_chain} comment"
                    f" {_quote('short-circuit pod traffic')}"
                )
            # The node's own traffic has a local source address: masquerade it and let it
            # reach any endpoint.
            ext.append(
                f"fib saddr type local jump {MARK_MASQ}"
                f" comment {_quote('masquerade local traffic')}"
            )
            ext.append(
                f"fib saddr type local goto {cluster_policy_chain} comment"
                f" {_quote('short-circuit local traffic')}"
            )
        if has_external:
            ext.append(f"goto {external_policy_chain}")

    if uses_fw_chain:
        sources = [str(cidr) for cidr in info.load_balancer_source_ranges]
        node_ip = config.primary_node_ip
        if node_ip is not None and any(
            node_ip.version == c.version and node_ip in c for c in info.load_balancer_source_ranges
        ):
            # A node reaching a VIP bound locally loops back with the VIP as source.
            sources.extend(str(ip) for ip in info.load_balancer_vips)
        chain_rules[fw_chain].append(f"{ipx} saddr != {{ {' , '.join(sources)} }} drop")

    affinity_sets: tuple[NamedSet, ...] = ()
    if affinity:
        affinity_sets = tuple(
            NamedSet(
                "set",
                AFFINITY_SET_PREFIX + ep_bases[ep.endpoint],
                _addr_type(config.family),
                # "dynamic" or some kernels add it themselves and a later identical add fails.
                flags=("dynamic", "timeout"),
                timeout=info.session_affinity_timeout,
            )
            for ep in cat.all_reachable
        )

    if uses_cluster_policy_chain:
        chain_rules[cluster_policy_chain].extend(
            _service_to_endpoint_rules(ipx, affinity, cat.cluster, ep_bases)
        )
    if uses_local_policy_chain:
        chain_rules[local_policy_chain].extend(
            _service_to_endpoint_rules(ipx, affinity, cat.local, ep_bases)
        )

    for ep in cat.all_reachable:
        base = ep_bases[ep.endpoint]
        rules = chain_rules[ENDPOINT_CHAIN_PREFIX + base]
        # Hairpin: an endpoint reaching itself through the service must be masqueraded.
        rules.append(f"{ipx} saddr {ep.ip} jump {MARK_MASQ}")
        if affinity:
            rules.append(f"update @{AFFINITY_SET_PREFIX}{base} {{ {ipx} saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {ep.endpoint}")

    return ServicePortObjects(
        name=spn,
        chains=tuple(Chain(name, tuple(rules)) for name, rules in chain_rules.items()),
        affinity_sets=affinity_sets,
        elements=tuple(elements),
        no_local_internal=has_endpoints and not has_internal,
        no_local_external=has_endpoints and not has_external,
    )


def port_order(state: ServicePortState) -> tuple[str, str, str, str]:
    """Output order of service ports (upstream's is random: it walks a Go map)."""
    n = state.info.name
    return (n.namespace, n.name, n.port, n.protocol.value)


# --- the whole table ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ruleset:
    """One family's table: the fixed part and every service port's objects, in output order."""

    family: IPFamily
    base: BaseObjects
    ports: tuple[ServicePortObjects, ...]

    @property
    def nft_family(self) -> str:
        return family_keyword(self.family)

    def dump(self) -> str:
        """knftables' Fake.Dump(): table; chains, sets, maps (each sorted by name); then rules
        chain by chain, set elements, map elements (in insertion order)."""
        return "".join(line + "\n" for line in dump_lines(self.family, self.base, self.ports))


def dump_lines(
    family: IPFamily, base: BaseObjects, ports: Iterable[ServicePortObjects]
) -> Iterator[str]:
    fam = family_keyword(family)
    ports = tuple(ports)
    base_chain_by_name = {b.name: b for b in base.base_chains}
    chains = {c.name: c for c in base.chains}
    for p in ports:
        for c in p.chains:
            chains[c.name] = c
    sets = {s.name: s for s in base.sets}
    for p in ports:
        for s in p.affinity_sets:
            sets[s.name] = s
    maps = {m.name: m for m in base.maps}
    # Per container, in insertion order; a key two Services claim (say one external IP:port)
    # goes to the first, as in the proxier: nft refuses a second verdict for a map key.
    elements: dict[str, dict[str, Element]] = {}
    for e in (*base.elements, *(e for p in ports for e in p.elements)):
        elements.setdefault(e.container, {}).setdefault(e.key_text, e)

    yield f"add table {fam} {TABLE} {{ comment {_quote(TABLE_COMMENT)} ; }}"
    chain_names = sorted(chains)
    for name in chain_names:
        bc = base_chain_by_name.get(name)
        yield base.base_chain_add(bc, fam) if bc is not None else chains[name].add(fam)
    for name in sorted(sets):
        yield sets[name].add(fam)
    for name in sorted(maps):
        yield maps[name].add(fam)
    for name in chain_names:
        yield from chains[name].rule_lines(fam)
    for name in sorted(sets):
        yield from (e.add(fam) for e in elements.get(name, {}).values())
    for name in sorted(maps):
        yield from (e.add(fam) for e in elements.get(name, {}).values())


def render_ruleset(
    states: Iterable[ServicePortState],
    config: ProxierConfig,
    service_cidrs: Sequence[IPNetwork] = (),
) -> Ruleset:
    """The whole table for one family from its service port states (any order)."""
    ordered = sorted(states, key=port_order)
    return Ruleset(
        config.family,
        render_base(config, service_cidrs),
        tuple(render_service_port(s, config) for s in ordered),
    )
