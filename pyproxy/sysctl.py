"""Kernel settings kube-proxy's iptables mode makes, written under /proc/sys.

Only what the rules need: `route_localnet=1` so NodePorts answer on 127.0.0.1 when localhost
NodePorts are enabled (IPv4 only; kube-proxy does the same and guards 127.0.0.0/8 with the
KUBE-FIREWALL rule). Read-only helpers report `nf_conntrack_tcp_be_liberal`, which drops the
INVALID rule as upstream does.
"""

from __future__ import annotations

from pathlib import Path

from pyproxy.errors import KernelError

_ROOT = Path("/proc/sys")


def read(key: str) -> str | None:
    try:
        return (_ROOT / key.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def ensure(key: str, value: str) -> bool:
    """Set `key` to `value` if it differs; returns whether it was changed."""
    path = _ROOT / key.replace(".", "/")
    if read(key) == value:
        return False
    try:
        path.write_text(value + "\n")
    except OSError as err:
        raise KernelError(f"cannot set sysctl {key}={value}: {err}") from err
    return True


def conntrack_tcp_be_liberal() -> bool:
    return read("net.netfilter.nf_conntrack_tcp_be_liberal") not in (None, "0")
