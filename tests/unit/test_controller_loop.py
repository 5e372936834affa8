"""The controller on fakes (controller_fakes.py): when it syncs, what it asks each proxier for.

Events go in through the source's consumer interface (`on_replace`, `on_event`), the sync
runner is stepped by hand (`runner.step()`, which returns how long it would wait) and time
moves only on the fake clock, so every test is a specification of upstream's sync loop:
coalescing, min-sync pacing from the end of a sync, retry after the sync period, full versus
partial syncs, canary-forced full syncs, node changes, and shutdown.
"""

from __future__ import annotations

from typing import Any

import pytest
from controller_fakes import Harness, RecordingCleaner, make_controller
from support import endpoint_slice, node, port, service, slice_port

from pyproxy.errors import NftError, RestoreError
from pyproxy.model import IPFamily, NamespacedName
from pyproxy.proxier import FULL_SYNC_PERIOD

NODE_IP = "192.168.0.2"
NODE_IPV6 = "2001:db8::2"
ZONE = "topology.kubernetes.io/zone"

WEB = NamespacedName("demo", "web")
API = NamespacedName("demo", "api")
DB = NamespacedName("demo", "db")


def web(*ips: str) -> list[dict[str, Any]]:
    return [service("demo", "web", "10.96.0.10"), endpoint_slice("demo", "web", list(ips))]


def objects() -> list[dict[str, Any]]:
    return [
        *web("10.244.1.10"),
        service("demo", "api", "10.96.0.11"),
        endpoint_slice("demo", "api", ["10.244.1.11"]),
        service("demo", "db", "10.96.0.12"),
    ]


def first_lists(h: Harness, objs: list[dict[str, Any]] | None = None, **labels: str) -> None:
    """The source's first complete lists, then what the first-sync thread does."""
    objs = objects() if objs is None else objs
    c = h.controller
    c.on_replace("Service", [o for o in objs if o["kind"] == "Service"])
    c.on_replace("EndpointSlice", [o for o in objs if o["kind"] == "EndpointSlice"])
    c.on_replace("Node", [node("node-a", [NODE_IP], **labels)])
    h.source.synced = True
    c.runner.request()


def synced(**kwargs: Any) -> Harness:
    """A controller past its first (full) sync, its min sync period over."""
    h = make_controller(**kwargs)
    first_lists(h)
    h.controller.runner.step()
    assert len(h.proxiers.calls()) == 1
    h.clock.advance(h.controller.options.min_sync_period)
    return h


def modify(h: Harness, obj: dict[str, Any]) -> None:
    h.controller.on_event(obj["kind"], "MODIFIED", obj)


# --- the first sync ---------------------------------------------------------------------------


def test_nothing_is_written_before_the_first_complete_lists() -> None:
    h = make_controller()
    c = h.controller
    c.on_replace("Service", [o for o in objects() if o["kind"] == "Service"])
    c.on_event("EndpointSlice", "ADDED", objects()[1])
    # Events before the source has synced do not ask for a sync ...
    assert c.runner.step() == pytest.approx(FULL_SYNC_PERIOD)
    # ... and a sync that runs anyway (the periodic one) builds and writes nothing.
    c.runner.request()
    c.runner.step()
    assert h.proxiers.built == []
    assert c.syncs == 0


def test_first_sync_is_full_and_computes_every_service() -> None:
    h = make_controller()
    first_lists(h)
    h.controller.runner.step()
    (call,) = h.proxiers.calls()
    assert call.full and call.lazy and call.changed is None
    assert call.services == {WEB, API, DB}
    assert h.proxiers.current().config.node_ips[0].compressed == NODE_IP
    # The host was prepared once, for the configs the proxiers were built from.
    assert h.host.prepared == [(h.proxiers.current().config,)]


# --- coalescing and pacing --------------------------------------------------------------------


