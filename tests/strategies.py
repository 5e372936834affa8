"""Hypothesis strategies: random *valid* cluster states as API objects, plus node flags.

Every Service type, traffic policy and affinity setting; IPv4, IPv6 and dual-stack Services;
0-4 endpoints per slice, local or remote, ready / serving / terminating in every combination;
externalIPs, LB ingress (VIP and Proxy mode) and source ranges (sometimes containing the node
IP). Addresses and node ports are unique by construction, as the API server would make them.
A `RandomState` also remembers, per service port, what an independent oracle needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from support import NODE_IP, NODE_IPV6, TEST_NODE

PORT_NAMES = ("p80", "dns", "web")
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class EndpointSpec:
    ip: str
    local: bool
    ready: bool
    serving: bool
    terminating: bool


@dataclass(frozen=True)
class PortSpec:
    """One service port of one family, with the endpoints the slices give it."""

    namespace: str
    name: str
    port_name: str
    protocol: str
    family: str
    cluster_ip: str
    port: int
    node_port: int
    itp_local: bool
    etp_local: bool
    external: bool  # NodePort or LoadBalancer (has a node port)
    endpoints: tuple[tuple[EndpointSpec, int], ...]  # (endpoint, target port)
    external_ips: tuple[str, ...] = ()  # this family's
    lb_ips: tuple[tuple[str, str | None], ...] = ()  # this family's (ip, ipMode)
    source_ranges: tuple[str, ...] = ()  # this family's


@dataclass
class RandomState:
    objects: list[dict[str, Any]]
    args: list[str]
    families: tuple[str, ...]
    ports: list[PortSpec] = field(default_factory=list)


def _conditions(draw: st.DrawFn) -> tuple[bool, bool, bool]:
    return draw(
        st.sampled_from(
            [
                (True, True, False),  # ready
                (True, True, False),
                (False, True, True),  # serving + terminating
                (False, False, True),  # terminating, not serving
                (False, False, False),  # not ready
                (False, True, False),  # serving, not ready, not terminating
            ]
        )
    )


@st.composite
def random_states(draw: st.DrawFn, *, max_services: int = 4) -> RandomState:
    node_families = draw(st.sampled_from([("IPv4",), ("IPv6",), ("IPv4", "IPv6")]))
    args = ["--hostname-override", TEST_NODE]
    for family in node_families:
        args += ["--node-ip", NODE_IP if family == "IPv4" else NODE_IPV6]
    cidrs = {"IPv4": "10.0.0.0/8", "IPv6": "fd00:10::/64"}
    if draw(st.booleans()):
        args += ["--cluster-cidr", ",".join(cidrs[f] for f in node_families)]
    if draw(st.booleans()):
        args.append("--masquerade-all")
    if draw(st.booleans()):
        args.append("--iptables-localhost-nodeports=false")
    nodeport_addresses = draw(st.sampled_from([None, "primary", "192.168.0.0/16,2001:db8::/32"]))
    if nodeport_addresses:
        args += ["--nodeport-addresses", nodeport_addresses]

    objects: list[dict[str, Any]] = []
    ports: list[PortSpec] = []
    n_services = draw(st.integers(1, max_services))
    next_node_port = 30000
    for i in range(1, n_services + 1):
        ns, name = f"ns{i}", f"svc{i}"
        families = draw(st.sampled_from([("IPv4",), ("IPv6",), ("IPv4", "IPv6"), ("IPv6", "IPv4")]))
        svc_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        cluster_ips = [f"172.30.{i}.1" if f == "IPv4" else f"fd00:172:30::{i}:1" for f in families]
        n_ports = draw(st.integers(1, 3))
        names = [""] if n_ports == 1 and draw(st.booleans()) else list(PORT_NAMES[:n_ports])
        svc_ports = []
        used: set[tuple[int, str]] = set()
        for port_name in names:
            protocol = draw(st.sampled_from(PROTOCOLS))
            number = draw(
                st.sampled_from([53, 80, 443, 8080]).filter(
                    lambda n, p=protocol, u=frozenset(used): (n, p) not in u
                )
            )
            used.add((number, protocol))
            p: dict[str, Any] = {"name": port_name, "port": number, "protocol": protocol}
            if svc_type != "ClusterIP":
                p["nodePort"] = next_node_port
                next_node_port += 1
            svc_ports.append(p)
        spec: dict[str, Any] = {
            "type": svc_type,
            "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "ipFamilies": list(families),
            "ports": svc_ports,
        }
        external_ips = []
        if draw(st.booleans()):
            external_ips = [
                f"192.168.{99 + i}.22" if f == "IPv4" else f"2001:db8:99::{i}" for f in families
            ]
            spec["externalIPs"] = external_ips
        status: dict[str, Any] = {}
        ingress: list[dict[str, Any]] = []
        ranges: list[str] = []
        if svc_type == "LoadBalancer":
            for f in families:
                for k in range(draw(st.integers(0, 2))):
                    ip = f"1.2.{i}.{k + 1}" if f == "IPv4" else f"2001:db8:ff:{i}::{k + 1}"
                    entry: dict[str, Any] = {"ip": ip}
                    mode = draw(st.sampled_from([None, "VIP", "Proxy"]))
                    if mode:
                        entry["ipMode"] = mode
                    ingress.append(entry)
            if ingress:
                status = {"loadBalancer": {"ingress": ingress}}
            ranges = draw(
                st.lists(
                    st.sampled_from(
                        ["203.0.113.0/25", "192.168.0.0/24", "2001:db8::/64", "2001:db8:cafe::/48"]
                    ),
                    unique=True,
                    max_size=3,
                )
            )
            if ranges:
                spec["loadBalancerSourceRanges"] = ranges
        externally_accessible = svc_type != "ClusterIP" or bool(external_ips)
        etp_local = draw(st.booleans())
        if etp_local:
            spec["externalTrafficPolicy"] = "Local"
            if svc_type == "LoadBalancer":
                spec["healthCheckNodePort"] = next_node_port
                next_node_port += 1
        itp_local = draw(st.booleans())
        if itp_local:
            spec["internalTrafficPolicy"] = "Local"
        affinity = draw(st.sampled_from([None, "default", 1, 300, 86400]))
        if affinity is not None:
            spec["sessionAffinity"] = "ClientIP"
            if affinity != "default":
                spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
        svc: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
        if status:
            svc["status"] = status
        objects.append(svc)

        for family in families:
            n_eps = draw(st.integers(0, 4))
            endpoints = []
            for j in range(n_eps):
                ready, serving, terminating = _conditions(draw)
                ip = f"10.{i}.{j}.{10 + j}" if family == "IPv4" else f"fd00:10:{i}::{j + 1}:a"
                endpoints.append(EndpointSpec(ip, draw(st.booleans()), ready, serving, terminating))
            slice_ports = []
            targets = {}
            for p in svc_ports:
                if draw(st.integers(0, 9)) == 0:
                    continue  # a Service port no slice has
                target = draw(st.sampled_from([p["port"], 8000 + p["port"]]))
                targets[(p["name"], p["protocol"])] = target
                slice_ports.append({"name": p["name"], "port": target, "protocol": p["protocol"]})
            if endpoints or draw(st.booleans()):
                objects.append(
                    {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": f"{name}-{family.lower()}",
                            "namespace": ns,
                            "labels": {"kubernetes.io/service-name": name},
                        },
                        "addressType": family,
                        "endpoints": [
                            {
                                "addresses": [e.ip],
                                "conditions": {
                                    "ready": e.ready,
                                    "serving": e.serving,
                                    "terminating": e.terminating,
                                },
                                **({"nodeName": TEST_NODE} if e.local else {"nodeName": "node-2"}),
                            }
                            for e in endpoints
                        ],
                        "ports": slice_ports,
                    }
                )
            cip = cluster_ips[families.index(family)]
            v6 = family == "IPv6"
            for p in svc_ports:
                target = targets.get((p["name"], p["protocol"]))
                ports.append(
                    PortSpec(
                        namespace=ns,
                        name=name,
                        port_name=p["name"],
                        protocol=p["protocol"],
                        family=family,
                        cluster_ip=cip,
                        port=p["port"],
                        node_port=p.get("nodePort", 0),
                        itp_local=itp_local,
                        etp_local=etp_local and externally_accessible,
                        external=svc_type != "ClusterIP",
                        endpoints=tuple((e, target) for e in endpoints) if target else (),
                        external_ips=tuple(ip for ip in external_ips if (":" in ip) == v6),
                        lb_ips=tuple(
                            (i["ip"], i.get("ipMode")) for i in ingress if (":" in i["ip"]) == v6
                        ),
                        source_ranges=tuple(r for r in ranges if (":" in r) == v6),
                    )
                )
    return RandomState(objects, args, node_families, ports)
