"""`pyproxy explain` and `pyproxy trace`: the shell around `pyproxy.explain`.

    pyproxy explain SERVICE [-n NS] [--port P] [--protocol tcp|udp|sctp] [--from IP|node]
                    [--state FILE | --kubeconfig FILE] [node and rule flags] [-o text|json]
    pyproxy trace --src IP --dst IP --port P [--protocol tcp|udp|sctp] [--from-node]
                  [--iptables-backend auto|legacy|nft] [--state FILE | --kubeconfig FILE]
                  [node and rule flags] [-o text|json]

`explain` loads Services, EndpointSlices and Nodes (a state file, or one list of each from the
API server), works out what this node would program, and explains one Service in plain words.
`trace` follows one new connection through the rules actually in the kernel (iptables-save)
and, given the cluster state, reports chains that differ from what pyproxy would program now.

The node and rule flags are pyproxy's own (`--hostname-override`, `--node-ip`,
`--cluster-cidr`, `--masquerade-all`, `--nodeport-addresses`,
`--iptables-localhost-nodeports`, `--iptables-masquerade-bit`, `--feature-gates`): they are
forwarded to `options.parse_options`, so they mean and validate exactly what they do for the
proxy. Without `--state` or `--kubeconfig`, explain uses $KUBECONFIG, then ~/.kube/config, then
the in-cluster service account.

Output: tables and colour on a terminal, plain lines when piped, `-o json` for programs (keys
documented in `pyproxy.explain`). Exit codes: 0 done, 1 the Service does not exist / cannot load
or read the rules, 2 bad flags.

`python -m pyproxy.explain_cli explain ...` / `... trace ...` runs these without pyproxy's CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pyproxy.convert import state_from_objects
from pyproxy.errors import ConfigError, PyproxyError
from pyproxy.explain import (
    Code,
    Connection,
    Explanation,
    Outcome,
    PacketReport,
    ServiceExtras,
    Severity,
    SourceKind,
    Usage,
    desired_document,
    explain_service,
    port_label,
    trace_saved,
)
from pyproxy.iptables.tracer import StepAction, Verdict
from pyproxy.model import (
    LABEL_SERVICE_PROXY_NAME,
    ClusterState,
    IPFamily,
    NamespacedName,
    Protocol,
)
from pyproxy.options import ProxyOptions, parse_options, proxier_configs
from pyproxy.proxystate import ProxierConfig

if TYPE_CHECKING:
    from pyproxy.sources.watch import ApiConnection

ApiObject = Mapping[str, Any]

#: One-shot lists (`list_objects`): page size and read timeout per page.
_LIST_PAGE_SIZE = "500"
_LIST_TIMEOUT = 60.0


# --- arguments ---------------------------------------------------------------------------


class _Forward(argparse.Action):
    """Collects a pyproxy flag (and its value) for `options.parse_options`."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        forwarded: list[str] = getattr(namespace, "proxy_argv", None) or []
        forwarded.append(option_string or self.dest)
        if isinstance(values, str):
            forwarded.append(values)
        namespace.proxy_argv = forwarded


def _add_proxy_flags(p: argparse.ArgumentParser, *, backend: bool) -> None:
    g = p.add_argument_group(
        "node and rule flags (as for pyproxy itself: they shape the rules explained)"
    )
    for flag, metavar, help_text in (
        (
            "--state",
            "FILE",
            "cluster state file (kubectl get services,endpointslices,nodes -A -o yaml)",
        ),
        ("--kubeconfig", "FILE", "list Services, EndpointSlices and Nodes from this cluster"),
        ("--hostname-override", "NAME", "the node to explain from (default: this host's name)"),
        ("--cluster-cidr", "CIDR[,CIDR]", "pod CIDRs (local-traffic detection)"),
        ("--nodeport-addresses", "CIDR[,CIDR]|primary", "addresses NodePorts answer on"),
        ("--iptables-masquerade-bit", "N", "masquerade mark bit (default 14)"),
        ("--feature-gates", "KEY=BOOL,...", "as kube-proxy v1.34.4 (see pyproxy --help)"),
    ):
        g.add_argument(flag, action=_Forward, metavar=metavar, help=help_text)
    g.add_argument(
        "--node-ip",
        action=_Forward,
        metavar="IP",
        help="a node IP (repeatable; default: the Node object's addresses, else the host's)",
    )
    for flag, help_text in (
        ("--masquerade-all", "masquerade all traffic to cluster IPs"),
        ("--iptables-localhost-nodeports", "allow NodePorts on 127.0.0.1 (default true)"),
    ):
        g.add_argument(flag, action=_Forward, nargs="?", metavar="BOOL", help=help_text)
    if backend:
        g.add_argument(
            "--iptables-backend",
            action=_Forward,
            metavar="auto|legacy|nft",
            help="which iptables holds the rules (default: detected)",
        )


