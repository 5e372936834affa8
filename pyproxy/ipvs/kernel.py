"""The IPVS-mode kernel adapter: IPVS over generic netlink, kube-ipvs0 and its addresses over
rtnetlink (both with pyroute2), ipsets with the `ipset` binary.

The only module of ipvs mode that talks to the kernel. It works in the network namespace of the
calling thread, like the iptables adapter. `IpvsKernel` is the interface the proxier uses; a fake
that records calls stands in for it in unit tests. Foreign errors (netlink, OSError, a failed
`ipset`) become KernelError here.

Traps avoided (pyroute2 0.9): pyroute2's IPVSDest defaults to direct
routing, so every real server is written with fwd_method 0 (masquerade/NAT); its "update"
command sends a delete, so changes use "set"; the scheduler is always passed explicitly. Kernel
messages are read from their raw attributes (IPVSDest.from_message does not map everything).
Bulk ipset work goes through one `ipset restore` (pyroute2's IPSet is slow in bulk).
pyroute2 has no call for IPVS's global timeouts (`ipvsadm --set`): `set_timeouts` sends the
generic-netlink IPVS_CMD_SET_CONFIG message itself, with the attributes as upstream's netlink
library sends them (three host-order u32 seconds).
"""

from __future__ import annotations

import errno
import ipaddress
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from pyproxy.errors import KernelError
from pyproxy.ipvs.diff import CurrentRealServer, CurrentVirtualServer, KernelState
from pyproxy.ipvs.ipsets import parse_save
from pyproxy.ipvs.plan import (
    DUMMY_DEVICE,
    FLAG_HASHED,
    RealServer,
    VirtualServer,
    VirtualServerKey,
)
from pyproxy.model import IPAddress
from pyproxy.model import Protocol as L4

_IPPROTO = {L4.TCP: socket.IPPROTO_TCP, L4.UDP: socket.IPPROTO_UDP, L4.SCTP: 132}
_L4 = {number: proto for proto, number in _IPPROTO.items()}
#: IP_VS_CONN_F_MASQ: real servers reached by NAT (the only method kube-proxy uses).
FWD_MASQ = 0
#: For IPv6 the kernel takes the persistence "netmask" as a prefix length in a host-order u32;
#: pyroute2 encodes the attribute as an IPv4 address, so pack 128 accordingly.
_IPV6_NETMASK = socket.inet_ntoa(struct.pack("=I", 128))
_FLAGS_MASK = 0xFFFF
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class IpvsTimeouts:
    """IPVS's connection timeouts of one network namespace (`ipvsadm --set TCP TCPFIN UDP`),
    in whole seconds; 0 leaves that timeout as it is (the kernel ignores a 0)."""

    tcp: int = 0
    tcp_fin: int = 0
    udp: int = 0

    @classmethod
    def from_seconds(cls, tcp: float, tcp_fin: float, udp: float) -> IpvsTimeouts:
        """From the flags' durations: truncated to whole seconds, as upstream's netlink library
        does (uint32(d.Seconds())), so 500ms means 0, "leave it"; capped at the u32 range (the
        kernel then refuses a value that large, and the refusal is logged)."""
        return cls(*(min(int(value), _U32_MAX) for value in (tcp, tcp_fin, udp)))

    def __bool__(self) -> bool:
        return any((self.tcp, self.tcp_fin, self.udp))

    def __str__(self) -> str:
        return f"tcp {self.tcp}s, tcpfin {self.tcp_fin}s, udp {self.udp}s"


