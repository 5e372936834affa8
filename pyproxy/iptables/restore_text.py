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

Chain names, built-in chains and the tokenizer of rule lines are `vocabulary`'s. Pure: no I/O.
A 100k-line ruleset parses in a few hundred milliseconds; addresses are only turned into
``ipaddress`` networks when something asks (and then memoised).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pyproxy.errors import PyproxyError
from pyproxy.iptables.vocabulary import BUILTIN_CHAINS, FIXED_KUBE_CHAINS, split_words

__all__ = [
    "BUILTIN_TARGETS",
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
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

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


class RulesetParseError(PyproxyError, ValueError):
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
        version = ip.version
        for n in nets:
            if n.version == version and ip in n:
                return not self.negated
        return self.negated


@dataclass(frozen=True, slots=True)
class PortMatch:
    """``[!] --dport/--sport P[:Q]`` or multiport ``[!] --dports P,Q:R``."""

    value: str
    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def matches(self, port: int) -> bool:
        for lo, hi in self.ranges:
            if lo <= port <= hi:
                return not self.negated
        return self.negated


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


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain and its rule lines; the lines are parsed into :class:`Rule` on first use.

    Lazy because a node's ruleset can have 100k rules and a trace reads a handful of chains.
    """

    name: str
    lines: tuple[str, ...] = ()  # the ``-A`` lines, in chain order
    policy: str | None = None  # "ACCEPT"/"DROP" for built-in chains; None for "-"
    packets: int = 0
    bytes: int = 0
    declared: bool = True  # False when rules were added without a ``:CHAIN`` line
    deleted: bool = False  # a ``-X CHAIN`` line was seen
    _rules: tuple[Rule, ...] | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    @property
    def rules(self) -> tuple[Rule, ...]:
        rules = self._rules
        if rules is None:
            rules = tuple(parse_rule(line) for line in self.lines)
            object.__setattr__(self, "_rules", rules)
        return rules

    def targets(self) -> tuple[str | None, ...]:
        """Each rule's ``-j``/``-g`` target, without parsing the rules fully."""
        if self._rules is not None:
            return tuple(r.target for r in self._rules)
        return tuple(_line_target(line) for line in self.lines)


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    chains: tuple[Chain, ...] = ()
    _index: Mapping[str, Chain] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", MappingProxyType({c.name: c for c in self.chains}))

    def chain(self, name: str) -> Chain | None:
        """The chain (including deleted ones, see ``Chain.deleted``), or None."""
        return self._index.get(name)

    @property
    def builtin_chains(self) -> frozenset[str]:
        return BUILTIN_CHAINS.get(self.name, frozenset())


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Tables in order of first appearance; a table appearing twice is merged."""

    tables: tuple[Table, ...] = ()
    _index: Mapping[str, Table] = field(init=False, repr=False, compare=False, hash=False)

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
            out.extend(line for c in t.chains for line in c.lines)
            out.extend(f"-X {c.name}" for c in t.chains if c.deleted)
            out.append("COMMIT")
        return "\n".join(out) + "\n"


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


# Option -> kind, for the dispatch in parse_rule. Kinds below _FIRST_FLAG take a value.
(
    _K_MODULE, _K_COMMENT, _K_DST, _K_SRC, _K_PROTO, _K_JUMP, _K_GOTO, _K_DPORT, _K_SPORT,
    _K_TO_DESTINATION, _K_SRC_TYPE, _K_DST_TYPE, _K_STATISTIC, _K_RECENT, _K_MARK, _K_CTSTATE,
    _K_STATE, _K_IN_IFACE, _K_OUT_IFACE, _K_NFACCT, _K_MARK_OP, _K_TO_SOURCE, _K_TO_PORTS,
    _K_REJECT_WITH, _K_MATCH_SET, _K_PHYSDEV,
    _FIRST_FLAG,
) = range(27)  # fmt: skip
_K_RANDOM_FULLY = _FIRST_FLAG
_K_RECENT_ACTION = _FIRST_FLAG + 1
_K_RECENT_FLAG = _FIRST_FLAG + 2
_K_PHYSDEV_FLAG = _FIRST_FLAG + 3
_UNKNOWN = 1000
_OPTION_KINDS: Mapping[str, int] = MappingProxyType(
    {
        "-m": _K_MODULE, "--match": _K_MODULE,
        "--comment": _K_COMMENT,
        "-d": _K_DST, "--destination": _K_DST, "--dst": _K_DST,
        "-s": _K_SRC, "--source": _K_SRC, "--src": _K_SRC,
        "-p": _K_PROTO, "--protocol": _K_PROTO,
        "-j": _K_JUMP, "--jump": _K_JUMP, "-g": _K_GOTO, "--goto": _K_GOTO,
        "--dport": _K_DPORT, "--destination-port": _K_DPORT,
        "--dports": _K_DPORT, "--destination-ports": _K_DPORT,
        "--sport": _K_SPORT, "--source-port": _K_SPORT,
        "--sports": _K_SPORT, "--source-ports": _K_SPORT,
        "--to-destination": _K_TO_DESTINATION,
        "--src-type": _K_SRC_TYPE, "--dst-type": _K_DST_TYPE,
        "--mode": _K_STATISTIC, "--probability": _K_STATISTIC,
        "--every": _K_STATISTIC, "--packet": _K_STATISTIC,
        "--name": _K_RECENT, "--seconds": _K_RECENT, "--hitcount": _K_RECENT,
        "--mask": _K_RECENT,
        "--mark": _K_MARK,
        "--ctstate": _K_CTSTATE, "--state": _K_STATE,
        "-i": _K_IN_IFACE, "--in-interface": _K_IN_IFACE,
        "-o": _K_OUT_IFACE, "--out-interface": _K_OUT_IFACE,
        "--nfacct-name": _K_NFACCT,
        "--set-xmark": _K_MARK_OP, "--set-mark": _K_MARK_OP, "--or-mark": _K_MARK_OP,
        "--xor-mark": _K_MARK_OP, "--and-mark": _K_MARK_OP,
        "--to-source": _K_TO_SOURCE,
        "--to-ports": _K_TO_PORTS, "--to-port": _K_TO_PORTS,
        "--reject-with": _K_REJECT_WITH,
        "--match-set": _K_MATCH_SET,
        "--physdev-in": _K_PHYSDEV, "--physdev-out": _K_PHYSDEV,
        "--random-fully": _K_RANDOM_FULLY,
        "--rcheck": _K_RECENT_ACTION, "--set": _K_RECENT_ACTION,
        "--update": _K_RECENT_ACTION, "--remove": _K_RECENT_ACTION,
        "--reap": _K_RECENT_FLAG, "--rsource": _K_RECENT_FLAG, "--rdest": _K_RECENT_FLAG,
        "--physdev-is-in": _K_PHYSDEV_FLAG, "--physdev-is-out": _K_PHYSDEV_FLAG,
        "--physdev-is-bridged": _K_PHYSDEV_FLAG,
    }
)  # fmt: skip


def _line_target(line: str) -> str | None:
    words = split_words(line)
    for k in range(2, len(words) - 1):
        if words[k] in ("-j", "--jump", "-g", "--goto"):
            return words[k + 1]
    return None


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
        kind = _OPTION_KINDS.get(opt, _UNKNOWN)
        if kind < _FIRST_FLAG:
            # The option's value, allowing old-style negation after it ("--opt ! value").
            if i + 1 >= n:
                (unknown_target if after_target else unknown).append(opt)
                break
            val = w[i + 1]
            step = 2
            if val == "!" and i + 2 < n:
                val = w[i + 2]
                step = 3
                neg = True
            if kind == _K_MODULE:
                module = val
                modules.append(val)
                if val not in _KNOWN_MODULES:
                    unknown.append(f"-m {val}")
                i += step
                continue
            if kind == _K_COMMENT:
                comment = val
            elif kind == _K_DST:
                destination = AddressMatch(val, neg)
            elif kind == _K_SRC:
                source = AddressMatch(val, neg)
            elif kind == _K_PROTO:
                low = val.lower()
                protocol = Match(_PROTO_NUMBERS.get(low, low), neg)
            elif kind in (_K_JUMP, _K_GOTO):
                if kind == _K_JUMP:
                    jump = val
                else:
                    goto = val
                module = val
                after_target = True
            elif kind in (_K_DPORT, _K_SPORT):
                ranges = _parse_ports(val)
                if ranges is None:
                    unknown.append(f"{opt} {val}")
                elif kind == _K_DPORT:
                    dport = PortMatch(val, ranges, neg)
                else:
                    sport = PortMatch(val, ranges, neg)
            elif kind == _K_TO_DESTINATION:
                to_destination = val
            elif kind == _K_SRC_TYPE:
                src_type = Match(val, neg)
            elif kind == _K_DST_TYPE:
                dst_type = Match(val, neg)
            elif kind == _K_STATISTIC and module == "statistic":
                if opt == "--mode":
                    st_mode = val
                elif opt == "--probability":
                    st_prob = val
                elif not val.isdigit():
                    unknown.append(f"{opt} {val}")
                elif opt == "--every":
                    st_every = int(val)
                else:
                    st_packet = int(val)
            elif kind == _K_RECENT and module == "recent":
                rc_seen = True
                if opt == "--name":
                    rc_name = val
                elif opt == "--mask":
                    rc_mask = val
                elif not val.isdigit():
                    unknown.append(f"{opt} {val}")
                elif opt == "--seconds":
                    rc_seconds = int(val)
                else:
                    rc_hitcount = int(val)
            elif kind == _K_MARK and module == "mark":
                parsed = _parse_mark(val)
                if parsed is None:
                    unknown.append(f"--mark {val}")
                else:
                    mark = MarkMatch(parsed[0], parsed[1], neg)
            elif (kind == _K_CTSTATE and module == "conntrack") or (
                kind == _K_STATE and module == "state"
            ):
                ctstate = ConntrackMatch(frozenset(val.upper().split(",")), neg)
            elif kind == _K_IN_IFACE:
                in_iface = Match(val, neg)
            elif kind == _K_OUT_IFACE:
                out_iface = Match(val, neg)
            elif kind == _K_NFACCT:
                nfacct = val
            elif kind == _K_MARK_OP and jump == "MARK":
                parsed = _parse_mark(val)
                if parsed is None:
                    unknown_target.append(f"{opt} {val}")
                else:
                    op = _MARK_OPS[opt]
                    mask = parsed[1]
                    if op in ("or", "xor", "and") or "/" not in val:
                        mask = 0xFFFFFFFF
                    set_mark = MarkTarget(op, parsed[0], mask)
            elif kind == _K_TO_SOURCE:
                to_source = val
            elif kind == _K_TO_PORTS:
                to_ports = val
            elif kind == _K_REJECT_WITH:
                reject_with = val
            elif kind == _K_MATCH_SET and step == 2 and i + 2 < n:
                match_set = SetMatch(val, w[i + 2], neg)
                step = 3
            elif kind == _K_PHYSDEV and module == "physdev":
                physdev.append(Match(f"{opt[2:]}={val}", neg))
            else:
                kind = _UNKNOWN  # right option, wrong context: keep it as unknown
            if kind != _UNKNOWN:
                i += step
                continue
        elif kind == _K_RANDOM_FULLY:
            random_fully = True
            i += 1
            continue
        elif kind == _K_RECENT_ACTION and module == "recent":
            rc_seen = True
            rc_action = opt[2:]
            rc_neg = flag_neg
            i += 1
            continue
        elif kind == _K_RECENT_FLAG and module == "recent":
            rc_seen = True
            if opt == "--reap":
                rc_reap = True
            elif opt == "--rdest":
                rc_rdest = True
            i += 1
            continue
        elif kind == _K_PHYSDEV_FLAG and module == "physdev":
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
    __slots__ = ("bytes", "declared", "deleted", "lines", "name", "packets", "policy")

    def __init__(self, name: str, declared: bool) -> None:
        self.name = name
        self.lines: list[str] = []
        self.policy: str | None = None
        self.packets = 0
        self.bytes = 0
        self.declared = declared
        self.deleted = False

    def build(self) -> Chain:
        return Chain(
            self.name,
            tuple(self.lines),
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
    Raises :class:`RulesetParseError` on structurally invalid text. Rule options are parsed
    when a chain's ``rules`` are first read, and never fail (see :func:`parse_rule`).
    """
    tables: dict[str, dict[str, _ChainBuilder]] = {}
    chains: dict[str, _ChainBuilder] | None = None
    builtin: frozenset[str] = frozenset()
    table_name = ""
    lineno = 0
    line = ""

    for lineno, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line[0] == "#":
            continue
        first = line[0]
        if first == "[":
            line = _COUNTER_PREFIX_RE.sub("", line, count=1)
            first = line[0]
        if first == "-" and chains is not None:
            parts = line.split(None, 3)
            cmd = parts[0]
            if cmd in ("-A", "--append", "-I", "--insert"):
                if len(parts) < 2:
                    raise RulesetParseError(lineno, line, "rule without a chain name")
                name = parts[1]
                c = chains.get(name)
                if c is None:
                    c = chains[name] = _ChainBuilder(name, name in builtin)
                elif c.deleted:
                    raise RulesetParseError(lineno, line, "rule added to a deleted chain")
                if cmd in ("-A", "--append"):
                    c.lines.append(line)
                else:
                    pos = int(parts[2]) - 1 if len(parts) > 2 and parts[2].isdigit() else 0
                    c.lines.insert(pos, line)
                continue
            if cmd in ("-X", "--delete-chain", "-N", "--new-chain", "-F", "--flush"):
                if cmd in ("-F", "--flush") and len(parts) == 1:
                    for c in chains.values():
                        c.lines.clear()
                    continue
                if len(parts) != 2:
                    raise RulesetParseError(lineno, line, f"{cmd} needs exactly one chain name")
                name = parts[1]
                c = chains.get(name)
                if c is None:
                    c = chains[name] = _ChainBuilder(name, name in builtin)
                if cmd in ("-X", "--delete-chain"):
                    if c.lines:
                        raise RulesetParseError(lineno, line, "cannot delete a chain with rules")
                    c.deleted = True
                elif cmd in ("-N", "--new-chain"):
                    c.declared = True
                    c.deleted = False
                else:
                    c.lines.clear()
                continue
            if cmd in ("-P", "--policy") and len(parts) == 3:
                name = parts[1]
                c = chains.get(name)
                if c is None:
                    c = chains[name] = _ChainBuilder(name, name in builtin)
                c.policy = parts[2]
                continue
            raise RulesetParseError(lineno, line, "unknown command")
        if first == ":" and chains is not None:
            m = _DECLARE_RE.match(line)
            if m is None:
                raise RulesetParseError(lineno, line, "bad chain declaration")
            name = m.group(1)
            c = chains.get(name)
            if c is None:
                c = chains[name] = _ChainBuilder(name, True)
            c.declared = True
            c.deleted = False
            c.policy = None if m.group(2) == "-" else m.group(2)
            if m.group(3) is not None:
                c.packets = int(m.group(3))
                c.bytes = int(m.group(4))
            continue
        if line == "COMMIT" and chains is not None:
            chains = None
            continue
        if first == "*":
            if chains is not None:
                raise RulesetParseError(lineno, line, "table started before COMMIT")
            table_name = line[1:].strip()
            if not table_name:
                raise RulesetParseError(lineno, line, "empty table name")
            chains = tables.setdefault(table_name, {})
            builtin = BUILTIN_CHAINS.get(table_name, frozenset())
            continue
        if chains is None:
            raise RulesetParseError(lineno, line, "line outside a *table section")
        raise RulesetParseError(lineno, line, "unknown command")

    if chains is not None:
        raise RulesetParseError(lineno, line, f"table {table_name!r} has no COMMIT")

    return Ruleset(
        tuple(
            Table(name, tuple(c.build() for c in chain_map.values()))
            for name, chain_map in tables.items()
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
        filled = {c.name for c in table.chains if c.lines}
        jumped = {
            t
            for c in table.chains
            for t in c.targets()
            if t is not None and t not in BUILTIN_TARGETS
        }
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


def _sorted_lines(table: str, chain: Chain) -> tuple[str, ...]:
    if (chain.name == "KUBE-NODEPORTS" and table in ("filter", "nat")) or (
        chain.name == "KUBE-SERVICES" and table == "filter"
    ):
        return tuple(r.raw for r in sorted(chain.rules, key=_service_name))
    if chain.name == "KUBE-SERVICES" and table == "nat":
        return tuple(
            r.raw
            for r in sorted(
                chain.rules,
                key=lambda r: (
                    r.comment is not None and "must be the last rule" in r.comment,
                    _service_name(r),
                ),
            )
        )
    return chain.lines


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
                        _sorted_lines(t.name, c),
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
