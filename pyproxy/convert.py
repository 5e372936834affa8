"""API objects (decoded JSON/YAML) → the validated model.

This is the only module that knows Kubernetes field names. It validates everything that ends up
in iptables-restore input (names, IPs, ports, protocols), so nothing a user writes into an object
can break or inject into the rules: a name that is not a DNS label is an invalid object, not a
string to escape.

Each `*_from_api` function returns the model object, or None when kube-proxy would ignore the
object (headless, ExternalName, another proxy's label), and raises `InvalidObject` naming the
kind, the object and the field when the object is unusable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from pyproxy.errors import InvalidObject
from pyproxy.model import (
    ANNOTATION_LAST_CHANGE_TRIGGER_TIME,
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    LABEL_HEADLESS,
    LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME,
    ClusterState,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    LoadBalancerIngress,
    LoadBalancerIPMode,
    NamespacedName,
    Node,
    Protocol,
    Service,
    ServiceCIDR,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)

_E = TypeVar("_E", TrafficPolicy, ServiceType, LoadBalancerIPMode)

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# ASCII digits only: `\d` and str.isdigit also take fullwidth (U+FF11) or Arabic-Indic digits,
# which int() would turn into numbers, where Go's parsers reject anything but 0-9.
_SLOPPY_IPV4 = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")
_PREFIX_LENGTH = re.compile(r"[0-9]+").fullmatch
#: What str.strip() would remove, minus the Unicode spaces (U+00A0, U+3000 ...) Go never trims.
_ASCII_SPACE = " \t\n\r\v\f"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_IPV4 = re.compile(r"\.".join([_OCTET] * 4)).fullmatch


# --- IP parsing (kube-proxy's "sloppy" parsing) -------------------------------------------


def parse_ip(text: str) -> IPAddress:
    """Parse an IP as Go's ParseIPSloppy does: IPv4 octets with leading zeros are decimal.

    `172.30.0.041` becomes `172.30.0.41` (upstream TestBadIPs), and an IPv4-mapped IPv6
    address is its IPv4 address. Raises ValueError.
    """
    # The common case, a plain dotted quad without leading zeros, costs a third less this way
    # than through ipaddress' own parser; anything else takes the general path below.
    plain = _PLAIN_IPV4(text) if isinstance(text, str) else None
    if plain is not None:
        a, b, c, d = plain.groups()
        return ipaddress.IPv4Address(int.from_bytes(bytes((int(a), int(b), int(c), int(d)))))
    text = text.strip(_ASCII_SPACE)
    if "%" in text:
        # Python accepts IPv6 zones ("fe80::1%eth0", any characters after %); Go's ParseIP does
        # not, and a zone would carry arbitrary text into the rules.
        raise ValueError(f"{text!r} has a zone: not an IP address")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        match = _SLOPPY_IPV4.fullmatch(text)
        if match is None:
            raise
        octets = [int(part) for part in match.groups()]
        if any(octet > 255 for octet in octets):
            raise
        ip = ipaddress.IPv4Address(".".join(str(octet) for octet in octets))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_cidr(text: str) -> IPNetwork:
    """Parse a CIDR as Go's ParseCIDRSloppy does; host bits are masked off. Raises ValueError."""
    address, sep, prefix = text.strip(_ASCII_SPACE).partition("/")
    if not sep or _PREFIX_LENGTH(prefix) is None:
        raise ValueError(f"{text!r} is not a CIDR")
    ip = parse_ip(address)
    return ipaddress.ip_network(f"{ip}/{int(prefix)}", strict=False)


# --- small typed accessors over decoded JSON ----------------------------------------------


