"""One IP family's IPVS dataplane: read the kernel, plan, diff, apply; and --cleanup.

`IpvsProxier` implements the controller's `pyproxy.proxier.Proxier` contract (as the iptables
proxier does), `cleanup_leftovers` is this mode's `--cleanup`. Every sync is a straight
pipeline of named stages:

    read (kernel state: virtual/real servers with connection counts, kube-ipvs0, ipsets)
      → plan_ipvs (pure)  → diff (pure, with the draining map)  → apply_operations

IPVS has no partial sync (upstream's neither): the plan is always complete, and the diff
touches only what differs. The iptables rules are written on a full sync (with missing hooks
and the canary chain) and otherwise only when they changed. A real server that is draining
(see diff.py) is re-examined on every sync; the controller's periodic sync
(--ipvs-sync-period after the end of the previous sync) plays the part of upstream's
one-minute graceful-termination timer. Any failure makes the next sync a full one.

Node-wide settings are made on the first sync, as upstream's NewProxier makes them: the
sysctls (with --ipvs-strict-arp, arp_ignore/arp_announce too) and, when one of
--ipvs-tcp-timeout/--ipvs-tcpfin-timeout/--ipvs-udp-timeout is set, IPVS's timeouts (a failure
there is logged and the sync goes on, as upstream). cli.proxier_factory builds a proxier as
the flags configure it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from pyproxy import sysctl
from pyproxy.errors import KernelError, RestoreError
from pyproxy.iptables.kernelview import KernelView
from pyproxy.iptables.restore import Iptables, canary_exists
from pyproxy.ipvs.diff import (
    DEFAULT_DRAIN_TIMEOUT,
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
    Diff,
    DrainRealServer,
    Operation,
    RealServerRef,
    RestoreIpsets,
    RestoreIptables,
    UnbindAddress,
    UpdateRealServer,
    UpdateVirtualServer,
    cleanup_operations,
    diff,
)
from pyproxy.ipvs.ipsets import IPSET_TABLE, ipset_name
from pyproxy.ipvs.kernel import IpvsKernel, IpvsTimeouts, LinuxIpvsKernel, kernel_release
from pyproxy.ipvs.plan import IpvsPlan, dry_run_text, plan_ipvs
from pyproxy.ipvs.rules import IpvsRuleset, cleanup_document, cleanup_hooks, ipvs_jump_rules
from pyproxy.model import IPFamily, IPNetwork, NamespacedName
from pyproxy.proxier import SyncResult
from pyproxy.proxystate import LazyStates, ProxierConfig, ServiceStates

logger = structlog.get_logger("pyproxy")

#: Sysctls kube-proxy's ipvs mode sets (NewProxier), as (key, value).
SYSCTLS: tuple[tuple[str, str], ...] = (
    # IPVS-forwarded packets go through netfilter (POSTROUTING masquerade, conntrack).
    ("net.ipv4.vs.conntrack", "1"),
    # A connection to a deleted real server is dropped on its next packet (UDP, SCTP).
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    # A persistence template to a weight-0 (draining) real server expires: new connections
    # of a sticky client go elsewhere.
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.ip_forward", "1"),
)
#: conn_reuse_mode=0 only where it is needed and harmless (upstream: kernels >= 4.1, < 5.9).
CONN_REUSE_MODE_KERNELS = ((4, 1), (5, 9))
#: --ipvs-strict-arp (upstream's sysctlArpIgnore/sysctlArpAnnounce): answer ARP only for
#: addresses on the receiving interface, and announce the best local source address, so the
#: service addresses bound on kube-ipvs0 are not announced to the LAN (MetalLB's L2 mode).
STRICT_ARP_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
)


class IptablesLike(Protocol):
    """pyproxy.iptables.restore.Iptables, or a fake."""

    @property
    def family(self) -> IPFamily: ...
    def save(self, tables: tuple[str, ...] = ...) -> str: ...
    def restore(self, document: str) -> None: ...


def prepare_host(*, release: Sequence[int] | None = None, strict_arp: bool = False) -> list[str]:
    """Set ipvs mode's sysctls in this network namespace; returns the ones changed."""
    if sysctl.read("net.ipv4.vs.conntrack") is None:
        raise KernelError(
            "the IPVS sysctls are missing: the ip_vs kernel module is not loaded (modprobe ip_vs)"
        )
    wanted = list(SYSCTLS)
    version = tuple(release) if release is not None else kernel_release()
    low, high = CONN_REUSE_MODE_KERNELS
    if low <= version < high:
        wanted.append(("net.ipv4.vs.conn_reuse_mode", "0"))
    if strict_arp:
        wanted.extend(STRICT_ARP_SYSCTLS)
    return [f"{key}={value}" for key, value in wanted if sysctl.ensure(key, value)]


