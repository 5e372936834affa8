"""The streamed sync document holds exactly what the one-piece document holds.

`stream_document` lays the input out differently (nat first, each service port's chains
declared just before its rules, stale chains at the end) so that iptables-restore can parse it
while it is rendered; these tests parse both layouts and require the same chains, each with the
same rules in the same order, the same declarations and deletions, and the same counts. The
real iptables-restore accepting the streamed layout is checked in test_restore_accepts.py, and
a streamed restore into a real kernel in tests/kernel/test_restore_stream.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from strategies import RandomState, random_states
from support import GOLDEN_DIR, cluster_of, golden_args, load_objects

from pyproxy.iptables.render import (
    StreamedRuleset,
    assemble_ruleset,
    is_large_cluster,
    render_service_port,
    stream_document,
)
from pyproxy.iptables.restore_text import parse_ruleset
from pyproxy.iptables.vocabulary import jump_rules
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import count_endpoints, desired_state, port_order, service_order

#: Chains an earlier sync left behind: deleted unless still active.
STALE = ("KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB", "NOT-OURS")

Layout = dict[tuple[str, str], tuple[tuple[str, ...], bool, bool]]


def layout(text: str) -> Layout:
    """(table, chain) → (rule lines in order, declared, deleted)."""
    return {
        (table.name, chain.name): (chain.lines, chain.declared, chain.deleted)
        for table in parse_ruleset(text).tables
        for chain in table.chains
    }


def every_other(rendered: list) -> Callable[[object], bool]:  # type: ignore[type-arg]
    written = {id(r) for r in rendered[::2]}
    return lambda rules: id(rules) in written


def check_same(objects: list, args: list[str]) -> int:  # type: ignore[type-arg]
    options = parse_options(["--dry-run", *args])
    compared = 0
    for config in proxier_configs(options, None, ()):
        states = desired_state(cluster_of(objects), config)
        large = is_large_cluster(count_endpoints(states))
        rendered = [
            render_service_port(state, config, large_cluster_mode=large)
            for name in sorted(states, key=service_order)
            for state in sorted(states[name], key=port_order)
        ]
        ruleset = assemble_ruleset(rendered, config)
        # One stale chain that is in fact active must survive in both layouts.
        stale = (*STALE, *sorted(ruleset.active_nat_chains)[:1])
        hooks = jump_rules(config)[::2]
        whole = ruleset.document(stale_chains=stale, hooks=hooks, canary=True)
        summary = StreamedRuleset()
        streamed = "".join(
            stream_document(
                iter(rendered), config, summary, stale_chains=stale, hooks=hooks, canary=True
            )
        )
        assert layout(streamed) == layout(whole)
        assert streamed != whole or not rendered  # it is a different layout
        assert summary.active_nat_chains == ruleset.active_nat_chains
        assert (summary.filter_rules, summary.nat_rules) == (
            ruleset.filter_rules,
            ruleset.nat_rules,
        )
        assert (summary.no_local_internal, summary.no_local_external) == (
            ruleset.no_local_internal,
            ruleset.no_local_external,
        )
        assert len(streamed) == len(whole)

        # A partial sync: every other service port's own chains are left out.
        chosen = every_other(rendered)
        partial = assemble_ruleset(rendered, config, write_chains=chosen)
        summary = StreamedRuleset()
        partial_streamed = "".join(
            stream_document(
                iter(rendered),
                config,
                summary,
                write_chains=chosen,
                stale_chains=stale,
            )
        )
        assert layout(partial_streamed) == layout(partial.document(stale_chains=stale))
        assert summary.active_nat_chains == partial.active_nat_chains
        compared += 1
    return compared


@pytest.mark.parametrize("state", sorted(p.stem for p in GOLDEN_DIR.glob("*.yaml")))
def test_golden_states_stream_to_the_same_rules(state: str) -> None:
    path: Path = GOLDEN_DIR / f"{state}.yaml"
    assert check_same(load_objects(path), golden_args(path)) >= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_random_states_stream_to_the_same_rules(state: RandomState) -> None:
    check_same(state.objects, state.args)
