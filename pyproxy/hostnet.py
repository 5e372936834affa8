"""The host's own addresses, read over netlink (pyroute2), for when no node IP is given."""

from __future__ import annotations

import ipaddress

from pyproxy.model import IPAddress


def host_addresses() -> tuple[IPAddress, ...]:
    """Global-scope addresses of every interface in this network namespace, IPv4 first."""
    from pyroute2 import IPRoute  # imported here: only the shell needs netlink

    found: list[IPAddress] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            if msg.get("scope", 0) != 0:  # 0 = RT_SCOPE_UNIVERSE
                continue
            value = msg.get_attr("IFA_ADDRESS")
            if not value:
                continue
            ip = ipaddress.ip_address(value)
            if not ip.is_loopback and not ip.is_link_local and ip not in found:
                found.append(ip)
    return tuple(sorted(found, key=lambda ip: ip.version))
