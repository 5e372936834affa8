"""The contract between the controller and a proxy mode: what a proxier does and reports.

Upstream's modes share one interface (pkg/proxy/types.go `Provider`, plus each package's
`CleanupLeftovers`); pyproxy's controller likewise drives every mode the same way and never
asks which one it has. A mode provides:

- `Proxier`: one IP family's dataplane. `sync(states, changed, full=...)` makes the kernel
  implement `states`, every Service of the family, re-rendering only the Services named in
  `changed` where the mode can (None: everything changed); `full` asks for a full sync
  (everything written, the kernel re-read). The proxier may decide on a full sync by itself
  (first sync, a failure since the last one, its own periodic full sync) and says so in the
  result. A sync that raises has written nothing the proxier relies on: `need_full_sync` stays
  set, and the next sync is a full one. `canary_present()` tells whether the mode's rules
  are still there, or someone flushed them (iptables' KUBE-PROXY-CANARY chain; a mode
  without a canary answers True). `on_service_cidrs_changed(cidrs)` hands over the cluster's
  ServiceCIDR ranges (networking.k8s.io/v1), as upstream's OnServiceCIDRsChanged: nftables
  mode drops traffic to their unallocated addresses; the other modes ignore them.
- a `ProxierFactory` building one from a family's `ProxierConfig` (the controller rebuilds the
  proxiers when the node's configuration changes);
- a `LeftoverCleanup` for `--cleanup`, which runs every mode's, whatever mode was asked for
  (as kube-proxy's --cleanup): a host may have been switched between modes.

`SyncResult` is what the controller turns into kube-proxy's metrics and the "synced" log line.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pyproxy.model import IPNetwork, NamespacedName
from pyproxy.proxystate import LazyStates, ProxierConfig, ServiceStates

#: Upstream's proxyutil.FullSyncPeriod: the iptables (and nftables) proxiers write everything
#: at least hourly, even without failures; it is also their sync runner's maximum interval.
FULL_SYNC_PERIOD = 3600.0


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync of one IP family did, for metrics and the log."""

    #: A full sync (everything written, the kernel re-read), not a partial one.
    full: bool
    #: Bytes handed to the kernel's rule loader (iptables-restore; 0 when nothing was written).
    restore_bytes: int
    #: iptables rules in the filter and nat tables after the sync (kube-proxy's
    #: sync_proxy_rules_iptables_total); 0 in a mode without iptables rules.
    filter_rules: int
    nat_rules: int
    #: Services whose traffic policy is Local with no local endpoint on this node.
    no_local_internal: int
    no_local_external: int
    #: Services written (a partial sync: the changed ones).
    services_written: int
    #: The mode's own figures for the log line (IPVS: virtual_servers, real_servers,
    #: operations, draining, ipset_bytes; nftables: chains, elements_added, elements_deleted,
    #: stale_chains_flushed, stale_chains_deleted, transaction_bytes), in the order logged.
    details: Mapping[str, int] = field(default_factory=dict)
    #: Non-fatal cleanup failures in this sync (nftables mode: deleting stale chains failed;
    #: kube-proxy's sync_proxy_rules_nftables_cleanup_failures_total).
    cleanup_failures: int = 0


class Proxier(Protocol):
    """One IP family's dataplane in one mode (see the module docstring)."""

    config: ProxierConfig
    #: Set by a failure or a flushed canary: the next sync is a full one.
    need_full_sync: bool

    def sync(
        self,
        states: ServiceStates | LazyStates,
        changed: Collection[NamespacedName] | None = None,
        *,
        full: bool = False,
    ) -> SyncResult: ...

    def canary_present(self) -> bool:
        """Whether the rules are still there (False: flushed by someone; sync everything)."""
        ...

    def on_service_cidrs_changed(self, cidrs: Sequence[IPNetwork]) -> None:
        """The cluster's ServiceCIDR ranges changed (used by the next sync, if at all)."""
        ...


#: Builds the proxier of one family (mode, iptables variant and mode flags bound).
ProxierFactory = Callable[[ProxierConfig], Proxier]


class LeftoverCleanup(Protocol):
    """A mode's `--cleanup` for this host, for the given iptables variant ("legacy", "nft");
    returns whether anything was removed."""

    def __call__(self, backend: str) -> bool: ...


__all__ = [
    "FULL_SYNC_PERIOD",
    "LeftoverCleanup",
    "Proxier",
    "ProxierFactory",
    "ServiceStates",
    "SyncResult",
]
