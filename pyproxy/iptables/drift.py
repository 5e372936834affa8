"""Drift: the rules pyproxy would program against `iptables-save` output, chain by chain.

Both sides are parsed with `restore_text`, so what only differs in spelling does not count:
counters, option order, and iptables-save's own spellings such as `/32`, `--set-xmark`,
`--mask`, `--reject-with`. Only pyproxy's chains and its jumps from the built-in chains are
compared; other software's rules are not drift. `pyproxy trace` reports it. Pure: no I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pyproxy.iptables.restore_text import (
    AddressMatch,
    MarkTarget,
    PortMatch,
    RecentMatch,
    Rule,
    Statistic,
    Table,
    parse_ruleset,
)
from pyproxy.iptables.vocabulary import is_service_chain
from pyproxy.model import IPFamily


@dataclass(frozen=True, slots=True)
class ChainDrift:
    """One chain whose kernel rules differ from what pyproxy would program."""

    table: str
    chain: str
    kind: str  # "missing", "unexpected", "different", "missing-hook"
    detail: str
    missing_rules: tuple[str, ...] = ()  # pyproxy would write these; the kernel lacks them
    unexpected_rules: tuple[str, ...] = ()  # the kernel has these; pyproxy would not write them

    def to_json(self) -> dict[str, object]:
        return {
            "table": self.table,
            "chain": self.chain,
            "kind": self.kind,
            "detail": self.detail,
            "missing_rules": list(self.missing_rules),
            "unexpected_rules": list(self.unexpected_rules),
        }


_PROTOCOL_MODULES = frozenset({"tcp", "udp", "sctp", "udplite", "comment"})
_ALL_ONES = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}


def _norm_address(match: AddressMatch | None) -> AddressMatch | None:
    if match is None:
        return None
    nets = match.networks
    if nets is None:
        return match
    return AddressMatch(",".join(str(n) for n in nets), match.negated)


def _norm_ports(match: PortMatch | None) -> PortMatch | None:
    if match is None:
        return None
    return PortMatch("", match.ranges, match.negated)


def _norm_statistic(stat: Statistic | None) -> Statistic | None:
    if stat is None:
        return None
    probability = stat.probability
    if probability is not None:
        # The kernel keeps probability * 2^31 as an integer; iptables-save prints it back
        # with 11 decimals, so 0.3333333333 comes back as 0.33333333349.
        with contextlib.suppress(ValueError):
            probability = str(round(float(probability) * 0x80000000))
    return Statistic(stat.mode, probability, stat.every, stat.packet)


def _norm_recent(recent: RecentMatch | None) -> RecentMatch | None:
    if recent is None:
        return None
    mask = recent.mask
    if mask is not None and mask in _ALL_ONES.values():
        mask = None
    return dataclasses.replace(recent, mask=mask)


def _norm_mark_target(target: MarkTarget | None) -> MarkTarget | None:
    """Every MARK spelling as the kernel's (value, mask) pair: new = (old & ~mask) ^ value."""
    if target is None:
        return None
    full = 0xFFFFFFFF
    if target.op == "or":
        return MarkTarget("set-xmark", target.value, target.value)
    if target.op == "xor":
        return MarkTarget("set-xmark", target.value, 0)
    if target.op == "and":
        return MarkTarget("set-xmark", 0, ~target.value & full)
    if target.op == "set-mark":
        return MarkTarget("set-xmark", target.value, (target.mask | target.value) & full)
    return target


def normalize_rule(rule: Rule, family: IPFamily) -> Rule:
    """`rule` with everything iptables-save may spell differently made canonical."""
    reject_with = rule.reject_with
    if rule.target == "REJECT" and reject_with is None:
        reject_with = (
            "icmp-port-unreachable" if family is IPFamily.IPv4 else "icmp6-port-unreachable"
        )
    return dataclasses.replace(
        rule,
        raw="",
        source=_norm_address(rule.source),
        destination=_norm_address(rule.destination),
        dport=_norm_ports(rule.dport),
        sport=_norm_ports(rule.sport),
        statistic=_norm_statistic(rule.statistic),
        recent=_norm_recent(rule.recent),
        set_mark=_norm_mark_target(rule.set_mark),
        reject_with=reject_with,
        modules=tuple(sorted(set(rule.modules) - _PROTOCOL_MODULES)),
        unknown=tuple(sorted(rule.unknown)),
        unknown_target=tuple(sorted(rule.unknown_target)),
    )


