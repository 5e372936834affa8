"""nfacct counters against the real kernel: real packets bump them, pyproxy's reader sees it.

A netlab node (node-a, pods a1 and a2) programmed by the node agent (state_agent.py: the real
Controller fed from a state file; `--once` writes no nfacct matches, nothing would read them).
The counters live in node-a's network namespace; `NetlinkNfacct` is called there.

- localhost NodePort: connections from node-a to 127.0.0.1:NODEPORT are counted (the nat rule
  sees a connection's first packet only, as upstream's), connections to the node IP are not;
- ctstate INVALID: TCP segments with SYN and FIN set (an invalid flag combination for
  conntrack) sent from pod a2 to pod a1 are forwarded by node-a and dropped by KUBE-FORWARD,
  each one counted; a1 never answers them.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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

REPO = Path(__file__).resolve().parents[2]
STATE_AGENT = Path(__file__).with_name("state_agent.py")
NODE_PORT = 30080
STATE_FILE = "state.yaml"
AGENT_FLAGS = ("--cluster-cidr", "10.244.0.0/16", "--iptables-backend", "nft")
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
def state_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nfacct") / STATE_FILE
    path.write_text(STATE)
    return path


@pytest.fixture(scope="module")
def net(node_cluster: Cluster, state_path: Path) -> Iterator[Cluster]:
    path = state_path
    node = node_cluster.node("a")
    proc = node.popen(
        [
            sys.executable, str(STATE_AGENT), str(path),
            "--hostname-override", node.node_name, "--node-ip", node.ip,
            *AGENT_FLAGS,
        ],
        stdout=subprocess.PIPE,
        cwd=str(REPO),
    )  # fmt: skip
    try:
        assert proc.popen.stdout is not None
        # A generous bound on a loaded machine; a failed first sync never prints SYNCED.
        ready, _, _ = select.select([proc.popen.stdout], [], [], 120)
        line = proc.popen.stdout.readline() if ready else ""
        assert line.strip() == "SYNCED", f"agent did not sync: {line!r}\n{proc.log_text()}"
        yield node_cluster
    finally:
        proc.stop()


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


def test_explain_sees_no_drift_in_the_counting_rules(net: Cluster, state_path: Path) -> None:
    """`pyproxy trace` renders what the agent wrote: with the counters that exist on the node."""
    node = net.node("a")
    result = node.run(
        [
            sys.executable, "-m", "pyproxy.explain", "trace",
            "--src", "127.0.0.1", "--dst", "127.0.0.1", "--port", str(NODE_PORT), "--from-node",
            "--state", str(state_path),
            "--hostname-override", node.node_name, "--node-ip", node.ip, *AGENT_FLAGS,
            "-o", "json",
        ],
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["drift"] == {"checked": True, "chains": []}
    assert report["verdict"] == "DNAT"
