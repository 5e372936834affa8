"""IpvsProxier against a fake kernel that records every call: apply order, minimal writes,
failures, graceful termination with an injected clock, sysctls, and --cleanup.

Spec: pyproxy/ipvs/proxier.py and diff.py docstrings (the fixed apply order after kpng's
backends/ipvs/controller.go), upstream's NewProxier sysctls and cleanupLeftovers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from support import TEST_NODE, cluster_of, endpoint, endpoint_slice, port, service, slice_port

from pyproxy import sysctl
from pyproxy.cli import proxier_factory
from pyproxy.errors import ConfigError, KernelError, RestoreError
from pyproxy.ipvs.diff import CurrentRealServer, CurrentVirtualServer, KernelState
from pyproxy.ipvs.ipsets import IpsetType, canonical_member, parse_save
from pyproxy.ipvs.kernel import IpvsTimeouts
from pyproxy.ipvs.plan import RealServer, VirtualServer, VirtualServerKey
from pyproxy.ipvs.proxier import (
    STRICT_ARP_SYSCTLS,
    SYSCTLS,
    IpvsProxier,
    cleanup,
    our_ipset_names,
    prepare_host,
)
from pyproxy.model import IPAddress, IPFamily, NamespacedName
from pyproxy.model import Protocol as L4
from pyproxy.options import parse_options
from pyproxy.proxystate import ProxierConfig, ServicePortState, desired_state

ip = ipaddress.ip_address
CONFIG = ProxierConfig(
    family=IPFamily.IPv4,
    node_name=TEST_NODE,
    node_ips=(ip("192.168.0.2"),),
    cluster_cidr=ipaddress.ip_network("10.0.0.0/8"),
)


class FakeKernel:
    """An in-memory kernel: IPVS table, kube-ipvs0 addresses, ipsets; records every call."""

    def __init__(self, local: Iterable[str] = ("192.168.0.2", "127.0.0.1")) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.local = tuple(ip(a) for a in local)
        self.dummy = False
        self.bound: set[IPAddress] = set()
        self.servers: dict[VirtualServerKey, VirtualServer] = {}
        self.reals: dict[VirtualServerKey, dict[tuple[IPAddress, int], CurrentRealServer]] = {}
        self.sets: dict[str, tuple[str, set[str]]] = {}
        self.fail: dict[str, Exception] = {}
        self.available = True

    # context manager
    def __enter__(self) -> FakeKernel:
        self.calls.append(("open",))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.calls.append(("close",))

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    # reading
    def ensure_dummy(self) -> None:
        self._call("ensure_dummy")
        self.dummy = True

    def delete_dummy(self) -> bool:
        self._call("delete_dummy")
        existed, self.dummy = self.dummy, False
        self.bound.clear()
        return existed

    def ipvs_available(self) -> bool:
        return self.available

    def local_addresses(self) -> tuple[IPAddress, ...]:
        self._call("local_addresses")
        return self.local

    def read_state(self, *, virtual_servers: bool = True) -> KernelState:
        self._call("read_state")
        servers = {
            k: CurrentVirtualServer(vs, tuple(self.reals[k].values()))
            for k, vs in self.servers.items()
        }
        sets = {name: ipsets_current(kind, members) for name, (kind, members) in self.sets.items()}
        return KernelState(servers if virtual_servers else {}, frozenset(self.bound), sets)

    # IPVS
    def add_virtual_server(self, vs: VirtualServer) -> None:
        self._call("add_virtual_server", str(vs.key))
        assert vs.key not in self.servers
        self.servers[vs.key] = vs
        self.reals[vs.key] = {}

    def update_virtual_server(self, vs: VirtualServer) -> None:
        self._call("update_virtual_server", str(vs.key))
        self.servers[vs.key] = vs

    def delete_virtual_server(self, vs: VirtualServer) -> None:
        self._call("delete_virtual_server", str(vs.key))
        del self.servers[vs.key]
        del self.reals[vs.key]

    def add_real_server(self, vs: VirtualServer, rs: RealServer) -> None:
        self._call("add_real_server", str(vs.key), rs.endpoint, rs.weight)
        self.reals[vs.key][(rs.address, rs.port)] = CurrentRealServer(
            rs.address, rs.port, rs.weight
        )

    def update_real_server(self, vs: VirtualServer, rs: RealServer) -> None:
        self._call("update_real_server", str(vs.key), rs.endpoint, rs.weight)
        old = self.reals[vs.key][(rs.address, rs.port)]
        self.reals[vs.key][(rs.address, rs.port)] = CurrentRealServer(
            rs.address, rs.port, rs.weight, old.active_connections, old.inactive_connections
        )

    def delete_real_server(self, vs: VirtualServer, rs: RealServer) -> None:
        self._call("delete_real_server", str(vs.key), rs.endpoint)
        del self.reals[vs.key][(rs.address, rs.port)]

    def connections(self, vs: str, endpoint: str, active: int, inactive: int = 0) -> None:
        """Test hook: set a real server's connection counts."""
        for k, reals in self.reals.items():
            if str(k) != vs:
                continue
            for a, rs in reals.items():
                if rs.endpoint == endpoint:
                    reals[a] = CurrentRealServer(rs.address, rs.port, rs.weight, active, inactive)
                    return
        raise KeyError((vs, endpoint))

    # addresses
    def bind_address(self, address: IPAddress) -> None:
        self._call("bind_address", str(address))
        assert self.dummy
        self.bound.add(address)

    def unbind_address(self, address: IPAddress) -> None:
        self._call("unbind_address", str(address))
        self.bound.discard(address)

    # ipsets
    def restore_ipsets(self, text: str) -> None:
        self._call("restore_ipsets", text)
        for line in text.splitlines():
            words = line.split()
            if words[0] == "create":
                self.sets.setdefault(words[1], (words[2], set()))
            elif words[0] == "add":
                self.sets[words[1]][1].add(words[2])
            elif words[0] == "del":
                self.sets[words[1]][1].discard(words[2])

    def destroy_ipsets(self, names: Iterable[str]) -> None:
        names = list(names)
        self._call("destroy_ipsets", names)
        for name in names:
            self.sets.pop(name, None)

    def set_timeouts(self, timeouts: IpvsTimeouts) -> None:
        self._call("set_timeouts", timeouts)

    def writes(self) -> list[tuple[Any, ...]]:
        reads = {"open", "close", "ensure_dummy", "local_addresses", "read_state"}
        return [c for c in self.calls if c[0] not in reads]


