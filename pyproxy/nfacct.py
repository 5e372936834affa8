"""nfacct counters (nfnetlink_acct): ensure them at start, read them on every scrape.

kube-proxy's iptables mode counts two kinds of packets into named nfacct objects with the
`nfacct` match (`-m nfacct --nfacct-name NAME`) and exports them as
`kubeproxy_iptables_localhost_nodeports_accepted_packets_total` and
`kubeproxy_iptables_ct_state_invalid_dropped_packets_total`. Upstream (pkg/proxy/util/nfacct)
speaks NFNL_SUBSYS_ACCT itself; so does `NetlinkNfacct` here, over a plain `AF_NETLINK`
socket as `pyproxy.conntrack.NetlinkConntrack` does, because:

- pyroute2 (0.9) knows the subsystem number and nothing else of nfacct;
- Debian's `nfacct` CLI would mean one fork+exec per counter per scrape and a package on every
  node, for two requests of a few dozen bytes each. Measured here (2 shared cores, load ~20):
  `NetlinkNfacct.get` 41 us per call; a mere fork+exec of /bin/true from Python 2 ms.

Like upstream, `open_nfacct()` probes the subsystem once with a GET of a counter that need not
exist: ENOENT means nfacct works, anything else (no module, no CAP_NET_ADMIN) means it does not,
and pyproxy then writes no nfacct match and exports neither metric, exactly as before.

nfacct objects live in a network namespace; a socket talks to the namespace of the thread that
opened it, and one is opened per call, so calls act on the caller's namespace (the node's when
pyproxy runs there). Errors become `KernelError`; a missing counter is `None`, not an error.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pyproxy.errors import KernelError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW = 0
NFNL_MSG_ACCT_GET = 1
NFACCT_NAME = 1
NFACCT_PKTS = 2
NFACCT_BYTES = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NFNETLINK_V0 = 0

#: The kernel's NFACCT_NAME_MAX (32) minus the terminating NUL.
MAX_NAME_LENGTH = 31

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, always 0 here)
_NLATTR = struct.Struct("=HH")  # len, type
_SOCKET_TIMEOUT = 5.0
#: The name the availability probe asks for (upstream's): found or not, the answer tells.
_PROBE_NAME = "IMayExist"


@dataclass(frozen=True, slots=True)
class Counter:
    """One nfacct object as the kernel reports it."""

    name: str
    packets: int
    bytes: int


class NfacctClient(Protocol):
    """What the controller and the metrics collector need from nfacct."""

    def ensure(self, name: str) -> None:
        """Create the counter unless it exists (its counts are kept). Raises KernelError."""

    def get(self, name: str) -> Counter | None:
        """The counter, or None if there is none by that name. Raises KernelError."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _name_attr(name: str) -> bytes:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"nfacct counter name must be 1 to {MAX_NAME_LENGTH} characters: {name!r}")
    data = name.encode() + b"\0"
    attr = _NLATTR.pack(_NLATTR.size + len(data), NFACCT_NAME) + data
    return attr + b"\0" * (_align(len(attr)) - len(attr))


def _request(command: int, flags: int, seq: int, payload: bytes) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0) + payload
    kind = (NFNL_SUBSYS_ACCT << 8) | command
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def decode_counter(body: bytes) -> Counter:
    """An NFNL_MSG_ACCT_NEW message's payload (after the netlink header): name and counts."""
    offset = _NFGENMSG.size
    name: str | None = None
    packets = nbytes = None
    while offset + _NLATTR.size <= len(body):
        length, kind = _NLATTR.unpack_from(body, offset)
        if length < _NLATTR.size:
            break
        data = body[offset + _NLATTR.size : offset + length]
        kind &= 0x3FFF  # NLA_F_NESTED / NLA_F_NET_BYTEORDER are flags, not the type
        if kind == NFACCT_NAME:
            name = data.split(b"\0", 1)[0].decode()
        elif kind == NFACCT_PKTS:
            (packets,) = struct.unpack(">Q", data[:8])
        elif kind == NFACCT_BYTES:
            (nbytes,) = struct.unpack(">Q", data[:8])
        offset += _align(length)
    if name is None or packets is None or nbytes is None:
        raise KernelError("nfacct: reply without name, packet and byte counts")
    return Counter(name, packets, nbytes)


