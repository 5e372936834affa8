"""The benchmark's pure parts (bench/): results schema, cells over repeated runs, timeouts,
percentiles, /proc parsing, object shapes.

Not a timed test: the benchmark itself runs by hand (bench/README.md).
"""

from __future__ import annotations

import json
import time

import pytest

import bench.model as bm
from bench.node import metric_value, pyproxy_restore_bytes
from bench.run import interleaved, wait_complete
from pyproxy.iptables.vocabulary import service_chain
from pyproxy.model import Protocol
from pyproxy.serviceport import ServicePortName


def test_percentile_interpolates_like_numpy() -> None:
    assert bm.percentile([], 50) is None
    assert bm.percentile([3.0], 99) == 3.0
    assert bm.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    values = [float(v) for v in range(1, 31)]  # 30 samples, as (b) takes
    assert bm.percentile(values, 99) == pytest.approx(29.71)
    assert bm.percentile(list(reversed(values)), 0) == 1.0
    assert bm.percentile(values, 100) == 30.0
    with pytest.raises(ValueError):
        bm.percentile(values, 101)
    assert bm.median_int([5, 1, 9, 7]) == 5
    assert bm.median_int([]) is None


def _run(proxy: str, cold: float | None, **fields: object) -> dict[str, object]:
    return bm.run_record(
        proxy=proxy,
        mode="iptables",
        backend="legacy",
        families="ipv4",
        n_services=1000,
        endpoints_per_service=5,
        min_sync_period_s=1.0,
        cold_start_s=cold,
        cpu_s=2.0,
        peak_rss_mib=80.5,
        restore_bytes_full=100,
        **fields,
    )


META = {
    "label": "unit test",
    "kubernetes_version": "v1.34.4",
    "pyproxy_commit": "abc",
    "machine": "test machine",
    "kernel": "Linux 6",
    "iptables_version": "iptables v1.8.9 (legacy)",
    "nft_version": "nftables v1.0.6",
    "runs_per_cell": 3,
}


def test_results_document_has_the_schema_with_cells_spread_and_timeouts() -> None:
    runs = [
        _run("pyproxy", 1.5, timeouts={"endpoint_change": 1}),
        _run("kube-proxy", 1.0),
        _run("pyproxy", 2.5),
        _run("kube-proxy", 1.2),
        _run("pyproxy", 1.7, timeouts={"cold_start": 1}),
        _run("kube-proxy", 0.9),
    ]
    assert list(runs[0]) == [k for k in bm.RUN_KEYS if k not in ("runs_per_cell", "spread")]
    assert runs[1]["timeouts"] == {"cold_start": 0, "endpoint_change": 0, "new_service": 0}
    doc = bm.document(META, runs)
    assert list(doc) == list(bm.TOP_KEYS)
    assert bm.validate(json.loads(json.dumps(doc))) == []
    py, kp = doc["runs"]
    assert (py["proxy"], kp["proxy"]) == ("pyproxy", "kube-proxy")
    assert py["runs_per_cell"] == 3 and py["cold_start_s"] == 1.7
    assert py["spread"]["cold_start_s"] == [1.5, 2.5]
    assert py["spread"]["endpoint_change_p50_s"] is None
    assert py["timeouts"] == {"cold_start": 1, "endpoint_change": 1, "new_service": 0}
    assert kp["cold_start_s"] == 1.0 and kp["restore_bytes_full"] == 100
    with pytest.raises(KeyError):
        bm.run_record(proxy="pyproxy", extra=1)
    bad = {**doc, "runs": [{**py, "cpu_s": "fast"}]}
    assert "run 0: cpu_s = 'fast' is not a number or null" in bm.validate(bad)
    outside = {**doc, "runs": [{**py, "cold_start_s": 9.0}]}
    assert bm.validate(outside) == ["run 0: spread of cold_start_s [1.5, 2.5] does not hold 9.0"]
    table = bm.markdown_table(doc["runs"])
    assert table.count("\n") == 4
    assert "| pyproxy | legacy | ipv4 | 1,000 | 1 s | 3 | 1.700 s (1.500-2.500) |" in table
    assert table.splitlines()[2].endswith("| 1/1/0 |")
    assert "unit test" in bm.report(doc)


def test_timeouts_raise_percentiles_instead_of_vanishing() -> None:
    samples = [0.1] * 9
    assert bm.percentile(bm.censored(samples, 0, 600), 99) == pytest.approx(0.1)
    # One timeout among ten: p99 is pulled up to (nearly) the timeout, p50 barely moves.
    with_timeout = bm.censored(samples, 1, 600)
    assert len(with_timeout) == 10
    assert bm.percentile(with_timeout, 99) > 500
    assert bm.percentile(with_timeout, 50) == pytest.approx(0.1)


def test_proxies_alternate_their_order() -> None:
    order = [interleaved(["kube-proxy", "pyproxy"], r) for r in range(3)]
    assert order == [
        ["kube-proxy", "pyproxy"],
        ["pyproxy", "kube-proxy"],
        ["kube-proxy", "pyproxy"],
    ]