class _Reader:
    """Reads fields of one object and raises InvalidObject naming the field on bad input."""

    def __init__(self, kind: str, obj: Mapping[str, object]) -> None:
        self.kind = kind
        metadata = obj.get("metadata")
        meta = metadata if isinstance(metadata, Mapping) else {}
        namespace = meta.get("namespace", "")
        name = meta.get("name", "")
        self.namespace = namespace if isinstance(namespace, str) else ""
        self.name = name if isinstance(name, str) else ""

    def invalid(self, field: str, reason: str) -> InvalidObject:
        return InvalidObject(self.kind, self.namespace, self.name, field, reason)

    def mapping(self, value: object, field: str) -> Mapping[str, object]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.invalid(field, "must be an object")
        return value

    def sequence(self, value: object, field: str) -> Sequence[object]:
        if value is None:
            return ()
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise self.invalid(field, "must be a list")
        return value

    def string(self, value: object, field: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.invalid(field, f"must be a string, not {value!r}")
        return value

    def integer(self, value: object, field: str, low: int, high: int, default: int = 0) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(field, f"must be an integer, not {value!r}")
        if not low <= value <= high:
            raise self.invalid(field, f"{value} is out of range {low}-{high}")
        return value

    def boolean(self, value: object, field: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.invalid(field, f"must be true or false, not {value!r}")
        return value

    def ip(self, value: object, field: str) -> IPAddress:
        text = self.string(value, field)
        try:
            return parse_ip(text)
        except ValueError:
            raise self.invalid(field, f"{text!r} is not a valid IP address") from None

    def protocol(self, value: object, field: str) -> Protocol:
        text = self.string(value, field, default="TCP")
        try:
            return Protocol(text)
        except ValueError:
            raise self.invalid(field, f"unknown protocol {text!r} (TCP, UDP or SCTP)") from None

    def port_name(self, value: object, field: str) -> str:
        text = self.string(value, field)
        if text and (len(text) > 63 or not _DNS1123_LABEL.fullmatch(text)):
            raise self.invalid(field, f"{text!r} is not a valid port name (a DNS label)")
        return text

    def enum_value(self, cls: type[_E], value: object, field: str, default: _E) -> _E:
        text = self.string(value, field, default=default.value)
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(member.value for member in cls)
            raise self.invalid(field, f"unknown value {text!r} ({allowed})") from None

    def check_names(self, *, namespaced: bool, name_pattern: re.Pattern[str]) -> None:
        if namespaced and (
            len(self.namespace) > 63 or not _DNS1123_LABEL.fullmatch(self.namespace)
        ):
            raise self.invalid("metadata.namespace", f"{self.namespace!r} is not a DNS label")
        if len(self.name) > 253 or not name_pattern.fullmatch(self.name):
            raise self.invalid("metadata.name", f"{self.name!r} is not a valid name")


def _labels(obj: Mapping[str, object]) -> Mapping[str, object]:
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping):
        labels = metadata.get("labels")
        if isinstance(labels, Mapping):
            return labels
    return {}


def _annotations(obj: Mapping[str, object]) -> Mapping[str, object]:
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping):
        annotations = metadata.get("annotations")
        if isinstance(annotations, Mapping):
            return annotations
    return {}


def is_ignored_by_label(obj: Mapping[str, object]) -> bool:
    """kube-proxy's informer label selector: another proxy's objects and headless slices."""
    labels = _labels(obj)
    return LABEL_SERVICE_PROXY_NAME in labels or LABEL_HEADLESS in labels


# --- Service ------------------------------------------------------------------------------


