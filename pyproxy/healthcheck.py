"""Proxy health as kube-proxy reports it: /healthz, /livez and per-Service health-check node ports.

Load balancers and kubelet probes already speak kube-proxy's health protocol, so pyproxy answers
it byte for byte (upstream `pkg/proxy/healthcheck/proxy_health.go` and `service_health.go`):

- `ProxyHealth` is the state: per IP family, when the oldest still-unsynced change was queued and
  when the last successful sync finished, plus whether this Node may receive traffic. The sync
  loop calls `queued_update` when a change arrives and `updated` after a successful sync (and once
  when it starts, as upstream's SyncLoop does; a family that was never `updated` is not judged).
  A family is unhealthy once a change has waited longer than `health_timeout` (2 x sync period).
- `HealthzServer` serves `/healthz` (healthy and Node eligible) and `/livez` (healthy) on
  `--healthz-bind-address` (default 0.0.0.0:10256).
- `ServiceHealthServer` opens one listener per healthCheckNodePort of the
  externalTrafficPolicy=Local Services and answers 200 while the Service has a local ready
  endpoint and the proxy is healthy, 503 otherwise, so cloud load balancers skip this node.

The HTTP plumbing is pyproxy.httpserver, shared with the metrics server.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

import structlog

from pyproxy.httpserver import JSON_HEADERS, HTTPResponse, HTTPService, Listener, Route
from pyproxy.model import IPAddress, IPFamily, NamespacedName, Node

if TYPE_CHECKING:
    from pyproxy.metrics import Metrics

logger = structlog.get_logger("pyproxy.healthcheck")

#: Seconds since the epoch, like time.time(); injected so tests control time.
Clock: TypeAlias = Callable[[], float]
#: A Service as the health-check server is told about it.
ServiceKey: TypeAlias = NamespacedName | tuple[str, str]

#: The taint the cluster autoscaler puts on a node it is about to delete.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

_GO_ZERO_TIME = "0001-01-01T00:00:00Z"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_go_time(t: float | None) -> str:
    """A time as Go's encoding/json prints a time.Time (RFC 3339 with up to 9 fraction digits,
    trailing zeros dropped), in UTC; None is Go's zero time, which upstream prints when no
    family has synced yet. Python floats carry microseconds, so at most 6 digits appear."""
    if t is None:
        return _GO_ZERO_TIME
    micros = round(t * 1_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    text = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + f"{fraction:06d}".rstrip("0")
    return text + "Z"


@dataclass(frozen=True, slots=True)
class ProxierHealth:
    """Health of the proxier of one IP family."""

    last_updated: float
    healthy: bool


@dataclass(frozen=True, slots=True)
class Health:
    """One reading of ProxyHealth (upstream's ProxyHealth struct, without nodeEligible)."""

    healthy: bool
    #: The most recent `updated` of any family; None before the first one.
    last_updated: float | None
    current_time: float
    status: Mapping[IPFamily, ProxierHealth]

    def to_json(self, *, node_eligible: bool | None = None) -> dict[str, object]:
        """Upstream's JSON, in its field order; nodeEligible only when given (/healthz).

        As upstream (for compatibility with releases where lastUpdated meant "the sync loop
        ran"), the top-level lastUpdated is the current time whenever the response is healthy.
        """
        response_healthy = self.healthy and node_eligible is not False
        body: dict[str, object] = {
            "lastUpdated": format_go_time(
                self.current_time if response_healthy else self.last_updated
            ),
            "currentTime": format_go_time(self.current_time),
        }
        if node_eligible is not None:
            body["nodeEligible"] = node_eligible
        body["healthy"] = self.healthy
        if self.status:
            # Go marshals map keys sorted.
            body["status"] = {
                family.value: {
                    "lastUpdated": format_go_time(proxier.last_updated),
                    "healthy": proxier.healthy,
                }
                for family, proxier in sorted(self.status.items(), key=lambda kv: kv[0].value)
            }
        return body


class ProxyHealth:
    """The proxy's health state. Thread-safe: the sync loop writes, HTTP threads read."""

    def __init__(
        self, health_timeout: float, *, clock: Clock | None = None, node_eligible: bool = True
    ) -> None:
        """health_timeout: seconds, 2 x the sync period as kube-proxy passes it.

        node_eligible starts True: the node is eligible while pyproxy starts up, until the
        first Node event says otherwise (upstream's original semantics)."""
        self.health_timeout = health_timeout
        self._clock = clock if clock is not None else time.time
        self._lock = threading.Lock()
        self._last_updated: dict[IPFamily, float] = {}
        self._oldest_pending: dict[IPFamily, float] = {}
        self._node_eligible = node_eligible

    def now(self) -> float:
        return self._clock()

    def queued_update(self, family: IPFamily) -> None:
        """A change for `family` arrived and is not programmed yet (keeps the oldest time)."""
        now = self._clock()
        with self._lock:
            self._oldest_pending.setdefault(family, now)

    def updated(self, family: IPFamily) -> None:
        """The proxier of `family` finished a successful sync."""
        now = self._clock()
        with self._lock:
            self._oldest_pending.pop(family, None)
            self._last_updated[family] = now

    @property
    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    @node_eligible.setter
    def node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self._node_eligible = eligible

    def sync_node(self, node: Node | None) -> None:
        """Eligible unless the Node is gone, being deleted or tainted ToBeDeletedByCluster-
        Autoscaler (convert folds the last two into `Node.being_deleted`)."""
        self.node_eligible = node is not None and not node.being_deleted

    def health(self) -> Health:
        with self._lock:
            current = self._clock()
            status: dict[IPFamily, ProxierHealth] = {}
            for family, last in self._last_updated.items():
                pending = self._oldest_pending.get(family)
                # Healthy while fully synced, or while the oldest queued change is not late.
                late = pending is not None and current - pending >= self.health_timeout
                status[family] = ProxierHealth(last_updated=last, healthy=not late)
            return Health(
                healthy=all(p.healthy for p in status.values()),
                last_updated=max(self._last_updated.values(), default=None),
                current_time=current,
                status=status,
            )

    def is_healthy(self) -> bool:
        """The proxier's health, ignoring the Node (what health-check node ports report)."""
        return self.health().healthy

    def healthz(self) -> tuple[int, dict[str, object]]:
        """/healthz: 200 when healthy and the Node is eligible, else 503; and the JSON body."""
        eligible = self.node_eligible
        health = self.health()
        code = 200 if health.healthy and eligible else 503
        return code, health.to_json(node_eligible=eligible)

    def livez(self) -> tuple[int, dict[str, object]]:
        """/livez: like /healthz but ignoring the Node."""
        health = self.health()
        return (200 if health.healthy else 503), health.to_json()


def _json_response(code: int, body: object) -> HTTPResponse:
    # Go's json.Marshal output: compact, no trailing newline.
    return HTTPResponse(code, JSON_HEADERS, json.dumps(body, separators=(",", ":")).encode())


class HealthzServer(HTTPService):
    """/healthz and /livez on `--healthz-bind-address` (default 0.0.0.0:10256)."""

    def __init__(
        self,
        health: ProxyHealth,
        bind_address: str = "0.0.0.0:10256",
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._health = health
        self._metrics = metrics
        super().__init__(
            "healthz", bind_address, {"/healthz": self._serve_healthz, "/livez": self._serve_livez}
        )

    def _serve_healthz(self) -> HTTPResponse:
        code, body = self._health.healthz()
        if self._metrics is not None:
            self._metrics.proxy_healthz_total.labels(code=str(code)).inc()
        return _json_response(code, body)

    def _serve_livez(self) -> HTTPResponse:
        code, body = self._health.livez()
        if self._metrics is not None:
            self._metrics.proxy_livez_total.labels(code=str(code)).inc()
        return _json_response(code, body)


def _service_name(key: ServiceKey) -> NamespacedName:
    return key if isinstance(key, NamespacedName) else NamespacedName(*key)


def service_health_body(service: NamespacedName, local_endpoints: int, healthy: bool) -> bytes:
    """The health-check node port body, laid out exactly as upstream's dedented template."""
    return json.dumps(
        {
            "service": {"namespace": service.namespace, "name": service.name},
            "localEndpoints": local_endpoints,
            "serviceProxyHealthy": healthy,
        },
        indent="\t",
    ).encode()


class ServiceHealthServer:
    """One HTTP listener per healthCheckNodePort, on every node-port address.

    `sync_services` and `sync_endpoints` are called by the sync loop (one thread); requests
    are answered from other threads. Any path on the port gets the answer, as upstream.
    """

    def __init__(
        self, health: ProxyHealth, node_addresses: Iterable[IPAddress | str] | None = None
    ) -> None:
        """node_addresses: the IPs matching --nodeport-addresses; None listens on all."""
        self._health = health
        self._hosts: tuple[str, ...] = (
            ("",) if node_addresses is None else tuple(str(a) for a in node_addresses)
        )
        self._sync_lock = threading.Lock()  # serialises sync_services and stop
        self._lock = threading.Lock()  # guards what request threads read
        self._services: dict[int, NamespacedName] = {}
        self._local_endpoints: dict[NamespacedName, int] = {}
        self._listeners: dict[int, list[Listener]] = {}

    @property
    def ports(self) -> frozenset[int]:
        """The health-check node ports currently listening."""
        with self._sync_lock:
            return frozenset(self._listeners)

    def sync_services(self, services: Mapping[int, ServiceKey]) -> None:
        """Listen on exactly these ports: close the others, open the missing ones.

        A port that cannot be bound (in use, address gone) is logged and left closed; the next
        sync tries again. That never stops the other ports or the sync."""
        wanted = {port: _service_name(key) for port, key in services.items()}
        with self._sync_lock:
            with self._lock:
                self._services = wanted
            for port in sorted(set(self._listeners) - set(wanted)):
                logger.debug("closing health check node port", port=port)
                for listener in self._listeners.pop(port):
                    listener.close()
            for port, service in sorted(wanted.items()):
                if port in self._listeners:
                    continue
                opened = self._open(port, service)
                if opened:
                    self._listeners[port] = opened

    def _open(self, port: int, service: NamespacedName) -> list[Listener]:
        opened: list[Listener] = []
        route = self._route(port)
        for host in self._hosts:
            try:
                opened.append(Listener("hcnp", host, port, {}, fallback=route))
            except OSError as err:
                logger.error(
                    "failed to start health check node port, will retry on the next sync",
                    service=str(service),
                    port=port,
                    address=host or "*",
                    error=str(err),
                )
                # All or nothing per port, so a retry (or another owner) finds it free.
                for listener in opened:
                    listener.close()
                return []
        logger.debug("opened health check node port", service=str(service), port=port)
        return opened

    def sync_endpoints(
        self,
        local_endpoints: Mapping[NamespacedName, int] | Mapping[tuple[str, str], int],
    ) -> None:
        """The number of local ready endpoints per Service; Services not listed have none."""
        counts = {_service_name(key): count for key, count in local_endpoints.items()}
        with self._lock:
            self._local_endpoints = counts

    def _route(self, port: int) -> Route:
        def serve() -> HTTPResponse:
            with self._lock:
                service = self._services.get(port)
                count = self._local_endpoints.get(service, 0) if service is not None else 0
            if service is None:  # closed while this request was in flight
                return HTTPResponse(503, JSON_HEADERS, b"")
            healthy = self._health.is_healthy()
            headers = {**JSON_HEADERS, "X-Load-Balancing-Endpoint-Weight": str(count)}
            code = 200 if count > 0 and healthy else 503
            return HTTPResponse(code, headers, service_health_body(service, count, healthy))

        return serve

    def stop(self) -> None:
        """Close every listener (the sync loop is ending)."""
        with self._sync_lock:
            for listeners in self._listeners.values():
                for listener in listeners:
                    listener.close()
            self._listeners.clear()
