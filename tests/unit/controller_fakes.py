"""Fakes for driving the controller in unit tests: a clock, a source, proxiers and their factory.

The controller is handed these instead of the API watch, the kernel and the host (see
`Controller.__init__`): nothing here touches a socket, a sysctl or iptables. The fake proxier
follows the `pyproxy.proxier.Proxier` contract the way the real ones do (a full sync when asked,
when `changed` is None, for LazyStates, or after a failure; `need_full_sync` set until a sync
has succeeded) and records every call, so tests assert on what the controller asked for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from pyproxy.conntrack import CleanupResult
from pyproxy.controller import ConntrackCleaner, Controller
from pyproxy.errors import KernelError
from pyproxy.model import IPFamily, IPNetwork, NamespacedName
from pyproxy.options import ProxyOptions
from pyproxy.proxier import SyncResult
from pyproxy.proxystate import LazyStates, ProxierConfig, ServicePortState, ServiceStates


class FakeClock:
    """A monotonic clock that moves only when told (`advance`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSource:
    """The Source protocol: `synced` is set by the test once "the first lists" are in."""

    def __init__(self) -> None:
        self.synced = False
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def has_synced(self) -> bool:
        return self.synced


@dataclass(frozen=True, slots=True)
class SyncCall:
    """One `sync` as the fake proxier saw it."""

    #: When it started (fake clock).
    at: float
    #: The Services in the states it was given.
    services: frozenset[NamespacedName]
    #: `changed` as given (None: everything).
    changed: frozenset[NamespacedName] | None
    #: `full` as the controller asked.
    asked_full: bool
    #: The states were LazyStates (everything recomputed).
    lazy: bool
    #: What the proxier decided.
    full: bool


class FakeProxier:
    """A Proxier that writes nothing; `fail` holds exceptions the next syncs raise, in order."""

    def __init__(self, config: ProxierConfig, clock: FakeClock, sync_seconds: float) -> None:
        self.config = config
        self.need_full_sync = True
        self.calls: list[SyncCall] = []
        self.fail: list[Exception] = []
        #: What canary_present answers (a test sets False to play "someone flushed iptables").
        self.canary = False
        self.service_cidrs: tuple[IPNetwork, ...] = ()
        #: What the next successful sync reports as non-fatal cleanup failures.
        self.cleanup_failures = 0
        self._clock = clock
        self._sync_seconds = sync_seconds

    def sync(
        self,
        states: ServiceStates | LazyStates,
        changed: Collection[NamespacedName] | None = None,
        *,
        full: bool = False,
    ) -> SyncResult:
        lazy = isinstance(states, LazyStates)
        complete = states.complete() if isinstance(states, LazyStates) else states
        decided = full or self.need_full_sync or changed is None or lazy
        self.need_full_sync = True
        self.calls.append(
            SyncCall(
                at=self._clock(),
                services=frozenset(complete),
                changed=None if changed is None else frozenset(changed),
                asked_full=full,
                lazy=lazy,
                full=decided,
            )
        )
        # The sync takes time: the clock moves while it runs.
        self._clock.advance(self._sync_seconds)
        if self.fail:
            raise self.fail.pop(0)
        self.need_full_sync = False
        if decided:
            self.canary = True
        return SyncResult(
            full=decided,
            restore_bytes=100 * len(complete),
            filter_rules=1,
            nat_rules=len(complete),
            no_local_internal=0,
            no_local_external=0,
            services_written=len(complete if decided or changed is None else changed),
            cleanup_failures=self.cleanup_failures,
        )

    def on_service_cidrs_changed(self, cidrs: Sequence[IPNetwork]) -> None:
        self.service_cidrs = tuple(cidrs)

    def canary_present(self) -> bool:
        return self.canary


class FakeProxierFactory:
    """Builds FakeProxiers and keeps every one it built, oldest first."""

    def __init__(self, clock: FakeClock, sync_seconds: float = 0.0) -> None:
        self.built: list[FakeProxier] = []
        self._clock = clock
        self.sync_seconds = sync_seconds

    def __call__(self, config: ProxierConfig) -> FakeProxier:
        proxier = FakeProxier(config, self._clock, self.sync_seconds)
        self.built.append(proxier)
        return proxier

    def current(self, family: IPFamily = IPFamily.IPv4) -> FakeProxier:
        """The newest proxier of `family`."""
        return next(p for p in reversed(self.built) if p.config.family is family)

    def calls(self, family: IPFamily = IPFamily.IPv4) -> list[SyncCall]:
        """Every sync of `family`, across rebuilt proxiers."""
        return [c for p in self.built if p.config.family is family for c in p.calls]


class FakeHost:
    """The host preparation step and the host's addresses, recorded instead of done."""

    def __init__(self, addresses: tuple[str, ...] = ()) -> None:
        self.addresses = tuple(ipaddress.ip_address(a) for a in addresses)
        self.prepared: list[tuple[ProxierConfig, ...]] = []

    def host_addresses(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return self.addresses

    def prepare(self, configs: tuple[ProxierConfig, ...]) -> tuple[ProxierConfig, ...]:
        self.prepared.append(configs)
        return configs


class RecordingCleaner:
    """A conntrack cleaner that records the Services of `previous` each cleanup was given; the
    cleanups numbered in `failing` (0 = the first) fail as a netlink error would."""

    def __init__(self, family: IPFamily, failing: Collection[int] = ()) -> None:
        self.family = family
        self.failing = failing
        self.calls: list[set[NamespacedName]] = []

    def clean(
        self,
        *,
        previous: Mapping[NamespacedName, tuple[ServicePortState, ...]],
        current: Mapping[NamespacedName, tuple[ServicePortState, ...]],
    ) -> CleanupResult:
        self.calls.append(set(previous))
        if len(self.calls) - 1 in self.failing:
            raise KernelError("conntrack dump: No buffer space available")
        return CleanupResult(self.family, 0, 0, 0, False, 0.0)


@dataclass
class Harness:
    controller: Controller
    clock: FakeClock
    source: FakeSource
    proxiers: FakeProxierFactory
    host: FakeHost


def make_controller(
    *,
    proxy_mode: str = "iptables",
    sync_period: float = 30.0,
    min_sync_period: float = 1.0,
    sync_seconds: float = 0.0,
    node_name: str = "node-a",
    host_addresses: tuple[str, ...] = (),
    conntrack: Callable[[IPFamily], ConntrackCleaner] | None = None,
) -> Harness:
    """A controller on fakes; the HTTP servers are disabled (empty bind addresses)."""
    options = ProxyOptions(
        proxy_mode=proxy_mode,
        hostname_override=node_name,
        sync_period=sync_period,
        min_sync_period=min_sync_period,
        healthz_bind_address="",
        metrics_bind_address="",
    )
    clock = FakeClock()
    source = FakeSource()
    proxiers = FakeProxierFactory(clock, sync_seconds)
    host = FakeHost(host_addresses)
    controller = Controller(
        options,
        proxier_factory=proxiers,
        source_factory=lambda _c: source,
        host_addresses=host.host_addresses,
        prepare_host=host.prepare,
        conntrack=conntrack,
        clock=clock,
    )
    return Harness(controller, clock, source, proxiers, host)
