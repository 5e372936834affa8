"""Network namespaces: create, run commands and processes in them, open sockets in them.

Everything here talks to the kernel through `ip` (iproute2) and setns(2); no pyroute2 needed.
Processes started with `Netns.popen` are recorded in a `Reaper` and killed at teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
BACKEND_PY = Path(__file__).resolve().with_name("backend.py")

# Environment for every child: no proxy variables (curl must never talk to a proxy outside).
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
CHILD_ENV = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}

_libc = ctypes.CDLL(None, use_errno=True)


class NetlabError(RuntimeError):
    """A harness operation failed (command error, process did not become ready, ...)."""


def require_root() -> None:
    """Raise (never skip) when not root: kernel tests must fail loudly without privileges."""
    if os.geteuid() != 0:
        raise PermissionError("netlab needs root (network namespaces, veth, sysctl, iptables)")


def run_cmd(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in the current namespace, capture text output; raise NetlabError on failure."""
    try:
        cp = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=CHILD_ENV,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise NetlabError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
    if check and cp.returncode != 0:
        raise NetlabError(
            f"command failed (rc={cp.returncode}): {shlex.join(argv)}\n"
            f"stdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}"
        )
    return cp


def ip_batch(lines: Iterable[str], netns: str | None = None, *, force: bool = False) -> Any:
    """Start `ip [-n NS] [-force] -batch -` with the given lines; returns the Popen (not waited)."""
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    proc.batch_input = "\n".join(lines) + "\n"  # type: ignore[attr-defined]
    return proc


