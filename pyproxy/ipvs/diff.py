"""Kernel state vs plan → the operations that make the kernel match, in a safe fixed order.

Only what differs is touched, and the order is fixed (after kpng's backends/ipvs), so traffic
never meets a half-built service:

    1. unbind addresses      a VIP that goes away stops attracting traffic first
    2. delete real servers   (or drain them: weight 0, see below)
    3. delete virtual servers
    4. create/update virtual servers
    5. create/update real servers   (also restores a drained one that came back)
    6. ipsets                one `ipset restore`: create missing sets, add, then delete members
    7. iptables              the rules match the sets, so they are written once the sets exist
    8. bind addresses        a new VIP attracts traffic only once all of the above is in place

Ownership (a virtual server that is not pyproxy's is never removed): a virtual server of this
family is pyproxy's when its address is bound on kube-ipvs0, or pyproxy's ipsets in the kernel
record it (its ip,proto:port in KUBE-CLUSTER-IP / -EXTERNAL-IP / -EXTERNAL-IP-LOCAL /
-LOAD-BALANCER, or its port in the KUBE-NODE-PORT-<proto> set; SCTP: ip,sctp:port in
KUBE-NODE-PORT-SCTP-HASH). Those sets live in the kernel, so the rule survives restarts. Any
other virtual server (ipvsadm by hand, another tool) is left alone unless the plan itself wants
that exact protocol/address/port. On top of that, as kube-proxy's `--ipvs-exclude-cidrs`, a
virtual server whose address is inside one of the excluded CIDRs is never deleted as stale, even
one of pyproxy's (upstream: cleanLegacyService skips them); a wanted one is still created and
updated there, and addresses are unbound as usual.

Graceful termination (upstream's graceful_termination.go): a real server that is no longer
wanted is deleted at once when its virtual server is UDP or SCTP (`expire_nodest_conn=1`
makes stale flows die on their next packet), or when it has no connections
(ActiveConn + InActConn == 0). Otherwise its weight is set to 0 (no new connections, existing
ones keep working) and it is remembered in `draining` with the time draining started; every
later sync deletes it once its connections are gone, or once `drain_timeout` has passed. A
draining real server that is wanted again gets its weight back.

Pure: the state and the clock reading come in, operations and the new draining map go out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.ipvs import ipsets
from pyproxy.ipvs.ipsets import CurrentIpset, IpsetSpec, canonical_member, member_sort_key
from pyproxy.ipvs.plan import (
    IpvsPlan,
    PlannedVirtualServer,
    RealServer,
    VirtualServer,
    VirtualServerKey,
)
from pyproxy.model import IPAddress, IPFamily, IPNetwork, Protocol, format_endpoint

#: Default limit on draining: after this long a real server is deleted even with connections.
DEFAULT_DRAIN_TIMEOUT = 15 * 60.0


# --- what the kernel has --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurrentRealServer:
    address: IPAddress
    port: int
    weight: int
    active_connections: int = 0
    inactive_connections: int = 0

    @property
    def connections(self) -> int:
        return self.active_connections + self.inactive_connections

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.address, self.port)


@dataclass(frozen=True, slots=True)
class CurrentVirtualServer:
    """A virtual server as the kernel lists it (FLAG_HASHED already masked off)."""

    server: VirtualServer
    real_servers: tuple[CurrentRealServer, ...] = ()

    @property
    def key(self) -> VirtualServerKey:
        return self.server.key


@dataclass(frozen=True, slots=True)
class KernelState:
    """What the kernel has, read at the start of a sync (both families' virtual servers)."""

    virtual_servers: Mapping[VirtualServerKey, CurrentVirtualServer] = field(default_factory=dict)
    #: Addresses on kube-ipvs0 (both families).
    bound_addresses: frozenset[IPAddress] = frozenset()
    #: Every set the kernel has, by name (others' too; only ours are looked at).
    ipsets: Mapping[str, CurrentIpset] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, order=True)
class RealServerRef:
    """One real server of one virtual server (the key of the draining map)."""

    virtual_server: str
    endpoint: str


def real_server_ref(key: VirtualServerKey, address: IPAddress, port: int) -> RealServerRef:
    return RealServerRef(str(key), format_endpoint(address, port))


