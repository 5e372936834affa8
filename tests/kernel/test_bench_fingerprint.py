"""The benchmark's clock (bench/node.py `Rules.token`) against the real kernel.

bench/README.md says when the clock stops: the last change of a fingerprint of every table a
proxy writes (filter and nat) in every family it serves. These tests check the fingerprint
does what that text claims, in a throwaway namespace: with legacy it moves when any of the four
tables gains a rule and stays put when a table is rewritten with the same rules; with nft the
generation moves on every commit, also one of unchanged rules.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from bench.node import Rules

pytestmark = pytest.mark.kernel


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"pyproxy-fp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def _restore(netns: str, tool: str, document: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, tool, "--noflush"], input=document, text=True, check=True
    )


def _chain(table: str, name: str, rules: int, prefix: str = "10.0.0.") -> str:
    lines = [f"*{table}", f":{name} - [0:0]"]
    lines += [f"-A {name} -s {prefix}{k} -j RETURN" for k in range(1, rules + 1)]
    return "\n".join([*lines, "COMMIT", ""])


def test_legacy_fingerprint_moves_with_every_table_and_family(netns: str) -> None:
    rules = Rules(netns, "legacy", ("ipv4", "ipv6"))
    try:
        seen = [rules.token()]
        for tool, table, prefix in [
            ("iptables-legacy-restore", "filter", "10.0.0."),
            ("iptables-legacy-restore", "nat", "10.0.0."),
            ("ip6tables-legacy-restore", "filter", "fd00::"),
            ("ip6tables-legacy-restore", "nat", "fd00::"),
        ]:
            _restore(netns, tool, _chain(table, "KUBE-BENCH-TEST", 2, prefix))
            seen.append(rules.token())
        assert len(set(seen)) == 5, seen  # each of the four writes changed it
        # The same rules again: content unchanged, so the fingerprint too.
        _restore(netns, "iptables-legacy-restore", _chain("nat", "KUBE-BENCH-TEST", 2))
        assert rules.token() == seen[-1]
        # One rule more in an existing chain: changed.
        _restore(netns, "iptables-legacy-restore", _chain("nat", "KUBE-BENCH-TEST", 3))
        assert rules.token() != seen[-1]
    finally:
        rules.close()


def test_nft_generation_moves_on_every_commit(netns: str) -> None:
    rules = Rules(netns, "nft", ("ipv4", "ipv6"))
    try:
        first = rules.token()
        assert first[0] is not None
        _restore(netns, "iptables-nft-restore", _chain("filter", "KUBE-BENCH-TEST", 1))
        second = rules.token()
        _restore(netns, "iptables-nft-restore", _chain("filter", "KUBE-BENCH-TEST", 1))
        third = rules.token()
        _restore(netns, "ip6tables-nft-restore", _chain("nat", "KUBE-BENCH-TEST", 1, "fd00::"))
        assert len({first, second, third, rules.token()}) == 4
    finally:
        rules.close()
