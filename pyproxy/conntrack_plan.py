"""Which UDP conntrack flows are stale: the pure half of kube-proxy's conntrack cleanup.

UDP has no connection teardown, so a conntrack entry lives as long as its client keeps sending
(every datagram refreshes the 30 s / 120 s timeout) and NAT is only decided on a flow's first
packet. Two things then blackhole a client that reuses its source port:

- its flow is DNATed to an endpoint that has gone away (or stopped serving), and
- its flow was created while the Service had no endpoints (or no rules yet), was not DNATed at
  all, and keeps going to the Service IP itself after endpoints appeared ("UDP 0 → N").

After each sync kube-proxy (`pkg/proxy/conntrack/cleanup.go`) maps every UDP frontend of the
family — ClusterIP:port, each external IP:port, each load-balancer VIP:port and `*:nodePort` —
to the `ip:port` of the service port's *serving* endpoints, and deletes every UDP flow whose
original destination is such a frontend but whose reply source (the DNAT target) is not one of
them. Traffic policies, topology and terminating state are deliberately ignored: a change of
Service settings must not break existing flows, exactly as for TCP.

Differences from that file, on purpose:

- A frontend without serving endpoints (scaled to zero, or gone since the previous sync: a
  deleted Service, a removed external IP or VIP, a changed nodePort) still clears flows that are
  DNATed to some endpoint: the REJECT rule matches the Service IP, which such flows no longer
  carry, so they would keep feeding a dead or reused pod IP (kubernetes#139628, fixed upstream
  by #139629 and #141371). Flows to it that were never DNATed are left alone: there is nothing
  better to send them to, and the REJECT rule already applies to them (unreplied UDP stays NEW).
- A flow whose destination is a known Service IP frontend is judged by that frontend only; the
  `*:nodePort` rule applies to other destinations. Upstream checks both, so a ClusterIP whose
  port number equals another Service's nodePort loses its valid flows on every cleanup.
- Two Services claiming the same frontend (a conflict the API allows for external IPs) allow
  the union of their endpoints instead of whichever Go's map iteration visits last.
- Upstream dumps the table after every sync; pyproxy only after a sync that may have made a
  flow stale (`cleanup_needed`), judged on the very map the flows are judged against, so no
  sequence of endpoint states can strand a flow (an endpoint that turns terminating but still
  serving changes the rules and not the map; when it goes, the map changes and not the rules).

Nothing here does I/O: `pyproxy.conntrack` dumps the flows and deletes what this module picks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from pyproxy.model import IPAddress, Protocol, format_endpoint
from pyproxy.proxystate import ServicePortState, ServiceStates
from pyproxy.serviceport import ServicePortInfo

_Key = TypeVar("_Key")

#: IANA protocol numbers, as conntrack reports them.
IPPROTO_TCP = 6
IPPROTO_UDP = 17

#: An address and port: a frontend (`10.96.0.10`, 53) or an endpoint (`10.244.1.11`, 5353).
HostPort: TypeAlias = tuple[IPAddress, int]

#: A family's service ports: per Service (proxystate's ServiceStates), or flat.
ServicePorts: TypeAlias = ServiceStates | Iterable[ServicePortState]


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry, as much of it as cleanup reads (and deletion needs).

    `orig_*` is the tuple of the first packet as the client sent it; `reply_src` is where the
    replies come from, i.e. the DNAT target, or the original destination when there was no DNAT.
    """

    proto: int
    orig_src: IPAddress
    orig_src_port: int
    orig_dst: IPAddress
    orig_dst_port: int
    reply_src: IPAddress
    reply_src_port: int
    #: conntrack zone (0 unless something like OVS uses zones); deletion must name it.
    zone: int = 0

    @property
    def dnat(self) -> bool:
        """Replies come from somewhere else than the original destination."""
        return (self.reply_src, self.reply_src_port) != (self.orig_dst, self.orig_dst_port)

    def __str__(self) -> str:
        src = format_endpoint(self.orig_src, self.orig_src_port)
        dst = format_endpoint(self.orig_dst, self.orig_dst_port)
        reply = format_endpoint(self.reply_src, self.reply_src_port)
        return f"proto={self.proto} {src} -> {dst} (reply from {reply})"


