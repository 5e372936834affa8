"""Cluster state from the Kubernetes API: Services, EndpointSlices and this node's Node.

The official client does configuration and authentication only (kubeconfig or in-cluster
service account, exec/token refresh, TLS and client certificates, proxies); the list+watch is
`pyproxy.sources.watch.ListWatch` over the client's urllib3 pool, decoding with orjson. The
client's model classes are never built: they cost several times orjson's decode time.

What is watched, as kube-proxy's informers do (cmd/kube-proxy/app/server.go):

    Service        /api/v1/services                        !service-proxy-name,!headless
    EndpointSlice  /apis/discovery.k8s.io/v1/endpointslices  !service-proxy-name,!headless
    Node           /api/v1/nodes  fieldSelector=metadata.name=NODE
    ServiceCIDR    /apis/networking.k8s.io/v1/servicecidrs  (nftables mode only)

kube-proxy watches ServiceCIDRs for its nftables mode, which drops traffic to the addresses of
the service ranges no Service has; the other modes have no use for them, so pyproxy lists them
only there (and a cluster role without `servicecidrs` still works for the other modes).

The consumer only records what changed (like upstream's OnServiceUpdate handlers); all work
happens in the sync loop, which must not program anything before `has_synced()`.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final, Literal, Protocol

import kubernetes
import urllib3

from pyproxy.errors import ConfigError
from pyproxy.model import LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME
from pyproxy.sources.watch import (
    DEFAULT_BACKOFF,
    LIST_PAGE_SIZE,
    ApiConnection,
    ApiObject,
    BackoffPolicy,
    ListWatch,
)

Kind = Literal["Service", "EndpointSlice", "Node", "ServiceCIDR"]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
_EVENT_TYPES: Final[dict[str, EventType]] = {
    "ADDED": "ADDED",
    "MODIFIED": "MODIFIED",
    "DELETED": "DELETED",
}

PROXY_LABEL_SELECTOR: Final = f"!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"
"""kube-proxy's informer selector, for Services and EndpointSlices alike: another proxy's
objects (service.kubernetes.io/service-proxy-name) and headless ones are never even sent."""

SERVICES_PATH: Final = "/api/v1/services"
ENDPOINT_SLICES_PATH: Final = "/apis/discovery.k8s.io/v1/endpointslices"
NODES_PATH: Final = "/api/v1/nodes"
SERVICE_CIDRS_PATH: Final = "/apis/networking.k8s.io/v1/servicecidrs"


class Consumer(Protocol):
    """Receives the raw API objects; implemented by the controller.

    Calls come from one thread per kind, so the consumer is responsible for its own
    locking. Keep the methods short (record the change, wake the sync loop): a slow consumer
    delays that kind's watch. `on_replace` runs with the cyclic GC paused (gcpause.gc_paused), so
    converting a big list right there is cheap. An exception makes that kind relist after a
    backoff and deliver `on_replace` again, so a consumer can recover from its own bug, but it
    is logged as an error.
    """

    def on_replace(self, kind: Kind, objects: list[ApiObject]) -> None:
        """The complete set of `kind` now in the API (first list, or a relist after 410 Gone);
        objects of that kind not in `objects` are gone."""

    def on_event(self, kind: Kind, event_type: EventType, obj: ApiObject) -> None:
        """One ADDED, MODIFIED or DELETED object of `kind` (DELETED carries the last state)."""


def load_configuration(kubeconfig: str | None) -> kubernetes.client.Configuration:
    """The client configuration from a kubeconfig file, or in-cluster when kubeconfig is None.

    Raises ConfigError with the reason (never the credentials) when neither works.
    """
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
        else:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    # Anything the loader raises (ConfigException, YAML, I/O, an exec plugin) means a bad config.
    except Exception as err:
        where = kubeconfig or "in-cluster service account"
        raise ConfigError(f"cannot load Kubernetes client configuration ({where}): {err}") from err
    # One streaming connection per watch plus lists; a pool smaller than that would open and
    # discard a connection on every request.
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 0, multiprocessing.cpu_count(), 6
    )
    return configuration


def _auth_headers(configuration: kubernetes.client.Configuration) -> Callable[[], dict[str, str]]:
    """The Authorization header per request. `auth_settings()` runs the client's refresh hook
    (exec plugins, expiring in-cluster tokens), which is not thread-safe: serialise it."""
    lock = threading.Lock()

    def headers() -> dict[str, str]:
        with lock:
            settings = configuration.auth_settings()
        result: dict[str, str] = {}
        for setting in settings.values():
            if not isinstance(setting, Mapping):
                continue
            key, value = setting.get("key"), setting.get("value")
            if setting.get("in") == "header" and isinstance(key, str) and isinstance(value, str):
                result[key] = value
        return result

    return headers


class ApiClientConnection(ApiConnection):
    """An ApiConnection over the official client's urllib3 pool; closes the client with it."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self._client = kubernetes.client.ApiClient(configuration)
        pool: urllib3.PoolManager = self._client.rest_client.pool_manager
        super().__init__(pool, configuration.host, _auth_headers(configuration))

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def connect(kubeconfig: str | None) -> ApiConnection:
    """An ApiConnection configured from a kubeconfig file, or in-cluster when None."""
    return ApiClientConnection(load_configuration(kubeconfig))