def wait_batches(procs: Sequence[Any], *, check: bool = True, timeout: float = 30) -> None:
    """Feed and wait for several `ip_batch` processes that run in parallel."""
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(p.batch_input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            errors.append(f"{shlex.join(p.args)}: timed out")
            continue
        if p.returncode != 0:
            errors.append(f"{shlex.join(p.args)} rc={p.returncode}: {err.strip()}\n{p.batch_input}")
    if check and errors:
        raise NetlabError("ip -batch failed:\n" + "\n".join(errors))


def _setns(name: str) -> None:
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in a short-lived thread switched into netns `name`; return its result.

    setns(CLONE_NEWNET) only changes the calling thread, and the thread is thrown away afterwards,
    so the test process itself never changes namespace. Sockets created by `fn` stay bound to the
    namespace they were created in and can be used from any thread.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(name)
            box["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        path.write_text(f"{value}\n")


def _read_sysctl(key: str) -> str:
    return (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()


class Proc:
    """A process started in a namespace (its own session/process group); `stop()` is idempotent."""

    def __init__(self, popen: subprocess.Popen[Any], label: str, log: Path | None) -> None:
        self.popen = popen
        self.label = label
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 3.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the whole process group, escalate to SIGKILL, reap, close pipes."""
        p = self.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        else:
            # The leader is gone; children in its group may survive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return p.returncode

    def __repr__(self) -> str:
        return f"<Proc {self.label} pid={self.pid} rc={self.popen.returncode}>"


class Reaper:
    """Owns every process started through a Netns; `reap()` stops them all (LIFO)."""

    def __init__(self, logdir: Path | None = None) -> None:
        self.procs: list[Proc] = []
        self.logdir = logdir
        self._lock = threading.Lock()

    def add(self, proc: Proc) -> Proc:
        with self._lock:
            self.procs.append(proc)
        return proc

    def reap(self) -> list[str]:
        errors = []
        with self._lock:
            procs, self.procs = self.procs, []
        for proc in reversed(procs):
            try:
                proc.stop(timeout=2.0)
            except Exception as e:  # keep reaping the others
                errors.append(f"{proc}: {e!r}")
        return errors


class Netns:
    """A named network namespace (`/run/netns/NAME`) plus helpers to use it."""

    def __init__(self, name: str, label: str | None = None, reaper: Reaper | None = None) -> None:
        self.name = name
        self.label = label or name
        self.reaper = reaper if reaper is not None else Reaper()

    # --- commands and processes -------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str] | str) -> list[str]:
        if isinstance(argv, str):
            argv = shlex.split(argv)
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (`ip netns exec`), capture text output."""
        return run_cmd(self.exec_argv(argv), check=check, timeout=timeout, input=input)

    def ip_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n NS ARGS...` (cheaper than `run(["ip", ...])`)."""
        return run_cmd(["ip", "-n", self.name, *args], check=check)

    def popen(
        self,
        argv: Sequence[str] | str,
        *,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        text: bool = True,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Proc:
        """Start a long-running process in the namespace; teardown kills its process group.

        stdout/stderr default to a log file in the cluster's log directory (see `Proc.log`), or
        to /dev/null when there is none. Pass subprocess.PIPE to read them yourself.
        """
        full = self.exec_argv(argv)
        log: Path | None = None
        log_fh: IO[Any] | None = None
        if stdout is None or stderr is None:
            if self.reaper.logdir is not None:
                base = Path(full[4]).name
                log = self.reaper.logdir / f"{self.label}.{base}.{len(self.reaper.procs)}.log"
                log_fh = log.open("wb")
            sink: int | IO[Any] = log_fh if log_fh is not None else subprocess.DEVNULL
            stdout = sink if stdout is None else stdout
            stderr = sink if stderr is None else stderr
        try:
            p = subprocess.Popen(
                full,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                text=text,
                env=env if env is not None else CHILD_ENV,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if log_fh is not None:
                log_fh.close()
        cmd = argv if isinstance(argv, str) else shlex.join(argv)
        return self.reaper.add(Proc(p, f"{self.label}: {cmd}", log))

    # --- in-process access --------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` with this namespace as the network namespace (in a helper thread)."""
        return call_in_netns(self.name, fn, *args)

    def socket(
        self,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket living in this namespace (usable from any thread)."""
        return self.call(socket.socket, family, type, proto)

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (`value=None`) or write a sysctl in this namespace, e.g. `net.ipv4.ip_forward`."""
        if value is not None:
            self.call(_write_sysctls, {key: str(value)})
        return self.call(_read_sysctl, key)

    def sysctls(self, values: dict[str, str | int]) -> None:
        """Write several sysctls at once."""
        self.call(_write_sysctls, {k: str(v) for k, v in values.items()})

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    # --- backends -----------------------------------------------------------------------------

    def serve(
        self,
        name: str | None = None,
        *,
        tcp: Iterable[int] = (),
        udp: Iterable[int] = (),
        sctp: Iterable[int] = (),
        wait: bool = True,
        timeout: float = 5.0,
    ) -> Backend:
        """Start tests/netlab/backend.py here; with `wait`, return once every port is bound."""
        backend = self.start_backend(name, tcp=tcp, udp=udp, sctp=sctp)
        if wait:
            backend.wait_ready(timeout)
        return backend

    def start_backend(
        self,
        name: str | None = None,
        *,
        tcp: Iterable[int] = (),
        udp: Iterable[int] = (),
        sctp: Iterable[int] = (),
    ) -> Backend:
        name = name or self.label
        tcp, udp, sctp = tuple(tcp), tuple(udp), tuple(sctp)
        argv = [sys.executable, "-I", "-S", str(BACKEND_PY), "--name", name]
        for flag, ports in (("--tcp", tcp), ("--udp", udp), ("--sctp", sctp)):
            if ports:
                argv += [flag, ",".join(map(str, ports))]
        proc = self.popen(argv, stdout=subprocess.PIPE)
        return Backend(name, netns=self, proc=proc, tcp=tcp, udp=udp, sctp=sctp)

    def __repr__(self) -> str:
        return f"<Netns {self.label} ({self.name})>"


class Backend:
    """Handle on a running backend.py: which ports it serves, readiness, stop."""

    def __init__(
        self,
        name: str,
        *,
        netns: Netns,
        proc: Proc,
        tcp: tuple[int, ...],
        udp: tuple[int, ...],
        sctp: tuple[int, ...],
    ) -> None:
        self.name = name
        self.netns = netns
        self.proc = proc
        self.tcp = tcp
        self.udp = udp
        self.sctp = sctp
        self.ready = False

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Block until the backend printed READY (it prints it after every port is listening)."""
        if self.ready:
            return
        stdout = self.proc.popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.proc.stop()
                    raise NetlabError(f"backend {self.name} not ready after {timeout}s")
                line = stdout.readline()
                if line.startswith("READY"):
                    self.ready = True
                    return
                if not line:  # EOF: it died
                    rc = self.proc.popen.wait()
                    log = self.proc.log_text()
                    raise NetlabError(f"backend {self.name} exited rc={rc}: {log.strip()}")

    def stop(self) -> None:
        self.proc.stop()

    def __repr__(self) -> str:
        return f"<Backend {self.name} in {self.netns.label} tcp={self.tcp} udp={self.udp}>"


_SCTP: list[bool] = []


def sctp_supported() -> bool:
    """Can this kernel open SCTP sockets? (Cached; checked in the current namespace.)"""
    if not _SCTP:
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
            _SCTP.append(True)
        except OSError:
            _SCTP.append(False)
    return _SCTP[0]


def list_netns() -> set[str]:
    """Names of all namespaces in /run/netns (what `ip netns list` shows)."""
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()
