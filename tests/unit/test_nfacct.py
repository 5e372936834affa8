"""nfacct: the rules that count into upstream's counters, and the metrics read from them.

The renderer writes `-m nfacct` only for the counters in `ProxierConfig.nfacct_counters` (what
the shell could ensure); with all of them, upstream's TestOverallIPTablesRules expected output
is reproduced verbatim, with none the output is today's (the goldens). The collector is checked
with `FakeNfacct` (tests/fakes.py); the netlink client against the kernel in
tests/kernel/test_nfacct_packets.py.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from fakes import FakeNfacct
from support import GOLDEN_DIR, cluster_of, golden_args, load_objects, without_hooks

from pyproxy.cli import _configs
from pyproxy.errors import KernelError
from pyproxy.iptables.render import render_ruleset
from pyproxy.iptables.tracer import sort_ruleset_text
from pyproxy.iptables.vocabulary import jump_rules
from pyproxy.metrics import Metrics
from pyproxy.model import IPFamily
from pyproxy.nfacct import (
    NFACCT_BYTES,
    NFACCT_NAME,
    NFACCT_PKTS,
    decode_counter,
    ensure_counters,
)
from pyproxy.options import parse_options
from pyproxy.proxystate import (
    CT_STATE_INVALID_DROPPED_NFACCT_COUNTER,
    LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER,
    NFACCT_COUNTERS,
    desired_state,
)

UPSTREAM_OVERALL_NFACCT = GOLDEN_DIR / "upstream-TestOverallIPTablesRules-nfacct.txt"
UPSTREAM_OVERALL = GOLDEN_DIR / "upstream-TestOverallIPTablesRules.txt"
LOCALHOST_METRIC = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
INVALID_METRIC = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"


def _overall(counters: frozenset[str], *extra: str) -> dict[IPFamily, str]:
    """The restore text (hooks left out) of upstream's six Services, per family."""
    objects = [
        o
        for o in load_objects(GOLDEN_DIR / "overall.yaml")
        if o["metadata"]["namespace"] in {"ns1", "ns2", "ns3", "ns4", "ns5", "ns6"}
    ]
    options = parse_options(["--dry-run", *golden_args(GOLDEN_DIR / "overall.yaml"), *extra])
    cluster = cluster_of(objects)
    out = {}
    for found in _configs(options, cluster):
        config = dataclasses.replace(found, nfacct_counters=counters)
        states = desired_state(cluster, config)
        ruleset = render_ruleset((p for ports in states.values() for p in ports), config)
        out[config.family] = without_hooks(ruleset.document(hooks=jump_rules(config)))
    return out


def test_with_both_counters_the_rules_are_upstreams_verbatim() -> None:
    ours = _overall(frozenset(NFACCT_COUNTERS))[IPFamily.IPv4]
    assert sort_ruleset_text(ours) == sort_ruleset_text(UPSTREAM_OVERALL_NFACCT.read_text())


def test_without_counters_the_rules_are_as_before() -> None:
    ours = _overall(frozenset())[IPFamily.IPv4]
    assert "nfacct" not in ours
    assert sort_ruleset_text(ours) == sort_ruleset_text(UPSTREAM_OVERALL.read_text())


def test_each_counter_gates_only_its_own_rules() -> None:
    invalid_only = _overall(frozenset({CT_STATE_INVALID_DROPPED_NFACCT_COUNTER}))[IPFamily.IPv4]
    assert invalid_only.count("-m nfacct") == 1
    assert (
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID"
        " -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n"
    ) in invalid_only
    localhost_only = _overall(frozenset({LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER}))
    assert localhost_only[IPFamily.IPv4].count("--nfacct-name localhost_nps_accepted_pkts") == 3
    assert (
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n" in localhost_only[IPFamily.IPv4]
    )


def test_no_localhost_counting_rule_without_localhost_nodeports() -> None:
    out = _overall(frozenset(NFACCT_COUNTERS), "--iptables-localhost-nodeports=false")
    assert "localhost_nps_accepted_pkts" not in out[IPFamily.IPv4]
    assert "ct_state_invalid_dropped_pkts" in out[IPFamily.IPv4]


