"""Desired state → what kube-proxy's IPVS mode would program on this node, for one IP family.

From the same per-family ServicePortStates (endpoints already categorized by the shared
endpoint policy) and ProxierConfig as iptables mode, `plan_ipvs` computes, as upstream's ipvs
`syncProxyRules` does:

- a virtual server per ClusterIP:port, externalIP:port, LB ingress IP:port and node IP x
  nodePort, with the `--ipvs-scheduler` (rr by default; `mh` also sets the source-hash flag)
  and, for sessionAffinity ClientIP, the persistent flag and timeout;
- its real servers (weight 1, NAT): Cluster-policy endpoints, or for a Local policy this
  node's endpoints, falling back to the Cluster ones when there are none here (upstream's
  "allow access from local pods even if no local endpoints exist", k8s PR 97081);
- the addresses to bind on the kube-ipvs0 dummy interface (every ClusterIP, and every
  externalIP / LB IP that is not already a local address of another interface);
- every ipset with its members, and the iptables rules matching them (rules.py).

`render_dry_run` prints a plan for `--dry-run`: virtual and real servers in `ipvsadm -Ln` style,
the bound addresses, the ipsets as `ipset save` would list them, then the iptables-restore input.

Pure: no I/O. Output order is sorted, so the same input always gives the same text.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pyproxy.ipvs import ipsets
from pyproxy.ipvs.ipsets import IpsetSpec, ipset_specs, member_sort_key
from pyproxy.ipvs.rules import (
    IpvsRuleset,
    LoadBalancerNoNodeAccess,
    ipvs_jump_rules,
    render_rules,
)
from pyproxy.model import IPAddress, IPFamily, NamespacedName, Protocol, format_endpoint
from pyproxy.proxystate import ProxierConfig, ServicePortState, port_order, service_order
from pyproxy.serviceport import EndpointInfo, ServicePortName

#: The dummy interface every service address is bound to.
DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
#: What `--ipvs-scheduler` accepts (upstream's validation list).
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")

# Virtual server flags (linux/ip_vs.h, as upstream's utilipvs).
FLAG_PERSISTENT = 0x1
#: Set by the kernel on every service; never compared or written.
FLAG_HASHED = 0x2
#: IP_VS_SVC_F_SCHED2: for `mh`, hash the source port too ("mh-port").
FLAG_SOURCE_HASH = 0x10


def normalize_scheduler(name: str) -> str:
    """`--ipvs-scheduler` value → scheduler name ("" is rr); ValueError for an unknown one."""
    name = name.strip() or DEFAULT_SCHEDULER
    if name not in SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {name!r} (one of {', '.join(SCHEDULERS)})")
    return name


class VirtualServerKind(enum.Enum):
    CLUSTER_IP = "cluster IP"
    EXTERNAL_IP = "external IP"
    LOAD_BALANCER = "load balancer IP"
    NODE_PORT = "node port"


def _ip_key(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))


@dataclass(frozen=True, slots=True)
class VirtualServerKey:
    """What identifies a virtual server in the kernel: protocol, address and port."""

    protocol: Protocol
    address: IPAddress
    port: int

    @property
    def family(self) -> IPFamily:
        return IPFamily.of(self.address)

    @property
    def sort_key(self) -> tuple[int, int, int, str]:
        return (*_ip_key(self.address), self.port, self.protocol.value)

    def __str__(self) -> str:
        """Upstream's VirtualServer.String(): `10.96.0.10:80/TCP`."""
        return f"{format_endpoint(self.address, self.port)}/{self.protocol.value}"


@dataclass(frozen=True, slots=True)
class VirtualServer:
    key: VirtualServerKey
    scheduler: str = DEFAULT_SCHEDULER
    #: FLAG_PERSISTENT | FLAG_SOURCE_HASH (the kernel's FLAG_HASHED is never part of it).
    flags: int = 0
    #: Persistence timeout in seconds (0 unless persistent).
    timeout: int = 0

    @property
    def persistent(self) -> bool:
        return bool(self.flags & FLAG_PERSISTENT)


@dataclass(frozen=True, slots=True)
class RealServer:
    address: IPAddress
    port: int
    weight: int = 1

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.address, self.port)

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (*_ip_key(self.address), self.port)


@dataclass(frozen=True, slots=True)
class PlannedVirtualServer:
    """One virtual server, its real servers, and why it exists."""

    server: VirtualServer
    real_servers: tuple[RealServer, ...]
    service: ServicePortName
    kind: VirtualServerKind
    #: Whether the address goes on kube-ipvs0 (node IPs and already-local IPs do not).
    bind: bool

    @property
    def key(self) -> VirtualServerKey:
        return self.server.key


@dataclass(frozen=True, slots=True)
class PlannedIpset:
    spec: IpsetSpec
    members: frozenset[str]

    @property
    def sorted_members(self) -> list[str]:
        return sorted(self.members, key=member_sort_key)


