"""`pyproxy --dry-run --proxy-mode ipvs` for a small state, compared with a reviewed golden text.

The state is upstream's fake proxier node (test-node, 192.168.0.2 and 192.168.1.2, pod CIDR
10.0.0.0/8) with: a sticky NodePort Service with a local and a remote endpoint; an LB Service
with externalTrafficPolicy Local, a health-check node port and loadBalancerSourceRanges that
exclude the node; a UDP Service with an external IP. Review points: one virtual server per
cluster IP, LB IP, external IP and node IP x nodePort; Local policy keeps only the local real
server on LB IP and node ports; persistent 300 on every address of the sticky Service; the LB
IP is not reachable from the node (KUBE-IPVS-OUT-FILTER) and only 203.0.113.0/25 may use it;
only the two local endpoints are in KUBE-LOOP-BACK.

On an intended change, print the new text with
`UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_ipvs_golden.py` (it is written to
stdout and the test fails, review it, then paste it below).
"""

# ruff: noqa: E501  # the golden text holds real rule lines, longer than 100 characters
from __future__ import annotations

import difflib
import os

import pytest
from support import (
    BASE_ARGS,
    TEST_NODE,
    cluster_of,
    endpoint,
    endpoint_slice,
    port,
    service,
    slice_port,
)

from pyproxy.ipvs.plan import dry_run_text
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import desired_state

OBJECTS = [
    service(
        "ns1",
        "web",
        "172.30.0.41",
        [port("p80", 80, node_port=30080)],
        type="NodePort",
        affinity_timeout=300,
    ),
    endpoint_slice(
        "ns1", "web", [endpoint("10.180.0.1", TEST_NODE), endpoint("10.180.1.1", "other")]
    ),
    service(
        "ns2",
        "lb",
        "172.30.0.42",
        [port("p80", 80, node_port=30081)],
        type="LoadBalancer",
        lb_ingress=["1.2.3.4"],
        source_ranges=["203.0.113.0/25"],
        etp="Local",
        hcnp=30000,
    ),
    endpoint_slice(
        "ns2", "lb", [endpoint("10.180.0.2", TEST_NODE), endpoint("10.180.1.2", "other")]
    ),
    service("ns3", "dns", "172.30.0.43", [port("dns", 53, "UDP")], external_ips=["192.168.99.33"]),
    endpoint_slice(
        "ns3", "dns", [endpoint("10.180.1.3", "other")], [slice_port("dns", 5353, "UDP")]
    ),
]

