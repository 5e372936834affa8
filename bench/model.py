"""The pure parts of the benchmark (bench.run, bench.dataplane): the objects it creates, chain
names, statistics, the JSON schema, the Markdown tables. No I/O here, so
tests/unit/test_bench_smoke.py can check it fast.

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
NODE_IP6 = "fd00:30::2"
CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:244::/56"
#: The family variants both proxies run in: IPv4 only, or both families (the Services stay
#: IPv4, as the test control plane's Service CIDR is; the IPv6 tables are written on every sync
#: all the same, by both).
FAMILIES = {"ipv4": ("ipv4",), "dual-stack": ("ipv4", "ipv6")}
POD_BASE = int(ipaddress.IPv4Address("10.244.0.0"))
#: 10.244.0.0 - 10.247.255.255: 30,000 Services x 5 endpoints do not fit in the cluster CIDR
#: (a /16); endpoints beyond it are as good a DNAT target, and both proxies see the same ones.
POD_LIMIT = 4 * 65536
NAMESPACES = tuple(f"bench-{k}" for k in range(10))
PORT_NAME = "http"
PORT = 80
TARGET_PORT = 8080
ENDPOINTS_PER_SERVICE = 5

#: Index ranges reserved for Services the benchmark adds while a proxy runs ((c): new Services);
#: the regular Services are 0 … N-1 with N ≤ this.
NEW_SERVICE_BASE = 40000
#: Pod indexes used for the extra endpoint of (b), above every regular and new Service's pods.
EXTRA_POD_BASE = 5 * 41000

#: The figures of one run (and of a cell: their medians over its runs).
FIGURES = (
    "cold_start_s",
    "endpoint_change_p50_s",
    "endpoint_change_p99_s",
    "new_service_p50_s",
    "cpu_s",
    "peak_rss_mib",
    "restore_bytes_full",
    "restore_bytes_partial",
)
#: What can time out, counted in `timeouts` (per run: cold start 0 or 1, the others per sample).
TIMEOUT_KEYS = ("cold_start", "endpoint_change", "new_service")
#: The keys of one cell in "runs" (the issue's schema plus the families, the backend, how many
#: runs, the min-max over the runs of each figure, and the timeouts).
RUN_KEYS = (
    "proxy",
    "mode",
    "backend",
    "families",
    "n_services",
    "endpoints_per_service",
    "min_sync_period_s",
    *FIGURES,
    "runs_per_cell",
    "spread",
    "timeouts",
)
#: The keys of one entry of "dataplane".
DATAPLANE_KEYS = (
    "mode",
    "backend",
    "n_services",
    "proxy",
    "connect_p50_us",
    "connect_p99_us",
    "floor_p50_us",
    "floor_p99_us",
    "bare_floor_p50_us",
    "samples",
    "failures",
    "runs_per_cell",
    "spread",
)
DATAPLANE_FIGURES = ("connect_p50_us", "connect_p99_us", "floor_p50_us", "floor_p99_us")
TOP_KEYS = (
    "label",
    "kubernetes_version",
    "pyproxy_commit",
    "machine",
    "kernel",
    "iptables_version",
    "nft_version",
    "runs_per_cell",
    "runs",
    "dataplane",
)


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
        raise ValueError(f"pod index {k} outside 10.244.0.0/14")
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
        # Both families: kube-proxy takes its node IPs from here (pyproxy from --node-ip, the
        # same addresses); in the IPv4-only variant kube-proxy finds no ip6tables and ignores
        # the IPv6 one.
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": NODE_IP},
                {"type": "InternalIP", "address": NODE_IP6},
            ]
        },
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


def censored(samples: Sequence[float], timeouts: int, timeout: float) -> list[float]:
    """The samples with each timed-out one counted as the timeout itself (a lower bound of what
    it would have been): a timeout is never dropped from a percentile, it raises it."""
    return [*samples, *([timeout] * timeouts)]


def run_record(**fields: Any) -> dict[str, Any]:
    """One run of one proxy (details; a cell aggregates several): the cell keys without
    runs_per_cell and spread, missing ones null, `timeouts` zero."""
    keys = [k for k in RUN_KEYS if k not in ("runs_per_cell", "spread")]
    unknown = set(fields) - set(keys)
    if unknown:
        raise KeyError(f"not in the schema: {sorted(unknown)}")
    record = {key: fields.get(key) for key in keys}
    record["timeouts"] = {k: 0 for k in TIMEOUT_KEYS} | dict(fields.get("timeouts") or {})
    return record


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _aggregate(
    runs: Sequence[Mapping[str, Any]], figures: Sequence[str]
) -> tuple[dict[str, Any], dict[str, list[Any] | None]]:
    """Median and [min, max] of each figure over the runs that have it (ints stay ints)."""
    medians: dict[str, Any] = {}
    spread: dict[str, list[Any] | None] = {}
    for key in figures:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            medians[key], spread[key] = None, None
            continue
        m = _median(values)
        if all(isinstance(v, int) for v in values):
            m = round(m)
        medians[key] = round(m, 4) if isinstance(m, float) else m
        spread[key] = [min(values), max(values)]
    return medians, spread


def cell_key(r: Mapping[str, Any]) -> tuple[Any, ...]:
    return (r["backend"], r["families"], r["n_services"], r["min_sync_period_s"], r["proxy"])


def cells(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell (backend, families, N, min sync, proxy), in first-seen order: the
    median of each figure over the cell's runs, its [min, max] in `spread`, `runs_per_cell`,
    and the timeouts summed over the runs."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(cell_key(r), []).append(r)
    out = []
    for group in groups.values():
        first = group[0]
        medians, spread = _aggregate(group, FIGURES)
        timeouts = {k: sum(r["timeouts"].get(k, 0) for r in group) for k in TIMEOUT_KEYS}
        out.append(
            {key: first[key] for key in RUN_KEYS[:7]}
            | medians
            | {"runs_per_cell": len(group), "spread": spread, "timeouts": timeouts}
        )
    return out


def dataplane_record(**fields: Any) -> dict[str, Any]:
    """One data-plane run (details): the dataplane keys without runs_per_cell and spread."""
    keys = [k for k in DATAPLANE_KEYS if k not in ("runs_per_cell", "spread")]
    unknown = set(fields) - set(keys)
    if unknown:
        raise KeyError(f"not in the schema: {sorted(unknown)}")
    return {key: fields.get(key) for key in keys}


def dataplane_cells(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Data-plane runs per (backend, N, proxy): medians, [min, max], samples and failures
    summed."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["backend"], r["n_services"], r["proxy"]), []).append(r)
    out = []
    for group in groups.values():
        first = group[0]
        medians, spread = _aggregate(group, (*DATAPLANE_FIGURES, "bare_floor_p50_us"))
        del spread["bare_floor_p50_us"]
        out.append(
            {key: first[key] for key in DATAPLANE_KEYS[:4]}
            | medians
            | {
                "samples": sum(r["samples"] or 0 for r in group),
                "failures": sum(r["failures"] or 0 for r in group),
                "runs_per_cell": len(group),
                "spread": spread,
            }
        )
    return out


def document(
    meta: Mapping[str, Any],
    runs: Iterable[Mapping[str, Any]],
    dataplane: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The results document: `meta` holds the top-level keys other than runs and dataplane."""
    doc: dict[str, Any] = {key: meta.get(key) for key in TOP_KEYS}
    doc["runs"] = cells(runs)
    doc["dataplane"] = list(dataplane)
    return doc


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
        if run["families"] not in FAMILIES:
            problems.append(f"run {k}: families {run['families']!r}")
        for key in FIGURES:
            value = run[key]
            if value is not None and not _is_number(value):
                problems.append(f"run {k}: {key} = {value!r} is not a number or null")
                continue
            bounds = run["spread"].get(key)
            if (value is None) != (bounds is None) or (
                bounds is not None and not bounds[0] <= value <= bounds[1]
            ):
                problems.append(f"run {k}: spread of {key} {bounds!r} does not hold {value!r}")
        if sorted(run["timeouts"]) != sorted(TIMEOUT_KEYS) or not all(
            isinstance(v, int) and v >= 0 for v in run["timeouts"].values()
        ):
            problems.append(f"run {k}: timeouts {run['timeouts']!r}")
        if not isinstance(run["runs_per_cell"], int) or run["runs_per_cell"] < 1:
            problems.append(f"run {k}: runs_per_cell {run['runs_per_cell']!r}")
    for k, entry in enumerate(doc.get("dataplane", [])):
        if list(entry) != list(DATAPLANE_KEYS):
            problems.append(f"dataplane {k}: keys {list(entry)} != {list(DATAPLANE_KEYS)}")
            continue
        for key in (*DATAPLANE_FIGURES, "bare_floor_p50_us"):
            value = entry[key]
            if value is not None and not _is_number(value):
                problems.append(f"dataplane {k}: {key} = {value!r} is not a number or null")
    return problems


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Seconds to the millisecond below 10 s; microseconds to a tenth.
        text = f"{value:.3f}" if value < 10 and unit != " µs" else f"{value:.1f}"
    else:
        text = f"{value:,}"
    return text + unit


