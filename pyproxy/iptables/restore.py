"""The iptables adapter: iptables-save and iptables-restore, legacy or nft, IPv4 or IPv6.

The only module that runs iptables binaries. It picks the variant the host already uses (the
iptables-wrappers rule: whichever of legacy and nft holds more rules, kubelet's hint chains
first; nft when the host is empty), writes through one `iptables-restore --noflush` call per
document, and turns a failure into a RestoreError that carries the offending input lines.

`restore_stream` feeds iptables-restore while the document is still being rendered, so the two
run in parallel (at 10,000 Services iptables-legacy-restore parses for about 2 s, which is then
spent rendering instead of waiting). One trap makes that need care with the legacy variant:
`iptables-legacy-restore -w N` arms `alarm(N)` to bound its wait for the xtables lock and never
disarms it, so N seconds after its start a read of stdin that is waiting for more input fails
(EINTR, taken for end of input: "COMMIT expected"). So for a stream pyproxy takes the host's
xtables lock itself, with the same 5 s limit, and points the child at a private lock file
(XTABLES_LOCKFILE) that nobody contends, with no -w. The nft variant has no lock and no alarm.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from pyproxy.errors import KernelError, RestoreError
from pyproxy.iptables.vocabulary import KUBE_IPTABLES_HINT, KUBE_PROXY_CANARY, KUBELET_CANARY
from pyproxy.model import IPFamily

BACKENDS = ("legacy", "nft")
_FAILED_LINE = re.compile(r"line (\d+) failed|Error occurred at line: (\d+)")
_WAIT_SECONDS = "5"
#: Bytes gathered before a write to a streaming iptables-restore (fewer, larger writes).
_STREAM_WRITE = 256 * 1024
_LOCK_POLL = 0.001  # s; flock has no timeout, and kube-proxy's blocking wait is woken at once


def _binary(family: IPFamily, backend: str, tool: str) -> str:
    prefix = "iptables" if family is IPFamily.IPv4 else "ip6tables"
    return f"{prefix}-{backend}-{tool}"


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except OSError as err:
        raise KernelError(f"cannot run {argv[0]}: {err}") from err


def _count_rules(family: IPFamily, backend: str) -> int:
    tool = _binary(family, backend, "save")
    if shutil.which(tool) is None:
        return -1
    result = _run([tool])
    if result.returncode != 0:
        return -1
    return sum(1 for line in result.stdout.splitlines() if line.startswith("-"))


def _has_hint(backend: str) -> bool:
    for family in IPFamily:
        tool = _binary(family, backend, "save")
        if shutil.which(tool) is None:
            continue
        result = _run([tool, "-t", "mangle"])
        if result.returncode == 0 and (
            KUBE_IPTABLES_HINT in result.stdout or KUBELET_CANARY in result.stdout
        ):
            return True
    return False


def detect_backend(choice: str = "auto") -> str:
    """`legacy` or `nft`: the override, else the variant the host's rules live in."""
    if choice in BACKENDS:
        return choice
    if choice != "auto":
        raise KernelError(f"unknown iptables backend {choice!r} (auto, legacy, nft)")
    for backend in ("nft", "legacy"):
        if _has_hint(backend):
            return backend
    legacy = sum(max(_count_rules(f, "legacy"), 0) for f in IPFamily)
    nft = sum(max(_count_rules(f, "nft"), 0) for f in IPFamily)
    if legacy > nft:
        return "legacy"
    if shutil.which(_binary(IPFamily.IPv4, "nft", "restore")) is None and legacy >= 0:
        return "legacy"
    return "nft"