GOLDEN = """\
# IPVS virtual servers (ipvsadm -Ln)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  1.2.3.4:80 rr
  -> 10.180.0.2:80                Masq    1      0          0
TCP  172.30.0.41:80 rr persistent 300
  -> 10.180.0.1:80                Masq    1      0          0
  -> 10.180.1.1:80                Masq    1      0          0
TCP  172.30.0.42:80 rr
  -> 10.180.0.2:80                Masq    1      0          0
  -> 10.180.1.2:80                Masq    1      0          0
UDP  172.30.0.43:53 rr
  -> 10.180.1.3:5353              Masq    1      0          0
TCP  192.168.0.2:30080 rr persistent 300
  -> 10.180.0.1:80                Masq    1      0          0
  -> 10.180.1.1:80                Masq    1      0          0
TCP  192.168.0.2:30081 rr
  -> 10.180.0.2:80                Masq    1      0          0
TCP  192.168.1.2:30080 rr persistent 300
  -> 10.180.0.1:80                Masq    1      0          0
  -> 10.180.1.1:80                Masq    1      0          0
TCP  192.168.1.2:30081 rr
  -> 10.180.0.2:80                Masq    1      0          0
UDP  192.168.99.33:53 rr
  -> 10.180.1.3:5353              Masq    1      0          0
# addresses on kube-ipvs0
1.2.3.4/32
172.30.0.41/32
172.30.0.42/32
172.30.0.43/32
192.168.99.33/32
# ipsets (ipset save)
create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536 comment
add KUBE-LOOP-BACK 10.180.0.1,tcp:80,10.180.0.1 comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"
add KUBE-LOOP-BACK 10.180.0.2,tcp:80,10.180.0.2 comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment
add KUBE-CLUSTER-IP 172.30.0.41,tcp:80 comment "Kubernetes service cluster ip + port for masquerade purpose"
add KUBE-CLUSTER-IP 172.30.0.42,tcp:80 comment "Kubernetes service cluster ip + port for masquerade purpose"
add KUBE-CLUSTER-IP 172.30.0.43,udp:53 comment "Kubernetes service cluster ip + port for masquerade purpose"
create KUBE-EXTERNAL-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment
add KUBE-EXTERNAL-IP 192.168.99.33,udp:53 comment "Kubernetes service external ip + port for masquerade and filter purpose"
create KUBE-EXTERNAL-IP-LOCAL hash:ip,port family inet hashsize 1024 maxelem 65536 comment
create KUBE-LOAD-BALANCER hash:ip,port family inet hashsize 1024 maxelem 65536 comment
add KUBE-LOAD-BALANCER 1.2.3.4,tcp:80 comment "Kubernetes service lb portal"
create KUBE-LOAD-BALANCER-FW hash:ip,port family inet hashsize 1024 maxelem 65536 comment
add KUBE-LOAD-BALANCER-FW 1.2.3.4,tcp:80 comment "Kubernetes service load balancer ip + port for load balancer with sourceRange"
create KUBE-LOAD-BALANCER-LOCAL hash:ip,port family inet hashsize 1024 maxelem 65536 comment
add KUBE-LOAD-BALANCER-LOCAL 1.2.3.4,tcp:80 comment "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"
create KUBE-LOAD-BALANCER-SOURCE-IP hash:ip,port,ip family inet hashsize 1024 maxelem 65536 comment
create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536 comment
add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,203.0.113.0/25 comment "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 comment
add KUBE-NODE-PORT-TCP 30080 comment "Kubernetes nodeport TCP port for masquerade purpose"
add KUBE-NODE-PORT-TCP 30081 comment "Kubernetes nodeport TCP port for masquerade purpose"
create KUBE-NODE-PORT-LOCAL-TCP bitmap:port range 0-65535 comment
add KUBE-NODE-PORT-LOCAL-TCP 30081 comment "Kubernetes nodeport TCP port with externalTrafficPolicy=local"
create KUBE-NODE-PORT-UDP bitmap:port range 0-65535 comment
create KUBE-NODE-PORT-LOCAL-UDP bitmap:port range 0-65535 comment
create KUBE-NODE-PORT-SCTP-HASH hash:ip,port family inet hashsize 1024 maxelem 65536 comment
create KUBE-NODE-PORT-LOCAL-SCTP-HASH hash:ip,port family inet hashsize 1024 maxelem 65536 comment
create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535 comment
add KUBE-HEALTH-CHECK-NODE-PORT 30000 comment "Kubernetes health check node port"
create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536 comment
add KUBE-IPVS-IPS 1.2.3.4 comment "Addresses on the ipvs interface"
add KUBE-IPVS-IPS 172.30.0.41 comment "Addresses on the ipvs interface"
add KUBE-IPVS-IPS 172.30.0.42 comment "Addresses on the ipvs interface"
add KUBE-IPVS-IPS 172.30.0.43 comment "Addresses on the ipvs interface"
add KUBE-IPVS-IPS 192.168.99.33 comment "Addresses on the ipvs interface"
# iptables-restore input
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-SERVICES -m comment --comment "Kubernetes service lb portal" -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER
-A KUBE-LOAD-BALANCER -m comment --comment "Kubernetes service load balancer ip + port with externalTrafficPolicy=local" -m set --match-set KUBE-LOAD-BALANCER-LOCAL dst,dst -j RETURN
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port with externalTrafficPolicy=local" -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT
-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m addrtype --dst-type LOCAL -j ACCEPT
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
-A KUBE-PROXY-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port for load balancer with sourceRange" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL
-A KUBE-SOURCE-RANGES-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port + source cidr for packet filter purpose" -m set --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j RETURN
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
-I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-I INPUT 1 -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-I INPUT 1 -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-I FORWARD 1 -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-I INPUT 1 -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-I OUTPUT 1 -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
COMMIT
"""


def _render() -> str:
    options = parse_options(["--dry-run", "--proxy-mode", "ipvs", *BASE_ARGS])
    (config,) = proxier_configs(options, None, ())
    return dry_run_text(desired_state(cluster_of(OBJECTS), config), config, options.ipvs_scheduler)


def test_dry_run_golden() -> None:
    got = _render()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        print(got)
        # An update run never passes: the printed text is pasted in by hand after review.
        pytest.fail("UPDATE_GOLDEN=1: printed the dry run; review it and paste it into GOLDEN")
    if got != GOLDEN:
        diff = "".join(
            difflib.unified_diff(
                GOLDEN.splitlines(keepends=True), got.splitlines(keepends=True), "golden", "got"
            )
        )
        raise AssertionError(f"dry-run output changed:\n{diff}")


def test_dry_run_is_deterministic() -> None:
    assert _render() == _render()
