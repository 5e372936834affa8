"""Partial syncs keep the kernel's table equal to a full render, after long random sequences.

One proxier programs a throwaway network namespace through a long sequence of random changes
(Services and endpoints added, removed and changed: ports, traffic policies, affinity and its
timeout, external and LB IPs, source ranges), each written as a partial sync naming only the
changed Services. After every step the table in the kernel must equal, object for object, what
`nft -f` makes in a second fresh namespace from the full render of the same state (pyproxy
--dry-run's text). Stale chains are checked to be flushed at once and gone once deleted.
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pyproxy.convert import state_from_objects
from pyproxy.model import IPFamily, NamespacedName
from pyproxy.nftables.nft import Nft
from pyproxy.nftables.proxier import NftablesProxier
from pyproxy.nftables.render import TABLE, render_ruleset
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import desired_state

pytestmark = pytest.mark.kernel

NODE = "node-a"
ARGS = [
    "--proxy-mode", "nftables", "--hostname-override", NODE, "--node-ip", "172.30.0.2",
    "--cluster-cidr", "10.244.0.0/16",
]  # fmt: skip
SERVICE_CIDR = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "ServiceCIDR",
    "metadata": {"name": "kubernetes"},
    "spec": {"cidrs": ["10.96.0.0/16"]},
}


def _netns() -> Iterator[str]:
    name = f"pyproxy-nftp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.fixture
def ns_a() -> Iterator[str]:
    yield from _netns()


@pytest.fixture
def ns_b() -> Iterator[str]:
    yield from _netns()


def nft_in(ns: str) -> Nft:
    return Nft("ip", TABLE, command=("ip", "netns", "exec", ns, "nft"))


def canonical(ns: str) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    """The table without handles; objects sorted; each chain's rules in order; elements
    sorted (listing order follows handles and insertion, which differ between the two)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "ip", TABLE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects: list[tuple[str, str, str]] = []
    rules: dict[str, list[str]] = {}
    for item in json.loads(out)["nftables"]:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "rule":
            rules.setdefault(body["chain"], []).append(json.dumps(body["expr"], sort_keys=True))
            continue
        if "elem" in body:
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        objects.append((kind, str(body.get("name", "")), json.dumps(body, sort_keys=True)))
    return sorted(objects), rules


def full_render_into(ns: str, text: str) -> None:
    """Load `text` (a full render) into an emptied namespace, as `nft -f` from nothing."""
    subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True)
    cp = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=text,
        text=True,
        capture_output=True,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr


# --- random cluster changes ----------------------------------------------------------------