def ipsets_current(kind: str, members: set[str]) -> Any:
    from pyproxy.ipvs.ipsets import CurrentIpset

    return CurrentIpset(kind, frozenset(members))


class FakeIptables:
    family = IPFamily.IPv4

    def __init__(self, saved: str = "") -> None:
        self.saved = saved
        self.restored: list[str] = []
        self.fail: Exception | None = None
        self.log: list[tuple[Any, ...]] | None = None

    def save(self, tables: tuple[str, ...] = ("filter", "nat")) -> str:
        return self.saved

    def restore(self, document: str) -> None:
        if self.log is not None:
            self.log.append(("iptables_restore",))
        if self.fail is not None:
            raise self.fail
        self.restored.append(document)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def states_of(*objects: Mapping[str, Any]) -> dict[NamespacedName, tuple[ServicePortState, ...]]:
    return desired_state(cluster_of(objects), CONFIG)


def web(*endpoints: str) -> dict[NamespacedName, tuple[ServicePortState, ...]]:
    return states_of(
        service("ns1", "web", "10.96.0.10", [port("http", 80, node_port=30080)], type="NodePort"),
        endpoint_slice(
            "ns1", "web", [endpoint(e, "other") for e in endpoints], [slice_port("http", 8080)]
        ),
    )


def proxier(kernel: FakeKernel, iptables: FakeIptables | None = None, **kw: Any) -> IpvsProxier:
    iptables = iptables or FakeIptables()
    iptables.log = kernel.calls
    return IpvsProxier(CONFIG, iptables, kernel=lambda: kernel, set_sysctls=False, **kw)


# --- apply order ----------------------------------------------------------------------------


