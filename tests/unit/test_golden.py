"""Golden files: representative cluster states → the exact `pyproxy --dry-run` output.

Each `tests/golden/<name>.yaml` is a state file (what `kubectl get ... -o yaml` prints) whose
`# args:` lines hold the flags, and `# variant <v>: <more flags>` lines name extra renderings.
The expected output is `<name>.rules` (or `<name>.<v>.rules`): written from
reference/kube-proxy.md §b, with `## ` notes at the top saying what was checked by hand.
`UPDATE_GOLDEN=1` rewrites the expected output (keeping the notes) and fails the test, so a
regenerated file is always reviewed before it is committed.

Besides the exact text, every golden is checked for structure (upstream's
checkIPTablesRuleJumps: every jump target exists and is non-empty, every service chain is
used), for byte-identical output when rendered again or from shuffled objects, and
`overall` against upstream's own TestOverallIPTablesRules expected output.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    GOLDEN_DIR,
    golden_args,
    load_objects,
    render,
    review_header,
    sections,
    strip_review_header,
    update_golden_requested,
    without_hooks,
)

from pyproxy.iptables.tracer import Rule, check_jumps, parse_ruleset, sort_ruleset_text
from pyproxy.iptables.vocabulary import is_service_chain


@dataclass(frozen=True)
class GoldenCase:
    state: Path
    variant: str | None
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.state.stem + (f".{self.variant}" if self.variant else "")

    @property
    def expected_path(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.rules"


_VARIANT = re.compile(r"# variant ([\w-]+):(.*)")


def golden_cases() -> list[GoldenCase]:
    cases = []
    for state in sorted(GOLDEN_DIR.glob("*.yaml")):
        base = golden_args(state)
        variants = [
            (m.group(1), shlex.split(m.group(2)))
            for m in map(_VARIANT.match, state.read_text().splitlines())
            if m
        ]
        if not variants:
            cases.append(GoldenCase(state, None, tuple(base)))
        for variant, extra in variants:
            cases.append(GoldenCase(state, variant, (*base, *extra)))
    return cases


CASES = golden_cases()


def rendered(case: GoldenCase) -> str:
    return render(load_objects(case.state), case.args)


def test_every_golden_state_has_expected_output() -> None:
    assert len(CASES) >= 10
    expected = {c.expected_path.name for c in CASES}
    present = {p.name for p in GOLDEN_DIR.glob("*.rules")}
    assert present == expected, "orphan or missing .rules files"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden(case: GoldenCase) -> None:
    actual = rendered(case)
    path = case.expected_path
    if update_golden_requested():
        header = review_header(path.read_text()) if path.exists() else "## UNREVIEWED\n"
        path.write_text(header + actual)
        pytest.fail(f"rewrote {path.name}: review it against reference/kube-proxy.md")
    expected = strip_review_header(path.read_text())
    assert actual == expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_files_are_reviewed(case: GoldenCase) -> None:
    header = review_header(case.expected_path.read_text())
    assert header.startswith("## Reviewed"), "a golden file needs its review notes"
    assert "UNREVIEWED" not in header


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_structure(case: GoldenCase) -> None:
    """Upstream checkIPTablesRuleJumps on each family's restore input (without the hooks in
    built-in chains, like upstream's iptablesData); the hooks only jump to declared chains."""
    expected = strip_review_header(case.expected_path.read_text())
    for family, text in sections(expected).items():
        assert check_jumps(parse_ruleset(without_hooks(text))) == [], family
        with_hooks = check_jumps(parse_ruleset(text))
        assert [p for p in with_hooks if "not created" in p or "not used" in p] == [], family


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_output_is_deterministic(case: GoldenCase) -> None:
    objects = load_objects(case.state)
    first = render(objects, case.args)
    assert render(objects, case.args) == first
    for seed in range(3):
        shuffled = list(objects)
        random.Random(seed).shuffle(shuffled)  # noqa: S311 - test input order, not crypto
        assert render(shuffled, case.args) == first, f"differs with objects shuffled (seed {seed})"


# --- overall vs upstream's own expected output -----------------------------------------------

# Upstream's own expected output for the same six Services (see the file's header).
UPSTREAM_OVERALL = GOLDEN_DIR / "upstream-TestOverallIPTablesRules.txt"


def test_overall_matches_upstream_expected_output() -> None:
    """The six Services of upstream's TestOverallIPTablesRules give upstream's exact rules
    (compared after upstream's own sorting, since upstream's Service order is random)."""
    objects = [
        o
        for o in load_objects(GOLDEN_DIR / "overall.yaml")
        if o["metadata"]["namespace"] in {"ns1", "ns2", "ns3", "ns4", "ns5", "ns6"}
    ]
    out = render(objects, golden_args(GOLDEN_DIR / "overall.yaml"))
    ours = without_hooks(sections(out)["IPv4"])
    assert sort_ruleset_text(ours) == sort_ruleset_text(UPSTREAM_OVERALL.read_text())


# --- chain names re-derived from the comments ------------------------------------------------


def _reference_hash(text: str) -> str:
    """reference §b: base32(sha256(text))[:16]."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _suffix(chain: str) -> str:
    return chain.split("-", 2)[2]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_chain_names_follow_the_reference_formula(case: GoldenCase) -> None:
    """Every per-service chain name equals the reference formula applied to the service port
    name, protocol (and endpoint) that the rule's own comment and match name."""
    expected = strip_review_header(case.expected_path.read_text())
    checked = 0
    for text in sections(expected).values():
        ruleset = parse_ruleset(without_hooks(text))
        for table in ruleset.tables:
            for chain in table.chains:
                for rule in chain.rules:
                    checked += _check_names(table.name, chain.name, rule)
    assert checked > 0


def _check_names(table: str, chain: str, rule: Rule) -> int:
    comment, target = rule.comment, rule.target
    proto = rule.protocol.value if rule.protocol is not None else None
    if comment is None:
        return 0
    if table == "filter" and " traffic not accepted by " in comment:
        spn, _, fw = comment.partition(" traffic not accepted by ")
        assert fw == f"KUBE-FW-{_reference_hash(spn + str(proto))}", rule.raw
        return 1
    if table != "nat" or target is None:
        return 0
    if chain in ("KUBE-SERVICES", "KUBE-NODEPORTS") and is_service_chain(target):
        spn = comment
        for kind in (" cluster IP", " external IP", " loadbalancer IP"):
            spn = spn.removesuffix(kind)
        assert _suffix(target) == _reference_hash(spn + str(proto)), rule.raw
        return 1
    if chain.startswith("KUBE-SEP-") and rule.to_destination is not None:
        expected = _reference_hash(comment + str(proto) + rule.to_destination)
        assert _suffix(chain) == expected, rule.raw
        return 1
    if " -> " in comment and target.startswith("KUBE-SEP-"):
        spn, _, endpoint = comment.partition(" -> ")
        protos = [p for p in ("tcp", "udp", "sctp") if _reference_hash(spn + p) == _suffix(chain)]
        assert len(protos) == 1, rule.raw
        assert _suffix(target) == _reference_hash(spn + protos[0] + endpoint), rule.raw
        return 1
    return 0