# --- operations -----------------------------------------------------------------------------


class Phase(enum.IntEnum):
    """The apply order (module docstring)."""

    UNBIND = 1
    DELETE_REAL_SERVERS = 2
    DELETE_VIRTUAL_SERVERS = 3
    VIRTUAL_SERVERS = 4
    REAL_SERVERS = 5
    IPSETS = 6
    IPTABLES = 7
    BIND = 8


@dataclass(frozen=True, slots=True)
class UnbindAddress:
    address: IPAddress
    phase = Phase.UNBIND

    def __str__(self) -> str:
        return f"unbind {self.address}"


@dataclass(frozen=True, slots=True)
class DeleteRealServer:
    virtual_server: VirtualServer
    real_server: RealServer
    #: "removed" (UDP/SCTP), "no connections", "drained" or "drain timeout".
    reason: str
    phase = Phase.DELETE_REAL_SERVERS

    def __str__(self) -> str:
        return (
            f"delete real server {self.virtual_server.key} -> {self.real_server.endpoint}"
            f" ({self.reason})"
        )


@dataclass(frozen=True, slots=True)
class DrainRealServer:
    """Set weight 0: no new connections, existing ones go on."""

    virtual_server: VirtualServer
    real_server: RealServer  # with weight 0
    connections: int
    phase = Phase.DELETE_REAL_SERVERS

    def __str__(self) -> str:
        return (
            f"drain real server {self.virtual_server.key} -> {self.real_server.endpoint}"
            f" ({self.connections} connections)"
        )


@dataclass(frozen=True, slots=True)
class DeleteVirtualServer:
    virtual_server: VirtualServer
    phase = Phase.DELETE_VIRTUAL_SERVERS

    def __str__(self) -> str:
        return f"delete virtual server {self.virtual_server.key}"


@dataclass(frozen=True, slots=True)
class AddVirtualServer:
    virtual_server: VirtualServer
    phase = Phase.VIRTUAL_SERVERS

    def __str__(self) -> str:
        return f"add virtual server {self.virtual_server.key} {self.virtual_server.scheduler}"


@dataclass(frozen=True, slots=True)
class UpdateVirtualServer:
    virtual_server: VirtualServer
    phase = Phase.VIRTUAL_SERVERS

    def __str__(self) -> str:
        vs = self.virtual_server
        return (
            f"update virtual server {vs.key} {vs.scheduler} flags={vs.flags:#x}"
            f" timeout={vs.timeout}"
        )


@dataclass(frozen=True, slots=True)
class AddRealServer:
    virtual_server: VirtualServer
    real_server: RealServer
    phase = Phase.REAL_SERVERS

    def __str__(self) -> str:
        return f"add real server {self.virtual_server.key} -> {self.real_server.endpoint}"


@dataclass(frozen=True, slots=True)
class UpdateRealServer:
    """Set the weight back (a drained real server wanted again, or a foreign weight)."""

    virtual_server: VirtualServer
    real_server: RealServer
    phase = Phase.REAL_SERVERS

    def __str__(self) -> str:
        return (
            f"set real server {self.virtual_server.key} -> {self.real_server.endpoint}"
            f" weight {self.real_server.weight}"
        )


@dataclass(frozen=True, slots=True)
class RestoreIpsets:
    """One `ipset restore -exist` call."""

    text: str
    created: int
    added: int
    deleted: int
    phase = Phase.IPSETS

    def __str__(self) -> str:
        return f"ipset restore: {self.created} created, {self.added} added, {self.deleted} deleted"


@dataclass(frozen=True, slots=True)
class RestoreIptables:
    """One `iptables-restore --noflush` call."""

    document: str
    phase = Phase.IPTABLES

    def __str__(self) -> str:
        return f"iptables-restore ({len(self.document)} bytes)"


@dataclass(frozen=True, slots=True)
class BindAddress:
    address: IPAddress
    phase = Phase.BIND

    def __str__(self) -> str:
        return f"bind {self.address}"


Operation = (
    UnbindAddress
    | DeleteRealServer
    | DrainRealServer
    | DeleteVirtualServer
    | AddVirtualServer
    | UpdateVirtualServer
    | AddRealServer
    | UpdateRealServer
    | RestoreIpsets
    | RestoreIptables
    | BindAddress
)