def _our_chains(table: Table, desired: bool) -> set[str]:
    """Chains pyproxy owns in `table`: everything it declares (desired) or, in the kernel, the
    fixed KUBE-* chains and the per-service chains. Built-in chains are checked for our hooks
    only: other software owns the rest of them."""
    builtin = table.builtin_chains
    if desired:
        return {c.name for c in table.chains if c.name not in builtin and not c.deleted}
    return {
        c.name
        for c in table.chains
        if not c.deleted
        and (
            (table.name == "nat" and is_service_chain(c.name))
            or c.name
            in (
                "KUBE-SERVICES",
                "KUBE-EXTERNAL-SERVICES",
                "KUBE-FORWARD",
                "KUBE-NODEPORTS",
                "KUBE-PROXY-FIREWALL",
                "KUBE-POSTROUTING",
                "KUBE-MARK-MASQ",
            )
        )
    }


def _rule_diff(
    want: Sequence[Rule], have: Sequence[Rule], family: IPFamily
) -> tuple[list[str], list[str]]:
    want_n = [normalize_rule(r, family) for r in want]
    have_n = [normalize_rule(r, family) for r in have]
    missing = [w.raw for w, n in zip(want, want_n, strict=True) if n not in have_n]
    unexpected = [h.raw for h, n in zip(have, have_n, strict=True) if n not in want_n]
    return missing, unexpected


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def ruleset_drift(desired_text: str, actual_text: str, family: IPFamily) -> tuple[ChainDrift, ...]:
    """Chains (filter and nat) where the kernel (`actual_text`, iptables-save) differs from what
    pyproxy would program (`desired_text`, see `desired_document`).

    Raises RulesetParseError when either text is not iptables-restore/-save data.
    """
    desired = parse_ruleset(desired_text)
    actual = parse_ruleset(actual_text)
    out: list[ChainDrift] = []
    for table_name in ("filter", "nat"):
        want_table = desired.table(table_name) or Table(table_name)
        have_table = actual.table(table_name) or Table(table_name)
        want = _our_chains(want_table, True)
        # KUBE-FIREWALL is kubelet's too: only ours to check when we would write it.
        have = _our_chains(have_table, False) | {
            n for n in want if (c := have_table.chain(n)) is not None and not c.deleted
        }
        for name in sorted(want | have):
            want_chain = want_table.chain(name)
            have_chain = have_table.chain(name)
            if name not in have or have_chain is None:
                rules = () if want_chain is None else want_chain.lines
                out.append(
                    ChainDrift(
                        table_name,
                        name,
                        "missing",
                        f"chain missing in the kernel ({_plural(len(rules), 'rule')} expected)",
                        missing_rules=tuple(rules),
                    )
                )
                continue
            if name not in want or want_chain is None:
                out.append(
                    ChainDrift(
                        table_name,
                        name,
                        "unexpected",
                        "chain in the kernel that pyproxy would not program (stale, or added by"
                        f" hand; {_plural(len(have_chain.lines), 'rule')})",
                        unexpected_rules=have_chain.lines,
                    )
                )
                continue
            want_rules = [normalize_rule(r, family) for r in want_chain.rules]
            have_rules = [normalize_rule(r, family) for r in have_chain.rules]
            if want_rules == have_rules:
                continue
            missing, unexpected = _rule_diff(want_chain.rules, have_chain.rules, family)
            parts = []
            if missing:
                parts.append(f"{_plural(len(missing), 'rule')} missing")
            if unexpected:
                parts.append(f"{_plural(len(unexpected), 'unexpected rule')}")
            if not parts:
                parts.append(
                    "same rules in another order or number"
                    f" (kernel {len(have_rules)}, pyproxy {len(want_rules)})"
                )
            out.append(
                ChainDrift(
                    table_name,
                    name,
                    "different",
                    ", ".join(parts),
                    tuple(missing),
                    tuple(unexpected),
                )
            )
        # Our jumps from the built-in chains (only their presence: the chains are shared).
        for name in sorted(want_table.builtin_chains):
            want_chain = want_table.chain(name)
            if want_chain is None or not want_chain.lines:
                continue
            have_chain = have_table.chain(name)
            have_rules = (
                [] if have_chain is None else [normalize_rule(r, family) for r in have_chain.rules]
            )
            absent = [
                r.raw for r in want_chain.rules if normalize_rule(r, family) not in have_rules
            ]
            if absent:
                out.append(
                    ChainDrift(
                        table_name,
                        name,
                        "missing-hook",
                        f"{_plural(len(absent), 'jump')} to pyproxy's chains missing",
                        missing_rules=tuple(absent),
                    )
                )
    return tuple(out)
