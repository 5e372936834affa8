"""ipvs mode's flags as kube-proxy v1.34.4 parses and validates them, and the sync periods
pacing the controller's runner.

Spec: cmd/kube-proxy/app/options.go (flags and defaults; processV1Alpha1Flags: in ipvs mode the
--ipvs-*sync-period flags set the sync periods and the --iptables-* ones are ignored, and the
other way round elsewhere) and pkg/proxy/apis/config/validation (period > 0, period >= min
period, timeouts >= 0, exclude CIDRs valid; the IPVS settings only in ipvs mode).
"""

from __future__ import annotations

import ipaddress

import pytest

from pyproxy.cli import main, proxier_factory
from pyproxy.controller import Controller
from pyproxy.errors import ConfigError
from pyproxy.model import IPAddress
from pyproxy.options import ProxyOptions, parse_options

IPVS = "--proxy-mode=ipvs"


def test_defaults_are_upstreams() -> None:
    options = parse_options([IPVS])
    assert (options.sync_period, options.min_sync_period) == (30.0, 1.0)
    assert options.ipvs_exclude_cidrs == ()
    assert options.ipvs_strict_arp is False
    assert (options.ipvs_tcp_timeout, options.ipvs_tcpfin_timeout, options.ipvs_udp_timeout) == (
        0.0,
        0.0,
        0.0,
    )


def test_ipvs_flags_parse() -> None:
    options = parse_options(
        [
            IPVS,
            "--ipvs-sync-period=2m",
            "--ipvs-min-sync-period=0",
            "--ipvs-exclude-cidrs=10.97.0.0/16,fd00:97::1/64",
            "--ipvs-strict-arp=true",
            "--ipvs-tcp-timeout=15m",
            "--ipvs-tcpfin-timeout=30s",
            "--ipvs-udp-timeout=500ms",
        ]
    )
    assert (options.sync_period, options.min_sync_period) == (120.0, 0.0)
    assert options.ipvs_exclude_cidrs == (
        ipaddress.ip_network("10.97.0.0/16"),
        ipaddress.ip_network("fd00:97::/64"),  # host bits masked off, as ParseCIDRSloppy
    )
    assert options.ipvs_strict_arp is True
    assert (options.ipvs_tcp_timeout, options.ipvs_tcpfin_timeout, options.ipvs_udp_timeout) == (
        900.0,
        30.0,
        0.5,
    )
    assert parse_options([IPVS, "--ipvs-strict-arp"]).ipvs_strict_arp is True
    assert parse_options([IPVS, "--ipvs-strict-arp=false"]).ipvs_strict_arp is False


def test_in_ipvs_mode_the_iptables_sync_periods_are_ignored() -> None:
    options = parse_options(
        [IPVS, "--iptables-sync-period=5s", "--iptables-min-sync-period=0", "--ipvs-sync-period=7s"]
    )
    assert (options.sync_period, options.min_sync_period) == (7.0, 1.0)


def test_in_iptables_mode_the_ipvs_flags_are_ignored() -> None:
    options = parse_options(
        [
            "--iptables-sync-period=5s",
            "--ipvs-sync-period=7s",
            "--ipvs-min-sync-period=3s",
            "--ipvs-exclude-cidrs=not-a-cidr",  # not validated outside ipvs mode (upstream)
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout=1m",
        ]
    )
    assert (options.sync_period, options.min_sync_period) == (5.0, 1.0)
    assert options.ipvs_exclude_cidrs == ()
    assert options.ipvs_strict_arp is False
    assert options.ipvs_tcp_timeout == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ipvs-sync-period=0"], "--ipvs-sync-period must be greater than 0"),
        (
            ["--ipvs-sync-period=10s", "--ipvs-min-sync-period=11s"],
            "--ipvs-sync-period must be greater than or equal to --ipvs-min-sync-period",
        ),
        (["--ipvs-min-sync-period=1m"], "greater than or equal to --ipvs-min-sync-period"),
        (
            ["--ipvs-exclude-cidrs=10.0.0.0/8,10.1.2.3"],
            "--ipvs-exclude-cidrs: invalid CIDR '10.1.2.3'",
        ),
        (["--ipvs-exclude-cidrs=10.0.0.0/33"], "--ipvs-exclude-cidrs: invalid CIDR"),
    ],
)
def test_bad_values_are_config_errors_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options([IPVS, *argv])
    assert main([IPVS, *argv, "--dry-run", "--state", "/nonexistent"]) == 2


@pytest.mark.parametrize(
    "flag",
    [
        "--ipvs-tcp-timeout",
        "--ipvs-tcpfin-timeout",
        "--ipvs-udp-timeout",
        "--ipvs-sync-period",
        "--ipvs-min-sync-period",
    ],
)
@pytest.mark.parametrize("value", ["-1s", "5", "1d", "soon"])
def test_bad_durations_are_refused_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Negative durations included: upstream refuses them in validation ("must be greater than
    # or equal to 0"), pyproxy already when parsing.
    with pytest.raises(SystemExit) as exited:
        parse_options([IPVS, f"{flag}={value}"])
    assert exited.value.code == 2
    assert f"argument {flag}: invalid duration" in capsys.readouterr().err


# --- the sync periods pace the controller's runner -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class IdleSource:
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def has_synced(self) -> bool:
        return True


def paced_controller(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Controller, Clock, list[tuple[float, bool]]]:
    """A controller from these flags whose runner reads a hand-moved clock and whose sync only
    records when it ran."""
    clock = Clock()
    runs: list[tuple[float, bool]] = []

    monkeypatch.setattr(
        Controller, "sync", lambda self, periodic: runs.append((clock.now, periodic))
    )

    def no_host_addresses() -> tuple[IPAddress, ...]:
        return ()

    options: ProxyOptions = parse_options([*argv, "--hostname-override=node-a"])
    c = Controller(
        options,
        proxier_factory=proxier_factory(options, "nft"),
        source_factory=lambda _c: IdleSource(),
        host_addresses=no_host_addresses,
        prepare_host=lambda configs: configs,
        clock=clock,
    )
    return c, clock, runs


def test_ipvs_sync_periods_drive_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    c, clock, runs = paced_controller(
        [IPVS, "--ipvs-sync-period=7s", "--ipvs-min-sync-period=2s", "--iptables-sync-period=1h"],
        monkeypatch,
    )
    # Nothing asked: the next run is the periodic one, --ipvs-sync-period away.
    assert c.runner.step() == pytest.approx(7.0)
    clock.now += 7.0
    c.runner.step()
    assert runs == [(1007.0, True)]
    # A change right after: held back for --ipvs-min-sync-period.
    c.runner.request()
    assert c.runner.step() == pytest.approx(2.0)
    assert len(runs) == 1
    clock.now += 2.0
    c.runner.step()
    assert runs[-1] == (1009.0, False)
    # The health check allows two sync periods, as upstream (healthzServer, 2 x SyncPeriod).
    assert c.health.health_timeout == pytest.approx(14.0)


def test_iptables_sync_periods_do_not_pace_ipvs_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    c, clock, runs = paced_controller(
        [IPVS, "--iptables-sync-period=5s", "--iptables-min-sync-period=0"], monkeypatch
    )
    assert c.runner.step() == pytest.approx(30.0)  # upstream's default --ipvs-sync-period
    clock.now += 30.0
    c.runner.step()
    c.runner.request()
    assert c.runner.step() == pytest.approx(1.0)  # default --ipvs-min-sync-period
    assert runs == [(1030.0, True)]