def test_no_localhost_counting_rule_for_ipv6() -> None:
    # Upstream: localhost NodePorts are IPv4 only; the INVALID counter is per node, both families.
    out = _overall(frozenset(NFACCT_COUNTERS), "--node-ip", "fd00::2")
    assert IPFamily.IPv6 in out
    assert "localhost_nps_accepted_pkts" not in out[IPFamily.IPv6]
    assert "ct_state_invalid_dropped_pkts" in out[IPFamily.IPv6]


# --- the collector -------------------------------------------------------------------------


def _samples(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_counters_are_read_on_every_scrape() -> None:
    fake = FakeNfacct()
    ensured, failed = ensure_counters(fake, NFACCT_COUNTERS)
    assert ensured == frozenset(NFACCT_COUNTERS) and failed == {}
    metrics = Metrics("iptables", nfacct=fake)
    assert _samples(metrics)[LOCALHOST_METRIC] == 0
    assert _samples(metrics)[INVALID_METRIC] == 0
    fake.bump(LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER, 7, 420)
    fake.bump(CT_STATE_INVALID_DROPPED_NFACCT_COUNTER, 2)
    samples = _samples(metrics)
    assert samples[LOCALHOST_METRIC] == 7  # packets, not bytes
    assert samples[INVALID_METRIC] == 2
    text = metrics.render().decode()
    assert f"# TYPE {LOCALHOST_METRIC} counter" in text
    assert (
        f"# HELP {LOCALHOST_METRIC} Number of packets accepted on nodeports of loopback interface"
    ) in text
    assert (
        f"# HELP {INVALID_METRIC} packets dropped by iptables to work around conntrack problems"
    ) in text


def test_a_counter_that_cannot_be_read_is_left_out_not_zero() -> None:
    fake = FakeNfacct()
    fake.ensure(CT_STATE_INVALID_DROPPED_NFACCT_COUNTER)
    samples = _samples(Metrics("iptables", nfacct=fake))
    assert INVALID_METRIC in samples
    assert LOCALHOST_METRIC not in samples
    fake.broken = True
    samples = _samples(Metrics("iptables", nfacct=fake))
    assert INVALID_METRIC not in samples
    assert "kubeproxy_sync_proxy_rules_iptables_total" in Metrics("iptables").render().decode()


def test_failed_ensure_is_reported_per_counter() -> None:
    ensured, failed = ensure_counters(FakeNfacct(broken=True), NFACCT_COUNTERS)
    assert ensured == frozenset()
    assert set(failed) == set(NFACCT_COUNTERS)


@pytest.mark.parametrize("mode", ["ipvs", "nftables"])
def test_only_iptables_mode_exports_them(mode: str) -> None:
    fake = FakeNfacct()
    ensure_counters(fake, NFACCT_COUNTERS)
    text = Metrics(mode, nfacct=fake).render().decode()
    assert "nodeports_accepted" not in text and "invalid_dropped" not in text


def test_without_nfacct_neither_metric_exists() -> None:
    text = Metrics("iptables").render().decode()
    assert LOCALHOST_METRIC not in text and INVALID_METRIC not in text


# --- the netlink decoder -------------------------------------------------------------------


def _attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def test_decode_counter_reads_name_and_big_endian_counts() -> None:
    body = (
        struct.pack("=BBH", 0, 0, 0)
        + _attr(NFACCT_NAME, b"localhost_nps_accepted_pkts\0")
        + _attr(NFACCT_PKTS, struct.pack(">Q", 5))
        + _attr(NFACCT_BYTES, struct.pack(">Q", 300))
        + _attr(4, struct.pack(">I", 1))  # NFACCT_USE: skipped
    )
    counter = decode_counter(body)
    assert (counter.name, counter.packets, counter.bytes) == ("localhost_nps_accepted_pkts", 5, 300)


def test_decode_counter_rejects_a_reply_without_counts() -> None:
    with pytest.raises(KernelError):
        decode_counter(struct.pack("=BBH", 0, 0, 0) + _attr(NFACCT_NAME, b"x\0"))