class _KindHandler:
    """Adapts one ListWatch's handler calls to the Consumer, adding the kind."""

    def __init__(self, kind: Kind, consumer: Consumer) -> None:
        self._kind: Kind = kind
        self._consumer = consumer

    def on_replace(self, objects: list[ApiObject]) -> None:
        self._consumer.on_replace(self._kind, objects)

    def on_event(self, event_type: str, obj: ApiObject) -> None:
        known = _EVENT_TYPES.get(event_type)
        if known is not None:
            self._consumer.on_event(self._kind, known, obj)


class KubeSource:
    """Lists and watches Services, EndpointSlices and this node's Node (and, with
    `service_cidrs`, ServiceCIDRs), feeding `consumer`.

    `kubeconfig` None means in-cluster configuration. Loading the configuration happens here,
    so a bad kubeconfig fails at construction (ConfigError); nothing is requested before
    `start()`. Pass `api` to use a ready connection instead (tests).
    """

    def __init__(
        self,
        kubeconfig: str | None,
        node_name: str,
        consumer: Consumer,
        *,
        api: ApiConnection | None = None,
        watch_timeout: float = 300.0,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        page_size: int = LIST_PAGE_SIZE,
        service_cidrs: bool = False,
    ) -> None:
        self.api = api if api is not None else connect(kubeconfig)
        self.node_name = node_name

        def list_watch(
            kind: Kind, path: str, *, label_selector: str = "", field_selector: str = ""
        ) -> ListWatch:
            return ListWatch(
                self.api,
                path,
                _KindHandler(kind, consumer),
                label_selector=label_selector,
                field_selector=field_selector,
                watch_timeout=watch_timeout,
                backoff=backoff,
                page_size=page_size,
            )

        self.watches: dict[Kind, ListWatch] = {
            "Service": list_watch("Service", SERVICES_PATH, label_selector=PROXY_LABEL_SELECTOR),
            "EndpointSlice": list_watch(
                "EndpointSlice", ENDPOINT_SLICES_PATH, label_selector=PROXY_LABEL_SELECTOR
            ),
            "Node": list_watch("Node", NODES_PATH, field_selector=f"metadata.name={node_name}"),
        }
        if service_cidrs:
            self.watches["ServiceCIDR"] = list_watch("ServiceCIDR", SERVICE_CIDRS_PATH)
        self._started = False

    def start(self) -> None:
        """Start the list+watch threads, one per kind (daemon threads; returns at once)."""
        if self._started:
            raise RuntimeError("KubeSource already started")
        self._started = True
        for watch in self.watches.values():
            watch.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the watches, close the connections; True when every thread ended in time."""
        for watch in self.watches.values():
            watch.request_stop()
        stopped = all(watch.stop(timeout) for watch in self.watches.values())
        self.api.close()
        return stopped

    def has_synced(self) -> bool:
        """True once the first complete list of each kind has reached the consumer."""
        return all(watch.has_synced() for watch in self.watches.values())

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until has_synced() (True) or the timeout passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for watch in self.watches.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not watch.wait_synced(remaining):
                return False
        return True
