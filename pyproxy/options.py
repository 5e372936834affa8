"""Command-line flags (kube-proxy's names) and how they become per-family proxier configs.

Parsing is strict: a bad CIDR, duration or boolean is a ConfigError naming the flag, before
anything touches the kernel. `proxier_configs` is pure: given the options, this node's Node
object (if any) and the host's addresses, it decides the node IPs, the IP families to serve and
every per-family setting, the way kube-proxy's server.go does.
"""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pyproxy.convert import parse_cidr, parse_ip
from pyproxy.errors import ConfigError
from pyproxy.ipvs.plan import normalize_scheduler
from pyproxy.model import IPAddress, IPFamily, IPNetwork, Node
from pyproxy.proxystate import ProxierConfig

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")  # ASCII, as Go
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration subset: `30s`, `1m0s`, `500ms`, `0`. Returns seconds."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {text!r} (e.g. 30s, 1m, 500ms)")
    return total


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "t", "yes"):
        return True
    if lowered in ("false", "0", "f", "no"):
        return False
    raise ValueError(f"invalid boolean {text!r} (true or false)")


@dataclass(frozen=True, slots=True)
class FeatureGate:
    """One gate's v1.34.4 spec (pkg/features/kube_features.go): its default, and whether it
    is locked to that default (GA gates kept only so that old flags still parse)."""

    default: bool
    locked: bool = False


#: Every gate whose behaviour pyproxy implements, as kube-proxy v1.34.4 registers it. The
#: locked ones are accepted at their default, as kube-proxy does, and rejected otherwise.
FEATURE_GATES: dict[str, FeatureGate] = {
    # Node hints (hints.forNodes) select the endpoints: beta since 1.34, on by default.
    "PreferSameTrafficDistribution": FeatureGate(default=True),
    # spec.trafficDistribution (hints set by the EndpointSlice controller): GA, locked in 1.33.
    "ServiceTrafficDistribution": FeatureGate(default=True, locked=True),
    # Zone hints: GA, locked in 1.33.
    "TopologyAwareHints": FeatureGate(default=True, locked=True),
    # status.loadBalancer.ingress[].ipMode: GA, locked in 1.32.
    "LoadBalancerIPMode": FeatureGate(default=True, locked=True),
}


def parse_feature_gates(text: str) -> dict[str, bool]:
    """`--feature-gates KEY=BOOL,...` as component-base parses it: an unknown gate, a value
    that is not a boolean, or a locked gate set away from its default is an error naming the
    gate. Returns only the gates given."""
    gates: dict[str, bool] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--feature-gates: missing bool value for {key}")
        spec = FEATURE_GATES.get(key)
        if spec is None:
            raise ConfigError(f"--feature-gates: unrecognized feature gate: {key}")
        try:
            enabled = parse_bool(value)
        except ValueError:
            raise ConfigError(
                f"--feature-gates: invalid value of {key}={value.strip()} (true or false)"
            ) from None
        if spec.locked and enabled != spec.default:
            raise ConfigError(
                f"--feature-gates: cannot set feature gate {key} to {str(enabled).lower()},"
                f" feature is locked to {str(spec.default).lower()}"
            )
        gates[key] = enabled
    return gates


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    proxy_mode: str = "iptables"
    hostname_override: str = ""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    #: CIDRs, or the single word "primary" handled by proxier_configs.
    nodeport_addresses: tuple[str, ...] = ()
    localhost_nodeports: bool = True
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    #: A scheduler name, normalised by parse_options ("" → "rr").
    ipvs_scheduler: str = "rr"
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    kubeconfig: str | None = None
    cleanup: bool = False
    dry_run: bool = False
    state: str | None = None
    once: bool = False
    node_ips: tuple[IPAddress, ...] = ()
    iptables_backend: str = "auto"
    verbosity: int = 0
    #: The PreferSameTrafficDistribution gate: beta and on by default in 1.34.
    prefer_same_node: bool = FEATURE_GATES["PreferSameTrafficDistribution"].default
    #: --ipvs-exclude-cidrs: virtual servers in these are never deleted as stale (ipvs mode).
    ipvs_exclude_cidrs: tuple[IPNetwork, ...] = ()
    #: --ipvs-strict-arp: arp_ignore=1, arp_announce=2 on all interfaces (ipvs mode).
    ipvs_strict_arp: bool = False
    #: --ipvs-tcp-timeout, --ipvs-tcpfin-timeout, --ipvs-udp-timeout in seconds; 0 leaves the
    #: kernel's value as it is (ipvs mode, set once at start as `ipvsadm --set`).
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcpfin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0

    @property
    def node_name(self) -> str:
        name = self.hostname_override.strip().lower()
        return name or socket.gethostname().strip().lower()


