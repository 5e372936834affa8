"""The netlab harness itself: namespaces route like a cluster, backends answer, teardown is clean.

No proxy here: only plain routing between pods, nodes and the external client.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from netlab import (  # noqa: E402
    REGISTRY,
    Cluster,
    NetlabError,
    Pod,
    Refused,
    Reply,
    Result,
    Serve,
    Timeout,
    Unreachable,
    http_get,
    list_netns,
    reap_stale,
    sctp_ask,
    sctp_supported,
    spread,
    tcp_ask,
    udp_ask,
)
from netlab.fixtures import cluster_fixture  # noqa: E402

pytestmark = pytest.mark.kernel

cluster = cluster_fixture()  # the default layout; a conftest would import it
big = cluster_fixture({"a": ("a1", "a2", "a3"), "b": ("b1",), "c": ()}, clients=("c1", "c2"))

FAMILIES = pytest.mark.parametrize("fam", [4, 6], ids=["ipv4", "ipv6"])


def answered(r: Result, name: str, peer: str) -> bool:
    """The backend `name` answered and saw `peer` as source (the port is ephemeral)."""
    return isinstance(r, Reply) and (r.name, r.peer_ip) == (name, peer)


def mine(c: Cluster) -> set[str]:
    return {n for n in list_netns() if n.startswith(f"{c.id}-")}


def ip_netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def new_netlab_namespaces(before: set[str]) -> set[str]:
    """Namespaces that appeared since `before` and belong to no live netlab user but us.

    Other test processes (other engineers, pytest -n) may build clusters at the same time;
    their namespaces are listed in /run/netlab/*.json under their own pid.
    """
    # Registry read before and after the listing: a cluster whose namespace was listed was
    # registered at that moment, so it is in at least one of the two reads.
    foreign = registered_elsewhere()
    new = ip_netns_list() - before
    return new - foreign - registered_elsewhere()


def registered_elsewhere() -> set[str]:
    names: set[str] = set()
    for entry in REGISTRY.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(entry.read_text())
            if data["pid"] != os.getpid():
                names |= set(data["namespaces"])
    return names


@FAMILIES
def test_pod_to_pod_on_the_same_node(cluster: Cluster, fam: int) -> None:
    a1, a2 = cluster.pod("a1"), cluster.pod("a2")
    r = http_get(a1, a2.addr(fam), 8080)
    assert answered(r, "a2", a1.addr(fam)), r
    r = tcp_ask(a2, a1.addr(fam), 8081)
    assert answered(r, "a1", a2.addr(fam)), r


@FAMILIES
def test_pod_to_pod_across_nodes_keeps_the_pod_source(cluster: Cluster, fam: int) -> None:
    a1, b1, b2 = cluster.pod("a1"), cluster.pod("b1"), cluster.pod("b2")
    r = http_get(a1, b1.addr(fam), 8080)
    assert answered(r, "b1", a1.addr(fam)), r
    r = http_get(b2, a1.addr(fam), 8081)
    assert answered(r, "a1", b2.addr(fam)), r


@FAMILIES
def test_node_to_pods_uses_the_node_lan_address(cluster: Cluster, fam: int) -> None:
    node = cluster.node("a")
    for pod in ("a1", "b2"):
        r = http_get(node, cluster.pod(pod).addr(fam), 8080)
        assert answered(r, pod, node.addr(fam)), r


@FAMILIES
def test_udp_across_nodes_and_back(cluster: Cluster, fam: int) -> None:
    a2, b1 = cluster.pod("a2"), cluster.pod("b1")
    r = udp_ask(a2, b1.addr(fam), 5353)
    assert answered(r, "b1", a2.addr(fam)), r
    r = udp_ask(cluster.node("b"), a2.addr(fam), 5353, src_port=40000)
    assert r == Reply("a2", cluster.node("b").addr(fam), 40000)


@FAMILIES
def test_external_client_has_no_route_to_pods(cluster: Cluster, fam: int) -> None:
    client = cluster.client
    for pod in ("a1", "b1"):
        ip = cluster.pod(pod).addr(fam)
        assert isinstance(http_get(client, ip, 8080), Unreachable)
        assert isinstance(tcp_ask(client, ip, 8080), Unreachable)
        assert isinstance(udp_ask(client, ip, 5353), Unreachable)
    # ...but the LAN works: the client reaches a backend running on a node.
    node = cluster.node("b")
    node.serve("host-b", tcp=[10256])
    assert answered(http_get(client, node.addr(fam), 10256), "host-b", client.addr(fam))


@FAMILIES
def test_closed_port_is_refused_quickly(cluster: Cluster, fam: int) -> None:
    a1, b1 = cluster.pod("a1"), cluster.pod("b1")
    for probe, port in ((http_get, 9999), (tcp_ask, 9999), (udp_ask, 9999)):
        t0 = time.monotonic()
        r = probe(a1, b1.addr(fam), port, 2)
        assert isinstance(r, Refused), (probe.__name__, r)
        assert time.monotonic() - t0 < 1, probe.__name__


def test_unknown_pod_address_fails_fast_and_silence_times_out(cluster: Cluster) -> None:
    a1 = cluster.pod("a1")
    # A free address in the node's own pod CIDR: "unreachable" route on the node.
    assert isinstance(http_get(a1, "10.244.1.99", 8080, 2), Unreachable)
    # A Service IP with no proxy rules: the LAN router answers "net unreachable".
    assert isinstance(tcp_ask(a1, "10.96.0.10", 80, 2), Unreachable)
    # A backend whose packets are dropped times out (firewall in the pod's namespace).
    a2 = cluster.pod("a2")
    a2.run(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP"])
    t0 = time.monotonic()
    assert isinstance(http_get(a1, a2.ip, 8080, 0.5), Timeout)
    assert isinstance(tcp_ask(a1, a2.ip, 8080, 0.5), Timeout)
    assert time.monotonic() - t0 < 2


def test_spread_counts_who_answered(cluster: Cluster) -> None:
    b2 = cluster.pod("b2")
    assert spread(cluster.pod("a1"), b2.ip, 8080, 5) == Counter({"b2": 5})
    assert spread(cluster.pod("a1"), b2.ip6, 5353, 5, proto="udp") == Counter({"b2": 5})
    assert spread(cluster.pod("a1"), b2.ip, 1, 3, proto="curl") == Counter({"<Refused>": 3})


def test_address_plan(cluster: Cluster) -> None:
    a, b = cluster.node("a"), cluster.node("node-b")
    assert (a.ip, a.ip6, a.pod_cidr, a.pod_cidr6) == (
        "172.30.0.2",
        "fd00:30::2",
        "10.244.1.0/24",
        "fd00:244:1::/64",
    )
    assert (b.ip, b.ip6, b.pod_cidr, b.pod_cidr6) == (
        "172.30.0.3",
        "fd00:30::3",
        "10.244.2.0/24",
        "fd00:244:2::/64",
    )
    assert (cluster.client.ip, cluster.client.ip6) == ("172.30.0.100", "fd00:30::100")
    assert [p.pod for p in a.pods] == ["a1", "a2"]
    assert cluster.pod("b2").node is b
    assert (cluster.pod("b2").ip, cluster.pod("b2").ip6) == ("10.244.2.12", "fd00:244:2::12")
    assert a.node_name == "node-a"
    assert cluster["a1"] is cluster.pod("a1")
    assert a.sysctl("net.ipv4.ip_forward") == "1"
    assert a.sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert cluster.pod("a1").sysctl("net.ipv4.ip_forward") == "0"
    # Nobody learns routes from ICMP redirects (the interfaces inherit it from "default").
    for host in (cluster.client, a, cluster.pod("a1")):
        assert host.sysctl("net.ipv4.conf.eth0.accept_redirects") == "0"
        assert host.sysctl("net.ipv6.conf.eth0.accept_redirects") == "0"
    # Pods route Service CIDRs via their node: the default route.
    route = cluster.pod("a1").ip_cmd("route", "get", "10.96.0.1").stdout
    assert "via 169.254.1.1 dev eth0" in route
    route = cluster.pod("a1").ip_cmd("-6", "route", "get", "fd00:96::1").stdout
    assert "via fe80::1 dev eth0" in route
    # The client knows only the LAN.
    routes = cluster.client.ip_cmd("route").stdout.splitlines()
    assert [r.split()[0] for r in routes] == ["172.30.0.0/24"]
    routes = cluster.client.ip_cmd("-6", "route").stdout.splitlines()
    assert sorted(r.split()[0] for r in routes) == ["fd00:30::/64", "fe80::/64"]


def test_configurable_layout_and_client_routes(big: Cluster) -> None:
    assert [p.pod for p in big.node("a").pods] == ["a1", "a2", "a3"]
    assert big.node("c").pods == []
    assert (big.node("c").ip, big.node("c").pod_cidr) == ("172.30.0.4", "10.244.3.0/24")
    c1, c2 = big.clients["c1"], big.clients["c2"]
    assert (c1.ip, c2.ip, c2.ip6) == ("172.30.0.100", "172.30.0.101", "fd00:30::101")
    a3 = big.pod("a3")
    assert answered(http_get(big.pod("b1"), a3.ip, 8080), "a3", big.pod("b1").ip)
    assert answered(http_get(big.node("c"), a3.ip6, 8080), "a3", big.node("c").ip6)

    big.client_route("192.0.2.0/24", "a")
    big.client_route("2001:db8:1::/64", big.node("b"), client="c2")
    assert "via 172.30.0.2 dev eth0" in c1.ip_cmd("route", "get", "192.0.2.10").stdout
    assert "via fd00:30::3 dev eth0" in c2.ip_cmd("-6", "route", "get", "2001:db8:1::5").stdout
    # Without proxy rules, node-a forwards to the LAN router, which has no route: fails at once.
    assert isinstance(http_get(c1, "192.0.2.10", 80, 2), Unreachable)
    # A hostNetwork-style backend on the node answers on the node's own address.
    big.node("a").serve("host-a", tcp=[30080], udp=[30053])
    assert answered(http_get(c2, big.node("a").ip, 30080), "host-a", c2.ip)
    assert answered(udp_ask(c2, big.node("a").ip6, 30053), "host-a", c2.ip6)


def test_processes_commands_and_backends_restart(cluster: Cluster) -> None:
    a1 = cluster.pod("a1")
    assert "10.244.1.11/32" in a1.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    with pytest.raises(NetlabError, match="rc=1"):
        a1.run(["false"])
    assert a1.run("sh -c 'exit 3'", check=False).returncode == 3
    proc = a1.popen(["sleep", "60"])
    assert proc.alive()
    proc.stop()
    assert not proc.alive()
    # Replace the backends of two pods with other ports.
    cluster.start_backends(Serve(tcp=(80,), udp=()), pods=["a1", "b1"])
    assert answered(tcp_ask(cluster.pod("b2"), a1.ip, 80), "a1", cluster.pod("b2").ip)
    assert isinstance(tcp_ask(cluster.pod("b2"), a1.ip, 8080), Refused)


def test_sctp_support_is_detected() -> None:
    if sctp_supported():
        with Cluster({"a": ("a1",)}, serve=Serve(tcp=(), udp=(), sctp=(7777,))) as c:
            r = sctp_ask(c.node("a"), c.pod("a1").ip, 7777)
            assert answered(r, "a1", c.node("a").ip), r
    else:
        # The backend says so plainly instead of hanging; the cluster is still removed.
        c = Cluster({"a": ("a1",)}, serve=Serve(tcp=(), udp=(), sctp=(7777,)))
        with pytest.raises(NetlabError, match=r"[Pp]rotocol not supported"):
            c.up()
        assert not mine(c)


def test_setup_is_fast_and_teardown_removes_everything() -> None:
    before = ip_netns_list()
    c = Cluster()
    with c:
        names = set(c.ns_names())
        assert names <= list_netns()
        assert len(names) == 8  # lan, 2 nodes, 4 pods, client
        pids = [b.proc.pid for p in c.pods.values() if (b := p.backend) is not None]
        assert len(pids) == 4
        # A process started behind the harness's back is killed too.
        stray = subprocess.Popen(
            ["ip", "netns", "exec", c.pod("b2").name, "sleep", "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    assert stray.wait(timeout=2) == -signal.SIGKILL
    assert not mine(c)
    assert new_netlab_namespaces(before) == set()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert c.timing.setup + c.timing.backends < 2, c.timing
    assert c.timing.teardown < 2, c.timing


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_teardown_after_a_failing_test_body() -> None:
    before = ip_netns_list()
    c = Cluster(serve=Serve(tcp=(8080,), udp=()))
    with pytest.raises(ZeroDivisionError):
        _crash_inside(c)
    assert not mine(c)
    assert new_netlab_namespaces(before) == set()


def _crash_inside(c: Cluster) -> None:
    with c:
        c.pod("a1").popen(["sleep", "60"])
        _ = 1 / 0


def test_a_failing_setup_removes_what_it_built() -> None:
    # Port 70000 cannot be bound: backend start fails after all namespaces exist.
    before = ip_netns_list()
    c = Cluster({"a": ("a1",)}, serve=Serve(tcp=(70000,), udp=()))
    with pytest.raises(NetlabError, match="backend a1"):
        c.up()
    assert not mine(c)
    assert new_netlab_namespaces(before) == set()


def test_clusters_left_by_a_killed_process_are_reaped() -> None:
    code = (
        "import sys, json, time; sys.path.insert(0, sys.argv[1]);"
        "from netlab import Cluster;"
        "c = Cluster({'a': ('a1',)}).up();"
        "print(json.dumps(c.ns_names()), flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(TESTS)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        names = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert set(names) <= list_netns()
    removed = reap_stale()
    assert set(names) <= set(removed)
    assert not set(names) & list_netns()


def test_without_root_the_cluster_fails_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    c = Cluster()
    with pytest.raises(PermissionError, match="root"):
        c.up()
    assert not mine(c)


NAT_RULES = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:SVC - [0:0]
-A PREROUTING -j SVC
-A OUTPUT -j SVC
-A SVC -d {svc} -p tcp --dport 80 -j DNAT --to-destination {b1}:8080
-A SVC -d {hairpin} -p tcp --dport 80 -j MARK --set-xmark 0x4000/0x4000
-A SVC -d {hairpin} -p tcp --dport 80 -j DNAT --to-destination {a1}:8080
-A SVC -d {lb} -p tcp --dport 80 -j MARK --set-xmark 0x4000/0x4000
-A SVC -d {lb} -p tcp --dport 80 -j DNAT --to-destination {b1}:8080
-A SVC -d {lb} -p udp --dport 53 -j DNAT --to-destination {a1}:5353
-A SVC -d {node} -p tcp --dport 30080 -j MARK --set-xmark 0x4000/0x4000
-A SVC -d {node} -p tcp --dport 30080 -j DNAT --to-destination {b1}:8080
-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
COMMIT
"""


@FAMILIES
def test_topology_suits_a_proxy_on_node_a(cluster: Cluster, fam: int) -> None:
    """Hand-written kube-proxy-like NAT rules in node-a behave as in a real cluster."""
    a, client = cluster.node("a"), cluster.client
    a1, b1, b2 = cluster.pod("a1"), cluster.pod("b1"), cluster.pod("b2")
    svc, hairpin, lb = ("10.96.0.10", "10.96.0.11", "192.0.2.10")
    if fam == 6:
        svc, hairpin, lb = ("fd00:96::a", "fd00:96::b", "2001:db8:2::10")

    def ep(pod: Pod) -> str:
        return pod.ip if fam == 4 else f"[{pod.ip6}]"

    rules = NAT_RULES.format(
        svc=svc, hairpin=hairpin, lb=lb, node=a.addr(fam), a1=ep(a1), b1=ep(b1)
    )
    a.run(["iptables-restore" if fam == 4 else "ip6tables-restore"], input=rules)
    cluster.client_route(lb, "a")

    # ClusterIP from a pod: DNAT to the other node, the backend sees the pod.
    assert answered(http_get(a1, svc, 80), "b1", a1.addr(fam))
    # From the node itself (OUTPUT chain): the backend sees the node.
    assert answered(http_get(a, svc, 80), "b1", a.addr(fam))
    # Hairpin (a pod reaching itself through a Service) works only masqueraded.
    assert answered(http_get(a1, hairpin, 80), "a1", a.addr(fam))
    # LoadBalancer IP from outside: masqueraded to node-a, replies come back through it.
    assert answered(http_get(client, lb, 80), "b1", a.addr(fam))
    # Not masqueraded to a local endpoint (like externalTrafficPolicy Local): client IP kept.
    assert answered(udp_ask(client, lb, 53), "a1", client.addr(fam))
    # NodePort on node-a, from outside and from a pod on the other node.
    assert answered(http_get(client, a.addr(fam), 30080), "b1", a.addr(fam))
    assert answered(tcp_ask(b2, a.addr(fam), 30080), "b1", a.addr(fam))
    # The other node has no rules: its node port is closed.
    assert isinstance(tcp_ask(client, cluster.node("b").addr(fam), 30080), Refused)
