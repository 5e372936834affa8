"""Flag checks that need no cluster: the sync periods, validated as upstream validates them."""

from __future__ import annotations

import pytest

from pyproxy.cli import main
from pyproxy.errors import ConfigError
from pyproxy.options import parse_options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iptables-sync-period", "0"], "--iptables-sync-period must be greater than 0"),
        (
            ["--iptables-sync-period", "10s", "--iptables-min-sync-period", "1m"],
            "greater than or equal to --iptables-min-sync-period",
        ),
    ],
)
def test_sync_periods_are_validated_as_upstream(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options(argv)
    assert main([*argv, "--dry-run", "--state", "/nonexistent"]) == 2


def test_sync_periods_upstream_accepts() -> None:
    options = parse_options(["--iptables-sync-period", "1m", "--iptables-min-sync-period", "0"])
    assert (options.sync_period, options.min_sync_period) == (60.0, 0.0)
    same = parse_options(["--iptables-sync-period", "5s", "--iptables-min-sync-period", "5s"])
    assert same.sync_period == same.min_sync_period == 5.0
