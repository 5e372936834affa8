"""Parse iptables-restore input and iptables-save output into plain data.

Why this exists: pyproxy both *writes* iptables-restore text (the renderer) and has to *read*
it back — in golden tests (sorted comparison, jump consistency), in the packet tracer that
checks what the rules actually do, and in ``pyproxy trace`` run against ``iptables-save`` of a
live node. All of those need the same structured view of a rule: "what does this rule match and
where does it send the packet". The shapes follow the fields upstream kube-proxy's test parser
(``pkg/util/iptables/testing/parse.go``) extracts, plus the few more an operator needs
(``-i``/``-o``, ``--sport``, multiport, ``-m set``, ``-m physdev``, MARK target arithmetic).

Parsing is deliberately lenient about *options*: anything not understood is kept in the rule's
raw text and listed in ``Rule.unknown`` / ``Rule.unknown_target`` so that a consumer can say
"can't evaluate this rule" instead of crashing or silently guessing. It is strict about
*structure* (a rule outside a table, a missing ``COMMIT``, an unknown command), because such
text would be refused by ``iptables-restore`` too.

Pure: stdlib only, no I/O. A 100k-line ruleset parses in a few hundred milliseconds; addresses
are only turned into ``ipaddress`` networks when something asks (and then memoised).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "BUILTIN_CHAINS",
    "BUILTIN_TARGETS",
    "FIXED_KUBE_CHAINS",
    "AddressMatch",
    "Chain",
    "ConntrackMatch",
    "MarkMatch",
    "MarkTarget",
    "Match",
    "PortMatch",
    "RecentMatch",
    "Rule",
    "Ruleset",
    "RulesetParseError",
    "SetMatch",
    "Statistic",
    "Table",
    "check_jumps",
    "parse_rule",
    "parse_ruleset",
    "sort_ruleset_text",
    "split_words",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Built-in chains of each table (the ones with a policy, never created or deleted).
BUILTIN_CHAINS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "filter": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
        "nat": frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}),
        "mangle": frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}),
        "raw": frozenset({"PREROUTING", "OUTPUT"}),
        "security": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
    }
)

#: Targets that are iptables extensions (or verdicts), not user chains.
BUILTIN_TARGETS = frozenset(
    {
        "ACCEPT", "DROP", "REJECT", "RETURN", "QUEUE", "NFQUEUE",
        "DNAT", "SNAT", "MASQUERADE", "REDIRECT", "NETMAP",
        "MARK", "CONNMARK", "LOG", "NFLOG", "ULOG", "TRACE", "CT", "NOTRACK", "AUDIT",
        "TPROXY", "CLASSIFY", "DSCP", "TOS", "TTL", "HL", "TCPMSS", "CHECKSUM", "SET",
        "SECMARK", "CONNSECMARK", "IDLETIMER", "LED", "HMARK", "TEE", "SYNPROXY",
    }
)  # fmt: skip

#: Chains kube-proxy always creates even when nothing jumps to them (upstream
#: ``checkIPTablesRuleJumps`` exempts them from the "created but not used" check).
FIXED_KUBE_CHAINS = frozenset(
    {
        "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
        "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL",
        "KUBE-PROXY-CANARY",
    }
)  # fmt: skip


class RulesetParseError(ValueError):
    """The text is not structurally valid iptables-restore / iptables-save data."""

    def __init__(self, lineno: int, line: str, reason: str) -> None:
        super().__init__(f"line {lineno}: {reason}: {line!r}")
        self.lineno = lineno
        self.line = line
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Match and target value types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """A string-valued, possibly negated (``! --opt value``) parameter."""

    value: str
    negated: bool = False

    def matches(self, candidate: str) -> bool:
        return (self.value == candidate) != self.negated


@functools.lru_cache(maxsize=1 << 16)
def _parse_networks(value: str) -> tuple[IPNetwork, ...] | None:
    nets: list[IPNetwork] = []
    for part in value.split(","):
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            return None  # hostname, leading zeros, garbage: can't evaluate
    return tuple(nets)


@dataclass(frozen=True, slots=True)
class AddressMatch:
    """``[!] -s/-d ADDR[/MASK][,ADDR...]`` as written."""

    value: str
    negated: bool = False

    @property
    def networks(self) -> tuple[IPNetwork, ...] | None:
        """The parsed networks, or None when the value is not an IP/CIDR (list)."""
        return _parse_networks(self.value)

    def matches(self, ip: IPAddress) -> bool | None:
        """Whether ``ip`` matches; None when the rule's address can't be parsed."""
        nets = _parse_networks(self.value)
        if nets is None:
            return None
        hit = any(ip.version == n.version and ip in n for n in nets)
        return hit != self.negated


@dataclass(frozen=True, slots=True)
class PortMatch:
    """``[!] --dport/--sport P[:Q]`` or multiport ``[!] --dports P,Q:R``."""

    value: str
    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def matches(self, port: int) -> bool:
        hit = any(lo <= port <= hi for lo, hi in self.ranges)
        return hit != self.negated


@dataclass(frozen=True, slots=True)
class Statistic:
    """``-m statistic --mode random --probability P`` or ``--mode nth --every N --packet P``."""

    mode: str
    probability: str | None = None
    every: int | None = None
    packet: int | None = None

    @property
    def chance(self) -> float | None:
        """Probability that the rule matches one packet (None if not determinable)."""
        if self.mode == "random" and self.probability is not None:
            try:
                return float(self.probability)
            except ValueError:
                return None
        if self.mode == "nth" and self.every:
            return 1.0 / self.every
        return None


@dataclass(frozen=True, slots=True)
class RecentMatch:
    """``-m recent --name N --rcheck|--set|--update|--remove [--seconds S] [--reap]``."""

    name: str = "DEFAULT"
    action: str = ""  # "rcheck", "set", "update", "remove" (or "" if none given)
    seconds: int | None = None
    reap: bool = False
    hitcount: int | None = None
    rdest: bool = False  # --rdest: the list holds destination addresses
    negated: bool = False
    mask: str | None = None  # --mask (iptables-save prints 255.255.255.255); not applied


@dataclass(frozen=True, slots=True)
class MarkMatch:
    """``-m mark [!] --mark VALUE[/MASK]``: matches when ``mark & mask == value``."""

    value: int
    mask: int = 0xFFFFFFFF
    negated: bool = False


@dataclass(frozen=True, slots=True)
class ConntrackMatch:
    """``-m conntrack [!] --ctstate A,B`` (also ``-m state [!] --state A,B``)."""

    states: frozenset[str]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class SetMatch:
    """``-m set [!] --match-set NAME FLAGS`` (ipset contents are not known to the parser)."""

    name: str
    flags: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class MarkTarget:
    """``-j MARK --set-xmark/--set-mark/--or-mark/--xor-mark/--and-mark``.

    iptables-save prints ``--or-mark X`` as ``--set-xmark X/X`` and ``--xor-mark X`` as
    ``--set-xmark X/0x0``; :meth:`apply` gives the same result for either spelling.
    """

    op: str  # "set-xmark", "set-mark", "or", "xor", "and"
    value: int
    mask: int = 0xFFFFFFFF

    def apply(self, mark: int) -> int:
        if self.op == "set-xmark":
            return ((mark & ~self.mask) ^ self.value) & 0xFFFFFFFF
        if self.op == "set-mark":
            return ((mark & ~self.mask) | self.value) & 0xFFFFFFFF
        if self.op == "or":
            return mark | self.value
        if self.op == "xor":
            return mark ^ self.value
        return mark & self.value  # "and"

    def apply_known(self, known: int) -> int:
        """Which mark bits are known after this target, given the bits known before."""
        if self.op in ("set-xmark", "set-mark"):
            return known | self.mask
        if self.op == "or":
            return known | self.value
        if self.op == "and":
            return known | (~self.value & 0xFFFFFFFF)
        return known  # xor flips bits, known stays known


# ---------------------------------------------------------------------------------------------
# Rule, Chain, Table, Ruleset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``-A CHAIN ...`` line, with every option the tracer can evaluate pulled out."""

    raw: str  # the line as given (without a leading ``[pkts:bytes]`` counter)
    chain: str
    source: AddressMatch | None = None
    destination: AddressMatch | None = None
    protocol: Match | None = None
    dport: PortMatch | None = None
    sport: PortMatch | None = None
    src_type: Match | None = None  # addrtype --src-type, value may be a comma list
    dst_type: Match | None = None
    in_interface: Match | None = None
    out_interface: Match | None = None
    jump: str | None = None
    goto: str | None = None
    statistic: Statistic | None = None
    recent: RecentMatch | None = None
    mark: MarkMatch | None = None
    ctstate: ConntrackMatch | None = None
    match_set: SetMatch | None = None
    physdev: tuple[Match, ...] = ()
    comment: str | None = None
    nfacct: str | None = None
    to_destination: str | None = None  # DNAT
    to_source: str | None = None  # SNAT
    to_ports: str | None = None  # MASQUERADE / REDIRECT
    set_mark: MarkTarget | None = None  # MARK target
    reject_with: str | None = None
    random_fully: bool = False
    modules: tuple[str, ...] = ()
    #: Match options (and modules) this parser does not understand, as text ("-m foo",
    #: "--tcp-flags SYN,ACK SYN"). A rule with any of these can't be evaluated exactly.
    unknown: tuple[str, ...] = ()
    #: Options after the target that this parser does not understand (e.g. "--log-prefix x").
    unknown_target: tuple[str, ...] = ()

    @property
    def target(self) -> str | None:
        """Where the rule sends a matching packet (``-j`` or ``-g``), or None."""
        return self.jump if self.jump is not None else self.goto

    @property
    def probability(self) -> float | None:
        """The statistic match's chance of matching, or None if the rule has none."""
        return None if self.statistic is None else self.statistic.chance


