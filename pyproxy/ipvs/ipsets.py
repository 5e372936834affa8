"""The ipsets kube-proxy's IPVS mode keeps, as text: names, types, members, restore input.

IPVS itself only load-balances; what iptables must still do (masquerade, drop, accept) is
decided per packet by matching these sets, so the iptables rules stay a fixed handful however
many Services there are. Names, types and comments are upstream's (pkg/proxy/ipvs/ipset.go), so
`ipset list` reads like kube-proxy's; IPv6 sets are called `KUBE-6-...` (truncated to 31
characters, ipset's limit) so both families' sets can live side by side.

Members are written the way `ipset save` prints them (`10.96.0.10,tcp:80`, `30080`,
`192.0.2.1,tcp:80,203.0.113.0/24`; a host "net" without its /32), and `canonical_member`
brings what the kernel prints back to that form, so plan and kernel compare as plain strings.

Pure: writing goes through `ipset restore` (one call for any number of changes), built here.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyproxy.model import IPAddress, IPFamily, IPNetwork, Protocol

#: ipset's limit on set names.
MAX_NAME_LENGTH = 31
HASH_SIZE = 1024
MAX_ELEMENTS = 65536
PORT_RANGE = "0-65535"


class IpsetType(enum.Enum):
    HASH_IP = "hash:ip"
    HASH_IP_PORT = "hash:ip,port"
    HASH_IP_PORT_IP = "hash:ip,port,ip"
    HASH_IP_PORT_NET = "hash:ip,port,net"
    BITMAP_PORT = "bitmap:port"


# Upstream's set names (IPv4 spelling) and comments.
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

#: Every set, in upstream's order (ipsetInfo): (IPv4 name, type, comment).
IPSET_TABLE: tuple[tuple[str, IpsetType, str], ...] = (
    (
        LOOP_BACK,
        IpsetType.HASH_IP_PORT_IP,
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    (
        CLUSTER_IP,
        IpsetType.HASH_IP_PORT,
        "Kubernetes service cluster ip + port for masquerade purpose",
    ),
    (
        EXTERNAL_IP,
        IpsetType.HASH_IP_PORT,
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    (
        EXTERNAL_IP_LOCAL,
        IpsetType.HASH_IP_PORT,
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    (LOAD_BALANCER, IpsetType.HASH_IP_PORT, "Kubernetes service lb portal"),
    (
        LOAD_BALANCER_FW,
        IpsetType.HASH_IP_PORT,
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    (
        LOAD_BALANCER_LOCAL,
        IpsetType.HASH_IP_PORT,
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    (
        LOAD_BALANCER_SOURCE_IP,
        IpsetType.HASH_IP_PORT_IP,
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    (
        LOAD_BALANCER_SOURCE_CIDR,
        IpsetType.HASH_IP_PORT_NET,
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    (
        NODE_PORT_TCP,
        IpsetType.BITMAP_PORT,
        "Kubernetes nodeport TCP port for masquerade purpose",
    ),
    (
        NODE_PORT_LOCAL_TCP,
        IpsetType.BITMAP_PORT,
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    (
        NODE_PORT_UDP,
        IpsetType.BITMAP_PORT,
        "Kubernetes nodeport UDP port for masquerade purpose",
    ),
    (
        NODE_PORT_LOCAL_UDP,
        IpsetType.BITMAP_PORT,
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    (
        NODE_PORT_SCTP,
        IpsetType.HASH_IP_PORT,
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    ),
    (
        NODE_PORT_LOCAL_SCTP,
        IpsetType.HASH_IP_PORT,
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    (HEALTH_CHECK_NODE_PORT, IpsetType.BITMAP_PORT, "Kubernetes health check node port"),
    (IPVS_IPS, IpsetType.HASH_IP, "Addresses on the ipvs interface"),
)

#: Node-port sets by protocol: (cluster policy set, Local policy set).
NODE_PORT_SETS: Mapping[Protocol, tuple[str, str]] = {
    Protocol.TCP: (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
    Protocol.UDP: (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
    Protocol.SCTP: (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP),
}


def ipset_name(base: str, family: IPFamily) -> str:
    """Upstream's NewIPSet naming: IPv6 sets get `KUBE-6-`, cut to 31 characters."""
    if family is IPFamily.IPv6 and base.startswith("KUBE-"):
        return ("KUBE-6-" + base.removeprefix("KUBE-"))[:MAX_NAME_LENGTH]
    return base


@dataclass(frozen=True, slots=True)
class IpsetSpec:
    """One set as ipvs mode creates it (`base` is the IPv4 name every family shares)."""

    base: str
    name: str
    type: IpsetType
    family: IPFamily
    comment: str

    @property
    def create_line(self) -> str:
        """`ipset restore` line that creates the set (as upstream's CreateSet)."""
        if self.type is IpsetType.BITMAP_PORT:
            options = f"range {PORT_RANGE}"
        else:
            inet = "inet" if self.family is IPFamily.IPv4 else "inet6"
            options = f"family {inet} hashsize {HASH_SIZE} maxelem {MAX_ELEMENTS}"
        return f"create {self.name} {self.type.value} {options} comment"

    def add_line(self, member: str) -> str:
        return f'add {self.name} {member} comment "{self.comment}"'

    def del_line(self, member: str) -> str:
        return f"del {self.name} {member}"


