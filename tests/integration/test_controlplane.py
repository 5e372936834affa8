"""Smoke tests of the test control plane itself (tests/netlab/controlplane.py).

They prove the three things pyproxy's integration tests build on: objects written through the API
come back (also to the kube-proxy identity, which RBAC limits to reading), the API server can go
away and come back with the same data, and a watch from a compacted resourceVersion gets 410 Gone.
"""

from __future__ import annotations

import json

import kubernetes
import pytest
import urllib3
from kubernetes.client import (
    CoreV1Api,
    DiscoveryV1Api,
    DiscoveryV1EndpointPort,
    V1ObjectMeta,
    V1Service,
    V1ServicePort,
    V1ServiceSpec,
)
from kubernetes.client.rest import ApiException
from netlab.controlplane import ControlPlane, api_client

pytestmark = pytest.mark.integration


def _service(name: str) -> V1Service:
    return V1Service(
        metadata=V1ObjectMeta(name=name),
        spec=V1ServiceSpec(
            selector={"app": name},
            ports=[V1ServicePort(name="http", port=80, target_port=8080, protocol="TCP")],
        ),
    )


def _endpoint_slice(service: str) -> kubernetes.client.V1EndpointSlice:
    return kubernetes.client.V1EndpointSlice(
        metadata=V1ObjectMeta(
            name=f"{service}-1",
            labels={
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "pyproxy-tests",
            },
        ),
        address_type="IPv4",
        endpoints=[
            kubernetes.client.V1Endpoint(
                addresses=["10.244.1.5"],
                conditions=kubernetes.client.V1EndpointConditions(ready=True),
                node_name="node-a",
            )
        ],
        ports=[DiscoveryV1EndpointPort(name="http", port=8080, protocol="TCP")],
    )


def test_service_and_endpointslice_round_trip(control_plane: ControlPlane, namespace: str) -> None:
    with api_client(control_plane.kubeconfig_admin) as admin:
        created = CoreV1Api(admin).create_namespaced_service(namespace, _service("web"))
        DiscoveryV1Api(admin).create_namespaced_endpoint_slice(namespace, _endpoint_slice("web"))
    assert created.spec.cluster_ip.startswith("10.96.")

    # Read back as kube-proxy would: the system:kube-proxy user, all namespaces.
    with api_client(control_plane.kubeconfig_proxy) as proxy:
        services = CoreV1Api(proxy).list_service_for_all_namespaces()
        slices = DiscoveryV1Api(proxy).list_endpoint_slice_for_all_namespaces(
            label_selector="kubernetes.io/service-name=web"
        )
        CoreV1Api(proxy).list_node()
    [web] = [s for s in services.items if s.metadata.namespace == namespace]
    assert web.spec.cluster_ip == created.spec.cluster_ip
    assert web.spec.ports[0].target_port == 8080
    [web_slice] = [s for s in slices.items if s.metadata.namespace == namespace]
    assert web_slice.endpoints[0].addresses == ["10.244.1.5"]
    assert web_slice.ports[0].port == 8080


def test_proxy_identity_is_read_only(control_plane: ControlPlane, namespace: str) -> None:
    with api_client(control_plane.kubeconfig_proxy) as proxy, pytest.raises(ApiException) as denied:
        CoreV1Api(proxy).create_namespaced_service(namespace, _service("nope"))
    assert denied.value.status == 403


def test_apiserver_restart_keeps_data(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.stop_apiserver()
    try:
        with (
            api_client(control_plane.kubeconfig_admin) as admin,
            pytest.raises(urllib3.exceptions.MaxRetryError, match="Connection refused"),
        ):
            CoreV1Api(admin).list_namespace(_request_timeout=2)
    finally:
        control_plane.start_apiserver()
    with api_client(control_plane.kubeconfig_admin) as admin:
        names = [ns.metadata.name for ns in CoreV1Api(admin).list_namespace().items]
    assert namespace in names


def test_compacted_resource_version_is_gone(control_plane: ControlPlane, namespace: str) -> None:
    """After compaction and an API server restart, an old resourceVersion gets 410 Gone.

    The restart drops the watch cache (which would otherwise keep serving the old watch);
    the exact list at the old version proves etcd itself no longer has it.
    """
    with api_client(control_plane.kubeconfig_admin) as admin:
        core = CoreV1Api(admin)
        old_rv = core.create_namespaced_service(
            namespace, _service("old")
        ).metadata.resource_version
        core.create_namespaced_service(namespace, _service("new"))
        assert control_plane.compact_etcd() > int(old_rv)
        control_plane.stop_apiserver()
        control_plane.start_apiserver()

        response = core.list_namespaced_service(
            namespace, watch=True, resource_version=old_rv, timeout_seconds=5,
            _preload_content=False,
        )  # fmt: skip
        try:
            first_line = response.readline()
        finally:
            response.release_conn()
        event = json.loads(first_line)
        assert event["type"] == "ERROR"
        assert event["object"]["code"] == 410

        with pytest.raises(ApiException) as gone:
            core.list_namespaced_service(
                namespace, resource_version=old_rv, resource_version_match="Exact"
            )
        assert gone.value.status == 410