@dataclass(frozen=True, slots=True)
class Diff:
    operations: tuple[Operation, ...]
    #: Real servers draining after these operations, with the time draining started.
    draining: Mapping[RealServerRef, float]

    def count(self, kind: type[Operation]) -> int:
        return sum(1 for op in self.operations if isinstance(op, kind))

    def __bool__(self) -> bool:
        return bool(self.operations)


# --- ownership ----------------------------------------------------------------------------


def _members(state: KernelState, base: str, family: IPFamily) -> frozenset[str]:
    current = state.ipsets.get(ipsets.ipset_name(base, family))
    return current.members if current is not None else frozenset()


def owned_by_pyproxy(key: VirtualServerKey, state: KernelState) -> bool:
    """The ownership rule of the module docstring."""
    if key.address in state.bound_addresses:
        return True
    family = key.family
    entry = ipsets.ip_port(key.address, key.protocol, key.port)
    for base in (
        ipsets.CLUSTER_IP,
        ipsets.EXTERNAL_IP,
        ipsets.EXTERNAL_IP_LOCAL,
        ipsets.LOAD_BALANCER,
    ):
        if entry in _members(state, base, family):
            return True
    node_port_set = ipsets.NODE_PORT_SETS[key.protocol][0]
    node_port_entry = entry if key.protocol is Protocol.SCTP else str(key.port)
    return node_port_entry in _members(state, node_port_set, family)


def excluded(address: IPAddress, exclude_cidrs: Iterable[IPNetwork]) -> bool:
    """Inside one of `--ipvs-exclude-cidrs` (upstream's isIPInExcludeCIDRs)."""
    return any(address in cidr for cidr in exclude_cidrs)


# --- the diff -----------------------------------------------------------------------------


def _graceful(protocol: Protocol) -> bool:
    """Upstream's IsRsGracefulTerminationNeeded: not for UDP and SCTP."""
    return protocol is Protocol.TCP


@dataclass
class _Draining:
    """The draining bookkeeping of one diff: the previous map in, the new one built up."""

    previous: Mapping[RealServerRef, float]
    now: float
    timeout: float
    result: dict[RealServerRef, float] = field(default_factory=dict)

    def expired(self, ref: RealServerRef) -> bool:
        return ref in self.previous and self.now - self.previous[ref] >= self.timeout

    def keep(self, ref: RealServerRef) -> None:
        self.result[ref] = self.previous.get(ref, self.now)


def _real_server_ops(
    planned: PlannedVirtualServer, current: CurrentVirtualServer, draining: _Draining
) -> tuple[list[Operation], list[Operation]]:
    """(removals for phase 2, additions/updates for phase 5) of one virtual server."""
    server = planned.server
    key = server.key
    wanted = {(rs.address, rs.port): rs for rs in planned.real_servers}
    have = {(rs.address, rs.port): rs for rs in current.real_servers}
    removals: list[Operation] = []
    additions: list[Operation] = []
    for (address, port), existing in sorted(
        have.items(), key=lambda kv: (kv[0][0].version, int(kv[0][0]), kv[0][1])
    ):
        if (address, port) in wanted:
            continue
        ref = real_server_ref(key, address, port)
        plain = RealServer(address, port, existing.weight)
        if not _graceful(key.protocol):
            removals.append(DeleteRealServer(server, plain, "removed"))
        elif existing.connections == 0:
            reason = "drained" if ref in draining.previous else "no connections"
            removals.append(DeleteRealServer(server, plain, reason))
        elif draining.expired(ref):
            removals.append(DeleteRealServer(server, plain, "drain timeout"))
        else:
            draining.keep(ref)
            if existing.weight != 0:
                removals.append(
                    DrainRealServer(server, RealServer(address, port, 0), existing.connections)
                )
    for address_port, rs in wanted.items():
        found = have.get(address_port)
        if found is None:
            additions.append(AddRealServer(server, rs))
        elif found.weight != rs.weight:
            additions.append(UpdateRealServer(server, rs))
    return removals, additions