def apply_operations(
    operations: Iterable[Operation], kernel: IpvsKernel, iptables: IptablesLike
) -> None:
    """Carry out `operations` in order. A failing virtual/real server or address operation is
    collected and the others still go ahead (one broken Service must not block the rest, as
    upstream); a failing ipset or iptables restore stops everything after it (the rules and
    the addresses bound after them depend on it). Raises KernelError at the end if any failed.
    """
    errors: list[str] = []
    for op in operations:
        try:
            _apply(op, kernel, iptables)
        except KernelError as err:
            if isinstance(op, (RestoreIpsets, RestoreIptables)):
                if errors and not isinstance(err, RestoreError):
                    raise KernelError(f"{err}; earlier: {'; '.join(errors)}") from err
                raise
            logger.error("IPVS operation failed", operation=str(op), error=str(err))
            errors.append(str(err))
    if errors:
        raise KernelError(f"{len(errors)} IPVS operation(s) failed: {'; '.join(errors)}")


def _apply(op: Operation, kernel: IpvsKernel, iptables: IptablesLike) -> None:
    match op:
        case UnbindAddress():
            kernel.unbind_address(op.address)
        case DeleteRealServer():
            kernel.delete_real_server(op.virtual_server, op.real_server)
        case DrainRealServer():
            kernel.update_real_server(op.virtual_server, op.real_server)
        case DeleteVirtualServer():
            kernel.delete_virtual_server(op.virtual_server)
        case AddVirtualServer():
            kernel.add_virtual_server(op.virtual_server)
        case UpdateVirtualServer():
            kernel.update_virtual_server(op.virtual_server)
        case AddRealServer():
            kernel.add_real_server(op.virtual_server, op.real_server)
        case UpdateRealServer():
            kernel.update_real_server(op.virtual_server, op.real_server)
        case RestoreIpsets():
            kernel.restore_ipsets(op.text)
        case RestoreIptables():
            iptables.restore(op.document)
        case BindAddress():
            kernel.bind_address(op.address)


class IpvsProxier:
    """kube-proxy's ipvs mode for one IP family, in the current network namespace."""

    def __init__(
        self,
        config: ProxierConfig,
        iptables: Iptables,
        *,
        scheduler: str = "rr",
        kernel: Callable[[], IpvsKernel] = LinuxIpvsKernel,
        clock: Callable[[], float] = time.monotonic,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        set_sysctls: bool = True,
        exclude_cidrs: Sequence[IPNetwork] = (),
        strict_arp: bool = False,
        timeouts: IpvsTimeouts = IpvsTimeouts(),  # noqa: B008 - frozen, so a safe default
    ) -> None:
        """`scheduler`: a scheduler name as `ProxyOptions.ipvs_scheduler` holds it (checked
        and normalised once, when the flags are parsed)."""
        self.scheduler = scheduler
        self.config = config
        self.iptables = iptables
        self._kernel = kernel
        self._clock = clock
        self.drain_timeout = drain_timeout
        self._set_sysctls = set_sysctls
        #: --ipvs-exclude-cidrs of this family (upstream's filterCIDRs).
        self.exclude_cidrs = tuple(c for c in exclude_cidrs if IPFamily.of(c) is config.family)
        self.strict_arp = strict_arp
        self.timeouts = timeouts
        self._prepared = False
        self._written: IpvsRuleset | None = None
        self.draining: Mapping[RealServerRef, float] = {}
        self.need_full_sync = True
        #: The last sync's diff, for logs and tests.
        self.last_diff: Diff | None = None

    def on_service_cidrs_changed(self, cidrs: Sequence[IPNetwork]) -> None:
        """ServiceCIDRs matter to nftables mode only (as upstream's iptables/ipvs proxiers)."""

    def canary_present(self) -> bool:
        """Whether the KUBE-PROXY-CANARY chain of the last full sync is still there."""
        return canary_exists(self.iptables)

    def plan(self, states: ServiceStates, kernel: IpvsKernel) -> IpvsPlan:
        ports = [p for ports in states.values() for p in ports]
        return plan_ipvs(
            ports, self.config, self.scheduler, local_addresses=kernel.local_addresses()
        )

    def sync(
        self,
        states: ServiceStates | LazyStates,
        changed: Collection[NamespacedName] | None = None,
        *,
        full: bool = False,
    ) -> SyncResult:
        """Make the kernel implement `states` (every Service of the family).

        IPVS mode always plans and diffs everything, so `changed` only decides whether this is
        a full sync: `full`, `changed` None or a failure since the last sync make it one (the
        iptables rules are then rewritten with missing hooks and the canary chain). The plan
        needs every state first: `LazyStates` are computed completely before anything else."""
        if isinstance(states, LazyStates):
            states = states.complete()
        full = full or self.need_full_sync or changed is None
        self.need_full_sync = True  # until everything below has succeeded
        first = not self._prepared
        if first and self._set_sysctls:
            changed_sysctls = prepare_host(strict_arp=self.strict_arp)
            if changed_sysctls:
                logger.info("set sysctls for IPVS mode", sysctls=changed_sysctls)
        self._prepared = True
        with self._kernel() as kernel:
            if first and self.timeouts:
                self._set_timeouts(kernel)
            kernel.ensure_dummy()
            plan = self.plan(states, kernel)
            state = kernel.read_state()
            document = None
            if full:
                hooks = KernelView.from_save(self.iptables.save()).missing_hooks(
                    ipvs_jump_rules(self.config)
                )
                document = plan.rules.document(hooks=hooks, canary=True)
            elif plan.rules != self._written:
                document = plan.rules.document()
            result = diff(
                state,
                plan,
                draining=self.draining,
                now=self._clock(),
                drain_timeout=self.drain_timeout,
                iptables_document=document,
                exclude_cidrs=self.exclude_cidrs,
            )
            self.last_diff = result
            self.draining = result.draining
            for op in result.operations:
                if isinstance(op, (DrainRealServer, DeleteRealServer, DeleteVirtualServer)):
                    logger.info("ipvs", ip_family=self.config.family.value, operation=str(op))
                else:
                    logger.debug("ipvs", ip_family=self.config.family.value, operation=str(op))
            self._written = None  # unknown until the restore succeeded
            apply_operations(result.operations, kernel, self.iptables)
        self._written = plan.rules
        self.need_full_sync = False
        ipset_ops = [op for op in result.operations if isinstance(op, RestoreIpsets)]
        return SyncResult(
            full=full,
            restore_bytes=len(document or ""),
            filter_rules=plan.rules.filter_rules,
            nat_rules=plan.rules.nat_rules,
            no_local_internal=len(plan.no_local_internal),
            no_local_external=len(plan.no_local_external),
            services_written=len(states),
            details={
                "virtual_servers": len(plan.virtual_servers),
                "real_servers": plan.real_server_count,
                "operations": len(result.operations),
                "draining": len(self.draining),
                "ipset_bytes": sum(len(op.text) for op in ipset_ops),
            },
        )

    def _set_timeouts(self, kernel: IpvsKernel) -> None:
        # Upstream (NewProxier) logs a failure and goes on: the timeouts are a tuning, and
        # Services must not stay unprogrammed because of them.
        try:
            kernel.set_timeouts(self.timeouts)
        except KernelError as err:
            logger.error(
                "cannot set the IPVS timeouts", timeouts=str(self.timeouts), error=str(err)
            )
        else:
            logger.info("set the IPVS timeouts", timeouts=str(self.timeouts))


