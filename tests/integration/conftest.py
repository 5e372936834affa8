"""Fixtures for integration tests: one real control plane per session, a fresh namespace per test.

The control plane comes from hack/build-control-plane.sh's cache. When it is missing the fixture
fails the test with the reason (integration tests are never skipped silently); it never builds.
Set PYPROXY_KEEP_CONTROL_PLANE=1 to keep its directory (certificates, kubeconfigs, logs); it is
always kept when the control plane fails to start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from netlab.controlplane import ControlPlane, ControlPlaneError, api_client, find_bin_dir


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver on 127.0.0.1, shared by every test of the session."""
    bin_dir = _bin_dir()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-control-plane-"))
    keep = os.environ.get("PYPROXY_KEEP_CONTROL_PLANE", "") not in ("", "0")
    cp = ControlPlane(workdir, bin_dir)
    try:
        cp.start()
    except ControlPlaneError as e:
        raise pytest.fail.Exception(
            f"control plane did not start: {e}\n(its files are kept in {workdir})", pytrace=False
        ) from None
    try:
        yield cp
    finally:
        cp.stop()
        if keep:
            print(f"\ncontrol plane files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _bin_dir() -> Path:
    try:
        return find_bin_dir()
    except ControlPlaneError as e:
        raise pytest.fail.Exception(f"control plane unavailable: {e}", pytrace=False) from None


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    """An admin API client for the test's own objects."""
    with api_client(control_plane.kubeconfig_admin) as client:
        yield client


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A namespace created for this test through the API and deleted after it."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    with api_client(control_plane.kubeconfig_admin) as client:
        core = kubernetes.client.CoreV1Api(client)
        ns = kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
        core.create_namespace(ns)
        try:
            yield name
        finally:
            _delete_namespace(client, name)


def _delete_namespace(client: kubernetes.client.ApiClient, name: str) -> None:
    """Delete a namespace and what pyproxy watches in it, now, without a controller manager.

    No namespace controller runs here, so do its job for the kinds a proxy sees: delete the
    Services and EndpointSlices (other tests' proxies must not see them), then clear the
    namespace's finalizer so it disappears instead of staying Terminating.
    """
    core = kubernetes.client.CoreV1Api(client)
    core.delete_namespace(name)  # Terminating: nothing new can be created in it
    core.delete_collection_namespaced_service(name)
    kubernetes.client.DiscoveryV1Api(client).delete_collection_namespaced_endpoint_slice(name)
    unfinalized = kubernetes.client.V1Namespace(
        metadata=kubernetes.client.V1ObjectMeta(name=name),
        spec=kubernetes.client.V1NamespaceSpec(finalizers=[]),
    )
    core.replace_namespace_finalize(name, unfinalized)
