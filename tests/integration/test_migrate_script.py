"""hack/migrate.sh against the real kube-apiserver and DaemonSet controller.

No kubelet runs here, so no proxy pod ever starts (test_migration.py covers the dataplane); what
this proves is the script's API side: it keeps kube-proxy's DaemonSet (stopped by a nodeSelector
no node matches) for the rollback, deploys and removes pyproxy with `kubectl apply/delete -k`,
waits for real DaemonSet rollouts (kube-controller-manager's daemonset controller runs, with no
Node, so a rollout completes once the controller has observed it), and every direction can run
twice: issue 16's rollback step `kubectl delete -k` exited 1 because the DaemonSet was already
deleted; the script's runs must all exit 0 (the plain command is run too, and still fails).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab.controlplane import ControlPlane
from test_manifests import KUBECTL_TIMEOUT, describe, find_tool, kubectl

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "migrate.sh"
MANIFESTS = REPO_ROOT / "manifests"
PAUSE_LABEL = "pyproxy-migration/kube-proxy-stopped"


def kube_proxy_objects(mode: str) -> str:
    """kubeadm's kube-proxy DaemonSet and ConfigMap, trimmed to what the script reads."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
                    "data": {
                        "config.conf": f"apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                        f"kind: KubeProxyConfiguration\nmode: {mode}\n"
                    },
                },
                {
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "metadata": {
                        "name": "kube-proxy",
                        "namespace": "kube-system",
                        "labels": {"k8s-app": "kube-proxy"},
                    },
                    "spec": {
                        "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
                        "template": {
                            "metadata": {"labels": {"k8s-app": "kube-proxy"}},
                            "spec": {
                                "hostNetwork": True,
                                "nodeSelector": {"kubernetes.io/os": "linux"},
                                "containers": [
                                    {
                                        "name": "kube-proxy",
                                        "image": "registry.k8s.io/kube-proxy:v1.34.4",
                                        "command": ["/usr/local/bin/kube-proxy"],
                                    }
                                ],
                            },
                        },
                    },
                },
            ],
        }
    )


@pytest.fixture
def controller_manager(control_plane: ControlPlane, tmp_path: Path) -> Iterator[None]:
    """kube-controller-manager with only the daemonset controller (rollout status needs it)."""
    log = (tmp_path / "kcm.log").open("wb")
    proc = subprocess.Popen(
        [
            str(control_plane.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={control_plane.kubeconfig_admin}",
            "--controllers=daemonset",
            "--leader-elect=false",
            "--secure-port=0",
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print((tmp_path / "kcm.log").read_text(errors="replace")[-3000:])


def migrate(
    control_plane: ControlPlane, backup: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    kubectl_path = find_tool("kubectl", "the script runs kubectl")
    env = {
        **os.environ,
        "KUBECTL": f"{kubectl_path} --kubeconfig {control_plane.kubeconfig_admin}",
        "BACKUP_DIR": str(backup),
        "TIMEOUT": "120",
    }
    proc = subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=4 * KUBECTL_TIMEOUT,
        check=False,
    )
    print(f"$ hack/migrate.sh {' '.join(args)}  # exit {proc.returncode}\n{proc.stderr}")
    return proc


def daemonset(control_plane: ControlPlane, name: str) -> dict[str, object] | None:
    proc = kubectl(
        control_plane.kubeconfig_admin,
        "-n",
        "kube-system",
        "get",
        "daemonset",
        name,
        "--ignore-not-found",
        "-o",
        "json",
    )
    assert proc.returncode == 0, describe(proc)
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def node_selector(ds: dict[str, object] | None) -> dict[str, str]:
    assert ds is not None
    return ds["spec"]["template"]["spec"]["nodeSelector"]  # type: ignore[index, no-any-return]


def test_migrate_script_both_ways_twice(
    control_plane: ControlPlane, controller_manager: None, tmp_path: Path
) -> None:
    admin = control_plane.kubeconfig_admin
    nodes = kubectl(admin, "get", "nodes", "-o", "name")
    assert nodes.stdout.strip() == "", "another test left Nodes: DaemonSet pods would never run"
    created = kubectl(admin, "create", "-f", "-", stdin=kube_proxy_objects("iptables"))
    assert created.returncode == 0, describe(created)
    backup = tmp_path / "backup"
    try:
        for attempt in (1, 2):
            run = migrate(control_plane, backup, "to-pyproxy")
            assert run.returncode == 0, f"to-pyproxy #{attempt}:\n{describe(run)}"
            assert node_selector(daemonset(control_plane, "kube-proxy")) == {
                "kubernetes.io/os": "linux",
                PAUSE_LABEL: "true",
            }
            assert daemonset(control_plane, "pyproxy") is not None
        saved = (backup / "daemonset.yaml").read_text()
        assert "name: kube-proxy" in saved and PAUSE_LABEL not in saved  # saved before the patch
        assert "mode: iptables" in (backup / "configmap.yaml").read_text()

        for attempt in (1, 2):
            run = migrate(control_plane, backup, "to-kube-proxy")
            assert run.returncode == 0, f"to-kube-proxy #{attempt}:\n{describe(run)}"
            assert daemonset(control_plane, "pyproxy") is None
            assert node_selector(daemonset(control_plane, "kube-proxy")) == {
                "kubernetes.io/os": "linux"
            }
            config = kubectl(admin, "-n", "kube-system", "get", "configmap", "pyproxy-config")
            assert config.returncode != 0 and "NotFound" in config.stderr
        # The old procedure's last rollback step, on what is left now: still exit 1.
        plain = kubectl(admin, "delete", "-k", str(MANIFESTS))
        assert plain.returncode != 0 and "NotFound" in plain.stderr

        # kube-proxy in ipvs mode: refused before anything changes.
        patched = kubectl(
            admin,
            "-n",
            "kube-system",
            "create",
            "configmap",
            "kube-proxy",
            "--dry-run=client",
            "-o",
            "json",
            "--from-literal=config.conf=mode: ipvs\n",
        )
        assert patched.returncode == 0, describe(patched)
        replaced = kubectl(admin, "replace", "-f", "-", stdin=patched.stdout)
        assert replaced.returncode == 0, describe(replaced)
        run = migrate(control_plane, backup, "to-pyproxy")
        assert run.returncode == 1 and "ipvs mode" in run.stderr, describe(run)
        assert node_selector(daemonset(control_plane, "kube-proxy")) == {
            "kubernetes.io/os": "linux"
        }
        assert daemonset(control_plane, "pyproxy") is None
    finally:
        kubectl(admin, "delete", "-k", str(MANIFESTS), "--ignore-not-found", "--wait=false")
        kubectl(
            admin,
            "-n",
            "kube-system",
            "delete",
            "daemonset,configmap",
            "kube-proxy",
            "--ignore-not-found",
            "--wait=false",
        )