def test_events_coalesce_into_one_partial_sync_of_the_changed_services() -> None:
    h = synced()
    modify(h, endpoint_slice("demo", "web", ["10.244.1.20"]))
    modify(h, endpoint_slice("demo", "web", ["10.244.1.21"]))
    modify(h, service("demo", "api", "10.96.0.11", type="NodePort"))
    h.controller.runner.step()
    second = h.proxiers.calls()[1:]
    assert len(second) == 1
    (call,) = second
    assert not call.full and not call.lazy and not call.asked_full
    assert call.changed == {WEB, API}
    assert call.services == {WEB, API, DB}
    # Nothing left: the runner now only waits (min sync period, then the periodic sync).
    h.clock.advance(1.0)
    assert h.controller.runner.step() == pytest.approx(FULL_SYNC_PERIOD - 1.0)
    assert len(h.proxiers.calls()) == 2


def test_min_sync_period_counts_from_the_end_of_a_slow_sync() -> None:
    h = synced(min_sync_period=2.0, sync_seconds=5.0)
    start = h.clock.now
    modify(h, endpoint_slice("demo", "web", ["10.244.1.20"]))
    h.controller.runner.step()  # takes 5 s of the clock
    # A change that came in while it ran waits 2 s after its end (not after its start,
    # which would let it run at once).
    modify(h, endpoint_slice("demo", "web", ["10.244.1.21"]))
    assert h.controller.runner.step() == pytest.approx(2.0)
    h.clock.advance(1.9)
    h.controller.runner.step()
    assert len(h.proxiers.calls()) == 2
    h.clock.advance(0.1)
    h.controller.runner.step()
    assert [c.at - start for c in h.proxiers.calls()[1:]] == pytest.approx([0.0, 7.0])


def test_zero_min_sync_period_syncs_every_change_at_once() -> None:
    h = synced(min_sync_period=0.0)
    for ip in ("10.244.1.20", "10.244.1.21", "10.244.1.22"):
        modify(h, endpoint_slice("demo", "web", [ip]))
        h.controller.runner.step()
    assert [c.changed for c in h.proxiers.calls()[1:]] == [{WEB}] * 3


# --- failures -----------------------------------------------------------------------------


def test_failed_sync_is_retried_after_the_sync_period_as_a_full_sync() -> None:
    h = synced(sync_period=30.0)
    h.proxiers.current().fail.append(RestoreError("iptables-restore: line 3 failed", ("3: x",)))
    modify(h, endpoint_slice("demo", "web", ["10.244.1.20"]))
    failed_at = h.clock.now
    h.controller.runner.step()
    metrics = h.controller.metrics
    assert metrics.iptables_restore_failures_total.labels("IPv4")._value.get() == 1
    assert metrics.iptables_partial_restore_failures_total.labels("IPv4")._value.get() == 1
    # Not after 1-5 s: after the sync period, counted from the failure.
    h.clock.advance(29.0)
    h.controller.runner.step()
    assert len(h.proxiers.calls()) == 2
    h.clock.advance(1.0)
    h.controller.runner.step()
    retry = h.proxiers.calls()[2]
    assert retry.at - failed_at == pytest.approx(30.0)
    # The failed sync's changes were put back as "everything": recomputed and written in full.
    assert retry.full and retry.lazy and retry.changed is None
    assert retry.services == {WEB, API, DB}
    assert not retry.asked_full  # a retry, not the periodic full sync


def test_a_change_after_a_failure_syncs_before_the_retry_is_due() -> None:
    h = synced()
    h.proxiers.current().fail.append(RestoreError("boom", ()))
    modify(h, endpoint_slice("demo", "web", ["10.244.1.20"]))
    h.controller.runner.step()
    modify(h, endpoint_slice("demo", "api", ["10.244.1.30"]))
    h.clock.advance(1.0)
    h.controller.runner.step()
    calls = h.proxiers.calls()
    assert len(calls) == 3 and calls[2].full and calls[2].changed is None
    assert calls[2].at - calls[1].at == pytest.approx(1.0)


# --- periodic and forced full syncs -------------------------------------------------------------


