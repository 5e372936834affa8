"""When the controller must dump conntrack: every way an endpoint can leave, in every grouping.

pyproxy dumps the UDP conntrack table only after a sync that may have made a flow stale
(`cleanup_needed`). The property checked here: replay every sequence of endpoint states a
Service can go through (absent, ready, terminating but serving, terminating and not serving,
removed), grouped into syncs in every possible way, with clients opening flows to whatever the
rules pick between syncs; after each sync no stale flow may remain in the (fake) table, and a
sync that leaves the allowed map as it was must not dump the table at all.

The same replay with the trigger pyproxy used before (the endpoints the *rules* use changed)
strands the flow of issue 16: an endpoint turns terminating-but-serving (rules change, the flow
is still valid), then disappears (the flow is stale, the rules do not change).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import itertools
from collections.abc import Callable, Iterator, Sequence

import pytest
import structlog
from fakes import FakeConntrack

from pyproxy.conntrack import ConntrackCleaner
from pyproxy.conntrack_plan import (
    IPPROTO_UDP,
    AllowedEndpoints,
    Flow,
    ServiceStates,
    allowed_endpoints,
    cleanup_needed,
    stale_flows,
)
from pyproxy.model import IPFamily, Protocol
from pyproxy.policy import categorize_endpoints
from pyproxy.proxystate import ServicePortState
from pyproxy.serviceport import EndpointInfo, ServicePortInfo, ServicePortName

Trigger = Callable[[ServiceStates, ServiceStates], bool]


class State(enum.IntEnum):
    """An endpoint's life, in the only order it can go through it (steps may be skipped)."""

    ABSENT = 0  # not created yet
    READY = 1
    SERVING_TERMINATING = 2  # ready false, serving true, terminating true
    TERMINATING = 3  # ready false, serving false, terminating true
    REMOVED = 4  # gone from the EndpointSlice


CLUSTER_IP = ipaddress.ip_address("10.96.0.10")
NODE_IP = ipaddress.ip_address("172.30.0.2")
PORT, NODE_PORT, TARGET = 53, 30053, 5353
ENDPOINTS = ("10.244.1.11", "10.244.2.11")
INFO = ServicePortInfo(
    name=ServicePortName("ns", "dns", "dns", Protocol.UDP),
    cluster_ip=CLUSTER_IP,
    port=PORT,
    node_port=NODE_PORT,
)


def port_state(states: Sequence[State]) -> ServicePortState:
    """ns/dns with ENDPOINTS[i] in states[i]."""
    eps = []
    for address, state in zip(ENDPOINTS, states, strict=True):
        if state in (State.ABSENT, State.REMOVED):
            continue
        eps.append(
            EndpointInfo.make(
                ipaddress.ip_address(address),
                TARGET,
                is_local=False,
                ready=state is State.READY,
                serving=state <= State.SERVING_TERMINATING,
                terminating=state >= State.SERVING_TERMINATING,
            )
        )
    endpoints = tuple(eps)
    return ServicePortState(
        INFO, endpoints, categorize_endpoints(endpoints, INFO, node_name="node-a", zone=None)
    )


def successors(states: tuple[State, ...]) -> Iterator[tuple[State, ...]]:
    """The states one sync can lead to: any endpoints move forward, by one step or several
    (a sync that sees several transitions at once), so walking them covers every sequence of
    transitions grouped into syncs in every way."""
    for nxt in itertools.product(*(range(s, State.REMOVED + 1) for s in states)):
        if nxt != states:
            yield tuple(State(s) for s in nxt)


class Clients:
    """UDP clients opening one flow each through the rules in force: a fresh source port per
    flow, to the ClusterIP and to the nodePort, DNATed to each endpoint the rules may pick, or
    not DNATed at all when the rules have none (the REJECT rule drops nothing yet, as when a
    flow is cached before the rules are written)."""

    def __init__(self) -> None:
        self.ports = itertools.count(40000)

    def open(self, state: ServicePortState) -> list[Flow]:
        client = ipaddress.ip_address("10.244.9.9")
        picks = [(ep.ip, ep.port) for ep in state.categorized.all_reachable]
        flows = []
        for dst in ((CLUSTER_IP, PORT), (NODE_IP, NODE_PORT)):
            for reply in picks or [dst]:
                flows.append(Flow(IPPROTO_UDP, client, next(self.ports), *dst, *reply))
        return flows


@functools.cache
def port_state_of(states: tuple[State, ...]) -> ServicePortState:
    return port_state(states)


@functools.cache
def allowed_of(states: tuple[State, ...]) -> AllowedEndpoints:
    return allowed_endpoints([port_state_of(states)])


