"""`pyproxy explain` and `pyproxy trace`: the shell around the pure `pyproxy.explain` modules.

    pyproxy explain SERVICE [-n NS] [--port P] [--protocol tcp|udp|sctp] [--from IP|node]
                    [--state FILE | --kubeconfig FILE] [node and rule flags] [-o text|json]
    pyproxy trace --src IP --dst IP --port P [--protocol tcp|udp|sctp] [--from-node]
                  [--iptables-backend auto|legacy|nft] [--state FILE | --kubeconfig FILE]
                  [node and rule flags] [-o text|json]

`explain` loads Services, EndpointSlices and Nodes (a state file, or one list of each from the
API server), works out what this node would program, and explains one Service in plain words.
`trace` follows one new connection through the rules actually in the kernel (iptables-save)
and, given the cluster state, reports chains that differ from what pyproxy would program now.
With `--proxy-mode ipvs`, explain adds the IPVS plan of the Service (`explain.ipvs`) and trace
also reads the node's IPVS table, `ipset save` and kube-ipvs0's addresses: the virtual server
the packet meets, and virtual servers, real servers, ipset members and addresses that drifted.

The node and rule flags are pyproxy's own (`--hostname-override`, `--node-ip`,
`--cluster-cidr`, `--masquerade-all`, `--nodeport-addresses`,
`--iptables-localhost-nodeports`, `--iptables-masquerade-bit`, `--feature-gates`,
`--proxy-mode`, `--ipvs-scheduler`): they are
forwarded to `options.parse_options`, so they mean and validate exactly what they do for the
proxy. Without `--state` or `--kubeconfig`, explain uses $KUBECONFIG, then ~/.kube/config, then
the in-cluster service account.

Output: tables and colour on a terminal, plain lines when piped, `-o json` for programs (keys
documented in `pyproxy.explain.report`). Exit codes: 0 done, 1 the Service does not exist /
cannot load or read the rules, 2 bad flags.

`python -m pyproxy.explain explain ...` / `... trace ...` runs these without pyproxy's CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pyproxy.convert import state_from_objects
from pyproxy.errors import ConfigError, PyproxyError
from pyproxy.explain.format import Style, format_explanation, format_packet_report
from pyproxy.explain.packet import trace_saved
from pyproxy.explain.service import ApiObject, desired_document, explain_service, service_extras
from pyproxy.model import ClusterState, IPFamily, NamespacedName, Protocol
from pyproxy.options import ProxyOptions, parse_options
from pyproxy.proxystate import NFACCT_COUNTERS, ProxierConfig

if TYPE_CHECKING:
    from pyproxy.explain.ipvs import IpvsTrace
    from pyproxy.ipvs.plan import IpvsPlan
    from pyproxy.sources.watch import ApiConnection


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
        ("--proxy-mode", "iptables|ipvs", "the mode explained (default iptables)"),
        ("--ipvs-scheduler", "NAME", "ipvs mode: the scheduler (default rr)"),
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


def _list_path(
    api: ApiConnection, path: str, kind: str, label_selector: str = ""
) -> list[ApiObject]:
    """Every object at `path`, page by page (the proxy's own pager); items get their `kind`
    back."""
    import urllib3

    from pyproxy.sources.watch import LIST_READ_TIMEOUT, list_pages

    def fetch(params: Mapping[str, str]) -> bytes:
        try:
            response = api.get(path, params, read_timeout=LIST_READ_TIMEOUT)
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
        return body

    items, _resource_version = list_pages(
        fetch, {"labelSelector": label_selector} if label_selector else {}
    )
    return [
        item if "kind" in item else {**item, "kind": kind}
        for item in items
        if isinstance(item, dict)
    ]


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


def load_objects(options: ProxyOptions) -> list[ApiObject]:
    if options.state:
        from pyproxy.sources.statefile import read_objects

        return list(read_objects(Path(options.state)))
    return list_objects(options.kubeconfig or default_kubeconfig())


def node_configs(options: ProxyOptions, cluster: ClusterState) -> tuple[ProxierConfig, ...]:
    """The per-family configs of the node explained, as the proxy would build them."""
    from pyproxy.hostnet import host_addresses
    from pyproxy.nodeconfig import node_configs as build_node_configs

    return build_node_configs(options, cluster.nodes.get(options.node_name), host_addresses)


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
        ipvs = None
        if options.proxy_mode == "ipvs" and explanation.found:
            from pyproxy.explain.ipvs import explain_ipvs

            ipvs = explain_ipvs(cluster, configs, service, explanation, options.ipvs_scheduler)
    except ConfigError as err:
        return _fail("pyproxy explain", err, 2)
    except PyproxyError as err:
        return _fail("pyproxy explain", err, 1)
    if args.output == "json":
        data = explanation.to_json()
        if ipvs is not None:
            data["ipvs"] = ipvs.to_json()
        _write(out, data)
    else:
        out.write(format_explanation(explanation, Style.for_stream(out)))
        if ipvs is not None:
            from pyproxy.explain.ipvs import format_ipvs

            out.write(format_ipvs(ipvs))
    return 0 if explanation.found else 1


def _local_ips(options: ProxyOptions, family: IPFamily) -> list[str]:
    from pyproxy.hostnet import host_addresses

    ips = {*options.node_ips, *host_addresses()}
    return sorted(str(ip) for ip in ips if IPFamily.of(ip) is family)


def trace_main(  # noqa: PLR0912, PLR0915 - one command read top to bottom: flags, kernel, drift, output
    argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None
) -> int:
    """`pyproxy trace ARGS`: `argv` is what follows the word `trace`."""
    from pyproxy.iptables.restore import Iptables, detect_backend
    from pyproxy.nfacct import existing_counters, open_nfacct
    from pyproxy.nodeconfig import with_host_facts

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
        plan = None
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
            (config,) = with_host_facts((config,))
            if options.proxy_mode == "ipvs":
                # No nfacct counters: they exist only for iptables mode (the agent's too).
                desired, plan = _ipvs_desired(options, cluster, config)
            else:
                # The agent counts into the nfacct counters it found or created at start.
                config = dataclasses.replace(
                    config, nfacct_counters=existing_counters(open_nfacct(), NFACCT_COUNTERS)
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
        ipvs = None
        if options.proxy_mode == "ipvs":
            ipvs = _ipvs_trace(args, plan)
    except ConfigError as err:
        return _fail(prog, err, 2)
    except (PyproxyError, ValueError) as err:
        return _fail(prog, err, 1)
    if args.output == "json":
        data = report.to_json()
        data["backend"] = backend
        if ipvs is not None:
            data["ipvs"] = ipvs.to_json()
        _write(out, data)
    else:
        out.write(format_packet_report(report, Style.for_stream(out), source=tool))
        if ipvs is not None:
            from pyproxy.explain.ipvs import format_ipvs_trace

            out.write(format_ipvs_trace(ipvs))
    return 0


def _ipvs_desired(
    options: ProxyOptions, cluster: ClusterState, config: ProxierConfig
) -> tuple[str, IpvsPlan]:
    """IPVS mode: the plan a sync on this node would make (with the node's real local
    addresses, as the proxier reads them) and the iptables-restore input it implies."""
    from pyproxy.ipvs.kernel import LinuxIpvsKernel
    from pyproxy.ipvs.plan import plan_ipvs
    from pyproxy.ipvs.rules import ipvs_jump_rules
    from pyproxy.proxystate import desired_state

    with LinuxIpvsKernel() as kernel:
        local = kernel.local_addresses()
    states = desired_state(cluster, config)
    plan = plan_ipvs(
        [p for ps in states.values() for p in ps],
        config,
        options.ipvs_scheduler,
        local_addresses=local,
    )
    return plan.rules.document(hooks=ipvs_jump_rules(config)), plan


def _ipvs_trace(args: argparse.Namespace, plan: IpvsPlan | None) -> IpvsTrace:
    """Read the node's IPVS table, ipsets and kube-ipvs0 addresses; match and compare."""
    from pyproxy.explain.ipvs import trace_ipvs
    from pyproxy.ipvs.kernel import LinuxIpvsKernel

    with LinuxIpvsKernel() as kernel:
        state = kernel.read_state()
    return trace_ipvs(state, dst=args.dst, port=args.port, protocol=args.protocol, plan=plan)


_COMMANDS: Mapping[str, Callable[[Sequence[str]], int]] = {"explain": main, "trace": trace_main}


def run(argv: Sequence[str]) -> int:
    """`python -m pyproxy.explain explain|trace ARGS`."""
    if not argv or argv[0] not in _COMMANDS:
        print("usage: python -m pyproxy.explain {explain,trace} ...", file=sys.stderr)
        return 2
    return _COMMANDS[argv[0]](argv[1:])