class NetlinkNfacct:
    """nfnetlink_acct over a plain netlink socket, one socket per call."""

    def __init__(self) -> None:
        self._seq = 0

    def _exchange(self, command: int, flags: int, name: str) -> list[Counter]:
        """Send one request with an ACK flag; the counters in the reply, until the ACK."""
        self._seq += 1
        seq = self._seq
        request = _request(command, flags | NLM_F_REQUEST | NLM_F_ACK, seq, _name_attr(name))
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as err:
            raise KernelError(f"cannot open a netfilter netlink socket: {err}") from err
        counters: list[Counter] = []
        with sock:
            try:
                sock.settimeout(_SOCKET_TIMEOUT)
                sock.bind((0, 0))
                sock.send(request)
                while True:
                    data = sock.recv(65536)
                    offset = 0
                    while offset + _NLMSGHDR.size <= len(data):
                        length, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(data, offset)
                        if length < _NLMSGHDR.size:
                            raise KernelError("nfacct: malformed netlink message")
                        body = data[offset + _NLMSGHDR.size : offset + length]
                        offset += _align(length)
                        if msg_seq != seq:
                            continue
                        if kind == NLMSG_ERROR:
                            (code,) = struct.unpack_from("=i", body)
                            if code == 0:
                                return counters
                            raise _NetlinkError(-code)
                        if kind == NLMSG_DONE:
                            return counters
                        if kind >> 8 == NFNL_SUBSYS_ACCT:
                            counters.append(decode_counter(body))
            except OSError as err:
                raise KernelError(f"nfacct {name}: {err}") from err

    def get(self, name: str) -> Counter | None:
        try:
            found = self._exchange(NFNL_MSG_ACCT_GET, 0, name)
        except _NetlinkError as err:
            if err.code == errno.ENOENT:
                return None
            raise KernelError(f"nfacct get {name}: {os.strerror(err.code)}") from None
        return found[-1] if found else None

    def ensure(self, name: str) -> None:
        if self.get(name) is not None:
            return
        try:
            self._exchange(NFNL_MSG_ACCT_NEW, NLM_F_CREATE, name)
        except _NetlinkError as err:
            # EBUSY: someone created it between our GET and NEW, which is what we wanted.
            if err.code != errno.EBUSY:
                raise KernelError(f"nfacct add {name}: {os.strerror(err.code)}") from None


class _NetlinkError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


def open_nfacct() -> NetlinkNfacct | None:
    """A client if nfacct works in this network namespace (upstream's nfacct.New probe)."""
    client = NetlinkNfacct()
    try:
        client.get(_PROBE_NAME)
    except (KernelError, ValueError):
        return None
    return client


def ensure_counters(
    client: NfacctClient, names: Iterable[str]
) -> tuple[frozenset[str], dict[str, str]]:
    """Ensure each counter: (the names that exist now, {name: error} for the others).

    Upstream marks a counter usable only if Ensure succeeded; the renderer then writes the
    nfacct match for exactly those (ProxierConfig.nfacct_counters)."""
    ok: set[str] = set()
    failed: dict[str, str] = {}
    for name in names:
        try:
            client.ensure(name)
        except KernelError as err:
            failed[name] = str(err)
        else:
            ok.add(name)
    return frozenset(ok), failed


def existing_counters(client: NfacctClient | None, names: Iterable[str]) -> frozenset[str]:
    """The counters that exist now, creating none: what a running agent's rules count into
    (it ensured them at start), for a reader such as `pyproxy explain`'s drift check."""
    if client is None:
        return frozenset()
    found = set()
    for name in names:
        try:
            if client.get(name) is not None:
                found.add(name)
        except KernelError:
            continue
    return frozenset(found)
