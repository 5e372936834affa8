"""One IP family's iptables dataplane: render what changed, write it, remember what is there.

The proxier keeps the rendered rules of every Service, so a sync re-renders only the Services
whose Service or EndpointSlices changed (the caller says which). A full sync writes every
Service's chains, re-reads the kernel (iptables-save) to find stale chains and missing hooks in
built-in chains; a partial sync writes only the dispatch chains, the filter table and the chains
of changed Services, as upstream does. Any failure makes the next sync a full one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from pyproxy.iptables.kernelview import KernelView
from pyproxy.iptables.render import (
    ServicePortRules,
    assemble_ruleset,
    is_large_cluster,
    is_service_chain,
    jump_rules,
    port_order,
    render_service_port,
    service_order,
)
from pyproxy.iptables.restore import Iptables
from pyproxy.model import NamespacedName
from pyproxy.proxystate import ProxierConfig, ServicePortState, count_endpoints

#: Upstream's proxyutil.FullSyncPeriod: even without failures, write everything hourly.
FULL_SYNC_PERIOD = 3600.0

ServiceStates = Mapping[NamespacedName, tuple[ServicePortState, ...]]


def _service_chain_rules(table: str, chain: str) -> bool:
    """Rules a full sync need not read back: those of nat service chains (it only needs their
    names, to delete stale ones, and the hooks in built-in chains)."""
    return table == "nat" and is_service_chain(chain)


@dataclass(frozen=True, slots=True)
class SyncResult:
    full: bool
    restore_bytes: int
    filter_rules: int
    nat_rules: int
    no_local_internal: int
    no_local_external: int
    services_written: int


class IptablesProxier:
    def __init__(
        self,
        config: ProxierConfig,
        iptables: Iptables,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.iptables = iptables
        self._clock = clock
        #: Rendered rules per Service, kept in output order (service_order): a dict keeps the
        #: position of a key on reassignment, so only a new Service needs a re-sort, and a sync
        #: walks the values without hashing 10,000 keys.
        self._rendered: dict[NamespacedName, tuple[ServicePortRules, ...]] = {}
        self._active: frozenset[str] = frozenset()
        self._large = False
        self._last_full = -math.inf
        self.need_full_sync = True

    def render(
        self, states: ServiceStates, changed: Collection[NamespacedName] | None
    ) -> Collection[NamespacedName] | None:
        """Bring the rendered cache up to date; returns the Services re-rendered (None: all)."""
        large = is_large_cluster(count_endpoints(states))

        def render(ports: tuple[ServicePortState, ...]) -> tuple[ServicePortRules, ...]:
            return tuple(
                render_service_port(s, self.config, large_cluster_mode=large)
                for s in sorted(ports, key=port_order)
            )

        if changed is None or large != self._large or not self._rendered:
            self._large = large
            self._rendered = {
                name: render(states[name]) for name in sorted(states, key=service_order)
            }
            return None
        membership_changed = False
        for name in changed:
            ports = states.get(name)
            if ports:
                membership_changed = membership_changed or name not in self._rendered
                self._rendered[name] = render(ports)
            elif self._rendered.pop(name, None) is not None:
                membership_changed = True
        if membership_changed:
            self._rendered = {
                name: self._rendered[name] for name in sorted(self._rendered, key=service_order)
            }
        return changed

    def sync(
        self,
        states: ServiceStates,
        changed: Collection[NamespacedName] | None = None,
        *,
        full: bool = False,
    ) -> SyncResult:
        """Write `states` to the kernel.

        `changed` lists the Services that changed since the last sync; only those are
        re-rendered (None: all). A full sync (`full`, no `changed`, a failure or a flushed canary
        since, or an hour since the last) writes every chain and re-reads the kernel; rendering
        stays incremental, since rendered text depends only on the states."""
        now = self._clock()
        full = (
            full
            or self.need_full_sync
            or changed is None
            or now - self._last_full > FULL_SYNC_PERIOD
        )
        rerendered = self.render(states, changed)
        changed_set = None if rerendered is None else set(rerendered)
        ports = [rules for service in self._rendered.values() for rules in service]
        write_chains = None
        if not full and changed_set is not None:
            # The changed Services' rule objects, by identity: cheaper than building and
            # hashing a NamespacedName for each of 10,000 service ports on every sync.
            written = {id(r) for name in changed_set for r in self._rendered.get(name, ())}
            write_chains = lambda r: id(r) in written  # noqa: E731
        ruleset = assemble_ruleset(ports, self.config, write_chains=write_chains)
        if full:
            view = KernelView.from_save(self.iptables.save(), skip_rules_of=_service_chain_rules)
            stale: Collection[str] = view.service_chains()
            hooks = view.missing_hooks(jump_rules(self.config))
        else:
            stale = self._active - ruleset.active_nat_chains
            hooks = ()
        document = ruleset.document(stale_chains=stale, hooks=hooks, canary=full)
        self.need_full_sync = True  # until the restore has succeeded
        self.iptables.restore(document)
        self.need_full_sync = False
        self._active = ruleset.active_nat_chains
        if full:
            self._last_full = now
        return SyncResult(
            full=full,
            restore_bytes=len(document),
            filter_rules=ruleset.filter_rules,
            nat_rules=ruleset.nat_rules,
            no_local_internal=ruleset.no_local_internal,
            no_local_external=ruleset.no_local_external,
            services_written=len(self._rendered)
            if full or changed_set is None
            else len(changed_set),
        )
