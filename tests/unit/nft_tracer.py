"""Upstream's nftables packet tracer (pkg/proxy/nftables/helpers_test.go), over dump text.

Same semantics as upstream's test helper, so upstream's packetFlowTest tables can be run
against pyproxy's `--dry-run --proxy-mode nftables` output unchanged: rules are not parsed as
nft grammar, only the pieces kube-proxy writes are recognized (anything else fails the test);
`ct state new` and comments are ignored (and, beyond upstream, affinity lookups miss and
affinity updates do nothing: the packet is a new connection); `jump mark-for-masquerade`
sets the masquerade flag; `numgen random` follows *every* endpoint; the first DNAT rewrites
the destination before the filter chains run. Order: filter-prerouting-pre-dnat,
nat-prerouting, filter-forward, filter-input (output-path chains are redundant with these, as
upstream notes).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

_RULE = re.compile(r"^add rule ip6? kube-proxy (\S+) (.*)$")
_ELEMENT = re.compile(r"^add element ip6? kube-proxy (\S+) \{ (.*) \}$")
_COMMENT = re.compile(r' comment "[^"]*"')

_DEST_ADDR = re.compile(r"^ip6* daddr (!= )?(\S+)")
_DEST_ADDR_LOOKUP = re.compile(r"^ip6* daddr (!= )?\{([^}]*)\}")
_DEST_ADDR_LOCAL = re.compile(r"^fib daddr type local")
_DEST_PORT = re.compile(r"^(tcp|udp|sctp) dport (\d+)")
_DEST_IP_ONLY_LOOKUP = re.compile(r"^ip6* daddr @(\S+)")
_DEST_DISPATCH = re.compile(r"^ip6* daddr \. meta l4proto \. th dport vmap @(\S+)$")
_DEST_PORT_DISPATCH = re.compile(r"^meta l4proto \. th dport vmap @(\S+)$")
_SOURCE_ADDR = re.compile(r"^ip6* saddr (!= )?(\S+)")
_SOURCE_ADDR_LOOKUP = re.compile(r"^ip6* saddr (!= )?\{([^}]*)\}")
_SOURCE_ADDR_LOCAL = re.compile(r"^fib saddr type local")
# Additions to upstream's tracer (its flow tables have no affinity): a new connection's
# source is in no affinity set yet, and recording it changes nothing for this packet.
_AFFINITY_LOOKUP = re.compile(r"^ip6* saddr @(\S+)")
_AFFINITY_UPDATE = re.compile(r"^update @\S+ \{ ip6* saddr \}")
_ENDPOINT_VMAP = re.compile(r"^numgen random mod \d+ vmap \{(.*)\}$")
_ENDPOINT_VMAP_ENTRY = re.compile(r"\d+ : goto (\S+)")
_MASQUERADE = re.compile(r"^jump mark-for-masquerade$")
_JUMP = re.compile(r"^(jump|goto) (\S+)$")
_RETURN = re.compile(r"^return$")
_VERDICT = re.compile(r"^(drop|reject)$")
_DNAT = re.compile(r"^meta l4proto (tcp|udp|sctp) dnat to (\S+)$")
_IGNORED = re.compile(r' *comment "[^"]*"$|^ct state new')


@dataclass
class Table:
    rules: dict[str, list[str]] = field(default_factory=dict)
    #: set or map name → [(key parts, value)]
    elements: dict[str, list[tuple[list[str], str]]] = field(default_factory=dict)

    @staticmethod
    def parse(dump: str) -> Table:
        table = Table()
        for line in dump.splitlines():
            if line.startswith("add chain "):
                table.rules.setdefault(line.split(" ")[4], [])
            elif m := _RULE.match(line):
                table.rules.setdefault(m.group(1), []).append(m.group(2))
            elif m := _ELEMENT.match(line):
                body = _COMMENT.sub("", m.group(2))
                key, _, value = body.partition(" : ")
                table.elements.setdefault(m.group(1), []).append((key.split(" . "), value))
        return table


class TraceError(AssertionError):
    """A rule the tracer does not recognize, or an unknown chain (upstream: t.Errorf)."""


def _address_matches(ip: str, want: bool, rule_address: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if "/" in rule_address:
        net = ipaddress.ip_network(rule_address.strip(), strict=False)
        match = addr.version == net.version and addr in net
    else:
        match = addr == ipaddress.ip_address(rule_address.strip())
    return match == want


def _address_matches_set(ip: str, want: bool, rule_addresses: str) -> bool:
    # Upstream's quirk kept: every address of the set must give the wanted answer.
    return all(
        _address_matches(ip, True, a) == want for a in rule_addresses.replace(" ", "").split(",")
    )


@dataclass
class Tracer:
    table: Table
    node_ips: frozenset[str]
    matches: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    mark_masq: bool = False

    def run_chain(self, chain: str, src: str, proto: str, dst: str, dport: str) -> bool:
        if chain not in self.table.rules:
            raise TraceError(f"unknown chain {chain!r}")
        for original in self.table.rules[chain]:
            rule = _IGNORED.sub("", original)
            while rule:
                rule = rule.lstrip(" ")
                if m := _DEST_IP_ONLY_LOOKUP.match(rule):
                    rule = rule[m.end() :]
                    if not any(k[0] == dst for k, _ in self.table.elements.get(m.group(1), ())):
                        rule = ""
                elif m := _DEST_DISPATCH.match(rule):
                    hit = [
                        v
                        for k, v in self.table.elements.get(m.group(1), ())
                        if k == [dst, proto, dport]
                    ]
                    rule = hit[0] if hit else ""
                elif m := _DEST_PORT_DISPATCH.match(rule):
                    hit = [
                        v for k, v in self.table.elements.get(m.group(1), ()) if k == [proto, dport]
                    ]
                    rule = hit[0] if hit else ""
                elif m := _DEST_ADDR_LOOKUP.match(rule):
                    rule = rule[m.end() :]
                    if not _address_matches_set(dst, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif m := _DEST_ADDR.match(rule):
                    rule = rule[m.end() :]
                    if not _address_matches(dst, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif m := _DEST_ADDR_LOCAL.match(rule):
                    rule = rule[m.end() :]
                    if dst not in self.node_ips:
                        rule = ""
                elif m := _DEST_PORT.match(rule):
                    rule = rule[m.end() :]
                    if proto != m.group(1) or dport != m.group(2):
                        rule = ""
                elif m := _AFFINITY_LOOKUP.match(rule):
                    rule = ""
                elif m := _AFFINITY_UPDATE.match(rule):
                    rule = rule[m.end() :]
                elif m := _SOURCE_ADDR_LOOKUP.match(rule):
                    rule = rule[m.end() :]
                    if not _address_matches_set(src, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif m := _SOURCE_ADDR.match(rule):
                    rule = rule[m.end() :]
                    if not _address_matches(src, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif m := _SOURCE_ADDR_LOCAL.match(rule):
                    rule = rule[m.end() :]
                    if src not in self.node_ips:
                        rule = ""
                elif m := _MASQUERADE.match(rule):
                    rule = rule[m.end() :]
                    self.matches.append(original)
                    self.mark_masq = True
                elif m := _JUMP.match(rule):
                    rule = rule[m.end() :]
                    self.matches.append(original)
                    if self.run_chain(m.group(2), src, proto, dst, dport):
                        return True
                    if m.group(1) == "goto":
                        return False
                elif m := _VERDICT.match(rule):
                    self.matches.append(original)
                    self.outputs.append(m.group(1).upper())
                    return True
                elif _RETURN.match(rule):
                    self.matches.append(original)
                    return False
                elif m := _DNAT.match(rule):
                    self.matches.append(original)
                    self.outputs.append(m.group(2))
                    return True
                elif m := _ENDPOINT_VMAP.match(rule):
                    for target in _ENDPOINT_VMAP_ENTRY.findall(m.group(1)):
                        self.matches.append(original)
                        self.run_chain(target, src, proto, dst, dport)
                    return True
                else:
                    raise TraceError(f"unmatched rule: {original}")
        return False


def trace_packet(
    dump: str, src: str, proto: str, dst: str, dport: int, *, node_ips: frozenset[str]
) -> tuple[list[str], str, bool]:
    """Upstream's tracePacket: (matched rules, "ep:port, ..." or DROP/REJECT, masqueraded)."""
    tracer = Tracer(Table.parse(dump), node_ips)
    port = str(dport)
    if tracer.run_chain("filter-prerouting-pre-dnat", src, proto, dst, port):
        return tracer.matches, ", ".join(tracer.outputs), tracer.mark_masq
    tracer.run_chain("nat-prerouting", src, proto, dst, port)
    if tracer.outputs:
        host = tracer.outputs[0].rpartition(":")[0]
        dst = host.strip("[]")
    if tracer.run_chain("filter-forward", src, proto, dst, port):
        return tracer.matches, ", ".join(tracer.outputs), tracer.mark_masq
    tracer.run_chain("filter-input", src, proto, dst, port)
    return tracer.matches, ", ".join(tracer.outputs), tracer.mark_masq
