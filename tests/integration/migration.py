"""Switching one node from upstream kube-proxy to pyproxy and back, under load, counting failures.

Shared by tests/integration/test_migration.py (asserts zero failed requests with the takeover
procedure) and hack/bench_migration.py (counts per phase and target for both procedures). Real
parts only: the real kube-apiserver (controlplane.py), the real kube-proxy v1.34.4 binary built by
hack/build-control-plane.sh, pyproxy from this checkout, both in netlab's node-a namespace with
iptables-nft, and real TCP connections from netlab's client namespace to a ClusterIP (routed to
node-a) and to a NodePort on node-a, answered by backend pods a1 and b1 (a2 is added and removed
on the way, to show that the proxy running at that moment programs changes).

Phases (the load never stops; each request is counted in the phase it started in):

    kube-proxy  kube-proxy alone, synced
    takeover    kube-proxy stopped (SIGTERM) [--cleanup] pyproxy started, until its first sync
    pyproxy     pyproxy alone; endpoint a2 added (must answer: pyproxy is live)
    rollback    pyproxy stopped (SIGTERM) [--cleanup] kube-proxy started, until its first sync
    after       kube-proxy alone; endpoint a2 removed (must stop answering: kube-proxy is live)

Procedures: "cleanup" is the one docs/deploy.md described before (clean the old proxy's rules,
then start the new one: no rules until its first sync), "takeover" is the new one (no cleanup:
each proxy's first full sync rewrites the other's chains in one iptables-restore).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from netlab import Client, Cluster, Proc, Reply, tcp_ask

PROCEDURES = ("cleanup", "takeover")
PHASES = ("kube-proxy", "takeover", "pyproxy", "rollback", "after")
NODE_NAME = "node-a"
NODE_IP, NODE_IP6 = "172.30.0.2", "fd00:30::2"
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/48"
CLUSTER_IP = "10.96.77.10"
NODE_PORT = 30777
A1, A2, B1 = "10.244.1.11", "10.244.1.12", "10.244.2.11"
METRICS = "http://127.0.0.1:10249/metrics"
#: Set by both proxies after every successful sync (upstream's metric name; pyproxy keeps it).
SYNC_METRIC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
LAYOUT = {"a": ("a1", "a2"), "b": ("b1",)}
REPO = Path(__file__).resolve().parents[2]
#: A request answered later than this (seconds) counts as "slow" in the benchmark's table: the
#: first SYN retransmission comes after 1 s. Reported only; the tests assert no failures.
SLOW = 0.9


class MigrationError(RuntimeError):
    """The lab could not do what a phase needs (a proxy exited, never synced, never stopped)."""


@dataclass(frozen=True, slots=True)
class Sample:
    started: float
    phase: str
    target: str
    #: "ok" or the probe's failure kind (Refused, Unreachable, Timeout, Failed).
    result: str
    answered_by: str
    #: From connect to the answer (or the failure): a SYN retransmitted because the node had
    #: no rules shows as a second or more.
    seconds: float


class Load:
    """`rate` new TCP connections per second to each target from the client namespace, each in
    its own worker, so a slow or hanging connection never delays the next one."""

    def __init__(
        self, where: Client, targets: Mapping[str, tuple[str, int]], rate: float, timeout: float
    ) -> None:
        self.where = where
        self.targets = dict(targets)
        self.interval = 1.0 / rate
        self.timeout = timeout
        self.phase = PHASES[0]
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=int(rate * timeout * len(targets)) + 8)
        self._threads: list[threading.Thread] = []

    def _probe(self, target: str, phase: str, started: float) -> None:
        ip, port = self.targets[target]
        result = tcp_ask(self.where, ip, port, timeout=self.timeout)
        seconds = time.monotonic() - started
        ok = isinstance(result, Reply)
        sample = Sample(
            started,
            phase,
            target,
            "ok" if ok else type(result).__name__,
            result.name if isinstance(result, Reply) else "",
            seconds,
        )
        with self._lock:
            self.samples.append(sample)

    def _fire(self, target: str) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._probe, target, self.phase, time.monotonic())
            due += self.interval
            self._stop.wait(max(0.0, due - time.monotonic()))

    def start(self) -> None:
        for target in self.targets:
            thread = threading.Thread(target=self._fire, args=(target,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Sample]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._pool.shutdown(wait=True)
        with self._lock:
            return sorted(self.samples, key=lambda s: s.started)


@dataclass
class PhaseReport:
    seconds: float = 0.0
    #: target -> {"requests": n, "failed": n, "failures": {kind: n}, "answered_by": {pod: n},
    #: "slow": answered after more than SLOW seconds (delayed, not failed)}
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MigrationReport:
    procedure: str
    rate_per_target: float
    phases: dict[str, PhaseReport]
    #: What happened when, in seconds from the start of the load (for the table's notes).
    events: list[tuple[float, str]]
    #: Requests to a2 that started in the last `quiet` seconds of "after" (must be 0).
    a2_after_removal: int
    #: KUBE-* chains and rules (Lab.snapshot) after kube-proxy's first sync ("kube-proxy"),
    #: pyproxy's takeover ("pyproxy"), and at the end ("kube-proxy at the end": the same API
    #: objects as at the start; what differs is what the rollback left or lost).
    snapshots: dict[str, frozenset[str]] = field(default_factory=dict)
    #: The first kube-proxy's mode (the rollback is always to iptables mode).
    kube_proxy_mode: str = "iptables"

    @property
    def label(self) -> str:
        return self.procedure + (
            f" (from {self.kube_proxy_mode})" if self.kube_proxy_mode != "iptables" else ""
        )

    def snapshot_diff(self, a: str, b: str) -> dict[str, list[str]]:
        """Chains and rules only in snapshot `a`, and only in `b`."""
        sa, sb = self.snapshots[a], self.snapshots[b]
        return {f"only {a}": sorted(sa - sb), f"only {b}": sorted(sb - sa)}

    def failed(self, phase: str, target: str) -> int:
        return int(self.phases[phase].targets.get(target, {}).get("failed", 0))

    def answered_by(self, phase: str, target: str) -> dict[str, int]:
        return dict(self.phases[phase].targets.get(target, {}).get("answered_by", {}))

    def as_dict(self) -> dict[str, Any]:
        return {
            "procedure": self.procedure,
            "kube_proxy_mode": self.kube_proxy_mode,
            "rate_per_target": self.rate_per_target,
            "phases": {
                name: {"seconds": round(p.seconds, 2), "targets": p.targets}
                for name, p in self.phases.items()
            },
            "events": [[round(t, 2), what] for t, what in self.events],
            "a2_after_removal": self.a2_after_removal,
            "differences": {
                "kube-proxy vs pyproxy": self.snapshot_diff("kube-proxy", "pyproxy"),
                "kube-proxy vs kube-proxy at the end": self.snapshot_diff(
                    "kube-proxy", "kube-proxy at the end"
                ),
            }
            if len(self.snapshots) == 3 and self.kube_proxy_mode == "iptables"
            else {},
            # From another mode the rule sets have nothing in common but these tables.
            "kube_proxy_nftables_tables": {
                name: sorted(x for x in snap if x.startswith("nft "))
                for name, snap in self.snapshots.items()
            },
        }


def summarize(
    procedure: str,
    rate: float,
    *,
    samples: Sequence[Sample],
    bounds: Mapping[str, tuple[float, float]],
    events: list[tuple[float, str]],
    removed_at: float,
    quiet: float,
) -> MigrationReport:
    phases: dict[str, PhaseReport] = {}
    for phase in PHASES:
        start, end = bounds[phase]
        report = PhaseReport(seconds=end - start)
        for sample in (s for s in samples if s.phase == phase):
            entry = report.targets.setdefault(
                sample.target,
                {"requests": 0, "failed": 0, "failures": {}, "answered_by": {}, "slow": 0},
            )
            entry["requests"] += 1
            if sample.result == "ok":
                entry["slow"] += sample.seconds > SLOW
                entry["answered_by"][sample.answered_by] = (
                    entry["answered_by"].get(sample.answered_by, 0) + 1
                )
            else:
                entry["failed"] += 1
                entry["failures"][sample.result] = entry["failures"].get(sample.result, 0) + 1
        phases[phase] = report
    end_after = bounds["after"][1]
    late = [
        s for s in samples if s.phase == "after" and s.started >= max(removed_at, end_after - quiet)
    ]
    return MigrationReport(
        procedure,
        rate,
        phases,
        events,
        sum(1 for s in late if s.answered_by == "a2"),
    )


# --- the proxies ------------------------------------------------------------------------------


def iptables_shim(workdir: Path, backend: str = "nft") -> Path:
    """A directory whose iptables* are the `backend` variant: kube-proxy runs plain `iptables`,
    `iptables-save` and `iptables-restore` from PATH, and must use the same variant as pyproxy."""
    shim = workdir / f"iptables-{backend}"
    shim.mkdir(parents=True, exist_ok=True)
    for fam in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            target = shutil.which(f"{fam}-{backend}{suffix}")
            if target is None:
                raise MigrationError(f"{fam}-{backend}{suffix} not found")
            link = shim / f"{fam}{suffix}"
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    return shim


class Lab:
    """node-a of a netlab cluster, with a bridge to the API server, and the two proxies."""

    def __init__(
        self,
        cluster: Cluster,
        server: str,
        kubeconfig: Path,
        kube_proxy: Path,
        workdir: Path,
        *,
        python: str = sys.executable,
    ) -> None:
        self.cluster = cluster
        self.node = cluster.node("a")
        self.server = server
        self.kubeconfig = kubeconfig
        self.kube_proxy = kube_proxy
        self.workdir = workdir
        self.python = python
        self.env = {
            **os.environ,
            "PATH": f"{iptables_shim(workdir)}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}",
        }
        self.runs = 0

    @contextmanager
    def api_bridge(self) -> Iterator[None]:
        """socat on 127.0.0.1:<apiserver port> inside node-a, forwarding over a Unix socket to
        the API server on the host's loopback (as tests/integration/agent.py)."""
        port = urllib.parse.urlsplit(self.server).port
        sock = self.workdir / "api.sock"
        host = subprocess.Popen(
            ["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{port}"],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(sock.exists, 5, "host side of the API bridge")
            self.node.popen(
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                    f"UNIX-CONNECT:{sock}",
                ]
            )
            yield
        finally:
            host.terminate()
            host.wait(timeout=5)
            sock.unlink(missing_ok=True)

    def _common(self) -> list[str]:
        return [
            "--kubeconfig",
            str(self.kubeconfig),
            "--hostname-override",
            NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDRS,
            "--iptables-min-sync-period",
            "1s",
            "--iptables-sync-period",
            "30s",
            "--healthz-bind-address",
            "0.0.0.0:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
        ]

    def start(self, proxy: str, mode: str = "iptables") -> Proc:
        """Start kube-proxy (in `mode`: iptables or nftables) or pyproxy (iptables mode)."""
        self.runs += 1
        if proxy == "kube-proxy":
            argv = [
                str(self.kube_proxy),
                "--proxy-mode",
                mode,
                *self._common(),
                # A netns cannot change the global conntrack table size or timeouts: leave them.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--v=2",
            ]
        else:
            argv = [
                self.python,
                "-m",
                "pyproxy",
                "--proxy-mode",
                "iptables",
                *self._common(),
                "--node-ip",
                NODE_IP,
                "--node-ip",
                NODE_IP6,
                "--iptables-backend",
                "nft",
            ]
        log = (self.workdir / f"{self.runs}-{proxy}.log").open("wb")
        try:
            return self.node.popen(argv, stdout=log, stderr=log, env=self.env, cwd=REPO)
        finally:
            log.close()

    def cleanup(self) -> None:
        """The old procedure's step: `pyproxy --cleanup` on the node."""
        self.node.run(
            [self.python, "-m", "pyproxy", "--cleanup", "--iptables-backend", "nft"],
            timeout=120,
        )

    def synced(self, proc: Proc) -> bool:
        """The proxy reports a completed sync (its metric is set only after a successful one)."""
        if not proc.alive():
            raise MigrationError(f"{proc} exited with {proc.popen.returncode}")
        out = self.node.run(
            ["curl", "-s", "--noproxy", "*", "--max-time", "5", METRICS], check=False, timeout=20
        ).stdout
        for line in out.splitlines():
            if line.startswith(SYNC_METRIC):
                try:
                    if float(line.rsplit(" ", 1)[1]) > 0:
                        return True
                except ValueError:
                    continue
        return False

    def snapshot(self) -> frozenset[str]:
        """Every KUBE-* chain and rule of both families, as `FAMILY TABLE LINE` (counters
        and the order of Services, which upstream randomizes, left out), and kube-proxy's
        nftables tables (`nft table ip kube-proxy`)."""
        lines = set()
        for family, save in (("ipv4", "iptables-nft-save"), ("ipv6", "ip6tables-nft-save")):
            table = ""
            for line in self.node.run([save]).stdout.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith(":KUBE-"):
                    lines.add(f"{family} {table} :{line[1:].split()[0]}")
                elif line.startswith("-A") and "KUBE-" in line:
                    lines.add(f"{family} {table} {line}")
        for line in self.node.run(["nft", "list", "tables"]).stdout.splitlines():
            if line.endswith(" kube-proxy"):  # kube-proxy's nftables mode
                lines.add(f"nft {line}")
        return frozenset(lines)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise MigrationError(f"not true within {timeout} s: {what}")


