"""One IP family's iptables dataplane: render what changed, write it, remember what is there.

`IptablesProxier` implements the controller's `pyproxy.proxier.Proxier` contract;
`cleanup_leftovers` is this mode's `--cleanup`.

The proxier keeps the rendered rules of every Service, so a sync re-renders only the Services
whose Service or EndpointSlices changed (the caller says which). A full sync writes every
Service's chains, re-reads the kernel (iptables-save) to find stale chains and missing hooks in
built-in chains; a partial sync writes only the dispatch chains, the filter table and the chains
of changed Services, as upstream does. Any failure makes the next sync a full one.

Every sync streams its input to iptables-restore (`stream_document`, `Iptables.restore_stream`)
while the Services are still being walked, so the Python work overlaps iptables-restore's: at
10,000 Services a full sync from a LazyStates (states computed as they are needed) takes about
max(compute + render, parse) + commit instead of their sum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence

import structlog

from pyproxy.iptables.kernelview import KernelView, cleanup_document
from pyproxy.iptables.render import (
    ServicePortRules,
    StreamedRuleset,
    is_large_cluster,
    render_service_port,
    stream_document,
)
from pyproxy.iptables.restore import Iptables, canary_exists
from pyproxy.iptables.vocabulary import is_service_chain, jump_rules
from pyproxy.model import IPFamily, IPNetwork, NamespacedName
from pyproxy.proxier import FULL_SYNC_PERIOD, SyncResult
from pyproxy.proxystate import (
    LazyStates,
    ProxierConfig,
    ServicePortState,
    ServiceStates,
    count_endpoints,
    port_order,
    service_order,
)

logger = structlog.get_logger("pyproxy")


class _WrongClusterModeError(Exception):
    """A streamed full sync guessed upstream's large-cluster mode wrong (see _full_sync)."""