@dataclass(frozen=True, slots=True)
class AllowedEndpoints:
    """UDP frontends of one IP family → the endpoints flows to them may be DNATed to.

    An empty set marks a frontend with no serving endpoint (now) or that no longer exists
    (since the previous sync): only DNATed flows to it are stale.
    """

    #: (ClusterIP | external IP | LB VIP, port) → allowed endpoints.
    service_ips: Mapping[HostPort, frozenset[HostPort]] = field(default_factory=dict)
    #: nodePort (any destination address) → allowed endpoints.
    node_ports: Mapping[int, frozenset[HostPort]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        """False when there is no UDP frontend at all: nothing can be stale, skip the dump."""
        return bool(self.service_ips) or bool(self.node_ports)

    def allowed_for(self, flow: Flow) -> frozenset[HostPort] | None:
        """The allowed endpoints for `flow`'s destination, or None if it is no UDP frontend."""
        if flow.proto != IPPROTO_UDP:
            return None
        allowed = self.service_ips.get((flow.orig_dst, flow.orig_dst_port))
        if allowed is None:
            allowed = self.node_ports.get(flow.orig_dst_port)
        return allowed

    def as_text(self) -> dict[str, list[str]]:
        """Upstream's notation, for logs and tests: `{"10.96.0.10:53": ["10.244.1.11:5353"]}`."""
        text = {
            format_endpoint(ip, port): _endpoints_text(eps)
            for (ip, port), eps in self.service_ips.items()
        }
        text.update((f"*:{port}", _endpoints_text(eps)) for port, eps in self.node_ports.items())
        return dict(sorted(text.items()))


def _endpoints_text(endpoints: frozenset[HostPort]) -> list[str]:
    return sorted(format_endpoint(ip, port) for ip, port in endpoints)


def _frontends(info: ServicePortInfo) -> tuple[list[HostPort], int]:
    ips = [info.cluster_ip, *info.external_ips, *info.load_balancer_vips]
    return [(ip, info.port) for ip in ips], info.node_port


def service_ports(states: ServicePorts) -> Iterator[ServicePortState]:
    """Every ServicePortState of `states`, whichever of the two shapes it has."""
    if isinstance(states, Mapping):
        return itertools.chain.from_iterable(states.values())
    return iter(states)


def allowed_endpoints(current: ServicePorts, *, previous: ServicePorts = ()) -> AllowedEndpoints:
    """The allowed map after a sync, from the family's service ports before and after it.

    `current` decides: every UDP frontend maps to the `ip:port` of its serving endpoints.
    `previous` only contributes frontends that no longer exist (with an empty set), so flows
    DNATed through a deleted Service, a removed external IP or a changed nodePort are cleared.
    """
    service_ips: dict[HostPort, set[HostPort]] = {}
    node_ports: dict[int, set[HostPort]] = {}
    for state in service_ports(current):
        if state.info.protocol is not Protocol.UDP:
            continue
        serving = {(ep.ip, ep.port) for ep in state.endpoints if ep.serving}
        ips, node_port = _frontends(state.info)
        for key in ips:
            service_ips.setdefault(key, set()).update(serving)
        if node_port:
            node_ports.setdefault(node_port, set()).update(serving)
    for state in service_ports(previous):
        if state.info.protocol is not Protocol.UDP:
            continue
        ips, node_port = _frontends(state.info)
        for key in ips:
            service_ips.setdefault(key, set())
        if node_port:
            node_ports.setdefault(node_port, set())
    return AllowedEndpoints(
        {key: frozenset(eps) for key, eps in service_ips.items()},
        {key: frozenset(eps) for key, eps in node_ports.items()},
    )


def cleanup_needed(previous: ServiceStates, current: ServiceStates) -> bool:
    """Can a sync that turned the service ports `previous` into `current` have made a flow stale?

    Pass the ports of the Services the sync changed (before and after); unchanged Services
    cannot change the answer. A flow that was not stale before becomes stale only when, for
    its frontend, `allowed_endpoints` loses the endpoint it is DNATed to, goes from empty to
    non-empty (flows cached without DNAT) or appears or disappears (the flow is judged by
    another entry, or by none). Comparing anything else, such as the endpoints the rules use,
    misses flows: an endpoint that turns terminating but still serving leaves the rules, not
    the allowed map; when it then goes, the map changes while the rules do not.
    """
    before, after = allowed_endpoints(previous), allowed_endpoints(current)
    return _lost_any(before.service_ips, after.service_ips) or _lost_any(
        before.node_ports, after.node_ports
    )


def _lost_any(
    before: Mapping[_Key, frozenset[HostPort]], after: Mapping[_Key, frozenset[HostPort]]
) -> bool:
    """A frontend came or went, lost an allowed endpoint, or got its first one."""
    if before.keys() != after.keys():
        return True
    return any(
        not endpoints <= after[key] or (not endpoints and after[key])
        for key, endpoints in before.items()
    )


def is_stale(flow: Flow, allowed: AllowedEndpoints) -> bool:
    """Must `flow` be deleted so that its next datagram is load-balanced afresh?

    Yes when it goes to a UDP frontend and its replies come from anything but an allowed
    endpoint: a gone or non-serving endpoint, or (when the frontend has endpoints) the
    frontend itself, i.e. a flow cached before there was anything to DNAT to.
    """
    endpoints = allowed.allowed_for(flow)
    if endpoints is None:
        return False
    if (flow.reply_src, flow.reply_src_port) in endpoints:
        return False
    return bool(endpoints) or flow.dnat


def stale_flows(flows: Iterable[Flow], allowed: AllowedEndpoints) -> list[Flow]:
    """The flows `is_stale` picks, in input order."""
    return [flow for flow in flows if is_stale(flow, allowed)]