def test_first_sync_programs_everything_in_the_safe_order() -> None:
    kernel = FakeKernel()
    iptables = FakeIptables()
    result = proxier(kernel, iptables).sync(web("10.0.2.1", "10.0.2.2"))
    names = [c[0] for c in kernel.calls]
    assert names == [
        "open",
        "ensure_dummy",
        "local_addresses",
        "read_state",
        "add_virtual_server",  # 10.96.0.10:80
        "add_virtual_server",  # 192.168.0.2:30080
        "add_real_server",
        "add_real_server",
        "add_real_server",
        "add_real_server",
        "restore_ipsets",
        "iptables_restore",
        "bind_address",
        "close",
    ]
    assert ("bind_address", "10.96.0.10") in kernel.calls
    assert result.full
    assert result.details["virtual_servers"] == 2
    assert result.details["real_servers"] == 4
    assert result.details["operations"] == 9
    # A full sync inserts upstream's hooks (none exist yet) and the canary chain.
    (document,) = iptables.restored
    assert '-I INPUT 1 -m comment --comment "kubernetes ipvs access filter"' in document
    assert ":KUBE-PROXY-CANARY - [0:0]" in document
    assert result.restore_bytes == len(document)


def test_second_sync_with_the_same_state_writes_nothing() -> None:
    kernel = FakeKernel()
    iptables = FakeIptables()
    p = proxier(kernel, iptables)
    p.sync(web("10.0.2.1"))
    kernel.calls.clear()
    result = p.sync(web("10.0.2.1"), changed=set())
    assert kernel.writes() == []
    assert len(iptables.restored) == 1
    assert not result.full
    assert result.details["operations"] == 0
    assert result.restore_bytes == 0


def test_full_sync_rewrites_iptables_but_not_ipvs() -> None:
    kernel = FakeKernel()
    iptables = FakeIptables()
    p = proxier(kernel, iptables)
    p.sync(web("10.0.2.1"))
    kernel.calls.clear()
    result = p.sync(web("10.0.2.1"))  # changed=None: a full sync
    assert result.full
    assert [c[0] for c in kernel.writes()] == ["iptables_restore"]
    assert len(iptables.restored) == 2


def test_changes_touch_only_what_changed_in_phase_order() -> None:
    kernel = FakeKernel()
    p = proxier(kernel)
    two = states_of(
        service("ns1", "a", "10.96.0.1", [port()]),
        endpoint_slice("ns1", "a", [endpoint("10.0.2.1", "x"), endpoint("10.0.2.2", "x")]),
        service("ns1", "b", "10.96.0.2", [port()]),
        endpoint_slice("ns1", "b", ["10.0.2.3"]),
    )
    p.sync(two)
    kernel.calls.clear()
    changed = states_of(
        service("ns1", "a", "10.96.0.1", [port()]),
        endpoint_slice("ns1", "a", [endpoint("10.0.2.2", "x"), endpoint("10.0.2.4", "x")]),
        service("ns1", "c", "10.96.0.3", [port()]),
        endpoint_slice("ns1", "c", ["10.0.2.5"]),
    )
    p.sync(changed, changed={NamespacedName("ns1", "a"), NamespacedName("ns1", "b")})
    text = next(c[1] for c in kernel.calls if c[0] == "restore_ipsets")
    # The rules did not change (the same sets are non-empty): no iptables-restore.
    assert kernel.writes() == [
        ("unbind_address", "10.96.0.2"),
        ("delete_real_server", "10.96.0.1:80/TCP", "10.0.2.1:80"),
        ("delete_virtual_server", "10.96.0.2:80/TCP"),
        ("add_virtual_server", "10.96.0.3:80/TCP"),
        ("add_real_server", "10.96.0.1:80/TCP", "10.0.2.4:80", 1),
        ("add_real_server", "10.96.0.3:80/TCP", "10.0.2.5:80", 1),
        ("restore_ipsets", text),
        ("bind_address", "10.96.0.3"),
    ]
    assert "add KUBE-CLUSTER-IP 10.96.0.3,tcp:80" in text
    assert "del KUBE-CLUSTER-IP 10.96.0.2,tcp:80" in text