def _with_spread(r: Mapping[str, Any], key: str, unit: str) -> str:
    """`median (min-max)`, or the median alone for a single run or equal bounds."""
    text = _cell(r[key], unit)
    bounds = r["spread"].get(key)
    if bounds is None or bounds[0] == bounds[1]:
        return text
    inner = unit if unit == " µs" else ""  # same precision as the median, no unit repeated
    low, high = (_cell(b, inner).removesuffix(inner) for b in bounds)
    return f"{text} ({low}-{high})"


def markdown_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """The cells: medians over `runs` runs, (min-max) beside each, and the timeouts
    (cold starts / endpoint changes / new Services)."""
    header = (
        "| proxy | variant | families | N | min sync | runs | (a) cold start | (b) p50 | (b) p99 "
        "| (c) new svc p50 | (d) CPU | (d) peak RSS | (e) restore full | (e) restore partial "
        "| timeouts a/b/c |"
    )
    lines = [header, "|" + " --- |" * 15]
    for r in runs:
        t = r["timeouts"]
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["proxy"]),
                    str(r["backend"]),
                    str(r["families"]),
                    f"{r['n_services']:,}",
                    f"{r['min_sync_period_s']:g} s",
                    str(r["runs_per_cell"]),
                    _with_spread(r, "cold_start_s", " s"),
                    _with_spread(r, "endpoint_change_p50_s", " s"),
                    _with_spread(r, "endpoint_change_p99_s", " s"),
                    _with_spread(r, "new_service_p50_s", " s"),
                    _with_spread(r, "cpu_s", " s"),
                    _with_spread(r, "peak_rss_mib", " MiB"),
                    _cell(r["restore_bytes_full"], " B"),
                    _cell(r["restore_bytes_partial"], " B"),
                    f"{t['cold_start']}/{t['endpoint_change']}/{t['new_service']}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def dataplane_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """First-packet (new TCP connection) latency through a ClusterIP, and the floor beside it."""
    header = (
        "| variant | N | proxy | runs | connect p50 | connect p99 | floor p50 | floor p99 "
        "| floor p50, no rules | samples | failures |"
    )
    lines = [header, "|" + " --- |" * 11]
    for e in entries:
        lines.append(
            "| "
            + " | ".join(
                [
                    str(e["backend"]),
                    f"{e['n_services']:,}",
                    str(e["proxy"]),
                    str(e["runs_per_cell"]),
                    _with_spread(e, "connect_p50_us", " µs"),
                    _with_spread(e, "connect_p99_us", " µs"),
                    _with_spread(e, "floor_p50_us", " µs"),
                    _with_spread(e, "floor_p99_us", " µs"),
                    _cell(e["bare_floor_p50_us"], " µs"),
                    f"{e['samples']:,}",
                    str(e["failures"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def report(doc: Mapping[str, Any]) -> str:
    """The Markdown written beside latest.json: what the run was, then both tables."""
    lines = [
        f"**{doc['label']}**",
        "",
        f"- kube-proxy {doc['kubernetes_version']}, pyproxy {doc['pyproxy_commit']}",
        f"- {doc['machine']}",
        f"- {doc['kernel']}",
        f"- {doc['iptables_version']}; {doc['nft_version']}",
        f"- {doc['runs_per_cell']} runs per cell: medians, (min-max) over the runs",
        "",
    ]
    text = "\n".join(lines)
    if doc["runs"]:
        text += "\n" + markdown_table(doc["runs"])
    if doc["dataplane"]:
        text += "\nFirst packet (new TCP connection) through a ClusterIP:\n\n"
        text += dataplane_table(doc["dataplane"])
    return text


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
