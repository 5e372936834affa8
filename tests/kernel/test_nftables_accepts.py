"""The real `nft --check -f` accepts every table pyproxy's nftables mode renders.

Spec: issue 13, "property tests that random valid states are accepted by the real nft --check".
The input is exactly what `pyproxy --dry-run --proxy-mode nftables` prints per family (a table
created from nothing). `nft --check` parses and validates the whole batch in the kernel
without committing it; it needs root, so it runs inside one throwaway network namespace per
module. Needs root: fails without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from kernel_netns import netns, run_in
from strategies import RandomState, random_states
from support import GOLDEN_DIR, golden_args, load_objects, render, sections

pytestmark = pytest.mark.kernel

SERVICE_CIDRS = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "ServiceCIDR",
    "metadata": {"name": "kubernetes"},
    "spec": {"cidrs": ["10.96.0.0/16", "fd00:10:96::/112"]},
}


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


def assert_accepted(ns: str, text: str) -> None:
    cp = run_in(ns, ["nft", "--check", "-f", "-"], text, check=False)
    assert cp.returncode == 0, f"nft --check rejected:\n{cp.stderr}\n{text}"


def test_check_mode_does_reject_bad_input(ns: str) -> None:
    """Negative control: `--check` validates in the kernel, so acceptance means something:
    a goto to a missing chain passes the parser but not the kernel."""
    bad = "add table ip kube-proxy\nadd chain ip kube-proxy a\nadd rule ip kube-proxy a goto b\n"
    assert run_in(ns, ["nft", "--check", "-f", "-"], bad, check=False).returncode != 0


def test_overall_golden_is_accepted(ns: str) -> None:
    path = GOLDEN_DIR / "nftables" / "overall.yaml"
    for text in sections(render(load_objects(path), golden_args(path))).values():
        assert_accepted(ns, text)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_states())
def test_random_states_are_accepted(ns: str, state: RandomState) -> None:
    args = [a for a in state.args if not a.startswith("--iptables-localhost-nodeports")]
    output = render([SERVICE_CIDRS, *state.objects], ["--proxy-mode", "nftables", *args])
    for text in sections(output).values():
        assert_accepted(ns, text)


def test_a_key_claimed_twice_is_written_once(ns: str) -> None:
    """Two Services on one external IP:port: the dry-run keeps the first verdict only (nft
    refuses a second verdict for a map key, which would reject the whole table)."""
    objects = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": "t", "name": name},
            "spec": {
                "clusterIP": ip,
                "externalIPs": ["198.51.100.1"],
                "ports": [{"name": "p", "port": 80, "protocol": "TCP"}],
            },
        }
        for name, ip in (("a", "10.96.0.1"), ("b", "10.96.0.2"))
    ]
    args = ["--proxy-mode", "nftables", "--hostname-override", "n", "--node-ip", "192.168.0.2"]
    text = sections(render(objects, args))["IPv4"]
    assert text.count("{ 198.51.100.1 . tcp . 80 ") == 1
    assert_accepted(ns, text)