def _flag_bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _flag_duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _flag_ip(value: str) -> IPAddress:
    try:
        return parse_ip(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyproxy",
        description="kube-proxy in Python: program Service rules for this node.",
    )
    p.add_argument("--proxy-mode", choices=("iptables", "ipvs", "nftables"), default="iptables")
    p.add_argument(
        "--hostname-override",
        default="",
        metavar="NAME",
        help="this node's name (default: the host name)",
    )
    p.add_argument(
        "--cluster-cidr",
        default="",
        metavar="CIDR[,CIDR]",
        help="pod CIDRs for local-traffic detection; empty: no detection",
    )
    p.add_argument(
        "--masquerade-all",
        nargs="?",
        const=True,
        default=False,
        type=_flag_bool,
        help="masquerade all traffic to cluster IPs",
    )
    p.add_argument(
        "--nodeport-addresses",
        default="",
        metavar="CIDR[,CIDR]|primary",
        help="addresses NodePorts answer on (default: every local address; nftables: primary)",
    )
    p.add_argument(
        "--iptables-localhost-nodeports",
        nargs="?",
        const=True,
        default=True,
        type=_flag_bool,
        metavar="BOOL",
        help="allow NodePorts on 127.0.0.1 (IPv4)",
    )
    p.add_argument("--iptables-masquerade-bit", type=int, default=14, metavar="N")
    p.add_argument(
        "--iptables-sync-period",
        type=_flag_duration,
        default=30.0,
        metavar="DURATION",
        help="how often the canary chain is checked (a flushed table forces a full sync) and"
        " how long after a failed sync it is retried; ipvs mode also syncs this often;"
        " iptables mode's periodic full sync is hourly, as upstream's (default 30s)",
    )
    p.add_argument(
        "--iptables-min-sync-period",
        type=_flag_duration,
        default=1.0,
        metavar="DURATION",
        help="minimum time from the end of one sync to the start of the next; 0: sync every"
        " change at once (default 1s)",
    )
    p.add_argument("--ipvs-scheduler", default="rr")
    # As kube-proxy: the sync periods of ipvs mode; in ipvs mode the --iptables-* ones are
    # ignored, and these are ignored in the other modes (None: not given, upstream's default).
    p.add_argument(
        "--ipvs-sync-period",
        type=_flag_duration,
        default=None,
        metavar="DURATION",
        help="ipvs mode: interval between periodic syncs (default 30s; must be > 0)",
    )
    p.add_argument(
        "--ipvs-min-sync-period",
        type=_flag_duration,
        default=None,
        metavar="DURATION",
        help="ipvs mode: minimum interval between syncs (default 1s; 0: every change at once)",
    )
    p.add_argument(
        "--ipvs-exclude-cidrs",
        default="",
        metavar="CIDR[,CIDR]",
        help="ipvs mode: virtual servers in these CIDRs are never deleted as stale",
    )
    p.add_argument(
        "--ipvs-strict-arp",
        nargs="?",
        const=True,
        default=False,
        type=_flag_bool,
        metavar="BOOL",
        help="ipvs mode: set arp_ignore=1 and arp_announce=2 (net.ipv4.conf.all)",
    )
    for flag, what in (
        ("--ipvs-tcp-timeout", "idle IPVS TCP connections"),
        ("--ipvs-tcpfin-timeout", "IPVS TCP connections after a FIN"),
        ("--ipvs-udp-timeout", "IPVS UDP flows"),
    ):
        p.add_argument(
            flag,
            type=_flag_duration,
            default=0.0,
            metavar="DURATION",
            help=f"ipvs mode: timeout of {what}; 0 (default) leaves the kernel's as it is",
        )
    p.add_argument("--healthz-bind-address", default="0.0.0.0:10256", metavar="IP:PORT")
    p.add_argument("--metrics-bind-address", default="127.0.0.1:10249", metavar="IP:PORT")
    p.add_argument("--kubeconfig", default=None, metavar="FILE")
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every rule and chain pyproxy created, then exit",
    )
    p.add_argument("--dry-run", action="store_true", help="print the rules, touch nothing")
    p.add_argument(
        "--state",
        default=None,
        metavar="FILE",
        help="take the cluster state from a file (kubectl get ... -o yaml)",
    )
    p.add_argument("--once", action="store_true", help="sync once, then exit")
    p.add_argument(
        "--node-ip",
        action="append",
        type=_flag_ip,
        default=[],
        metavar="IP",
        help="a node IP (repeatable; the first is the primary)",
    )
    p.add_argument("--iptables-backend", choices=("auto", "legacy", "nft"), default="auto")
    p.add_argument(
        "--v", type=int, default=0, metavar="N", help="log verbosity (0: info, 2+: debug)"
    )
    p.add_argument(
        "--feature-gates",
        default="",
        metavar="KEY=BOOL,...",
        help="gates pyproxy implements, defaults as kube-proxy v1.34.4: "
        + ", ".join(f"{k}={str(v.default).lower()}" for k, v in FEATURE_GATES.items()),
    )
    return p


