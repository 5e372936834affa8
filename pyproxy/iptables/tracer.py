"""Trace a packet through iptables rules, on paper.

Why this exists: comparing rule text only proves pyproxy writes what we *think* kube-proxy
writes; tracing proves what the rules *do*. Upstream kube-proxy's proxier tests
(``tracePacket`` / ``runPacketFlowTests`` in ``pkg/proxy/iptables/proxier_test.go``) walk a
packet through the nat and filter rules and assert the endpoints it may reach, whether it is
masqueraded, or that it is REJECTed/DROPped. pyproxy's flow tests use the same model, and
``pyproxy trace``/``pyproxy explain`` use it to show an operator, chain by chain, what a given
packet would hit on a node (from the renderer's output or from ``iptables-save``).

Semantics (upstream's, made explicit; see ``trace_packet``):

- nat first: ``PREROUTING`` (``OUTPUT`` for a packet sent by the node itself), or directly
  ``KUBE-SERVICES`` when the built-in chains don't jump to any ``KUBE-*`` chain (the renderer's
  output: kube-proxy ensures those jumps separately).
- A matching ``-m statistic`` jump is a load-balancing *branch*: it is followed, and then, unlike
  the kernel, the walk continues with the next rule, so every endpoint is collected in rule
  order (each with its chance of being picked and its own masquerade flag).
- ``DNAT`` records the endpoint and ends that branch; ``MARK`` updates the packet mark (the
  masquerade bit makes ``masquerade`` true); ``RETURN``/falling off a user chain returns;
  falling off a built-in chain applies its policy.
- Matches that depend on state the tracer doesn't have never match (``-m recent --rcheck``,
  ``-m mark`` on unknown bits, ``-m conntrack``) unless the caller supplies that state.
  Matches it can't evaluate at all (unknown options, ``-m set``, ``-m physdev``, interfaces
  when none were given) never match either, and are reported as ``UNKNOWN`` steps.
- Then filter, with the destination rewritten to the first endpoint: either upstream's
  direct run of ``KUBE-SERVICES``, ``KUBE-EXTERNAL-SERVICES``, ``KUBE-NODEPORTS``,
  ``KUBE-PROXY-FIREWALL``, or (when the built-in chains jump to ``KUBE-*`` chains) a walk
  from ``INPUT``/``FORWARD``/``OUTPUT``. The first ACCEPT/REJECT/DROP is the filter verdict.

Pure: stdlib only, no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pyproxy.iptables.restore_text import (
    BUILTIN_TARGETS,
    Rule,
    Ruleset,
    RulesetParseError,
    Table,
    check_jumps,
    parse_rule,
    parse_ruleset,
    sort_ruleset_text,
)
from pyproxy.iptables.vocabulary import (
    KUBE_EXTERNAL_SERVICES,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
)

__all__ = [
    "DIRECT_FILTER_CHAINS",
    "Branch",
    "Rule",
    "Ruleset",
    "RulesetParseError",
    "Step",
    "StepAction",
    "Trace",
    "Verdict",
    "check_jumps",
    "parse_rule",
    "parse_ruleset",
    "sort_ruleset_text",
    "trace_packet",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Filter chains upstream's tracer runs directly, in this order.
DIRECT_FILTER_CHAINS = (
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
)

_NON_TERMINATING_TARGETS = frozenset(
    {
        "LOG", "NFLOG", "ULOG", "TRACE", "CONNMARK", "CT", "NOTRACK", "AUDIT", "CLASSIFY",
        "DSCP", "TOS", "TTL", "HL", "TCPMSS", "CHECKSUM", "SET", "SECMARK", "CONNSECMARK",
        "IDLETIMER", "LED", "HMARK", "TEE",
    }
)  # fmt: skip
_PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "udplite"})
_FULL_MARK = 0xFFFFFFFF


class Verdict(enum.StrEnum):
    """What finally happens to the packet, as far as these rules decide."""

    DNAT = "DNAT"  # sent to one of ``Trace.endpoints``
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    DROP = "DROP"
    NONE = "NONE"  # no rule decided: normal routing to the original destination


class StepAction(enum.StrEnum):
    ENTER = "enter"  # a pass starts at this chain (index 0)
    MATCHED = "matched"  # matched; no target or a non-terminating one (LOG, MARK, ...)
    JUMPED = "jumped"  # -j CHAIN
    GOTO = "goto"  # -g CHAIN
    BRANCHED = "branched"  # -m statistic ... -j CHAIN: one load-balancing branch
    DNAT = "dnat"
    VERDICT = "verdict"  # ACCEPT/REJECT/DROP (or SNAT/MASQUERADE/REDIRECT ending nat)
    RETURNED = "returned"  # RETURN rule, or fell off a user chain (index 0)
    POLICY = "policy"  # fell off a built-in chain (index 0)
    SKIPPED = "skipped"  # would need state the tracer doesn't have (conntrack, mark, recent)
    UNKNOWN = "unknown"  # can't evaluate (unsupported option, ipset, interface, loop)


@dataclass(frozen=True, slots=True)
class Step:
    """One thing that happened; ``index`` is the 1-based rule number (0: chain-level event)."""

    table: str
    chain: str
    index: int
    rule: str
    action: StepAction
    target: str | None = None
    depth: int = 0
    note: str = ""

    def describe(self) -> str:
        where = f"{self.table}/{self.chain}"
        where += f" #{self.index}" if self.index else ""
        what = str(self.action) + (f" {self.target}" if self.target else "")
        text = f"{'  ' * self.depth}{where}: {what}"
        if self.note:
            text += f" ({self.note})"
        if self.rule:
            text += f"\n{'  ' * self.depth}    {self.rule}"
        return text


@dataclass(frozen=True, slots=True)
class Branch:
    """One possible DNAT outcome of the nat pass."""

    endpoint: str  # as in --to-destination: "10.180.0.1:80", "[fd00::1]:80"
    masquerade: bool  # this path set the masquerade mark
    probability: float  # chance of this path, from the statistic cascade


@dataclass(frozen=True, slots=True)
class Trace:
    verdict: Verdict
    endpoints: tuple[str, ...]
    masquerade: bool
    steps: tuple[Step, ...]
    branches: tuple[Branch, ...] = ()
    filter_verdict: Verdict | None = None  # ACCEPT/REJECT/DROP decided in filter, if any
    warnings: tuple[str, ...] = ()

    @property
    def output(self) -> str:
        """Upstream's compact result: endpoints then filter verdict, joined by ", ".

        "" when nothing matched (upstream's "no match"), e.g. "10.180.0.4:80, 10.180.0.5:80",
        "REJECT", "DROP".
        """
        outs = list(self.endpoints)
        if self.filter_verdict is not None:
            outs.append(str(self.filter_verdict))
        return ", ".join(outs)

    def describe(self) -> str:
        """Multi-line, indented human-readable path (what ``pyproxy trace`` prints)."""
        lines = [s.describe() for s in self.steps]
        head = f"verdict: {self.verdict}"
        if self.branches:
            eps = ", ".join(f"{b.endpoint} ({b.probability:.0%})" for b in self.branches)
            head += f" -> {eps}"
        head += f"; masquerade: {'yes' if self.masquerade else 'no'}"
        return "\n".join([head, *lines, *(f"warning: {w}" for w in self.warnings)])


# ---------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Packet:
    src: IPAddress
    dst: IPAddress
    protocol: str
    dport: int
    sport: int | None
    src_local: bool
    dst_local: bool
    in_interface: str | None
    out_interface: str | None
    ctstates: frozenset[str] | None


@dataclass(slots=True)
class _PathState:
    mark: int
    known: int  # which mark bits are known
    masq: bool
    chance: float
    recent: dict[str, set[str]] | None

    def fork(self, chance: float) -> _PathState:
        recent = None if self.recent is None else {k: set(v) for k, v in self.recent.items()}
        return _PathState(self.mark, self.known, self.masq, chance, recent)


class _Eval(enum.Enum):
    MATCH = 0
    NO_MATCH = 1
    NEEDS_STATE = 2
    UNKNOWN = 3


def _iface_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _addrtype_matches(types: str, local: bool, ip: IPAddress) -> bool:
    if local:
        kind = "LOCAL"
    elif ip.is_multicast:
        kind = "MULTICAST"
    elif ip.version == 4 and int(ip) == 0xFFFFFFFF:
        kind = "BROADCAST"
    else:
        kind = "UNICAST"
    return kind in types.upper().split(",")


def _evaluate(rule: Rule, pkt: _Packet, state: _PathState) -> tuple[_Eval, str]:
    """Whether ``rule``'s match part matches; cheap and selective checks first."""
    if rule.dport is not None and (
        pkt.protocol not in _PORT_PROTOCOLS or not rule.dport.matches(pkt.dport)
    ):
        return _Eval.NO_MATCH, ""
    if rule.protocol is not None:
        value = rule.protocol.value
        hit = value in ("all", "0") or value == pkt.protocol
        if hit == rule.protocol.negated:
            return _Eval.NO_MATCH, ""
    if rule.destination is not None:
        res = rule.destination.matches(pkt.dst)
        if res is False:
            return _Eval.NO_MATCH, ""
        unknown_dst = res is None
    else:
        unknown_dst = False
    if rule.source is not None:
        res = rule.source.matches(pkt.src)
        if res is False:
            return _Eval.NO_MATCH, ""
        unknown_src = res is None
    else:
        unknown_src = False
    if rule.dst_type is not None and (
        _addrtype_matches(rule.dst_type.value, pkt.dst_local, pkt.dst) == rule.dst_type.negated
    ):
        return _Eval.NO_MATCH, ""
    if rule.src_type is not None and (
        _addrtype_matches(rule.src_type.value, pkt.src_local, pkt.src) == rule.src_type.negated
    ):
        return _Eval.NO_MATCH, ""

    reasons: list[str] = []
    if unknown_dst:
        reasons.append(f"destination {rule.destination.value if rule.destination else ''}")
    if unknown_src:
        reasons.append(f"source {rule.source.value if rule.source else ''}")
    if rule.sport is not None:
        if pkt.sport is None:
            reasons.append("source port not given")
        elif pkt.protocol not in _PORT_PROTOCOLS or not rule.sport.matches(pkt.sport):
            return _Eval.NO_MATCH, ""
    for iface, name, label in (
        (rule.in_interface, pkt.in_interface, "input interface"),
        (rule.out_interface, pkt.out_interface, "output interface"),
    ):
        if iface is None:
            continue
        if name is None:
            reasons.append(f"{label} not given")
        elif _iface_matches(iface.value, name) == iface.negated:
            return _Eval.NO_MATCH, ""
    if rule.match_set is not None:
        reasons.append(f"ipset {rule.match_set.name} contents unknown")
    if rule.physdev:
        reasons.append("physdev (bridge) match")
    if rule.unknown:
        reasons.append("unsupported " + ", ".join(rule.unknown))

    needs: list[str] = []
    if rule.mark is not None:
        m = rule.mark
        if m.mask & ~state.known & _FULL_MARK:
            needs.append("packet mark")
        elif ((state.mark & m.mask) == m.value) == m.negated:
            return _Eval.NO_MATCH, ""
    if rule.ctstate is not None:
        if pkt.ctstates is None:
            needs.append("conntrack state")
        elif bool(rule.ctstate.states & pkt.ctstates) == rule.ctstate.negated:
            return _Eval.NO_MATCH, ""
    rc = rule.recent
    if rc is not None and rc.action in ("rcheck", "update", "remove"):
        if state.recent is None:
            needs.append(f"recent list {rc.name} (ClientIP affinity)")
        else:
            addr = str(pkt.dst if rc.rdest else pkt.src)
            if (addr in state.recent.get(rc.name, ())) == rc.negated:
                return _Eval.NO_MATCH, ""

    if reasons:
        return _Eval.UNKNOWN, "; ".join(reasons)
    if needs:
        return _Eval.NEEDS_STATE, "needs " + ", ".join(needs)
    return _Eval.MATCH, ""


def _split_endpoint(dest: str) -> tuple[str, int | None]:
    """Host and port of a --to-destination value (first of any range)."""
    if dest.startswith("["):
        host, _, rest = dest[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif dest.count(":") == 1:
        host, _, port_s = dest.partition(":")
    else:
        host, port_s = dest, ""  # bare IPv4 or bare IPv6
    host = host.split("-")[0]
    port_s = port_s.split("-")[0]
    return host, (int(port_s) if port_s.isdigit() else None)


class _Tracer:
    """Accumulates what all passes over one packet found."""

    def __init__(self, local: frozenset[IPAddress], masquerade_mark: int) -> None:
        self.local = local
        self.masquerade_mark = masquerade_mark
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        self.branches: list[Branch] = []
        self.branch_states: list[_PathState] = []
        self.filter_verdict: Verdict | None = None

    def is_local(self, ip: IPAddress) -> bool:
        return ip in self.local or ip.is_loopback

    def run(self, table: Table, start: str, pkt: _Packet, state: _PathState) -> bool:
        """Run one pass from ``start``; True when it ended on a terminal target."""
        self.steps.append(Step(table.name, start, 0, "", StepAction.ENTER))
        return _Pass(self, table, pkt).run_chain(start, state, 0)


class _Pass:
    """One walk through one table for one packet (destination fixed)."""

    def __init__(self, tracer: _Tracer, table: Table, pkt: _Packet) -> None:
        self.tracer = tracer
        self.table = table
        self.pkt = pkt
        self.stack: list[str] = []

    def step(
        self,
        chain: str,
        index: int,
        rule: str,
        action: StepAction,
        *,
        target: str | None = None,
        depth: int = 0,
        note: str = "",
    ) -> None:
        self.tracer.steps.append(
            Step(self.table.name, chain, index, rule, action, target, depth, note)
        )

    def warn(self, chain: str, index: int, text: str) -> None:
        self.tracer.warnings.append(f"{self.table.name}/{chain} #{index}: {text}")

    def run_chain(self, name: str, state: _PathState, depth: int) -> bool:
        """Walk one chain; True when the packet hit a terminal target (DNAT, verdict)."""
        table = self.table
        chain = table.chain(name)
        if chain is None or chain.deleted:
            self.tracer.warnings.append(f"{table.name}: jump to missing chain {name}")
            return False
        if name in self.stack:
            self.tracer.warnings.append(f"{table.name}: chain loop through {name}")
            return False
        pkt = self.pkt
        self.stack.append(name)
        try:
            for index, rule in enumerate(chain.rules, 1):
                result, why = _evaluate(rule, pkt, state)
                if result is _Eval.NO_MATCH:
                    continue
                if result is _Eval.UNKNOWN:
                    self.step(
                        name,
                        index,
                        rule.raw,
                        StepAction.UNKNOWN,
                        target=rule.target,
                        depth=depth,
                        note=f"can't evaluate: {why}; assumed no match",
                    )
                    self.warn(name, index, f"can't evaluate: {why}")
                    continue
                if result is _Eval.NEEDS_STATE:
                    self.step(
                        name,
                        index,
                        rule.raw,
                        StepAction.SKIPPED,
                        target=rule.target,
                        depth=depth,
                        note=why,
                    )
                    continue
                rc = rule.recent
                if rc is not None and rc.action == "set" and state.recent is not None:
                    addr = str(pkt.dst if rc.rdest else pkt.src)
                    state.recent.setdefault(rc.name, set()).add(addr)
                terminated = self.apply_target(name, index, rule, state, depth)
                if terminated is not None:
                    return terminated
            if name in table.builtin_chains:
                policy = chain.policy or "ACCEPT"
                self.step(name, 0, "", StepAction.POLICY, target=policy, depth=depth)
                if policy in ("DROP", "REJECT"):
                    self.tracer.filter_verdict = Verdict(policy)
                    return True
                return False
            if depth:  # at depth 0 the next ENTER step already shows the pass ended
                self.step(name, 0, "", StepAction.RETURNED, depth=depth, note="end of chain")
            return False
        finally:
            self.stack.pop()

    def apply_target(
        self, name: str, index: int, rule: Rule, state: _PathState, depth: int
    ) -> bool | None:
        """Act on a matched rule: None = continue with the next rule, else return that."""
        tracer = self.tracer
        target = rule.target
        raw = rule.raw

        if target is None:
            self.step(name, index, raw, StepAction.MATCHED, depth=depth)
            return None
        if target == "RETURN":
            self.step(name, index, raw, StepAction.RETURNED, depth=depth)
            return False
        if target in ("ACCEPT", "DROP", "REJECT"):
            self.step(name, index, raw, StepAction.VERDICT, target=target, depth=depth)
            if not (self.table.name == "nat" and target == "ACCEPT"):  # that only ends nat
                tracer.filter_verdict = Verdict(target)
            return True
        if target == "DNAT":
            dest = rule.to_destination or ""
            self.step(name, index, raw, StepAction.DNAT, target=dest, depth=depth)
            tracer.branches.append(Branch(dest, state.masq, state.chance))
            tracer.branch_states.append(state.fork(state.chance))
            return True
        if target in ("SNAT", "MASQUERADE", "REDIRECT", "NETMAP", "TPROXY"):
            note = "" if target in ("SNAT", "MASQUERADE") else "not modelled"
            self.step(name, index, raw, StepAction.VERDICT, target=target, depth=depth, note=note)
            if note:
                self.warn(name, index, f"{target} {note}")
            return True
        if target == "MARK" and rule.set_mark is not None:
            before = state.mark
            state.mark = rule.set_mark.apply(state.mark)
            state.known = rule.set_mark.apply_known(state.known)
            note = f"mark {before:#x} -> {state.mark:#x}"
            if state.mark & state.known & tracer.masquerade_mark:
                state.masq = True
                note += " (masquerade)"
            self.step(name, index, raw, StepAction.MATCHED, target="MARK", depth=depth, note=note)
            return None
        if target in _NON_TERMINATING_TARGETS or target == "MARK":
            self.step(
                name,
                index,
                raw,
                StepAction.MATCHED,
                target=target,
                depth=depth,
                note="non-terminating target",
            )
            return None
        if self.table.chain(target) is None and target in BUILTIN_TARGETS:
            self.step(
                name,
                index,
                raw,
                StepAction.UNKNOWN,
                target=target,
                depth=depth,
                note="target not modelled; assumed to continue",
            )
            self.warn(name, index, f"target {target} not modelled")
            return None

        # A user chain.
        chance = rule.probability
        if rule.statistic is not None and (chance is None or chance < 1.0):
            if chance is None:
                self.step(
                    name,
                    index,
                    raw,
                    StepAction.UNKNOWN,
                    target=target,
                    depth=depth,
                    note="statistic match without a probability",
                )
                self.warn(name, index, "statistic match without a probability")
                return None
            self.step(
                name,
                index,
                raw,
                StepAction.BRANCHED,
                target=target,
                depth=depth,
                note=f"probability {rule.statistic.probability or chance}",
            )
            self.run_chain(target, state.fork(state.chance * chance), depth + 1)
            state.chance *= 1.0 - chance
            return None
        if rule.goto is not None:
            self.step(name, index, raw, StepAction.GOTO, target=target, depth=depth)
            # The goto'd chain returns to our caller: this chain ends here either way.
            return self.run_chain(target, state, depth + 1)
        self.step(name, index, raw, StepAction.JUMPED, target=target, depth=depth)
        if self.run_chain(target, state, depth + 1):
            return True
        return None


def _jumps_to_kube(table: Table | None, chains: Iterable[str]) -> bool:
    if table is None:
        return False
    for name in chains:
        chain = table.chain(name)
        if chain is None:
            continue
        for t in chain.targets():
            if t is not None and t.startswith("KUBE-"):
                return True
    return False


def _parse_states(ctstate: str | Iterable[str] | None) -> frozenset[str] | None:
    if ctstate is None:
        return None
    parts = ctstate.split(",") if isinstance(ctstate, str) else list(ctstate)
    return frozenset(p.strip().upper() for p in parts if p.strip())


def trace_packet(
    ruleset: Ruleset,
    *,
    src: str,
    dst: str,
    dport: int,
    protocol: str = "tcp",
    local_ips: Iterable[str],
    from_node: bool = False,
    sport: int | None = None,
    ctstate: str | Iterable[str] | None = None,
    mark: int | None = None,
    recent: Mapping[str, Iterable[str]] | None = None,
    in_interface: str | None = None,
    out_interface: str | None = None,
    entry: Literal["auto", "builtin", "kube"] = "auto",
    masquerade_mark: int = 0x4000,
) -> Trace:
    """Follow one packet through nat then filter and report where it can end up.

    ``local_ips`` are the node's addresses (``--src-type/--dst-type LOCAL``; 127.0.0.0/8 and
    ::1 are always local). ``from_node`` starts in the OUTPUT chains and treats ``src`` as
    local. State the rules may test is unknown unless given: ``ctstate`` ("NEW", or a
    collection/comma list; "DNAT" is added after a DNAT), ``mark`` (initial packet mark),
    ``recent`` (recent-list name -> addresses in it, e.g. ``{"KUBE-SEP-X": ["10.0.0.2"]}`` for
    an existing ClientIP affinity), ``sport``, ``in_interface``/``out_interface``.
    ``entry`` picks the starting chains: "kube" = upstream's direct run of the KUBE-*
    chains, "builtin" = walk from PREROUTING/OUTPUT and INPUT/FORWARD/OUTPUT, "auto" = per
    table, "builtin" when a built-in chain jumps to a ``KUBE-*`` chain.
    Raises ValueError for invalid addresses or mixed IP families.
    """
    src_ip = ipaddress.ip_address(src)
    dst_ip = ipaddress.ip_address(dst)
    if src_ip.version != dst_ip.version:
        raise ValueError(f"mixed IP families: {src} -> {dst}")
    local = {ipaddress.ip_address(ip) for ip in local_ips}
    if from_node:
        local.add(src_ip)
    tracer = _Tracer(frozenset(local), masquerade_mark)
    proto = protocol.lower()
    states = _parse_states(ctstate)
    pkt = _Packet(
        src=src_ip,
        dst=dst_ip,
        protocol=proto,
        dport=dport,
        sport=sport,
        src_local=tracer.is_local(src_ip),
        dst_local=tracer.is_local(dst_ip),
        in_interface=in_interface,
        out_interface=out_interface,
        ctstates=states,
    )
    state = _PathState(
        mark=mark or 0,
        known=_FULL_MARK if mark is not None else 0,
        masq=False,
        chance=1.0,
        recent=None if recent is None else {k: set(v) for k, v in recent.items()},
    )
    if mark is not None and mark & masquerade_mark:
        state.masq = True

    # --- nat ---
    nat = ruleset.table("nat")
    if nat is not None:
        use_builtin = entry == "builtin" or (
            entry == "auto" and _jumps_to_kube(nat, ("PREROUTING", "OUTPUT"))
        )
        start = ("OUTPUT" if from_node else "PREROUTING") if use_builtin else "KUBE-SERVICES"
        if nat.chain(start) is not None:
            tracer.run(nat, start, pkt, state)

    # --- filter, after DNAT ---
    masq = state.masq or any(b.masquerade for b in tracer.branches)
    endpoints = tuple(b.endpoint for b in tracer.branches)
    filt = ruleset.table("filter")
    if filt is not None and tracer.filter_verdict is None:
        fstate = tracer.branch_states[0] if tracer.branch_states else state
        fpkt = pkt
        if tracer.branches:
            host, port = _split_endpoint(tracer.branches[0].endpoint)
            try:
                new_dst = ipaddress.ip_address(host)
            except ValueError:
                tracer.warnings.append(f"can't parse DNAT destination {host!r}")
                new_dst = pkt.dst
            fpkt = _Packet(
                src=pkt.src,
                dst=new_dst,
                protocol=pkt.protocol,
                dport=port if port is not None else pkt.dport,
                sport=pkt.sport,
                src_local=pkt.src_local,
                dst_local=tracer.is_local(new_dst),
                in_interface=pkt.in_interface,
                out_interface=pkt.out_interface,
                ctstates=None if states is None else states | {"DNAT"},
            )
        use_builtin = entry == "builtin" or (
            entry == "auto" and _jumps_to_kube(filt, ("INPUT", "FORWARD", "OUTPUT"))
        )
        if use_builtin:
            start_chains: tuple[str, ...] = (
                ("OUTPUT",) if from_node else ("INPUT",) if fpkt.dst_local else ("FORWARD",)
            )
        else:
            start_chains = DIRECT_FILTER_CHAINS
        for start in start_chains:
            if filt.chain(start) is None:
                continue
            if tracer.run(filt, start, fpkt, fstate) and tracer.filter_verdict:
                break

    fv = tracer.filter_verdict
    verdict: Verdict
    if fv in (Verdict.DROP, Verdict.REJECT):
        verdict = fv
    elif endpoints:
        verdict = Verdict.DNAT
    elif fv is not None:
        verdict = fv
    else:
        verdict = Verdict.NONE
    return Trace(
        verdict=verdict,
        endpoints=endpoints,
        masquerade=masq,
        steps=tuple(tracer.steps),
        branches=tuple(tracer.branches),
        filter_verdict=fv,
        warnings=tuple(dict.fromkeys(tracer.warnings)),
    )
