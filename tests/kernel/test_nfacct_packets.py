"""nfacct counters against the real kernel: real packets bump them, pyproxy's reader sees it.

A netlab node (node-a, pods a1 and a2) programmed by `pyproxy --once` from a state file, as the
agent would. The counters live in node-a's network namespace; `NetlinkNfacct` is called there.

- localhost NodePort: connections from node-a to 127.0.0.1:NODEPORT are counted (the nat rule
  sees a connection's first packet only, as upstream's), connections to the node IP are not;
- ctstate INVALID: TCP segments with SYN and FIN set (an invalid flag combination for
  conntrack) sent from pod a2 to pod a1 are forwarded by node-a and dropped by KUBE-FORWARD,
  each one counted; a1 never answers them.
"""

from __future__ import annotations

import sys

import pytest
from netlab import Cluster, Reply, http_get
from netlab.fixtures import cluster_fixture
from netlab.rawtcp import send_syn_fin

from pyproxy.nfacct import NetlinkNfacct, open_nfacct
from pyproxy.proxystate import (
    CT_STATE_INVALID_DROPPED_NFACCT_COUNTER,
    LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER,
)

pytestmark = pytest.mark.kernel

NODE_PORT = 30080
STATE = f"""\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {{namespace: t, name: np}}
  spec:
    type: NodePort
    clusterIPs: ["10.96.0.40"]
    ports: [{{name: http, port: 80, nodePort: {NODE_PORT}, protocol: TCP}}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    namespace: t
    name: np-x
    labels: {{kubernetes.io/service-name: np}}
  addressType: IPv4
  ports: [{{name: http, port: 8080, protocol: TCP}}]
  endpoints:
  - {{addresses: ["10.244.1.11"], nodeName: node-a, conditions: {{ready: true}}}}
"""

node_cluster = cluster_fixture({"a": ("a1", "a2")}, scope="module")


@pytest.fixture(scope="module")
def net(node_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    path = tmp_path_factory.mktemp("nfacct") / "state.yaml"
    path.write_text(STATE)
    node = node_cluster.node("a")
    result = node.run(
        [
            sys.executable, "-m", "pyproxy", "--once", "--state", str(path),
            "--hostname-override", node.node_name, "--node-ip", node.ip,
            "--cluster-cidr", "10.244.0.0/16", "--iptables-backend", "nft",
        ],
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return node_cluster


def packets(net: Cluster, counter: str) -> int:
    found = net.node("a").call(lambda: NetlinkNfacct().get(counter))
    assert found is not None, f"nfacct counter {counter} missing in node-a"
    return found.packets


def test_the_subsystem_answers_in_a_fresh_namespace(net: Cluster) -> None:
    assert net.node("a").call(open_nfacct) is not None


def test_rules_count_into_the_ensured_counters(net: Cluster) -> None:
    # iptables-save's own spelling (match order, quoting, and two spaces after --nfacct-name).
    saved = net.node("a").run(["iptables-nft-save"]).stdout.splitlines()
    ext = next(line.split()[-1] for line in saved if line.startswith("-A KUBE-NODEPORTS -p tcp"))
    assert ext.startswith("KUBE-EXT-")
    assert [line for line in saved if line.startswith("-A KUBE-NODEPORTS")] == [
        '-A KUBE-NODEPORTS -d 127.0.0.0/8 -p tcp -m comment --comment "t/np:http" -m tcp'
        f" --dport {NODE_PORT} -m nfacct --nfacct-name  localhost_nps_accepted_pkts -j {ext}",
        f'-A KUBE-NODEPORTS -p tcp -m comment --comment "t/np:http" -m tcp --dport {NODE_PORT}'
        f" -j {ext}",
    ]
    assert (
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID"
        " -m nfacct --nfacct-name  ct_state_invalid_dropped_pkts -j DROP"
    ) in saved


def test_localhost_node_port_connections_are_counted(net: Cluster) -> None:
    node = net.node("a")
    before = packets(net, LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER)
    for _ in range(3):
        reply = http_get(node, "127.0.0.1", NODE_PORT)
        assert isinstance(reply, Reply) and reply.name == "a1", reply
    assert packets(net, LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER) == before + 3
    # The same NodePort on the node's own address is not a localhost NodePort.
    reply = http_get(node, node.ip, NODE_PORT)
    assert isinstance(reply, Reply) and reply.name == "a1", reply
    assert packets(net, LOCALHOST_NODEPORT_ACCEPTED_NFACCT_COUNTER) == before + 3


def test_invalid_packets_forwarded_by_the_node_are_dropped_and_counted(net: Cluster) -> None:
    a1, a2 = net.pod("a1"), net.pod("a2")
    before = packets(net, CT_STATE_INVALID_DROPPED_NFACCT_COUNTER)

    send_syn_fin(a2, a1.ip, 8080, 3)
    assert packets(net, CT_STATE_INVALID_DROPPED_NFACCT_COUNTER) == before + 3
    # A valid connection between the same pods is forwarded and not counted.
    reply = http_get(a2, a1.ip, 8080)
    assert isinstance(reply, Reply) and reply.name == "a1", reply
    assert packets(net, CT_STATE_INVALID_DROPPED_NFACCT_COUNTER) == before + 3