def stop(proc: Proc) -> None:
    """SIGTERM to the proxy alone (not its process group: `ip netns exec` execs the proxy, and
    a DaemonSet pod's termination signals only the container's main process), then wait."""
    proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(timeout=60)
    except subprocess.TimeoutExpired as err:
        raise MigrationError(f"{proc} did not stop within 60 s of SIGTERM") from err


# --- the API objects ----------------------------------------------------------------------------


def create_objects(api: kubernetes.client.ApiClient, namespace: str) -> None:
    """The Node (both proxies read its addresses) and a NodePort Service with a1 and b1."""
    core = kubernetes.client.CoreV1Api(api)
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
    }
    try:
        core.delete_node(NODE_NAME)
    except kubernetes.client.ApiException as err:
        if err.status != 404:
            raise
    core.create_node(node)
    core.patch_node_status(
        NODE_NAME,
        {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": NODE_IP},
                    {"type": "InternalIP", "address": NODE_IP6},
                ]
            }
        },
    )
    core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {
                "type": "NodePort",
                "clusterIP": CLUSTER_IP,
                "ports": [
                    {
                        "name": "p",
                        "port": 80,
                        "targetPort": 8080,
                        "nodePort": NODE_PORT,
                        "protocol": "TCP",
                    }
                ],
            },
        },
    )
    set_endpoints(api, namespace, [(A1, "node-a"), (B1, "node-b")])


