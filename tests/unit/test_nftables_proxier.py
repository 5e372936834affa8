"""nftables proxier against a fake nft: what each sync sends (no kernel needed).

The kernel tier checks that the table is right (tests/kernel/test_nftables_partial.py); this
checks the O(change) promise of issue 13: a partial sync's transaction depends on what changed,
not on how many Services exist, and an unchanged sync sends nothing.
"""

from __future__ import annotations

from pyproxy.convert import state_from_objects
from pyproxy.errors import NftError
from pyproxy.model import NamespacedName
from pyproxy.nftables.nft import Nft, TableNames
from pyproxy.nftables.proxier import NftablesProxier
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import desired_state


class FakeNft(Nft):
    """Records transactions; the kernel starts empty."""

    def __init__(self) -> None:
        super().__init__("ip", "kube-proxy", command=("false",))
        self.transactions: list[str] = []

    def run(self, transaction: str) -> None:
        self.transactions.append(transaction)

    def names(self) -> TableNames:
        return TableNames(exists=False)


ARGS = ["--proxy-mode", "nftables", "--hostname-override", "n", "--node-ip", "172.30.0.2",
        "--cluster-cidr", "10.244.0.0/16"]  # fmt: skip


def objects(n: int, *, endpoint_of_first: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i in range(n):
        name = f"svc{i:05d}"
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        out.append(
            {
                "kind": "Service",
                "metadata": {"namespace": "t", "name": name},
                "spec": {
                    "type": "NodePort",
                    "clusterIP": ip,
                    "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30000 + i}],
                },
            }
        )
        ep = endpoint_of_first if i == 0 else f"10.244.{i // 250}.{i % 250 + 1}"
        out.append(
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "t",
                    "name": f"{name}-1",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ep], "nodeName": "n"}],
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            }
        )
    return out


def partial_bytes(n: int) -> tuple[int, int, str]:
    (config,) = proxier_configs(parse_options(ARGS), None, ())
    nft = FakeNft()
    proxier = NftablesProxier(config, nft)
    cluster, _ = state_from_objects(objects(n, endpoint_of_first="10.250.0.1"))
    full = proxier.sync(desired_state(cluster, config), None)
    cluster, _ = state_from_objects(objects(n, endpoint_of_first="10.250.0.2"))
    result = proxier.sync(desired_state(cluster, config), {NamespacedName("t", "svc00000")})
    assert full.full and not result.full
    return full.restore_bytes, result.restore_bytes, nft.transactions[-1]


def test_partial_sync_bytes_do_not_depend_on_the_number_of_services() -> None:
    full_small, small, text = partial_bytes(20)
    full_big, big, _ = partial_bytes(400)
    assert full_big > 10 * full_small  # control: the full sync does grow
    assert small == big
    # An endpoint change: the service chain and the new endpoint chain are written, the old
    # endpoint chain is flushed (deleted a second later); no map element changes.
    assert "add chain ip kube-proxy service-" in text
    assert "dnat to 10.250.0.2:8080" in text
    assert "element" not in text
    assert text.count("flush chain") == 3


def test_unchanged_sync_sends_nothing() -> None:
    (config,) = proxier_configs(parse_options(ARGS), None, ())
    nft = FakeNft()
    proxier = NftablesProxier(config, nft)
    cluster, _ = state_from_objects(objects(5, endpoint_of_first="10.250.0.1"))
    states = desired_state(cluster, config)
    proxier.sync(states, None)
    result = proxier.sync(states, {NamespacedName("t", "svc00001")})
    assert result.restore_bytes == 0 and len(nft.transactions) == 1


def test_removed_service_deletes_its_elements_and_flushes_its_chains() -> None:
    (config,) = proxier_configs(parse_options(ARGS), None, ())
    nft = FakeNft()
    clock = [0.0]
    proxier = NftablesProxier(config, nft, clock=lambda: clock[0])
    cluster, _ = state_from_objects(objects(3, endpoint_of_first="10.250.0.1"))
    proxier.sync(desired_state(cluster, config), None)
    cluster, _ = state_from_objects(objects(3, endpoint_of_first="10.250.0.1")[2:])
    proxier.sync(desired_state(cluster, config), {NamespacedName("t", "svc00000")})
    text = nft.transactions[-1]
    assert "delete element ip kube-proxy cluster-ips { 10.96.0.1 }" in text
    assert "delete element ip kube-proxy service-nodeports { tcp . 30000 }" in text
    assert "delete chain" not in text  # not yet: the kernel may still hold references
    stale = set(proxier.stale_chains)
    assert len(stale) == 3  # service-, external-, endpoint-
    clock[0] += 0.5
    proxier.sync(desired_state(cluster, config), set())
    assert set(proxier.stale_chains) == stale  # less than a second: kept
    clock[0] += 1.0
    result = proxier.sync(desired_state(cluster, config), set())
    assert result.details["stale_chains_deleted"] == 3 and not proxier.stale_chains
    assert all(f"delete chain ip kube-proxy {c}" in nft.transactions[-1] for c in stale)


