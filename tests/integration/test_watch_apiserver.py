"""KubeSource against the real kube-apiserver + etcd of the `control_plane` fixture.

The source runs with the `system:kube-proxy` kubeconfig (RBAC: system:node-proxier, exactly what
upstream kube-proxy may read), objects are written with the admin kubeconfig, and a small
thread-safe store applies what the source reports, so each test can wait until the store matches
what the API holds. Covered: list+watch of created, modified and deleted Services and
EndpointSlices; kube-proxy's selectors (other proxies' and headless objects never arrive; only
this node's Node does); an API server outage ridden out and resumed; a 410 Gone after etcd
compaction answered by a relist that drops what was deleted meanwhile.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
from netlab.controlplane import ControlPlane, api_client

from pyproxy.convert import endpoint_slice_from_api, node_from_api, service_from_api
from pyproxy.sources.kube import KubeSource
from pyproxy.sources.watch import BackoffPolicy

pytestmark = pytest.mark.integration

# Short backoff cap so the outage tests resume within seconds, not kube-proxy's 30 s.
FAST = BackoffPolicy(initial=0.2, maximum=1.0)
WAIT = 30.0
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"

Key = tuple[str, str, str]  # kind, namespace, name


class Store:
    """What a controller would keep: the objects per kind, as the source reported them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.objects: dict[Key, dict[str, Any]] = {}
        self.replaces: dict[str, int] = {}
        self.gate: threading.Event | None = None  # on_event blocks on it for gate_name
        self.gate_name = ""
        self.gate_reached = threading.Event()

    @staticmethod
    def key(kind: str, obj: dict[str, Any]) -> Key:
        meta = obj["metadata"]
        return kind, meta.get("namespace", ""), meta["name"]

    def on_replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        with self.cond:
            for key in [k for k in self.objects if k[0] == kind]:
                del self.objects[key]
            for obj in objects:
                self.objects[self.key(kind, obj)] = obj
            self.replaces[kind] = self.replaces.get(kind, 0) + 1
            self.cond.notify_all()

    def on_event(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        if self.gate is not None and obj["metadata"]["name"] == self.gate_name:
            self.gate_reached.set()
            self.gate.wait(60)
        with self.cond:
            if event_type == "DELETED":
                self.objects.pop(self.key(kind, obj), None)
            else:
                self.objects[self.key(kind, obj)] = obj
            self.cond.notify_all()

    def names(self, kind: str, namespace: str) -> set[str]:
        with self.cond:
            return {k[2] for k in self.objects if k[0] == kind and k[1] == namespace}

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}; store has {self.summary()}")

    def wait_names(self, kind: str, namespace: str, expected: set[str]) -> None:
        self.wait_until(
            lambda: self.names(kind, namespace) == expected, f"{kind}s {sorted(expected)}"
        )

    def summary(self) -> list[Key]:
        return sorted(self.objects)


# --- objects ------------------------------------------------------------------------------


def service(name: str, labels: dict[str, str] | None = None, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
    }


