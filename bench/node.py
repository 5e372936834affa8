"""The imperative side of the benchmark: the API writer, the node namespace, the proxy process.

- `Api`: raw HTTPS to kube-apiserver with the admin token, one keep-alive connection per
  thread, so thousands of objects go in parallel without the client's model classes.
- `ApiBridge`: the API server reachable at its host address (127.0.0.1:<port>) from inside a
  network namespace (socat on a Unix socket, as tests/integration/test_controller.py).
- `NodeNetns`: one empty network namespace "node" (lo up, the node IPs on lo) with that bridge;
  always deleted.
- `ProxyProcess`: kube-proxy or pyproxy started inside it; CPU seconds (self + waited-for
  children: the iptables-restore runs) and peak RSS read from /proc before it is stopped.
- `Rules`: cheap reads of one nat chain in the namespace (`iptables -t nat -S CHAIN`), and a
  fingerprint of every table a proxy writes (`Rules.token`), so the clock can stop when the whole
  ruleset is in the kernel, for both proxies the same way (bench/README.md, "When the clock
  stops").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.model import (
    CLUSTER_CIDR,
    CLUSTER_CIDR6,
    NODE_IP,
    NODE_IP6,
    NODE_NAME,
    count_sep_jumps,
    parse_proc_stat,
    parse_vm_hwm_kib,
)

REPO = Path(__file__).resolve().parents[1]
METRICS_ADDR = "127.0.0.1:10249"
IP = shutil.which("ip") or "/usr/sbin/ip"
HEALTHZ_ADDR = "127.0.0.1:10256"


class BenchError(RuntimeError):
    pass


# --- the API ----------------------------------------------------------------------------------


class Api:
    """kube-apiserver over raw HTTPS with a bearer token (the admin's: system:masters)."""

    def __init__(self, kubeconfig: Path, ca_file: Path) -> None:
        config = json.loads(kubeconfig.read_text())
        self.server = config["clusters"][0]["cluster"]["server"]
        self._token = config["users"][0]["user"]["token"]
        parts = urllib.parse.urlsplit(self.server)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 443
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, context=self._ssl, timeout=60
            )
            self._local.conn = conn
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        content_type: str = "application/json",
        ok: Iterable[int] = (200, 201),
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(5):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                time.sleep(0.2 * (attempt + 1))
                continue
            status = response.status
            if status == 429 or status >= 500:
                time.sleep(0.2 * (attempt + 1))
                continue
            reply = json.loads(raw) if raw else {}
            if status not in ok:
                raise BenchError(
                    f"{method} {path}: HTTP {status}: {reply.get('message', raw[:200])}"
                )
            return status, reply
        raise BenchError(f"{method} {path}: no answer after 5 attempts")

    # Paths
    @staticmethod
    def services(ns: str, name: str = "") -> str:
        return f"/api/v1/namespaces/{ns}/services" + (f"/{name}" if name else "")

    @staticmethod
    def slices(ns: str, name: str = "") -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices" + (
            f"/{name}" if name else ""
        )

    def create(self, path: str, body: dict[str, Any]) -> bool:
        """POST; False if it already existed (409)."""
        status, _ = self.request("POST", path, body, ok=(200, 201, 409))
        return status != 409

    def merge_patch(self, path: str, body: dict[str, Any]) -> None:
        self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str) -> None:
        self.request("DELETE", path, ok=(200, 202, 404))

    def parallel(self, jobs: Sequence[Callable[[], object]], workers: int = 16) -> None:
        """Run the jobs on `workers` threads (each with its own keep-alive connection)."""
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()


# --- the node namespace -------------------------------------------------------------------------


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 600) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[:500]}")
    return proc.stdout


class ApiBridge:
    """The API server at its host address (127.0.0.1:<port>) inside network namespace `netns`:
    socat on the host listens on a Unix socket and forwards to the API server, socat in the
    namespace listens on 127.0.0.1:<port> and forwards to that socket. Nothing leaves loopback
    or the namespaces the benchmark creates."""

    def __init__(self, api_server: str, netns: str, workdir: Path) -> None:
        self.netns = netns
        self.port = urllib.parse.urlsplit(api_server).port
        self._procs: list[subprocess.Popen[bytes]] = []
        self._sock = workdir / f"{netns}.sock"

    def __enter__(self) -> ApiBridge:
        try:
            self._procs.append(
                subprocess.Popen(
                    [
                        "socat",
                        f"UNIX-LISTEN:{self._sock},fork,mode=600",
                        f"TCP:127.0.0.1:{self.port}",
                    ],
                    stderr=subprocess.DEVNULL,
                )
            )
            deadline = time.monotonic() + 5
            while not self._sock.exists():
                if time.monotonic() > deadline:
                    raise BenchError("socat bridge socket did not appear")
                time.sleep(0.05)
            self._procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        self.netns,
                        "socat",
                        f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                        f"UNIX-CONNECT:{self._sock}",
                    ],
                    stderr=subprocess.DEVNULL,
                )
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        self._sock.unlink(missing_ok=True)


