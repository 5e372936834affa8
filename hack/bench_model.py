"""The pure parts of hack/bench.py: the objects it creates, chain names, statistics, the JSON
schema, the Markdown table. No I/O here, so tests/unit/test_bench_smoke.py can check it fast.

The cluster the benchmark builds (N Services, E = 5 endpoints each, one port "http" 80 → 8080):

    index i % 100 == 0                LoadBalancer with a status ingress IP (documentation range)
    index i % 10  == 5                NodePort
    everything else                   ClusterIP
    every 4th NodePort/LoadBalancer   externalTrafficPolicy: Local (so a health-check node port)

Endpoint j of Service i has pod IP 10.244.0.0 + 5·i + j and sits on node "node-{(i+j) % 10}",
except that (i+j) % 10 == 0 means this benchmark's node, so Local Services have local endpoints
on some nodes. Services live in 10 namespaces bench-0 … bench-9 (i % 10).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NODE_NAME = "node-bench"
NODE_IP = "172.30.0.2"
CLUSTER_CIDR = "10.244.0.0/16"
POD_BASE = int(ipaddress.IPv4Address("10.244.0.0"))
POD_LIMIT = 65536  # addresses in 10.244.0.0/16
NAMESPACES = tuple(f"bench-{k}" for k in range(10))
PORT_NAME = "http"
PORT = 80
TARGET_PORT = 8080
ENDPOINTS_PER_SERVICE = 5

#: Index ranges reserved for Services the benchmark adds while a proxy runs ((c): new Services);
#: the regular Services are 0 … N-1 with N ≤ this.
NEW_SERVICE_BASE = 12000
#: Pod indexes used for the extra endpoint of (b), above every regular and new Service's pods.
EXTRA_POD_BASE = 5 * 13000

#: The keys of one run, in the order the issue lists them (the JSON schema of bench/results).
RUN_KEYS = (
    "proxy",
    "mode",
    "n_services",
    "endpoints_per_service",
    "min_sync_period_s",
    "cold_start_s",
    "endpoint_change_p50_s",
    "endpoint_change_p99_s",
    "new_service_p50_s",
    "cpu_s",
    "peak_rss_mib",
    "restore_bytes_full",
    "restore_bytes_partial",
)
TOP_KEYS = ("kubernetes_version", "machine", "runs")


# --- what is created ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    index: int
    namespace: str
    name: str
    type: str  # ClusterIP | NodePort | LoadBalancer
    local: bool  # externalTrafficPolicy: Local

    @property
    def port_name(self) -> str:
        """kube-proxy's ServicePortName.String(): namespace/name:port."""
        return f"{self.namespace}/{self.name}:{PORT_NAME}"


