"""The iptables rules kube-proxy's IPVS mode still writes, and how to remove them.

IPVS does the load balancing; iptables is left with a fixed set of rules that match the ipsets
(see ipsets.py) to decide masquerading, firewalling and filtering. The rules follow upstream's
`writeIptablesRules` (pkg/proxy/ipvs/proxier.go) rule for rule and in the same order; a rule
that matches a set is only written while that set has members, as upstream does.

    nat PREROUTING/OUTPUT → KUBE-SERVICES
        -s 127.0.0.0/8 RETURN (first)
        KUBE-LOAD-BALANCER set → KUBE-LOAD-BALANCER: -LOCAL set RETURN, else KUBE-MARK-MASQ
        KUBE-CLUSTER-IP set: off-cluster sources (or all) → KUBE-MARK-MASQ
        KUBE-EXTERNAL-IP set → KUBE-MARK-MASQ; external IPs ACCEPTed (both -IP and -IP-LOCAL)
        dst-type LOCAL → KUBE-NODE-PORT: -LOCAL-<proto> sets RETURN, else KUBE-MARK-MASQ
        KUBE-CLUSTER-IP / KUBE-LOAD-BALANCER sets ACCEPT (last)
    nat POSTROUTING → KUBE-POSTROUTING: KUBE-LOOP-BACK (hairpin) MASQUERADE, then the marked
        traffic MASQUERADE (same rules as iptables mode)
    filter INPUT/FORWARD → KUBE-PROXY-FIREWALL: KUBE-LOAD-BALANCER-FW set →
        KUBE-SOURCE-RANGES-FIREWALL: RETURN for allowed sources, else DROP
    filter INPUT → KUBE-NODE-PORT: health-check node ports ACCEPT
    filter INPUT → KUBE-IPVS-FILTER: new connections to an address on kube-ipvs0 that is not
        a service ip:port are REJECTed (no reaching host ports through a Service IP)
    filter OUTPUT → KUBE-IPVS-OUT-FILTER: the node itself may not reach an LB IP whose
        sourceRanges exclude the node
    filter FORWARD → KUBE-FORWARD: marked and established traffic ACCEPT

Pure: text in, text out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pyproxy.iptables.kernelview import KernelView, TableView
from pyproxy.iptables.vocabulary import (
    FILTER_CHAINS as IPTABLES_FILTER_CHAINS,
)
from pyproxy.iptables.vocabulary import (
    KUBE_FORWARD,
    KUBE_MARK_MASQ,
    KUBE_POSTROUTING,
    KUBE_PROXY_CANARY,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    JumpRule,
    TableSection,
    fixed_filter_rules,
    fixed_nat_rules,
    is_service_chain,
    jump_rules,
    restore_document,
)
from pyproxy.iptables.vocabulary import (
    NAT_CHAINS as IPTABLES_NAT_CHAINS,
)
from pyproxy.ipvs import ipsets
from pyproxy.ipvs.ipsets import IpsetSpec, IpsetType
from pyproxy.model import IPAddress, IPFamily, Protocol
from pyproxy.proxystate import ProxierConfig

KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

#: Upstream's iptablesChains, per table, in its order.
NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
)


def ipvs_jump_rules(config: ProxierConfig) -> tuple[JumpRule, ...]:
    """Upstream ipvs mode's iptablesJumpChain (prepended in this order, so the last one of a
    built-in chain ends up first). Unlike iptables mode there is no conntrack state match."""
    del config  # the same for every family and flag combination
    return (
        JumpRule("nat", "OUTPUT", "", KUBE_SERVICES, "kubernetes service portals"),
        JumpRule("nat", "PREROUTING", "", KUBE_SERVICES, "kubernetes service portals"),
        JumpRule("nat", "POSTROUTING", "", KUBE_POSTROUTING, "kubernetes postrouting rules"),
        JumpRule("filter", "FORWARD", "", KUBE_FORWARD, "kubernetes forwarding rules"),
        JumpRule("filter", "INPUT", "", KUBE_NODE_PORT, "kubernetes health check rules"),
        JumpRule("filter", "INPUT", "", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
        JumpRule("filter", "FORWARD", "", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
        JumpRule("filter", "INPUT", "", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
        JumpRule("filter", "OUTPUT", "", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
    )


@dataclass(frozen=True, slots=True)
class LoadBalancerNoNodeAccess:
    """An LB ip:port whose sourceRanges do not include the node: the node may not use it."""

    ip: IPAddress
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class IpvsRuleset:
    """One family's ipvs-mode rules as restore-text lines ("\\n"-ended), nat first as upstream."""

    nat_text: str
    filter_text: str
    nat_rules: int
    filter_rules: int

    def document(self, *, hooks: Iterable[JumpRule] = (), canary: bool = False) -> str:
        """The iptables-restore --noflush input: our chains declared (so flushed) and refilled,
        missing hooks inserted at the top of their built-in chains, and (canary) the empty
        KUBE-PROXY-CANARY chains whose disappearance reveals a flush by someone else."""
        return restore_document(
            [
                TableSection("nat", NAT_CHAINS, self.nat_text),
                TableSection("filter", FILTER_CHAINS, self.filter_text),
            ],
            hooks=hooks,
            canary=canary,
        )

    @property
    def text(self) -> str:
        return self.document()