def _service_chain_rules(table: str, chain: str) -> bool:
    """Rules a full sync need not read back: those of nat service chains (it only needs their
    names, to delete stale ones, and the hooks in built-in chains)."""
    return table == "nat" and is_service_chain(chain)


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

    def on_service_cidrs_changed(self, cidrs: Sequence[IPNetwork]) -> None:
        """ServiceCIDRs matter to nftables mode only (as upstream's iptables/ipvs proxiers)."""

    def canary_present(self) -> bool:
        """Whether the KUBE-PROXY-CANARY chain of the last full sync is still there."""
        return canary_exists(self.iptables)

    def _render_ports(
        self, ports: tuple[ServicePortState, ...], large: bool
    ) -> tuple[ServicePortRules, ...]:
        return tuple(
            render_service_port(s, self.config, large_cluster_mode=large)
            for s in sorted(ports, key=port_order)
        )

    def render(
        self, states: ServiceStates, changed: Collection[NamespacedName] | None
    ) -> Collection[NamespacedName] | None:
        """Bring the rendered cache up to date; returns the Services re-rendered (None: all)."""
        large = is_large_cluster(count_endpoints(states))
        if changed is None or large != self._large or not self._rendered:
            self._large = large
            self._rendered = {
                name: self._render_ports(states[name], large)
                for name in sorted(states, key=service_order)
            }
            return None
        membership_changed = False
        for name in changed:
            ports = states.get(name)
            if ports:
                membership_changed = membership_changed or name not in self._rendered
                self._rendered[name] = self._render_ports(ports, large)
            elif self._rendered.pop(name, None) is not None:
                membership_changed = True
        if membership_changed:
            self._rendered = {
                name: self._rendered[name] for name in sorted(self._rendered, key=service_order)
            }
        return changed

    def _render_lazily(
        self,
        states: ServiceStates | LazyStates,
        changed: Collection[NamespacedName] | None,
        large: bool,
    ) -> Iterator[ServicePortRules]:
        """The rules of every Service in output order, computing (LazyStates) and rendering
        what `changed` names (None: everything) only when its turn comes, so a streamed restore
        parses the first Services while the last are computed. The cache is replaced once the
        walk is complete. Raises _WrongClusterMode at the end, before the last piece of the
        document, when `large` was a guess that the complete state contradicts."""
        cached = {} if changed is None or large != self._large else self._rendered
        changed_set = None if changed is None else set(changed)
        rendered: dict[NamespacedName, tuple[ServicePortRules, ...]] = {}
        get = states.get if isinstance(states, LazyStates) else states.__getitem__
        names = states.names() if isinstance(states, LazyStates) else states.keys()
        endpoints = 0
        for name in sorted(names, key=service_order):
            ports = get(name)
            if not ports:
                continue
            endpoints += sum(len(port.endpoints) for port in ports)
            service = cached.get(name) if changed_set is None or name not in changed_set else None
            if service is None:
                service = self._render_ports(ports, large)
            rendered[name] = service
            yield from service
        if is_large_cluster(endpoints) != large:
            raise _WrongClusterModeError
        self._rendered = rendered
        self._large = large

    def sync(
        self,
        states: ServiceStates | LazyStates,
        changed: Collection[NamespacedName] | None = None,
        *,
        full: bool = False,
    ) -> SyncResult:
        """Write `states` to the kernel.

        `changed` lists the Services that changed since the last sync; only those are
        re-rendered (None: all). A full sync (`full`, no `changed`, a failure or a flushed canary
        since, or an hour since the last) writes every chain and re-reads the kernel, streaming
        the rules to iptables-restore as they are computed and rendered; rendering stays
        incremental, since rendered text depends only on the states. `LazyStates` (everything
        to recompute) always means a full sync."""
        now = self._clock()
        full = (
            full
            or self.need_full_sync
            or changed is None
            or isinstance(states, LazyStates)
            or now - self._last_full > FULL_SYNC_PERIOD
        )
        self.need_full_sync = True  # until the restore has succeeded
        if full or changed is None or isinstance(states, LazyStates):
            result = self._full_sync(states, changed)
            self._last_full = now
        else:
            result = self._partial_sync(states, changed)
        self.need_full_sync = False
        return result

    def _full_sync(
        self, states: ServiceStates | LazyStates, changed: Collection[NamespacedName] | None
    ) -> SyncResult:
        view = KernelView.from_save(self.iptables.save(), skip_rules_of=_service_chain_rules)
        if isinstance(states, LazyStates):
            # Upstream's large-cluster mode needs the total endpoint count before the first
            # rule; an upper bound decides it without computing every state first, and in
            # the rare case where it is wrong (over the threshold, the real count not), the
            # stream is abandoned before its COMMIT and written again.
            large = is_large_cluster(states.endpoints_upper_bound())
        else:
            large = is_large_cluster(count_endpoints(states))
        summary = StreamedRuleset()
        chunks = stream_document(
            self._render_lazily(states, changed, large),
            self.config,
            summary,
            stale_chains=view.service_chains(),
            hooks=view.missing_hooks(jump_rules(self.config)),
            canary=True,
        )
        try:
            size = self.iptables.restore_stream(chunks)
        except _WrongClusterModeError:
            if not isinstance(states, LazyStates):
                raise  # only a guess can be wrong
            return self._full_sync(states.into, None)
        self._active = frozenset(summary.active_nat_chains)
        return SyncResult(
            full=True,
            restore_bytes=size,
            filter_rules=summary.filter_rules,
            nat_rules=summary.nat_rules,
            no_local_internal=summary.no_local_internal,
            no_local_external=summary.no_local_external,
            services_written=len(self._rendered),
        )

    def _partial_sync(
        self, states: ServiceStates, changed: Collection[NamespacedName]
    ) -> SyncResult:
        rerendered = self.render(states, changed)
        write_chains = None
        if rerendered is not None:
            # The changed Services' rule objects, by identity: cheaper than building and
            # hashing a NamespacedName for each of 10,000 service ports on every sync.
            written = {id(r) for name in rerendered for r in self._rendered.get(name, ())}
            write_chains = lambda r: id(r) in written  # noqa: E731
        summary = StreamedRuleset()
        chunks = stream_document(
            (rules for service in self._rendered.values() for rules in service),
            self.config,
            summary,
            write_chains=write_chains,
            # Those no longer active once every Service has been seen are flushed and deleted.
            stale_chains=self._active,
        )
        size = self.iptables.restore_stream(chunks)
        self._active = frozenset(summary.active_nat_chains)
        return SyncResult(
            full=False,
            restore_bytes=size,
            filter_rules=summary.filter_rules,
            nat_rules=summary.nat_rules,
            no_local_internal=summary.no_local_internal,
            no_local_external=summary.no_local_external,
            services_written=len(self._rendered) if rerendered is None else len(rerendered),
        )


def cleanup_leftovers(backend: str) -> bool:
    """iptables mode's `--cleanup`: every hook, rule and chain pyproxy (or kube-proxy: the same
    names) may have written, whatever flags it ran with, and nothing else."""
    changed = False
    for family in IPFamily:
        iptables = Iptables(family, backend)
        # Every hook pyproxy may have installed, whatever flags it ran with.
        hooks = jump_rules(ProxierConfig(family=family, node_name="", localhost_nodeports=True))
        document = cleanup_document(
            KernelView.from_save(iptables.save(("filter", "nat", "mangle"))), hooks
        )
        if document:
            iptables.restore(document)
            changed = True
        logger.info("cleaned up", ip_family=family.value, backend=backend, changed=bool(document))
    return changed
