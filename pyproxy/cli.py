"""`pyproxy`: the command line. Parses flags, sets up logging, and picks the mode.

- `--dry-run`: print, per IP family, the iptables-restore input this node would get; touch nothing.
- `--state FILE --once`: program the rules for the state in FILE into this network namespace.
- `--cleanup`: remove every rule and chain pyproxy created.
- otherwise: run as the node agent against the API server (see controller.py).

Exit codes: 0 success, 1 runtime failure (unreadable state, kernel error), 2 bad flags.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence

import structlog

from pyproxy import log, nftleftovers, sysctl
from pyproxy.errors import ConfigError, KernelError, PyproxyError, StateFileError
from pyproxy.iptables.kernelview import KernelView, cleanup_document
from pyproxy.iptables.proxier import IptablesProxier
from pyproxy.iptables.render import jump_rules, render_ruleset
from pyproxy.iptables.restore import Iptables, detect_backend
from pyproxy.model import ClusterState, IPFamily
from pyproxy.options import ProxyOptions, parse_options, proxier_configs, with_interface_ips
from pyproxy.proxystate import ProxierConfig, desired_state

logger = structlog.get_logger("pyproxy")


def _load_state(options: ProxyOptions) -> ClusterState:
    from pathlib import Path

    from pyproxy.sources.statefile import load_state

    cluster, problems = load_state(Path(options.state or ""))
    for problem in problems:
        logger.warning(
            "skipping invalid object",
            kind=problem.kind,
            object=f"{problem.namespace}/{problem.name}" if problem.namespace else problem.name,
            field=problem.field,
            reason=problem.reason,
        )
    return cluster


def _configs(options: ProxyOptions, cluster: ClusterState) -> tuple[ProxierConfig, ...]:
    node = cluster.nodes.get(options.node_name)
    host_ips: tuple[object, ...] = ()
    if not options.node_ips and (node is None or not node.addresses):
        from pyproxy.hostnet import host_addresses

        host_ips = host_addresses()
    return proxier_configs(options, node, host_ips)  # type: ignore[arg-type]


def dry_run(options: ProxyOptions, cluster: ClusterState) -> str:
    """The text --dry-run prints: per family, the restore input for a node with no rules yet."""
    out = []
    for config in _configs(options, cluster):
        states = desired_state(cluster, config)
        out.append(f"# ip-family: {config.family.value}\n")
        if options.proxy_mode == "ipvs":
            from pyproxy.ipvs.plan import dry_run_text

            out.append(dry_run_text(states, config, options.ipvs_scheduler))
            continue
        if options.proxy_mode == "nftables":
            from pyproxy.nftables.render import render_ruleset as render_nftables

            ports = (p for ports in states.values() for p in ports)
            out.append(render_nftables(ports, config, cluster.all_service_cidrs()).dump())
            continue
        ruleset = render_ruleset((p for ports in states.values() for p in ports), config)
        out.append(ruleset.document(hooks=jump_rules(config)))
    return "".join(out)


def prepare_kernel(config: ProxierConfig) -> ProxierConfig:
    """Set the sysctls the rules need; returns the config adjusted to what the host has."""
    if config.localhost_nodeports and sysctl.ensure("net.ipv4.conf.all.route_localnet", "1"):
        logger.info("set route_localnet=1 for localhost NodePorts (--iptables-localhost-nodeports)")
    return dataclasses.replace(config, conntrack_tcp_be_liberal=sysctl.conntrack_tcp_be_liberal())


def _sync_configs(options: ProxyOptions, cluster: ClusterState) -> tuple[ProxierConfig, ...]:
    """The configs of a real sync: as a dry run's, plus the host's interface addresses that
    `--nodeport-addresses` CIDRs select (a dry run describes the node from its flags alone)."""
    configs = _configs(options, cluster)
    if options.nodeport_addresses and options.nodeport_addresses != ("primary",):
        from pyproxy.hostnet import host_addresses

        configs = with_interface_ips(configs, host_addresses())
    return configs


def sync_once_ipvs(options: ProxyOptions, cluster: ClusterState, backend: str) -> None:
    from pyproxy.ipvs.proxier import IpvsProxier

    # No prepare_kernel: ipvs mode has no localhost NodePorts and no INVALID rule; the
    # proxier sets its own sysctls (net.ipv4.vs.*, ip_forward) on its first sync.
    for config in _sync_configs(options, cluster):
        proxier = IpvsProxier(
            config, Iptables(config.family, backend), scheduler=options.ipvs_scheduler
        )
        result = proxier.sync(desired_state(cluster, config))
        logger.info(
            "synced",
            ip_family=config.family.value,
            proxy_mode="ipvs",
            backend=backend,
            full=result.full,
            services=result.services_written,
            virtual_servers=result.virtual_servers,
            real_servers=result.real_servers,
            operations=result.operations,
            draining=result.draining,
            filter_rules=result.filter_rules,
            nat_rules=result.nat_rules,
            restore_bytes=result.restore_bytes,
        )


def sync_once_nftables(options: ProxyOptions, cluster: ClusterState) -> None:
    import time

    from pyproxy.nftables.proxier import STALE_CHAIN_DELAY, NftablesProxier

    # No prepare_kernel: nftables mode has no localhost NodePorts and no INVALID rule.
    for config in _configs(options, cluster):
        proxier = NftablesProxier(config, service_cidrs=cluster.all_service_cidrs())
        result = proxier.sync(desired_state(cluster, config), full=True)
        if proxier.stale_chains:
            # Chains a previous run left were flushed; delete them once the kernel has let go
            # of them (upstream waits a second for kernels before 6.2), then exit.
            time.sleep(STALE_CHAIN_DELAY)
            proxier.delete_stale_chains(force=True)
        logger.info(
            "synced",
            ip_family=config.family.value,
            proxy_mode="nftables",
            full=result.full,
            services=result.services_written,
            chains=result.chains_written,
            elements=result.elements_added,
            stale_chains=result.stale_chains_flushed,
            transaction_bytes=result.transaction_bytes,
        )
    # As kube-proxy's platformCleanup, switching to nftables removes the other modes' rules;
    # but once nftables mode's own rules are in (upstream: before), so no moment is without.
    cleanup_iptables_modes(options)


def sync_once(options: ProxyOptions, cluster: ClusterState) -> None:
    if options.proxy_mode == "nftables":
        sync_once_nftables(options, cluster)
        return
    # As kube-proxy's platformCleanup, iptables and IPVS modes remove nftables mode's tables;
    # but after their own rules are in (upstream: before), so no moment is without rules.
    backend = detect_backend(options.iptables_backend)
    if options.proxy_mode == "ipvs":
        sync_once_ipvs(options, cluster, backend)
        cleanup_nftables()
        return
    for config in map(prepare_kernel, _sync_configs(options, cluster)):
        proxier = IptablesProxier(config, Iptables(config.family, backend))
        result = proxier.sync(desired_state(cluster, config))
        logger.info(
            "synced",
            ip_family=config.family.value,
            backend=backend,
            full=result.full,
            services=result.services_written,
            filter_rules=result.filter_rules,
            nat_rules=result.nat_rules,
            restore_bytes=result.restore_bytes,
        )
    cleanup_nftables()


def cleanup_nftables() -> None:
    """Delete the `ip` and `ip6` `kube-proxy` tables (nftables mode's only objects)."""
    for family in (IPFamily.IPv4, IPFamily.IPv6):
        try:
            existed = nftleftovers.delete_kube_proxy_table(family)
        except KernelError as err:
            # As upstream: no usable nft means there is nothing of nftables mode to remove;
            # the other modes' cleanup still runs.
            logger.warning("nftables cleanup skipped", ip_family=family.value, error=str(err))
            continue
        logger.info("cleaned up nftables mode", ip_family=family.value, changed=bool(existed))


def cleanup(options: ProxyOptions) -> None:
    # Every mode's leftovers, whatever --proxy-mode says (as kube-proxy's --cleanup).
    cleanup_nftables()
    cleanup_iptables_modes(options)


def cleanup_iptables_modes(options: ProxyOptions) -> None:
    """iptables and IPVS modes' leftovers (rules, chains, virtual servers, ipsets, dummy)."""
    backend = detect_backend(options.iptables_backend)
    for family in IPFamily:
        iptables = Iptables(family, backend)
        # Every hook pyproxy may have installed, whatever flags it ran with.
        hooks = jump_rules(ProxierConfig(family=family, node_name="", localhost_nodeports=True))
        document = cleanup_document(
            KernelView.from_save(iptables.save(("filter", "nat", "mangle"))), hooks
        )
        if document:
            iptables.restore(document)
        logger.info("cleaned up", ip_family=family.value, backend=backend, changed=bool(document))
    # IPVS mode's leftovers too, whatever --proxy-mode says (as kube-proxy's --cleanup).
    from pyproxy.ipvs.proxier import cleanup as cleanup_ipvs

    result = cleanup_ipvs([Iptables(family, backend) for family in IPFamily])
    logger.info(
        "cleaned up ipvs mode",
        iptables_changed=[f.value for f in result.iptables_changed],
        virtual_servers_deleted=result.virtual_servers_deleted,
        ipsets_destroyed=len(result.ipsets_destroyed),
        dummy_deleted=result.dummy_deleted,
        ipvs_available=result.ipvs_available,
    )


def run_controller(options: ProxyOptions) -> int:
    """The node agent: until SIGTERM/SIGINT, then exit 0 leaving the rules in place."""
    from pyproxy.conntrack import ConntrackCleaner
    from pyproxy.controller import Controller
    from pyproxy.hostnet import host_addresses
    from pyproxy.sources.kube import KubeSource

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backend = detect_backend(options.iptables_backend)
    controller = Controller(
        options,
        backend=backend,
        source_factory=lambda c: KubeSource(options.kubeconfig, options.node_name, c),
        host_addresses=host_addresses,
        conntrack=ConntrackCleaner,
        nftables_leftovers=nftleftovers.remove_after_sync,
    )
    logger.info(
        "starting",
        node=options.node_name,
        proxy_mode=options.proxy_mode,
        backend=backend,
        kubeconfig=options.kubeconfig or "in-cluster",
    )
    controller.run_until_stopped(stop)
    return 0


def run(options: ProxyOptions) -> int:
    if options.cleanup:
        cleanup(options)
        return 0
    if options.proxy_mode not in ("iptables", "ipvs", "nftables"):
        raise ConfigError(f"--proxy-mode {options.proxy_mode} is not implemented yet")
    if options.state is None:
        if options.dry_run or options.once:
            raise ConfigError("--dry-run and --once need --state FILE")
        if options.proxy_mode == "nftables":
            # The agent is being reshaped around a Proxier contract; NftablesProxier has that
            # shape but is not wired in yet, and must not fall back to iptables silently.
            raise ConfigError(
                "--proxy-mode nftables runs with --state FILE (--dry-run, --once) for now"
            )
        return run_controller(options)
    cluster = _load_state(options)
    if options.dry_run:
        sys.stdout.write(dry_run(options, cluster))
        return 0
    sync_once(options, cluster)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("explain", "trace"):
        # Operator tools: `pyproxy explain SERVICE ...`, `pyproxy trace --src ... --dst ...`.
        from pyproxy import explain_cli

        return (explain_cli.main if args[0] == "explain" else explain_cli.trace_main)(args[1:])
    try:
        options = parse_options(args)
    except ConfigError as err:
        print(f"pyproxy: {err}", file=sys.stderr)
        return 2
    log.configure(options.verbosity)
    try:
        return run(options)
    except ConfigError as err:
        logger.error("bad configuration", error=str(err))
        return 2
    except StateFileError as err:
        logger.error("cannot load state; nothing was programmed", error=str(err))
        return 1
    except KernelError as err:
        logger.error(
            "kernel update failed",
            error=str(err),
            offending_lines=list(getattr(err, "offending_lines", ())),
        )
        return 1
    except PyproxyError as err:
        logger.error("failed", error=str(err))
        return 1


if __name__ == "__main__":
    sys.exit(main())