def delete_node(api: kubernetes.client.ApiClient) -> None:
    try:
        kubernetes.client.CoreV1Api(api).delete_node(NODE_NAME)
    except kubernetes.client.ApiException as err:
        if err.status != 404:
            raise


def set_endpoints(
    api: kubernetes.client.ApiClient, namespace: str, eps: list[tuple[str, str]]
) -> None:
    body = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-x",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "nodeName": node, "conditions": {"ready": True}} for ip, node in eps
        ],
    }
    d = kubernetes.client.DiscoveryV1Api(api)
    try:
        d.replace_namespaced_endpoint_slice("web-x", namespace, body)
    except kubernetes.client.ApiException as err:
        if err.status != 404:
            raise
        d.create_namespaced_endpoint_slice(namespace, body)


# --- the migration ------------------------------------------------------------------------------


def migrate(
    lab: Lab,
    api: kubernetes.client.ApiClient,
    namespace: str,
    procedure: str,
    *,
    steady: float,
    after: float,
    settle: float = 2.0,
    rate: float = 20.0,
    timeout: float = 5.0,
    kube_proxy_mode: str = "iptables",
    progress: Callable[[str], None] = lambda _: None,
) -> MigrationReport:
    """Run the five phases with `procedure` ("cleanup" or "takeover") and count.

    `steady`: seconds of each proxy-alone phase; `after`: of the last one; `settle`: seconds
    the load goes on after a proxy's first sync before the next phase begins (requests already
    in flight then still count in the switch's phase). `kube_proxy_mode`: the mode of the
    first kube-proxy (nftables: pyproxy must also delete its tables); the rollback always goes
    to iptables mode, the only one whose start leaves the rules of the proxy before in place."""
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be one of {PROCEDURES}")
    lab.cluster.client_route("10.96.0.0/16", "a")
    targets = {"ClusterIP": (CLUSTER_IP, 80), "NodePort": (NODE_IP, NODE_PORT)}
    load = Load(lab.cluster.client, targets, rate, timeout)
    starts: list[tuple[str, float]] = []
    snapshots: dict[str, frozenset[str]] = {}
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def event(what: str) -> None:
        events.append((time.monotonic() - t0, what))
        progress(f"{procedure}: {what}")

    def phase(name: str) -> None:
        load.phase = name
        starts.append((name, time.monotonic()))
        event(f"phase {name}")

    def switch(old: Proc, new_proxy: str) -> Proc:
        stop(old)
        event(f"{'kube-proxy' if new_proxy == 'pyproxy' else 'pyproxy'} stopped (SIGTERM)")
        listening = lab.node.run(["ss", "-ltnp"], check=False).stdout
        if ":10249" in listening or ":10256" in listening:
            event(f"still listening after the stop:\n{listening}")
        if procedure == "cleanup":
            lab.cleanup()
            event("pyproxy --cleanup done")
        new = lab.start(new_proxy)
        event(f"{new_proxy} started")
        wait_for(lambda: lab.synced(new), 180, f"{new_proxy}'s first sync")
        event(f"{new_proxy} synced")
        time.sleep(settle)  # the metric is set per family: both have synced by now
        if new_proxy == "pyproxy":
            snapshots["pyproxy"] = lab.snapshot()
        return new

    def answers(name: str) -> bool:
        result = tcp_ask(lab.cluster.client, CLUSTER_IP, 80, timeout=timeout)
        return isinstance(result, Reply) and result.name == name

    kube_proxy = lab.start("kube-proxy", kube_proxy_mode)
    wait_for(lambda: lab.synced(kube_proxy), 180, "kube-proxy's first sync")
    wait_for(
        lambda: all(
            isinstance(tcp_ask(lab.cluster.client, *t, timeout=timeout), Reply)
            for t in targets.values()
        ),
        60,
        "kube-proxy serves both targets",
    )
    time.sleep(settle)
    snapshots["kube-proxy"] = lab.snapshot()
    t0 = time.monotonic()
    starts.append((PHASES[0], t0))
    load.start()
    event("load started, phase kube-proxy")
    removed_at = float("inf")
    try:
        time.sleep(steady)
        phase("takeover")
        pyproxy = switch(kube_proxy, "pyproxy")
        phase("pyproxy")
        set_endpoints(api, namespace, [(A1, "node-a"), (A2, "node-a"), (B1, "node-b")])
        event("endpoint a2 added")
        wait_for(lambda: answers("a2"), 60, "a2 answers (pyproxy programs changes)")
        time.sleep(steady)
        phase("rollback")
        kube_proxy = switch(pyproxy, "kube-proxy")
        phase("after")
        set_endpoints(api, namespace, [(A1, "node-a"), (B1, "node-b")])
        removed_at = time.monotonic()
        event("endpoint a2 removed")
        time.sleep(after)
        # The same objects as at the start, so kube-proxy's rules must be as they were then.
        snapshots["kube-proxy at the end"] = lab.snapshot()
    finally:
        samples = load.stop()
        event("load stopped")
    ends = [t for _, t in starts[1:]] + [time.monotonic()]
    bounds = {name: (start, end) for (name, start), end in zip(starts, ends, strict=True)}
    quiet = min(after / 2, 5.0)
    report = summarize(
        procedure,
        rate,
        samples=samples,
        bounds=bounds,
        events=events,
        removed_at=removed_at,
        quiet=quiet,
    )
    report.snapshots = snapshots
    report.kube_proxy_mode = kube_proxy_mode
    return report


def markdown(reports: Sequence[MigrationReport]) -> str:
    """Failed requests / requests (and answered but slow ones) per phase and target, one row per
    procedure and target."""
    head = "| procedure | target | " + " | ".join(PHASES) + " |"
    lines = [head, "|" + " --- |" * (len(PHASES) + 2)]
    for report in reports:
        for target in ("ClusterIP", "NodePort"):
            cells = []
            for phase in PHASES:
                entry = report.phases[phase].targets.get(
                    target, {"failed": 0, "requests": 0, "slow": 0}
                )
                cells.append(f"{entry['failed']} / {entry['requests']} ({entry['slow']} slow)")
            lines.append(f"| {report.label} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failure_kinds(report: MigrationReport) -> str:
    kinds: Counter[str] = Counter()
    for phase in report.phases.values():
        for entry in phase.targets.values():
            kinds.update(entry["failures"])
    return json.dumps(dict(kinds))