def _protocol(value: str) -> Protocol:
    try:
        return Protocol(value.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown protocol {value!r} (tcp, udp, sctp)") from None


def _ip_text(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address {value!r}") from None


def _source(value: str) -> str:
    return "node" if value == "node" else _ip_text(value)


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r} (1-65535)")
    return int(value)


def explain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyproxy explain",
        description="Explain in plain words why a Service does or does not answer from a node.",
    )
    p.add_argument("service", metavar="SERVICE", help="the Service, NAME or NAMESPACE/NAME")
    p.add_argument("-n", "--namespace", default=None, help="its namespace (default: default)")
    p.add_argument(
        "--port", default=None, metavar="P", help="only this port (number, name or nodePort)"
    )
    p.add_argument("--protocol", type=_protocol, default=None, help="only this protocol")
    p.add_argument(
        "--from",
        dest="source",
        type=_source,
        default=None,
        metavar="IP|node",
        help="the client (default: a pod address in --cluster-cidr, else an external address)",
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    _add_proxy_flags(p, backend=False)
    return p


def trace_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyproxy trace",
        description=(
            "Follow one new connection through the iptables rules programmed in this network"
            " namespace; with --state or --kubeconfig, also report rules that differ from what"
            " pyproxy would program now."
        ),
    )
    p.add_argument("--src", type=_ip_text, default=None, metavar="IP", help="source address")
    p.add_argument("--dst", type=_ip_text, required=True, metavar="IP", help="destination")
    p.add_argument("--port", type=_port, required=True, metavar="P", help="destination port")
    p.add_argument("--protocol", type=_protocol, default=Protocol.TCP)
    p.add_argument(
        "--from-node",
        action="store_true",
        help="the packet is sent by this node itself (OUTPUT; default source: its own address)",
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    _add_proxy_flags(p, backend=True)
    return p


def _options(args: argparse.Namespace) -> ProxyOptions:
    options = parse_options(getattr(args, "proxy_argv", None) or [])
    if options.state and options.kubeconfig:
        raise ConfigError("--state and --kubeconfig exclude each other")
    return options


# --- loading -----------------------------------------------------------------------------


def _list_path(
    api: ApiConnection, path: str, kind: str, label_selector: str = ""
) -> list[ApiObject]:
    """Every object at `path`, page by page; items get their `kind` back."""
    import orjson
    import urllib3

    out: list[ApiObject] = []
    token = ""
    while True:
        params = {"limit": _LIST_PAGE_SIZE}
        if label_selector:
            params["labelSelector"] = label_selector
        if token:
            params["continue"] = token
        try:
            response = api.get(path, params, read_timeout=_LIST_TIMEOUT)
            try:
                body = response.read()
                status = response.status
            finally:
                response.release_conn()
        except (OSError, urllib3.exceptions.HTTPError) as err:
            raise PyproxyError(f"cannot list {path} from the API server: {err}") from err
        if status != 200:
            raise PyproxyError(
                f"cannot list {path}: HTTP {status}: {body[:300].decode(errors='replace')}"
            )
        decoded = orjson.loads(body)
        for item in decoded.get("items") or ():
            if isinstance(item, dict):
                out.append(item if "kind" in item else {**item, "kind": kind})
        token = (decoded.get("metadata") or {}).get("continue") or ""
        if not token:
            return out


def default_kubeconfig() -> str | None:
    """$KUBECONFIG (first file), else ~/.kube/config if it exists, else None (in-cluster)."""
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), None)
    if first:
        return first
    home = Path.home() / ".kube" / "config"
    return str(home) if home.is_file() else None


