"""kube-proxy's Prometheus metrics, under kube-proxy's names, and the server that exposes them.

Dashboards and alerts written for kube-proxy must keep working against pyproxy, so every metric
here has the name, type, help text, buckets and labels of upstream's `pkg/proxy/metrics` (1.33+,
where most sync metrics carry an `ip_family` label), and `MetricsServer` answers on
`--metrics-bind-address` (default 127.0.0.1:10249) with `/metrics`, `/proxyMode` and `/healthz`
like kube-proxy's metrics mux.

The metrics live in their own `CollectorRegistry`, never prometheus_client's global default, so
each `Metrics` (one per process, or one per test) is independent. As upstream's RegisterMetrics
does, only the metrics that make sense for the proxy mode are registered (exported); the others
still exist, so callers never need to check the mode before updating one.

The two nfacct-based metrics of iptables mode are not kept here but read from the kernel on
every scrape (`NfacctCollector`), as upstream's nfacctMetricCollector does; they are registered
only when the nfacct subsystem answered at start (`pyproxy.nfacct.open_nfacct`).
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from pyproxy.errors import KernelError
from pyproxy.httpserver import HTTPResponse, HTTPService
from pyproxy.nfacct import NfacctClient
from pyproxy.proxystate import (
    CT_STATE_INVALID_DROPPED_NFACCT_COUNTER,
    LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER,
)

logger = structlog.get_logger(__name__)

_SUBSYSTEM = "kubeproxy"

#: prometheus ExponentialBuckets(0.001, 2, 15): 1 ms .. 16.384 s.
SYNC_DURATION_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**i for i in range(15))

#: component-base MergeBuckets(Linear(0.25, 0.25, 2), Linear(1, 1, 59), Linear(60, 5, 12),
#: Linear(120, 30, 7)); MergeBuckets starts from a 0 bucket, so upstream exports le="0" too.
NETWORK_PROGRAMMING_BUCKETS: tuple[float, ...] = (
    0.0,
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 301, 30)),
)

#: The classic text format generate_latest writes (every name here is a legacy-valid one);
#: prometheus_client >= 0.22 calls 1.0.0 "latest", which Prometheus 2.x does not know.
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"

#: The IP family label; its values are v1.IPFamily strings, "IPv4" and "IPv6" (IPFamily.value).
IP_FAMILY_LABEL = "ip_family"


class Metrics:
    """Every kube-proxy metric pyproxy maintains, registered in `self.registry`.

    Label names, in order (pass values positionally or by keyword to `.labels()`):
    `ip_family` is "IPv4" or "IPv6"; `table` is an iptables table ("filter", "nat");
    `traffic_policy` is "internal" or "external"; `code` is the HTTP status as text ("200");
    `kind` is "full" or "partial".
    """

    def __init__(
        self,
        mode: str = "iptables",
        registry: CollectorRegistry | None = None,
        nfacct: NfacctClient | None = None,
    ) -> None:
        self.mode = mode
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        fam = [IP_FAMILY_LABEL]

        self.sync_proxy_rules_latency = Histogram(
            f"{_SUBSYSTEM}_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            fam,
            buckets=SYNC_DURATION_BUCKETS,
            registry=None,
        )
        self.sync_full_proxy_rules_latency = Histogram(
            f"{_SUBSYSTEM}_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            fam,
            buckets=SYNC_DURATION_BUCKETS,
            registry=None,
        )
        self.sync_partial_proxy_rules_latency = Histogram(
            f"{_SUBSYSTEM}_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            fam,
            buckets=SYNC_DURATION_BUCKETS,
            registry=None,
        )
        self.sync_proxy_rules_last_timestamp = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            fam,
            registry=None,
        )
        self.sync_proxy_rules_last_queued_timestamp = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            fam,
            registry=None,
        )
        # Observed once per changed EndpointSlice whose change a successful sync applied, with
        # now - endpoints.kubernetes.io/last-change-trigger-time.
        self.network_programming_latency = Histogram(
            f"{_SUBSYSTEM}_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            fam,
            buckets=NETWORK_PROGRAMMING_BUCKETS,
            registry=None,
        )
        self.endpoint_changes_pending = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=None,
        )
        self.endpoint_changes_total = Counter(
            f"{_SUBSYSTEM}_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            registry=None,
        )
        self.service_changes_pending = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=None,
        )
        self.service_changes_total = Counter(
            f"{_SUBSYSTEM}_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            registry=None,
        )
        self.iptables_restore_failures_total = Counter(
            f"{_SUBSYSTEM}_sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures",
            fam,
            registry=None,
        )
        self.iptables_partial_restore_failures_total = Counter(
            f"{_SUBSYSTEM}_sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
            fam,
            registry=None,
        )
        self.iptables_rules_total = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            [IP_FAMILY_LABEL, "table"],
            registry=None,
        )
        self.iptables_rules_last_sync = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            [IP_FAMILY_LABEL, "table"],
            registry=None,
        )
        self.nftables_sync_failures_total = Counter(
            f"{_SUBSYSTEM}_sync_proxy_rules_nftables_sync_failures_total",
            "Cumulative proxy nftables sync failures",
            fam,
            registry=None,
        )
        self.nftables_cleanup_failures_total = Counter(
            f"{_SUBSYSTEM}_sync_proxy_rules_nftables_cleanup_failures_total",
            "Cumulative proxy nftables cleanup failures",
            fam,
            registry=None,
        )
        # A gauge despite the _total suffix, exactly as upstream: Services with a Local policy
        # that have endpoints, but none on this node.
        self.no_local_endpoints_total = Gauge(
            f"{_SUBSYSTEM}_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            [IP_FAMILY_LABEL, "traffic_policy"],
            registry=None,
        )
        self.proxy_healthz_total = Counter(
            f"{_SUBSYSTEM}_proxy_healthz_total",
            "Cumulative proxy healthz HTTP status",
            ["code"],
            registry=None,
        )
        self.proxy_livez_total = Counter(
            f"{_SUBSYSTEM}_proxy_livez_total",
            "Cumulative proxy livez HTTP status",
            ["code"],
            registry=None,
        )
        # Upstream 1.33+: the UDP conntrack cleanup after a sync (pyproxy.conntrack).
        self.conntrack_reconciler_latency = Histogram(
            f"{_SUBSYSTEM}_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            fam,
            buckets=SYNC_DURATION_BUCKETS,
            registry=None,
        )
        self.conntrack_reconciler_deleted_total = Counter(
            f"{_SUBSYSTEM}_conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            fam,
            registry=None,
        )
        # pyproxy's own: how much restore input the last sync of each kind produced, which is
        # what partial syncs exist to keep small.
        self.restore_bytes = Gauge(
            "pyproxy_sync_restore_bytes",
            "Size in bytes of the iptables-restore input written by the last sync of each kind",
            [IP_FAMILY_LABEL, "kind"],
            registry=None,
        )

        # Upstream RegisterMetrics(mode): a core set for every mode, then per-mode extras.
        core: list[Collector] = [
            self.sync_proxy_rules_latency,
            self.sync_proxy_rules_last_queued_timestamp,
            self.sync_proxy_rules_last_timestamp,
            self.endpoint_changes_pending,
            self.endpoint_changes_total,
            self.service_changes_pending,
            self.service_changes_total,
            self.proxy_healthz_total,
            self.proxy_livez_total,
            self.network_programming_latency,
            self.no_local_endpoints_total,
            self.conntrack_reconciler_latency,
            self.conntrack_reconciler_deleted_total,
        ]
        per_mode: dict[str, list[Collector]] = {
            "iptables": [
                self.sync_full_proxy_rules_latency,
                self.sync_partial_proxy_rules_latency,
                self.iptables_restore_failures_total,
                self.iptables_partial_restore_failures_total,
                self.iptables_rules_total,
                self.iptables_rules_last_sync,
                self.restore_bytes,
            ],
            "ipvs": [self.iptables_restore_failures_total, self.restore_bytes],
            "nftables": [
                self.sync_full_proxy_rules_latency,
                self.sync_partial_proxy_rules_latency,
                self.nftables_sync_failures_total,
                self.nftables_cleanup_failures_total,
            ],
        }
        if nfacct is not None:
            # Upstream registers these only in iptables mode and only if nfacct.New() worked.
            per_mode["iptables"][:0] = [
                NfacctCollector(
                    nfacct,
                    CT_STATE_INVALID_DROPPED_NFACCT_COUNTER,
                    f"{_SUBSYSTEM}_iptables_ct_state_invalid_dropped_packets_total",
                    "packets dropped by iptables to work around conntrack problems",
                ),
                NfacctCollector(
                    nfacct,
                    LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER,
                    f"{_SUBSYSTEM}_iptables_localhost_nodeports_accepted_packets_total",
                    "Number of packets accepted on nodeports of loopback interface",
                ),
            ]
        for collector in [*core, *per_mode.get(mode, [])]:
            self.registry.register(collector)

    def render(self) -> bytes:
        """The Prometheus text exposition of every registered metric, as /metrics serves it."""
        return generate_latest(_WithoutCreated(self.registry))


class NfacctCollector(Collector):
    """One nfacct counter's packet count, read from the kernel at every scrape.

    As upstream's nfacctMetricCollector: a counter that cannot be read (not created, nfacct
    gone) is logged and left out of that scrape rather than reported as 0."""

    def __init__(self, client: NfacctClient, counter: str, name: str, documentation: str) -> None:
        self._client = client
        self._counter = counter
        self._name = name
        self._documentation = documentation

    def describe(self) -> list[Metric]:
        # Registering must not touch the kernel; the name is all the registry checks.
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        try:
            counter = self._client.get(self._counter)
        except KernelError as err:
            logger.error("failed to collect nfacct counter", counter=self._counter, error=str(err))
            return
        if counter is None:
            logger.error("nfacct counter not found", counter=self._counter)
            return
        yield CounterMetricFamily(self._name, self._documentation, value=counter.packets)


class _WithoutCreated(Collector):
    """The registry's metrics minus prometheus_client's `*_created` series.

    kube-proxy (Go client) exports no such series, and prometheus_client's switch for them
    (`disable_created_metrics`) is process-global, so they are filtered here instead.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            kept.samples = [s for s in metric.samples if s.name != created]
            yield kept


class MetricsServer(HTTPService):
    """`/metrics`, `/proxyMode` and `/healthz` on `--metrics-bind-address`, like kube-proxy.

    An empty bind address disables the server (start and stop do nothing).
    """

    def __init__(self, metrics: Metrics, proxy_mode: str, bind_address: str = "127.0.0.1:10249"):
        self._metrics = metrics
        self._proxy_mode = proxy_mode
        super().__init__(
            "metrics",
            bind_address,
            {
                "/metrics": self._serve_metrics,
                "/proxyMode": self._serve_proxy_mode,
                # component-base healthz.InstallHandler with no checks: always "ok".
                "/healthz": self._serve_ok,
            },
        )

    def _serve_metrics(self) -> HTTPResponse:
        return HTTPResponse(200, {"Content-Type": CONTENT_TYPE_METRICS}, self._metrics.render())

    def _serve_proxy_mode(self) -> HTTPResponse:
        return HTTPResponse(200, _TEXT_HEADERS, self._proxy_mode.encode())

    def _serve_ok(self) -> HTTPResponse:
        return HTTPResponse(200, _TEXT_HEADERS, b"ok")


_TEXT_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}