def endpoint_slice(
    name: str, service_name: str, ip: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "pyproxy-tests",
                **(labels or {}),
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


class Api:
    """Writes through the admin kubeconfig, with dict bodies."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.discovery = kubernetes.client.DiscoveryV1Api(client)
        self.ns = namespace

    def create_service(self, body: dict[str, Any]) -> None:
        self.core.create_namespaced_service(self.ns, body)

    def delete_service(self, name: str) -> None:
        self.core.delete_namespaced_service(name, self.ns)

    def set_service_port(self, name: str, port: int) -> None:
        patch = [{"op": "replace", "path": "/spec/ports/0/port", "value": port}]
        self.core.patch_namespaced_service(name, self.ns, patch)

    def create_slice(self, body: dict[str, Any]) -> None:
        self.discovery.create_namespaced_endpoint_slice(self.ns, body)

    def replace_slice_ip(self, name: str, ip: str) -> None:
        patch = [{"op": "replace", "path": "/endpoints/0/addresses", "value": [ip]}]
        self.discovery.patch_namespaced_endpoint_slice(name, self.ns, patch)

    def delete_slice(self, name: str) -> None:
        self.discovery.delete_namespaced_endpoint_slice(name, self.ns)


@pytest.fixture
def admin(control_plane: ControlPlane, namespace: str) -> Iterator[Api]:
    with api_client(control_plane.kubeconfig_admin) as client:
        yield Api(client, namespace)


@pytest.fixture
def node_name(control_plane: ControlPlane) -> Iterator[str]:
    """A Node object for this test's source (and another one it must not see)."""
    name = f"node-{uuid.uuid4().hex[:8]}"
    with api_client(control_plane.kubeconfig_admin) as client:
        core = kubernetes.client.CoreV1Api(client)
        for node in (name, f"{name}-other"):
            core.create_node(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": "z1"}},
                }
            )
        try:
            yield name
        finally:
            for node in (name, f"{name}-other"):
                core.delete_node(node)


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def source(control_plane: ControlPlane, node_name: str, store: Store) -> Iterator[KubeSource]:
    src = KubeSource(str(control_plane.kubeconfig_proxy), node_name, store, backoff=FAST)
    src.start()
    try:
        assert src.wait_synced(WAIT), "the first lists did not complete"
        yield src
    finally:
        if store.gate is not None:
            store.gate.set()
        assert src.stop(10.0), "KubeSource threads did not stop"


# --- tests --------------------------------------------------------------------------------


def test_sees_created_modified_and_deleted_services_and_slices(
    source: KubeSource, store: Store, admin: Api, namespace: str, node_name: str
) -> None:
    ns = namespace
    assert store.names("Node", "") == {node_name}  # fieldSelector: only this node

    admin.create_service(service("web"))
    admin.create_slice(endpoint_slice("web-1", "web", "10.244.1.5"))
    store.wait_names("Service", ns, {"web"})
    store.wait_names("EndpointSlice", ns, {"web-1"})

    # What arrives is what convert turns into the model.
    with store.cond:
        svc = service_from_api(store.objects[("Service", ns, "web")])
        eps = endpoint_slice_from_api(store.objects[("EndpointSlice", ns, "web-1")])
        node = node_from_api(store.objects[("Node", "", node_name)])
    assert svc is not None
    assert svc.ports[0].port == 80
    assert str(svc.cluster_ips[0]).startswith("10.96.")
    assert eps is not None
    assert [str(e.address) for e in eps.endpoints] == ["10.244.1.5"]
    assert node.name == node_name

    admin.set_service_port("web", 8081)
    admin.replace_slice_ip("web-1", "10.244.2.7")
    store.wait_until(
        lambda: store.objects[("Service", ns, "web")]["spec"]["ports"][0]["port"] == 8081,
        "the modified Service",
    )
    store.wait_until(
        lambda: (
            store.objects[("EndpointSlice", ns, "web-1")]["endpoints"][0]["addresses"]
            == ["10.244.2.7"]
        ),
        "the modified EndpointSlice",
    )

    admin.delete_slice("web-1")
    admin.delete_service("web")
    store.wait_names("EndpointSlice", ns, set())
    store.wait_names("Service", ns, set())
    assert store.replaces == {"Service": 1, "EndpointSlice": 1, "Node": 1}


