"""hack/bench.py's pure parts: results schema, percentiles, /proc parsing, object shapes.

Not a timed test: the benchmark itself runs by hand (bench/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

import bench_model as bm
from bench_node import metric_value, pyproxy_restore_bytes

from pyproxy.iptables.render import service_chain
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


def test_results_document_has_exactly_the_issue_schema() -> None:
    run = bm.run_record(
        proxy="pyproxy",
        mode="iptables",
        n_services=1000,
        endpoints_per_service=5,
        min_sync_period_s=1.0,
        cold_start_s=1.5,
        cpu_s=2.0,
        peak_rss_mib=80.5,
        restore_bytes_full=100,
    )
    assert list(run) == list(bm.RUN_KEYS)
    assert run["endpoint_change_p50_s"] is None and run["restore_bytes_partial"] is None
    doc = bm.document("v1.34.4", "test machine", [run])
    assert list(doc) == ["kubernetes_version", "machine", "runs"]
    assert bm.validate(json.loads(json.dumps(doc))) == []
    with pytest.raises(KeyError):
        bm.run_record(proxy="pyproxy", extra=1)
    bad = {**doc, "runs": [{**run, "cpu_s": "fast"}]}
    assert bm.validate(bad) == ["run 0: cpu_s = 'fast' is not a number or null"]
    table = bm.markdown_table(doc["runs"])
    assert table.count("\n") == 3 and "| pyproxy | 1,000 | 1 s | 1.500 s |" in table


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