def _ipset_op(plan: IpvsPlan, state: KernelState) -> RestoreIpsets | None:
    create: list[IpsetSpec] = []
    add: list[tuple[IpsetSpec, str]] = []
    delete: list[tuple[IpsetSpec, str]] = []
    for planned in plan.ipsets:
        spec = planned.spec
        current = state.ipsets.get(spec.name)
        if current is None:
            create.append(spec)
            have: frozenset[str] = frozenset()
        else:
            have = frozenset(canonical_member(spec.type, m) for m in current.members)
        add.extend((spec, m) for m in sorted(planned.members - have, key=member_sort_key))
        delete.extend((spec, m) for m in sorted(have - planned.members, key=member_sort_key))
    if not (create or add or delete):
        return None
    return RestoreIpsets(
        ipsets.restore_text(create, add, delete), len(create), len(add), len(delete)
    )


def _sorted_ips(ips: Iterable[IPAddress]) -> list[IPAddress]:
    return sorted(ips, key=lambda ip: (ip.version, int(ip)))


def diff(
    state: KernelState,
    plan: IpvsPlan,
    *,
    draining: Mapping[RealServerRef, float] | None = None,
    now: float = 0.0,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    iptables_document: str | None = None,
    exclude_cidrs: Iterable[IPNetwork] = (),
) -> Diff:
    """The operations turning `state` into `plan` (this family only), in apply order.

    `draining` is the previous Diff's map (empty after a restart: draining then restarts for
    real servers still at weight 0). `iptables_document`, when given, is written in phase 7.
    Stale virtual servers inside `exclude_cidrs` are left alone (module docstring).
    """
    exclude_cidrs = tuple(exclude_cidrs)
    drain = _Draining(draining or {}, now, drain_timeout)
    family = plan.family
    planned_by_key = plan.by_key
    current_ours = {k: v for k, v in state.virtual_servers.items() if k.family is family}
    ops: list[Operation] = []

    # 1. Addresses no longer wanted (this family's only: the other family has its own plan).
    wanted_addresses = set(plan.bind_addresses)
    ops.extend(
        UnbindAddress(ip)
        for ip in _sorted_ips(state.bound_addresses)
        if IPFamily.of(ip) is family and ip not in wanted_addresses
    )

    # 2 and 5. Real servers of virtual servers that exist and stay.
    removals: list[Operation] = []
    additions: list[Operation] = []
    for key, planned in planned_by_key.items():
        current = current_ours.get(key)
        if current is None:
            additions.extend(AddRealServer(planned.server, rs) for rs in planned.real_servers)
            continue
        rm, add = _real_server_ops(planned, current, drain)
        removals.extend(rm)
        additions.extend(add)
    ops.extend(removals)

    # 3. Virtual servers of ours that are no longer wanted (with all their real servers),
    # except inside --ipvs-exclude-cidrs.
    ops.extend(
        DeleteVirtualServer(current.server)
        for key, current in sorted(current_ours.items(), key=lambda kv: kv[0].sort_key)
        if key not in planned_by_key
        and owned_by_pyproxy(key, state)
        and not excluded(key.address, exclude_cidrs)
    )

    # 4. New and changed virtual servers.
    for key, planned in planned_by_key.items():
        current = current_ours.get(key)
        if current is None:
            ops.append(AddVirtualServer(planned.server))
        elif current.server != planned.server:
            ops.append(UpdateVirtualServer(planned.server))

    # 5.
    ops.extend(additions)

    # 6, 7.
    ipset_op = _ipset_op(plan, state)
    if ipset_op is not None:
        ops.append(ipset_op)
    if iptables_document is not None:
        ops.append(RestoreIptables(iptables_document))

    # 8.
    ops.extend(BindAddress(ip) for ip in plan.bind_addresses if ip not in state.bound_addresses)
    return Diff(tuple(ops), drain.result)


def cleanup_operations(state: KernelState, family: IPFamily) -> tuple[Operation, ...]:
    """--cleanup's IPVS part: delete every virtual server of `family` that is pyproxy's."""
    return tuple(
        DeleteVirtualServer(current.server)
        for key, current in sorted(state.virtual_servers.items(), key=lambda kv: kv[0].sort_key)
        if key.family is family and owned_by_pyproxy(key, state)
    )