def test_iptables_are_rewritten_on_a_partial_sync_only_when_the_rules_change() -> None:
    kernel = FakeKernel()
    iptables = FakeIptables()
    p = proxier(kernel, iptables)
    p.sync(web("10.0.2.1"))
    p.sync(web("10.0.2.1", "10.0.2.2"), changed={NamespacedName("ns1", "web")})
    assert len(iptables.restored) == 1  # same sets non-empty: same rules
    lb = states_of(
        service("ns1", "lb", "10.96.0.5", [port()], type="LoadBalancer", lb_ingress=["192.0.2.5"]),
        endpoint_slice("ns1", "lb", ["10.0.2.5"]),
    )
    p.sync({**web("10.0.2.1"), **lb}, changed={NamespacedName("ns1", "lb")})
    assert len(iptables.restored) == 2
    assert "-j KUBE-LOAD-BALANCER" in iptables.restored[-1]
    assert ":KUBE-PROXY-CANARY" not in iptables.restored[-1]


def test_existing_hooks_are_not_inserted_again() -> None:
    saved = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n"
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        "COMMIT\n"
    )
    kernel = FakeKernel()
    iptables = FakeIptables(saved)
    proxier(kernel, iptables).sync(web("10.0.2.1"))
    document = iptables.restored[0]
    assert "-I PREROUTING 1" not in document
    assert '-I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in (
        document
    )


# --- failures -------------------------------------------------------------------------------


def test_a_failing_virtual_server_does_not_block_the_others() -> None:
    kernel = FakeKernel()
    kernel.fail["add_real_server"] = KernelError("no such scheduler")
    p = proxier(kernel)
    with pytest.raises(KernelError, match="IPVS operation"):
        p.sync(web("10.0.2.1"))
    names = [c[0] for c in kernel.writes()]
    assert names.count("add_real_server") == 2  # both attempted
    assert names[-3:] == ["restore_ipsets", "iptables_restore", "bind_address"]
    assert p.need_full_sync
    # The next sync retries what is missing.
    del kernel.fail["add_real_server"]
    kernel.calls.clear()
    p.sync(web("10.0.2.1"), changed=set())
    assert [c[0] for c in kernel.writes()] == [
        "add_real_server",
        "add_real_server",
        "iptables_restore",  # full sync after the failure
    ]
    assert not p.need_full_sync


def test_a_failing_iptables_restore_stops_before_binding() -> None:
    kernel = FakeKernel()
    iptables = FakeIptables()
    iptables.fail = RestoreError("iptables-restore failed", ("3: -A BAD",))
    p = proxier(kernel, iptables)
    with pytest.raises(RestoreError):
        p.sync(web("10.0.2.1"))
    assert "bind_address" not in [c[0] for c in kernel.calls]
    assert p.need_full_sync


def test_a_failing_ipset_restore_stops_before_iptables() -> None:
    kernel = FakeKernel()
    kernel.fail["restore_ipsets"] = KernelError("ipset restore failed")
    iptables = FakeIptables()
    with pytest.raises(KernelError, match="ipset restore failed"):
        proxier(kernel, iptables).sync(web("10.0.2.1"))
    assert iptables.restored == []
    assert "bind_address" not in [c[0] for c in kernel.calls]


def test_unknown_scheduler_is_a_config_error_when_the_flags_are_parsed() -> None:
    # Checked (and normalised) once, by parse_options; the proxier takes the result as it is.
    with pytest.raises(ConfigError, match="--ipvs-scheduler"):
        parse_options(["--ipvs-scheduler", "nope"])
    assert parse_options(["--ipvs-scheduler", " wrr "]).ipvs_scheduler == "wrr"
    assert parse_options(["--ipvs-scheduler", ""]).ipvs_scheduler == "rr"


# --- graceful termination -------------------------------------------------------------------


def test_graceful_termination_with_an_injected_clock() -> None:
    kernel = FakeKernel()
    clock = Clock()
    p = proxier(kernel, clock=clock, drain_timeout=600)
    p.sync(web("10.0.2.1", "10.0.2.2"))
    kernel.connections("10.96.0.10:80/TCP", "10.0.2.1:8080", active=1)
    kernel.connections("192.168.0.2:30080/TCP", "10.0.2.1:8080", active=0, inactive=0)
    changed = {NamespacedName("ns1", "web")}

    # The endpoint goes away: the busy real server drains, the idle one is deleted.
    kernel.calls.clear()
    result = p.sync(web("10.0.2.2"), changed=changed)
    assert kernel.writes()[:2] == [
        ("update_real_server", "10.96.0.10:80/TCP", "10.0.2.1:8080", 0),
        ("delete_real_server", "192.168.0.2:30080/TCP", "10.0.2.1:8080"),
    ]
    assert result.details["draining"] == 1

    # A minute later, still busy: nothing.
    clock.now += 60
    kernel.calls.clear()
    p.sync(web("10.0.2.2"), changed=set())
    assert kernel.writes() == []

    # The connection closes: deleted.
    kernel.connections("10.96.0.10:80/TCP", "10.0.2.1:8080", active=0)
    clock.now += 60
    kernel.calls.clear()
    result = p.sync(web("10.0.2.2"), changed=set())
    assert kernel.writes() == [("delete_real_server", "10.96.0.10:80/TCP", "10.0.2.1:8080")]
    assert result.details["draining"] == 0
    assert p.draining == {}


