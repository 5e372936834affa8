"""What is in the kernel now, read from `iptables-save`, and the restore input that follows.

Pure: it takes save text and returns restore text. It answers the three questions the apply step
has: which of our hooks in built-in chains are missing, which service chains are stale, and (for
`--cleanup`) how to remove everything pyproxy created and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.iptables.vocabulary import (
    FILTER_CHAINS,
    KUBE_FIREWALL,
    KUBE_PROXY_CANARY,
    KUBELET_CANARY,
    NAT_CHAINS,
    JumpRule,
    is_service_chain,
    split_words,
)


@dataclass(frozen=True, slots=True)
class SavedRule:
    chain: str
    spec: str
    target: str | None
    comment: str | None


def _parse_rule(line: str) -> SavedRule | None:
    words = split_words(line)
    if len(words) < 2 or words[0] != "-A":
        return None
    target = comment = None
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "-g", "--jump", "--goto"):
            target = words[i + 1]
        elif word == "--comment":
            comment = words[i + 1]
    return SavedRule(words[1], line.split(None, 2)[2] if len(words) > 2 else "", target, comment)


@dataclass(frozen=True, slots=True)
class TableView:
    chains: frozenset[str] = frozenset()
    rules: tuple[SavedRule, ...] = ()


@dataclass(frozen=True, slots=True)
class KernelView:
    """The tables of one family as iptables-save printed them."""

    tables: Mapping[str, TableView] = field(default_factory=dict)

    @staticmethod
    def from_save(
        text: str, *, skip_rules_of: Callable[[str, str], bool] | None = None
    ) -> KernelView:
        """Parse iptables-save text. `skip_rules_of(table, chain)` true: that chain is still
        listed but its rules are not kept (a full sync only needs the names of the service
        chains, and at 10,000 Services their 170,000 rules cost a second and ~80 MB)."""
        tables: dict[str, tuple[set[str], list[SavedRule]]] = {}
        current: tuple[set[str], list[SavedRule]] | None = None
        table = ""
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("*"):
                table = line[1:]
                current = tables.setdefault(table, (set(), []))
            elif current is None or not line or line.startswith("#"):
                continue
            elif line.startswith(":"):
                current[0].add(line[1:].split()[0])
            elif line.startswith("-A "):
                if skip_rules_of is not None:
                    chain = line[3:].split(None, 1)[0] if len(line) > 3 else ""
                    if skip_rules_of(table, chain):
                        continue
                rule = _parse_rule(line)
                if rule is not None:
                    current[1].append(rule)
        return KernelView(
            {name: TableView(frozenset(c), tuple(r)) for name, (c, r) in tables.items()}
        )

    def table(self, name: str) -> TableView:
        return self.tables.get(name, TableView())

    def service_chains(self) -> frozenset[str]:
        return frozenset(c for c in self.table("nat").chains if is_service_chain(c))

    def has_hook(self, hook: JumpRule) -> bool:
        return any(
            r.chain == hook.chain
            and r.target == hook.target
            and r.comment == (hook.comment or None)
            for r in self.table(hook.table).rules
        )

    def missing_hooks(self, hooks: Iterable[JumpRule]) -> tuple[JumpRule, ...]:
        return tuple(h for h in hooks if not self.has_hook(h))


def _ours(table: str, view: TableView, kubelet_present: bool) -> set[str]:
    fixed = {"filter": FILTER_CHAINS, "nat": NAT_CHAINS}.get(table, ())
    chains = {c for c in view.chains if c in fixed or (table == "nat" and is_service_chain(c))}
    if KUBE_PROXY_CANARY in view.chains:
        chains.add(KUBE_PROXY_CANARY)
    if table == "filter" and KUBE_FIREWALL in view.chains and not kubelet_present:
        chains.add(KUBE_FIREWALL)
    return chains


def cleanup_document(view: KernelView, hooks: Iterable[JumpRule]) -> str:
    """Restore input removing what pyproxy created: our hooks in built-in chains are deleted and
    our chains flushed, then deleted unless a foreign rule still jumps to one (deleting it would
    fail the whole restore; flushed, it does nothing)."""
    kubelet_present = any(KUBELET_CANARY in t.chains for t in view.tables.values())
    parts: list[str] = []
    for table in ("filter", "nat", "mangle"):
        tview = view.tables.get(table)
        if tview is None:
            continue
        ours = _ours(table, tview, kubelet_present)
        hook_rules = [
            h for h in hooks if h.table == table and h.target in ours and view.has_hook(h)
        ]
        hook_keys = {(h.chain, h.target, h.comment or None) for h in hook_rules}
        foreign_refs = {
            r.target
            for r in tview.rules
            if r.chain not in ours and (r.chain, r.target, r.comment) not in hook_keys
        }
        if not ours:
            continue
        parts.append(f"*{table}\n")
        parts.extend(f":{c} - [0:0]\n" for c in sorted(ours))
        parts.extend(f"-D {h.chain} {h.spec}\n" for h in hook_rules)
        parts.extend(f"-X {c}\n" for c in sorted(ours - foreign_refs))
        parts.append("COMMIT\n")
    return "".join(parts)