def service_from_api(
    obj: Mapping[str, object], problems: list[InvalidObject] | None = None
) -> Service | None:
    """A Service, or None when kube-proxy ignores it (headless, ExternalName, other proxy).

    Source ranges that do not parse are left out and reported in `problems`, as upstream
    ignores them; anything else invalid raises."""
    r = _Reader("Service", obj)
    if is_ignored_by_label(obj):
        return None
    r.check_names(namespaced=True, name_pattern=_DNS1035_LABEL)
    spec = r.mapping(obj.get("spec"), "spec")
    status = r.mapping(obj.get("status"), "status")

    svc_type = r.enum_value(ServiceType, spec.get("type"), "spec.type", ServiceType.CLUSTER_IP)
    if svc_type is ServiceType.EXTERNAL_NAME:
        return None
    raw_ips = r.sequence(spec.get("clusterIPs"), "spec.clusterIPs")
    if not raw_ips and spec.get("clusterIP") is not None:
        raw_ips = (spec.get("clusterIP"),)
    if not raw_ips or raw_ips[0] in ("None", ""):
        return None  # headless, or no cluster IP allocated: kube-proxy's ShouldSkipService
    cluster_ips = tuple(r.ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(raw_ips))
    if len({IPFamily.of(ip) for ip in cluster_ips}) != len(cluster_ips):
        raise r.invalid("spec.clusterIPs", "at most one cluster IP per IP family")

    ports: list[ServicePort] = []
    seen: set[tuple[str, Protocol]] = set()
    raw_ports = r.sequence(spec.get("ports"), "spec.ports")
    for i, raw in enumerate(raw_ports):
        where = f"spec.ports[{i}]"
        port = r.mapping(raw, where)
        name = r.port_name(port.get("name"), f"{where}.name")
        if not name and len(raw_ports) > 1:
            raise r.invalid(f"{where}.name", "a name is required when a Service has several ports")
        protocol = r.protocol(port.get("protocol"), f"{where}.protocol")
        if (name, protocol) in seen:
            raise r.invalid(f"{where}.name", f"duplicate port name {name!r} for {protocol.value}")
        seen.add((name, protocol))
        if port.get("port") is None:
            raise r.invalid(f"{where}.port", "is required")
        ports.append(
            ServicePort(
                name=name,
                protocol=protocol,
                port=r.integer(port.get("port"), f"{where}.port", 1, 65535),
                node_port=r.integer(port.get("nodePort"), f"{where}.nodePort", 0, 65535),
            )
        )

    external_ips = tuple(
        r.ip(ip, f"spec.externalIPs[{i}]")
        for i, ip in enumerate(r.sequence(spec.get("externalIPs"), "spec.externalIPs"))
    )

    ingress: list[LoadBalancerIngress] = []
    lb = r.mapping(status.get("loadBalancer"), "status.loadBalancer")
    for i, raw in enumerate(r.sequence(lb.get("ingress"), "status.loadBalancer.ingress")):
        where = f"status.loadBalancer.ingress[{i}]"
        entry = r.mapping(raw, where)
        if not entry.get("ip"):
            continue  # hostname-only ingress: nothing to program
        ingress.append(
            LoadBalancerIngress(
                ip=r.ip(entry.get("ip"), f"{where}.ip"),
                ip_mode=r.enum_value(
                    LoadBalancerIPMode,
                    entry.get("ipMode"),
                    f"{where}.ipMode",
                    LoadBalancerIPMode.VIP,
                ),
            )
        )

    # Upstream trims whitespace and ignores (with a log line) source ranges it cannot parse.
    source_ranges: list[IPNetwork] = []
    raw_ranges = r.sequence(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    for i, raw in enumerate(raw_ranges):
        text = r.string(raw, f"spec.loadBalancerSourceRanges[{i}]")
        try:
            source_ranges.append(parse_cidr(text))
        except ValueError:
            if problems is not None:
                problems.append(
                    r.invalid(
                        f"spec.loadBalancerSourceRanges[{i}]",
                        f"{text!r} is not a valid CIDR (ignored, as kube-proxy does)",
                    )
                )

    affinity_timeout: int | None = None
    affinity = r.string(spec.get("sessionAffinity"), "spec.sessionAffinity", default="None")
    if affinity == "ClientIP":
        config = r.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
        client_ip = r.mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        affinity_timeout = r.integer(
            client_ip.get("timeoutSeconds"),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            1,
            86400,
            default=DEFAULT_AFFINITY_TIMEOUT_SECONDS,
        )
    elif affinity != "None":
        raise r.invalid("spec.sessionAffinity", f"unknown value {affinity!r} (None, ClientIP)")

    traffic_distribution = spec.get("trafficDistribution")
    return Service(
        namespace=r.namespace,
        name=r.name,
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        external_ips=external_ips,
        load_balancer_ingress=tuple(ingress),
        load_balancer_source_ranges=tuple(source_ranges),
        session_affinity_timeout=affinity_timeout,
        external_traffic_policy=r.enum_value(
            TrafficPolicy,
            spec.get("externalTrafficPolicy"),
            "spec.externalTrafficPolicy",
            TrafficPolicy.CLUSTER,
        ),
        internal_traffic_policy=r.enum_value(
            TrafficPolicy,
            spec.get("internalTrafficPolicy"),
            "spec.internalTrafficPolicy",
            TrafficPolicy.CLUSTER,
        ),
        health_check_node_port=r.integer(
            spec.get("healthCheckNodePort"), "spec.healthCheckNodePort", 0, 65535
        ),
        traffic_distribution=traffic_distribution
        if isinstance(traffic_distribution, str)
        else None,
    )


# --- EndpointSlice ------------------------------------------------------------------------


def _hint_names(r: _Reader, hints: Mapping[str, object], key: str, where: str) -> frozenset[str]:
    names: set[str] = set()
    for j, raw in enumerate(r.sequence(hints.get(key), f"{where}.{key}")):
        entry = r.mapping(raw, f"{where}.{key}[{j}]")
        names.add(r.string(entry.get("name"), f"{where}.{key}[{j}].name"))
    return frozenset(names)


_NO_HINTS: frozenset[str] = frozenset()


def _condition(
    r: _Reader, conditions: Mapping[str, object], key: str, default: bool, index: int
) -> bool:
    value = conditions.get(key)
    if value is None:
        return default
    if value is True or value is False:
        return value
    raise r.invalid(f"endpoints[{index}].conditions.{key}", f"must be true or false, not {value!r}")


def _parse_trigger_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def endpoint_slice_from_api(
    obj: Mapping[str, object], problems: list[InvalidObject] | None = None
) -> EndpointSlice | None:
    """An EndpointSlice, or None when ignored (FQDN, headless, another proxy's).

    An endpoint whose address is invalid or of the other family is dropped on its own, with an
    InvalidObject appended to `problems` (as upstream skips it); anything wrong at the slice
    level raises.
    """
    r = _Reader("EndpointSlice", obj)
    if is_ignored_by_label(obj):
        return None
    r.check_names(namespaced=True, name_pattern=_DNS1123_SUBDOMAIN)
    address_type = r.string(obj.get("addressType"), "addressType")
    if address_type == "FQDN":
        return None
    try:
        family = IPFamily(address_type)
    except ValueError:
        raise r.invalid(
            "addressType", f"unknown value {address_type!r} (IPv4, IPv6, FQDN)"
        ) from None
    version = 4 if family is IPFamily.IPv4 else 6
    service_name = _labels(obj).get(LABEL_SERVICE_NAME)
    if not isinstance(service_name, str) or not _DNS1035_LABEL.fullmatch(service_name):
        raise r.invalid(f"metadata.labels[{LABEL_SERVICE_NAME}]", "missing or not a Service name")

    ports: list[EndpointPort] = []
    seen: set[tuple[str, Protocol]] = set()
    for i, raw in enumerate(r.sequence(obj.get("ports"), "ports")):
        where = f"ports[{i}]"
        port = r.mapping(raw, where)
        if port.get("name") is None or not port.get("port"):
            continue  # upstream ignores ports without a name or number
        name = r.port_name(port.get("name"), f"{where}.name")
        protocol = r.protocol(port.get("protocol"), f"{where}.protocol")
        if (name, protocol) in seen:
            raise r.invalid(f"{where}.name", f"duplicate port name {name!r} for {protocol.value}")
        seen.add((name, protocol))
        ports.append(
            EndpointPort(name, protocol, r.integer(port.get("port"), f"{where}.port", 1, 65535))
        )

    # The hot loop of a 10,000-slice list: field names are only formatted for an error.
    endpoints: list[Endpoint] = []
    for i, raw in enumerate(r.sequence(obj.get("endpoints"), "endpoints")):
        ep = raw if type(raw) is dict else r.mapping(raw, f"endpoints[{i}]")
        addresses = ep.get("addresses")
        if type(addresses) is not list:
            addresses = r.sequence(addresses, f"endpoints[{i}].addresses")
        try:
            if not addresses:
                raise r.invalid(f"endpoints[{i}].addresses", "is empty")
            address = r.ip(addresses[0], f"endpoints[{i}].addresses[0]")
            if address.version != version:
                raise r.invalid(
                    f"endpoints[{i}].addresses[0]",
                    f"{address} is not an {family.value} address"
                    f" (slice addressType {family.value})",
                )
        except InvalidObject as problem:
            if problems is not None:
                problems.append(problem)
            continue
        conditions = ep.get("conditions")
        if type(conditions) is not dict:
            conditions = r.mapping(conditions, f"endpoints[{i}].conditions")
        hints = ep.get("hints")
        if hints is not None:
            hints = r.mapping(hints, f"endpoints[{i}].hints")
            zone_hints = _hint_names(r, hints, "forZones", f"endpoints[{i}].hints")
            node_hints = _hint_names(r, hints, "forNodes", f"endpoints[{i}].hints")
        else:
            zone_hints = node_hints = _NO_HINTS
        node_name = ep.get("nodeName")
        zone = ep.get("zone")
        endpoints.append(
            Endpoint(
                address,
                _condition(r, conditions, "ready", True, i),
                _condition(r, conditions, "serving", True, i),
                _condition(r, conditions, "terminating", False, i),
                node_name if isinstance(node_name, str) else None,
                zone if isinstance(zone, str) else None,
                zone_hints,
                node_hints,
            )
        )

    return EndpointSlice(
        namespace=r.namespace,
        name=r.name,
        service_name=service_name,
        address_type=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        last_change_trigger_time=_parse_trigger_time(
            _annotations(obj).get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)
        ),
    )


