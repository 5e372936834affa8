"""pyproxy taking over a node from kube-proxy's nftables mode: its stale table goes, after.

kube-proxy in nftables mode leaves its tables `ip kube-proxy` / `ip6 kube-proxy` behind when it
stops. Once pyproxy's iptables rules are in, both translate Service traffic at the same hook
priority (dstnat, -100), where the kernel runs the chain registered last first: kube-proxy's,
when the iptables nat table was there before it, as on most nodes. A Service whose endpoints
changed since kube-proxy stopped would keep going to the old endpoint. pyproxy deletes those
tables right after its first full sync (never before it: that would leave the node without
rules), as docs/deploy.md describes. Here the stale table sends the ClusterIP to a2, the cluster
state says a1: before pyproxy a2 answers, after it only a1, and the tables are gone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from netlab import Cluster, tcp_ask
from netlab.fixtures import cluster_fixture
from test_iptables_dataplane import A1, A2, HTTP, LAYOUT, eps, name, program, state, svc

pytestmark = pytest.mark.kernel

takeover_cluster = cluster_fixture(LAYOUT)

# What kube-proxy's nftables mode leaves behind, reduced to the part that matters here: its
# DNAT of the ClusterIP at priority dstnat (-100), in prerouting (pods) and output (the node).
STALE_TABLES = f"""
table ip kube-proxy {{
    chain nat-prerouting {{
        type nat hook prerouting priority -100; policy accept;
        ip daddr 10.96.0.10 tcp dport 80 dnat to {A2}:8080
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        ip daddr 10.96.0.10 tcp dport 80 dnat to {A2}:8080
    }}
}}
table ip6 kube-proxy {{
    chain nat-prerouting {{
        type nat hook prerouting priority -100; policy accept;
    }}
}}
"""


def test_kube_proxy_nftables_tables_are_deleted_after_the_first_sync(
    takeover_cluster: Cluster, tmp_path: Path
) -> None:
    c = takeover_cluster
    node = c.node("a")
    # The iptables nat chains existed before kube-proxy's table (kubelet, a CNI plugin, docker:
    # some nat rule is nearly always there), so the table's chains run first at their priority.
    for chain in ("PREROUTING", "OUTPUT"):
        node.run(["iptables-nft", "-t", "nat", "-A", chain, "-s", "192.0.2.99", "-j", "RETURN"])
    node.run(["nft", "-f", "-"], input=STALE_TABLES)
    client = c.pod("a3")
    assert name(tcp_ask(client, "10.96.0.10", 80)) == "a2"  # the stale table serves

    program(
        c,
        tmp_path,
        state(svc("web", "10.96.0.10", HTTP), eps("web", [(A1, "node-a")])),
        nodes=("a",),
    )

    assert {name(tcp_ask(client, "10.96.0.10", 80)) for _ in range(10)} == {"a1"}
    tables = node.run(["nft", "list", "tables"]).stdout
    assert "kube-proxy" not in tables, tables
    assert "KUBE-SVC-" in node.run(["iptables-nft-save", "-t", "nat"]).stdout
