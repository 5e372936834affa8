"""kube-proxy's metric names, types and buckets, and the /metrics + /proxyMode server."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message

import pytest

from pyproxy.metrics import (
    NETWORK_PROGRAMMING_BUCKETS,
    SYNC_DURATION_BUCKETS,
    Metrics,
    MetricsServer,
)

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str) -> tuple[int, Message, bytes]:
    try:
        with _opener.open(url, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


CORE = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_service_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": "gauge",
    "kubeproxy_proxy_healthz_total": "counter",
    "kubeproxy_proxy_livez_total": "counter",
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": "histogram",
    "kubeproxy_conntrack_reconciler_deleted_entries_total": "counter",
}
IPTABLES = {
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
    "kubeproxy_sync_proxy_rules_iptables_last": "gauge",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": "counter",
    "pyproxy_sync_restore_bytes": "gauge",
}
NFTABLES = {
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total": "counter",
}


def exported_types(text: str) -> dict[str, str]:
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
    return types


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("iptables", CORE | IPTABLES),
        (
            "ipvs",
            CORE
            | {
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": "counter",
                "pyproxy_sync_restore_bytes": "gauge",
            },
        ),
        ("nftables", CORE | NFTABLES),
    ],
)
def test_registered_names_and_types_per_mode(mode: str, expected: dict[str, str]) -> None:
    assert exported_types(Metrics(mode).render().decode()) == expected


def test_no_created_series_and_fresh_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.proxy_healthz_total.labels(code="200").inc()
    a.endpoint_changes_total.inc(3)
    text = a.render().decode()
    assert "_created" not in text
    assert 'kubeproxy_proxy_healthz_total{code="200"} 1.0' in text
    assert "kubeproxy_sync_proxy_rules_endpoint_changes_total 3.0" in text
    assert b.registry.get_sample_value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 0


def test_labels_and_buckets_as_upstream() -> None:
    m = Metrics()
    m.sync_proxy_rules_latency.labels(ip_family="IPv4").observe(0.003)
    m.sync_full_proxy_rules_latency.labels(ip_family="IPv4").observe(0.003)
    m.network_programming_latency.labels(ip_family="IPv6").observe(1.5)
    m.iptables_rules_total.labels(ip_family="IPv4", table="nat").set(42)
    m.iptables_rules_last_sync.labels(ip_family="IPv4", table="filter").set(7)
    m.no_local_endpoints_total.labels(ip_family="IPv4", traffic_policy="external").set(1)
    m.restore_bytes.labels(ip_family="IPv4", kind="partial").set(1234)
    text = m.render().decode()

    assert len(SYNC_DURATION_BUCKETS) == 15
    assert SYNC_DURATION_BUCKETS[0] == 0.001
    assert SYNC_DURATION_BUCKETS[-1] == pytest.approx(16.384)
    assert (
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.004"} 1.0'
        in text
    )
    assert (
        'kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.002"} 0.0'
        in text
    )

    # MergeBuckets' leading 0, then 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 81
    assert NETWORK_PROGRAMMING_BUCKETS[:5] == (0.0, 0.25, 0.5, 1.0, 2.0)
    assert NETWORK_PROGRAMMING_BUCKETS[-8:] == (
        115.0,
        120.0,
        150.0,
        180.0,
        210.0,
        240.0,
        270.0,
        300.0,
    )
    assert (
        'kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv6",le="2.0"} 1.0'
        in text
    )

    assert 'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 42.0' in text
    assert 'kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="filter"} 7.0' in text
    assert (
        'kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",'
        'traffic_policy="external"} 1.0'
    ) in text
    assert 'pyproxy_sync_restore_bytes{ip_family="IPv4",kind="partial"} 1234.0' in text


@pytest.fixture
def metrics_url() -> Iterator[str]:
    m = Metrics("iptables")
    m.service_changes_total.inc()
    server = MetricsServer(m, "iptables", "127.0.0.1:0")
    server.start()
    assert server.address is not None
    try:
        yield f"http://127.0.0.1:{server.address[1]}"
    finally:
        server.stop()


def test_metrics_endpoint(metrics_url: str) -> None:
    code, headers, body = http_get(metrics_url + "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert set(exported_types(text)) == set(CORE | IPTABLES)
    assert "kubeproxy_sync_proxy_rules_service_changes_total 1.0" in text


def test_proxy_mode_and_healthz_endpoints(metrics_url: str) -> None:
    code, headers, body = http_get(metrics_url + "/proxyMode")
    assert (code, body) == (200, b"iptables")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert http_get(metrics_url + "/healthz")[::2] == (200, b"ok")
    assert http_get(metrics_url + "/configz")[0] == 404


def test_metrics_server_disabled_and_stop() -> None:
    disabled = MetricsServer(Metrics(), "ipvs", "")
    disabled.start()
    assert disabled.address is None
    disabled.stop()

    server = MetricsServer(Metrics("ipvs"), "ipvs", "127.0.0.1:0")
    server.start()
    assert server.address is not None
    url = f"http://127.0.0.1:{server.address[1]}/proxyMode"
    assert http_get(url)[2] == b"ipvs"
    server.stop()
    with pytest.raises(urllib.error.URLError):
        http_get(url)
