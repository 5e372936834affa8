"""`--feature-gates`: the gates pyproxy implements default as in kube-proxy v1.34.4, and gates
that 1.34 locks are refused away from their locked value (component-base's SetFromMap).

Checked against pkg/features/kube_features.go of v1.34.4: PreferSameTrafficDistribution is beta
and on; ServiceTrafficDistribution and TopologyAwareHints are GA and locked on (1.33);
LoadBalancerIPMode is GA and locked on (1.32).
"""

from __future__ import annotations

import pytest
from support import (
    BASE_ARGS,
    EXTERNAL_CLIENT,
    TEST_NODE,
    endpoint,
    endpoint_slice,
    family_ruleset,
    node,
    render,
    service,
    trace,
)

from pyproxy.errors import ConfigError
from pyproxy.options import FEATURE_GATES, parse_options

UPSTREAM_1_34 = {
    "PreferSameTrafficDistribution": (True, False),
    "ServiceTrafficDistribution": (True, True),
    "TopologyAwareHints": (True, True),
    "LoadBalancerIPMode": (True, True),
}


def test_gate_table_is_upstream_1_34() -> None:
    assert {k: (g.default, g.locked) for k, g in FEATURE_GATES.items()} == UPSTREAM_1_34


def test_prefer_same_traffic_distribution_is_on_by_default() -> None:
    assert parse_options([]).prefer_same_node is True
    assert parse_options(["--feature-gates", "PreferSameTrafficDistribution=false"]) \
        .prefer_same_node is False  # fmt: skip


@pytest.mark.parametrize("gate", ["ServiceTrafficDistribution", "TopologyAwareHints",
                                  "LoadBalancerIPMode"])  # fmt: skip
def test_locked_gate_set_to_its_default_is_accepted(gate: str) -> None:
    parse_options(["--feature-gates", f"{gate}=true"])


@pytest.mark.parametrize("gate", ["ServiceTrafficDistribution", "TopologyAwareHints",
                                  "LoadBalancerIPMode"])  # fmt: skip
def test_locked_gate_set_away_from_its_default_is_an_error_naming_it(gate: str) -> None:
    with pytest.raises(ConfigError, match=f"cannot set feature gate {gate} to false, feature is"
                       " locked to true"):  # fmt: skip
        parse_options(["--feature-gates", f"{gate}=false"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("NoSuchGate=true", "unrecognized feature gate: NoSuchGate"),
        ("PreferSameTrafficDistribution=maybe", "invalid value of PreferSameTrafficDistribution"),
        ("PreferSameTrafficDistribution", "missing bool value for PreferSameTrafficDistribution"),
    ],
)
def test_bad_feature_gates_are_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options(["--feature-gates", value])


def _node_hinted() -> list[dict[str, object]]:
    return [
        node(TEST_NODE, ("192.168.0.2",), **{"topology.kubernetes.io/zone": "zone-a"}),
        service("ns1", "near", "172.30.0.41", trafficDistribution="PreferSameNode"),
        endpoint_slice(
            "ns1",
            "near",
            [
                endpoint("10.1.2.3", TEST_NODE, zones=["zone-a"], nodes=[TEST_NODE]),
                endpoint("10.1.2.4", "other", zones=["zone-a"], nodes=["other"]),
            ],
        ),
    ]


def test_node_hints_choose_the_endpoint_by_default() -> None:
    """Without any flag, as kube-proxy 1.34: only the endpoint hinted for this node is used."""
    rs = family_ruleset(render(_node_hinted(), BASE_ARGS))
    assert trace(rs, EXTERNAL_CLIENT, "172.30.0.41", 80).output == "10.1.2.3:80"


def test_node_hints_ignored_with_the_gate_off() -> None:
    args = (*BASE_ARGS, "--feature-gates", "PreferSameTrafficDistribution=false")
    rs = family_ruleset(render(_node_hinted(), args))
    # Zone hints then apply: both endpoints are hinted for zone-a.
    assert trace(rs, EXTERNAL_CLIENT, "172.30.0.41", 80).output == "10.1.2.3:80, 10.1.2.4:80"