# --- Node ---------------------------------------------------------------------------------


def node_from_api(obj: Mapping[str, object]) -> Node:
    r = _Reader("Node", obj)
    r.check_names(namespaced=False, name_pattern=_DNS1123_SUBDOMAIN)
    status = r.mapping(obj.get("status"), "status")
    by_type: dict[str, list[IPAddress]] = {"InternalIP": [], "ExternalIP": []}
    for i, raw in enumerate(r.sequence(status.get("addresses"), "status.addresses")):
        entry = r.mapping(raw, f"status.addresses[{i}]")
        kind = entry.get("type")
        if kind in by_type and isinstance(kind, str):
            by_type[kind].append(r.ip(entry.get("address"), f"status.addresses[{i}].address"))
    labels = {k: v for k, v in _labels(obj).items() if isinstance(v, str)}
    metadata = r.mapping(obj.get("metadata"), "metadata")
    spec = r.mapping(obj.get("spec"), "spec")
    taints = r.sequence(spec.get("taints"), "spec.taints")
    being_deleted = metadata.get("deletionTimestamp") is not None or any(
        isinstance(t, Mapping) and t.get("key") == "ToBeDeletedByClusterAutoscaler" for t in taints
    )
    return Node(
        name=r.name,
        addresses=tuple(by_type["InternalIP"] + by_type["ExternalIP"]),
        labels=labels,
        being_deleted=being_deleted,
    )


