"""`pyproxy explain --proxy-mode ipvs` and the pure half of `pyproxy trace --proxy-mode ipvs`.

Explain cases run the real command over the state files of tests/golden/explain/ and check the
`ipvs` section: each virtual server's outcome, its real servers and weights, persistence,
the endpoints that are no real server and why, and the ipset members and rules that accompany
the port. The section of every case is kept as a golden file (`ipvs-<case>.json`; regenerate
with UPDATE_GOLDEN=1, review, record with hack/review_golden.py).

Trace drift is checked against a kernel view built from the plan itself (what a sync leaves
behind, as `pyproxy.ipvs.kernel` would read it), then tampered with as a person with ipvsadm
or ipset would.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from pyproxy.convert import state_from_objects
from pyproxy.explain import cli as explain_cli
from pyproxy.explain.ipvs import (
    format_ipvs_trace,
    ipvs_drift,
    match_virtual_server,
    states_plan,
    trace_ipvs,
)
from pyproxy.ipvs.diff import CurrentRealServer, CurrentVirtualServer, KernelState
from pyproxy.ipvs.ipsets import parse_save
from pyproxy.ipvs.plan import IpvsPlan, VirtualServer, VirtualServerKey, render_ipset_save
from pyproxy.model import Protocol
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import desired_state
from pyproxy.sources.statefile import read_objects
from tests.unit.test_explain import GOLDEN, run_explain, state_args


@dataclass(frozen=True)
class Case:
    id: str
    state: str
    argv: tuple[str, ...]
    #: virtual server -> outcome (those named; every one of the section is in the golden).
    outcomes: Mapping[str, str]
    #: virtual server -> its real servers ("ip:port" with weight 1).
    real_servers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: (endpoint, phrase of the reason) for endpoints that are no real server.
    not_real: tuple[tuple[str, str], ...] = ()
    #: (set, member) that must be listed.
    ipset_entries: tuple[tuple[str, str], ...] = ()
    #: phrases some listed rule must contain.
    rules: tuple[str, ...] = ()
    #: `outcomes` names every virtual server of the section.
    only: bool = False


CASES = [
    Case(
        "lb-ranges-external",
        "policies.yaml",
        ("web/lb-ranges", "--from", "198.51.100.7"),
        {
            "192.0.2.12:443/TCP": "dropped",
            "10.96.1.12:443/TCP": "answered",
            "10.1.0.2:30112/TCP": "answered",
        },
        {"10.96.1.12:443/TCP": ("10.244.1.12:8443", "10.244.2.12:8443")},
        ipset_entries=(
            ("KUBE-LOAD-BALANCER-FW", "192.0.2.12,tcp:443"),
            ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "192.0.2.12,tcp:443,192.168.0.0/16"),
            ("KUBE-NODE-PORT-TCP", "30112"),
        ),
        rules=(
            "--match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL",
            "-A KUBE-IPVS-OUT-FILTER -s 192.0.2.12 -m ipvs --vaddr 192.0.2.12",
        ),
    ),
    Case(
        "lb-ranges-admitted",
        "policies.yaml",
        ("web/lb-ranges", "--from", "192.168.3.4"),
        {"192.0.2.12:443/TCP": "answered"},
    ),
    Case(
        "lb-local-external",
        "policies.yaml",
        ("web/lb-local", "--from", "198.51.100.7"),
        {
            "10.96.1.10:80/TCP": "answered",
            "10.1.0.2:30110/TCP": "dropped",
            "192.0.2.10:80/TCP": "dropped",
        },
        # No endpoint here: upstream falls back to the Cluster endpoints (k8s PR 97081).
        {"192.0.2.10:80/TCP": ("10.244.2.10:8080",)},
        ipset_entries=(
            ("KUBE-LOAD-BALANCER-LOCAL", "192.0.2.10,tcp:80"),
            ("KUBE-NODE-PORT-LOCAL-TCP", "30110"),
            ("KUBE-HEALTH-CHECK-NODE-PORT", "32010"),
        ),
        rules=("--match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN",),
    ),
    Case(
        "lb-local-pod",
        "policies.yaml",
        ("web/lb-local",),
        {"10.1.0.2:30110/TCP": "answered", "192.0.2.10:80/TCP": "answered"},
    ),
    Case(
        "client-ip-affinity",
        "policies.yaml",
        ("web/zonal",),
        {},
    ),
    Case(
        "dual-stack",
        "families.yaml",
        ("net/dual", "--node-ip", "fd00:1::2"),
        {"10.96.2.11:80/TCP": "answered", "[fd00:96::11]:80/TCP": "answered"},
        {"[fd00:96::11]:80/TCP": ("[fd00:244:1::11]:8080",)},
        ipset_entries=(("KUBE-6-CLUSTER-IP", "fd00:96::11,tcp:80"),),
        rules=("--match-set KUBE-6-CLUSTER-IP dst,dst ! -s fd00:244::/48 -j KUBE-MARK-MASQ",),
    ),
    Case(
        "port-name-mismatch",
        "endpoints.yaml",
        ("shop/wrong-port",),
        {"10.96.0.13:80/TCP": "rejected", "10.96.0.13:9090/TCP": "answered"},
        not_real=(("10.244.1.10", "its EndpointSlice has no port named 'http' (TCP)"),),
    ),
    Case(
        "only-the-port-asked",
        "endpoints.yaml",
        ("shop/wrong-port", "--port", "9090"),
        {"10.96.0.13:9090/TCP": "answered"},
        only=True,
    ),
    Case(
        "no-pods",
        "endpoints.yaml",
        ("shop/no-pods",),
        {"10.96.0.10:80/TCP": "rejected", "10.1.0.2:30010/TCP": "rejected"},
        {"10.96.0.10:80/TCP": ()},
    ),
    Case(
        "not-ready",
        "endpoints.yaml",
        ("shop/not-ready",),
        {"10.96.0.15:80/TCP": "rejected"},
        not_real=(("10.244.1.30", "not ready"), ("10.244.2.30", "not ready")),
    ),
    Case(
        "terminating",
        "endpoints.yaml",
        ("shop/terminating",),
        {"10.96.0.16:80/TCP": "answered"},
        {"10.96.0.16:80/TCP": ("10.244.1.40:8080",)},
        not_real=(("10.244.2.40", "terminating and not serving"),),
    ),
]


def ipvs_json(case: Case) -> dict[str, Any]:
    rc, text = run_explain(case.state, *case.argv, "--proxy-mode", "ipvs", "-o", "json")
    assert rc == 0, text
    data = json.loads(text)
    section: dict[str, Any] = data["ipvs"]
    return section


def servers(section: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {vs["virtual_server"]: vs for p in section["ports"] for vs in p["virtual_servers"]}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_explain_ipvs(case: Case) -> None:
    section = ipvs_json(case)
    by_vs = servers(section)
    assert section["ports"], "no port explained"
    assert set(case.outcomes) <= set(by_vs)
    if case.only:
        assert set(by_vs) == set(case.outcomes)
    for vs, outcome in case.outcomes.items():
        assert by_vs[vs]["outcome"] == outcome, (vs, by_vs[vs]["reason"])
    for vs, reals in case.real_servers.items():
        got = [(r["endpoint"], r["weight"]) for r in by_vs[vs]["real_servers"]]
        assert got == [(r, 1) for r in reals], vs
    not_real = [
        (n["endpoint"], n["reason"]) for p in section["ports"] for n in p["not_real_servers"]
    ]
    for address, phrase in case.not_real:
        assert any(e.startswith(address) and phrase in r for e, r in not_real), not_real
    entries = {(e["set"], e["member"]) for p in section["ports"] for e in p["ipset_entries"]}
    assert set(case.ipset_entries) <= entries
    rules = [r["rule"] for p in section["ports"] for r in p["rules"]]
    for phrase in case.rules:
        assert any(phrase in r for r in rules), (phrase, rules)

    golden = GOLDEN / f"ipvs-{case.id}.json"
    text = json.dumps(section, indent=2) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
        pytest.fail(f"{golden.name} rewritten: review it and record it (hack/review_golden.py)")
    assert golden.exists(), f"{golden} missing: run with UPDATE_GOLDEN=1 and review it"
    assert json.loads(golden.read_text()) == section, f"{golden.name} differs (UPDATE_GOLDEN=1)"


def test_client_ip_affinity_is_persistence() -> None:
    section = ipvs_json(next(c for c in CASES if c.id == "client-ip-affinity"))
    by_vs = servers(section)
    assert by_vs
    # sessionAffinityConfig.clientIP.timeoutSeconds: 600 in the state file.
    assert {vs["persistence_timeout"] for vs in by_vs.values()} == {600}
    other = servers(ipvs_json(CASES[0]))
    assert {vs["persistence_timeout"] for vs in other.values()} == {None}


def test_scheduler_flag_reaches_the_virtual_servers() -> None:
    rc, text = run_explain(
        "policies.yaml", "web/np", "--proxy-mode", "ipvs", "--ipvs-scheduler", "lc", "-o", "json"
    )
    assert rc == 0
    section = json.loads(text)["ipvs"]
    assert section["scheduler"] == "lc"
    assert {vs["scheduler"] for vs in servers(section).values()} == {"lc"}


def test_iptables_mode_has_no_ipvs_section() -> None:
    rc, text = run_explain("policies.yaml", "web/np", "-o", "json")
    assert rc == 0
    assert "ipvs" not in json.loads(text)
    rc, plain = run_explain("policies.yaml", "web/np")
    assert "IPVS" not in plain


def test_text_names_virtual_and_real_servers() -> None:
    rc, text = run_explain(
        "policies.yaml", "web/lb-ranges", "--from", "198.51.100.7", "--proxy-mode", "ipvs"
    )
    assert rc == 0
    assert "virtual server 192.0.2.12:443/TCP [load balancer IP] rr: dropped:" in text
    assert "-> 10.244.1.12:8443 weight 1" in text
    assert "ipset KUBE-LOAD-BALANCER-SOURCE-CIDR: 192.0.2.12,tcp:443,192.168.0.0/16" in text


# --- trace: drift against a kernel view ----------------------------------------------------


def node_plan(state: str = "policies.yaml") -> IpvsPlan:
    options = parse_options([*state_args(state)[2:], "--proxy-mode", "ipvs"])
    cluster, _ = state_from_objects(list(read_objects(GOLDEN / state)))
    (config,) = proxier_configs(options, cluster.nodes.get(options.node_name), ())
    return states_plan(desired_state(cluster, config), config, options.ipvs_scheduler)


def kernel_from(plan: IpvsPlan) -> KernelState:
    """What a sync of `plan` leaves in the kernel, as LinuxIpvsKernel.read_state reports it."""
    return KernelState(
        virtual_servers={
            vs.key: CurrentVirtualServer(
                vs.server,
                tuple(CurrentRealServer(r.address, r.port, r.weight) for r in vs.real_servers),
            )
            for vs in plan.virtual_servers
        },
        bound_addresses=frozenset(plan.bind_addresses),
        ipsets=parse_save(render_ipset_save(plan.ipsets)),
    )


def key(text: str) -> VirtualServerKey:
    address, _, rest = text.rpartition(":")
    port, _, proto = rest.partition("/")
    return VirtualServerKey(Protocol(proto), ipaddress.ip_address(address), int(port))


def without_real_server(state: KernelState, vs: str, endpoint: str) -> KernelState:
    k = key(vs)
    have = state.virtual_servers[k]
    reals = tuple(r for r in have.real_servers if r.endpoint != endpoint)
    assert len(reals) == len(have.real_servers) - 1
    return dataclasses.replace(
        state,
        virtual_servers={**state.virtual_servers, k: CurrentVirtualServer(have.server, reals)},
    )


def test_kernel_as_planned_has_no_drift() -> None:
    plan = node_plan()
    assert plan.virtual_servers
    assert ipvs_drift(plan, kernel_from(plan)) == ()


def test_deleted_real_server_is_named() -> None:
    plan = node_plan()
    state = without_real_server(kernel_from(plan), "10.96.1.12:443/TCP", "10.244.2.12:8443")
    drift = [str(d) for d in ipvs_drift(plan, state)]
    assert drift == [
        "missing real server 10.96.1.12:443/TCP -> 10.244.2.12:8443: not in the kernel"
    ]


def test_weight_scheduler_and_persistence_changes_are_different() -> None:
    plan = node_plan()
    state = kernel_from(plan)
    k = key("10.96.1.12:443/TCP")
    have = state.virtual_servers[k]
    first, *rest = have.real_servers
    changed = CurrentVirtualServer(
        VirtualServer(k, "wlc", 0x1, 60),
        (dataclasses.replace(first, weight=0), *rest),
    )
    state = dataclasses.replace(state, virtual_servers={**state.virtual_servers, k: changed})
    drift = [(d.kind, d.item, d.name) for d in ipvs_drift(plan, state)]
    assert drift == [
        ("different", "virtual server", "10.96.1.12:443/TCP"),
        ("different", "real server", f"10.96.1.12:443/TCP -> {first.endpoint}"),
    ]
    text = str(ipvs_drift(plan, state)[0])
    assert "wlc persistent 60" in text and "pyproxy would program rr" in text


def test_extra_virtual_server_is_unexpected_only_when_ours() -> None:
    plan = node_plan()
    state = kernel_from(plan)
    ours = key("10.96.1.99:80/TCP")  # bound on kube-ipvs0: pyproxy's by the ownership rule
    foreign = key("10.1.0.2:9999/TCP")  # a node IP, in none of our sets: someone else's
    extra = {
        k: CurrentVirtualServer(VirtualServer(k), (CurrentRealServer(k.address, 1, 1),))
        for k in (ours, foreign)
    }
    state = dataclasses.replace(
        state,
        virtual_servers={**state.virtual_servers, **extra},
        bound_addresses=state.bound_addresses | {ours.address},
    )
    drift = [(d.kind, d.item, d.name) for d in ipvs_drift(plan, state)]
    assert drift == [
        ("unexpected", "virtual server", "10.96.1.99:80/TCP"),
        ("unexpected", "address", "10.96.1.99"),
    ]


def test_missing_virtual_server_ipset_member_and_address() -> None:
    plan = node_plan()
    state = kernel_from(plan)
    k = key("192.0.2.12:443/TCP")
    sets = dict(state.ipsets)
    lb = sets["KUBE-LOAD-BALANCER"]
    sets["KUBE-LOAD-BALANCER"] = dataclasses.replace(
        lb, members=lb.members - {"192.0.2.12,tcp:443"} | {"192.0.2.77,tcp:80"}
    )
    del sets["KUBE-LOAD-BALANCER-FW"]
    state = KernelState(
        virtual_servers={kk: v for kk, v in state.virtual_servers.items() if kk != k},
        bound_addresses=state.bound_addresses - {k.address},
        ipsets=sets,
    )
    drift = [(d.kind, d.item, d.name) for d in ipvs_drift(plan, state)]
    assert drift == [
        ("missing", "virtual server", "192.0.2.12:443/TCP"),
        ("missing", "ipset member", "KUBE-LOAD-BALANCER"),
        ("unexpected", "ipset member", "KUBE-LOAD-BALANCER"),
        ("missing", "ipset", "KUBE-LOAD-BALANCER-FW"),
        ("missing", "address", "192.0.2.12"),
    ]


def test_match_follows_the_kernel_not_the_plan() -> None:
    plan = node_plan()
    state = without_real_server(kernel_from(plan), "10.96.1.12:443/TCP", "10.244.2.12:8443")
    m = match_virtual_server(state, Protocol.TCP, "10.96.1.12", 443)
    assert (m.matched, m.outcome) == (True, "answered")
    assert [r.endpoint for r in m.real_servers] == ["10.244.1.12:8443"]
    # A drained real server (weight 0) takes no new connection.
    k = key("10.96.1.12:443/TCP")
    drained = CurrentVirtualServer(
        state.virtual_servers[k].server,
        tuple(dataclasses.replace(r, weight=0) for r in state.virtual_servers[k].real_servers),
    )
    state = dataclasses.replace(state, virtual_servers={**state.virtual_servers, k: drained})
    assert match_virtual_server(state, Protocol.TCP, "10.96.1.12", 443).outcome == "rejected"
    # Another protocol on the same address:port is another virtual server.
    assert match_virtual_server(state, Protocol.UDP, "10.96.1.12", 443).matched is False


def test_trace_json_shape() -> None:
    plan = node_plan()
    trace = trace_ipvs(
        kernel_from(plan), dst="10.96.1.12", port=443, protocol=Protocol.TCP, plan=plan
    )
    data = trace.to_json()
    assert data["drift"] == {"checked": True, "items": []}
    assert data["match"]["outcome"] == "answered"
    unchecked = trace_ipvs(KernelState(), dst="10.96.1.12", port=443, protocol=Protocol.TCP)
    assert unchecked.to_json()["drift"] is None
    assert unchecked.match.outcome == "not-ipvs"


def test_trace_parser_takes_proxy_mode() -> None:
    args = explain_cli.trace_parser().parse_args(
        ["--dst", "10.96.0.1", "--port", "80", "--proxy-mode", "ipvs"]
    )
    assert explain_cli._options(args).proxy_mode == "ipvs"
    with pytest.raises(SystemExit) as exc:
        explain_cli.main(["x", "--proxy-mode", "bogus"], stdout=io.StringIO())
    assert exc.value.code == 2


def test_trace_text_names_match_and_drift() -> None:
    plan = node_plan()
    state = without_real_server(kernel_from(plan), "10.96.1.12:443/TCP", "10.244.2.12:8443")
    text = format_ipvs_trace(
        trace_ipvs(state, dst="10.96.1.12", port=443, protocol=Protocol.TCP, plan=plan)
    )
    assert text.splitlines()[1:] == [
        "IPVS: 10.96.1.12:443/TCP: answered: by 1 real server (rr): 10.244.1.12:8443",
        "  -> 10.244.1.12:8443 weight 1",
        "IPVS drift: 1 difference",
        "  missing real server 10.96.1.12:443/TCP -> 10.244.2.12:8443: not in the kernel",
    ]
    unchecked = format_ipvs_trace(
        trace_ipvs(state, dst="10.96.1.12", port=443, protocol=Protocol.TCP)
    )
    assert "IPVS drift: not checked (pass --state or --kubeconfig)" in unchecked


def test_json_keys_are_the_documented_ones() -> None:
    section = ipvs_json(CASES[0])
    assert list(section) == ["scheduler", "ports"]
    port = section["ports"][0]
    assert list(port) == [
        "family", "service_port", "virtual_servers", "not_real_servers", "ipset_entries", "rules",
    ]  # fmt: skip
    assert list(port["virtual_servers"][0]) == [
        "virtual_server", "kind", "scheduler", "persistence_timeout", "bound", "real_servers",
        "outcome", "reason",
    ]  # fmt: skip
    plan = node_plan()
    data = trace_ipvs(
        kernel_from(plan), dst="10.96.1.12", port=443, protocol=Protocol.TCP, plan=plan
    ).to_json()
    assert list(data) == ["match", "drift"]
    assert list(data["match"]) == [
        "virtual_server", "matched", "scheduler", "persistence_timeout", "real_servers",
        "outcome", "reason",
    ]  # fmt: skip