def parse_options(argv: Sequence[str]) -> ProxyOptions:
    args = build_parser().parse_args(argv)
    cidrs: list[IPNetwork] = []
    for text in filter(None, (t.strip() for t in args.cluster_cidr.split(","))):
        try:
            cidrs.append(parse_cidr(text))
        except ValueError:
            raise ConfigError(f"--cluster-cidr: invalid CIDR {text!r}") from None
    if len({IPFamily.of(c) for c in cidrs}) != len(cidrs):
        raise ConfigError("--cluster-cidr: at most one CIDR per IP family")
    nodeport = tuple(filter(None, (t.strip() for t in args.nodeport_addresses.split(","))))
    if nodeport != ("primary",):
        for text in nodeport:
            try:
                parse_cidr(text)
            except ValueError:
                raise ConfigError(
                    f"--nodeport-addresses: invalid CIDR {text!r} (CIDRs or 'primary')"
                ) from None
    try:
        # Checked and normalised here, once: the IPVS proxier and --dry-run take it as it is.
        scheduler = normalize_scheduler(args.ipvs_scheduler)
    except ValueError as err:
        raise ConfigError(f"--ipvs-scheduler: {err}") from None
    # Upstream's validation (pkg/proxy/apis/config/validation): a zero period would retry and
    # check the canary in a busy loop. ipvs mode ignores these two (with_ipvs_flags).
    if args.proxy_mode != "ipvs" and args.iptables_sync_period <= 0:
        raise ConfigError("--iptables-sync-period must be greater than 0")
    if args.proxy_mode != "ipvs" and args.iptables_min_sync_period > args.iptables_sync_period:
        raise ConfigError(
            "--iptables-sync-period must be greater than or equal to --iptables-min-sync-period"
        )
    if not 0 <= args.iptables_masquerade_bit <= 31:
        raise ConfigError("--iptables-masquerade-bit must be between 0 and 31")
    gates = parse_feature_gates(args.feature_gates)
    options = ProxyOptions(
        proxy_mode=args.proxy_mode,
        hostname_override=args.hostname_override,
        cluster_cidrs=tuple(cidrs),
        masquerade_all=args.masquerade_all,
        nodeport_addresses=nodeport,
        localhost_nodeports=args.iptables_localhost_nodeports,
        masquerade_bit=args.iptables_masquerade_bit,
        sync_period=args.iptables_sync_period,
        min_sync_period=args.iptables_min_sync_period,
        ipvs_scheduler=scheduler,
        healthz_bind_address=args.healthz_bind_address,
        metrics_bind_address=args.metrics_bind_address,
        kubeconfig=args.kubeconfig,
        cleanup=args.cleanup,
        dry_run=args.dry_run,
        state=args.state,
        once=args.once,
        node_ips=tuple(args.node_ip),
        iptables_backend=args.iptables_backend,
        verbosity=args.v,
        prefer_same_node=gates.get(
            "PreferSameTrafficDistribution", FEATURE_GATES["PreferSameTrafficDistribution"].default
        ),
    )
    return with_ipvs_flags(options, args) if args.proxy_mode == "ipvs" else options