# --- ServiceCIDR --------------------------------------------------------------------------


def service_cidr_from_api(obj: Mapping[str, object]) -> ServiceCIDR:
    """networking.k8s.io/v1 ServiceCIDR: `spec.cidrs`, one or two CIDRs (one per family)."""
    r = _Reader("ServiceCIDR", obj)
    r.check_names(namespaced=False, name_pattern=_DNS1123_SUBDOMAIN)
    spec = r.mapping(obj.get("spec"), "spec")
    cidrs = []
    for i, raw in enumerate(r.sequence(spec.get("cidrs"), "spec.cidrs")):
        text = r.string(raw, f"spec.cidrs[{i}]")
        try:
            cidrs.append(parse_cidr(text))
        except ValueError:
            raise r.invalid(f"spec.cidrs[{i}]", f"{text!r} is not a valid CIDR") from None
    return ServiceCIDR(name=r.name, cidrs=tuple(cidrs))


# --- whole state --------------------------------------------------------------------------


def state_from_objects(
    objects: Iterable[Mapping[str, object]],
) -> tuple[ClusterState, list[InvalidObject]]:
    """Convert a bag of API objects; invalid ones are reported and left out, never fatal."""
    services: dict[NamespacedName, Service] = {}
    slices: dict[NamespacedName, EndpointSlice] = {}
    nodes: dict[str, Node] = {}
    service_cidrs: dict[str, ServiceCIDR] = {}
    problems: list[InvalidObject] = []
    for obj in objects:
        kind = obj.get("kind")
        try:
            if kind == "Service":
                service = service_from_api(obj, problems)
                if service is not None:
                    services[service.namespaced_name] = service
            elif kind == "EndpointSlice":
                endpoint_slice = endpoint_slice_from_api(obj, problems)
                if endpoint_slice is not None:
                    key = NamespacedName(endpoint_slice.namespace, endpoint_slice.name)
                    slices[key] = endpoint_slice
            elif kind == "Node":
                node = node_from_api(obj)
                nodes[node.name] = node
            elif kind == "ServiceCIDR":
                service_cidr = service_cidr_from_api(obj)
                service_cidrs[service_cidr.name] = service_cidr
        except InvalidObject as problem:
            problems.append(problem)
    cluster = ClusterState(
        services=services, endpoint_slices=slices, nodes=nodes, service_cidrs=service_cidrs
    )
    return cluster, problems