def list_objects(kubeconfig: str | None) -> list[ApiObject]:
    """One list of Services, EndpointSlices and Nodes, with the client configuration pyproxy
    itself uses (kubeconfig file, or in-cluster when None). Services are listed without
    kube-proxy's label selector so that explain can say why a Service is ignored."""
    from pyproxy.sources import kube

    api = kube.connect(kubeconfig)
    try:
        return [
            *_list_path(api, kube.SERVICES_PATH, "Service"),
            *_list_path(
                api,
                kube.ENDPOINT_SLICES_PATH,
                "EndpointSlice",
                label_selector=kube.PROXY_LABEL_SELECTOR,
            ),
            *_list_path(api, kube.NODES_PATH, "Node"),
        ]
    finally:
        api.close()


def load_from_api(kubeconfig: str | None) -> ClusterState:
    """The cluster state from one list of each kind (invalid objects are left out, as the proxy
    leaves them out). Raises ConfigError for a bad kubeconfig, PyproxyError when a list fails."""
    cluster, _problems = state_from_objects(list_objects(kubeconfig))
    return cluster


def load_objects(options: ProxyOptions) -> list[ApiObject]:
    if options.state:
        from pyproxy.sources.statefile import read_objects

        return list(read_objects(Path(options.state)))
    return list_objects(options.kubeconfig or default_kubeconfig())


def service_extras(objects: Sequence[ApiObject], name: NamespacedName) -> ServiceExtras:
    """What the model does not keep about the Service: selector, targetPorts, and why it is
    ignored when it is (read from the raw object, leniently: convert validates the rest)."""
    for obj in objects:
        meta = obj.get("metadata")
        if obj.get("kind") != "Service" or not isinstance(meta, Mapping):
            continue
        if meta.get("namespace") != name.namespace or meta.get("name") != name.name:
            continue
        spec = obj.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        raw_selector = spec.get("selector")
        selector = (
            {str(k): str(v) for k, v in raw_selector.items()}
            if isinstance(raw_selector, Mapping)
            else {}
        )
        target_ports: dict[tuple[str, Protocol], str] = {}
        for raw in spec.get("ports") or ():
            if not isinstance(raw, Mapping):
                continue
            try:
                protocol = Protocol(str(raw.get("protocol") or "TCP"))
            except ValueError:
                continue
            target = raw.get("targetPort")
            if target is not None:
                target_ports[(str(raw.get("name") or ""), protocol)] = str(target)
        labels = meta.get("labels")
        labels = labels if isinstance(labels, Mapping) else {}
        absent = None
        if LABEL_SERVICE_PROXY_NAME in labels:
            absent = (
                f"the Service is labelled {LABEL_SERVICE_PROXY_NAME}="
                f"{labels[LABEL_SERVICE_PROXY_NAME]}: another service proxy handles it, so"
                " pyproxy (like kube-proxy) ignores it"
            )
        elif spec.get("type") == "ExternalName":
            absent = (
                "the Service is of type ExternalName: a DNS alias (CNAME) without a cluster IP;"
                " no proxy rules exist for it"
            )
        elif _first_cluster_ip(spec) in ("None", ""):
            absent = (
                "the Service is headless (clusterIP: None): DNS returns the pod addresses"
                " directly; no proxy rules exist for it"
            )
        return ServiceExtras(selector, target_ports, absent)
    return ServiceExtras()


def _first_cluster_ip(spec: Mapping[str, Any]) -> str:
    ips = spec.get("clusterIPs")
    if isinstance(ips, list) and ips:
        return str(ips[0])
    return str(spec.get("clusterIP") or "")


def node_configs(options: ProxyOptions, cluster: ClusterState) -> tuple[ProxierConfig, ...]:
    """The per-family configs of the node explained, as the proxy would build them."""
    node = cluster.nodes.get(options.node_name)
    if not options.node_ips and (node is None or not node.addresses):
        from pyproxy.hostnet import host_addresses

        return proxier_configs(options, node, host_addresses())
    return proxier_configs(options, node, ())


# --- text output -------------------------------------------------------------------------

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


# --- entry points ------------------------------------------------------------------------


def _fail(prog: str, err: BaseException, code: int) -> int:
    print(f"{prog}: {err}", file=sys.stderr)
    return code


