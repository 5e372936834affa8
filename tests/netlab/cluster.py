"""A miniature cluster of network namespaces: a LAN bridge, nodes, pods, external clients.

    with Cluster() as c:                       # node-a: a1 a2, node-b: b1 b2, one client
        c.node("a").run(["iptables-restore"], input=rules)
        http_get(c.pod("b1"), c.pod("a1").ip, 8080)  -> Reply("a1", "10.244.2.11", 40112)

See README.md in this directory for the address plan.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ns import (
    NETNS_DIR,
    Backend,
    NetlabError,
    Netns,
    Reaper,
    ip_batch,
    list_netns,
    require_root,
    wait_batches,
)

LAN4 = "172.30.0.0/24"
LAN6 = "fd00:30::/64"
ROUTER4 = "172.30.0.1"  # the bridge in the lan namespace: default gateway of the nodes
ROUTER6 = "fd00:30::1"
SERVICE_CIDR4 = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:96::/112"
CLUSTER_CIDR4 = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:244::/48"
POD_GW4 = "169.254.1.1"  # node side of every pod veth (pods route everything to it)
POD_GW6 = "fe80::1"
LB_CIDR4 = "192.0.2.0/24"  # suggested "external" ranges for client_route()
EXTERNAL_CIDR4 = "198.51.100.0/24"

DEFAULT_LAYOUT: dict[str, tuple[str, ...]] = {"a": ("a1", "a2"), "b": ("b1", "b2")}
REGISTRY = Path("/run/netlab")
IFNAMSIZ = 15

COMMON_SYSCTLS: dict[str, str] = {
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    # Static addresses are usable at once (no 1-2 s of "tentative" IPv6 addresses).
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    # No host learns routes from ICMP redirects. A node forwards a packet no rule translated
    # (a Service or LB IP before its rule exists) back out of the LAN interface it came in on,
    # to the router, and so tells the client "use the router"; a client that takes the hint
    # caches it for 5 minutes (`ip route show cache`) and never reaches the node again, rules
    # or not. Real clients of LB and external IPs sit behind a router or reach the node by
    # ARP, where no redirect applies; here they share the node's LAN and router.
    # tests/kernel/test_rule_gap.py shows the mechanism.
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv4.conf.default.accept_redirects": "0",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv6.conf.default.accept_redirects": "0",
}
ROUTER_SYSCTLS: dict[str, str] = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}
# Keep the LAN bridge pure layer 2 (these exist only when br_netfilter is in the kernel).
BRIDGE_SYSCTLS: dict[str, str] = {
    "net.bridge.bridge-nf-call-iptables": "0",
    "net.bridge.bridge-nf-call-ip6tables": "0",
    "net.bridge.bridge-nf-call-arptables": "0",
}


@dataclass(frozen=True)
class Serve:
    """Which ports backend.py serves on every pod (None/empty -> no backends started)."""

    tcp: tuple[int, ...] = (8080, 8081)
    udp: tuple[int, ...] = (5353,)
    sctp: tuple[int, ...] = ()


def _canon(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


class Host(Netns):
    """A namespace with one LAN or pod address per family."""

    ip: str
    ip6: str

    @property
    def ips(self) -> tuple[str, str]:
        return (self.ip, self.ip6)

    def addr(self, family: int) -> str:
        """`ip` for 4, `ip6` for 6."""
        return self.ip6 if family == 6 else self.ip


class Client(Host):
    """An external client on the LAN (no routes to pods or Service CIDRs)."""

    def __init__(self, name: str, label: str, reaper: Reaper, index: int) -> None:
        super().__init__(name, label, reaper)
        self.index = index
        self.ip = _canon(f"172.30.0.{100 + index}")
        self.ip6 = _canon(f"fd00:30::{100 + index}")
        self.port = f"p-{label}"[:IFNAMSIZ]  # its port on the LAN bridge


class Node(Host):
    """A node: LAN address on eth0, its pods on veths `v-<pod>`, routes to the other nodes' pods."""

    def __init__(self, name: str, key: str, reaper: Reaper, index: int) -> None:
        super().__init__(name, f"node-{key}", reaper)
        self.key = key
        self.index = index
        self.ip = _canon(f"172.30.0.{2 + index}")
        self.ip6 = _canon(f"fd00:30::{2 + index}")
        self.pod_cidr = f"10.244.{1 + index}.0/24"
        self.pod_cidr6 = f"fd00:244:{1 + index}::/64"
        self.port = f"p-{self.label}"[:IFNAMSIZ]
        self.pods: list[Pod] = []

    @property
    def node_name(self) -> str:
        """The Kubernetes node name (e.g. for --hostname-override)."""
        return self.label