def _chains_default() -> dict[str, Chain]:
    return {}


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()
    policy: str | None = None  # "ACCEPT"/"DROP" for built-in chains; None for "-"
    packets: int = 0
    bytes: int = 0
    declared: bool = True  # False when rules were added without a ``:CHAIN`` line
    deleted: bool = False  # a ``-X CHAIN`` line was seen


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    chains: tuple[Chain, ...] = ()
    _index: Mapping[str, Chain] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=_chains_default
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", MappingProxyType({c.name: c for c in self.chains}))

    def chain(self, name: str) -> Chain | None:
        """The chain (including deleted ones, see ``Chain.deleted``), or None."""
        return self._index.get(name)

    @property
    def builtin_chains(self) -> frozenset[str]:
        return BUILTIN_CHAINS.get(self.name, frozenset())


def _tables_default() -> dict[str, Table]:
    return {}


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Tables in order of first appearance; a table appearing twice is merged."""

    tables: tuple[Table, ...] = ()
    _index: Mapping[str, Table] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=_tables_default
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", MappingProxyType({t.name: t for t in self.tables}))

    def table(self, name: str) -> Table | None:
        return self._index.get(name)

    def chain(self, table: str, chain: str) -> Chain | None:
        t = self._index.get(table)
        return None if t is None else t.chain(chain)

    def rules(self, table: str, chain: str) -> tuple[Rule, ...]:
        """The rules of a chain, or () if it doesn't exist."""
        c = self.chain(table, chain)
        return () if c is None else c.rules

    def to_text(self) -> str:
        """Render back to iptables-restore text (declarations, rules by chain, -X, COMMIT)."""
        out: list[str] = []
        for t in self.tables:
            out.append(f"*{t.name}")
            out.extend(
                f":{c.name} {c.policy or '-'} [{c.packets}:{c.bytes}]"
                for c in t.chains
                if c.declared
            )
            out.extend(r.raw for c in t.chains for r in c.rules)
            out.extend(f"-X {c.name}" for c in t.chains if c.deleted)
            out.append("COMMIT")
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------------