@dataclass(frozen=True, slots=True)
class Iptables:
    """iptables-save/-restore for one family and backend, in the current network namespace."""

    family: IPFamily
    backend: str

    def save(self, tables: tuple[str, ...] = ("filter", "nat")) -> str:
        out = []
        for table in tables:
            result = _run([_binary(self.family, self.backend, "save"), "-t", table])
            if result.returncode != 0:
                if "does not exist" in result.stderr or "Table does not exist" in result.stderr:
                    continue
                raise KernelError(
                    f"{_binary(self.family, self.backend, 'save')} -t {table} failed:"
                    f" {result.stderr.strip()}"
                )
            out.append(result.stdout)
        return "".join(out)

    def restore(self, document: str) -> None:
        """Apply `document` atomically per table, without flushing what it does not name."""
        tool = _binary(self.family, self.backend, "restore")
        result = _run([tool, "-w", _WAIT_SECONDS, "--noflush", "--counters"], stdin=document)
        if result.returncode != 0:
            raise _restore_error(tool, result.returncode, result.stderr, document)

    def restore_stream(self, chunks: Iterable[str]) -> int:
        """Apply the document made of `chunks` as `restore` does, writing each piece as soon as
        the iterator yields it; returns the document's size in bytes.

        If the iterator raises, iptables-restore is killed before its COMMIT for the table in
        progress, so that table stays as it was, and the error propagates."""
        tool = _binary(self.family, self.backend, "restore")
        with self._stream_lock() as (wait, env), tempfile.TemporaryFile() as errors:
            try:
                child = subprocess.Popen(
                    [tool, *wait, "--noflush", "--counters"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    env=env,
                )
            except OSError as err:
                raise KernelError(f"cannot run {tool}: {err}") from err
            sent: list[str] = []
            # A thread writes, so rendering goes on while a write waits for iptables-restore
            # to read (a pipe holds 64 KiB: writing from this thread would take turns).
            writer = _Writer(child.stdin)
            try:
                pending: list[str] = []
                pending_size = 0
                for chunk in chunks:
                    sent.append(chunk)
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= _STREAM_WRITE:
                        writer.put("".join(pending).encode())
                        pending.clear()
                        pending_size = 0
                writer.put("".join(pending).encode())
            except BaseException:
                child.kill()
                writer.close()
                child.wait()
                raise
            writer.close()
            returncode = child.wait()
            if returncode != 0:
                errors.seek(0)
                message = errors.read().decode(errors="replace")
                raise _restore_error(tool, returncode, message, "".join(sent))
        return sum(map(len, sent))

    @contextlib.contextmanager
    def _stream_lock(self) -> Iterator[tuple[list[str], dict[str, str] | None]]:
        """(wait arguments, environment) for a streaming restore, holding the xtables lock for
        the legacy variant (see the module docstring)."""
        if self.backend != "legacy":
            yield ["-w", _WAIT_SECONDS], None
            return
        path = os.environ.get("XTABLES_LOCKFILE") or "/run/xtables.lock"
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise KernelError(f"cannot open the xtables lock {path}: {err}") from err
        try:
            deadline = time.monotonic() + float(_WAIT_SECONDS)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise KernelError(f"cannot lock {path}: {err}") from err
                    if time.monotonic() >= deadline:
                        raise KernelError(
                            f"another program has held the xtables lock {path}"
                            f" for more than {_WAIT_SECONDS} s"
                        ) from None
                    time.sleep(_LOCK_POLL)
            yield [], dict(os.environ, XTABLES_LOCKFILE=_private_lock(path))
        finally:
            os.close(fd)  # releases the lock


def _private_lock(path: str) -> str:
    """A lock file for the child's own locking that nobody else contends: next to the real
    one, or in the temporary directory where that is not writable."""
    for candidate in (
        f"{path}.pyproxy",
        os.path.join(tempfile.gettempdir(), "pyproxy-xtables.lock"),
    ):
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        except OSError:
            continue
        return candidate
    raise KernelError(
        f"cannot create a private xtables lock file next to {path} or in the temporary directory"
    )


class _Writer:
    """Writes byte strings to a child's stdin from its own thread, then closes it. Once the
    child stops reading (a bad line: its exit status and message say which) the rest is
    dropped."""

    def __init__(self, stdin: IO[bytes] | None) -> None:
        self._stdin = stdin
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="iptables-restore stdin")
        self._thread.start()

    def put(self, data: bytes) -> None:
        self._queue.put(data)

    def close(self) -> None:
        """Write what is queued, close stdin, and wait for the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stdin = self._stdin
        while (data := self._queue.get()) is not None:
            if stdin is None:
                continue
            try:
                stdin.write(data)
            except (BrokenPipeError, ValueError):  # stopped reading, or killed
                stdin = None
        if self._stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self._stdin.close()


def _restore_error(tool: str, returncode: int, stderr: str, document: str) -> RestoreError:
    lines = document.splitlines()
    offending: list[str] = []
    for match in _FAILED_LINE.finditer(stderr):
        number = int(match.group(1) or match.group(2))
        if 0 < number <= len(lines):
            offending.append(f"{number}: {lines[number - 1]}")
    return RestoreError(f"{tool} failed (exit {returncode}): {stderr.strip()}", tuple(offending))


def canary_exists(iptables: Iptables) -> bool:
    """Whether the KUBE-PROXY-CANARY chain a full sync creates is still in the mangle table."""
    return f":{KUBE_PROXY_CANARY} " in iptables.save(("mangle",))