def test_iptables_mode_full_sync_is_hourly_not_every_sync_period() -> None:
    h = synced(sync_period=30.0)
    h.clock.advance(30.0)
    h.controller.runner.step()
    assert len(h.proxiers.calls()) == 1
    h.clock.advance(FULL_SYNC_PERIOD - 31.0)
    h.controller.runner.step()
    periodic = h.proxiers.calls()[1]
    assert periodic.asked_full and periodic.full
    # Periodic syncs write everything but recompute only what changed (here: nothing).
    assert periodic.changed == set() and not periodic.lazy


def test_ipvs_mode_syncs_every_sync_period() -> None:
    h = synced(proxy_mode="ipvs", sync_period=30.0)
    h.clock.advance(29.0)
    h.controller.runner.step()
    assert len(h.proxiers.calls()) == 2
    assert h.proxiers.calls()[1].asked_full


def test_flushed_canary_forces_a_full_sync() -> None:
    h = synced()
    c = h.controller
    c.check_canary()  # still there: nothing to do
    c.runner.step()
    assert len(h.proxiers.calls()) == 1
    h.proxiers.current().canary = False  # someone ran iptables -F / -X
    c.check_canary()
    c.runner.step()
    forced = h.proxiers.calls()[1]
    assert forced.full and not forced.asked_full and forced.changed == set()
    # The full sync wrote the canary again: the next check is quiet.
    h.clock.advance(1.0)
    c.check_canary()
    c.runner.step()
    assert len(h.proxiers.calls()) == 2


# --- the node ---------------------------------------------------------------------------------


def test_zone_label_change_rebuilds_the_proxiers_and_recomputes_everything() -> None:
    h = synced()
    first = h.proxiers.current()
    modify(h, node("node-a", [NODE_IP], **{ZONE: "zone-b"}))
    h.controller.runner.step()
    rebuilt = h.proxiers.current()
    assert rebuilt is not first and rebuilt.config.zone == "zone-b"
    (call,) = rebuilt.calls
    assert call.full and call.lazy and call.changed is None
    assert call.services == {WEB, API, DB}
    assert len(h.host.prepared) == 2


def test_label_change_that_changes_no_config_keeps_the_proxiers() -> None:
    h = synced()
    first = h.proxiers.current()
    modify(h, node("node-a", [NODE_IP], team="blue"))
    h.controller.runner.step()
    assert h.proxiers.current() is first
    call = first.calls[-1]
    assert not call.full and call.changed == set()


def test_a_new_node_address_family_gets_its_own_proxier() -> None:
    h = synced()
    modify(h, node("node-a", [NODE_IP, NODE_IPV6]))
    h.controller.runner.step()
    assert set(h.controller.families) == {IPFamily.IPv4, IPFamily.IPv6}
    v6 = h.proxiers.current(IPFamily.IPv6)
    assert [str(ip) for ip in v6.config.node_ips] == [NODE_IPV6]
    assert len(v6.calls) == 1 and v6.calls[0].full


def test_host_addresses_are_used_only_without_node_addresses() -> None:
    h = make_controller(host_addresses=("172.30.0.2",))
    c = h.controller
    c.on_replace("Service", [])
    c.on_replace("EndpointSlice", [])
    c.on_replace("Node", [])  # no Node object for this node
    h.source.synced = True
    c.runner.request()
    c.runner.step()
    assert [str(ip) for ip in h.proxiers.current().config.node_ips] == ["172.30.0.2"]


# --- shutdown ---------------------------------------------------------------------------------


def test_stop_ends_the_threads_and_leaves_the_rules() -> None:
    h = make_controller()
    c = h.controller
    c.start()
    assert h.source.started
    c.stop()
    assert h.source.stopped
    assert c.runner._thread is not None and not c.runner._thread.is_alive()
    c._canary_thread.join(timeout=10)
    assert not c._canary_thread.is_alive()
    # Stopping writes nothing: no sync, no proxier built (a proxier has no way to clean up).
    assert h.proxiers.built == []


# --- nftables mode: ServiceCIDRs and its failure metrics ----------------------------------------