# --- --cleanup ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CleanupResult:
    iptables_changed: tuple[IPFamily, ...]
    virtual_servers_deleted: int
    ipsets_destroyed: tuple[str, ...]
    dummy_deleted: bool
    ipvs_available: bool


def our_ipset_names() -> tuple[str, ...]:
    return tuple(ipset_name(base, family) for family in IPFamily for base, _, _ in IPSET_TABLE)


def cleanup(
    iptables: Iterable[IptablesLike],
    *,
    kernel: Callable[[], IpvsKernel] = LinuxIpvsKernel,
) -> CleanupResult:
    """Remove everything ipvs mode creates: hooks and chains (iptables mode's too, see
    rules.CLEANUP_CHAINS), pyproxy's virtual servers (ownership rule in diff.py; others are
    kept), the ipsets, and kube-ipvs0. Works on a kernel without ip_vs (then there are no
    virtual servers to delete)."""
    changed: list[IPFamily] = []
    for ipt in iptables:
        view = KernelView.from_save(ipt.save(("filter", "nat", "mangle")))
        document = cleanup_document(view, cleanup_hooks(ipt.family))
        if document:
            ipt.restore(document)
            changed.append(ipt.family)
    deleted = 0
    with kernel() as k:
        available = k.ipvs_available()
        # Ownership needs the ipsets and kube-ipvs0 as they are now: read before removing.
        state = k.read_state(virtual_servers=available)
        for family in IPFamily:
            operations = cleanup_operations(state, family)
            apply_operations(operations, k, _NoIptables())
            deleted += len(operations)
        destroyed = tuple(name for name in our_ipset_names() if name in state.ipsets)
        k.destroy_ipsets(destroyed)
        dummy = k.delete_dummy()
    return CleanupResult(tuple(changed), deleted, destroyed, dummy, available)


def cleanup_leftovers(backend: str) -> bool:
    """ipvs mode's `--cleanup` on this host (see `cleanup`), with its log line."""
    result = cleanup([Iptables(family, backend) for family in IPFamily])
    logger.info(
        "cleaned up ipvs mode",
        iptables_changed=[f.value for f in result.iptables_changed],
        virtual_servers_deleted=result.virtual_servers_deleted,
        ipsets_destroyed=len(result.ipsets_destroyed),
        dummy_deleted=result.dummy_deleted,
        ipvs_available=result.ipvs_available,
    )
    return bool(
        result.iptables_changed
        or result.virtual_servers_deleted
        or result.ipsets_destroyed
        or result.dummy_deleted
    )


class _NoIptables:
    family = IPFamily.IPv4

    def save(self, tables: tuple[str, ...] = ()) -> str:
        return ""

    def restore(self, document: str) -> None:
        raise AssertionError("cleanup writes iptables separately")


__all__ = [
    "STRICT_ARP_SYSCTLS",
    "SYSCTLS",
    "CleanupResult",
    "IpvsProxier",
    "apply_operations",
    "cleanup",
    "cleanup_leftovers",
    "dry_run_text",
    "prepare_host",
]
