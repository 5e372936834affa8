"""The real iptables-restore accepts every document pyproxy renders.

Spec: issue 2 "property tests (hypothesis) that for random valid states every rendered ruleset
is accepted by the real iptables-restore --test (and ip6tables-restore --test)". The document is
exactly what `--once` would write on an empty node: the ruleset plus the hooks in the built-in
chains (`ruleset.document(hooks=jump_rules(config))`). Both the nft and the legacy variants are
asked, inside one throwaway network namespace per module (`--test` changes nothing, so many
states share it). Needs root: fails without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from kernel_netns import BACKENDS, netns, run_in, tool
from strategies import RandomState, random_states
from support import GOLDEN_DIR, cluster_of, golden_args, load_objects

from pyproxy.iptables.render import render_ruleset
from pyproxy.iptables.vocabulary import jump_rules
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import desired_state

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


def documents(objects: list[dict[str, object]], args: list[str]) -> dict[str, str]:
    """Per family, the iptables-restore input `pyproxy --once` writes on an empty node."""
    options = parse_options(["--dry-run", *args])
    cluster = cluster_of(objects)
    out = {}
    for config in proxier_configs(options, None, ()):
        ports = [p for ports in desired_state(cluster, config).values() for p in ports]
        ruleset = render_ruleset(ports, config)
        out[config.family.value] = ruleset.document(hooks=jump_rules(config))
    return out


def assert_accepted(ns: str, family: str, document: str) -> None:
    for backend in BACKENDS:
        cp = run_in(
            ns, [tool(backend, family, "restore"), "--test", "--noflush"], document, check=False
        )
        assert cp.returncode == 0, (
            f"{tool(backend, family, 'restore')} rejected:\n{cp.stderr}\n"
            + _numbered(document, cp.stderr)
        )


def _numbered(document: str, stderr: str) -> str:
    lines = document.splitlines()
    for word in stderr.split():
        if word.isdigit() and 0 < int(word) <= len(lines):
            n = int(word)
            return "\n".join(
                f"{i}: {lines[i - 1]}" for i in range(max(1, n - 2), min(len(lines), n + 2) + 1)
            )
    return ""


def test_the_restore_test_mode_does_reject_bad_input(ns: str) -> None:
    """Negative control: `--test` really validates rule options, so acceptance means something."""
    bad = (
        "*nat\n:KUBE-X - [0:0]\n"
        "-A KUBE-X -m recent --name A --rcheck --seconds abc -j RETURN\nCOMMIT\n"
    )
    for family in ("IPv4", "IPv6"):
        for backend in BACKENDS:
            cp = run_in(
                ns, [tool(backend, family, "restore"), "--test", "--noflush"], bad, check=False
            )
            assert cp.returncode != 0, tool(backend, family, "restore")


@pytest.mark.parametrize("state", sorted(p.stem for p in GOLDEN_DIR.glob("*.yaml")))
def test_golden_states_are_accepted(ns: str, state: str) -> None:
    path = GOLDEN_DIR / f"{state}.yaml"
    variants = [
        line.partition(":")[2].split()
        for line in path.read_text().splitlines()
        if line.startswith("# variant ")
    ] or [[]]
    for extra in variants:
        for family, document in documents(load_objects(path), [*golden_args(path), *extra]).items():
            assert_accepted(ns, family, document)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_random_states_are_accepted(ns: str, state: RandomState) -> None:
    for family, document in documents(state.objects, state.args).items():
        assert_accepted(ns, family, document)