def service_cidr(name: str, *cidrs: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def test_service_cidrs_are_handed_to_the_proxiers_when_they_change() -> None:
    h = make_controller(proxy_mode="nftables")
    h.controller.on_replace("ServiceCIDR", [service_cidr("kubernetes", "10.96.0.0/16")])
    first_lists(h)
    h.controller.runner.step()
    proxier = h.proxiers.current()
    assert [str(c) for c in proxier.service_cidrs] == ["10.96.0.0/16"]

    h.clock.advance(1.0)
    h.controller.on_event("ServiceCIDR", "ADDED", service_cidr("extra", "10.100.0.0/24"))
    h.controller.runner.step()
    assert [str(c) for c in proxier.service_cidrs] == ["10.96.0.0/16", "10.100.0.0/24"]
    # The change alone asks for a sync, which re-renders no Service.
    assert h.proxiers.calls()[-1].changed == frozenset()

    h.clock.advance(1.0)
    h.controller.on_replace("ServiceCIDR", [service_cidr("extra", "10.100.0.0/24")])
    h.controller.runner.step()
    assert [str(c) for c in proxier.service_cidrs] == ["10.100.0.0/24"]


def test_nftables_failures_are_counted_as_upstream() -> None:
    h = synced(proxy_mode="nftables")
    metrics = h.controller.metrics
    h.proxiers.current().fail.append(NftError("nft -f failed", ("add rule x",)))
    modify(h, endpoint_slice("demo", "web", ["10.244.1.20"]))
    h.controller.runner.step()
    assert metrics.nftables_sync_failures_total.labels("IPv4")._value.get() == 1
    assert metrics.iptables_restore_failures_total.labels("IPv4")._value.get() == 0

    # A stale chain deletion that failed is not a failed sync, but counted on its own.
    h.proxiers.current().cleanup_failures = 1
    h.clock.advance(30.0)
    h.controller.runner.step()
    assert len(h.proxiers.calls()) == 3
    assert metrics.nftables_cleanup_failures_total.labels("IPv4")._value.get() == 1
    assert metrics.nftables_sync_failures_total.labels("IPv4")._value.get() == 1


# --- conntrack cleanup ----------------------------------------------------------------------


def test_a_failed_cleanup_is_retried_with_the_services_of_the_failed_sync() -> None:
    """A Service deleted in a sync whose conntrack cleanup failed must still be judged by the
    retry in a later sync that changed something else: its flows point at endpoints that
    exist nowhere any more."""
    cleaners: list[RecordingCleaner] = []

    def cleaner(family: IPFamily) -> RecordingCleaner:
        cleaners.append(RecordingCleaner(family, failing={1}))
        return cleaners[-1]

    dns = [port("dns", 53, "UDP")]
    h = make_controller(conntrack=cleaner)
    first_lists(
        h,
        [
            *web("10.244.1.10"),
            service("demo", "api", "10.96.0.11", dns),
            endpoint_slice("demo", "api", ["10.244.1.11"], [slice_port("dns", 53, "UDP")]),
        ],
    )
    h.controller.runner.step()
    (ct,) = cleaners
    assert len(ct.calls) == 1  # the first sync always cleans
    h.clock.advance(h.controller.options.min_sync_period)

    h.controller.on_event("Service", "DELETED", service("demo", "api", "10.96.0.11", dns))
    h.controller.runner.step()
    assert ct.calls[1] == {API}  # this cleanup fails
    h.clock.advance(h.controller.options.min_sync_period)

    modify(h, endpoint_slice("demo", "web", ["10.244.1.12"]))
    h.controller.runner.step()
    assert ct.calls[2] == {API, WEB}  # the retry still judges the deleted Service
    h.clock.advance(h.controller.options.min_sync_period)

    modify(h, endpoint_slice("demo", "web", ["10.244.1.13"]))
    h.controller.runner.step()
    assert len(ct.calls) == 3  # nothing pending; a TCP-only change needs no cleanup
