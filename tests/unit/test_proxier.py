"""IptablesProxier: what a partial, a full and a post-failure sync write (fake iptables adapter)."""

from __future__ import annotations

import ipaddress

import pytest

from pyproxy.errors import RestoreError
from pyproxy.iptables.proxier import IptablesProxier
from pyproxy.model import IPFamily, NamespacedName, Protocol, Service, ServicePort, ServiceType
from pyproxy.proxystate import ProxierConfig, service_state


class FakeIptables:
    """Records restore documents; iptables-save returns what a test sets."""

    family = IPFamily.IPv4
    backend = "fake"

    def __init__(self) -> None:
        self.documents: list[str] = []
        self.saved = ""
        self.fail_next = False
        self.saves = 0

    def save(self, tables: tuple[str, ...] = ("filter", "nat")) -> str:
        self.saves += 1
        return self.saved

    def restore(self, document: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RestoreError("boom", ("3: -A BAD",))
        self.documents.append(document)


CONFIG = ProxierConfig(
    family=IPFamily.IPv4, node_name="n", node_ips=(ipaddress.ip_address("192.168.0.2"),)
)


def states(n: int) -> dict[NamespacedName, tuple]:  # type: ignore[type-arg]
    out = {}
    for i in range(n):
        svc = Service(
            "ns",
            f"s{i}",
            ServiceType.CLUSTER_IP,
            (ipaddress.ip_address(f"10.96.0.{i + 1}"),),
            (ServicePort("p", Protocol.TCP, 80),),
        )
        out[svc.namespaced_name] = service_state(svc, (), CONFIG)
    return out


def test_partial_sync_writes_only_changed_chains_and_full_reads_the_kernel() -> None:
    ipt = FakeIptables()
    proxier = IptablesProxier(CONFIG, ipt)  # type: ignore[arg-type]
    s = states(3)
    first = proxier.sync(s)
    assert first.full and ipt.saves == 1 and "KUBE-PROXY-CANARY" in ipt.documents[-1]

    changed = {NamespacedName("ns", "s1")}
    partial = proxier.sync(s, changed)
    assert not partial.full and ipt.saves == 1
    assert partial.services_written == 1
    assert partial.restore_bytes < first.restore_bytes

    periodic = proxier.sync(s, set(), full=True)
    assert periodic.full and ipt.saves == 2 and periodic.services_written == 3


def test_failure_makes_the_next_sync_full_and_stale_chains_go() -> None:
    ipt = FakeIptables()
    proxier = IptablesProxier(CONFIG, ipt)  # type: ignore[arg-type]
    s = states(2)
    proxier.sync(s)
    ipt.fail_next = True
    with pytest.raises(RestoreError):
        proxier.sync(s, {NamespacedName("ns", "s0")})
    assert proxier.need_full_sync
    ipt.saved = "*nat\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:SOMEONE-ELSE - [0:0]\nCOMMIT\n"
    result = proxier.sync(s, set())
    assert result.full
    doc = ipt.documents[-1]
    assert "-X KUBE-SVC-AAAAAAAAAAAAAAAA" in doc and "SOMEONE-ELSE" not in doc


def test_deleted_service_chains_are_removed_in_a_partial_sync() -> None:
    ipt = FakeIptables()
    proxier = IptablesProxier(CONFIG, ipt)  # type: ignore[arg-type]
    s = states(2)
    proxier.sync(s)
    gone = NamespacedName("ns", "s1")
    del s[gone]
    result = proxier.sync(s, {gone})
    assert not result.full
    assert ipt.documents[-1].count("-X KUBE-") == 0  # s1 has no endpoints: no nat chains
    assert "ns/s1:p has no endpoints" not in ipt.documents[-1]
