"""The node agent: watch the API, reconcile the kernel continuously, report health and metrics.

    KubeSource (3 watch threads) ──events──▶ ChangeTracker ──request()──▶ BoundedFrequencyRunner
                                                                              │ sync(periodic)
    per IP family: desired state (only changed Services recomputed) ──▶ Proxier.sync
                   ──▶ conntrack cleanup (UDP) ──▶ health.updated, metrics, HC node ports

The controller knows no proxy mode: it is handed a `ProxierFactory` (pyproxy.proxier) and
builds one proxier per IP family from the node configuration (nodeconfig.node_configs, then the
injected host preparation), again whenever the Node's addresses or zone change.

Rules of the road, as upstream's proxier:
- nothing is written before the first complete lists of Services, EndpointSlices and the Node;
- event handlers only record; all work happens in `sync`, on the runner's thread;
- a failed sync puts its changes back, makes the next sync a full one, and is retried after
  --iptables-sync-period (upstream's retry interval), or sooner if a change arrives;
- two syncs are --iptables-min-sync-period apart, from the end of one to the start of the next;
- the periodic sync: in iptables and nftables modes the hourly full sync (upstream's
  FullSyncPeriod), in ipvs mode every --iptables-sync-period (upstream's ipvs proxier has the
  sync period as its maximum interval);
- every --iptables-sync-period the canary chain (nftables mode: the table's `services`
  dispatch rule) is checked (upstream's iptables Monitor polls
  at that interval); one flushed by someone else triggers a full sync. Upstream's Monitor calls
  the sync itself; here the full sync goes through the runner, so syncs stay one at a time on
  one thread and keep the min sync period. (Upstream's ipvs mode has no canary monitor; the
  check is kept there, where it costs one iptables-save of the mangle table per period.
  Upstream's nftables mode has one: it lists its canary chain every sync period.)
- ServiceCIDRs (watched in nftables mode only) are handed to the proxiers when they change or
  the proxiers are rebuilt (upstream's OnServiceCIDRsChanged).
- stopping leaves every rule in place, so traffic keeps flowing across restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from pyproxy.changes import Changes, ChangeTracker
from pyproxy.conntrack import CleanupResult
from pyproxy.conntrack_plan import cleanup_needed
from pyproxy.errors import NftError, PyproxyError, RestoreError
from pyproxy.gcpause import gc_paused
from pyproxy.healthcheck import HealthzServer, ProxyHealth, ServiceHealthServer
from pyproxy.metrics import Metrics, MetricsServer
from pyproxy.model import IPFamily, NamespacedName
from pyproxy.nfacct import NfacctClient, ensure_counters
from pyproxy.nodeconfig import HostAddresses, node_configs
from pyproxy.options import ProxyOptions
from pyproxy.proxier import FULL_SYNC_PERIOD, Proxier, ProxierFactory, SyncResult
from pyproxy.proxystate import (
    NFACCT_COUNTERS,
    LazyStates,
    ProxierConfig,
    ServicePortState,
    ServiceStates,
    service_state,
)
from pyproxy.runner import BoundedFrequencyRunner

logger = structlog.get_logger("pyproxy")

#: The host preparation step (nodeconfig.prepare_host with the mode bound, or a fake).
PrepareHost = Callable[[tuple[ProxierConfig, ...]], tuple[ProxierConfig, ...]]


class Source(Protocol):
    def start(self) -> None: ...
    def stop(self) -> object: ...
    def has_synced(self) -> bool: ...


class ConntrackCleaner(Protocol):
    def clean(
        self,
        *,
        previous: Mapping[NamespacedName, tuple[ServicePortState, ...]],
        current: Mapping[NamespacedName, tuple[ServicePortState, ...]],
    ) -> CleanupResult: ...


@dataclass
class FamilyProxier:
    config: ProxierConfig
    proxier: Proxier
    conntrack: ConntrackCleaner | None = None
    #: The family's current desired state (a ServiceStates the sync keeps up to date).
    states: dict[NamespacedName, tuple[ServicePortState, ...]] = field(default_factory=dict)
    #: A conntrack cleanup failed: the `previous` states it was given, kept (merged with those
    #: of later syncs, a Service's oldest state winning) until a cleanup succeeds, so a flow to
    #: an endpoint of a Service changed or deleted in the failed sync is still judged stale.
    conntrack_pending: dict[NamespacedName, tuple[ServicePortState, ...]] | None = None
    #: The other modes' leftovers of this family have been looked for and are gone.
    leftovers_checked: bool = False


class Controller:
    def __init__(
        self,
        options: ProxyOptions,
        *,
        proxier_factory: ProxierFactory,
        source_factory: Callable[[Controller], Source],
        host_addresses: HostAddresses,
        prepare_host: PrepareHost,
        conntrack: Callable[[IPFamily], ConntrackCleaner] | None = None,
        other_modes_leftovers: Callable[[IPFamily], bool] | None = None,
        nfacct: NfacctClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.tracker = ChangeTracker(options.node_name)
        self._lock = threading.Lock()
        self._new_proxier = proxier_factory
        self._prepare_host = prepare_host
        self._host_addresses = host_addresses
        self._conntrack = conntrack
        #: After a family's first full sync: remove the other modes' leftovers (iptables and
        #: ipvs modes: nftables mode's table, nftleftovers.remove_after_sync; nftables mode:
        #: iptables and ipvs modes' rules); True once done, False to retry after the next.
        self._other_modes_leftovers = other_modes_leftovers
        self._clock = clock
        self.families: dict[IPFamily, FamilyProxier] = {}
        # nfacct counters exist only for iptables mode's rules and metrics (as upstream).
        self._nfacct = nfacct if options.proxy_mode == "iptables" else None
        #: The counters ensured at the first sync (upstream's nfAcctCounters), then fixed.
        self._nfacct_counters: frozenset[str] | None = None
        self.metrics = Metrics(options.proxy_mode, nfacct=self._nfacct)
        self.health = ProxyHealth(2 * options.sync_period)
        self.healthz_server = HealthzServer(
            self.health, options.healthz_bind_address, metrics=self.metrics
        )
        self.metrics_server = MetricsServer(
            self.metrics, options.proxy_mode, options.metrics_bind_address
        )
        self.service_health: ServiceHealthServer | None = None
        self.runner = BoundedFrequencyRunner(
            self.sync,
            min_interval=options.min_sync_period,
            # As upstream (1.34): in iptables (and nftables) mode the runner's periodic run is
            # the hourly full sync (proxyutil.FullSyncPeriod); --iptables-sync-period paces the
            # canary check and the retries. A full sync every 30 s costs 13 s of CPU at 10,000
            # Services (legacy) and minutes with iptables-nft-restore. IPVS mode syncs every
            # sync period, as upstream.
            max_interval=options.sync_period if options.proxy_mode == "ipvs" else FULL_SYNC_PERIOD,
            # Upstream's proxiers all pass the sync period as the runner's retry interval.
            retry_interval=options.sync_period,
            clock=clock,
        )
        self.source = source_factory(self)
        self._stop = threading.Event()
        self.syncs = 0

    # --- the source's consumer interface: record, never work --------------------------

    def on_replace(self, kind: str, objects: list[dict[str, object]]) -> None:
        with self._lock:
            self.tracker.replace(kind, objects)
        self._queued()

    def on_event(self, kind: str, event_type: str, obj: dict[str, object]) -> None:
        with self._lock:
            self.tracker.event(kind, event_type, obj)
        self._queued()

    def _queued(self) -> None:
        now = time.time()
        for family in list(self.families) or [IPFamily.IPv4]:
            self.health.queued_update(family)
            self.metrics.sync_proxy_rules_last_queued_timestamp.labels(family.value).set(now)
        services, endpoints = self.tracker.pending_counts
        self.metrics.service_changes_pending.set(services)
        self.metrics.endpoint_changes_pending.set(endpoints)
        # Before the first complete lists a sync would only return (and, with a min sync period,
        # push the first real one back by that period): _sync_when_synced asks for it instead.
        if self.source.has_synced():
            self.runner.request()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        # As upstream's SyncLoop: every family starts "updated", so it is judged from now on.
        for family in IPFamily:
            self.health.updated(family)
        for server in (self.healthz_server, self.metrics_server):
            # kube-proxy logs a bind failure, carries on and retries every 5 s; so do we.
            server.start_retrying(self._stop)
        self.source.start()
        self.runner.start()
        # The first sync, as soon as the source has its first complete lists (upstream runs it
        # from OnServiceSynced/OnEndpointSlicesSynced): the source marks itself synced only
        # after its last on_replace has returned, so no event handler can ask for it.
        threading.Thread(target=self._sync_when_synced, daemon=True, name="first-sync").start()
        self._canary_thread = threading.Thread(
            target=self._watch_canary, daemon=True, name="canary"
        )
        self._canary_thread.start()

    def _sync_when_synced(self) -> None:
        while not self._stop.is_set():
            if self.source.has_synced():
                self.runner.request()
                return
            self._stop.wait(0.02)

    def stop(self) -> None:
        """Stop everything; the rules stay in the kernel."""
        self._stop.set()
        self.source.stop()
        self.runner.stop()
        self.healthz_server.stop()
        self.metrics_server.stop()
        if self.service_health is not None:
            self.service_health.stop()

    def _watch_canary(self) -> None:
        # Upstream's Monitor polls every sync period; a period of 0 (which upstream rejects)
        # must not turn this into a busy loop.
        interval = max(1.0, self.options.sync_period)
        while not self._stop.wait(interval):
            self.check_canary()

    def check_canary(self) -> None:
        """Force a full sync of every family whose rules someone flushed."""
        for family, fp in list(self.families.items()):
            try:
                present = fp.proxier.canary_present()
            except PyproxyError as err:
                logger.warning("canary check failed", ip_family=family.value, error=str(err))
                continue
            if not present and not fp.proxier.need_full_sync:
                logger.warning(
                    "canary gone: rules flushed by someone? forcing a full sync",
                    ip_family=family.value,
                )
                fp.proxier.need_full_sync = True
                self.runner.request()

    # --- the sync ---------------------------------------------------------------------

    def _configs(self) -> tuple[ProxierConfig, ...]:
        configs = node_configs(self.options, self.tracker.node, self._host_addresses)
        counters = self._ensured_nfacct_counters()
        return tuple(replace(c, nfacct_counters=counters) for c in self._prepare_host(configs))

    def _ensured_nfacct_counters(self) -> frozenset[str]:
        """Ensure the nfacct counters once; the rules count into those that exist."""
        if self._nfacct_counters is None:
            if self._nfacct is None:
                self._nfacct_counters = frozenset()
            else:
                ok, failed = ensure_counters(self._nfacct, NFACCT_COUNTERS)
                for name, error in failed.items():
                    logger.error(
                        "failed to create nfacct counter; the corresponding metric will not be"
                        " updated",
                        counter=name,
                        error=error,
                    )
                self._nfacct_counters = ok
        return self._nfacct_counters

    def _recompute(self, fp: FamilyProxier, names: set[NamespacedName]) -> None:
        tracker = self.tracker
        for name in names:
            service = tracker.services.get(name)
            ports = service_state(service, tracker.slices_of(name), fp.config) if service else ()
            if ports:
                fp.states[name] = ports
            else:
                fp.states.pop(name, None)

    def sync(self, periodic: bool) -> None:
        if not self.source.has_synced():
            logger.debug("waiting for the first complete lists before writing anything")
            return
        # A sync allocates many objects and frees few, so the cyclic GC only walks the whole
        # heap again and again: at 10,000 Services that is a third of the first sync's CPU.
        with gc_paused():
            self._sync(periodic)

    def _sync(self, periodic: bool) -> None:
        started = self._clock()
        lazy: dict[IPFamily, LazyStates] = {}
        with self._lock:
            changes = self.tracker.take()
            problems = self.tracker.take_problems()
            try:
                rebuilt = self._prepare(changes)
                if rebuilt or changes.service_cidrs_changed:
                    cidrs = self.tracker.all_service_cidrs()
                    for fp in self.families.values():
                        fp.proxier.on_service_cidrs_changed(cidrs)
                previous = {
                    family: dict(fp.states)
                    if changes.services is None
                    else {n: fp.states[n] for n in changes.services if n in fp.states}
                    for family, fp in self.families.items()
                }
                if rebuilt or changes.services is None:
                    # Everything is recomputed: from a snapshot, outside the lock, Service by
                    # Service while the rules are written (IptablesProxier streams them).
                    services, slices = self.tracker.snapshot()
                    for family, fp in self.families.items():
                        fp.states = {}
                        lazy[family] = LazyStates(services, slices, fp.config, fp.states)
                else:
                    for fp in self.families.values():
                        self._recompute(fp, changes.services)
            except Exception:
                self.tracker.requeue(changes)
                raise
        for problem in problems:
            logger.warning(
                "skipping invalid object",
                kind=problem.kind,
                object=f"{problem.namespace}/{problem.name}",
                field=problem.field,
                reason=problem.reason,
            )
        # Periodic syncs write everything (a full sync) but re-render only what changed.
        changed = None if rebuilt else changes.services
        results: dict[IPFamily, SyncResult] = {}
        try:
            for family, fp in self.families.items():
                states = lazy.get(family, fp.states)
                results[family] = self._sync_family(fp, states, changed, full=periodic)
                self._cleanup_conntrack(family, fp, changes, previous.get(family, {}))
        except Exception:
            with self._lock:
                self.tracker.requeue(changes)
            raise
        self._after_sync(changes, results, started)

    def _prepare(self, changes: Changes) -> bool:
        """(Re)build the per-family proxiers when the node changed; True if rebuilt."""
        if not changes.node_changed and self.families:
            return False
        self.health.sync_node(self.tracker.node)
        configs = self._configs()
        old = {family: fp.config for family, fp in self.families.items()}
        if old == {c.family: c for c in configs}:
            return False
        self.families = {
            c.family: FamilyProxier(
                c,
                self._new_proxier(c),
                self._conntrack(c.family) if self._conntrack is not None else None,
            )
            for c in configs
        }
        primary = configs[0]
        if self.service_health is not None:
            self.service_health.stop()
        self.service_health = ServiceHealthServer(self.health, primary.nodeport_ips)
        logger.info(
            "node configuration",
            node=self.options.node_name,
            families=[c.family.value for c in configs],
            node_ips=[str(ip) for c in configs for ip in c.node_ips],
            zone=primary.zone,
        )
        return True

    def _sync_family(
        self,
        fp: FamilyProxier,
        states: ServiceStates | LazyStates,
        changed: set[NamespacedName] | None,
        *,
        full: bool,
    ) -> SyncResult:
        family = fp.config.family.value
        try:
            result = fp.proxier.sync(states, changed, full=full)
        except RestoreError as err:
            self.metrics.iptables_restore_failures_total.labels(family).inc()
            if changed is not None and not full:
                self.metrics.iptables_partial_restore_failures_total.labels(family).inc()
            logger.error(
                "iptables-restore failed; next sync is a full one",
                ip_family=family,
                error=str(err),
                offending_lines=list(err.offending_lines),
            )
            raise
        except NftError as err:
            self.metrics.nftables_sync_failures_total.labels(family).inc()
            logger.error(
                "nftables sync failed; next sync is a full one",
                ip_family=family,
                error=str(err),
                offending_lines=list(err.offending_lines),
            )
            raise
        if result.cleanup_failures:
            self.metrics.nftables_cleanup_failures_total.labels(family).inc(result.cleanup_failures)
            logger.error("unable to delete stale nftables chains; will retry", ip_family=family)
        if result.full and not fp.leftovers_checked and self._other_modes_leftovers:
            fp.leftovers_checked = self._other_modes_leftovers(fp.config.family)
        return result

    def _cleanup_conntrack(
        self,
        family: IPFamily,
        fp: FamilyProxier,
        changes: Changes,
        previous: Mapping[NamespacedName, tuple[ServicePortState, ...]],
    ) -> None:
        """Delete UDP flows still pointing at endpoints that are gone, and flows cached while a
        Service had no endpoints, in the same sync (upstream's conntrack cleanup)."""
        if fp.conntrack is None:
            return
        if fp.conntrack_pending is not None:
            previous = {**previous, **fp.conntrack_pending}
        elif changes.services is not None:
            # A partial sync: `previous` holds the changed Services. Judge them on the map the
            # flows are judged by: the endpoints the rules use miss an endpoint that left the
            # rules while still serving and is removed later.
            current = {n: fp.states[n] for n in changes.services if n in fp.states}
            if not cleanup_needed(previous, current):
                return
        try:
            result = fp.conntrack.clean(previous=previous, current=fp.states)
        except PyproxyError as err:
            fp.conntrack_pending = dict(previous)
            logger.warning("conntrack cleanup failed", ip_family=family.value, error=str(err))
            return
        fp.conntrack_pending = None
        self.metrics.conntrack_reconciler_latency.labels(family.value).observe(result.seconds)
        self.metrics.conntrack_reconciler_deleted_total.labels(family.value).inc(result.deleted)
        if result.deleted:
            logger.info(
                "deleted stale UDP conntrack entries",
                ip_family=family.value,
                deleted=result.deleted,
                scanned=result.scanned,
            )

    def _after_sync(
        self,
        changes: Changes,
        results: Mapping[IPFamily, SyncResult],
        started: float,
    ) -> None:
        elapsed = self._clock() - started
        now = time.time()
        m = self.metrics
        for family, result in results.items():
            fam = family.value
            self.health.updated(family)
            m.sync_proxy_rules_latency.labels(fam).observe(elapsed)
            (
                m.sync_full_proxy_rules_latency
                if result.full
                else m.sync_partial_proxy_rules_latency
            ).labels(fam).observe(elapsed)
            m.sync_proxy_rules_last_timestamp.labels(fam).set(now)
            m.iptables_rules_total.labels(fam, "filter").set(result.filter_rules)
            m.iptables_rules_total.labels(fam, "nat").set(result.nat_rules)
            m.iptables_rules_last_sync.labels(fam, "filter").set(result.filter_rules)
            m.iptables_rules_last_sync.labels(fam, "nat").set(result.nat_rules)
            m.no_local_endpoints_total.labels(fam, "internal").set(result.no_local_internal)
            m.no_local_endpoints_total.labels(fam, "external").set(result.no_local_external)
            m.restore_bytes.labels(fam, "full" if result.full else "partial").set(
                result.restore_bytes
            )
            for when in changes.trigger_times.values():
                m.network_programming_latency.labels(fam).observe(max(0.0, now - when))
        m.service_changes_total.inc(changes.service_changes)
        m.endpoint_changes_total.inc(changes.endpoint_changes)
        services, endpoints = self.tracker.pending_counts
        m.service_changes_pending.set(services)
        m.endpoint_changes_pending.set(endpoints)
        self._sync_health_check_ports()
        self.syncs += 1
        primary = next(iter(results.values()), None)
        logger.info(
            "synced",
            full=bool(primary and primary.full),
            services_changed=None if changes.services is None else len(changes.services),
            services=len(self.tracker.services),
            elapsed_s=round(elapsed, 4),
            **{f"{f.value}_restore_bytes": r.restore_bytes for f, r in results.items()},
            **{f"{f.value}_nat_rules": r.nat_rules for f, r in results.items()},
            **{f"{f.value}_{k}": v for f, r in results.items() for k, v in r.details.items()},
        )

    def _sync_health_check_ports(self) -> None:
        if self.service_health is None or not self.families:
            return
        fp = next(iter(self.families.values()))
        ports: dict[int, NamespacedName] = {}
        local: dict[NamespacedName, int] = {}
        for name, states in fp.states.items():
            for state in states:
                if state.info.health_check_node_port:
                    ports[state.info.health_check_node_port] = name
                    # Terminating local endpoints do not count (upstream).
                    local[name] = sum(1 for ep in state.endpoints if ep.is_local and ep.ready)
        self.service_health.sync_services(ports)
        self.service_health.sync_endpoints(local)

    # --- running as a process ---------------------------------------------------------

    def run_until_stopped(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            logger.info("stopping; rules stay in place")
            self.stop()
