"""The iptables vocabulary every part of pyproxy shares: chain names, the built-in chains, the
jumps from them into ours, the chain-name hash, the one tokenizer of rule lines, and the one
writer of iptables-restore documents with those jumps and the canary chains.

Why one module: the renderer writes these words, the parser and the packet tracer read them
back, the kernel view and `--cleanup` recognise them in iptables-save output, and ipvs mode
writes its own rules with the same fixed chains, jumps and canaries. Spelled in one place,
they cannot drift apart. All of it follows upstream kube-proxy (`pkg/proxy/iptables`,
`pkg/util/iptables`) exactly, so `iptables-save` on a pyproxy node reads like kube-proxy's.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pyproxy.model import IPFamily
from pyproxy.proxystate import CT_STATE_INVALID_DROPPED_NFACCT_COUNTER, ProxierConfig
from pyproxy.serviceport import ServicePortName

# --- chain names --------------------------------------------------------------------------

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"

#: The fixed chains, in the order upstream declares them.
FILTER_CHAINS = (
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
#: Prefixes of the per-service and per-endpoint chains (upstream's isServiceChainName).
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
#: Chains kube-proxy always creates even when nothing jumps to them (upstream
#: ``checkIPTablesRuleJumps`` exempts them from the "created but not used" check).
FIXED_KUBE_CHAINS = frozenset({*FILTER_CHAINS, *NAT_CHAINS, KUBE_FIREWALL, KUBE_PROXY_CANARY})
#: kubelet's canary: when present, kubelet manages KUBE-FIREWALL and we leave it alone.
KUBELET_CANARY = "KUBE-KUBELET-CANARY"
#: The chain kubelet creates in the mangle table of the iptables variant the host uses.
KUBE_IPTABLES_HINT = "KUBE-IPTABLES-HINT"

# --- built-in chains ----------------------------------------------------------------------

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


# --- the chain-name hash ---------------------------------------------------------------------

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32 alphabet

#: Every pair of base32 digits, indexed by the 10 bits they encode.
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def _hash16(text: str) -> str:
    """base32(sha256(text))[:16]: the first 16 digits encode exactly the first 10 bytes.

    Same result as `base64.b32encode(digest).decode()[:16]` (pure Python in 3.11, and called
    for every endpoint: 110,000 times for 10,000 Services), three times faster."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return (
        p[n >> 70]
        + p[(n >> 60) & 1023]
        + p[(n >> 50) & 1023]
        + p[(n >> 40) & 1023]
        + p[(n >> 30) & 1023]
        + p[(n >> 20) & 1023]
        + p[(n >> 10) & 1023]
        + p[n & 1023]
    )


@functools.lru_cache(maxsize=65536)
def port_proto_hash(svc_port_name: str, protocol: str) -> str:
    """Upstream's portProtoHash: base32(sha256(name + protocol))[:16]."""
    return _hash16(svc_port_name + protocol)


def service_chain(spn: ServicePortName) -> str:
    return "KUBE-SVC-" + port_proto_hash(str(spn), spn.protocol.lower)


def local_chain(spn: ServicePortName) -> str:
    return "KUBE-SVL-" + port_proto_hash(str(spn), spn.protocol.lower)


def external_chain(spn: ServicePortName) -> str:
    return "KUBE-EXT-" + port_proto_hash(str(spn), spn.protocol.lower)


def firewall_chain(spn: ServicePortName) -> str:
    return "KUBE-FW-" + port_proto_hash(str(spn), spn.protocol.lower)


def endpoint_chain(spn: ServicePortName, endpoint: str) -> str:
    """KUBE-SEP- + base32(sha256(name + protocol + "ip:port"))[:16]."""
    return "KUBE-SEP-" + _hash16(str(spn) + spn.protocol.lower + endpoint)


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


# --- jumps from the built-in chains -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class JumpRule:
    """A rule in a built-in chain that hooks one of our chains in (ensured, never flushed)."""

    table: str
    chain: str
    args: str
    target: str
    comment: str

    @property
    def spec(self) -> str:
        comment = f' -m comment --comment "{self.comment}"' if self.comment else ""
        args = f" {self.args}" if self.args else ""
        return f"{args}{comment} -j {self.target}".lstrip()


_NEW = "-m conntrack --ctstate NEW"