class Pod(Host):
    """A pod: eth0 with IP/32 and IP6/128, default routes via 169.254.1.1 / fe80::1 (the node)."""

    def __init__(self, name: str, pod: str, reaper: Reaper, node: Node, index: int) -> None:
        super().__init__(name, pod, reaper)
        self.pod = pod
        self.node = node
        self.index = index
        self.ip = _canon(f"10.244.{1 + node.index}.{11 + index}")
        self.ip6 = _canon(f"fd00:244:{1 + node.index}::{11 + index}")
        self.veth = f"v-{pod}"  # name of the node-side interface
        self.backend: Backend | None = None


@dataclass
class _Timing:
    setup: float = 0.0
    backends: float = 0.0
    teardown: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class Cluster:
    """Namespaces `<prefix><rand>-lan`, `-node-a`, `-a1`, ..., `-client`; see README.md.

    Use as a context manager (or call `up()` / `down()`). `down()` always removes every
    namespace and kills every process started through the cluster, even after a failed `up()`.
    """

    def __init__(
        self,
        layout: Mapping[str, Sequence[str]] | None = None,
        *,
        clients: Sequence[str] = ("client",),
        serve: Serve | None = Serve(),
        sysctls: Mapping[str, Mapping[str, str | int]] | None = None,
        prefix: str = "nl",
        keep_logs: bool = False,
    ) -> None:
        layout = dict(layout if layout is not None else DEFAULT_LAYOUT)
        if not layout or not clients:
            raise ValueError("need at least one node and one client")
        if len(layout) > 97:
            raise ValueError("at most 97 nodes")
        self.layout = {k: tuple(v) for k, v in layout.items()}
        self.serve_spec = serve
        self.extra_sysctls = {k: dict(v) for k, v in (sysctls or {}).items()}
        self.keep_logs = keep_logs
        self.id = self._fresh_id(prefix)
        self.logdir: Path | None = None  # created by up()
        self.reaper = Reaper()
        self.timing = _Timing()
        self._up = False

        rp = self.reaper
        self.lan = Netns(self._ns("lan"), "lan", rp)
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        seen: set[str] = set()
        for i, (key, pods) in enumerate(self.layout.items()):
            node = Node(self._ns(f"node-{key}"), key, rp, i)
            self.nodes[key] = node
            if len(pods) > 200:
                raise ValueError("at most 200 pods per node")
            for j, pod in enumerate(pods):
                if pod in seen or len(f"v-{pod}") > IFNAMSIZ or not pod.isidentifier():
                    raise ValueError(f"bad or duplicate pod name {pod!r} (short identifiers)")
                seen.add(pod)
                p = Pod(self._ns(pod), pod, rp, node, j)
                node.pods.append(p)
                self.pods[pod] = p
        self.clients: dict[str, Client] = {}
        for i, name in enumerate(clients):
            if name in seen or name in ("lan",) or name.startswith("node-"):
                raise ValueError(f"client name {name!r} clashes")
            seen.add(name)
            self.clients[name] = Client(self._ns(name), name, rp, i)
        if len(self.clients) > 150:
            raise ValueError("at most 150 clients")

    # ---- naming / lookup ---------------------------------------------------------------------

    @staticmethod
    def _fresh_id(prefix: str) -> str:
        existing = list_netns()
        while True:
            cid = f"{prefix}{secrets.token_hex(2)}"
            if not any(n.startswith(cid + "-") for n in existing):
                return cid

    def _ns(self, label: str) -> str:
        return f"{self.id}-{label}"

    def node(self, key: str) -> Node:
        """`node("a")` or `node("node-a")`."""
        return self.nodes[key.removeprefix("node-")]

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    @property
    def client(self) -> Client:
        """The first (usually only) external client."""
        return next(iter(self.clients.values()))

    def namespaces(self) -> list[Netns]:
        return [self.lan, *self.nodes.values(), *self.pods.values(), *self.clients.values()]

    def ns_names(self) -> list[str]:
        return [n.name for n in self.namespaces()]

    def __getitem__(self, label: str) -> Netns:
        """Any namespace by label: "lan", "node-a", "a1", "client"."""
        for n in self.namespaces():
            if n.label == label:
                return n
        raise KeyError(label)

    # ---- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Cluster:
        require_root()
        if self._up:
            raise NetlabError(f"cluster {self.id} is already up")
        reap_stale()
        t0 = time.monotonic()
        self._up = True
        try:
            self.logdir = self.reaper.logdir = Path(tempfile.mkdtemp(prefix=f"netlab-{self.id}-"))
            self._register()
            self._build()
            t1 = time.monotonic()
            self.timing.setup = t1 - t0
            if self.serve_spec is not None:
                self.start_backends(self.serve_spec)
            self.timing.backends = time.monotonic() - t1
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        return self

    def _build(self) -> None:
        wait_batches([ip_batch(f"netns add {n}" for n in self.ns_names())])

        # sysctls first: new interfaces inherit "default" (rp_filter 0, no DAD).
        for ns in self.namespaces():
            values = dict(COMMON_SYSCTLS)
            role = "lan" if ns is self.lan else type(ns).__name__.lower()
            if role in ("lan", "node"):
                values |= ROUTER_SYSCTLS
            if role == "lan":
                values |= {k: v for k, v in BRIDGE_SYSCTLS.items() if _has_bridge_nf()}
            values |= {k: str(v) for k, v in self.extra_sysctls.get(role, {}).items()}
            values |= {k: str(v) for k, v in self.extra_sysctls.get(ns.label, {}).items()}
            ns.sysctls(values)  # type: ignore[arg-type]

        lan = self.lan.name
        # Phase A: every namespace creates its uplink veth (peer lands in the parent ns).
        a: dict[str, list[str]] = {
            lan: [
                "link set lo up",
                "link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0",
                f"addr add {ROUTER4}/24 dev br0",
                f"addr add {ROUTER6}/64 dev br0 nodad",
                "link set br0 up",
            ]
        }
        lan_hosts: list[Node | Client] = [*self.nodes.values(), *self.clients.values()]
        for host in lan_hosts:
            a[host.name] = [
                "link set lo up",
                f"link add eth0 type veth peer name {host.port} netns {lan}",
                f"addr add {host.ip}/24 dev eth0",
                f"addr add {host.ip6}/64 dev eth0 nodad",
                "link set eth0 up",
            ]
        for pod in self.pods.values():
            a[pod.name] = [
                "link set lo up",
                f"link add eth0 type veth peer name {pod.veth} netns {pod.node.name}",
                f"addr add {pod.ip}/32 dev eth0",
                f"addr add {pod.ip6}/128 dev eth0 nodad",
                "link set eth0 up",
                f"route add {POD_GW4}/32 dev eth0 scope link",
                f"route add default via {POD_GW4} dev eth0",
                f"route add default via {POD_GW6} dev eth0",
            ]
        wait_batches([ip_batch(lines, ns) for ns, lines in a.items()])

        # Phase B: the parents plug the peers in.
        b: dict[str, list[str]] = {lan: []}
        for host in lan_hosts:
            b[lan] += [f"link set {host.port} master br0", f"link set {host.port} up"]
        for node in self.nodes.values():
            lines = b.setdefault(node.name, [])
            for pod in node.pods:
                lines += [
                    f"link set {pod.veth} up",
                    f"addr add {POD_GW4}/32 dev {pod.veth} scope link",
                    f"addr add {POD_GW6}/64 dev {pod.veth} nodad",
                    f"route add {pod.ip}/32 dev {pod.veth} scope link src {node.ip}",
                    f"route add {pod.ip6}/128 dev {pod.veth}",
                ]
            # Unknown addresses of the own pod CIDR fail fast (ICMP unreachable).
            lines += [f"route add unreachable {node.pod_cidr}"]
            lines += [f"route add unreachable {node.pod_cidr6}"]
            for other in self.nodes.values():
                if other is not node:
                    lines += [f"route add {other.pod_cidr} via {other.ip} dev eth0"]
                    lines += [f"route add {other.pod_cidr6} via {other.ip6} dev eth0"]
            lines += [f"route add default via {ROUTER4} dev eth0"]
            lines += [f"route add default via {ROUTER6} dev eth0"]
        # The router knows the pod CIDRs too, so what it cannot route (e.g. a Service IP that
        # no rule translated) comes back at once as ICMP net unreachable instead of a timeout.
        for node in self.nodes.values():
            b[lan] += [f"route add {node.pod_cidr} via {node.ip} dev br0"]
            b[lan] += [f"route add {node.pod_cidr6} via {node.ip6} dev br0"]
        wait_batches([ip_batch(lines, ns) for ns, lines in b.items() if lines])

    def start_backends(self, spec: Serve, pods: Iterable[str] | None = None) -> list[Backend]:
        """Start backend.py in the given pods (default: all) in parallel; wait until ready."""
        chosen = [self.pods[p] for p in (pods if pods is not None else self.pods)]
        started = []
        for pod in chosen:
            if pod.backend is not None:
                pod.backend.stop()
            pod.backend = pod.start_backend(pod.pod, tcp=spec.tcp, udp=spec.udp, sctp=spec.sctp)
            started.append(pod.backend)
        for backend in started:
            backend.wait_ready()
        return started

    def down(self) -> list[str]:
        """Kill processes, delete namespaces, remove logs. Idempotent; raises NetlabError if
        something could not be removed (after trying everything)."""
        if not self._up:
            self._cleanup_logs()
            return []
        t0 = time.monotonic()
        problems = self.reaper.reap()
        names = [n for n in self.ns_names() if (NETNS_DIR / n).exists()]
        problems += kill_netns_processes(names)
        if names:
            try:
                wait_batches([ip_batch((f"netns del {n}" for n in names), force=True)])
            except NetlabError as e:
                problems.append(str(e))
        left = [n for n in self.ns_names() if (NETNS_DIR / n).exists()]
        if left:
            problems.append(f"namespaces left behind: {left}")
        else:
            with contextlib.suppress(FileNotFoundError):
                (REGISTRY / f"{self.id}.json").unlink()
        self._up = False
        self._cleanup_logs()
        self.timing.teardown = time.monotonic() - t0
        if problems:
            raise NetlabError("cluster teardown: " + "; ".join(problems))
        return problems

    def _cleanup_logs(self) -> None:
        if not self.keep_logs and self.logdir is not None:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _register(self) -> None:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        entry = {"pid": os.getpid(), "namespaces": self.ns_names(), "logdir": str(self.logdir)}
        (REGISTRY / f"{self.id}.json").write_text(json.dumps(entry))

    # ---- helpers for tests -------------------------------------------------------------------

    def client_route(
        self, cidr: str, via_node: str | Node = "a", client: str | Client | None = None
    ) -> None:
        """Route an "external" range (LB IPs, externalIPs) from a client to a node's LAN IP."""
        net = ipaddress.ip_network(cidr, strict=False)
        node = via_node if isinstance(via_node, Node) else self.node(via_node)
        host = (
            client
            if isinstance(client, Client)
            else self.clients[client]
            if client is not None
            else self.client
        )
        via = node.ip6 if net.version == 6 else node.ip
        host.ip_cmd("route", "replace", str(net), "via", via, "dev", "eth0")

    def logs(self) -> dict[str, str]:
        """Output of every process started so far (label -> text), for failure messages."""
        return {p.label: p.log_text() for p in self.reaper.procs}

    def describe(self) -> str:
        """Human readable address plan of this instance."""
        out = [f"cluster {self.id}: lan {LAN4} {LAN6} router {ROUTER4} {ROUTER6}"]
        for node in self.nodes.values():
            out.append(
                f"  {node.label:8} {node.name:16} {node.ip:12} {node.ip6:14} "
                f"pods {node.pod_cidr} {node.pod_cidr6}"
            )
            out += [f"    {p.pod:6} {p.name:16} {p.ip:12} {p.ip6}" for p in node.pods]
        out += [f"  {c.label:8} {c.name:16} {c.ip:12} {c.ip6}" for c in self.clients.values()]
        return "\n".join(out)