def test_objects_of_other_proxies_and_headless_slices_are_never_seen(
    source: KubeSource, store: Store, admin: Api, namespace: str
) -> None:
    other = {PROXY_NAME_LABEL: "some-other-proxy"}
    admin.create_service(service("theirs", labels=other))
    admin.create_slice(endpoint_slice("theirs-1", "theirs", "10.244.1.9", labels=other))
    admin.create_service(service("headless-labelled", labels={HEADLESS_LABEL: ""}))
    admin.create_slice(
        endpoint_slice("hl-1", "headless-labelled", "10.244.1.8", labels={HEADLESS_LABEL: ""})
    )
    # Created last: once these have arrived, the earlier ones would have too (events are
    # delivered in resourceVersion order per resource).
    admin.create_service(service("ours"))
    admin.create_slice(endpoint_slice("ours-1", "ours", "10.244.1.7"))
    store.wait_names("Service", namespace, {"ours"})
    store.wait_names("EndpointSlice", namespace, {"ours-1"})


def test_survives_an_api_server_outage_and_resumes(
    control_plane: ControlPlane, source: KubeSource, store: Store, admin: Api, namespace: str
) -> None:
    admin.create_service(service("before"))
    admin.create_service(service("doomed"))
    store.wait_names("Service", namespace, {"before", "doomed"})

    control_plane.stop_apiserver()
    try:
        time.sleep(4)  # several failed reconnects, at the backoff cap by now
        assert all(w._thread is not None and w._thread.is_alive() for w in source.watches.values())
        assert source.has_synced()  # stays true: the consumer keeps its last state
    finally:
        control_plane.start_apiserver()

    admin.create_service(service("after"))
    admin.set_service_port("before", 8080)
    admin.delete_service("doomed")
    store.wait_names("Service", namespace, {"before", "after"})
    store.wait_until(
        lambda: store.objects[("Service", namespace, "before")]["spec"]["ports"][0]["port"] == 8080,
        "the Service modified after the restart",
    )
    admin.create_slice(endpoint_slice("after-1", "after", "10.244.3.3"))
    store.wait_names("EndpointSlice", namespace, {"after-1"})


def test_gone_after_compaction_relists_and_loses_nothing(
    control_plane: ControlPlane, source: KubeSource, store: Store, admin: Api, namespace: str
) -> None:
    """The Service watch is held (its consumer blocks) while objects change, etcd is compacted
    and the API server restarts: resuming from the held resourceVersion gets 410 Gone, and the
    relist must bring the new object and drop the one deleted meanwhile."""
    admin.create_service(service("kept"))
    admin.create_service(service("deleted-while-away"))
    store.wait_names("Service", namespace, {"kept", "deleted-while-away"})
    services = source.watches["Service"]
    lists_before = services.lists

    store.gate = threading.Event()
    store.gate_name = "gate"
    admin.create_service(service("gate"))
    assert store.gate_reached.wait(WAIT), "the Service watch did not deliver the gate event"
    stale_version = services.resource_version  # the version before the gate event

    # With the Service watch thread stuck in the consumer, its stream dies with the API
    # server; everything below happens where that watch cannot see it.
    control_plane.stop_apiserver()
    control_plane.start_apiserver()
    admin.delete_service("deleted-while-away")
    admin.create_service(service("created-while-away"))
    control_plane.compact_etcd()
    control_plane.stop_apiserver()  # a new watch cache, starting after the compaction
    control_plane.start_apiserver()

    store.gate.set()  # resume from the stale version: 410 Gone, then a relist
    store.wait_names("Service", namespace, {"kept", "gate", "created-while-away"})
    assert services.lists == lists_before + 1
    assert store.replaces["Service"] == lists_before + 1
    assert int(services.resource_version) > int(stale_version)

    # And the relisted watch is live.
    admin.create_service(service("after-relist"))
    store.wait_names("Service", namespace, {"kept", "gate", "created-while-away", "after-relist"})


def test_stop_is_prompt_while_watches_are_idle(
    control_plane: ControlPlane, node_name: str, store: Store
) -> None:
    src = KubeSource(str(control_plane.kubeconfig_proxy), node_name, store, backoff=FAST)
    src.start()
    assert src.wait_synced(WAIT)
    time.sleep(0.5)  # all three blocked in their watch reads
    started = time.monotonic()
    assert src.stop(5.0)
    assert time.monotonic() - started < 2.0