# A word is a run of: double-quoted strings (backslash escapes inside, as iptables-save writes
# them), single-quoted strings, backslash escapes, plain characters; a lone unbalanced quote is
# kept literally rather than swallowing the rest of the line.
_WORD_RE = re.compile(r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|\\.|[^\s"'\\]+|["'\\])+""")
_PIECE_RE = re.compile(r""""((?:[^"\\]|\\.)*)"|'([^']*)'|\\(.)|([^"'\\]+)|(["'\\])""")
_ESCAPE_RE = re.compile(r"\\(.)")


def _unquote(word: str) -> str:
    parts: list[str] = []
    for m in _PIECE_RE.finditer(word):
        dq, sq, esc, plain, lone = m.groups()
        if dq is not None:
            parts.append(_ESCAPE_RE.sub(r"\1", dq))
        elif sq is not None:
            parts.append(sq)
        elif esc is not None:
            parts.append(esc)
        elif plain is not None:
            parts.append(plain)
        else:
            parts.append(lone or "")
    return "".join(parts)


def split_words(line: str) -> list[str]:
    """Split a rule line into words like iptables-restore (and a shell) would."""
    if '"' not in line and "'" not in line and "\\" not in line:
        return line.split()
    return [_unquote(w) for w in _WORD_RE.findall(line)]


# ---------------------------------------------------------------------------------------------
# Rule parsing
# ---------------------------------------------------------------------------------------------

_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "1": "icmp", "58": "ipv6-icmp"}

# Options that take no argument, per context (module or target), so that unknown-option
# collection doesn't swallow the next word.
_FLAG_OPTIONS = frozenset(
    {
        "--rcheck", "--set", "--update", "--remove", "--reap", "--rsource", "--rdest",
        "--physdev-is-in", "--physdev-is-out", "--physdev-is-bridged",
        "--random-fully", "--random", "--persistent", "--syn", "-f", "--fragment",
        "--limit-iface-in", "--limit-iface-out", "--return-nomatch", "--log-uid",
        "--log-tcp-sequence", "--log-tcp-options", "--log-ip-options", "--notrack",
    }
)  # fmt: skip


def _parse_ports(value: str) -> tuple[tuple[int, int], ...] | None:
    ranges: list[tuple[int, int]] = []
    for part in value.split(","):
        lo_s, sep, hi_s = part.partition(":")
        try:
            lo = int(lo_s) if lo_s else 0
            hi = (int(hi_s) if hi_s else 65535) if sep else lo
        except ValueError:
            return None  # service names ("http") are not resolved
        ranges.append((lo, hi))
    return tuple(ranges)


def _parse_mark(value: str) -> tuple[int, int] | None:
    v, _, m = value.partition("/")
    try:
        return int(v, 0), (int(m, 0) if m else 0xFFFFFFFF)
    except ValueError:
        return None


_MARK_OPS = {
    "--set-xmark": "set-xmark",
    "--set-mark": "set-mark",
    "--or-mark": "or",
    "--xor-mark": "xor",
    "--and-mark": "and",
}


def parse_rule(line: str, words: list[str] | None = None) -> Rule:
    """Parse one ``-A CHAIN ...`` line (also accepts ``-I CHAIN [N] ...``).

    Raises ValueError only when the line doesn't start with a chain command; unknown or
    malformed options are recorded in ``unknown``/``unknown_target`` instead.
    """
    w = split_words(line) if words is None else words
    n = len(w)
    if n < 2 or w[0] not in ("-A", "-I", "--append", "--insert"):
        raise ValueError(f'bad iptables rule (does not start with "-A CHAIN"): {line!r}')
    chain = w[1]
    i = 2
    if w[0] in ("-I", "--insert") and i < n and w[i].isdigit():
        i += 1

    source = destination = None
    protocol = src_type = dst_type = in_iface = out_iface = None
    dport = sport = None
    jump = goto = comment = nfacct = None
    to_destination = to_source = to_ports = reject_with = None
    random_fully = False
    set_mark: MarkTarget | None = None
    mark: MarkMatch | None = None
    ctstate: ConntrackMatch | None = None
    match_set: SetMatch | None = None
    physdev: list[Match] = []
    modules: list[str] = []
    unknown: list[str] = []
    unknown_target: list[str] = []
    # statistic / recent pieces, assembled at the end
    st_mode: str | None = None
    st_prob: str | None = None
    st_every: int | None = None
    st_packet: int | None = None
    rc_seen = False
    rc_name = "DEFAULT"
    rc_action = ""
    rc_seconds: int | None = None
    rc_hitcount: int | None = None
    rc_reap = False
    rc_rdest = False
    rc_neg = False
    rc_mask: str | None = None
    module = ""  # the most recent -m, to disambiguate options like --mark and --set
    after_target = False

    def value_at(j: int) -> tuple[str | None, bool]:
        # Returns (value, old-style negation "--opt ! value").
        if j >= n:
            return None, False
        if w[j] == "!" and j + 1 < n:
            return w[j + 1], True
        return w[j], False

    while i < n:
        opt = w[i]
        neg = False
        if opt == "!":
            neg = True
            i += 1
            if i >= n:
                unknown.append("!")
                break
            opt = w[i]
        flag_neg = neg  # negation of an option without a value
        val, oldneg = value_at(i + 1)
        step = 3 if oldneg else 2  # how far to advance when the option took a value
        neg = neg or oldneg
        if opt in ("-m", "--match"):
            if val is None:
                unknown.append(opt)
                break
            module = val
            modules.append(val)
            if val not in _KNOWN_MODULES:
                unknown.append(f"-m {val}")
            i += 2
            continue
        if opt in ("-j", "--jump", "-g", "--goto"):
            if val is None:
                unknown.append(opt)
                break
            if opt in ("-j", "--jump"):
                jump = val
            else:
                goto = val
            module = val
            after_target = True
            i += 2
            continue
        if val is not None:
            if opt == "--comment":
                comment = val
                i += step
                continue
            if opt in ("-s", "--source", "--src"):
                source = AddressMatch(val, neg)
                i += step
                continue
            if opt in ("-d", "--destination", "--dst"):
                destination = AddressMatch(val, neg)
                i += step
                continue
            if opt in ("-p", "--protocol"):
                low = val.lower()
                protocol = Match(_PROTO_NUMBERS.get(low, low), neg)
                i += step
                continue
            if opt in ("--dport", "--destination-port", "--dports", "--destination-ports"):
                ranges = _parse_ports(val)
                if ranges is None:
                    unknown.append(f"{opt} {val}")
                else:
                    dport = PortMatch(val, ranges, neg)
                i += step
                continue
            if opt in ("--sport", "--source-port", "--sports", "--source-ports"):
                ranges = _parse_ports(val)
                if ranges is None:
                    unknown.append(f"{opt} {val}")
                else:
                    sport = PortMatch(val, ranges, neg)
                i += step
                continue
            if opt == "--to-destination":
                to_destination = val
                i += step
                continue
            if opt == "--src-type":
                src_type = Match(val, neg)
                i += step
                continue
            if opt == "--dst-type":
                dst_type = Match(val, neg)
                i += step
                continue
            if opt == "--mode" and module == "statistic":
                st_mode = val
                i += step
                continue
            if opt == "--probability" and module == "statistic":
                st_prob = val
                i += step
                continue
            if opt in ("--every", "--packet") and module == "statistic":
                try:
                    num = int(val)
                except ValueError:
                    unknown.append(f"{opt} {val}")
                else:
                    if opt == "--every":
                        st_every = num
                    else:
                        st_packet = num
                i += step
                continue
            if module == "recent" and opt in ("--name", "--seconds", "--hitcount", "--mask"):
                rc_seen = True
                if opt == "--name":
                    rc_name = val
                elif opt == "--mask":
                    rc_mask = val
                else:
                    try:
                        num = int(val)
                    except ValueError:
                        unknown.append(f"{opt} {val}")
                    else:
                        if opt == "--seconds":
                            rc_seconds = num
                        else:
                            rc_hitcount = num
                i += step
                continue
            if opt == "--mark" and module == "mark":
                parsed = _parse_mark(val)
                if parsed is None:
                    unknown.append(f"--mark {val}")
                else:
                    mark = MarkMatch(parsed[0], parsed[1], neg)
                i += step
                continue
            if (opt == "--ctstate" and module == "conntrack") or (
                opt == "--state" and module == "state"
            ):
                ctstate = ConntrackMatch(frozenset(val.upper().split(",")), neg)
                i += step
                continue
            if opt in ("-i", "--in-interface"):
                in_iface = Match(val, neg)
                i += step
                continue
            if opt in ("-o", "--out-interface"):
                out_iface = Match(val, neg)
                i += step
                continue
            if opt == "--nfacct-name":
                nfacct = val
                i += step
                continue
            if opt in _MARK_OPS and jump == "MARK":
                parsed = _parse_mark(val)
                if parsed is None:
                    unknown_target.append(f"{opt} {val}")
                else:
                    op = _MARK_OPS[opt]
                    mask = parsed[1]
                    if op in ("or", "xor", "and") or "/" not in val:
                        mask = 0xFFFFFFFF
                    set_mark = MarkTarget(op, parsed[0], mask)
                i += step
                continue
            if opt == "--to-source":
                to_source = val
                i += step
                continue
            if opt in ("--to-ports", "--to-port"):
                to_ports = val
                i += step
                continue
            if opt == "--reject-with":
                reject_with = val
                i += step
                continue
            if opt == "--match-set" and i + 2 < n:
                match_set = SetMatch(w[i + 1], w[i + 2], neg)
                i += 3
                continue
            if opt in ("--physdev-in", "--physdev-out") and module == "physdev":
                physdev.append(Match(f"{opt[2:]}={val}", neg))
                i += step
                continue
        # options without a value
        if opt == "--random-fully":
            random_fully = True
            i += 1
            continue
        if module == "recent" and opt in ("--rcheck", "--set", "--update", "--remove"):
            rc_seen = True
            rc_action = opt[2:]
            rc_neg = flag_neg
            i += 1
            continue
        if module == "recent" and opt in ("--reap", "--rsource", "--rdest"):
            rc_seen = True
            if opt == "--reap":
                rc_reap = True
            elif opt == "--rdest":
                rc_rdest = True
            i += 1
            continue
        if module == "physdev" and opt in (
            "--physdev-is-in",
            "--physdev-is-out",
            "--physdev-is-bridged",
        ):
            physdev.append(Match(opt[2:], flag_neg))
            i += 1
            continue
        # Unknown option: keep it with any following non-option words as its arguments.
        j = i + 1
        if opt not in _FLAG_OPTIONS:
            while j < n and not w[j].startswith("-") and w[j] != "!":
                j += 1
        text = " ".join(w[i:j])
        if flag_neg:
            text = "! " + text
        (unknown_target if after_target else unknown).append(text)
        i = j

    statistic = None
    if st_mode is not None or st_prob is not None or st_every is not None:
        statistic = Statistic(st_mode or "random", st_prob, st_every, st_packet)
    recent = None
    if rc_seen:
        recent = RecentMatch(
            rc_name, rc_action, rc_seconds, rc_reap, rc_hitcount, rc_rdest, rc_neg, rc_mask
        )
    return Rule(
        raw=line,
        chain=chain,
        source=source,
        destination=destination,
        protocol=protocol,
        dport=dport,
        sport=sport,
        src_type=src_type,
        dst_type=dst_type,
        in_interface=in_iface,
        out_interface=out_iface,
        jump=jump,
        goto=goto,
        statistic=statistic,
        recent=recent,
        mark=mark,
        ctstate=ctstate,
        match_set=match_set,
        physdev=tuple(physdev),
        comment=comment,
        nfacct=nfacct,
        to_destination=to_destination,
        to_source=to_source,
        to_ports=to_ports,
        set_mark=set_mark,
        reject_with=reject_with,
        random_fully=random_fully,
        modules=tuple(modules),
        unknown=tuple(unknown),
        unknown_target=tuple(unknown_target),
    )


# Modules whose options the parser understands (or that need no options to be evaluated:
# tcp/udp/sctp only carry the port options, comment and nfacct never affect matching).
_KNOWN_MODULES = frozenset(
    {
        "tcp", "udp", "sctp", "udplite", "comment", "addrtype", "statistic", "recent",
        "mark", "conntrack", "state", "multiport", "nfacct", "set", "physdev",
    }
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Ruleset parsing
# ---------------------------------------------------------------------------------------------


class _ChainBuilder:
    __slots__ = ("bytes", "declared", "deleted", "name", "packets", "policy", "rules")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rules: list[Rule] = []
        self.policy: str | None = None
        self.packets = 0
        self.bytes = 0
        self.declared = False
        self.deleted = False

    def build(self) -> Chain:
        return Chain(
            self.name,
            tuple(self.rules),
            self.policy,
            self.packets,
            self.bytes,
            self.declared,
            self.deleted,
        )


_DECLARE_RE = re.compile(r"^:(\S+)\s+(\S+)(?:\s+\[(\d+):(\d+)\])?\s*$")
_COUNTER_PREFIX_RE = re.compile(r"^\[\d+:\d+\]\s+")


def parse_ruleset(text: str) -> Ruleset:
    """Parse iptables-restore input or iptables-save output.

    Understands ``*table``, ``:CHAIN POLICY [pkts:bytes]``, ``-A``/``-I`` rules (optionally
    prefixed by ``[pkts:bytes]`` as ``iptables-save -c`` prints them), ``-N``, ``-X``, ``-F``,
    ``-P``, ``COMMIT`` and ``#`` comments. A table that appears in two sections is merged.
    Raises :class:`RulesetParseError` on structurally invalid text.
    """
    tables: dict[str, dict[str, _ChainBuilder]] = {}
    current: dict[str, _ChainBuilder] | None = None
    current_name = ""
    lineno = 0
    line = ""

    def get(chains: dict[str, _ChainBuilder], name: str) -> _ChainBuilder:
        c = chains.get(name)
        if c is None:
            c = chains[name] = _ChainBuilder(name)
            if name in BUILTIN_CHAINS.get(current_name, ()):
                c.declared = True  # built-in chains always exist
        return c

    for lineno, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line[0] == "#":
            continue
        first = line[0]
        if first == "*":
            if current is not None:
                raise RulesetParseError(lineno, line, "table started before COMMIT")
            current_name = line[1:].strip()
            if not current_name:
                raise RulesetParseError(lineno, line, "empty table name")
            current = tables.setdefault(current_name, {})
            continue
        if current is None:
            raise RulesetParseError(lineno, line, "line outside a *table section")
        if first == ":":
            m = _DECLARE_RE.match(line)
            if m is None:
                raise RulesetParseError(lineno, line, "bad chain declaration")
            c = get(current, m.group(1))
            c.declared = True
            c.deleted = False
            c.policy = None if m.group(2) == "-" else m.group(2)
            if m.group(3) is not None:
                c.packets = int(m.group(3))
                c.bytes = int(m.group(4))
            continue
        if line == "COMMIT":
            current = None
            continue
        if first == "[":
            line = _COUNTER_PREFIX_RE.sub("", line, count=1)
        words = split_words(line)
        cmd = words[0]
        if cmd in ("-A", "--append", "-I", "--insert"):
            if len(words) < 2:
                raise RulesetParseError(lineno, line, "rule without a chain name")
            c = get(current, words[1])
            if c.deleted:
                raise RulesetParseError(lineno, line, "rule added to a deleted chain")
            rule = parse_rule(line, words)
            if cmd in ("-A", "--append"):
                c.rules.append(rule)
            else:
                pos = int(words[2]) - 1 if len(words) > 2 and words[2].isdigit() else 0
                c.rules.insert(pos, rule)
            continue
        if cmd in ("-X", "--delete-chain", "-N", "--new-chain", "-F", "--flush"):
            if len(words) != 2:
                if cmd in ("-F", "--flush") and len(words) == 1:
                    for c in current.values():
                        c.rules.clear()
                    continue
                raise RulesetParseError(lineno, line, f"{cmd} needs exactly one chain name")
            c = get(current, words[1])
            if cmd in ("-X", "--delete-chain"):
                if c.rules:
                    raise RulesetParseError(lineno, line, "cannot delete a chain with rules")
                c.deleted = True
            elif cmd in ("-N", "--new-chain"):
                c.declared = True
                c.deleted = False
            else:
                c.rules.clear()
            continue
        if cmd in ("-P", "--policy") and len(words) == 3:
            get(current, words[1]).policy = words[2]
            continue
        raise RulesetParseError(lineno, line, "unknown command")

    if current is not None:
        raise RulesetParseError(lineno, line, f"table {current_name!r} has no COMMIT")

    return Ruleset(
        tuple(
            Table(name, tuple(c.build() for c in chains.values()))
            for name, chains in tables.items()
        )
    )


# ---------------------------------------------------------------------------------------------
# Golden-test helpers (upstream proxier_test.go checkIPTablesRuleJumps / sortIPTablesRules)
# ---------------------------------------------------------------------------------------------


def check_jumps(ruleset: Ruleset) -> list[str]:
    """Consistency problems in the chains and jumps of each table (empty list = fine).

    As upstream's ``checkIPTablesRuleJumps``: every chain that is jumped to or filled is
    created (``:CHAIN``, not deleted with ``-X``); every jumped-to chain has rules (except
    KUBE-NODEPORTS, which KUBE-SERVICES always jumps to); every created chain is jumped to,
    except kube-proxy's fixed top-level chains and the built-in chains.
    """
    problems: list[str] = []
    for table in ruleset.tables:
        builtin = table.builtin_chains
        created = {c.name for c in table.chains if c.declared and not c.deleted} | builtin
        filled = {c.name for c in table.chains if c.rules}
        jumped: set[str] = set()
        for c in table.chains:
            for r in c.rules:
                t = r.target
                if t is not None and t not in BUILTIN_TARGETS:
                    jumped.add(t)
        missing = (jumped | filled) - created
        if missing:
            problems.append(
                f"some chains in {table.name} are used but were not created: {sorted(missing)}"
            )
        empty = jumped - filled - {"KUBE-NODEPORTS"}
        if empty:
            problems.append(
                f"some chains in {table.name} are jumped to but have no rules: {sorted(empty)}"
            )
        extra = created - jumped - FIXED_KUBE_CHAINS - builtin
        if extra:
            problems.append(
                f"some chains in {table.name} are created but not used: {sorted(extra)}"
            )
    return problems


def _service_name(rule: Rule) -> str:
    # The service name is the comment up to the first space or colon.
    c = rule.comment or ""
    for k, ch in enumerate(c):
        if ch in " :":
            return c[:k]
    return c


def _chain_order(name: str) -> tuple[int, str]:
    if name == "KUBE-NODEPORTS":
        return (0, "")
    if name == "KUBE-SERVICES":
        return (1, "")
    return (2 if name.startswith("KUBE-") else 3, name)


def _sorted_rules(table: str, chain: Chain) -> tuple[Rule, ...]:
    if chain.name == "KUBE-NODEPORTS" and table in ("filter", "nat"):
        return tuple(sorted(chain.rules, key=_service_name))
    if chain.name == "KUBE-SERVICES" and table == "filter":
        return tuple(sorted(chain.rules, key=_service_name))
    if chain.name == "KUBE-SERVICES" and table == "nat":
        return tuple(
            sorted(
                chain.rules,
                key=lambda r: (
                    r.comment is not None and "must be the last rule" in r.comment,
                    _service_name(r),
                ),
            )
        )
    return chain.rules


def sort_ruleset_text(text: str) -> str:
    """Order ruleset text like upstream's ``sortIPTablesRules``, for order-free comparisons.

    Tables alphabetically; chains KUBE-NODEPORTS, KUBE-SERVICES, other KUBE-* alphabetically,
    then the rest alphabetically; rules of KUBE-NODEPORTS (filter, nat) and KUBE-SERVICES
    (filter, nat) stably sorted by the service name at the start of their comment (rules
    without a comment sort as ""), with nat KUBE-SERVICES' "must be the last rule" rule kept
    last. Output is declarations, then rules chain by chain, then ``-X`` lines, then COMMIT.
    """
    rs = parse_ruleset(text)
    tables = []
    for t in sorted(rs.tables, key=lambda t: t.name):
        chains = sorted(t.chains, key=lambda c: _chain_order(c.name))
        tables.append(
            Table(
                t.name,
                tuple(
                    Chain(
                        c.name,
                        _sorted_rules(t.name, c),
                        c.policy,
                        c.packets,
                        c.bytes,
                        c.declared,
                        c.deleted,
                    )
                    for c in chains
                ),
            )
        )
    return Ruleset(tuple(tables)).to_text()