_BRIDGE_NF: list[bool] = []


def _has_bridge_nf() -> bool:
    if not _BRIDGE_NF:
        _BRIDGE_NF.append(Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists())
    return _BRIDGE_NF[0]


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def kill_netns_processes(names: Iterable[str]) -> list[str]:
    """SIGKILL every process whose network namespace is one of `names` (leftovers)."""
    inodes = {ino for n in names if (ino := _netns_inode(n)) is not None}
    if not inodes:
        return []
    victims = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino in inodes:
                victims.append(int(entry.name))
        except OSError:
            continue
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Wait until they are gone (or zombies: those have left the namespace). Never reap other
    # people's children here: their Popen objects must see the real exit status.
    deadline = time.monotonic() + 2
    for pid in victims:
        while time.monotonic() < deadline:
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino not in inodes:
                    break
            except OSError:
                break
            time.sleep(0.005)
    return []


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Remove clusters whose creating process died without teardown (e.g. pytest was killed)."""
    removed: list[str] = []
    if not REGISTRY.is_dir():
        return removed
    for entry in REGISTRY.glob("*.json"):
        try:
            data: dict[str, Any] = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(int(data.get("pid", 0))):
            continue
        names = [n for n in data.get("namespaces", []) if (NETNS_DIR / n).exists()]
        kill_netns_processes(names)
        if names:
            wait_batches([ip_batch((f"netns del {n}" for n in names), force=True)], check=False)
        removed += names
        logdir = str(data.get("logdir") or "")
        if Path(logdir).name.startswith("netlab-"):
            shutil.rmtree(logdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
    return removed
