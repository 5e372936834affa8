"""ipvs mode's node-wide flags, through the real command line, inside the IPVS test VM.

`pyproxy --proxy-mode ipvs --once --state FILE` runs in a netlab node namespace, as the
DaemonSet's container would; the tests look at what the kernel then does:

- --ipvs-strict-arp: arp_ignore=1 / arp_announce=2 in the node, and a LAN client's ARP request
  for a Service address bound on kube-ipvs0 is no longer answered (it is without the flag);
- --ipvs-tcp-timeout / --ipvs-tcpfin-timeout / --ipvs-udp-timeout: `ipvsadm -L --timeout`, a
  0 (the default) leaves a timeout as it is, and a UDP flow's IPVS connection expires by the
  configured timeout;
- --ipvs-exclude-cidrs: stale virtual servers inside the CIDRs survive syncs (one of pyproxy's
  and a foreign one its ownership rule would claim), while a stale one outside is removed.

    hack/vm.sh run -- .venv/bin/python -m pytest tests/vm -m vm -k flags
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from netlab import Cluster, Node, Reply, udp_ask
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("ip_vs")]

A1, B1 = "10.244.1.11", "10.244.2.11"
#: Python starts slowly under emulation (no KVM); a --once run is a few seconds with KVM.
PYPROXY_TIMEOUT = 300.0
#: The kernel's IPVS timeouts in a new network namespace (tcp tcpfin udp, seconds).
KERNEL_DEFAULT_TIMEOUTS = "900 120 300"

Obj = dict[str, Any]

flags_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)}, scope="module")


def svc(name: str, ip: str, port: int, proto: str = "TCP") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "t", "name": name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "p", "port": port, "protocol": proto}],
        },
    }


def eps(service: str, ip: str, node: str, port: int, proto: str = "TCP") -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "t",
            "name": f"{service}-x",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": {"ready": True}}],
    }


def state_file(tmp_path: Path, name: str, objects: Sequence[Obj]) -> Path:
    """A `kubectl get -o yaml`-style List (JSON is YAML)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    return path