def sync(
    table: FakeConntrack,
    before: tuple[State, ...],
    after: tuple[State, ...],
    trigger: Trigger,
    clients: Clients,
) -> list[str]:
    """One sync from `before` to `after` that calls the cleaner when `trigger` says so, then
    new flows through the new rules; return the broken promises (none, when all is well)."""
    old, new = port_state_of(before), port_state_of(after)
    dumps = table.dumps
    if trigger([old], [new]):
        ConntrackCleaner(IPFamily.IPv4, table).clean(previous=[old], current=[new])
    when = f"after {'/'.join(s.name for s in after)}"
    allowed = allowed_of(after)
    problems = [f"{when}: {flow} survived" for flow in stale_flows(table.flows, allowed)]
    if allowed == allowed_of(before) and table.dumps != dumps:
        problems.append(f"{when}: dumped though nothing could be stale")
    table.add(clients.open(new))
    return problems


def replay(history: Sequence[tuple[State, ...]], trigger: Trigger) -> list[str]:
    """One sequence of syncs, from flows opened in its first state."""
    table, clients = FakeConntrack(IPFamily.IPv4), Clients()
    table.add(clients.open(port_state_of(history[0])))
    problems = []
    for before, after in itertools.pairwise(history):
        problems += sync(table, before, after, trigger, clients)
    return problems


def explore(start: tuple[State, ...], trigger: Trigger) -> tuple[int, list[str]]:
    """Every sequence of syncs from `start` (depth first, each prefix replayed once); return
    how many syncs ran and the broken promises, each with the sequence that led to it."""
    clients = Clients()
    table = FakeConntrack(IPFamily.IPv4)
    table.add(clients.open(port_state_of(start)))
    problems: list[str] = []
    syncs = 0

    def walk(table: FakeConntrack, path: tuple[tuple[State, ...], ...]) -> None:
        nonlocal syncs
        for after in successors(path[-1]):
            branch = FakeConntrack(IPFamily.IPv4, list(table.flows))
            syncs += 1
            for problem in sync(branch, path[-1], after, trigger, clients):
                history = " -> ".join("/".join(s.name for s in h) for h in (*path, after))
                problems.append(f"{history}: {problem}")
            walk(branch, (*path, after))

    walk(table, (start,))
    return syncs, problems


def rules_changed(previous: ServiceStates, current: ServiceStates) -> bool:
    """The trigger before issue 16: the endpoints the rules use (all_reachable) changed."""

    def used(states: ServiceStates) -> frozenset[str]:
        assert isinstance(states, list)
        return frozenset(ep.endpoint for s in states for ep in s.categorized.all_reachable)

    return used(previous) != used(current)


def test_no_sequence_strands_a_flow_or_dumps_for_nothing() -> None:
    # From no endpoints at all, which also covers every later starting point (both ready, ...).
    with structlog.testing.capture_logs():  # 2,000 cleanups' debug lines: kept, not printed
        syncs, problems = explore((State.ABSENT, State.ABSENT), cleanup_needed)
    assert syncs > 5000  # the enumeration really ran: 5,135 syncs over 2 endpoints
    assert problems == []


def test_the_rules_based_trigger_strands_the_two_step_flow() -> None:
    """The replay can fail: with the old trigger it finds issue 16's sequence."""
    two_steps = (
        (State.READY, State.READY),
        (State.SERVING_TERMINATING, State.READY),  # rules drop it; its flows stay valid
        (State.REMOVED, State.READY),  # its flows are now stale; the rules are unchanged
    )
    problems = replay(two_steps, rules_changed)
    assert [p for p in problems if "survived" in p] == [
        "after REMOVED/READY: proto=17 10.244.9.9:40000 -> 10.96.0.10:53"
        " (reply from 10.244.1.11:5353) survived",
        "after REMOVED/READY: proto=17 10.244.9.9:40002 -> 172.30.0.2:30053"
        " (reply from 10.244.1.11:5353) survived",
    ]
    assert replay(two_steps, cleanup_needed) == []


@pytest.mark.parametrize(
    ("before", "after", "needed"),
    [
        pytest.param((State.READY,) * 2, (State.READY,) * 2, False, id="nothing"),
        pytest.param((State.ABSENT, State.READY), (State.READY, State.READY), False, id="scale-up"),
        pytest.param(
            (State.READY, State.READY),
            (State.SERVING_TERMINATING, State.READY),
            False,
            id="terminating-still-serving",
        ),
        pytest.param(
            (State.SERVING_TERMINATING, State.READY),
            (State.REMOVED, State.READY),
            True,
            id="serving-endpoint-removed",
        ),
        pytest.param(
            (State.READY, State.READY),
            (State.TERMINATING, State.READY),
            True,
            id="stops-serving",
        ),
        pytest.param(
            (State.ABSENT, State.ABSENT), (State.READY, State.ABSENT), True, id="zero-to-one"
        ),
    ],
)
def test_cleanup_needed_only_when_something_can_be_stale(
    before: tuple[State, ...], after: tuple[State, ...], needed: bool
) -> None:
    assert cleanup_needed([port_state(before)], [port_state(after)]) is needed


def test_service_added_or_deleted_needs_a_cleanup() -> None:
    """A new frontend may have flows cached before it existed; a gone one DNATed flows."""
    ready = port_state((State.READY, State.READY))
    assert cleanup_needed([], [ready])
    assert cleanup_needed([ready], [])
    assert not cleanup_needed([], [])
