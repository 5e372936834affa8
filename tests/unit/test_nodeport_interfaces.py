"""`--nodeport-addresses` CIDRs select the host's interface addresses, not only the node IPs.

Upstream's NodePortAddresses.GetNodeIPs lists every interface address inside the CIDRs, so an
address that is not a node IP still takes NodePorts. pyproxy used the node IPs alone; the
packet test in tests/kernel/test_feature_packets.py found it. A dry run still describes the
node from its flags (no interface addresses), so the golden files do not depend on the host.
"""

from __future__ import annotations

import ipaddress

from pyproxy.options import parse_options, proxier_configs, with_interface_ips


def test_nodeport_cidrs_match_the_host_interface_addresses() -> None:
    options = parse_options(
        ["--node-ip", "172.30.0.2", "--node-ip", "fd00:30::2",
         "--nodeport-addresses", "172.30.0.200/29,fd00:30::/64"]
    )  # fmt: skip
    configs = proxier_configs(options, None, ())
    assert [c.nodeport_ips for c in configs] == [(), (ipaddress.ip_address("fd00:30::2"),)]
    host = [ipaddress.ip_address(t) for t in ("172.30.0.2", "172.30.0.202", "10.0.0.9")]
    host.append(ipaddress.ip_address("fd00:30::9"))
    v4, v6 = with_interface_ips(configs, host)
    assert [str(ip) for ip in v4.nodeport_ips or ()] == ["172.30.0.202"]
    assert [str(ip) for ip in v6.nodeport_ips or ()] == ["fd00:30::2", "fd00:30::9"]


def test_without_cidrs_interface_addresses_change_nothing() -> None:
    configs = proxier_configs(parse_options(["--node-ip", "172.30.0.2"]), None, ())
    [config] = with_interface_ips(configs, [ipaddress.ip_address("172.30.0.202")])
    assert config.nodeport_ips is None  # every local address (addrtype LOCAL)