def test_dataplane_section() -> None:
    def entry(proxy: str, p50: float) -> dict[str, object]:
        return bm.dataplane_record(
            mode="iptables",
            backend="legacy",
            n_services=1000,
            proxy=proxy,
            connect_p50_us=p50,
            connect_p99_us=p50 * 3,
            floor_p50_us=40.0,
            floor_p99_us=90.0,
            bare_floor_p50_us=35.0,
            samples=2000,
            failures=0,
        )

    cells = bm.dataplane_cells([entry("kube-proxy", 60.0), entry("kube-proxy", 80.0)])
    assert len(cells) == 1 and list(cells[0]) == list(bm.DATAPLANE_KEYS)
    assert cells[0]["connect_p50_us"] == 70.0 and cells[0]["samples"] == 4000
    assert cells[0]["spread"]["connect_p50_us"] == [60.0, 80.0]
    doc = bm.document(META, [], cells)
    assert bm.validate(doc) == []
    assert "| legacy | 1,000 | kube-proxy | 2 | 70.0 µs (60.0-80.0) |" in bm.report(doc)


def test_proc_parsing() -> None:
    # comm with a space and a parenthesis; utime 150, stime 50, cutime 20, cstime 30 ticks.
    stat = "1234 (py (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 150 50 20 30 20 0 3 0 5"
    assert bm.parse_proc_stat(stat, 100) == pytest.approx(2.5)
    assert bm.parse_vm_hwm_kib("Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t 1 kB\n") == 204800
    assert bm.parse_vm_hwm_kib("Name:\tx\n") is None


def test_chain_name_matches_pyproxy_and_upstream_naming() -> None:
    spec = bm.service_spec(42)
    spn = ServicePortName(spec.namespace, spec.name, bm.PORT_NAME, Protocol.TCP)
    assert bm.service_chain(spec.port_name) == service_chain(spn)


def test_objects_and_plans() -> None:
    counts = bm.mix(1000)
    assert counts == {"ClusterIP": 890, "NodePort": 100, "LoadBalancer": 10, "Local": 28}
    assert [a["address"] for a in bm.node_body()["status"]["addresses"]] == [
        bm.NODE_IP,
        bm.NODE_IP6,
    ]
    spec = bm.service_spec(100)
    assert spec.type == "LoadBalancer" and spec.local
    assert bm.lb_status(spec)["loadBalancer"]["ingress"][0]["ip"] == "203.0.113.2"
    body = bm.slice_body(spec)
    assert len(body["endpoints"]) == bm.ENDPOINTS_PER_SERVICE
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == spec.name
    assert len(bm.slice_body(spec, extra=bm.EXTRA_POD_BASE)["endpoints"]) == 6
    # Pod IPs never collide between regular, new and extra endpoints and stay in the CIDR.
    assert bm.pod_ip(5 * (bm.NEW_SERVICE_BASE + 9) + 4) != bm.pod_ip(bm.EXTRA_POD_BASE)
    bm.pod_ip(bm.EXTRA_POD_BASE + 100)
    with pytest.raises(ValueError):
        bm.pod_ip(bm.POD_LIMIT)
    plan = bm.change_plan(1000, 30)
    assert len(plan) == 30
    assert all(
        plan[k][0] == plan[k + 1][0] and plan[k][1] and not plan[k + 1][1] for k in range(0, 30, 2)
    )
    assert all(0 <= i < 1000 for i, _ in plan)


def test_restore_bytes_from_pyproxy_log_and_metrics() -> None:
    log = "\n".join(
        [
            '{"full":true,"IPv4_restore_bytes":1000,"event":"synced"}',
            '{"full":false,"IPv4_restore_bytes":10,"IPv6_restore_bytes":5,"event":"synced"}',
            "not json",
            '{"event":"starting"}',
        ]
    )
    assert pyproxy_restore_bytes(log) == ([1000], [15])
    text = 'pyproxy_sync_restore_bytes{ip_family="IPv4",kind="full"} 123.0\n'
    assert metric_value(text, "pyproxy_sync_restore_bytes", kind="full") == 123.0
    assert metric_value(text, "pyproxy_sync_restore_bytes", kind="partial") is None


class _FakeRules:
    """Fingerprints in a script, one per token() call (the last repeats), each call's time kept."""

    def __init__(self, tokens: list[object]) -> None:
        self.tokens = tokens
        self.calls: list[float] = []

    def token(self) -> object:
        self.calls.append(time.monotonic())
        return self.tokens[min(len(self.calls), len(self.tokens)) - 1]


class _FakeProxy:
    def check_alive(self) -> None:
        pass


def test_clock_stops_at_the_last_write_after_the_content_condition() -> None:
    # before; nat written (content not yet right); nat right; filter written later; at rest.
    rules = _FakeRules(["before", "before", "nat-1", "nat-2", "nat-2", "filter", "filter"])
    checked: list[object] = []

    def check() -> bool:
        checked.append(rules.tokens[len(rules.calls) - 1])
        return checked[-1] == "nat-2"

    seen = wait_complete(
        rules,  # type: ignore[arg-type]
        check,
        timeout=60,
        interval=0,
        settle=0.05,
        proxy=_FakeProxy(),  # type: ignore[arg-type]
        since="before",
    )
    # The check ran only when the fingerprint had changed, never for "before".
    assert checked == ["nat-1", "nat-2"]
    # The clock stopped when the filter write was first seen (its read, the 6th, was under way),
    # not at the nat one.
    assert seen is not None and rules.calls[4] < seen <= rules.calls[5]


def test_clock_times_out_with_none() -> None:
    rules = _FakeRules(["before"])
    seen = wait_complete(
        rules,  # type: ignore[arg-type]
        lambda: True,
        timeout=0.05,
        interval=0.01,
        settle=0,
        proxy=_FakeProxy(),  # type: ignore[arg-type]
        since="before",
    )
    assert seen is None