def with_ipvs_flags(options: ProxyOptions, args: argparse.Namespace) -> ProxyOptions:
    """ipvs mode's flags, validated as kube-proxy validates them (only in ipvs mode, as
    upstream: elsewhere they are ignored). The sync periods are upstream's
    processV1Alpha1Flags: in ipvs mode --ipvs-sync-period and --ipvs-min-sync-period set
    them (default 30s and 1s), and --iptables-sync-period/--iptables-min-sync-period are
    ignored."""
    sync_period = 30.0 if args.ipvs_sync_period is None else args.ipvs_sync_period
    min_sync_period = 1.0 if args.ipvs_min_sync_period is None else args.ipvs_min_sync_period
    if sync_period <= 0:
        raise ConfigError("--ipvs-sync-period must be greater than 0")
    if min_sync_period > sync_period:
        raise ConfigError(
            "--ipvs-sync-period must be greater than or equal to --ipvs-min-sync-period"
        )
    excluded: list[IPNetwork] = []
    for text in filter(None, (t.strip() for t in args.ipvs_exclude_cidrs.split(","))):
        try:
            excluded.append(parse_cidr(text))
        except ValueError:
            raise ConfigError(f"--ipvs-exclude-cidrs: invalid CIDR {text!r}") from None
    return replace(
        options,
        sync_period=sync_period,
        min_sync_period=min_sync_period,
        ipvs_exclude_cidrs=tuple(excluded),
        ipvs_strict_arp=args.ipvs_strict_arp,
        ipvs_tcp_timeout=args.ipvs_tcp_timeout,
        ipvs_tcpfin_timeout=args.ipvs_tcpfin_timeout,
        ipvs_udp_timeout=args.ipvs_udp_timeout,
    )


def node_ips(
    options: ProxyOptions, node: Node | None, host_ips: Sequence[IPAddress]
) -> tuple[IPAddress, ...]:
    """--node-ip, else the Node object's addresses, else the host's."""
    if options.node_ips:
        return options.node_ips
    if node is not None and node.addresses:
        return node.addresses
    return tuple(host_ips)


def with_interface_ips(
    configs: Sequence[ProxierConfig], interface_ips: Sequence[IPAddress]
) -> tuple[ProxierConfig, ...]:
    """Give each config its family's interface addresses, for `--nodeport-addresses` CIDRs.

    Upstream (NodePortAddresses.GetNodeIPs) matches the CIDRs against every address of the
    host's interfaces, not only the node IPs; callers pass those addresses only when CIDRs
    were given (the default, every local address, and `primary` do not need them)."""
    return tuple(
        replace(c, interface_ips=tuple(ip for ip in interface_ips if IPFamily.of(ip) is c.family))
        for c in configs
    )


def proxier_configs(
    options: ProxyOptions, node: Node | None, host_ips: Sequence[IPAddress]
) -> tuple[ProxierConfig, ...]:
    """One ProxierConfig per IP family this node has an address of (primary family first)."""
    ips = node_ips(options, node, host_ips)
    if not ips:
        raise ConfigError(
            "cannot tell this node's IPs: pass --node-ip, or make the Node object"
            f" {options.node_name!r} available with status.addresses"
        )
    families: list[IPFamily] = []
    for ip in ips:
        if IPFamily.of(ip) not in families:
            families.append(IPFamily.of(ip))
    configs = []
    nftables = options.proxy_mode == "nftables"
    # nftables mode: NodePorts default to the primary node IPs, and never on localhost.
    nodeport_flag = options.nodeport_addresses or (("primary",) if nftables else ())
    for family in families:
        family_ips = tuple(ip for ip in ips if IPFamily.of(ip) is family)
        if nodeport_flag == ("primary",):
            nodeport: tuple[IPNetwork, ...] = (
                parse_cidr(f"{family_ips[0]}/{family_ips[0].max_prefixlen}"),
            )
        else:
            nodeport = tuple(
                net for net in (parse_cidr(t) for t in nodeport_flag) if IPFamily.of(net) is family
            )
        # Localhost NodePorts: IPv4 only, and only if the nodeport addresses include loopback.
        localhost = (
            not nftables
            and options.localhost_nodeports
            and family is IPFamily.IPv4
            and (not nodeport or any(parse_ip("127.0.0.1") in net for net in nodeport))
        )
        configs.append(
            ProxierConfig(
                family=family,
                node_name=options.node_name,
                node_ips=family_ips,
                zone=node.zone if node is not None else None,
                cluster_cidr=next(
                    (c for c in options.cluster_cidrs if IPFamily.of(c) is family), None
                ),
                masquerade_all=options.masquerade_all,
                masquerade_bit=options.masquerade_bit,
                localhost_nodeports=localhost,
                nodeport_addresses=nodeport,
                prefer_same_node=options.prefer_same_node,
            )
        )
    return tuple(configs)
