"""`pyproxy explain` and the pure half of `pyproxy trace`, as specifications.

Each case runs the real command (`explain_cli.main`) over a state file in tests/golden/explain/
(its `# args:` lines give the node flags) and checks the structured result (diagnosis codes,
the outcome of each connection, why endpoints are not used) and key phrases of the plain text.
The JSON of every case is also kept as a golden file (`<case>.json`; regenerate with
UPDATE_GOLDEN=1, which fails the run, review the diff and record it with hack/review_golden.py:
tests/unit/test_golden_review.py fails until then).

Drift is checked against iptables-save output captured from a real kernel (nft and legacy) after
`pyproxy --once --state policies.yaml` (`policies.<backend>.save`): untouched, it must match
exactly what pyproxy would program; every kind of tampering must be named by chain. When the
renderer changes, refresh the captures as root with
`UPDATE_GOLDEN=1 pytest tests/kernel/test_trace_drift.py -k captures` (that test also fails
while they are stale).
"""

from __future__ import annotations

import io
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyproxy.convert import state_from_objects
from pyproxy.errors import PyproxyError
from pyproxy.explain import cli as explain_cli
from pyproxy.explain.format import Style, format_explanation, format_packet_report
from pyproxy.explain.packet import trace_saved
from pyproxy.explain.report import Code, Outcome
from pyproxy.explain.service import desired_document, explain_service, service_extras
from pyproxy.iptables.drift import normalize_rule, ruleset_drift
from pyproxy.iptables.restore_text import parse_rule
from pyproxy.model import IPFamily, NamespacedName, Protocol
from pyproxy.options import parse_options, proxier_configs
from pyproxy.sources.statefile import read_objects

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "explain"


def state_args(name: str) -> list[str]:
    """`--state FILE` plus the flags from the file's `# args:` lines."""
    path = GOLDEN / name
    args = ["--state", str(path)]
    for line in path.read_text().splitlines():
        if line.startswith("# args:"):
            args.extend(shlex.split(line.removeprefix("# args:")))
    return args


