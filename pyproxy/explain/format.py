"""The text `pyproxy explain` and `pyproxy trace` print: aligned tables and colour on a
terminal, plain lines when piped (`Style`); `-o json` skips this module.

Apart from the CLI so that tests can render a report without running a command, and so that
the wording lives in one place. No I/O beyond asking a stream whether it is a terminal.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import IO, Any

from pyproxy.explain.report import (
    Code,
    Connection,
    Explanation,
    Outcome,
    PacketReport,
    Severity,
    SourceKind,
    Usage,
    port_label,
)
from pyproxy.iptables.tracer import StepAction, Verdict
from pyproxy.model import IPFamily

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CODES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Style:
    """How to print: colour and aligned tables on a terminal, plain lines otherwise."""

    color: bool = False
    tables: bool = False

    @staticmethod
    def for_stream(stream: IO[str]) -> Style:
        tty = stream.isatty() and os.environ.get("TERM") != "dumb"
        return Style(color=tty and "NO_COLOR" not in os.environ, tables=tty)

    def paint(self, text: str, *styles: str) -> str:
        if not self.color or not styles or not text:
            return text
        return f"\x1b[{';'.join(_CODES[s] for s in styles)}m{text}\x1b[0m"


_OUTCOME_COLOR = {
    Outcome.ANSWERED: "green",
    Outcome.ACCEPTED: "green",
    Outcome.REJECTED: "red",
    Outcome.DROPPED: "red",
    Outcome.NOT_HANDLED: "yellow",
    Outcome.NOT_APPLICABLE: "yellow",
}
_SEVERITY_COLOR = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def _visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], style: Style, indent: str) -> str:
    widths = [_visible_len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], _visible_len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c + " " * (widths[i] - _visible_len(c)) for i, c in enumerate(cells[:-1])]
        return (indent + "  ".join([*parts, cells[-1]])).rstrip()

    return "\n".join([line([style.paint(h, "bold") for h in header]), *(line(r) for r in rows)])


def _yes(value: bool) -> str:
    return "yes" if value else "no"


_SHORT_WHY = {
    "not-ready": "not ready",
    "terminating": "terminating",
    "other-node-local-policy": "other node (Local)",
    "topology-other-zone": "other zone (hints)",
    "topology-other-node": "other node (hints)",
    "port-name-mismatch": "no such slice port",
    "other-address-family": "other IP family",
    "family-not-served": "family not served",
    "not-selected": "not selected",
}


def _usage_cell(usage: Usage | None, style: Style) -> str:
    """A table cell: the full reason is listed under the table."""
    if usage is None:
        return "-"
    if usage.used:
        note = " (terminating)" if usage.code == "terminating" else ""
        return style.paint("used", "green") + note
    return style.paint("not used", "red") + f": {_SHORT_WHY.get(usage.code, usage.code)}"


def _usage_text(usage: Usage | None, style: Style) -> str:
    if usage is None:
        return "-"
    if usage.used:
        return style.paint("used", "green") + (f" ({usage.reason})" if usage.reason else "")
    return style.paint("not used", "red") + f": {usage.reason}"


def _endpoint_section(ex: Explanation, style: Style) -> list[str]:
    views = ex.endpoints
    if not views:
        return []
    lines = [style.paint("Endpoints", "bold")]
    external = any(p.external is not None for v in views for p in v.ports)
    if style.tables:
        header = ["ADDRESS", "NODE", "ZONE", "READY", "SERVING", "TERMINATING", "PORT", "TARGET"]
        header += ["CLUSTER IP", "EXTERNAL"] if external else ["CLUSTER IP"]
        rows = []
        for v in views:
            for i, p in enumerate(v.ports or ()):
                first = i == 0
                row = [
                    v.address if first else "",
                    (v.node or "-") + (" (this)" if v.local and first else "") if first else "",
                    (v.zone or "-") if first else "",
                    _yes(v.ready) if first else "",
                    _yes(v.serving) if first else "",
                    _yes(v.terminating) if first else "",
                    p.service_port,
                    p.target or "-",
                    _usage_cell(p.internal, style),
                ]
                if external:
                    row.append(_usage_cell(p.external, style))
                rows.append(row)
        lines.append(_table(header, rows, style, "  "))
        why: dict[str, list[str]] = {}
        for v in views:
            for p in v.ports:
                for kind, usage in (("cluster IP", p.internal), ("external", p.external)):
                    if usage is not None and not usage.used:
                        why.setdefault(usage.reason, []).append(f"{v.address} {kind}")
        for reason, where in why.items():
            lines.append(f"    {style.paint(', '.join(where), 'dim')}: {reason}")
        return lines
    for v in views:
        facts = [f"node {v.node or '-'}" + (" (this node)" if v.local else "")]
        facts.append(f"zone {v.zone or '-'}")
        facts.append(f"slice {v.slice}")
        conditions = f"ready={_yes(v.ready)} serving={_yes(v.serving)}"
        conditions += f" terminating={_yes(v.terminating)}"
        if v.zone_hints:
            facts.append("hints for zones " + ",".join(v.zone_hints))
        if v.node_hints:
            facts.append("hints for nodes " + ",".join(v.node_hints))
        lines.append(f"  endpoint {v.address} ({', '.join(facts)}): {conditions}")
        for p in v.ports:
            text = f"    {p.service_port} -> {p.target or '-'}:"
            text += f" cluster IP {_usage_text(p.internal, style)}"
            if p.external is not None:
                text += f"; external {_usage_text(p.external, style)}"
            lines.append(text)
    return lines


def _connection_text(c: Connection, style: Style) -> tuple[str, str, str]:
    outcome = style.paint(str(c.outcome), _OUTCOME_COLOR[c.outcome], "bold")
    if c.outcome is not Outcome.ANSWERED:
        return f"{c.kind} {c.target}", outcome, c.reason
    masqueraded = [e for e in c.endpoints if e.masquerade]
    eps = ", ".join(
        f"{e.endpoint} ({e.probability:.0%}"
        + (", masqueraded)" if e.masquerade and len(masqueraded) < len(c.endpoints) else ")")
        for e in c.endpoints
    )
    if not masqueraded:
        masq = c.masquerade_reason or "source address kept"
    elif len(masqueraded) == len(c.endpoints):
        masq = f"masqueraded: {c.masquerade_reason}"
    else:
        masq = (
            "masqueraded only towards "
            + ", ".join(e.endpoint for e in masqueraded)
            + f": {c.masquerade_reason}"
        )
    detail = "; ".join([f"-> {eps}", masq, *c.notes])
    return f"{c.kind} {c.target}", outcome, detail


def _source_text(ex: Explanation, family: IPFamily) -> str:
    s = ex.sources.get(family)
    if s is None:
        return ""
    kind = {
        SourceKind.POD: "a pod",
        SourceKind.NODE: "this node",
        SourceKind.EXTERNAL: "an external client",
    }[s.kind]
    if s.example:
        where = "in --cluster-cidr" if s.kind is SourceKind.POD else "outside the cluster"
        kind += f", an example address {where}; use --from IP for another"
    return f"{s.address} ({kind})"


def format_explanation(ex: Explanation, style: Style = Style()) -> str:
    """The text `pyproxy explain` prints (plain when `style` says so)."""
    lines: list[str] = []
    b = style.tables  # terminal layout
    svc = ex.spec
    title = f"Service {ex.service}"
    if svc is None:
        ignored = ex.absent_reason is not None and Code.SERVICE_NOT_FOUND not in ex.codes
        state = "not handled by pyproxy" if ignored else "not found"
        lines.append(style.paint(title, "bold") + ": " + style.paint(state, "red"))
    else:
        lines.append(style.paint(title, "bold") + f" ({svc.type.value})")
        facts: list[tuple[str, str]] = [
            ("cluster IPs", ", ".join(str(ip) for ip in svc.cluster_ips)),
        ]
        if svc.external_ips:
            facts.append(("external IPs", ", ".join(str(ip) for ip in svc.external_ips)))
        if svc.load_balancer_ingress:
            facts.append(
                (
                    "load balancer",
                    ", ".join(
                        f"{i.ip} (ipMode {i.ip_mode.value})" for i in svc.load_balancer_ingress
                    ),
                )
            )
        if svc.load_balancer_source_ranges:
            facts.append(
                ("source ranges", ", ".join(str(n) for n in svc.load_balancer_source_ranges))
            )
        for p in svc.ports:
            target = ex.extras.target_ports.get((p.name, p.protocol))
            text = f"{port_label(p.name, p.protocol)} {p.port}"
            if target is not None:
                text += f" -> targetPort {target}"
            if p.node_port:
                text += f", nodePort {p.node_port}"
            facts.append(("port", text))
        policies = f"external {svc.external_traffic_policy.value}"
        if svc.needs_health_check:
            policies += f" (health check node port {svc.health_check_node_port})"
        policies += f", internal {svc.internal_traffic_policy.value}"
        facts.append(("traffic policy", policies))
        facts.append(
            (
                "session affinity",
                "none"
                if svc.session_affinity_timeout is None
                else f"ClientIP, {svc.session_affinity_timeout}s",
            )
        )
        if svc.traffic_distribution:
            facts.append(("traffic distribution", svc.traffic_distribution))
        if ex.extras.selector is not None:
            facts.append(
                (
                    "selector",
                    ",".join(f"{k}={v}" for k, v in sorted(ex.extras.selector.items())) or "none",
                )
            )
        width = max(len(k) for k, _ in facts) if b else 0
        for key, value in facts:
            lines.append(f"  {key.ljust(width)}  {value}" if b else f"  {key}: {value}")

    node = ex.node
    node_line = f"Node {node.name}"
    details = [f"zone {node.zone or '-'}"]
    if not node.known:
        details.append("not in the cluster state")
    details.append("IPs " + (", ".join(str(ip) for ip in node.ips) or "-"))
    if node.cluster_cidrs:
        details.append("cluster CIDR " + ", ".join(node.cluster_cidrs))
    if node.nodeport_ips is not None:
        details.append("NodePorts on " + (", ".join(str(ip) for ip in node.nodeport_ips) or "-"))
    lines.append(style.paint(node_line, "bold") + ": " + "; ".join(details))

    if svc is not None:
        lines.append("")
        if ex.slices:
            lines.append(style.paint("EndpointSlices", "bold"))
            for s in ex.slices:
                ports = (
                    ", ".join(f"{port_label(p.name, p.protocol)} {p.port}" for p in s.ports)
                    or "no ports"
                )
                lines.append(
                    f"  {s.name} ({s.address_type.value}; {ports};"
                    f" {len(s.endpoints)} endpoint{'s' if len(s.endpoints) != 1 else ''})"
                )
        else:
            lines.append(style.paint("EndpointSlices", "bold") + ": none")
        lines.extend(_endpoint_section(ex, style))

        lines.append("")
        by_family: dict[IPFamily, list[Connection]] = {}
        for c in ex.connections:
            by_family.setdefault(c.family, []).append(c)
        for family, conns in by_family.items():
            src = _source_text(ex, family)
            heading = "Connections" + (f" from {src}" if src else f" ({family.value})")
            lines.append(style.paint(heading, "bold"))
            rows = [_connection_text(c, style) for c in conns]
            if b:
                lines.append(_table(["TO", "OUTCOME", "DETAIL"], rows, style, "  "))
            for c, (to, outcome, detail) in zip(conns, rows, strict=True):
                if not b:
                    lines.append(f"  {to}: {outcome}: {detail}")
                    if c.path:
                        lines.append("    path: " + " > ".join(c.path))
                if c.outcome is not Outcome.ANSWERED and c.rule:
                    lines.append(f"    rule{f' ({to})' if b else ''}: {style.paint(c.rule, 'dim')}")
                lines.extend(f"    warning: {w}" for w in c.warnings)

    lines.append("")
    if ex.diagnoses:
        lines.append(style.paint("Diagnosis", "bold"))
        for d in ex.diagnoses:
            sev = style.paint(str(d.severity), _SEVERITY_COLOR[d.severity], "bold")
            lines.append(f"  {sev} {d.code}: {d.message}")
    else:
        lines.append(style.paint("Diagnosis", "bold") + ": no problem found")
    return "\n".join(lines).rstrip() + "\n"


def _step_line(step: Any, style: Style) -> str:
    action = step.action
    color = {
        StepAction.DNAT: "green",
        StepAction.VERDICT: "red" if step.target in ("DROP", "REJECT") else "green",
        StepAction.UNKNOWN: "yellow",
        StepAction.SKIPPED: "dim",
        StepAction.POLICY: "yellow",
    }.get(action)
    indent = "  " * step.depth
    where = f"{step.table}/{step.chain}" + (f" #{step.index}" if step.index else "")
    what = str(action) + (f" {step.target}" if step.target else "")
    text = f"{indent}{style.paint(where, 'bold')}: {style.paint(what, color) if color else what}"
    if step.note:
        text += f" ({step.note})"
    if step.rule and action is not StepAction.ENTER:
        text += "\n" + style.paint(f"{indent}    {step.rule}", "dim")
    return text


def format_packet_report(report: PacketReport, style: Style = Style(), *, source: str = "") -> str:
    t = report.trace
    lines = []
    head = (
        f"Packet {report.src} -> {report.dst}:{report.port}/{report.protocol.value}"
        f" ({report.family.value}, new connection"
        + (", sent by this node" if report.from_node else "")
        + ")"
    )
    if source:
        head += f"; rules from {source}"
    lines.append(style.paint(head, "bold"))
    verdict = str(t.verdict)
    color = (
        "green"
        if t.verdict in (Verdict.DNAT, Verdict.ACCEPT)
        else ("yellow" if t.verdict is Verdict.NONE else "red")
    )
    text = "verdict: " + style.paint(verdict, color, "bold")
    if t.verdict is Verdict.NONE:
        text += " (no rule decided: the packet goes on to its destination unchanged)"
    if t.branches:
        text += " -> " + ", ".join(
            f"{b.endpoint} ({b.probability:.0%}" + (", masqueraded)" if b.masquerade else ")")
            for b in t.branches
        )
    text += f"; masquerade: {_yes(t.masquerade)}"
    lines.append(text)
    lines.append("path: " + " > ".join(report.path))
    lines.append("")
    lines.append(style.paint("Steps", "bold"))
    lines.extend(_step_line(s, style) for s in t.steps)
    for w in t.warnings:
        lines.append(style.paint(f"warning: {w}", "yellow"))
    lines.append("")
    if report.drift is None:
        lines.append(
            "drift: not checked (pass --state FILE or --kubeconfig FILE with the node flags to"
            " compare with what pyproxy would program)"
        )
    elif not report.drift:
        lines.append(
            style.paint("drift: none", "green")
            + " (pyproxy's chains in the kernel match what it would program now)"
        )
    else:
        names = ", ".join(f"{d.table}/{d.chain}" for d in report.drift)
        lines.append(
            style.paint("warning: drift", "red", "bold")
            + f": the kernel's rules differ from what pyproxy would program now in {names}"
        )
        for d in report.drift:
            lines.append(f"  {style.paint(f'{d.table}/{d.chain}', 'bold')}: {d.kind}: {d.detail}")
            lines.extend(style.paint(f"    - {r}", "red") for r in d.missing_rules)
            lines.extend(style.paint(f"    + {r}", "yellow") for r in d.unexpected_rules)
        lines.append("  (- pyproxy would write it, the kernel lacks it; + only in the kernel)")
    return "\n".join(lines).rstrip() + "\n"
