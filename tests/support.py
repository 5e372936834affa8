"""Shared test helpers (unit and kernel tiers): API-object builders, rendering, golden files,
tracing.

The builders mirror upstream's `makeTestService` / `makeTestEndpointSlice` (proxier_test.go):
they return plain decoded-JSON dicts, so every test also goes through `pyproxy.convert`, the
way a state file or the API would. The node used everywhere is upstream's fake proxier node
(reference/kube-proxy.md §f): `test-node`, primary IP 192.168.0.2, pod CIDR 10.0.0.0/8.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyproxy.cli import dry_run
from pyproxy.convert import state_from_objects
from pyproxy.iptables.render import Ruleset as RenderedRuleset
from pyproxy.iptables.render import render_ruleset
from pyproxy.iptables.tracer import Ruleset, Trace, parse_ruleset, trace_packet
from pyproxy.iptables.vocabulary import JumpRule, jump_rules
from pyproxy.model import ClusterState, IPFamily
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import ProxierConfig, desired_state

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

TEST_NODE = "test-node"
NODE_IP = "192.168.0.2"
NODE_IP_ALT = "192.168.1.2"
NODE_IPV6 = "2001:db8::1"
NODE_IPV6_ALT = "2001:db8:1::2"
#: upstream's testNodeIPs: the addresses the tracer treats as LOCAL (127.0.0.1 and ::1 are too).
LOCAL_IPS = (NODE_IP, NODE_IP_ALT, "192.168.99.11", NODE_IPV6, NODE_IPV6_ALT)
POD_IP = "10.0.0.2"
POD_IPV6 = "fd00:10::2"
EXTERNAL_CLIENT = "203.0.113.2"
EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
EXTERNAL_CLIENT_IPV6 = "2600:5200::1"

#: upstream NewFakeProxier, IPv4: node test-node, node IPs, ClusterCIDR local detection.
BASE_ARGS = (
    "--hostname-override", TEST_NODE,
    "--node-ip", NODE_IP,
    "--node-ip", NODE_IP_ALT,
    "--cluster-cidr", "10.0.0.0/8",
)  # fmt: skip

Obj = dict[str, Any]


# --- API objects ----------------------------------------------------------------------------


def port(
    name: str = "p80",
    number: int = 80,
    protocol: str = "TCP",
    node_port: int | None = None,
    target_port: int | str | None = None,
) -> Obj:
    out: Obj = {"name": name, "port": number, "protocol": protocol}
    if node_port is not None:
        out["nodePort"] = node_port
    if target_port is not None:
        out["targetPort"] = target_port
    return out


def service(
    namespace: str,
    name: str,
    cluster_ip: str | Sequence[str],
    ports: Sequence[Obj] = (),
    *,
    type: str = "ClusterIP",
    external_ips: Sequence[str] = (),
    lb_ingress: Sequence[str | Obj] = (),
    source_ranges: Sequence[str] = (),
    etp: str | None = None,
    itp: str | None = None,
    hcnp: int | None = None,
    affinity_timeout: int | None = None,
    affinity: bool = False,
    labels: Mapping[str, str] | None = None,
    **spec_extra: Any,
) -> Obj:
    """A v1 Service as `kubectl get -o yaml` prints it (only the fields kube-proxy reads)."""
    ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    spec: Obj = {
        "type": type,
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ports": list(ports) if ports else [port()],
    }
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if etp is not None:
        spec["externalTrafficPolicy"] = etp
    if itp is not None:
        spec["internalTrafficPolicy"] = itp
    if hcnp is not None:
        spec["healthCheckNodePort"] = hcnp
    if affinity or affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        if affinity_timeout is not None:
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    spec.update(spec_extra)
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    obj: Obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    if lb_ingress:
        obj["status"] = {
            "loadBalancer": {
                "ingress": [{"ip": i} if isinstance(i, str) else dict(i) for i in lb_ingress]
            }
        }
    return obj


def endpoint(
    ip: str,
    node: str | None = None,
    *,
    ready: bool | None = None,
    serving: bool | None = None,
    terminating: bool | None = None,
    zones: Sequence[str] | None = None,
    nodes: Sequence[str] | None = None,
    zone: str | None = None,
) -> Obj:
    out: Obj = {"addresses": [ip]}
    conditions = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    if conditions:
        out["conditions"] = conditions
    if node is not None:
        out["nodeName"] = node
    if zone is not None:
        out["zone"] = zone
    hints: Obj = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        out["hints"] = hints
    return out


def slice_port(name: str = "p80", number: int = 80, protocol: str = "TCP") -> Obj:
    return {"name": name, "port": number, "protocol": protocol}


def endpoint_slice(
    namespace: str,
    service_name: str,
    endpoints: Sequence[Obj | str],
    ports: Sequence[Obj] = (),
    *,
    name: str | None = None,
    address_type: str = "IPv4",
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """An EndpointSlice named `<service>-1` unless named, labelled with its Service."""
    all_labels = {"kubernetes.io/service-name": service_name}
    all_labels.update(labels or {})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-1",
            "namespace": namespace,
            "labels": all_labels,
        },
        "addressType": address_type,
        "endpoints": [endpoint(e) if isinstance(e, str) else e for e in endpoints],
        "ports": list(ports) if ports else [slice_port()],
    }


def node(name: str = TEST_NODE, addresses: Sequence[str] = (), **labels: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": dict(labels)},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


# --- rendering ------------------------------------------------------------------------------


def cluster_of(objects: Iterable[Mapping[str, Any]]) -> ClusterState:
    """The cluster state of valid objects (any invalid object fails the test)."""
    cluster, problems = state_from_objects(objects)
    assert problems == [], [str(p) for p in problems]
    return cluster


def render(objects: Iterable[Mapping[str, Any]], args: Sequence[str] = BASE_ARGS) -> str:
    """`pyproxy --dry-run` output for these objects and flags."""
    options = parse_options(["--dry-run", *args])
    return dry_run(options, cluster_of(objects))


def sections(output: str) -> dict[str, str]:
    """Split dry-run output into {"IPv4": restore text, "IPv6": ...} (header lines dropped)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines(keepends=True):
        if line.startswith("# ip-family: "):
            current = out.setdefault(line.removeprefix("# ip-family: ").strip(), [])
        else:
            assert current is not None, f"text before the first ip-family header: {line!r}"
            current.append(line)
    return {family: "".join(lines) for family, lines in out.items()}