def run_explain(state: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = explain_cli.main([*argv, *state_args(state)], stdout=out)
    return rc, out.getvalue()


def connection_outcomes(data: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    out = {}
    for c in data["connections"]:
        address = f"[{c['address']}]" if ":" in c["address"] else c["address"]
        out[(c["kind"], f"{address}:{c['port']}")] = c["outcome"]
    return out


@dataclass(frozen=True)
class Case:
    id: str
    state: str
    argv: tuple[str, ...]
    #: Exactly these diagnosis codes (in any order).
    codes: frozenset[str]
    #: (kind, "address:port") -> outcome, for the connections named (others unchecked).
    outcomes: Mapping[tuple[str, str], str] = field(default_factory=dict)
    #: Phrases the plain text must contain.
    phrases: tuple[str, ...] = ()
    #: (endpoint address, service port, internal usage code) for endpoints checked.
    endpoint_codes: tuple[tuple[str, str, str | None], ...] = ()
    rc: int = 0


CASES = [
    Case(
        "selector-matches-no-pods",
        "endpoints.yaml",
        ("shop/no-pods",),
        frozenset({"selector-matches-no-pods"}),
        {
            ("ClusterIP", "10.96.0.10:80"): "rejected",
            ("NodePort", "10.1.0.2:30010"): "rejected",
        },
        (
            "its selector (app=cart) matches no pods",
            "shop/no-pods:http has no endpoints: the Service has no EndpointSlices",
            "connection refused",
            "filter/KUBE-EXTERNAL-SERVICES",
        ),
    ),
    Case(
        "empty-slice",
        "endpoints.yaml",
        ("empty-slice", "--namespace", "shop"),
        frozenset({"selector-matches-no-pods"}),
        {("ClusterIP", "10.96.0.11:80"): "rejected"},
        ("the Service has EndpointSlices with no endpoints", "(app=search)"),
    ),
    Case(
        "no-selector",
        "endpoints.yaml",
        ("shop/manual",),
        frozenset({"no-selector-no-endpoints"}),
        {("ClusterIP", "10.96.0.12:5432"): "rejected"},
        ("has no selector", "someone must create its EndpointSlices"),
    ),
    Case(
        "port-name-mismatch",
        "endpoints.yaml",
        ("shop/wrong-port",),
        frozenset({"port-name-mismatch"}),
        {
            ("ClusterIP", "10.96.0.13:80"): "rejected",
            ("ClusterIP", "10.96.0.13:9090"): "answered",
        },
        (
            "Service port 'http' (80/TCP, targetPort 'web') has no matching port",
            "which list metrics/TCP",
            "container port named 'web'",
            "no EndpointSlice has a port named http/TCP",
        ),
        (("10.244.1.10", "http/TCP", "port-name-mismatch"), ("10.244.1.10", "metrics/TCP", None)),
    ),
    Case(
        "port-protocol-mismatch",
        "endpoints.yaml",
        ("shop/wrong-protocol",),
        frozenset({"port-name-mismatch"}),
        {("ClusterIP", "10.96.0.14:53"): "rejected"},
        ("which list dns/TCP (same name, other protocol)",),
    ),
    Case(
        "endpoints-not-ready",
        "endpoints.yaml",
        ("shop/not-ready",),
        frozenset({"endpoints-not-ready"}),
        {("ClusterIP", "10.96.0.15:80"): "rejected"},
        (
            "all 2 endpoints are not ready",
            "none of its 2 endpoints is ready",
            "not used: not ready",
        ),
        (("10.244.1.30", "http/TCP", "not-ready"), ("10.244.2.30", "http/TCP", "not-ready")),
    ),
    Case(
        "only-terminating",
        "endpoints.yaml",
        ("shop/terminating",),
        frozenset({"only-terminating-endpoints"}),
        {("ClusterIP", "10.96.0.16:80"): "answered"},
        (
            "no endpoint is ready; 1 serving-terminating endpoint is used meanwhile",
            "used (terminating, used because no endpoint is ready)",
            "not used: terminating and not serving",
        ),
        (("10.244.1.40", "http/TCP", "terminating"), ("10.244.2.40", "http/TCP", "not-ready")),
    ),
    Case(
        "etp-local-external-client",
        "policies.yaml",
        ("web/lb-local", "--from", "198.51.100.7"),
        frozenset({"no-local-endpoints"}),
        {
            ("ClusterIP", "10.96.1.10:80"): "answered",
            ("NodePort", "10.1.0.2:30110"): "dropped",
            ("NodePort", "10.1.1.2:30110"): "dropped",
            ("LoadBalancer", "192.0.2.10:80"): "dropped",
        },
        (
            "externalTrafficPolicy is Local and no endpoint is on node-a (endpoints are on node-b)",
            "health check node port 32010 answers 503",
            "the client times out",
            "external not used: on node node-b, and externalTrafficPolicy is Local",
        ),
        (("10.244.2.10", "http/TCP", None),),
    ),
    Case(
        "etp-local-pod-short-circuit",
        "policies.yaml",
        ("web/lb-local",),
        frozenset({"no-local-endpoints"}),
        {
            ("NodePort", "10.1.0.2:30110"): "answered",
            ("LoadBalancer", "192.0.2.10:80"): "answered",
        },
        ("short-circuited to every endpoint", "10.244.0.2 (a pod, an example address"),
    ),
    Case(
        "itp-local",
        "policies.yaml",
        ("web/itp-local",),
        frozenset({"no-local-endpoints"}),
        {("ClusterIP", "10.96.1.11:80"): "dropped"},
        ("internalTrafficPolicy is Local", "connections to the cluster IP from here are dropped"),
        (("10.244.2.11", "http/TCP", "other-node-local-policy"),),
    ),
    Case(
        "source-range-excludes-client",
        "policies.yaml",
        ("web/lb-ranges", "--from", "198.51.100.7"),
        frozenset({"source-range-excludes-client"}),
        {
            ("LoadBalancer", "192.0.2.12:443"): "dropped",
            # NodePorts are not subject to loadBalancerSourceRanges (upstream behaviour).
            ("NodePort", "10.1.0.2:30112"): "answered",
        },
        (
            "source 198.51.100.7 is not in loadBalancerSourceRanges (192.168.0.0/16)",
            "(filter/KUBE-PROXY-FIREWALL)",
        ),
    ),
    Case(
        "source-range-admits-client",
        "policies.yaml",
        ("web/lb-ranges", "--from", "192.168.3.4"),
        frozenset(),
        {("LoadBalancer", "192.0.2.12:443"): "answered"},
        ("Diagnosis: no problem found",),
    ),
    Case(
        "nodeport-reached-on-another-port",
        "policies.yaml",
        ("web/np", "--port", "8080"),
        frozenset({"port-not-in-service"}),
        {
            ("ClusterIP", "10.96.1.13:8080"): "not-handled",
            ("NodePort", "10.1.0.2:8080"): "not-handled",
            ("externalIP", "198.51.100.13:8080"): "not-handled",
        },
        (
            "port 8080 is not a port, name or nodePort of this Service",
            "reached on its nodePort on the node IPs",
            "the packet goes to the node itself",
        ),
    ),
    Case(
        "nodeport-by-node-port",
        "policies.yaml",
        ("web/np", "--port", "30113"),
        frozenset(),
        {("NodePort", "10.1.0.2:30113"): "answered", ("ClusterIP", "10.96.1.13:80"): "answered"},
        ("masqueraded: externalTrafficPolicy is Cluster",),
    ),
    Case(
        "nodeport-addresses",
        "policies.yaml",
        ("web/np", "--nodeport-addresses", "10.1.0.0/24"),
        frozenset({"nodeport-address-excluded"}),
        {("NodePort", "10.1.0.2:30113"): "answered", ("NodePort", "10.1.1.2:30113"): "not-handled"},
        ("NodePorts are served only on 10.1.0.2 (--nodeport-addresses)",),
    ),
    Case(
        "hairpin",
        "policies.yaml",
        ("web/np", "--from", "10.244.1.13", "--port", "http"),
        frozenset(),
        {("ClusterIP", "10.96.1.13:80"): "answered"},
        (
            "10.244.1.13:8080 (50%, masqueraded)",
            "masqueraded only towards 10.244.1.13:8080: hairpin",
        ),
    ),
    Case(
        "from-node-topology",
        "policies.yaml",
        ("web/zonal", "--from", "node"),
        frozenset({"topology"}),
        {("ClusterIP", "10.96.1.14:6379"): "answered"},
        (
            "10.1.0.2 (this node)",
            "topology hint for zone(s) zone-b; this node is in zone zone-a",
            "ClientIP affinity keeps a client on its first endpoint for 600s",
        ),
        (("10.244.2.14", "redis/TCP", "topology-other-zone"), ("10.244.1.14", "redis/TCP", None)),
    ),
    Case(
        "other-family-endpoints-and-external-ip",
        "families.yaml",
        ("net/v4only",),
        frozenset({"other-ip-family"}),
        {
            ("ClusterIP", "10.96.2.10:80"): "answered",
            ("externalIP", "198.51.100.20:80"): "answered",
        },
        (
            "EndpointSlice v4only-cd34e holds IPv6 endpoints but the Service has no IPv6",
            "externalIP 2001:db8:20::20 is IPv6 but the Service has no IPv6 cluster IP",
            "fd00:244:1::99 is not an IPv4 address",
        ),
        (("fd00:244:1::10", "http/TCP", "other-address-family"),),
    ),
    Case(
        "source-of-other-family",
        "families.yaml",
        ("net/v4only", "--from", "fd00:244:1::5"),
        frozenset({"other-ip-family"}),
        {("ClusterIP", "10.96.2.10:80"): "not-applicable"},
        ("the source fd00:244:1::5 is IPv6 but the Service has only IPv4 addresses",),
    ),
    Case(
        "family-not-served",
        "families.yaml",
        ("net/dual",),
        frozenset({"family-not-served"}),
        {
            ("ClusterIP", "10.96.2.11:80"): "answered",
            ("ClusterIP", "[fd00:96::11]:80"): "not-applicable",
        },
        ("this node has no IPv6 address",),
        (("fd00:244:1::11", "http/TCP", "family-not-served"),),
    ),
    Case(
        "headless",
        "ignored.yaml",
        ("misc/headless",),
        frozenset({"service-ignored"}),
        phrases=("not handled by pyproxy", "headless (clusterIP: None)"),
        rc=1,
    ),
    Case(
        "external-name",
        "ignored.yaml",
        ("misc/alias",),
        frozenset({"service-ignored"}),
        phrases=("type ExternalName",),
        rc=1,
    ),
    Case(
        "other-proxy",
        "ignored.yaml",
        ("misc/foreign",),
        frozenset({"service-ignored"}),
        phrases=("service.kubernetes.io/service-proxy-name=other-proxy",),
        rc=1,
    ),
    Case(
        "invalid-service",
        "ignored.yaml",
        ("misc/broken",),
        frozenset({"service-ignored"}),
        phrases=("invalid and skipped: spec.clusterIPs[0]",),
        rc=1,
    ),
    Case(
        "not-found",
        "ignored.yaml",
        ("elsewhere",),
        frozenset({"service-not-found"}),
        phrases=("no Service default/elsewhere", "found in namespace(s) other: use --namespace"),
        rc=1,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_explain(case: Case) -> None:
    rc, text = run_explain(case.state, *case.argv)
    rc_json, raw = run_explain(case.state, *case.argv, "-o", "json")
    assert (rc, rc_json) == (case.rc, case.rc), text
    data = json.loads(raw)

    assert {d["code"] for d in data["diagnoses"]} == case.codes, text
    outcomes = connection_outcomes(data)
    for key, outcome in case.outcomes.items():
        assert outcomes.get(key) == outcome, (key, outcomes, text)
    for phrase in case.phrases:
        assert phrase in text, f"{phrase!r} not in:\n{text}"
    for address, port, code in case.endpoint_codes:
        uses = [
            p["internal"]
            for e in data["endpoints"]
            if e["address"] == address
            for p in e["ports"]
            if p["service_port"] == port
        ]
        assert [u["code"] for u in uses] == [code], (address, port, uses)
    assert "\x1b[" not in text  # piped: no colour

    golden = GOLDEN / f"{case.id}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(raw)
        # An update run never passes: the rewrite must be reviewed and recorded first
        # (tests/unit/test_golden_review.py, hack/review_golden.py).
        pytest.fail(f"rewrote {golden.name}: review it, then hack/review_golden.py {golden}")
    assert golden.exists(), f"{golden} missing: run with UPDATE_GOLDEN=1 and review it"
    assert json.loads(golden.read_text()) == data, f"{golden.name} differs (UPDATE_GOLDEN=1)"


def test_every_rejected_or_dropped_connection_names_the_rule() -> None:
    for case in CASES:
        _, raw = run_explain(case.state, *case.argv, "-o", "json")
        for c in json.loads(raw)["connections"]:
            if c["outcome"] in ("rejected", "dropped"):
                assert c["decided_by"].startswith("filter/"), (case.id, c)
                assert c["rule"].startswith("-A "), (case.id, c)
                assert c["decided_by"] in c["reason"], (case.id, c)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tracing_only_the_rules_that_can_match_changes_nothing(case: Case) -> None:
    objects = read_objects(GOLDEN / case.state)
    cluster, problems = state_from_objects(objects)
    args = explain_cli.explain_parser().parse_args([*case.argv, *state_args(case.state)])
    options = parse_options(args.proxy_argv)
    namespace, _, name = args.service.rpartition("/")
    service = NamespacedName(namespace or args.namespace or "default", name)
    configs = explain_cli.node_configs(options, cluster)

    def run(complete: bool) -> dict[str, object]:
        return explain_service(
            cluster,
            configs,
            service,
            port=args.port,
            protocol=args.protocol,
            source=args.source,
            problems=problems,
            complete=complete,
        ).to_json()

    assert run(complete=False) == run(complete=True)


def test_every_misconfiguration_of_the_issue_is_recognised() -> None:
    covered = {code for case in CASES for code in case.codes}
    assert {
        Code.SELECTOR_MATCHES_NO_PODS,
        Code.PORT_NAME_MISMATCH,
        Code.ENDPOINTS_NOT_READY,
        Code.NO_LOCAL_ENDPOINTS,
        Code.SOURCE_RANGE_EXCLUDES_CLIENT,
        Code.PORT_NOT_IN_SERVICE,
        Code.OTHER_IP_FAMILY,
    } <= covered


def test_json_keys_are_the_documented_ones() -> None:
    _, raw = run_explain("policies.yaml", "web/lb-ranges", "-o", "json")
    data = json.loads(raw)
    assert list(data) == [
        "service", "found", "absent_reason", "type", "cluster_ips", "external_ips",
        "load_balancer_ingress", "load_balancer_source_ranges", "external_traffic_policy",
        "internal_traffic_policy", "session_affinity_timeout", "health_check_node_port",
        "traffic_distribution", "selector", "ports", "node", "source", "endpoint_slices",
        "endpoints", "policy", "connections", "diagnoses",
    ]  # fmt: skip
    assert list(data["connections"][0]) == [
        "kind", "family", "address", "port", "protocol", "service_port", "source",
        "source_kind", "from_node", "outcome", "reason", "endpoints", "masquerade",
        "masquerade_reason", "decided_by", "rule", "path", "warnings", "notes",
    ]  # fmt: skip
    _, raw = run_explain("ignored.yaml", "misc/headless", "-o", "json")
    assert list(json.loads(raw))[:3] == ["service", "found", "absent_reason"]


def test_terminal_output_has_tables_and_colour() -> None:
    objects = read_objects(GOLDEN / "policies.yaml")
    cluster, problems = state_from_objects(objects)
    options = parse_options(state_args("policies.yaml")[2:])
    name = NamespacedName("web", "lb-local")
    ex = explain_service(
        cluster,
        proxier_configs(options, cluster.nodes.get("node-a"), ()),
        name,
        source="198.51.100.7",
        extras=service_extras(objects, name),
        problems=problems,
    )
    text = format_explanation(ex, Style(color=True, tables=True))
    assert "\x1b[31;1mdropped\x1b[0m" in text
    lines = text.splitlines()
    header = next(line for line in lines if "ADDRESS" in line)
    for column in ("NODE", "ZONE", "READY", "SERVING", "TERMINATING", "CLUSTER IP", "EXTERNAL"):
        assert column in header
    assert any(line.lstrip().startswith("TO") or "TO\x1b" in line for line in lines)
    row = next(line for line in lines if line.startswith("  10.244.2.10"))
    assert "not used\x1b[0m: other node (Local)" in row
    assert "    10.244.2.10 external\x1b[0m: on node node-b" in text.replace("\x1b[2m", "")
    plain = format_explanation(ex)
    assert "\x1b[" not in plain
    assert "ADDRESS" not in plain
    assert "endpoint 10.244.2.10 (node node-b, zone zone-b" in plain


def test_outcome_without_rule_has_no_decider() -> None:
    _, raw = run_explain("policies.yaml", "web/np", "--port", "8080", "-o", "json")
    connections = json.loads(raw)["connections"]
    assert {c["outcome"] for c in connections} == {Outcome.NOT_HANDLED}
    assert {c["decided_by"] for c in connections} == {None}


# --- flags and loading -------------------------------------------------------------------


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert explain_cli.main(["web", "--cluster-cidr", "nonsense", "--state", "x"]) == 2
    assert "--cluster-cidr" in capsys.readouterr().err
    assert explain_cli.main(["web", "--state", "a", "--kubeconfig", "b"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        explain_cli.main(["web", "--from", "not-an-ip", "--state", "x"])
    assert exc.value.code == 2
    assert explain_cli.run([]) == 2
    assert explain_cli.run(["frobnicate"]) == 2


def test_unreadable_state_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("items: [\n")
    assert explain_cli.main(["web", "--state", str(bad), "--node-ip", "10.0.0.1"]) == 1
    assert "cannot parse state file" in capsys.readouterr().err


def test_namespace_forms() -> None:
    rc, text = run_explain("policies.yaml", "np", "-n", "web")
    assert rc == 0
    assert "Service web/np (NodePort)" in text
    out = io.StringIO()
    rc = explain_cli.main(["web/np", "-n", "other", *state_args("policies.yaml")], stdout=out)
    assert rc == 2


def test_service_extras_reads_selector_and_target_ports() -> None:
    objects = read_objects(GOLDEN / "endpoints.yaml")
    extras = service_extras(objects, NamespacedName("shop", "wrong-port"))
    assert extras.selector == {"app": "web"}
    assert extras.target_ports == {("http", Protocol.TCP): "web", ("metrics", Protocol.TCP): "9090"}
    assert extras.absent_reason is None
    manual = service_extras(objects, NamespacedName("shop", "manual"))
    assert manual.selector == {}
    assert service_extras(objects, NamespacedName("shop", "nope")).selector is None


class _Response:
    def __init__(self, status: int, body: object) -> None:
        self.status = status
        self._body = json.dumps(body).encode()
        self.released = False

    def read(self) -> bytes:
        return self._body

    def release_conn(self) -> None:
        self.released = True


class _Api:
    def __init__(self, pages: Sequence[_Response]) -> None:
        self.pages = list(pages)
        self.calls: list[dict[str, str]] = []

    def get(self, path: str, params: Mapping[str, str], *, read_timeout: float) -> _Response:
        self.calls.append({"path": path, **params})
        return self.pages.pop(0)


def test_one_shot_list_pages_and_restores_kind() -> None:
    api = _Api(
        [
            _Response(
                200,
                {
                    "items": [{"metadata": {"name": "a"}}],
                    "metadata": {"resourceVersion": "7", "continue": "t"},
                },
            ),
            _Response(
                200, {"items": [{"metadata": {"name": "b"}}], "metadata": {"resourceVersion": "7"}}
            ),
        ]
    )
    objects = explain_cli._list_path(api, "/api/v1/services", "Service", "x!=y")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Service", "a"),
        ("Service", "b"),
    ]
    assert api.calls == [
        {"path": "/api/v1/services", "limit": "5000", "labelSelector": "x!=y"},
        {"path": "/api/v1/services", "limit": "5000", "labelSelector": "x!=y", "continue": "t"},
    ]
    forbidden = _Api([_Response(403, {"message": "nodes is forbidden"})])
    with pytest.raises(PyproxyError, match="HTTP 403"):
        explain_cli._list_path(forbidden, "/api/v1/nodes", "Node")
    # Not a list (no metadata.resourceVersion): an error explain reports, not a traceback.
    garbage = _Api([_Response(200, {"items": []})])
    with pytest.raises(PyproxyError, match="malformed list response"):
        explain_cli._list_path(garbage, "/api/v1/nodes", "Node")


# --- drift -------------------------------------------------------------------------------


def _desired(extra_args: Sequence[str] = ()) -> str:
    objects = read_objects(GOLDEN / "policies.yaml")
    cluster, _ = state_from_objects(objects)
    options = parse_options([*state_args("policies.yaml")[2:], *extra_args])
    (config,) = proxier_configs(options, cluster.nodes.get("node-a"), ())
    return desired_document(cluster, config)


def _saved(backend: str) -> str:
    return (GOLDEN / f"policies.{backend}.save").read_text()


def _chains(drift: Sequence[Any]) -> list[tuple[str, str, str]]:
    return [(d.table, d.chain, d.kind) for d in drift]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_untouched_kernel_has_no_drift(backend: str) -> None:
    # iptables-save reorders options, adds /32, --set-xmark, --mask, --rsource, --reject-with
    # and prints probabilities as the kernel stores them: none of that is drift.
    drift = ruleset_drift(_desired(), _saved(backend), IPFamily.IPv4)
    assert drift == (), "stale capture? see the module docstring"


def _sep_with_dnat(saved: str) -> tuple[str, str]:
    line = next(
        line for line in saved.splitlines() if line.startswith("-A KUBE-SEP-") and "DNAT" in line
    )
    return line.split()[1], line


def test_deleted_rule_is_drift_naming_the_chain() -> None:
    saved = _saved("nft")
    chain, line = _sep_with_dnat(saved)
    drift = ruleset_drift(_desired(), saved.replace(line + "\n", ""), IPFamily.IPv4)
    assert _chains(drift) == [("nat", chain, "different")]
    assert drift[0].detail == "1 rule missing"
    (missing,) = drift[0].missing_rules
    assert "DNAT" in missing


def test_added_rule_and_chains_are_drift() -> None:
    saved = _saved("legacy")
    added = saved.replace(
        ":KUBE-SERVICES - [0:0]\n",
        ":KUBE-SERVICES - [0:0]\n:KUBE-SEP-STALE0000000000 - [0:0]\n",
    ).replace(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
        "-A KUBE-SERVICES -d 10.96.1.13/32 -p tcp -m tcp --dport 80 -j REJECT\n",
    )
    drift = ruleset_drift(_desired(), added, IPFamily.IPv4)
    assert _chains(drift) == [
        ("filter", "KUBE-SERVICES", "different"),
        ("nat", "KUBE-SEP-STALE0000000000", "unexpected"),
    ]
    assert drift[0].unexpected_rules == (
        "-A KUBE-SERVICES -d 10.96.1.13/32 -p tcp -m tcp --dport 80 -j REJECT",
    )


def test_missing_chain_and_missing_hook_are_drift() -> None:
    saved = _saved("nft")
    chain, _ = _sep_with_dnat(saved)
    lines = [
        line
        for line in saved.splitlines(keepends=True)
        if chain not in line and not line.startswith("-A PREROUTING")
    ]
    drift = ruleset_drift(_desired(), "".join(lines), IPFamily.IPv4)
    kinds = _chains(drift)
    assert ("nat", chain, "missing") in kinds
    assert ("nat", "PREROUTING", "missing-hook") in kinds
    # The service chain that jumped to the SEP chain lost that rule too.
    assert any(k[1].startswith("KUBE-SVC-") and k[2] == "different" for k in kinds)


def test_changed_flags_show_up_as_drift() -> None:
    drift = ruleset_drift(_desired(["--masquerade-all"]), _saved("nft"), IPFamily.IPv4)
    assert drift
    assert all(d.chain.startswith(("KUBE-SVC-", "KUBE-SVL-")) for d in drift)


def test_kubelets_firewall_chain_is_not_ours_when_we_would_not_write_it() -> None:
    desired = _desired(["--iptables-localhost-nodeports=false"])
    drift = ruleset_drift(desired, _saved("nft"), IPFamily.IPv4)
    # Only the hooks and the NodePort jump change; KUBE-FIREWALL itself is left to kubelet.
    assert all(d.chain != "KUBE-FIREWALL" for d in drift)
    assert ("nat", "KUBE-SERVICES", "different") in _chains(drift)


@pytest.mark.parametrize(
    ("ours", "saved"),
    [
        ("-A X -j MARK --or-mark 0x4000", "-A X -j MARK --set-xmark 0x4000/0x4000"),
        ("-A X -j MARK --xor-mark 0x4000", "-A X -j MARK --set-xmark 0x4000/0x0"),
        (
            "-A X -d 10.0.0.1 -j REJECT",
            "-A X -d 10.0.0.1/32 -j REJECT --reject-with icmp-port-unreachable",
        ),
        (
            "-A X -m comment --comment a -m tcp -p tcp --dport 80 -j Y",
            "-A X -p tcp -m comment --comment a -m tcp --dport 80 -j Y",
        ),
        (
            "-A X -m statistic --mode random --probability 0.3333333333 -j Y",
            "-A X -m statistic --mode random --probability 0.33333333349 -j Y",
        ),
        (
            "-A X -m recent --name Y --rcheck --seconds 10800 --reap -j Y",
            "-A X -m recent --rcheck --seconds 10800 --reap --name Y"
            " --mask 255.255.255.255 --rsource -j Y",
        ),
    ],
)
def test_normalize_rule_spellings(ours: str, saved: str) -> None:
    assert normalize_rule(parse_rule(ours), IPFamily.IPv4) == normalize_rule(
        parse_rule(saved), IPFamily.IPv4
    )


def test_normalize_rule_keeps_real_differences() -> None:
    a = normalize_rule(parse_rule("-A X -d 10.0.0.1 -j Y"), IPFamily.IPv4)
    assert a != normalize_rule(parse_rule("-A X -d 10.0.0.2 -j Y"), IPFamily.IPv4)
    assert a != normalize_rule(parse_rule("-A X ! -d 10.0.0.1 -j Y"), IPFamily.IPv4)
    p = normalize_rule(parse_rule("-A X -m statistic --probability 0.5 -j Y"), IPFamily.IPv4)
    assert p != normalize_rule(
        parse_rule("-A X -m statistic --probability 0.25 -j Y"), IPFamily.IPv4
    )


# --- trace over saved rules ---------------------------------------------------------------


def test_trace_saved_rules_path_and_verdict() -> None:
    report = trace_saved(
        _saved("nft"),
        src="10.244.1.50",
        dst="10.96.1.13",
        port=80,
        local_ips=["10.1.0.2", "10.1.1.2"],
        desired_text=_desired(),
    )
    assert report.trace.verdict == "DNAT"
    assert [b.endpoint for b in report.trace.branches] == ["10.244.1.13:8080", "10.244.2.13:8080"]
    assert report.path[:3] == ("nat/PREROUTING", "nat/KUBE-SERVICES", report.path[2])
    assert report.path[2].startswith("nat/KUBE-SVC-")
    assert report.drift == ()
    text = format_packet_report(report, source="iptables-nft-save")
    assert "verdict: DNAT -> 10.244.1.13:8080 (50%), 10.244.2.13:8080 (50%)" in text
    assert "drift: none" in text
    data = report.to_json()
    assert (data["verdict"], data["ctstate"]) == ("DNAT", "NEW")
    assert data["drift"] == {"checked": True, "chains": []}


def test_trace_saved_reject_and_drift_warning() -> None:
    saved = _saved("nft")
    chain, line = _sep_with_dnat(saved)
    report = trace_saved(
        saved.replace(line + "\n", ""),
        src="198.51.100.7",
        dst="10.96.1.15",
        port=80,
        local_ips=["10.1.0.2"],
        desired_text=_desired(),
    )
    assert report.trace.verdict == "REJECT"
    assert report.path[-1] == "filter/KUBE-SERVICES"
    text = format_packet_report(report)
    assert f"differ from what pyproxy would program now in nat/{chain}" in text
    assert "warning: drift" in text
    # Missing rules are shown as pyproxy would write them.
    missing = next(t for t in text.splitlines() if t.startswith(f"    - -A {chain} "))
    assert line.split("--to-destination ")[1] in missing


def test_trace_saved_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match="different IP families"):
        trace_saved(_saved("nft"), src="fd00::1", dst="10.96.1.13", port=80)


def test_trace_without_state_says_drift_not_checked() -> None:
    report = trace_saved(_saved("nft"), src="10.244.1.50", dst="10.1.0.2", port=30113)
    assert report.drift is None
    assert "drift: not checked" in format_packet_report(report)
    assert report.to_json()["drift"] is None


def test_a_colliding_service_is_traced_too() -> None:
    """Another Service's externalIP on the node IP, with our nodePort as its port, catches our
    NodePort traffic first (KUBE-SERVICES before KUBE-NODEPORTS): explain must show it."""

    def svc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "Service", "metadata": {"namespace": "x", "name": name}, "spec": spec}

    def eps(name: str, ip: str) -> dict[str, Any]:
        return {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "x",
                "name": f"{name}-1",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "nodeName": "node-a"}],
        }

    port = [{"name": "http", "port": 80, "nodePort": 30200}]
    cluster, problems = state_from_objects(
        [
            svc("mine", {"type": "NodePort", "clusterIPs": ["10.96.5.1"], "ports": port}),
            eps("mine", "10.244.1.1"),
            svc(
                "squatter",
                {
                    "clusterIPs": ["10.96.5.2"],
                    "externalIPs": ["10.1.0.2"],
                    "ports": [{"name": "http", "port": 30200}],
                },
            ),
            eps("squatter", "10.244.1.2"),
            *(
                svc(f"other{i}", {"clusterIPs": [f"10.96.6.{i}"], "ports": port[:1]})
                for i in range(5)
            ),
        ]
    )
    assert problems == []
    options = parse_options(["--hostname-override", "node-a", "--node-ip", "10.1.0.2"])
    configs = proxier_configs(options, None, ())
    name = NamespacedName("x", "mine")
    partial = explain_service(cluster, configs, name, source="198.51.100.1")
    assert (
        partial.to_json()
        == explain_service(cluster, configs, name, source="198.51.100.1", complete=True).to_json()
    )
    node_port = next(c for c in partial.connections if c.kind == "NodePort")
    assert [e.endpoint for e in node_port.endpoints] == ["10.244.1.2:8080"]
    assert node_port.trace is not None
    jump = next(
        s for s in node_port.trace.steps if s.chain == "KUBE-SERVICES" and s.action == "jumped"
    )
    assert '"x/squatter:http external IP"' in jump.rule