class World:
    """A small cluster whose Services change at random; addresses unique by construction."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.services: dict[str, dict[str, Any]] = {}
        self.next_ip = 10

    def _ip(self, prefix: str) -> str:
        self.next_ip += 1
        return f"{prefix}.{self.next_ip // 250}.{self.next_ip % 250 + 1}"

    def _spec(self, name: str, cluster_ip: str) -> dict[str, Any]:
        r = self.rng
        kind = r.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])
        n_ports = r.randint(1, 2)
        ports = []
        for i in range(n_ports):
            protocol = r.choice(["TCP", "UDP"])
            p: dict[str, Any] = {"name": f"p{i}", "port": 80 + i, "protocol": protocol}
            if kind != "ClusterIP":
                self.next_ip += 1
                p["nodePort"] = 30000 + self.next_ip
            ports.append(p)
        spec: dict[str, Any] = {"type": kind, "clusterIP": cluster_ip, "ports": ports}
        if kind != "ClusterIP" and r.random() < 0.5:
            spec["externalTrafficPolicy"] = "Local"
        if r.random() < 0.2:
            spec["internalTrafficPolicy"] = "Local"
        if r.random() < 0.3:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": r.choice([60, 300])}}
        if r.random() < 0.3:
            spec["externalIPs"] = [self._ip("198.51")]
        status = {}
        if kind == "LoadBalancer":
            status = {"loadBalancer": {"ingress": [{"ip": self._ip("192.0")}]}}
            if r.random() < 0.5:
                spec["loadBalancerSourceRanges"] = [r.choice(["203.0.113.0/24", "172.30.0.0/24"])]
        eps = [
            {
                "addresses": [self._ip("10.244")],
                "nodeName": r.choice([NODE, "node-b"]),
                "conditions": r.choice(
                    [
                        {"ready": True},
                        {"ready": True},
                        {"ready": False, "serving": True, "terminating": True},
                        {"ready": False, "serving": False},
                    ]
                ),
            }
            for _ in range(r.randint(0, 3))
        ]
        return {"spec": spec, "status": status, "endpoints": eps, "ip": cluster_ip}

    def step(self) -> set[str]:
        """Change 1-3 Services; returns their names."""
        changed = set()
        for _ in range(self.rng.randint(1, 3)):
            action = self.rng.random()
            if action < 0.35 or not self.services:
                name = f"svc{len(self.services) + self.next_ip}"
                self.services[name] = self._spec(name, self._ip("10.96"))
            elif action < 0.55:
                name = self.rng.choice(sorted(self.services))
                del self.services[name]
            elif action < 0.8:
                name = self.rng.choice(sorted(self.services))
                old = self.services[name]
                fresh = self._spec(name, old["ip"])
                old["endpoints"] = fresh["endpoints"]  # endpoints only
            else:
                name = self.rng.choice(sorted(self.services))
                self.services[name] = self._spec(name, self.services[name]["ip"])
            changed.add(name)
        return changed

    def objects(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [SERVICE_CIDR]
        for name, s in self.services.items():
            meta = {"namespace": "t", "name": name}
            out.append(
                {"kind": "Service", "metadata": meta, "spec": s["spec"], "status": s["status"]}
            )
            out.append(
                {
                    "kind": "EndpointSlice",
                    "metadata": {
                        "namespace": "t",
                        "name": f"{name}-1",
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "endpoints": s["endpoints"],
                    "ports": [
                        {"name": p["name"], "port": 8080, "protocol": p["protocol"]}
                        for p in s["spec"]["ports"]
                    ],
                }
            )
        return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_partial_syncs_equal_a_full_render(seed: int, ns_a: str, ns_b: str) -> None:
    rng = random.Random(seed)  # noqa: S311 - a seeded, reproducible sequence, not crypto
    world = World(rng)
    options = parse_options(ARGS)
    (config,) = proxier_configs(options, None, ())
    assert config.family is IPFamily.IPv4
    clock = [0.0]
    proxier = NftablesProxier(config, nft_in(ns_a), clock=lambda: clock[0])

    for _ in range(3):
        world.step()
    cluster, problems = state_from_objects(world.objects())
    assert problems == []
    proxier.on_service_cidrs_changed(cluster.all_service_cidrs())
    first = proxier.sync(desired_state(cluster, config), None)
    assert first.full

    partial_bytes = []
    for step in range(25):
        changed = world.step()
        cluster, problems = state_from_objects(world.objects())
        assert problems == [], problems
        states = desired_state(cluster, config)
        clock[0] += 0.1  # stale chains stay until forced below
        result = proxier.sync(states, {NamespacedName("t", n) for n in changed})
        assert not result.full, step
        partial_bytes.append(result.restore_bytes)

        # Stale chains are in the kernel, empty, until deleted.
        before = canonical(ns_a)
        for chain in proxier.stale_chains:
            assert before[1].get(chain, []) == [], chain
        proxier.delete_stale_chains(force=True)

        text = render_ruleset(
            (p for ports in states.values() for p in ports), config, cluster.all_service_cidrs()
        ).dump()
        full_render_into(ns_b, text)
        assert canonical(ns_a) == canonical(ns_b), f"step {step}, changed {sorted(changed)}"
    # Nothing changed, nothing written.
    assert proxier.sync(desired_state(cluster, config), set()).restore_bytes == 0
    assert any(partial_bytes)


@pytest.mark.parametrize("damage", ["flush table ip kube-proxy", "delete table ip kube-proxy",
                                    "flush ruleset"])  # fmt: skip
def test_damaged_table_is_detected_and_repaired(damage: str, ns_a: str, ns_b: str) -> None:
    world = World(random.Random(7))  # noqa: S311 - a seeded, reproducible state, not crypto
    for _ in range(4):
        world.step()
    cluster, problems = state_from_objects(world.objects())
    assert problems == []
    (config,) = proxier_configs(parse_options(ARGS), None, ())
    states = desired_state(cluster, config)
    proxier = NftablesProxier(config, nft_in(ns_a), service_cidrs=cluster.all_service_cidrs())
    proxier.sync(states, None)
    assert proxier.table_intact()

    subprocess.run(["ip", "netns", "exec", ns_a, "nft", *damage.split()], check=True)
    assert not proxier.table_intact()
    assert proxier.sync(states, None, full=True).full
    assert proxier.table_intact()

    text = render_ruleset(
        (p for ports in states.values() for p in ports), config, cluster.all_service_cidrs()
    ).dump()
    full_render_into(ns_b, text)
    assert canonical(ns_a) == canonical(ns_b)
