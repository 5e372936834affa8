"""The IPVS test VM's kernel: ip_vs is loaded and dummy links can be made.

Run inside the VM (hack/vm.sh loads ip_vs and dummy before the command):

    hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm -q

Outside the VM these tests fail on purpose (the host kernel has no ip_vs and no dummy
module): a vm test that cannot run must not look like a pass.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

RUN_IN_VM = "run inside the VM: hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def test_ip_vs_is_loaded() -> None:
    assert Path("/proc/net/ip_vs").exists(), f"ip_vs is not loaded in this kernel; {RUN_IN_VM}"


def test_dummy_link_in_fresh_netns() -> None:
    ns = f"pyproxy-vmtest-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", ns)
    assert made.returncode == 0, f"ip netns add failed (root needed): {made.stderr.strip()}"
    try:
        add = _ip("-n", ns, "link", "add", "kube-ipvs0", "type", "dummy")
        assert add.returncode == 0, f"dummy link: {add.stderr.strip()}; {RUN_IN_VM}"
        show = _ip("-n", ns, "-o", "link", "show", "kube-ipvs0")
        assert show.returncode == 0, show.stderr
        assert "kube-ipvs0" in show.stdout
    finally:
        _ip("netns", "del", ns)
    assert ns not in _ip("netns", "list").stdout
