"""This node's configuration, built in one place for every command that needs it.

The node agent (controller.py), `--once` and `--dry-run` (cli.py), and `explain` / `trace`
(explain_cli.py) must agree on what the node looks like, or `explain` describes rules the
agent does not write. So all of them go through here:

    flags + this node's Node object + the host ──node_configs──▶ one ProxierConfig per family
                                                ──prepare_host──▶ the host ready for the rules,
                                                                  the configs matching the host

- `node_configs` decides the node IPs (--node-ip, else the Node object's addresses, else the
  host's, read only when needed) and every per-family setting (options.proxier_configs).
- `with_host_facts` adds what the host's kernel settings change in the rules (read only):
  with `nf_conntrack_tcp_be_liberal` set, kube-proxy leaves out the ctstate INVALID drop; with
  `--nodeport-addresses` CIDRs, the interface addresses inside them take NodePorts too.
  Rules compared with this host's (`trace`) need it; a dry run or `explain` describe a node
  with default settings, so their output does not depend on the machine they run on.
- `prepare_host` is the one step that changes the host before rules are written:
  `route_localnet=1` for IPv4 localhost NodePorts in iptables mode (as kube-proxy), then the
  host facts. IPVS mode's own sysctls (net.ipv4.vs.*, ip_forward) are set by its proxier on
  its first sync, as upstream's ipvs NewProxier does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import structlog

from pyproxy import sysctl
from pyproxy.model import IPAddress, Node
from pyproxy.options import ProxyOptions, proxier_configs, with_interface_ips
from pyproxy.proxystate import ProxierConfig

logger = structlog.get_logger("pyproxy")

#: The host's own addresses (hostnet.host_addresses, or a fixed list in tests).
HostAddresses = Callable[[], Sequence[IPAddress]]


def node_configs(
    options: ProxyOptions, node: Node | None, host_addresses: HostAddresses
) -> tuple[ProxierConfig, ...]:
    """One ProxierConfig per IP family this node has an address of (primary family first).

    `node` is this node's Node object (None if unknown); `host_addresses` is only called
    when neither --node-ip nor the Node object give an address. Raises ConfigError when no
    address is found at all."""
    host: tuple[IPAddress, ...] = ()
    if not options.node_ips and (node is None or not node.addresses):
        host = tuple(host_addresses())
    return proxier_configs(options, node, host)


def with_host_facts(configs: Iterable[ProxierConfig]) -> tuple[ProxierConfig, ...]:
    """`configs` as this host's kernel settings and addresses shape the rules (reads, never
    writes): the conntrack setting, and, when `--nodeport-addresses` CIDRs were given, the
    host's interface addresses they select (upstream's GetNodeIPs matches every interface
    address, not only the node IPs)."""
    liberal = sysctl.conntrack_tcp_be_liberal()
    configs = tuple(dataclasses.replace(c, conntrack_tcp_be_liberal=liberal) for c in configs)
    if any(c.nodeport_addresses for c in configs):
        from pyproxy.hostnet import host_addresses

        configs = with_interface_ips(configs, host_addresses())
    return configs


def prepare_host(configs: Iterable[ProxierConfig], proxy_mode: str) -> tuple[ProxierConfig, ...]:
    """Set the sysctls the rules of `proxy_mode` need; returns the configs matching the host."""
    configs = tuple(configs)
    localhost_nodeports = any(c.localhost_nodeports for c in configs)
    if (
        proxy_mode == "iptables"
        and localhost_nodeports
        and sysctl.ensure("net.ipv4.conf.all.route_localnet", "1")
    ):
        logger.info("set route_localnet=1 for localhost NodePorts (--iptables-localhost-nodeports)")
    return with_host_facts(configs)
