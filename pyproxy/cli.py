"""`pyproxy`: the command line. Parses flags, sets up logging, and picks the mode.

- `--dry-run`: print, per IP family, the iptables-restore input this node would get; touch nothing.
- `--state FILE --once`: program the rules for the state in FILE into this network namespace.
- `--cleanup`: remove every rule and chain pyproxy created.
- otherwise: run as the node agent against the API server (see controller.py), in any mode.

Exit codes: 0 success, 1 runtime failure (unreadable state, kernel error), 2 bad flags.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence

import structlog

from pyproxy import log, nftleftovers
from pyproxy.errors import ConfigError, KernelError, PyproxyError, StateFileError
from pyproxy.hostnet import host_addresses
from pyproxy.iptables.proxier import IptablesProxier
from pyproxy.iptables.proxier import cleanup_leftovers as iptables_cleanup
from pyproxy.iptables.render import render_ruleset
from pyproxy.iptables.restore import Iptables, detect_backend
from pyproxy.iptables.vocabulary import jump_rules
from pyproxy.model import ClusterState, IPFamily
from pyproxy.nodeconfig import node_configs, prepare_host
from pyproxy.options import ProxyOptions, parse_options
from pyproxy.proxier import LeftoverCleanup, Proxier, ProxierFactory
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
    return node_configs(options, cluster.nodes.get(options.node_name), host_addresses)


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


def proxier_factory(options: ProxyOptions, backend: str) -> ProxierFactory:
    """How this run builds a family's proxier: the mode, iptables variant and mode flags."""
    if options.proxy_mode == "ipvs":
        from pyproxy.ipvs.kernel import IpvsTimeouts
        from pyproxy.ipvs.proxier import IpvsProxier

        timeouts = IpvsTimeouts.from_seconds(
            options.ipvs_tcp_timeout, options.ipvs_tcpfin_timeout, options.ipvs_udp_timeout
        )

        def new_ipvs(config: ProxierConfig) -> Proxier:
            return IpvsProxier(
                config,
                Iptables(config.family, backend),
                scheduler=options.ipvs_scheduler,
                exclude_cidrs=options.ipvs_exclude_cidrs,
                strict_arp=options.ipvs_strict_arp,
                timeouts=timeouts,
            )

        return new_ipvs

    if options.proxy_mode == "nftables":
        from pyproxy.nftables.proxier import NftablesProxier

        def new_nftables(config: ProxierConfig) -> Proxier:
            # The ServiceCIDRs arrive through on_service_cidrs_changed (before the first sync).
            return NftablesProxier(config)

        return new_nftables

    def new_iptables(config: ProxierConfig) -> Proxier:
        return IptablesProxier(config, Iptables(config.family, backend))

    return new_iptables


def sync_once_nftables(options: ProxyOptions, cluster: ClusterState) -> None:
    import time

    from pyproxy.nftables.proxier import STALE_CHAIN_DELAY, NftablesProxier

    # No route_localnet: nftables mode has no localhost NodePorts and no INVALID rule.
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
            **result.details,
        )
    # As kube-proxy's platformCleanup, switching to nftables removes the other modes' rules;
    # but once nftables mode's own rules are in (upstream: before), so no moment is without.
    cleanup_iptables_modes(options)


def sync_once(options: ProxyOptions, cluster: ClusterState) -> None:
    if options.proxy_mode == "nftables":
        sync_once_nftables(options, cluster)
        return
    backend = detect_backend(options.iptables_backend)
    new_proxier = proxier_factory(options, backend)
    for config in prepare_host(_configs(options, cluster), options.proxy_mode):
        result = new_proxier(config).sync(desired_state(cluster, config))
        logger.info(
            "synced",
            ip_family=config.family.value,
            proxy_mode=options.proxy_mode,
            backend=backend,
            full=result.full,
            services=result.services_written,
            **result.details,
            filter_rules=result.filter_rules,
            nat_rules=result.nat_rules,
            restore_bytes=result.restore_bytes,
        )
    # As kube-proxy's platformCleanup, iptables and IPVS modes remove nftables mode's tables;
    # but after their own rules are in (upstream: before), so no moment is without rules.
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


def remove_iptables_modes_after_sync(options: ProxyOptions) -> Callable[[IPFamily], bool]:
    """nftables mode's agent: after the first full sync, remove iptables and IPVS modes'
    leftovers (upstream's platformCleanup, which runs before the first sync instead, leaving
    the node without Service rules until then). Both families' leftovers go at once, after
    the first family's sync (a dual-stack node's IPv6 follows in the same sync). True once
    done; False (logged) to retry after the next full sync."""
    done = False

    def remove(family: IPFamily) -> bool:
        nonlocal done
        if not done:
            try:
                cleanup_iptables_modes(options)
            except PyproxyError as err:
                logger.warning(
                    "cannot remove iptables/ipvs modes' leftovers; retrying after the next"
                    " full sync",
                    ip_family=family.value,
                    error=str(err),
                )
                return False
            done = True
        return True

    return remove


def cleanup(options: ProxyOptions) -> None:
    """Every mode's leftovers, whatever --proxy-mode says (as kube-proxy's --cleanup)."""
    cleanup_nftables()
    cleanup_iptables_modes(options)


def cleanup_iptables_modes(options: ProxyOptions) -> None:
    """iptables and IPVS modes' leftovers (rules, chains, virtual servers, ipsets, dummy)."""
    backend = detect_backend(options.iptables_backend)
    from pyproxy.ipvs.proxier import cleanup_leftovers as ipvs_cleanup

    cleanups: tuple[LeftoverCleanup, ...] = (iptables_cleanup, ipvs_cleanup)
    for cleanup_mode in cleanups:
        cleanup_mode(backend)


def run_controller(options: ProxyOptions) -> int:
    """The node agent: until SIGTERM/SIGINT, then exit 0 leaving the rules in place."""
    from pyproxy.conntrack import ConntrackCleaner
    from pyproxy.controller import Controller
    from pyproxy.nfacct import open_nfacct
    from pyproxy.sources.kube import KubeSource

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backend = detect_backend(options.iptables_backend)
    nftables = options.proxy_mode == "nftables"
    controller = Controller(
        options,
        proxier_factory=proxier_factory(options, backend),
        source_factory=lambda c: KubeSource(
            options.kubeconfig, options.node_name, c, service_cidrs=nftables
        ),
        host_addresses=host_addresses,
        prepare_host=lambda configs: prepare_host(configs, options.proxy_mode),
        conntrack=ConntrackCleaner,
        other_modes_leftovers=remove_iptables_modes_after_sync(options)
        if nftables
        else nftleftovers.remove_after_sync,
        nfacct=open_nfacct() if options.proxy_mode == "iptables" else None,
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
        from pyproxy.explain import cli as explain_cli

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
