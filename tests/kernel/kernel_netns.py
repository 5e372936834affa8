"""A throwaway network namespace to run the real iptables tools in (kernel-marked tests only).

Needs root: without it the test fails (never skips). The namespace is always deleted, also
when the test fails; only namespaces this module created are ever touched.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence

import pytest

BACKENDS = ("nft", "legacy")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (network namespaces, iptables); run them as root")


@contextlib.contextmanager
def netns() -> Iterator[str]:
    require_root()
    name = f"pyproxy-ut-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def run_in(
    ns: str, argv: Sequence[str], stdin: str | None = None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and cp.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({cp.returncode}):\n{cp.stderr}")
    return cp


def tool(backend: str, family: str, name: str) -> str:
    """`iptables-nft-restore`, `ip6tables-legacy-save`, `iptables-nft`, ..."""
    prefix = "iptables" if family == "IPv4" else "ip6tables"
    suffix = f"-{name}" if name else ""
    return f"{prefix}-{backend}{suffix}"