def test_graceful_termination_timeout_and_comeback() -> None:
    kernel = FakeKernel()
    clock = Clock()
    p = proxier(kernel, clock=clock, drain_timeout=600)
    p.sync(web("10.0.2.1", "10.0.2.2"))
    kernel.connections("10.96.0.10:80/TCP", "10.0.2.1:8080", active=2)
    kernel.connections("192.168.0.2:30080/TCP", "10.0.2.1:8080", active=2)
    p.sync(web("10.0.2.2"), changed=set())
    assert len(p.draining) == 2

    # It comes back while draining: weight 1 again, nothing deleted.
    kernel.calls.clear()
    p.sync(web("10.0.2.1", "10.0.2.2"), changed=set())
    assert kernel.writes() == [
        ("update_real_server", "10.96.0.10:80/TCP", "10.0.2.1:8080", 1),
        ("update_real_server", "192.168.0.2:30080/TCP", "10.0.2.1:8080", 1),
    ]
    assert p.draining == {}

    # Gone again and never idle: deleted once the timeout has passed.
    p.sync(web("10.0.2.2"), changed=set())
    clock.now += 599
    kernel.calls.clear()
    p.sync(web("10.0.2.2"), changed=set())
    assert kernel.writes() == []
    clock.now += 1
    p.sync(web("10.0.2.2"), changed=set())
    assert [c[0] for c in kernel.writes()] == ["delete_real_server", "delete_real_server"]


# --- sysctls --------------------------------------------------------------------------------


def _fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> Path:
    for key, value in values.items():
        path = tmp_path / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    monkeypatch.setattr(sysctl, "_ROOT", tmp_path)
    return tmp_path


def test_prepare_host_sets_upstreams_sysctls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [k for k, _ in SYSCTLS] + ["net.ipv4.vs.conn_reuse_mode"]
    root = _fake_proc(tmp_path, monkeypatch, dict.fromkeys(keys, "0"))
    changed = prepare_host(release=(6, 1, 0))
    assert changed == [
        "net.ipv4.vs.conntrack=1",
        "net.ipv4.vs.expire_nodest_conn=1",
        "net.ipv4.vs.expire_quiescent_template=1",
        "net.ipv4.ip_forward=1",
    ]
    assert (root / "net/ipv4/vs/conntrack").read_text() == "1\n"
    assert prepare_host(release=(6, 1, 0)) == []  # idempotent
    # conn_reuse_mode=0 only on kernels between 4.1 and 5.9 (upstream).
    (root / "net/ipv4/vs/conn_reuse_mode").write_text("1\n")
    assert prepare_host(release=(5, 4, 0)) == ["net.ipv4.vs.conn_reuse_mode=0"]


def test_strict_arp_sets_arp_ignore_and_arp_announce_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [k for k, _ in (*SYSCTLS, *STRICT_ARP_SYSCTLS)]
    root = _fake_proc(tmp_path, monkeypatch, dict.fromkeys(keys, "0"))
    prepare_host(release=(6, 1, 0))
    assert (root / "net/ipv4/conf/all/arp_ignore").read_text() == "0\n"
    assert prepare_host(release=(6, 1, 0), strict_arp=True) == [
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
    ]
    assert (root / "net/ipv4/conf/all/arp_ignore").read_text() == "1\n"
    assert (root / "net/ipv4/conf/all/arp_announce").read_text() == "2\n"
    # Upstream's EnsureSysctl: any other value is set back, even a "stricter" one.
    (root / "net/ipv4/conf/all/arp_announce").write_text("1\n")
    assert prepare_host(release=(6, 1, 0), strict_arp=True) == ["net.ipv4.conf.all.arp_announce=2"]


