"""Fakes of pyproxy's kernel adapters, shared by the unit tests.

One module so that each fake exists once and production modules carry no test code. A fake
keeps the interface of the adapter it stands for (checked by mypy where the adapter is a
Protocol) and records what was asked of it, so tests assert on behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pyproxy.conntrack import FlowDump
from pyproxy.conntrack_plan import IPPROTO_UDP, Flow
from pyproxy.errors import KernelError
from pyproxy.model import IPFamily
from pyproxy.nfacct import Counter


@dataclass
class FakeConntrack:
    """An in-memory conntrack table for unit tests; records what was deleted."""

    family: IPFamily
    flows: list[Flow] = field(default_factory=list)
    deleted: list[Flow] = field(default_factory=list)
    dumps: int = 0
    #: Raised by the next udp_flows()/delete() call, to test error paths.
    fail_with: KernelError | None = None

    def add(self, flows: Iterable[Flow]) -> None:
        self.flows.extend(flows)

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            err, self.fail_with = self.fail_with, None
            raise err

    def udp_flows(self) -> FlowDump:
        self._maybe_fail()
        self.dumps += 1
        return FlowDump([flow for flow in self.flows if flow.proto == IPPROTO_UDP])

    def delete(self, flows: Sequence[Flow]) -> int:
        """Like the kernel: by original tuple and zone; a missing flow is not counted."""
        self._maybe_fail()
        count = 0
        for flow in flows:
            key = _orig_key(flow)
            for present in self.flows:
                if _orig_key(present) == key:
                    self.flows.remove(present)
                    self.deleted.append(present)
                    count += 1
                    break
        return count


def _orig_key(flow: Flow) -> tuple[object, ...]:
    return (
        flow.proto,
        flow.orig_src,
        flow.orig_src_port,
        flow.orig_dst,
        flow.orig_dst_port,
        flow.zone,
    )


class FakeNfacct:
    """In-memory counters for unit tests; `packets` can be bumped by the test."""

    def __init__(self, *, broken: bool = False) -> None:
        self.counters: dict[str, Counter] = {}
        self.broken = broken

    def ensure(self, name: str) -> None:
        if self.broken:
            raise KernelError(f"nfacct add {name}: Operation not permitted")
        self.counters.setdefault(name, Counter(name, 0, 0))

    def get(self, name: str) -> Counter | None:
        if self.broken:
            raise KernelError(f"nfacct get {name}: Operation not permitted")
        return self.counters.get(name)

    def bump(self, name: str, packets: int, nbytes: int = 0) -> None:
        old = self.counters[name]
        self.counters[name] = Counter(name, old.packets + packets, old.bytes + nbytes)
