"""The controller in ipvs mode against a real kube-apiserver + etcd, end to end, in the VM.

The control plane (the same binaries as the integration tier) runs inside the VM; pyproxy runs
with --proxy-mode ipvs in netlab's node-a namespace and reaches the apiserver through the same
loopback bridge as the integration tests (tests/integration/agent.py). Objects are created through
the API; real packets check which endpoints answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from integration.agent import (
    A1,
    B1,
    answers,
    eventually,
    make_service,
    running_agent,
    set_endpoints,
)
from netlab import Cluster
from netlab.controlplane import ControlPlane, api_client, find_bin_dir
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ip_vs")]

#: Everything is slower under emulation (no KVM): generous, bounded waits.
VM_WAIT = 180.0

vm_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("cp"), find_bin_dir())
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def test_controller_programs_ipvs_end_to_end(
    vm_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path
) -> None:
    with api_client(control_plane.kubeconfig_admin) as api:
        ns = f"vm-{uuid.uuid4().hex[:8]}"
        kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
        with running_agent(
            vm_cluster,
            control_plane.server,
            control_plane.kubeconfig_proxy,
            tmp_path,
            extra=["--proxy-mode", "ipvs"],
        ) as agent:
            make_service(api, ns, "web", "10.96.1.10")
            set_endpoints(api, ns, "web", [(A1, "node-a"), (B1, "node-b")])
            pod = vm_cluster.pod("a2")
            eventually(
                lambda: answers(pod, "10.96.1.10", 80, 20) == {"a1", "b1"}, VM_WAIT, "2 endpoints"
            )
            table = agent.node.run(["ipvsadm", "-Ln"]).stdout
            assert "10.96.1.10:80" in table and f"{A1}:8080" in table
            assert "KUBE-SERVICES" in agent.save()

            set_endpoints(api, ns, "web", [(B1, "node-b")])
            eventually(lambda: answers(pod, "10.96.1.10", 80, 10) == {"b1"}, VM_WAIT, "1 endpoint")
            kubernetes.client.CoreV1Api(api).delete_namespaced_service("web", ns)
            eventually(
                lambda: "10.96.1.10:80" not in agent.node.run(["ipvsadm", "-Ln"]).stdout,
                VM_WAIT,
                "virtual server removed",
            )