def ipset_specs(family: IPFamily) -> tuple[IpsetSpec, ...]:
    """Every set one family's proxier uses, in upstream's order."""
    return tuple(
        IpsetSpec(base, ipset_name(base, family), kind, family, comment)
        for base, kind, comment in IPSET_TABLE
    )


# --- members ----------------------------------------------------------------------------


def _net_text(net: IPNetwork) -> str:
    """As ipset prints a net: a full-length prefix is just the address."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def ip_port(ip: IPAddress, protocol: Protocol, port: int) -> str:
    return f"{ip},{protocol.lower}:{port}"


def ip_port_ip(ip: IPAddress, protocol: Protocol, port: int, ip2: IPAddress) -> str:
    return f"{ip},{protocol.lower}:{port},{ip2}"


def ip_port_net(ip: IPAddress, protocol: Protocol, port: int, net: IPNetwork) -> str:
    return f"{ip},{protocol.lower}:{port},{_net_text(net)}"


def _canonical_ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _canonical_net(text: str) -> str:
    return _net_text(ipaddress.ip_network(text, strict=False))


def _canonical_proto_port(text: str) -> str:
    proto, sep, port = text.partition(":")
    if not sep:  # ipset defaults a bare port to tcp
        return f"tcp:{int(proto)}"
    return f"{proto.lower()}:{int(port)}"


def canonical_member(kind: IpsetType, text: str) -> str:
    """A member as `ipset save` prints it, in the form this module writes; unparsable text is
    returned unchanged (it then simply differs from every planned member and is deleted)."""
    parts = text.strip().split(",")
    try:
        if kind is IpsetType.BITMAP_PORT and len(parts) == 1:
            return str(int(parts[0]))
        if kind is IpsetType.HASH_IP and len(parts) == 1:
            return _canonical_ip(parts[0])
        if kind is IpsetType.HASH_IP_PORT and len(parts) == 2:
            return f"{_canonical_ip(parts[0])},{_canonical_proto_port(parts[1])}"
        if kind is IpsetType.HASH_IP_PORT_IP and len(parts) == 3:
            return (
                f"{_canonical_ip(parts[0])},{_canonical_proto_port(parts[1])},"
                f"{_canonical_ip(parts[2])}"
            )
        if kind is IpsetType.HASH_IP_PORT_NET and len(parts) == 3:
            return (
                f"{_canonical_ip(parts[0])},{_canonical_proto_port(parts[1])},"
                f"{_canonical_net(parts[2])}"
            )
    except ValueError:
        pass
    return text.strip()


def member_sort_key(member: str) -> tuple[tuple[int, int, str], ...]:
    """Numeric order for members (10.0.0.9 before 10.0.0.10), stable for any text."""
    key: list[tuple[int, int, str]] = []
    for part in member.split(","):
        head = part.split("/")[0]
        try:
            ip = ipaddress.ip_address(head)
            key.append((ip.version, int(ip), part))
            continue
        except ValueError:
            pass
        proto, _, port = part.rpartition(":")
        if port.isdigit():
            key.append((0, int(port), proto))
        else:
            key.append((9, 0, part))
    return tuple(key)


# --- what the kernel has, and the restore input --------------------------------------------


@dataclass(frozen=True, slots=True)
class CurrentIpset:
    """A set as `ipset save` listed it: its type and canonical members."""

    type: str
    members: frozenset[str]


def parse_save(text: str) -> dict[str, CurrentIpset]:
    """`ipset save` output → sets by name (members canonical when the type is known)."""
    types: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for raw in text.splitlines():
        words = raw.split()
        if len(words) >= 3 and words[0] == "create":
            types[words[1]] = words[2]
            members.setdefault(words[1], [])
        elif len(words) >= 3 and words[0] == "add":
            members.setdefault(words[1], []).append(words[2])
    known = {t.value: t for t in IpsetType}
    result = {}
    for name, kind_text in types.items():
        kind = known.get(kind_text)
        entries = members.get(name, [])
        canonical = (canonical_member(kind, m) for m in entries) if kind else iter(entries)
        result[name] = CurrentIpset(kind_text, frozenset(canonical))
    return result


def restore_text(
    create: Iterable[IpsetSpec],
    add: Iterable[tuple[IpsetSpec, str]],
    delete: Iterable[tuple[IpsetSpec, str]],
) -> str:
    """`ipset restore -exist` input: create sets, add members, then delete stale ones."""
    lines = [spec.create_line for spec in create]
    lines += [spec.add_line(member) for spec, member in add]
    lines += [spec.del_line(member) for spec, member in delete]
    return "".join(line + "\n" for line in lines)