class IpvsKernel(Protocol):
    """What the IPVS proxier needs from the kernel (one network namespace)."""

    def __enter__(self) -> IpvsKernel: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    def ensure_dummy(self) -> None: ...
    def delete_dummy(self) -> bool: ...
    def ipvs_available(self) -> bool: ...
    def local_addresses(self) -> tuple[IPAddress, ...]: ...
    def read_state(self, *, virtual_servers: bool = True) -> KernelState: ...
    def add_virtual_server(self, vs: VirtualServer) -> None: ...
    def update_virtual_server(self, vs: VirtualServer) -> None: ...
    def delete_virtual_server(self, vs: VirtualServer) -> None: ...
    def add_real_server(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def update_real_server(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def delete_real_server(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def bind_address(self, ip: IPAddress) -> None: ...
    def unbind_address(self, ip: IPAddress) -> None: ...
    def restore_ipsets(self, text: str) -> None: ...
    def destroy_ipsets(self, names: Iterable[str]) -> None: ...
    def set_timeouts(self, timeouts: IpvsTimeouts) -> None: ...


def _attrs(msg: Any, nla: str) -> dict[str, Any]:
    """The attributes of a nested netlink attribute as a plain dict."""
    inner = msg.get(nla)
    return {} if inner is None else dict(inner["attrs"])


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except OSError as err:
        raise KernelError(f"cannot run {argv[0]}: {err}") from err


class LinuxIpvsKernel:
    """The real adapter. Use as a context manager: netlink sockets are opened on enter (in the
    calling thread's network namespace) and closed on exit."""

    def __init__(self, dummy: str = DUMMY_DEVICE) -> None:
        self.dummy = dummy
        self._ipvs: Any = None
        self._ipr: Any = None

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> LinuxIpvsKernel:
        from pyroute2 import IPRoute  # the shell only: importing pyroute2 costs ~0.2 s

        try:
            self._ipr = IPRoute()
        except Exception as err:
            raise KernelError(f"cannot open rtnetlink: {err}") from err
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sock in (self._ipvs, self._ipr):
            if sock is not None:
                sock.close()
        self._ipvs = self._ipr = None

    @property
    def ipvs(self) -> Any:
        """The IPVS socket, opened on first use: --cleanup on a kernel without ip_vs works."""
        if self._ipvs is None:
            from pyroute2 import IPVS

            try:
                self._ipvs = IPVS()
            except Exception as err:
                raise KernelError(
                    f"IPVS is not available in this kernel ({err}); is the ip_vs module loaded?"
                ) from err
        return self._ipvs

    def ipvs_available(self) -> bool:
        try:
            self.ipvs  # noqa: B018 - opening it is the test
        except KernelError:
            return False
        return True

    def _netlink(
        self, what: str, call: Any, *args: Any, ignore: Iterable[int] = (), **kw: Any
    ) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return call(*args, **kw)
        except NetlinkError as err:
            if err.code in tuple(ignore):
                return None
            raise KernelError(f"{what}: {err}") from err
        except OSError as err:
            raise KernelError(f"{what}: {err}") from err

    # --- kube-ipvs0 ----------------------------------------------------------------------

    def _dummy_index(self) -> int | None:
        found = self._ipr.link_lookup(ifname=self.dummy)
        return int(found[0]) if found else None

    def ensure_dummy(self) -> None:
        if self._dummy_index() is None:
            self._netlink(
                f"create {self.dummy}",
                self._ipr.link,
                "add",
                ifname=self.dummy,
                kind="dummy",
                ignore=(errno.EEXIST,),
            )

    def delete_dummy(self) -> bool:
        index = self._dummy_index()
        if index is None:
            return False
        self._netlink(f"delete {self.dummy}", self._ipr.link, "del", index=index)
        return True

    def _addresses(self, index: int | None = None) -> list[tuple[int, IPAddress]]:
        msgs = self._ipr.get_addr() if index is None else self._ipr.get_addr(index=index)
        out = []
        for msg in msgs:
            value = msg.get_attr("IFA_ADDRESS")
            if value:
                out.append((int(msg["index"]), ipaddress.ip_address(value)))
        return out

    def local_addresses(self) -> tuple[IPAddress, ...]:
        """Every address of every interface except kube-ipvs0 (the plan filters them)."""
        dummy = self._dummy_index()
        return tuple(dict.fromkeys(ip for index, ip in self._addresses() if index != dummy))

    def bind_address(self, ip: IPAddress) -> None:
        index = self._dummy_index()
        if index is None:
            raise KernelError(f"bind {ip}: {self.dummy} does not exist")
        self._netlink(
            f"bind {ip} to {self.dummy}",
            self._ipr.addr,
            "add",
            index=index,
            address=str(ip),
            prefixlen=ip.max_prefixlen,
            ignore=(errno.EEXIST,),
        )

    def unbind_address(self, ip: IPAddress) -> None:
        index = self._dummy_index()
        if index is None:
            return
        self._netlink(
            f"unbind {ip} from {self.dummy}",
            self._ipr.addr,
            "del",
            index=index,
            address=str(ip),
            prefixlen=ip.max_prefixlen,
            ignore=(errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH),
        )

    # --- reading -------------------------------------------------------------------------

    def _read_virtual_servers(self) -> dict[VirtualServerKey, CurrentVirtualServer]:
        from pyroute2 import IPVSService

        result: dict[VirtualServerKey, CurrentVirtualServer] = {}
        for msg in self._netlink("list IPVS services", self.ipvs.service, "dump") or ():
            attrs = _attrs(msg, "IPVS_CMD_ATTR_SERVICE")
            addr = attrs.get("IPVS_SVC_ATTR_ADDR")
            proto = _L4.get(attrs.get("IPVS_SVC_ATTR_PROTOCOL", -1))
            if not addr or proto is None:  # fwmark services and other protocols are not ours
                continue
            ip = ipaddress.ip_address(addr)
            key = VirtualServerKey(proto, ip, int(attrs.get("IPVS_SVC_ATTR_PORT", 0)))
            flags = attrs.get("IPVS_SVC_ATTR_FLAGS") or {"flags": 0}
            server = VirtualServer(
                key,
                str(attrs.get("IPVS_SVC_ATTR_SCHED_NAME", "")),
                int(flags["flags"]) & _FLAGS_MASK & ~FLAG_HASHED,
                int(attrs.get("IPVS_SVC_ATTR_TIMEOUT", 0)),
            )
            service = IPVSService(addr=str(ip), port=key.port, protocol=_IPPROTO[proto])
            reals = []
            dests = self._netlink(
                f"list real servers of {key}", self.ipvs.dest, "dump", service=service
            )
            for dmsg in dests or ():
                d = _attrs(dmsg, "IPVS_CMD_ATTR_DEST")
                reals.append(
                    CurrentRealServer(
                        ipaddress.ip_address(d["IPVS_DEST_ATTR_ADDR"]),
                        int(d.get("IPVS_DEST_ATTR_PORT", 0)),
                        int(d.get("IPVS_DEST_ATTR_WEIGHT", 0)),
                        int(d.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                        int(d.get("IPVS_DEST_ATTR_INACT_CONNS", 0)),
                    )
                )
            result[key] = CurrentVirtualServer(server, tuple(reals))
        return result

    def read_ipsets_text(self) -> str:
        if shutil.which("ipset") is None:  # no tool, no sets: creating them will fail loudly
            return ""
        result = _run(["ipset", "save"])
        if result.returncode != 0:
            raise KernelError(f"ipset save failed: {result.stderr.strip()}")
        return result.stdout

    def read_state(self, *, virtual_servers: bool = True) -> KernelState:
        index = self._dummy_index()
        bound = (
            frozenset(ip for _, ip in self._addresses(index)) if index is not None else frozenset()
        )
        return KernelState(
            virtual_servers=self._read_virtual_servers() if virtual_servers else {},
            bound_addresses=bound,
            ipsets=parse_save(self.read_ipsets_text()),
        )

    # --- IPVS writes -----------------------------------------------------------------------

    @staticmethod
    def _service(vs: VirtualServer, *, full: bool = True) -> Any:
        from pyroute2 import IPVSService

        key = vs.key
        fields: dict[str, Any] = {
            "addr": str(key.address),
            "port": key.port,
            "protocol": _IPPROTO[key.protocol],
        }
        if key.address.version == 6:
            fields["netmask"] = _IPV6_NETMASK
        if full:
            fields["sched_name"] = vs.scheduler
            fields["timeout"] = vs.timeout
            fields["flags"] = {"flags": vs.flags, "mask": _FLAGS_MASK}
        return IPVSService(**fields)

    @staticmethod
    def _dest(rs: RealServer) -> Any:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=str(rs.address), port=rs.port, fwd_method=FWD_MASQ, weight=rs.weight)

    def add_virtual_server(self, vs: VirtualServer) -> None:
        self._netlink(
            f"add virtual server {vs.key}", self.ipvs.service, "add", service=self._service(vs)
        )

    def update_virtual_server(self, vs: VirtualServer) -> None:
        self._netlink(
            f"update virtual server {vs.key}", self.ipvs.service, "set", service=self._service(vs)
        )

    def delete_virtual_server(self, vs: VirtualServer) -> None:
        self._netlink(
            f"delete virtual server {vs.key}",
            self.ipvs.service,
            "del",
            service=self._service(vs, full=False),
            ignore=(errno.ESRCH, errno.ENOENT),
        )

    def add_real_server(self, vs: VirtualServer, rs: RealServer) -> None:
        self._netlink(
            f"add real server {vs.key} -> {rs.endpoint}",
            self.ipvs.dest,
            "add",
            service=self._service(vs, full=False),
            dest=self._dest(rs),
        )

    def update_real_server(self, vs: VirtualServer, rs: RealServer) -> None:
        self._netlink(
            f"set real server {vs.key} -> {rs.endpoint}",
            self.ipvs.dest,
            "set",
            service=self._service(vs, full=False),
            dest=self._dest(rs),
        )

    def delete_real_server(self, vs: VirtualServer, rs: RealServer) -> None:
        self._netlink(
            f"delete real server {vs.key} -> {rs.endpoint}",
            self.ipvs.dest,
            "del",
            service=self._service(vs, full=False),
            dest=self._dest(rs),
            ignore=(errno.ENOENT, errno.ESRCH),
        )

    def set_timeouts(self, timeouts: IpvsTimeouts) -> None:
        """`ipvsadm --set`: the kernel keeps the current value of any timeout sent as 0."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.generic import ipvs as genl

        msg = genl.ipvsmsg()
        msg["cmd"] = genl.IPVS_CMD_SET_CONFIG
        msg["version"] = genl.GENL_VERSION
        # pyroute2 maps these attributes as raw bytes ("hex"): pack the u32s in host order.
        msg["attrs"] = [
            ("IPVS_CMD_ATTR_TIMEOUT_TCP", struct.pack("=I", timeouts.tcp)),
            ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", struct.pack("=I", timeouts.tcp_fin)),
            ("IPVS_CMD_ATTR_TIMEOUT_UDP", struct.pack("=I", timeouts.udp)),
        ]
        ipvs = self.ipvs
        self._netlink(
            f"set IPVS timeouts ({timeouts})",
            ipvs.nlm_request,
            msg,
            msg_type=ipvs.prid,
            msg_flags=NLM_F_REQUEST | NLM_F_ACK,
        )

    # --- ipsets ----------------------------------------------------------------------------

    def restore_ipsets(self, text: str) -> None:
        result = _run(["ipset", "restore", "-exist"], stdin=text)
        if result.returncode != 0:
            raise KernelError(f"ipset restore failed: {result.stderr.strip()}")

    def destroy_ipsets(self, names: Iterable[str]) -> None:
        existing = parse_save(self.read_ipsets_text())
        for name in names:
            if name not in existing:
                continue
            result = _run(["ipset", "destroy", name])
            if result.returncode != 0:
                raise KernelError(f"ipset destroy {name} failed: {result.stderr.strip()}")


def kernel_release() -> tuple[int, ...]:
    """The running kernel's version as numbers (6.1.0-56-amd64 → (6, 1, 0))."""
    import platform

    head = platform.release().split("-")[0]
    numbers = []
    for part in head.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


__all__ = ["FWD_MASQ", "IpvsKernel", "IpvsTimeouts", "LinuxIpvsKernel", "kernel_release"]