@dataclass(frozen=True, slots=True)
class IpvsPlan:
    """Everything one family's ipvs proxier programs; compare with the kernel in diff.py."""

    family: IPFamily
    scheduler: str
    virtual_servers: tuple[PlannedVirtualServer, ...]
    bind_addresses: tuple[IPAddress, ...]
    #: Every set (also the empty ones), in upstream's order.
    ipsets: tuple[PlannedIpset, ...]
    rules: IpvsRuleset
    #: Services with a Local policy, endpoints elsewhere and none here (upstream's metric).
    no_local_internal: frozenset[str] = frozenset()
    no_local_external: frozenset[str] = frozenset()

    @property
    def by_key(self) -> dict[VirtualServerKey, PlannedVirtualServer]:
        return {vs.key: vs for vs in self.virtual_servers}

    def ipset(self, base: str) -> PlannedIpset:
        """A set by its IPv4 name (e.g. ipsets.CLUSTER_IP), whatever the family."""
        return next(s for s in self.ipsets if s.spec.base == base)

    @property
    def real_server_count(self) -> int:
        return sum(len(vs.real_servers) for vs in self.virtual_servers)


# --- planning -----------------------------------------------------------------------------


def _usable(ip: IPAddress, family: IPFamily) -> bool:
    """A local address NodePorts can use (upstream's isValidForSet)."""
    if IPFamily.of(ip) is not family or ip.is_loopback:
        return False
    return not (ip.version == 6 and ip.is_link_local)


def node_addresses(
    config: ProxierConfig, local_addresses: Sequence[IPAddress] | None
) -> tuple[IPAddress, ...]:
    """This family's local addresses other than kube-ipvs0's (config.node_ips when unknown)."""
    candidates = config.node_ips if local_addresses is None else local_addresses
    usable = (ip for ip in candidates if _usable(ip, config.family))
    return tuple(sorted(set(usable), key=_ip_key))


def nodeport_addresses(
    config: ProxierConfig, local_addresses: Sequence[IPAddress] | None
) -> tuple[IPAddress, ...]:
    """Node IPs that get a virtual server per nodePort: every usable local address, or those
    in `--nodeport-addresses` (loopback never: IPVS has no localhost NodePorts)."""
    addresses = node_addresses(config, local_addresses)
    nets = config.nodeport_addresses
    if not nets or any(n.prefixlen == 0 for n in nets):
        return addresses
    return tuple(ip for ip in addresses if any(ip in net for net in nets))


def _real_servers(endpoints: Iterable[EndpointInfo]) -> tuple[RealServer, ...]:
    unique = {(ep.ip, ep.port) for ep in endpoints}
    return tuple(sorted((RealServer(ip, port) for ip, port in unique), key=lambda r: r.sort_key))


