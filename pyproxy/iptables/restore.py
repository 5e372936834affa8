"""The iptables adapter: iptables-save and iptables-restore, legacy or nft, IPv4 or IPv6.

The only module that runs iptables binaries. It picks the variant the host already uses (the
iptables-wrappers rule: whichever of legacy and nft holds more rules, kubelet's hint chains
first; nft when the host is empty), writes through one `iptables-restore --noflush` call per
document, and turns a failure into a RestoreError that carries the offending input lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from pyproxy.errors import KernelError, RestoreError
from pyproxy.model import IPFamily

BACKENDS = ("legacy", "nft")
_FAILED_LINE = re.compile(r"line (\d+) failed|Error occurred at line: (\d+)")
_WAIT_SECONDS = "5"


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
            "KUBE-IPTABLES-HINT" in result.stdout or "KUBE-KUBELET-CANARY" in result.stdout
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
        if result.returncode == 0:
            return
        lines = document.splitlines()
        offending: list[str] = []
        for match in _FAILED_LINE.finditer(result.stderr):
            number = int(match.group(1) or match.group(2))
            if 0 < number <= len(lines):
                offending.append(f"{number}: {lines[number - 1]}")
        raise RestoreError(
            f"{tool} failed (exit {result.returncode}): {result.stderr.strip()}",
            tuple(offending),
        )


def canary_exists(iptables: Iptables) -> bool:
    """Whether the KUBE-PROXY-CANARY chain a full sync creates is still in the mangle table."""
    return ":KUBE-PROXY-CANARY " in iptables.save(("mangle",))