def service_spec(i: int, prefix: str = "svc") -> ServiceSpec:
    if i % 100 == 0:
        kind = "LoadBalancer"
    elif i % 10 == 5:
        kind = "NodePort"
    else:
        kind = "ClusterIP"
    external = kind != "ClusterIP"
    # Every 4th external Service (counted separately per kind) is Local.
    local = external and ((i // 100) % 4 == 1 if kind == "LoadBalancer" else (i // 10) % 4 == 1)
    return ServiceSpec(i, NAMESPACES[i % len(NAMESPACES)], f"{prefix}-{i}", kind, local)


def mix(n: int) -> dict[str, int]:
    """How many Services of each kind the first n indexes give (for the report)."""
    counts = {"ClusterIP": 0, "NodePort": 0, "LoadBalancer": 0, "Local": 0}
    for i in range(n):
        s = service_spec(i)
        counts[s.type] += 1
        counts["Local"] += s.local
    return counts


def lb_ip(i: int) -> str:
    """A documentation-range address per LoadBalancer Service (index i, i % 100 == 0)."""
    k = i // 100
    return f"{'203.0.113' if k < 250 else '198.51.100'}.{k % 250 + 1}"


def service_body(spec: ServiceSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {"app": spec.name}},
        "spec": {
            "type": spec.type,
            "selector": {"app": spec.name},
            "ports": [
                {"name": PORT_NAME, "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}
            ],
        },
    }
    if spec.local:
        body["spec"]["externalTrafficPolicy"] = "Local"
    return body


def lb_status(spec: ServiceSpec) -> dict[str, Any]:
    """The /status body of a LoadBalancer Service: one ingress IP, as a cloud controller sets."""
    return {"loadBalancer": {"ingress": [{"ip": lb_ip(spec.index)}]}}


def pod_ip(k: int) -> str:
    if not 0 <= k < POD_LIMIT:
        raise ValueError(f"pod index {k} outside {CLUSTER_CIDR}")
    return str(ipaddress.IPv4Address(POD_BASE + k))


def endpoint_node(i: int, j: int) -> str:
    r = (i + j) % 10
    return NODE_NAME if r == 0 else f"node-{r}"


def endpoint(k: int, node: str) -> dict[str, Any]:
    return {"addresses": [pod_ip(k)], "nodeName": node, "conditions": {"ready": True}}


def slice_body(spec: ServiceSpec, extra: int | None = None) -> dict[str, Any]:
    """The EndpointSlice of a Service: its 5 endpoints, plus pod `extra` (an index) if given."""
    eps = [
        endpoint(5 * spec.index + j, endpoint_node(spec.index, j))
        for j in range(ENDPOINTS_PER_SERVICE)
    ]
    if extra is not None:
        eps.append(endpoint(extra, f"node-{extra % 9 + 1}"))
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{spec.name}-abcde",
            "namespace": spec.namespace,
            "labels": {
                "kubernetes.io/service-name": spec.name,
                "endpointslice.kubernetes.io/managed-by": "bench.pyproxy.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": PORT_NAME, "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": eps,
    }


def node_body() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    }


def service_chain(port_name: str, protocol: str = "tcp") -> str:
    """Upstream's servicePortChainName: KUBE-SVC- + base32(sha256(name + protocol))[:16].

    Written out here (not imported from pyproxy) so the benchmark checks both proxies against
    upstream's documented naming, not against pyproxy's own idea of it."""
    digest = hashlib.sha256((port_name + protocol).encode()).digest()
    return "KUBE-SVC-" + base64.b32encode(digest).decode()[:16]


def change_plan(n_services: int, changes: int, seed: int = 7) -> list[tuple[int, bool]]:
    """(Service index, add?) for each endpoint change of (b): pairs of add-then-remove of one
    extra endpoint on a Service, so an even number of changes leaves the objects as they were.
    The Services are spread over the whole range (a deterministic scramble, no RNG)."""
    plan = []
    for k in range(changes):
        pair = k // 2
        index = (pair * 7919 + seed * 104729) % n_services
        plan.append((index, k % 2 == 0))
    return plan


# --- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_int(values: Iterable[int]) -> int | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[(len(ordered) - 1) // 2]


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# --- the results document -------------------------------------------------------------------


def run_record(**fields: Any) -> dict[str, Any]:
    """One entry of "runs", with exactly the issue's keys in its order (missing ones: null)."""
    unknown = set(fields) - set(RUN_KEYS)
    if unknown:
        raise KeyError(f"not in the schema: {sorted(unknown)}")
    return {key: fields.get(key) for key in RUN_KEYS}


def document(kubernetes_version: str, machine: str, runs: Iterable[Mapping[str, Any]]) -> dict:
    return {
        "kubernetes_version": kubernetes_version,
        "machine": machine,
        "runs": [run_record(**r) for r in runs],
    }


def validate(doc: Mapping[str, Any]) -> list[str]:
    """Problems with a results document (empty: it follows the schema)."""
    problems = []
    if list(doc) != list(TOP_KEYS):
        problems.append(f"top-level keys {list(doc)} != {list(TOP_KEYS)}")
    for k, run in enumerate(doc.get("runs", [])):
        if list(run) != list(RUN_KEYS):
            problems.append(f"run {k}: keys {list(run)} != {list(RUN_KEYS)}")
            continue
        if run["proxy"] not in ("kube-proxy", "pyproxy"):
            problems.append(f"run {k}: proxy {run['proxy']!r}")
        for key in RUN_KEYS[3:]:
            value = run[key]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                problems.append(f"run {k}: {key} = {value!r} is not a number or null")
    return problems


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3f}" if value < 10 else f"{value:.1f}"
    else:
        text = f"{value:,}"
    return text + unit


def markdown_table(runs: Sequence[Mapping[str, Any]]) -> str:
    header = (
        "| proxy | N | min sync | (a) cold start | (b) p50 | (b) p99 | (c) new svc p50 "
        "| (d) CPU | (d) peak RSS | (e) restore full | (e) restore partial |"
    )
    lines = [header, "|" + " --- |" * 11]
    for r in runs:
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["proxy"]),
                    f"{r['n_services']:,}",
                    f"{r['min_sync_period_s']:g} s",
                    _cell(r["cold_start_s"], " s"),
                    _cell(r["endpoint_change_p50_s"], " s"),
                    _cell(r["endpoint_change_p99_s"], " s"),
                    _cell(r["new_service_p50_s"], " s"),
                    _cell(r["cpu_s"], " s"),
                    _cell(r["peak_rss_mib"], " MiB"),
                    _cell(r["restore_bytes_full"], " B"),
                    _cell(r["restore_bytes_partial"], " B"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# --- /proc ------------------------------------------------------------------------------------


def parse_proc_stat(text: str, clock_ticks: int) -> float:
    """CPU seconds of a process and its waited-for children from /proc/PID/stat:
    utime + stime + cutime + cstime (fields 14-17)."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so field n is fields[n - 3].
    ticks = sum(int(fields[n - 3]) for n in (14, 15, 16, 17))
    return ticks / clock_ticks


def parse_vm_hwm_kib(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def count_sep_jumps(chain_listing: str) -> int:
    """Rules jumping to a KUBE-SEP- chain in `iptables -S CHAIN` / iptables-save text."""
    return sum(1 for line in chain_listing.splitlines() if "-j KUBE-SEP-" in line)