def test_prepare_host_without_ip_vs_fails_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_proc(tmp_path, monkeypatch, {"net.ipv4.ip_forward": "1"})
    with pytest.raises(KernelError, match="modprobe ip_vs"):
        prepare_host()


# --- cleanup --------------------------------------------------------------------------------


SAVED_BOTH_MODES = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ABC - [0:0]
:FOREIGN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A FOREIGN -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -p tcp --dport 22 -j KUBE-NODE-PORT
COMMIT
"""


def test_cleanup_removes_ours_and_keeps_what_others_use() -> None:
    kernel = FakeKernel()
    p = proxier(kernel)
    p.sync(web("10.0.2.1"))
    foreign_key = VirtualServerKey(L4.TCP, ip("172.16.0.1"), 80)
    kernel.servers[foreign_key] = VirtualServer(foreign_key, "wlc")
    kernel.reals[foreign_key] = {}
    kernel.sets["SOMEONE-ELSE"] = ("hash:ip", set())
    iptables = FakeIptables(SAVED_BOTH_MODES)
    result = cleanup([iptables], kernel=lambda: kernel)
    assert result.virtual_servers_deleted == 2
    assert result.dummy_deleted
    assert set(kernel.servers) == {foreign_key}
    assert set(kernel.sets) == {"SOMEONE-ELSE"}
    assert set(result.ipsets_destroyed) == {n for n in our_ipset_names() if "6" not in n}
    (document,) = iptables.restored
    # Hooks removed, chains flushed and deleted; FOREIGN and KUBE-FIREWALL (kubelet's) kept,
    # and filter KUBE-NODE-PORT is kept because a foreign rule still jumps to it.
    assert '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in (
        document
    )
    assert "-X KUBE-SVC-ABC" in document
    assert "-X KUBE-LOAD-BALANCER" in document
    assert "-X KUBE-IPVS-OUT-FILTER" in document
    assert "FOREIGN" not in document
    assert "KUBE-FIREWALL" not in document
    filter_part = document[document.index("*filter") :]
    assert "-X KUBE-NODE-PORT" not in filter_part
    assert '-D INPUT -m comment --comment "kubernetes health check rules"' not in filter_part
    # Deletions happen once, even for hooks both modes share.
    assert document.count('-D OUTPUT -m comment --comment "kubernetes service portals"') == 1


def test_cleanup_without_ip_vs_still_removes_sets_and_the_dummy() -> None:
    kernel = FakeKernel()
    proxier(kernel).sync(web("10.0.2.1"))
    kernel.available = False
    result = cleanup([FakeIptables()], kernel=lambda: kernel)
    assert not result.ipvs_available
    assert result.virtual_servers_deleted == 0
    assert kernel.sets == {}
    assert result.dummy_deleted


# --- ipset text -------------------------------------------------------------------------------


def test_parse_ipset_save_canonicalises_members() -> None:
    text = (
        "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536 comment"
        " bucketsize 12 initval 0x1\n"
        'add KUBE-6-CLUSTER-IP fd00:96:0::0010,tcp:80 comment "x y"\n'
        "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 comment\n"
        'add KUBE-NODE-PORT-TCP 30080 comment "z"\n'
        "create OTHER list:set size 8\n"
    )
    sets = parse_save(text)
    assert sets["KUBE-6-CLUSTER-IP"].members == {"fd00:96::10,tcp:80"}
    assert sets["KUBE-NODE-PORT-TCP"].members == {"30080"}
    assert sets["OTHER"].type == "list:set"
    assert sets["OTHER"].members == frozenset()
    assert canonical_member(IpsetType.HASH_IP_PORT_NET, "1.2.3.4,udp:53,10.0.0.0/8") == (
        "1.2.3.4,udp:53,10.0.0.0/8"
    )
    assert canonical_member(IpsetType.HASH_IP, "garbage") == "garbage"


def test_full_keyword_forces_a_full_sync_like_the_iptables_proxier() -> None:
    kernel = FakeKernel()
    iptables = FakeIptables()
    p = proxier(kernel, iptables)
    p.sync(web("10.0.2.1"))
    result = p.sync(web("10.0.2.1"), set(), full=True)
    assert result.full
    assert len(iptables.restored) == 2
    assert ":KUBE-PROXY-CANARY" in iptables.restored[-1]


# --- --ipvs-*-timeout, --ipvs-exclude-cidrs, and the flags reaching the proxier --------------


def test_timeouts_are_set_once_on_the_first_sync_before_anything_else() -> None:
    kernel = FakeKernel()
    timeouts = IpvsTimeouts(tcp=900, tcp_fin=30, udp=45)
    p = proxier(kernel, timeouts=timeouts)
    p.sync(web("10.0.2.1"))
    p.sync(web("10.0.2.1", "10.0.2.2"), {NamespacedName("ns1", "web")})
    assert [c for c in kernel.calls if c[0] == "set_timeouts"] == [("set_timeouts", timeouts)]
    assert kernel.writes()[0] == ("set_timeouts", timeouts)


def test_timeouts_all_zero_leave_the_kernel_alone() -> None:
    kernel = FakeKernel()
    proxier(kernel).sync(web("10.0.2.1"))
    proxier(kernel, timeouts=IpvsTimeouts.from_seconds(0.5, 0, 0.999)).sync(web("10.0.2.1"))
    assert not [c for c in kernel.calls if c[0] == "set_timeouts"]


def test_a_failure_to_set_the_timeouts_is_logged_and_the_sync_goes_on() -> None:
    kernel = FakeKernel()
    kernel.fail["set_timeouts"] = KernelError("set IPVS timeouts: [Errno 22] Invalid argument")
    result = proxier(kernel, timeouts=IpvsTimeouts(tcp=1)).sync(web("10.0.2.1"))
    assert result.details["virtual_servers"] == 2
    assert ip("10.96.0.10") in kernel.bound


def test_timeouts_are_whole_seconds_truncated_as_upstream() -> None:
    assert IpvsTimeouts.from_seconds(90.9, 0.5, 3600) == IpvsTimeouts(90, 0, 3600)
    assert IpvsTimeouts.from_seconds(2.0**40, 0, 0).tcp == 0xFFFFFFFF
    assert not IpvsTimeouts()
    assert IpvsTimeouts(udp=1)


def test_excluded_stale_virtual_server_survives_a_sync() -> None:
    kernel = FakeKernel()
    both = states_of(
        service("ns1", "web", "10.96.0.10", [port("http", 80)]),
        endpoint_slice("ns1", "web", [endpoint("10.0.2.1", "other")], [slice_port("http", 8080)]),
        service("ns1", "kept", "10.97.0.10", [port("http", 80)]),
        endpoint_slice("ns1", "kept", [endpoint("10.0.2.2", "other")], [slice_port("http", 8080)]),
    )
    excluded = (ipaddress.ip_network("10.97.0.0/16"), ipaddress.ip_network("fd00:97::/64"))
    p = proxier(kernel, exclude_cidrs=excluded)
    assert p.exclude_cidrs == (ipaddress.ip_network("10.97.0.0/16"),)  # this family's only
    p.sync(both)
    p.sync({}, set(both))
    assert {str(k) for k in kernel.servers} == {"10.97.0.10:80/TCP"}
    assert ("delete_virtual_server", "10.96.0.10:80/TCP") in kernel.calls


def test_the_flags_reach_the_proxier() -> None:
    options = parse_options(
        [
            "--proxy-mode=ipvs",
            "--ipvs-scheduler=wrr",
            "--ipvs-exclude-cidrs=10.97.0.0/16, fd00:97::/64",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout=15m",
            "--ipvs-tcpfin-timeout=30s",
            "--ipvs-udp-timeout=1m30.5s",
        ]
    )
    p = proxier_factory(options, "nft")(CONFIG)
    assert isinstance(p, IpvsProxier)
    assert p.scheduler == "wrr"
    assert p.exclude_cidrs == (ipaddress.ip_network("10.97.0.0/16"),)
    assert p.strict_arp
    assert p.timeouts == IpvsTimeouts(tcp=900, tcp_fin=30, udp=90)
    default = proxier_factory(parse_options(["--proxy-mode=ipvs"]), "nft")(CONFIG)
    assert isinstance(default, IpvsProxier)
    assert (default.exclude_cidrs, default.strict_arp, default.timeouts) == (
        (),
        False,
        IpvsTimeouts(),
    )