def pyproxy_once(node: Node, state: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "pyproxy",
        "--proxy-mode",
        "ipvs",
        "--once",
        "--state",
        str(state),
        "--hostname-override",
        node.node_name,
        "--node-ip",
        node.ip,
        "--cluster-cidr",
        "10.244.0.0/16",
        "--iptables-backend",
        "nft",
        *flags,
    ]
    result = node.run(argv, check=False, timeout=PYPROXY_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return result


def sysctl(node: Node, key: str) -> str:
    return node.run(["sysctl", "-n", key]).stdout.strip()


def ipvs_timeouts(node: Node) -> str:
    """`ipvsadm -L --timeout` → "TCP TCPFIN UDP" in seconds."""
    out = node.run(["ipvsadm", "-L", "--timeout"]).stdout
    match = re.search(r"Timeout \(tcp tcpfin udp\): (\d+) (\d+) (\d+)", out)
    assert match, out
    return " ".join(match.groups())


def virtual_servers(node: Node) -> str:
    return node.run(["ipvsadm", "-Ln"]).stdout


def arp_answer(c: Cluster, ip: str) -> str | None:
    """Ask the LAN who has `ip` (an on-link route in the client, then one ping); the MAC that
    answered, or None when nobody did (the client's neighbour entry FAILED or went away)."""
    client = c.client
    client.ip_cmd("route", "replace", f"{ip}/32", "dev", "eth0")
    client.ip_cmd("neigh", "flush", "to", ip, "dev", "eth0")
    client.run(["ping", "-c", "1", "-W", "2", ip], check=False)
    # Bounded wait for the kernel's verdict: an unanswered entry stays INCOMPLETE while the
    # kernel retries (3 probes, 1 s apart), then turns FAILED.
    deadline = time.monotonic() + 60
    while True:
        out = client.ip_cmd("-j", "neigh", "show", "to", ip, "dev", "eth0").stdout
        entries = json.loads(out or "[]")
        if not entries or "INCOMPLETE" not in entries[0].get("state", []):
            break
        assert time.monotonic() < deadline, entries
        time.sleep(0.5)
    return str(entries[0]["lladdr"]) if entries and "lladdr" in entries[0] else None


def mac(node: Node) -> str:
    (link,) = json.loads(node.ip_cmd("-j", "link", "show", "eth0").stdout)
    return str(link["address"])


def udp_expiry(node: Node, vip: str) -> list[int]:
    """Seconds left of each IPVS UDP connection to `vip` (`ipvsadm -Lnc`, expire mm:ss)."""
    out = node.run(["ipvsadm", "-Lnc"]).stdout
    left = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 5 and words[0] == "UDP" and words[4] == vip:
            minutes, seconds = words[1].split(":")
            left.append(int(minutes) * 60 + int(seconds))
    return left


def test_strict_arp_and_timeouts(flags_cluster: Cluster, tmp_path: Path) -> None:
    c = flags_cluster
    node = c.node("a")
    state = state_file(
        tmp_path,
        "a",
        [
            svc("arp", "10.96.0.88", 80),
            eps("arp", A1, "node-a", 8080),
            svc("dns", "10.96.0.53", 53, "UDP"),
            eps("dns", A1, "node-a", 5353, "UDP"),
        ],
    )
    # What a fresh node has, so the checks below can tell the flags' doing.
    assert sysctl(node, "net.ipv4.conf.all.arp_ignore") == "0"
    assert sysctl(node, "net.ipv4.conf.all.arp_announce") == "0"
    assert ipvs_timeouts(node) == KERNEL_DEFAULT_TIMEOUTS

    # Without the flags: the Service address on kube-ipvs0 is answered for on the LAN (the
    # node's weak host model), and the timeouts are left alone.
    pyproxy_once(node, state)
    assert "10.96.0.88" in node.ip_cmd("addr", "show", "dev", "kube-ipvs0").stdout
    assert arp_answer(c, "10.96.0.88") == mac(node)
    assert sysctl(node, "net.ipv4.conf.all.arp_ignore") == "0"
    assert ipvs_timeouts(node) == KERNEL_DEFAULT_TIMEOUTS

    pyproxy_once(
        node,
        state,
        "--ipvs-strict-arp",
        "--ipvs-tcp-timeout=10m",
        "--ipvs-tcpfin-timeout=30s",
        "--ipvs-udp-timeout=45s",
    )
    assert sysctl(node, "net.ipv4.conf.all.arp_ignore") == "1"
    assert sysctl(node, "net.ipv4.conf.all.arp_announce") == "2"
    assert arp_answer(c, "10.96.0.88") is None
    assert ipvs_timeouts(node) == "600 30 45"
    # A UDP flow through the virtual server: its IPVS connection expires by the new timeout.
    reply = udp_ask(c.pod("a2"), "10.96.0.53", 53)
    assert isinstance(reply, Reply) and reply.name == "a1", reply
    left = udp_expiry(node, "10.96.0.53:53")
    assert left and all(0 < s <= 45 for s in left), node.run(["ipvsadm", "-Lnc"]).stdout

    # One timeout given, the others 0: only that one changes (`0 to leave as-is`).
    pyproxy_once(node, state, "--ipvs-udp-timeout=1m")
    assert ipvs_timeouts(node) == "600 30 60"
    # The other node was never touched: these settings are per network namespace.
    other = c.node("b")
    assert sysctl(other, "net.ipv4.conf.all.arp_ignore") == "0"
    assert ipvs_timeouts(other) == KERNEL_DEFAULT_TIMEOUTS


def add_foreign_virtual_server(node: Node, vip: str) -> None:
    """A virtual server someone else made, on an address they put on kube-ipvs0 too: pyproxy's
    ownership rule (an address bound on kube-ipvs0) claims it."""
    node.run(["ipvsadm", "-A", "-t", f"{vip}:80", "-s", "wlc"])
    node.ip_cmd("addr", "add", f"{vip}/32", "dev", "kube-ipvs0")


def test_exclude_cidrs_keep_stale_virtual_servers(flags_cluster: Cluster, tmp_path: Path) -> None:
    node = flags_cluster.node("b")
    before = state_file(
        tmp_path,
        "before",
        [
            svc("gone", "10.96.1.10", 80),
            eps("gone", B1, "node-b", 8080),
            svc("kept", "10.97.0.10", 80),
            eps("kept", B1, "node-b", 8080),
        ],
    )
    after = state_file(tmp_path, "after", [])
    node.run(["ipvsadm", "-A", "-t", "172.16.0.1:80", "-s", "wlc"])  # foreign, never claimed

    # The control: without the flag, every stale virtual server pyproxy claims is deleted.
    pyproxy_once(node, before)
    add_foreign_virtual_server(node, "10.97.0.99")
    pyproxy_once(node, after)
    table = virtual_servers(node)
    for gone in ("10.96.1.10:80", "10.97.0.10:80", "10.97.0.99:80"):
        assert gone not in table, table
    assert "172.16.0.1:80" in table

    exclude = "--ipvs-exclude-cidrs=10.97.0.0/16"
    pyproxy_once(node, before, exclude)
    add_foreign_virtual_server(node, "10.97.0.99")
    for _ in range(2):  # survives this sync and the next
        pyproxy_once(node, after, exclude)
        table = virtual_servers(node)
        assert "10.96.1.10:80" not in table, table
        for kept in ("10.97.0.10:80", "10.97.0.99:80", "172.16.0.1:80"):
            assert kept in table, table