@dataclass
class _Builder:
    config: ProxierConfig
    scheduler: str
    local: frozenset[IPAddress]
    nodeport_ips: tuple[IPAddress, ...]
    specs: Mapping[str, IpsetSpec]

    def __post_init__(self) -> None:
        self.servers: dict[VirtualServerKey, PlannedVirtualServer] = {}
        self.members: dict[str, set[str]] = {base: set() for base in self.specs}
        self.no_node_access: list[LoadBalancerNoNodeAccess] = []
        self.no_local_internal: set[str] = set()
        self.no_local_external: set[str] = set()

    def member(self, base: str, member: str) -> None:
        self.members[base].add(member)

    def server(
        self,
        state: ServicePortState,
        address: IPAddress,
        port: int,
        kind: VirtualServerKind,
        *,
        only_local: bool,
        bind: bool,
    ) -> None:
        info = state.info
        key = VirtualServerKey(info.protocol, address, port)
        if key in self.servers:  # two Services claiming one ip:port: the first one wins
            return
        flags = 0
        timeout = 0
        if info.session_affinity_timeout is not None:
            flags |= FLAG_PERSISTENT
            timeout = info.session_affinity_timeout
        if self.scheduler == "mh":
            flags |= FLAG_SOURCE_HASH
        server = VirtualServer(key, self.scheduler, flags, timeout)
        endpoints = self.endpoints(state, only_local)
        self.servers[key] = PlannedVirtualServer(
            server, _real_servers(endpoints), info.name, kind, bind
        )

    def endpoints(self, state: ServicePortState, only_local: bool) -> tuple[EndpointInfo, ...]:
        """Upstream's syncEndpoint choice of endpoints for one virtual server."""
        cat = state.categorized
        if not only_local:
            return cat.cluster
        if cat.local:
            return cat.local
        # No local endpoint: still serve local pods (the Cluster endpoints); traffic from
        # outside is not masqueraded, so its replies bypass this node and are dropped.
        info = state.info
        name = str(info.name.namespaced_name)
        if cat.has_any and info.internal_policy_local:
            self.no_local_internal.add(name)
        if cat.has_any and info.external_policy_local:
            self.no_local_external.add(name)
        return cat.cluster

    def add(self, state: ServicePortState) -> None:
        info = state.info
        proto = info.protocol
        for ep in state.endpoints:
            if ep.is_local:
                self.member(ipsets.LOOP_BACK, ipsets.ip_port_ip(ep.ip, proto, ep.port, ep.ip))

        self.member(ipsets.CLUSTER_IP, ipsets.ip_port(info.cluster_ip, proto, info.port))
        self.server(
            state,
            info.cluster_ip,
            info.port,
            VirtualServerKind.CLUSTER_IP,
            only_local=info.internal_policy_local,
            bind=True,
        )

        for ip in info.external_ips:
            base = ipsets.EXTERNAL_IP_LOCAL if info.external_policy_local else ipsets.EXTERNAL_IP
            self.member(base, ipsets.ip_port(ip, proto, info.port))
            self.server(
                state,
                ip,
                info.port,
                VirtualServerKind.EXTERNAL_IP,
                only_local=info.external_policy_local,
                bind=ip not in self.local,
            )

        for ip in info.load_balancer_vips:
            self.load_balancer(state, ip)

        if info.node_port and self.nodeport_ips:
            self.node_port(state)

        if info.health_check_node_port:
            self.member(ipsets.HEALTH_CHECK_NODE_PORT, str(info.health_check_node_port))

    def load_balancer(self, state: ServicePortState, ip: IPAddress) -> None:
        info = state.info
        proto = info.protocol
        entry = ipsets.ip_port(ip, proto, info.port)
        self.member(ipsets.LOAD_BALANCER, entry)
        if info.external_policy_local:
            self.member(ipsets.LOAD_BALANCER_LOCAL, entry)
        if info.load_balancer_source_ranges:
            self.member(ipsets.LOAD_BALANCER_FW, entry)
            node_ip = self.config.primary_node_ip
            allow_from_node = False
            for cidr in info.load_balancer_source_ranges:
                self.member(
                    ipsets.LOAD_BALANCER_SOURCE_CIDR, ipsets.ip_port_net(ip, proto, info.port, cidr)
                )
                if node_ip is not None and node_ip.version == cidr.version and node_ip in cidr:
                    allow_from_node = True
            if allow_from_node:
                # A node reaching a VIP bound locally uses the VIP as source address.
                self.member(
                    ipsets.LOAD_BALANCER_SOURCE_IP, ipsets.ip_port_ip(ip, proto, info.port, ip)
                )
            else:
                self.no_node_access.append(LoadBalancerNoNodeAccess(ip, proto, info.port))
        self.server(
            state,
            ip,
            info.port,
            VirtualServerKind.LOAD_BALANCER,
            only_local=info.external_policy_local,
            bind=ip not in self.local,
        )

    def node_port(self, state: ServicePortState) -> None:
        info = state.info
        proto = info.protocol
        cluster_set, local_set = ipsets.NODE_PORT_SETS[proto]
        if proto is Protocol.SCTP:
            # hash:ip,port: SCTP nodePorts are listed per node IP.
            entries = [ipsets.ip_port(ip, proto, info.node_port) for ip in self.nodeport_ips]
        else:
            entries = [str(info.node_port)]
        for entry in entries:
            self.member(cluster_set, entry)
            if info.external_policy_local:
                self.member(local_set, entry)
        for ip in self.nodeport_ips:
            self.server(
                state,
                ip,
                info.node_port,
                VirtualServerKind.NODE_PORT,
                only_local=info.external_policy_local,
                bind=False,
            )


def _ordered(states: Iterable[ServicePortState]) -> list[ServicePortState]:
    return sorted(states, key=lambda s: (service_order(s.info.name.namespaced_name), port_order(s)))


def plan_ipvs(
    states: Iterable[ServicePortState],
    config: ProxierConfig,
    scheduler: str = DEFAULT_SCHEDULER,
    *,
    local_addresses: Sequence[IPAddress] | None = None,
    random_fully: bool = True,
) -> IpvsPlan:
    """What this family's ipvs proxier must program for `states`.

    `local_addresses` are this node's addresses on every interface but kube-ipvs0 (the shell
    reads them); None means "config.node_ips" (for --dry-run, which reads nothing).
    """
    scheduler = normalize_scheduler(scheduler)
    specs = {spec.base: spec for spec in ipset_specs(config.family)}
    local = node_addresses(config, local_addresses)
    builder = _Builder(
        config,
        scheduler,
        frozenset(local),
        nodeport_addresses(config, local_addresses),
        specs,
    )
    for state in _ordered(states):
        builder.add(state)

    servers = tuple(sorted(builder.servers.values(), key=lambda vs: vs.key.sort_key))
    bind = tuple(sorted({vs.key.address for vs in servers if vs.bind}, key=_ip_key))
    builder.members[ipsets.IPVS_IPS] = {str(ip) for ip in bind}
    planned = tuple(
        PlannedIpset(spec, frozenset(builder.members[spec.base])) for spec in specs.values()
    )
    rules = render_rules(
        {p.spec.base: (p.spec, p.members) for p in planned},
        config,
        builder.no_node_access,
        random_fully=random_fully,
    )
    return IpvsPlan(
        family=config.family,
        scheduler=scheduler,
        virtual_servers=servers,
        bind_addresses=bind,
        ipsets=planned,
        rules=rules,
        no_local_internal=frozenset(builder.no_local_internal),
        no_local_external=frozenset(builder.no_local_external),
    )