class NodeNetns:
    """An empty "node" network namespace (the node IPs on lo) with the API server reachable at
    its host address through an `ApiBridge`."""

    def __init__(self, api_server: str, workdir: Path) -> None:
        self.name = f"pyproxy-bench-{os.getpid()}-{secrets.token_hex(3)}"
        self.workdir = workdir
        self._bridge = ApiBridge(api_server, self.name, workdir)

    def __enter__(self) -> NodeNetns:
        run(["ip", "netns", "add", self.name])
        try:
            self.ip("link", "set", "lo", "up")
            self.ip("addr", "add", f"{NODE_IP}/32", "dev", "lo")
            self.ip("-6", "addr", "add", f"{NODE_IP6}/128", "dev", "lo", "nodad")
            self._bridge.__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._bridge.__exit__()
        # Anything still running in the namespace was started by this benchmark: end it by pid.
        pids = run(["ip", "netns", "pids", self.name], check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "delete", self.name], check=False)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def nsenter(self) -> list[str]:
        """A lighter prefix than `ip netns exec` (no /sys remount), for the many rule reads."""
        return nsenter(self.name)


def nsenter(netns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
CLONE_NEWNET = 0x40000000
SOL_IP = 0
SOL_IPV6 = 41
#: IPT_SO_GET_INFO and IP6T_SO_GET_INFO (IPT_BASE_CTL, IP6T_BASE_CTL): both 64.
SO_GET_INFO = 64
#: struct ipt_getinfo / ip6t_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5],
#: num_entries, size.
GETINFO_SIZE = 84
#: The tables both proxies write (their mangle canary chain is empty and created before their
#: first sync, so it never decides when a sync is complete).
TABLES = ("filter", "nat")
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1


def socket_in_netns(netns_name: str, family: int, kind: int, proto: int) -> socket.socket:
    """A socket that belongs to the named network namespace (a socket keeps the namespace it
    was created in; this thread switches there and back)."""
    with (
        open("/proc/thread-self/ns/net", "rb") as home,
        open(f"/run/netns/{netns_name}", "rb") as target,
    ):
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise BenchError(f"setns {netns_name}: {os.strerror(ctypes.get_errno())}")
        try:
            return socket.socket(family, kind, proto)
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise BenchError(f"setns back: {os.strerror(ctypes.get_errno())}")


class LegacyTableInfo:
    """A legacy table's entry count and blob size via getsockopt(IP(6)T_SO_GET_INFO): one cheap
    syscall, where `iptables-legacy -S` copies and parses the whole table (0.3 s at 10,000
    Services). Any iptables-legacy-restore that changes a table's rules changes them (a rewrite
    with the same rules does not: the fingerprint is of the content, not of the commit)."""

    def __init__(self, netns_name: str, family: str) -> None:
        af, self._level = (
            (socket.AF_INET, SOL_IP) if family == "ipv4" else (socket.AF_INET6, SOL_IPV6)
        )
        self._sock = socket_in_netns(netns_name, af, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def read(self, table: str) -> tuple[int, int] | None:
        buf = ctypes.create_string_buffer(table.encode(), GETINFO_SIZE)
        size = ctypes.c_uint(GETINFO_SIZE)
        fd = self._sock.fileno()
        if _libc.getsockopt(fd, self._level, SO_GET_INFO, buf, ctypes.byref(size)) != 0:
            return None
        raw = buf.raw
        return int.from_bytes(raw[76:80], "little"), int.from_bytes(raw[80:84], "little")

    def close(self) -> None:
        self._sock.close()


class NftGeneration:
    """The nftables ruleset generation of the namespace (NFT_MSG_GETGEN over netlink): it moves
    on every committed transaction, in any table and family, so with the nft variant it stands
    for "some table changed" (a commit that rewrites the same rules moves it too)."""

    def __init__(self, netns_name: str) -> None:
        self._sock = socket_in_netns(
            netns_name, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER
        )
        self._sock.bind((0, 0))
        self._seq = 0

    def read(self) -> int | None:
        self._seq += 1
        # nlmsghdr (len, type, flags, seq, pid) + nfgenmsg (family, version, res_id)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        msg = struct.pack("=IHHII", 20, kind, NLM_F_REQUEST, self._seq, 0)
        msg += struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        self._sock.send(msg)
        reply = self._sock.recv(4096)
        if len(reply) < 20:
            return None
        offset = 16 + 4  # nlmsghdr, nfgenmsg
        while offset + 4 <= len(reply):
            length, attr = struct.unpack_from("=HH", reply, offset)
            if length < 4:
                break
            if attr & 0x7FFF == NFTA_GEN_ID:
                return int(struct.unpack_from(">I", reply, offset + 4)[0])
            offset += (length + 3) & ~3
        return None

    def close(self) -> None:
        self._sock.close()


class Rules:
    """Reads the node namespace's rules with the benchmark's iptables variant.

    `token()` is a fingerprint of every table the proxies write (filter and nat) in every
    family they serve: with legacy, each table's (entries, size) from one getsockopt per table;
    with nft, the ruleset generation. Pollers read a chain (costly with legacy: the whole table
    is copied out under the xtables lock) only when the token has changed."""

    def __init__(self, netns: str, backend: str, families: Sequence[str] = ("ipv4",)) -> None:
        self.prefix = nsenter(netns)
        self.iptables = f"iptables-{backend}"
        self.save_cmd = f"iptables-{backend}-save"
        self.backend = backend
        self.families = tuple(families)
        self._legacy = (
            {f: LegacyTableInfo(netns, f) for f in self.families} if backend == "legacy" else {}
        )
        self._nft = NftGeneration(netns) if backend == "nft" else None

    def token(self) -> tuple[object, ...]:
        if self._nft is not None:
            return (self._nft.read(),)
        return tuple(info.read(t) for info in self._legacy.values() for t in TABLES)

    def close(self) -> None:
        for info in self._legacy.values():
            info.close()
        if self._nft is not None:
            self._nft.close()

    def chain(self, chain: str) -> str | None:
        """`iptables -t nat -S CHAIN`, or None when the chain does not exist (or the table is
        locked by a writer)."""
        proc = subprocess.run(
            [*self.prefix, self.iptables, "-t", "nat", "-S", chain],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.stdout if proc.returncode == 0 else None

    def sep_jumps(self, chain: str) -> int:
        listing = self.chain(chain)
        return -1 if listing is None else count_sep_jumps(listing)

    def svc_jumps(self) -> int:
        """Rules in nat KUBE-SERVICES that jump to a KUBE-SVC- chain (one per Service port with
        endpoints and a cluster IP)."""
        listing = self.chain("KUBE-SERVICES")
        return 0 if listing is None else listing.count("-j KUBE-SVC-")

    def save_counts(self, dump: Path | None = None) -> dict[str, int]:
        """Chains by prefix and rules per family and table (iptables-save), to cross-check the
        proxies; the text goes to `dump` if given."""
        counts: dict[str, int] = {}
        texts = []
        for family in self.families:
            tool = self.save_cmd if family == "ipv4" else f"ip6tables-{self.backend}-save"
            for table in TABLES:
                text = run([*self.prefix, tool, "-t", table])
                texts.append(text)
                key = f"{family}/{table}"
                counts[f"{key} rules"] = 0
                for line in text.splitlines():
                    if line.startswith("-A "):
                        counts[f"{key} rules"] += 1
                        if "--nfacct-name" in line:
                            nfacct = f"{key} nfacct rules"
                            counts[nfacct] = counts.get(nfacct, 0) + 1
                    elif line.startswith(":KUBE-"):
                        prefix = re.match(r":(KUBE-[A-Z]+-)", line)
                        name = prefix.group(1) if prefix else line.split()[0][1:]
                        counts[f"{key} {name}"] = counts.get(f"{key} {name}", 0) + 1
        if dump is not None:
            dump.write_text("".join(texts))
        return counts


# --- the proxy process --------------------------------------------------------------------------


def iptables_shim(workdir: Path, backend: str, families: Sequence[str]) -> Path:
    """A directory holding exactly the iptables tools of the `backend` variant for `families`,
    under both names a proxy may call (`iptables-restore`: kube-proxy; `iptables-legacy-restore`:
    pyproxy --iptables-backend). It is the proxies' whole PATH, so a proxy that looks for
    ip6tables in the IPv4-only variant does not find it: kube-proxy then runs IPv4 only
    ("No iptables support for family IPv6"), as pyproxy does with an IPv4 --node-ip."""
    shim = workdir / f"path-{backend}-{'-'.join(families)}"
    shim.mkdir(parents=True, exist_ok=True)
    for family in families:
        fam = "iptables" if family == "ipv4" else "ip6tables"
        for suffix in ("", "-save", "-restore"):
            target = shutil.which(f"{fam}-{backend}{suffix}")
            if target is None:
                raise BenchError(f"{fam}-{backend}{suffix} not found")
            for name in (f"{fam}{suffix}", f"{fam}-{backend}{suffix}"):
                link = shim / name
                link.unlink(missing_ok=True)
                link.symlink_to(target)
    return shim


def proxy_argv(
    proxy: str,
    *,
    bin_dir: Path,
    kubeconfig: Path,
    min_sync: float,
    backend: str,
    families: Sequence[str] = ("ipv4",),
    verbosity: int = 0,
    sync_period: str = "1h",
) -> list[str]:
    """The command line of either proxy. The flags are the same (same names, same values)
    except what only one of them has: kube-proxy's conntrack flags (a namespace cannot change
    the global conntrack settings, so both leave them; pyproxy does not set them at all) and
    pyproxy's --node-ip / --iptables-backend (kube-proxy takes the node IPs from the Node
    object, which carries the same addresses, and the variant from its PATH, which is the shim).
    """
    common = [
        "--proxy-mode",
        "iptables",
        "--kubeconfig",
        str(kubeconfig),
        "--hostname-override",
        NODE_NAME,
        "--cluster-cidr",
        CLUSTER_CIDR if tuple(families) == ("ipv4",) else f"{CLUSTER_CIDR},{CLUSTER_CIDR6}",
        "--iptables-min-sync-period",
        f"{min_sync:g}s",
        "--iptables-sync-period",
        sync_period,
        "--metrics-bind-address",
        METRICS_ADDR,
        "--healthz-bind-address",
        HEALTHZ_ADDR,
        f"--v={verbosity}",
    ]
    if proxy == "kube-proxy":
        return [
            str(bin_dir / "kube-proxy"),
            *common,
            # A netns cannot change the global conntrack table size or timeouts: leave them.
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
        ]
    if proxy == "pyproxy":
        node_ips = [NODE_IP] if tuple(families) == ("ipv4",) else [NODE_IP, NODE_IP6]
        return [
            str(REPO / ".venv" / "bin" / "python"),
            "-m",
            "pyproxy",
            *common,
            *[arg for ip in node_ips for arg in ("--node-ip", ip)],
            "--iptables-backend",
            backend,
        ]
    raise BenchError(f"unknown proxy {proxy!r}")


class ProxyProcess:
    """A proxy started in network namespace `netns` (by name) with its output in `log`."""

    def __init__(self, netns: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.netns = netns
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> float:
        with self.log.open("ab") as out:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                # `ip` by its full path: the proxy's PATH holds only the iptables shim.
                [IP, "netns", "exec", self.netns, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        return self.started

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
            raise BenchError(
                f"{self.argv[0]} exited with {self.proc.returncode}:\n" + "\n".join(tail)
            )

    def usage(self) -> tuple[float, float]:
        """(CPU seconds of the process and its waited-for children, peak RSS in MiB).
        `ip netns exec` execs the command in place, so the pid is the proxy's."""
        assert self.proc is not None
        pid = self.proc.pid
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        cpu = parse_proc_stat(stat, os.sysconf("SC_CLK_TCK"))
        hwm = parse_vm_hwm_kib(status)
        return cpu, (hwm or 0) / 1024

    def metrics(self) -> str:
        try:
            return run(
                [
                    *nsenter(self.netns),
                    "curl",
                    "-s",
                    "--max-time",
                    "10",
                    f"http://{METRICS_ADDR}/metrics",
                ],
                check=False,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def pyproxy_restore_bytes(log_text: str) -> tuple[list[int], list[int]]:
    """Bytes of each full and each partial sync's iptables-restore input, from pyproxy's
    canonical "synced" log lines (JSON)."""
    full: list[int] = []
    partial: list[int] = []
    for line in log_text.splitlines():
        if '"synced"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") != "synced":
            continue
        size = sum(
            v for k, v in entry.items() if k.endswith("_restore_bytes") and isinstance(v, int)
        )
        (full if entry.get("full") else partial).append(size)
    return full, partial


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            try:
                return float(value)
            except ValueError:
                return None
    return None
