"""Fixtures of the vm tier (IPVS): run inside the virtme-ng VM, where ip_vs and dummy exist.

    hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm

Outside the VM the `ip_vs` fixture fails the test (never skips): this machine's kernel has no
ip_vs, and a vm test that cannot run must not look like a pass.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

RUN_IN_VM = "run inside the VM: hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm"


@pytest.fixture(scope="session")
def ip_vs() -> None:
    """ip_vs is loaded (loading it if the kernel has it); fails with the reason otherwise."""
    if not Path("/proc/net/ip_vs").exists():
        subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
    assert Path("/proc/net/ip_vs").exists(), f"this kernel has no ip_vs; {RUN_IN_VM}"


#: Backend start-up allowance in the VM: without KVM (TCG) a Python process takes seconds to
#: start, and netlab's default of 5 s for a backend to print READY is too short there.
VM_BACKEND_READY_TIMEOUT = 60.0


@pytest.fixture(scope="session", autouse=True)
def slow_vm_backends() -> Iterator[None]:
    from netlab.ns import Backend

    original = Backend.wait_ready

    def wait_ready(self: Backend, timeout: float = VM_BACKEND_READY_TIMEOUT) -> None:
        original(self, max(timeout, VM_BACKEND_READY_TIMEOUT))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Backend, "wait_ready", wait_ready)
        yield
