"""IptablesProxier: what a partial, a full and a post-failure sync write (fake iptables adapter)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import pytest
from support import cluster_of, endpoint_slice, port, service, slice_port

from pyproxy.errors import RestoreError
from pyproxy.iptables.proxier import IptablesProxier
from pyproxy.model import IPFamily, NamespacedName, Protocol, Service, ServicePort, ServiceType
from pyproxy.proxystate import (
    LazyStates,
    ProxierConfig,
    count_endpoints,
    desired_state,
    service_state,
)


class FakeIptables:
    """Records restore documents; iptables-save returns what a test sets."""

    family = IPFamily.IPv4
    backend = "fake"

    def __init__(self) -> None:
        self.documents: list[str] = []
        self.saved = ""
        self.fail_next = False
        self.saves = 0
        self.streams = 0

    def save(self, tables: tuple[str, ...] = ("filter", "nat")) -> str:
        self.saves += 1
        return self.saved

    def restore(self, document: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RestoreError("boom", ("3: -A BAD",))
        self.documents.append(document)

    def restore_stream(self, chunks: Iterable[str]) -> int:
        self.streams += 1
        document = "".join(chunks)
        self.restore(document)
        return len(document)


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


# --- full syncs computing states as they stream (LazyStates) ------------------------------


def lazy_of(objects: list[dict]) -> tuple[LazyStates, dict]:  # type: ignore[type-arg]
    cluster = cluster_of(objects)
    tracker_slices: dict[NamespacedName, list] = {}  # type: ignore[type-arg]
    for es in cluster.endpoint_slices.values():
        tracker_slices.setdefault(es.service, []).append(es)
    into: dict = {}  # type: ignore[type-arg]
    lazy = LazyStates(
        cluster.services, {k: tuple(v) for k, v in tracker_slices.items()}, CONFIG, into
    )
    return lazy, desired_state(cluster, CONFIG)


def wide_cluster(endpoints: int, slice_ports: int) -> list[dict]:  # type: ignore[type-arg]
    """One single-port Service whose slice has `endpoints` endpoints and `slice_ports` ports
    (only the first matches the Service): endpoints_upper_bound overestimates by that factor."""
    ports = [slice_port("p80", 8080)] + [
        slice_port(f"x{k}", 9000 + k) for k in range(1, slice_ports)
    ]
    ips = [f"10.1.{k // 250}.{k % 250 + 1}" for k in range(endpoints)]
    return [
        service("ns", "wide", "10.96.1.1", [port("p80", 80)]),
        endpoint_slice("ns", "wide", ips, ports),
        service("ns", "small", "10.96.1.2", [port("p80", 80)]),
        endpoint_slice("ns", "small", ["10.2.0.1"]),
    ]


def test_lazy_states_walked_in_full_are_the_desired_state() -> None:
    lazy, expected = lazy_of(wide_cluster(40, 3))
    assert lazy.into == {}
    for name in lazy.names():
        lazy.get(name)
    assert lazy.into == expected
    assert lazy.endpoints_upper_bound() >= count_endpoints(expected)
    assert lazy.endpoints_upper_bound() == 40 * 3 + 1


@pytest.mark.parametrize(
    ("endpoints", "slice_ports", "large", "attempts"),
    [
        (900, 1, False, 1),  # bound 901: small, certain
        (900, 2, False, 2),  # bound 1,801 guesses large; 901 real: written again, small
        (1200, 1, True, 1),  # bound and count over the threshold: large
    ],
)
def test_a_streamed_full_sync_decides_the_large_cluster_mode_as_upstream(
    endpoints: int, slice_ports: int, large: bool, attempts: int
) -> None:
    ipt = FakeIptables()
    lazy, expected = lazy_of(wide_cluster(endpoints, slice_ports))
    result = IptablesProxier(CONFIG, ipt).sync(lazy)  # type: ignore[arg-type]
    assert result.full and ipt.streams == attempts and len(ipt.documents) == 1
    assert lazy.into == expected
    # Upstream drops the KUBE-SEP- comments in large-cluster mode.
    sep_rules = [line for line in ipt.documents[0].splitlines() if line.startswith("-A KUBE-SEP-")]
    assert len(sep_rules) == 2 * (endpoints + 1)
    assert any("--comment" in line for line in sep_rules) is not large
    # The same as rendering the precomputed state.
    again = FakeIptables()
    IptablesProxier(CONFIG, again).sync(expected)  # type: ignore[arg-type]
    assert again.documents == ipt.documents