def test_a_shared_element_key_survives_its_first_owner() -> None:
    """Two Services claiming one externalIP:port: the first keeps the map element; when it
    goes, the element is handed to the second (replaced, not deleted)."""

    def svc(name: str, cluster_ip: str) -> list[dict[str, object]]:
        return [
            {
                "kind": "Service",
                "metadata": {"namespace": "t", "name": name},
                "spec": {
                    "clusterIP": cluster_ip,
                    "externalIPs": ["198.51.100.1"],
                    "ports": [{"name": "p", "port": 80, "protocol": "TCP"}],
                },
            },
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "t",
                    "name": f"{name}-1",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [f"10.244.0.{cluster_ip[-1]}"]}],
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            },
        ]

    (config,) = proxier_configs(parse_options(ARGS), None, ())
    nft = FakeNft()
    proxier = NftablesProxier(config, nft)
    cluster, _ = state_from_objects([*svc("a", "10.96.0.1"), *svc("b", "10.96.0.2")])
    proxier.sync(desired_state(cluster, config), None)
    full = nft.transactions[-1]
    shared = [line for line in full.splitlines() if "198.51.100.1 . tcp . 80" in line]
    assert len(shared) == 1 and "-t/a/tcp" in shared[0]  # no duplicate add (nft would refuse)

    cluster, _ = state_from_objects(svc("b", "10.96.0.2"))
    proxier.sync(desired_state(cluster, config), {NamespacedName("t", "a")})
    text = nft.transactions[-1]
    assert "delete element ip kube-proxy service-ips { 198.51.100.1 . tcp . 80 }" in text
    readded = [
        line
        for line in text.splitlines()
        if line.startswith("add element") and "198.51.100.1 . tcp . 80" in line
    ]
    assert len(readded) == 1 and "-t/b/tcp" in readded[0]


def test_lazy_states_give_the_same_transactions() -> None:
    """The Proxier contract: a LazyStates (states computed on first use) or a plain mapping."""
    from pyproxy.proxystate import LazyStates, slices_by_service

    (config,) = proxier_configs(parse_options(ARGS), None, ())
    cluster, _ = state_from_objects(objects(7, endpoint_of_first="10.250.0.1"))
    plain, lazy = FakeNft(), FakeNft()
    NftablesProxier(config, plain).sync(desired_state(cluster, config), None)
    slices = slices_by_service(cluster.endpoint_slices.values())
    NftablesProxier(config, lazy).sync(LazyStates(cluster.services, slices, config, {}), None)
    assert plain.transactions == lazy.transactions


class FailingDeletes(FakeNft):
    """`delete chain` transactions fail (a kernel that still holds a reference)."""

    def run(self, transaction: str) -> None:
        if transaction.startswith("delete chain"):
            raise NftError("nft -f failed: Device or resource busy")
        super().run(transaction)


def test_a_failed_stale_chain_deletion_is_reported_and_the_sync_goes_full() -> None:
    """As upstream: not a failed sync (the controller counts it in
    nftables_cleanup_failures_total), but the sync becomes a full one, which finds the
    chains again in the kernel."""
    (config,) = proxier_configs(parse_options(ARGS), None, ())
    nft = FailingDeletes()
    clock = [0.0]
    proxier = NftablesProxier(config, nft, clock=lambda: clock[0])
    cluster, _ = state_from_objects(objects(3, endpoint_of_first="10.250.0.1"))
    assert proxier.canary_present() is False  # nothing in the (fake) kernel
    proxier.sync(desired_state(cluster, config), None)
    cluster, _ = state_from_objects(objects(3, endpoint_of_first="10.250.0.1")[2:])
    first = proxier.sync(desired_state(cluster, config), {NamespacedName("t", "svc00000")})
    assert first.cleanup_failures == 0 and first.details["stale_chains_flushed"] == 3
    clock[0] += 2.0
    result = proxier.sync(desired_state(cluster, config), set())
    assert result.cleanup_failures == 1 and result.full
    assert result.details["stale_chains_deleted"] == 0
    assert not proxier.need_full_sync