def jump_rules(config: ProxierConfig) -> tuple[JumpRule, ...]:
    """Upstream's iptablesJumpChains (plus kubelet's KUBE-FIREWALL hooks when we own that chain).

    Upstream prepends each in this order, so the last one ends up first in its chain.
    """
    rules = [
        JumpRule(
            "filter",
            "INPUT",
            _NEW,
            KUBE_EXTERNAL_SERVICES,
            "kubernetes externally-visible service portals",
        ),
        JumpRule(
            "filter",
            "FORWARD",
            _NEW,
            KUBE_EXTERNAL_SERVICES,
            "kubernetes externally-visible service portals",
        ),
        JumpRule("filter", "INPUT", "", KUBE_NODEPORTS, "kubernetes health check service ports"),
        JumpRule("filter", "FORWARD", _NEW, KUBE_SERVICES, "kubernetes service portals"),
        JumpRule("filter", "OUTPUT", _NEW, KUBE_SERVICES, "kubernetes service portals"),
        JumpRule("filter", "FORWARD", "", KUBE_FORWARD, "kubernetes forwarding rules"),
        JumpRule("filter", "INPUT", _NEW, KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall"),
        JumpRule(
            "filter", "OUTPUT", _NEW, KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall"
        ),
        JumpRule(
            "filter", "FORWARD", _NEW, KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall"
        ),
        JumpRule("nat", "OUTPUT", "", KUBE_SERVICES, "kubernetes service portals"),
        JumpRule("nat", "PREROUTING", "", KUBE_SERVICES, "kubernetes service portals"),
        JumpRule("nat", "POSTROUTING", "", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    ]
    if config.family is IPFamily.IPv4 and config.localhost_nodeports:
        rules.append(JumpRule("filter", "INPUT", "", KUBE_FIREWALL, ""))
        rules.append(JumpRule("filter", "OUTPUT", "", KUBE_FIREWALL, ""))
    return tuple(rules)


# --- tokenizer ----------------------------------------------------------------------------

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
    if "\\" not in line and "'" not in line:
        if '"' not in line:
            return line.split()
        # Fast path for the common case: double-quoted words standing alone.
        parts = line.split('"')
        last = len(parts) - 1
        if last % 2 == 0:
            words: list[str] = []
            for k in range(0, last + 1, 2):
                seg = parts[k]
                if (0 < k < last and not seg) or (
                    seg and ((k and not seg[0].isspace()) or (k < last and not seg[-1].isspace()))
                ):
                    break  # a quote glued to other characters: use the general path
                words.extend(seg.split())
                if k < last:
                    words.append(parts[k + 1])
            else:
                return words
    return [_unquote(w) for w in _WORD_RE.findall(line)]


# --- restore documents --------------------------------------------------------------------

#: The declaration of the canary chain (empty; its disappearance reveals a flush by others).
CANARY_DECLARATION = f":{KUBE_PROXY_CANARY} - [0:0]\n"
#: The mangle table section holding only the canary (nothing else of ours lives there).
MANGLE_CANARY = f"*mangle\n{CANARY_DECLARATION}COMMIT\n"


def declarations(chains: Iterable[str]) -> str:
    """`:CHAIN - [0:0]` lines: create each chain, or flush it if it exists (with --noflush)."""
    return "".join(f":{c} - [0:0]\n" for c in chains)


def hook_inserts(hooks: Iterable[JumpRule], table: str) -> str:
    """`-I CHAIN 1 ...` lines for the hooks of `table`: each goes first in its built-in chain."""
    return "".join(f"-I {h.chain} 1 {h.spec}\n" for h in hooks if h.table == table)


@dataclass(frozen=True, slots=True)
class TableSection:
    """One table of a restore document: the chains declared, the rules, and what follows them
    before the hooks (e.g. `-X CHAIN` for chains to delete)."""

    table: str
    chains: Sequence[str]
    rules: str  # "\n"-ended lines
    trailer: str = ""


def restore_document(
    sections: Iterable[TableSection], *, hooks: Iterable[JumpRule] = (), canary: bool = False
) -> str:
    """The iptables-restore --noflush input: each table with its chains declared (so flushed)
    and refilled, missing hooks inserted at the top of their built-in chains, and (canary) the
    empty KUBE-PROXY-CANARY chains, first in the mangle table, then in each table written."""
    hooks = tuple(hooks)
    parts = [MANGLE_CANARY] if canary else []
    for s in sections:
        parts += [
            f"*{s.table}\n",
            CANARY_DECLARATION if canary else "",
            declarations(s.chains),
            s.rules,
            s.trailer,
            hook_inserts(hooks, s.table),
            "COMMIT\n",
        ]
    return "".join(parts)


# --- the fixed rules of the fixed chains (iptables and ipvs modes) ----------------------


def fixed_filter_rules(config: ProxierConfig) -> tuple[list[str], list[str]]:
    """(rules written before the services, rules written after), as upstream orders them."""
    before: list[str] = []
    if config.family is IPFamily.IPv4 and config.localhost_nodeports:
        # route_localnet opens 127.0.0.0/8 to the network (CVE-2020-8558); kubelet has this too.
        before.append(
            f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections"'
            " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT"
            " -j DROP"
        )
    mark = config.masquerade_mark
    after: list[str] = []
    if not config.conntrack_tcp_be_liberal:
        counted = (
            f" -m nfacct --nfacct-name {CT_STATE_INVALID_DROPPED_NFACCT_COUNTER}"
            if CT_STATE_INVALID_DROPPED_NFACCT_COUNTER in config.nfacct_counters
            else ""
        )
        after.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID{counted} -j DROP")
    after.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules"'
        f" -m mark --mark {mark}/{mark} -j ACCEPT"
    )
    after.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    return before, after


def fixed_nat_rules(config: ProxierConfig, *, random_fully: bool = True) -> list[str]:
    mark = config.masquerade_mark
    masquerade = (
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE"
    )
    return [
        f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        # Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
        f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
        masquerade + (" --random-fully" if random_fully else ""),
        f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
    ]
