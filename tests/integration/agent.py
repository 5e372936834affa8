"""pyproxy as a node agent in a netlab node namespace, talking to a real apiserver.

Shared by the integration tier and the vm tier (IPVS). pyproxy reaches the API server through a
loopback bridge: socat listens on 127.0.0.1:<apiserver port> inside the node namespace and
forwards over a Unix socket to socat on the host, which connects to the apiserver on the host's
127.0.0.1. No traffic leaves loopback and the namespaces the tests create.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import kubernetes
from netlab import Cluster, Reply, tcp_ask

CLUSTER_CIDRS = "10.244.0.0/16"
A1, A2, B1 = "10.244.1.11", "10.244.1.12", "10.244.2.11"
NODE_A = "172.30.0.2"


def eventually(
    check: Callable[[], bool],
    timeout: float = 15.0,
    what: str = "",
    *,
    explain: Callable[[], str] | None = None,
) -> None:
    """Poll `check` until it holds; on timeout fail with `what` and, if given, `explain()` (the
    state that lets a rare failure be understood from CI's output alone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    detail = f"\n{explain()}" if explain is not None else ""
    raise AssertionError(f"not true within {timeout} s: {what or check}{detail}")


class Agent:
    """pyproxy running in node-a, with its log."""

    def __init__(
        self, cluster: Cluster, kubeconfig: Path, workdir: Path, extra: Sequence[str] = ()
    ) -> None:
        self.extra = tuple(extra)
        self.cluster = cluster
        self.node = cluster.node("a")
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "pyproxy.log"

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "pyproxy",
            "--kubeconfig",
            str(self.kubeconfig),
            "--hostname-override",
            "node-a",
            "--node-ip",
            NODE_A,
            "--cluster-cidr",
            CLUSTER_CIDRS,
            "--iptables-backend",
            "nft",
            "--iptables-min-sync-period",
            "0",
            "--iptables-sync-period",
            "30s",
            "--healthz-bind-address",
            "0.0.0.0:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            *self.extra,
        ]
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.node.name, *argv], stdout=log, stderr=log
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self.proc = None
        return code

    def save(self) -> str:
        return self.node.run(["iptables-nft-save"]).stdout

    def diagnose(self, probe: Callable[[], object] | None = None) -> str:
        """What a failed packet check needs explaining: the last probe's answers, the node's
        rules and conntrack table, the client's routes, route cache and ICMP counters."""
        parts = [] if probe is None else [f"probe now: {probe()!r}"]
        client = self.cluster.client
        for label, where, argv in (
            ("node-a nat", self.node, ["iptables-nft-save", "-t", "nat"]),
            ("node-a filter", self.node, ["iptables-nft-save", "-t", "filter"]),
            ("node-a conntrack", self.node, ["conntrack", "-L"]),
            ("client routes", client, ["ip", "route", "show", "table", "all"]),
            # Route exceptions (a taken ICMP redirect, a learnt MTU): not in the tables above.
            ("client route cache", client, ["ip", "route", "show", "cache"]),
            ("client neighbours", client, ["ip", "neigh"]),
            ("client ICMP", client, ["nstat", "-az", "Icmp*"]),
        ):
            res = where.run(argv, check=False)
            parts.append(f"--- {label}\n{res.stdout}{res.stderr}")
        return "\n".join(parts)

    def get(self, url: str) -> tuple[int, str]:
        out = self.node.run(
            ["curl", "-s", "--noproxy", "*", "-o", "-", "-w", "\n%{http_code}", url], check=False
        ).stdout
        body, _, code = out.rpartition("\n")
        return int(code or 0), body

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_agent(
    cluster: Cluster,
    server: str,
    kubeconfig: Path,
    workdir: Path,
    extra: Sequence[str] = (),
    *,
    host_port: int | None = None,
) -> Iterator[Agent]:
    """pyproxy in node-a with its API bridge; killed (and its log tail printed) at the end.

    `host_port`: where on the host's 127.0.0.1 the bridge connects (default: the API server's
    own port; a test's relay in front of the API server otherwise)."""
    port = urllib.parse.urlsplit(server).port
    sock = workdir / "api.sock"
    host = subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{host_port or port}"],
        stderr=subprocess.DEVNULL,
    )
    eventually(sock.exists, 5, "host bridge socket")
    cluster.node("a").popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{sock}"]
    )
    a = Agent(cluster, kubeconfig, workdir, extra)
    a.start()
    try:
        yield a
    finally:
        if a.proc is not None:
            a.stop(signal.SIGKILL)
        host.terminate()
        host.wait(timeout=5)
        print(a.text()[-4000:])