def _set_match(spec: IpsetSpec, match: str) -> str:
    return f'-m comment --comment "{spec.comment}" -m set --match-set {spec.name} {match}'


def render_rules(
    sets: Mapping[str, tuple[IpsetSpec, frozenset[str]]],
    config: ProxierConfig,
    no_node_access: Sequence[LoadBalancerNoNodeAccess] = (),
    *,
    random_fully: bool = True,
) -> IpvsRuleset:
    """Upstream's writeIptablesRules. `sets` maps each set's base (IPv4) name to its spec and
    planned members; rules that match a set are written only when it has members."""
    nat: list[str] = []
    filt: list[str] = []

    def spec(base: str) -> IpsetSpec:
        return sets[base][0]

    def has(base: str) -> bool:
        return bool(sets[base][1])

    loopback = "127.0.0.0/8" if config.family is IPFamily.IPv4 else "::1/128"
    nat.append(f"-A {KUBE_SERVICES} -s {loopback} -j RETURN")

    # Upstream's ipsetWithIptablesChain, in its order (the -LOCAL RETURNs come first):
    # (set, table, chain, match type, target, protocol).
    chained: list[tuple[str, list[str], str, str, str, str]] = [
        (ipsets.LOOP_BACK, nat, KUBE_POSTROUTING, "dst,dst,src", "MASQUERADE", ""),
        (ipsets.LOAD_BALANCER, nat, KUBE_SERVICES, "dst,dst", KUBE_LOAD_BALANCER, ""),
        (ipsets.LOAD_BALANCER_LOCAL, nat, KUBE_LOAD_BALANCER, "dst,dst", "RETURN", ""),
    ]
    for protocol, (cluster_set, local_set) in ipsets.NODE_PORT_SETS.items():
        match = "dst,dst" if protocol is Protocol.SCTP else "dst"
        chained.append((local_set, nat, KUBE_NODE_PORT, match, "RETURN", protocol.lower))
        chained.append((cluster_set, nat, KUBE_NODE_PORT, match, KUBE_MARK_MASQ, protocol.lower))
    chained += [
        (
            ipsets.LOAD_BALANCER_FW,
            filt,
            KUBE_PROXY_FIREWALL,
            "dst,dst",
            KUBE_SOURCE_RANGES_FIREWALL,
            "",
        ),
        (
            ipsets.LOAD_BALANCER_SOURCE_CIDR,
            filt,
            KUBE_SOURCE_RANGES_FIREWALL,
            "dst,dst,src",
            "RETURN",
            "",
        ),
        (
            ipsets.LOAD_BALANCER_SOURCE_IP,
            filt,
            KUBE_SOURCE_RANGES_FIREWALL,
            "dst,dst,src",
            "RETURN",
            "",
        ),
    ]
    for base, table, chain, match, target, proto in chained:
        if has(base):
            p = f" -p {proto}" if proto else ""
            table.append(f"-A {chain}{p} {_set_match(spec(base), match)} -j {target}")

    # Masquerade what reaches a cluster IP from outside the cluster (it may bounce off-node).
    if has(ipsets.CLUSTER_IP):
        args = f"-A {KUBE_SERVICES} {_set_match(spec(ipsets.CLUSTER_IP), '')}".rstrip()
        if config.masquerade_all:
            nat.append(f"{args} dst,dst -j {KUBE_MARK_MASQ}")
        elif config.cluster_cidr is not None:
            nat.append(f"{args} dst,dst ! -s {config.cluster_cidr} -j {KUBE_MARK_MASQ}")
        else:
            # Without a local-traffic detector: the node's own connections to a VIP leave with
            # the VIP (bound on kube-ipvs0) as source; masquerade those.
            nat.append(f"{args} src,dst -j {KUBE_MARK_MASQ}")

    def external_ip_rules(args: str) -> None:
        # Traffic from off-machine (not from a bridge port, not from a local address) ...
        nat.append(f"{args} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
        # ... and external IPs that are also local addresses stay local.
        nat.append(f"{args} -m addrtype --dst-type LOCAL -j ACCEPT")

    if has(ipsets.EXTERNAL_IP):
        args = f"-A {KUBE_SERVICES} {_set_match(spec(ipsets.EXTERNAL_IP), 'dst,dst')}"
        nat.append(f"{args} -j {KUBE_MARK_MASQ}")
        external_ip_rules(args)
    if has(ipsets.EXTERNAL_IP_LOCAL):
        external_ip_rules(
            f"-A {KUBE_SERVICES} {_set_match(spec(ipsets.EXTERNAL_IP_LOCAL), 'dst,dst')}"
        )

    nat.append(f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}")
    nat.append(f"-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}")
    filt.append(f"-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP")
    # For IPVS a node-originated connection to a local VIP has the VIP as source too.
    for entry in no_node_access:
        filt.append(
            f"-A {KUBE_IPVS_OUT_FILTER} -s {entry.ip} -m ipvs --vaddr {entry.ip}"
            f" --vproto {entry.protocol.lower} --vport {entry.port} -j DROP"
        )
    # Accept everything headed for a virtual server, in case other rules would block it.
    for base in (ipsets.CLUSTER_IP, ipsets.LOAD_BALANCER):
        if has(base):
            match = "dst" if spec(base).type is IpsetType.BITMAP_PORT else "dst,dst"
            nat.append(f"-A {KUBE_SERVICES} -m set --match-set {spec(base).name} {match} -j ACCEPT")

    # KUBE-FORWARD as in iptables mode, minus the ctstate INVALID drop ipvs mode never had.
    _, forward = fixed_filter_rules(dataclasses.replace(config, conntrack_tcp_be_liberal=True))
    filt.extend(forward)
    hcnp = spec(ipsets.HEALTH_CHECK_NODE_PORT)
    filt.append(f"-A {KUBE_NODE_PORT} {_set_match(hcnp, 'dst')} -j ACCEPT")

    def name(base: str) -> str:
        return spec(base).name

    for base in (
        ipsets.LOAD_BALANCER,
        ipsets.CLUSTER_IP,
        ipsets.EXTERNAL_IP,
        ipsets.EXTERNAL_IP_LOCAL,
    ):
        filt.append(f"-A {KUBE_IPVS_FILTER} -m set --match-set {name(base)} dst,dst -j RETURN")
    filt.append(
        f"-A {KUBE_IPVS_FILTER} -m set --match-set {name(ipsets.HEALTH_CHECK_NODE_PORT)} dst"
        " -j RETURN"
    )
    filt.append(
        f"-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW"
        f" -m set --match-set {name(ipsets.IPVS_IPS)} dst -j REJECT"
    )

    # KUBE-POSTROUTING and KUBE-MARK-MASQ: the same rules as iptables mode.
    nat.extend(fixed_nat_rules(config, random_fully=random_fully))

    def text(lines: list[str]) -> str:
        return "".join(line + "\n" for line in lines)

    return IpvsRuleset(
        nat_text=text(nat), filter_text=text(filt), nat_rules=len(nat), filter_rules=len(filt)
    )


# --- removing everything (--cleanup) --------------------------------------------------------

#: Chains --cleanup removes per table: ipvs mode's, and iptables mode's fixed and per-service
#: chains too, so one pass cleans a node whatever mode it ran (KUBE-FIREWALL is kubelet's).
CLEANUP_CHAINS: Mapping[str, frozenset[str]] = {
    "nat": frozenset({*NAT_CHAINS, *IPTABLES_NAT_CHAINS, KUBE_PROXY_CANARY}),
    "filter": frozenset({*FILTER_CHAINS, *IPTABLES_FILTER_CHAINS, KUBE_PROXY_CANARY}),
    "mangle": frozenset({KUBE_PROXY_CANARY}),
}


def cleanup_hooks(family: IPFamily) -> tuple[JumpRule, ...]:
    """Every hook either mode may have installed (kubelet's KUBE-FIREWALL ones excluded)."""
    config = ProxierConfig(family=family, node_name="", localhost_nodeports=False)
    # Both modes hook nat OUTPUT/PREROUTING and filter FORWARD the same way: once each.
    return tuple(dict.fromkeys((*ipvs_jump_rules(config), *jump_rules(config))))


def _ours(table: str, view: TableView) -> set[str]:
    names = CLEANUP_CHAINS.get(table, frozenset())
    return {c for c in view.chains if c in names or (table == "nat" and is_service_chain(c))}


def cleanup_document(view: KernelView, hooks: Iterable[JumpRule]) -> str:
    """Restore input removing our hooks and chains. A chain a foreign rule still jumps to is
    kept (flushing it would be fine, deleting it would fail the whole restore)."""
    hooks = tuple(hooks)
    parts: list[str] = []
    for table in ("nat", "filter", "mangle"):
        tview = view.tables.get(table)
        if tview is None:
            continue
        ours = _ours(table, tview)
        hook_rules = [
            h for h in hooks if h.table == table and view.has_hook(h) and h.target in ours
        ]
        hook_keys = {(h.chain, h.target, h.comment or None) for h in hook_rules}
        # Keep any chain a foreign rule still jumps to; repeat since keeping one keeps its targets.
        while True:
            referenced = {
                r.target
                for r in tview.rules
                if r.chain not in ours
                and (r.chain, r.target, r.comment) not in hook_keys
                and r.target in ours
            }
            if not referenced:
                break
            ours -= referenced
            hook_keys = {k for k in hook_keys if k[1] in ours}
        hook_rules = [h for h in hook_rules if h.target in ours]
        if not ours and not hook_rules:
            continue
        parts.append(f"*{table}\n")
        parts.extend(f":{c} - [0:0]\n" for c in sorted(ours))
        parts.extend(f"-D {h.chain} {h.spec}\n" for h in hook_rules)
        parts.extend(f"-X {c}\n" for c in sorted(ours))
        parts.append("COMMIT\n")
    return "".join(parts)