def without_hooks(restore: str) -> str:
    """The restore text without the `-I <builtin> 1 ...` hook inserts (upstream's iptablesData)."""
    return "".join(line for line in restore.splitlines(keepends=True) if not line.startswith("-I "))


def rules_of(restore: str, table: str, chain: str) -> list[str]:
    """`-A chain ...` lines of one table, in order."""
    current = None
    out = []
    for line in restore.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(f"-A {chain} "):
            out.append(line)
    return out


def family_ruleset(output: str, family: str = "IPv4") -> Ruleset:
    return parse_ruleset(without_hooks(sections(output)[family]))


def trace(ruleset: Ruleset, src: str, dst: str, dport: int, protocol: str = "tcp") -> Trace:
    """Upstream's tracePacket: nat KUBE-SERVICES, then filter's KUBE-* chains run directly."""
    return trace_packet(
        ruleset,
        src=src,
        dst=dst,
        dport=dport,
        protocol=protocol,
        local_ips=LOCAL_IPS,
        entry="kube",
    )


# --- golden files ---------------------------------------------------------------------------


def golden_args(state_path: Path) -> list[str]:
    """Flags from the `# args: ...` lines at the top of a golden state file."""
    args: list[str] = []
    for line in state_path.read_text().splitlines():
        if line.startswith("# args:"):
            args.extend(shlex.split(line.removeprefix("# args:")))
    return args


def strip_review_header(text: str) -> str:
    """A golden `.rules` file minus its leading `## ` review notes (comments for humans)."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and lines[i].startswith("##"):
        i += 1
    return "".join(lines[i:])


def review_header(text: str) -> str:
    return text[: len(text) - len(strip_review_header(text))]


def load_objects(state_path: Path) -> list[Mapping[str, Any]]:
    from pyproxy.sources.statefile import read_objects

    return read_objects(state_path)


def update_golden_requested() -> bool:
    return os.environ.get("UPDATE_GOLDEN") == "1"


def render_overall(
    exclude_namespaces: frozenset[str] = frozenset(),
) -> tuple[RenderedRuleset, ProxierConfig]:
    """tests/golden/overall.yaml rendered for its node (IPv4), without the given namespaces."""
    overall = GOLDEN_DIR / "overall.yaml"
    objects = [
        o for o in load_objects(overall) if o["metadata"]["namespace"] not in exclude_namespaces
    ]
    options = parse_options(["--dry-run", *golden_args(overall)])
    (config,) = proxier_configs(options, None, ())
    ports = [p for ports in desired_state(cluster_of(objects), config).values() for p in ports]
    return render_ruleset(ports, config), config


def all_hooks() -> tuple[JumpRule, ...]:
    """Every hook pyproxy may install (as `pyproxy --cleanup` computes them)."""
    return jump_rules(ProxierConfig(family=IPFamily.IPv4, node_name="", localhost_nodeports=True))