def make_service(
    api: kubernetes.client.ApiClient,
    ns: str,
    name: str,
    ip: str,
    *,
    proto: str = "TCP",
    port: int = 80,
    spec: dict[str, object] | None = None,
) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": "p", "port": port, "protocol": proto}],
            **(spec or {}),
        },
    }
    kubernetes.client.CoreV1Api(api).create_namespaced_service(ns, body)


def set_endpoints(
    api: kubernetes.client.ApiClient,
    ns: str,
    service: str,
    eps: list[tuple[str, str]],
    *,
    port: int = 8080,
    proto: str = "TCP",
    port_name: str = "p",
    not_ready: Collection[str] = (),
    terminating: Collection[str] = (),
) -> None:
    """Create or replace the Service's one EndpointSlice: `eps` are (address, node name); the
    addresses in `not_ready` have condition ready false, those in `terminating` are terminating
    but still serving (a pod being deleted, inside its grace period)."""
    body = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-x",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": proto}],
        "endpoints": [
            {
                "addresses": [ip],
                "nodeName": node,
                "conditions": _conditions(ip, not_ready, terminating),
            }
            for ip, node in eps
        ],
    }
    d = kubernetes.client.DiscoveryV1Api(api)
    try:
        d.replace_namespaced_endpoint_slice(f"{service}-x", ns, body)
    except kubernetes.client.ApiException as err:
        if err.status != 404:
            raise
        d.create_namespaced_endpoint_slice(ns, body)


def _conditions(
    ip: str, not_ready: Collection[str], terminating: Collection[str]
) -> dict[str, bool]:
    if ip in terminating:
        return {"ready": False, "serving": True, "terminating": True}
    return {"ready": ip not in not_ready}


def answers(where: object, ip: str, port: int, n: int = 20) -> set[str]:
    names = set()
    for _ in range(n):
        r = tcp_ask(where, ip, port, timeout=1)
        names.add(r.name if isinstance(r, Reply) else type(r).__name__)
    return names


def api_state(api: kubernetes.client.ApiClient) -> dict[str, object]:
    """Every Service and EndpointSlice in the API, as a `--state` file for --dry-run."""
    items: list[object] = []
    core = kubernetes.client.CoreV1Api(api)
    disc = kubernetes.client.DiscoveryV1Api(api)
    for kind, lister in (
        ("Service", core.list_service_for_all_namespaces),
        ("EndpointSlice", disc.list_endpoint_slice_for_all_namespaces),
    ):
        for obj in api.sanitize_for_serialization(lister().items):
            items.append({"kind": kind, **obj})
    return {"apiVersion": "v1", "kind": "List", "items": items}


def node_a_dry_run(state: Path) -> str:
    """`pyproxy --dry-run` of `state` for node-a, with the agent's flags."""
    argv = [sys.executable, "-m", "pyproxy", "--dry-run", "--state", str(state)]
    argv += ["--hostname-override", "node-a", "--node-ip", NODE_A]
    argv += ["--cluster-cidr", CLUSTER_CIDRS]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def chains(text: str) -> dict[str, int]:
    """KUBE-* chains and how many rules each has, from save or restore text."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(":KUBE-") and "CANARY" not in line:
            counts.setdefault(line[1:].split()[0], 0)
        elif line.startswith("-A KUBE-"):
            chain = line.split()[1]
            counts[chain] = counts.get(chain, 0) + 1
    return counts