def _write(stream: IO[str], data: Mapping[str, object]) -> None:
    stream.write(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    """`pyproxy explain ARGS`: `argv` is what follows the word `explain`."""
    out = stdout or sys.stdout
    args = explain_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        options = _options(args)
    except ConfigError as err:
        return _fail("pyproxy explain", err, 2)
    namespace, _, name = args.service.rpartition("/")
    if namespace and args.namespace and namespace != args.namespace:
        return _fail("pyproxy explain", ConfigError("two different namespaces given"), 2)
    service = NamespacedName(namespace or args.namespace or "default", name)
    try:
        objects = load_objects(options)
        cluster, problems = state_from_objects(objects)
        configs = node_configs(options, cluster)
        explanation = explain_service(
            cluster,
            configs,
            service,
            port=args.port,
            protocol=args.protocol,
            source=args.source,
            extras=service_extras(objects, service),
            problems=problems,
        )
    except ConfigError as err:
        return _fail("pyproxy explain", err, 2)
    except PyproxyError as err:
        return _fail("pyproxy explain", err, 1)
    if args.output == "json":
        _write(out, explanation.to_json())
    else:
        out.write(format_explanation(explanation, Style.for_stream(out)))
    return 0 if explanation.found else 1


def _local_ips(options: ProxyOptions, family: IPFamily) -> list[str]:
    from pyproxy.hostnet import host_addresses

    ips = {*options.node_ips, *host_addresses()}
    return sorted(str(ip) for ip in ips if IPFamily.of(ip) is family)


def trace_main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    """`pyproxy trace ARGS`: `argv` is what follows the word `trace`."""
    from pyproxy import sysctl
    from pyproxy.iptables.restore import Iptables, detect_backend

    out = stdout or sys.stdout
    prog = "pyproxy trace"
    args = trace_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        options = _options(args)
    except ConfigError as err:
        return _fail(prog, err, 2)
    family = IPFamily.of(ipaddress.ip_address(args.dst))
    try:
        local = _local_ips(options, family)
        src = args.src
        if src is None:
            if not args.from_node or not local:
                raise ConfigError("--src is required (or --from-node on a node with an address)")
            src = local[0]
        if IPFamily.of(ipaddress.ip_address(src)) is not family:
            raise ConfigError(
                f"--src {src} and --dst {args.dst} are of different IP families: a packet"
                " cannot change family"
            )
        backend = detect_backend(options.iptables_backend)
        tool = f"{'iptables' if family is IPFamily.IPv4 else 'ip6tables'}-{backend}-save"
        saved = Iptables(family, backend).save(("filter", "nat"))
        desired = None
        masquerade_mark = 1 << options.masquerade_bit
        if options.state or options.kubeconfig:
            objects = load_objects(options)
            cluster, _problems = state_from_objects(objects)
            config = next((c for c in node_configs(options, cluster) if c.family is family), None)
            if config is None:
                raise ConfigError(
                    f"cannot check drift: node {options.node_name} has no {family.value} address"
                    " (pass --node-ip)"
                )
            config = dataclasses.replace(
                config, conntrack_tcp_be_liberal=sysctl.conntrack_tcp_be_liberal()
            )
            desired = desired_document(cluster, config)
        report = trace_saved(
            saved,
            src=src,
            dst=args.dst,
            port=args.port,
            protocol=args.protocol,
            local_ips=local,
            from_node=args.from_node,
            masquerade_mark=masquerade_mark,
            desired_text=desired,
        )
    except ConfigError as err:
        return _fail(prog, err, 2)
    except (PyproxyError, ValueError) as err:
        return _fail(prog, err, 1)
    if args.output == "json":
        data = report.to_json()
        data["backend"] = backend
        _write(out, data)
    else:
        out.write(format_packet_report(report, Style.for_stream(out), source=tool))
    return 0


_COMMANDS: Mapping[str, Callable[[Sequence[str]], int]] = {"explain": main, "trace": trace_main}


def run(argv: Sequence[str]) -> int:
    """`python -m pyproxy.explain_cli explain|trace ARGS`."""
    if not argv or argv[0] not in _COMMANDS:
        print("usage: python -m pyproxy.explain_cli {explain,trace} ...", file=sys.stderr)
        return 2
    return _COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