# --- the --dry-run text ---------------------------------------------------------------------

_IPVSADM_HEADER = (
    "Prot LocalAddress:Port Scheduler Flags\n"
    "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
)


def ipvsadm_service_line(server: VirtualServer) -> str:
    """A virtual server as `ipvsadm -Ln` prints it: `TCP  10.96.0.10:80 rr persistent 300`,
    `TCP  10.96.0.10:80 mh (mh-port)`."""
    key = server.key
    line = f"{key.protocol.value:<4} {format_endpoint(key.address, key.port)} {server.scheduler}"
    if server.flags & FLAG_SOURCE_HASH:
        line += f" ({server.scheduler}-port)"
    if server.flags & FLAG_PERSISTENT:
        line += f" persistent {server.timeout}"
    return line


def ipvsadm_real_server_line(
    real: RealServer, active: int = 0, inactive: int = 0, forward: str = "Masq"
) -> str:
    line = f"  -> {real.endpoint:<28} {forward:<7} {real.weight:<6} {active:<10} {inactive:<10}"
    return line.rstrip()


def render_ipvsadm(servers: Iterable[PlannedVirtualServer]) -> str:
    lines = [_IPVSADM_HEADER]
    for vs in servers:
        lines.append(ipvsadm_service_line(vs.server) + "\n")
        lines.extend(ipvsadm_real_server_line(rs) + "\n" for rs in vs.real_servers)
    return "".join(lines)


def render_ipset_save(sets: Iterable[PlannedIpset]) -> str:
    """The sets as `ipset save` would list them (without the kernel's bucketsize/initval)."""
    lines: list[str] = []
    for s in sets:
        lines.append(s.spec.create_line)
        lines.extend(s.spec.add_line(m) for m in s.sorted_members)
    return "".join(line + "\n" for line in lines)


def render_dry_run(plan: IpvsPlan, config: ProxierConfig | None = None) -> str:
    """`--dry-run` for one family: ipvsadm -Ln, kube-ipvs0 addresses, ipset save, iptables.

    With `config`, the iptables input also inserts upstream's hooks in the built-in chains
    (as on a node with no rules yet, like iptables mode's dry run)."""
    hooks = ipvs_jump_rules(config) if config is not None else ()
    prefix = 32 if plan.family is IPFamily.IPv4 else 128
    return "".join(
        [
            "# IPVS virtual servers (ipvsadm -Ln)\n",
            render_ipvsadm(plan.virtual_servers),
            f"# addresses on {DUMMY_DEVICE}\n",
            *(f"{ip}/{prefix}\n" for ip in plan.bind_addresses),
            "# ipsets (ipset save)\n",
            render_ipset_save(plan.ipsets),
            "# iptables-restore input\n",
            plan.rules.document(hooks=hooks),
        ]
    )


def dry_run_text(
    states: Iterable[ServicePortState] | Mapping[NamespacedName, Iterable[ServicePortState]],
    config: ProxierConfig,
    scheduler: str = DEFAULT_SCHEDULER,
) -> str:
    """`pyproxy --dry-run --proxy-mode ipvs` for one family (without the ip-family header):
    `states` is desired_state()'s mapping or any iterable of service port states."""
    if isinstance(states, Mapping):
        flat: list[ServicePortState] = [p for ports in states.values() for p in ports]
    else:
        flat = list(states)
    return render_dry_run(plan_ipvs(flat, config, scheduler), config)


__all__ = [
    "DEFAULT_SCHEDULER",
    "DUMMY_DEVICE",
    "FLAG_HASHED",
    "FLAG_PERSISTENT",
    "FLAG_SOURCE_HASH",
    "SCHEDULERS",
    "IpvsPlan",
    "PlannedIpset",
    "PlannedVirtualServer",
    "RealServer",
    "VirtualServer",
    "VirtualServerKey",
    "VirtualServerKind",
    "dry_run_text",
    "nodeport_addresses",
    "normalize_scheduler",
    "plan_ipvs",
    "render_dry_run",
]
