"""The nft adapter: one `nft -f -` transaction at a time, and cheap name listings.

The only module that runs the `nft` binary for nftables mode. Like upstream's knftables it
speaks the nft language (no netlink bytecode of our own): a transaction is text, applied
atomically by one `nft -f -`. A rejected transaction becomes an NftError carrying the input
lines nft complained about (`/dev/stdin:LINE:COL: Error: ...`).

Listings are names only (`nft -j list chains|sets <family>`, no rules, no elements), so their
cost does not grow with the number of endpoints; the proxier needs them only at start and
after a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pyproxy.errors import KernelError, NftError

_ERROR_LINE = re.compile(r"^/dev/stdin:(\d+):", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class TableNames:
    """Names of the chains and sets (not maps) of one table, as the kernel has them."""

    exists: bool
    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    #: Each set's element timeout in seconds (None without one): an affinity set whose
    #: timeout is already right is kept, with the client addresses it holds.
    set_timeouts: Mapping[str, int | None] = field(default_factory=dict)


class Nft:
    """`nft` for one family (`ip` or `ip6`) and one table."""

    def __init__(self, family: str, table: str, command: Sequence[str] = ("nft",)) -> None:
        """`command` runs nft; tests prefix it (`ip netns exec NS nft`) to work in a netns."""
        self.family = family
        self.table = table
        self.command = tuple(command)

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self.command, *argv], input=stdin, capture_output=True, text=True, check=False
            )
        except OSError as err:
            raise KernelError(f"cannot run {self.command[0]}: {err}") from err

    def run(self, transaction: str) -> None:
        """Apply `transaction` (nft -f syntax) atomically; NftError if nft rejects it."""
        cp = self._run(["-f", "-"], transaction)
        if cp.returncode != 0:
            lines = transaction.splitlines()
            offending = tuple(
                lines[n - 1]
                for n in sorted({int(m) for m in _ERROR_LINE.findall(cp.stderr)})
                if 0 < n <= len(lines)
            )
            raise NftError(f"nft -f failed: {cp.stderr.strip()[:2000]}", offending)

    def check(self, transaction: str) -> bool:
        """`nft --check -f -`: would the kernel accept it (nothing is applied)."""
        return self._run(["--check", "-f", "-"], transaction).returncode == 0

    def _objects(self, what: str) -> list[dict[str, object]]:
        cp = self._run(["-j", "-t", "list", what, self.family])
        if cp.returncode != 0:
            raise KernelError(f"nft list {what} {self.family} failed: {cp.stderr.strip()}")
        try:
            doc = json.loads(cp.stdout or "{}")
        except ValueError as err:
            raise KernelError(f"nft list {what}: unreadable JSON: {err}") from err
        kind = what.rstrip("s")
        out = []
        for item in doc.get("nftables", ()):
            obj = item.get(kind) if isinstance(item, dict) else None
            if isinstance(obj, dict) and obj.get("table") == self.table:
                out.append(obj)
        return out

    def names(self) -> TableNames:
        """The chains and sets of our table (`exists=False` when it has neither, e.g. no
        table). Not `list tables`: nft builds its full cache for that (1.4 s at 3,000
        Services), while chain and set names cost 0.2 s."""
        chains = [str(c.get("name")) for c in self._objects("chains")]
        sets = self._objects("sets")
        timeouts = {
            str(s.get("name")): t if isinstance(t := s.get("timeout"), int) else None for s in sets
        }
        exists = bool(chains or timeouts)
        return TableNames(exists, frozenset(chains), frozenset(timeouts), timeouts)

    def chain_has_rule(self, chain: str, text: str) -> bool:
        """Does `chain` exist with a rule containing `text` (False if the table or chain is
        gone). Terse: nft still builds its chain cache (0.3 s at 3,000 Services), but skips
        set elements."""
        cp = self._run(["-t", "list", "chain", self.family, self.table, chain])
        return cp.returncode == 0 and text in cp.stdout

    def list_table(self) -> str:
        """`nft list table` text (for tests and for logging after a failure)."""
        cp = self._run(["list", "table", self.family, self.table])
        if cp.returncode != 0:
            raise KernelError(f"nft list table failed: {cp.stderr.strip()}")
        return cp.stdout

    def delete_table(self) -> None:
        """Remove our table if it exists (add + delete: `delete` alone fails on a missing
        table, and `destroy` needs nft >= 1.0.8)."""
        self.run(f"add table {self.family} {self.table}\ndelete table {self.family} {self.table}\n")
