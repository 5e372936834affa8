"""Packet tracer and iptables text parser, against static kube-proxy-format rulesets.

The rulesets are written by hand in exactly the form kube-proxy's iptables proxier writes them
(reference/kube-proxy.md §b), once as restore input (what pyproxy's renderer produces, no
built-in chain jumps) and once as a kernel's ``iptables-save`` prints the same thing (options
reordered, ``/32`` added, ``--set-xmark``, built-in chains with policies and jumps).
"""

# The rulesets below are kube-proxy's rule lines verbatim; wrapping them would hide that.
# ruff: noqa: E501

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pyproxy.iptables.restore_text import (
    AddressMatch,
    ConntrackMatch,
    MarkMatch,
    MarkTarget,
    Match,
    PortMatch,
    RecentMatch,
    Statistic,
)
from pyproxy.iptables.tracer import (
    Rule,
    Ruleset,
    RulesetParseError,
    StepAction,
    Trace,
    Verdict,
    check_jumps,
    parse_rule,
    parse_ruleset,
    sort_ruleset_text,
    trace_packet,
)
from pyproxy.iptables.vocabulary import split_words

NODE_IP = "192.168.0.2"
NODE_IPS = (NODE_IP, "192.168.1.2")
POD = "10.0.0.2"
EXTERNAL = "203.0.113.2"  # inside svc5's loadBalancerSourceRanges
BLOCKED = "198.51.100.7"  # outside them

# ns1/svc1  ClusterIP 172.30.0.41:80, endpoints 10.180.0.1, 10.180.0.2 (hairpin SEP rules)
# ns2/svc2  LoadBalancer eTP=Local, externalIP 192.168.99.22, LB 1.2.3.4, NodePort 3001,
#           HCNP 30000, one endpoint 10.180.0.2 on another node (no local endpoints)
# ns3/svc3  NodePort 3003, eTP=Cluster, endpoint 10.180.0.3
# ns5/svc5  LoadBalancer 5.6.7.8 with sourceRanges 203.0.113.0/25, ClientIP affinity,
#           endpoints 10.180.0.3, 10.180.0.4
# ns6/svc6  ClusterIP 172.30.0.46, no endpoints
# ns7/svc7  NodePort 3007, eTP=Local, endpoints 10.180.0.7 (local) and 10.180.1.7 (remote)
RESTORE = """\
*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-KPEMU3PDPRCEMWRI - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-4XN4Y7BLDMS4FVTY - [0:0]
:KUBE-SEP-HZXTC6EBGJZ64CAL - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-LXVODXWDISEETFEF - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-XMHRVSN5TXKFIACL - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-KPEMU3PDPRCEMWRI - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SVL-KPEMU3PDPRCEMWRI - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-NODEPORTS -m comment --comment ns7/svc7:p80 -m tcp -p tcp --dport 3007 -j KUBE-EXT-KPEMU3PDPRCEMWRI
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns7/svc7:p80 cluster IP" -m tcp -p tcp -d 172.30.0.47 --dport 80 -j KUBE-SVC-KPEMU3PDPRCEMWRI
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-KPEMU3PDPRCEMWRI -m comment --comment "pod traffic for ns7/svc7:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-KPEMU3PDPRCEMWRI
-A KUBE-EXT-KPEMU3PDPRCEMWRI -m comment --comment "masquerade LOCAL traffic for ns7/svc7:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-KPEMU3PDPRCEMWRI -m comment --comment "route LOCAL traffic for ns7/svc7:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-KPEMU3PDPRCEMWRI
-A KUBE-EXT-KPEMU3PDPRCEMWRI -j KUBE-SVL-KPEMU3PDPRCEMWRI
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-4XN4Y7BLDMS4FVTY -m comment --comment ns5/svc5:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-4XN4Y7BLDMS4FVTY -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-4XN4Y7BLDMS4FVTY --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SEP-HZXTC6EBGJZ64CAL -m comment --comment ns7/svc7:p80 -s 10.180.0.7 -j KUBE-MARK-MASQ
-A KUBE-SEP-HZXTC6EBGJZ64CAL -m comment --comment ns7/svc7:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.7:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-XMHRVSN5TXKFIACL -m comment --comment ns7/svc7:p80 -s 10.180.1.7 -j KUBE-MARK-MASQ
-A KUBE-SEP-XMHRVSN5TXKFIACL -m comment --comment ns7/svc7:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.1.7:80
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-KPEMU3PDPRCEMWRI -m comment --comment "ns7/svc7:p80 cluster IP" -m tcp -p tcp -d 172.30.0.47 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-KPEMU3PDPRCEMWRI -m comment --comment "ns7/svc7:p80 -> 10.180.0.7:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-HZXTC6EBGJZ64CAL
-A KUBE-SVC-KPEMU3PDPRCEMWRI -m comment --comment "ns7/svc7:p80 -> 10.180.1.7:80" -j KUBE-SEP-XMHRVSN5TXKFIACL
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.4:80" -m recent --name KUBE-SEP-4XN4Y7BLDMS4FVTY --rcheck --seconds 10800 --reap -j KUBE-SEP-4XN4Y7BLDMS4FVTY
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.4:80" -j KUBE-SEP-4XN4Y7BLDMS4FVTY
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
-A KUBE-SVL-KPEMU3PDPRCEMWRI -m comment --comment "ns7/svc7:p80 -> 10.180.0.7:80" -j KUBE-SEP-HZXTC6EBGJZ64CAL
COMMIT
"""

# The same rules as a kernel's iptables-save shows them once kube-proxy has ensured its
# built-in chain jumps: -s/-d/-p first with /32, MARK as --set-xmark, statistic with 11
# decimals, recent with --mask/--rsource, REJECT with --reject-with, comments always quoted,
# plus some foreign rules (-m set, -m physdev) the tracer can't evaluate.
SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 22 02:30:00 2025
*filter
:INPUT ACCEPT [120:9000]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [100:8000]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -m set --match-set trusted-hosts src -j ACCEPT
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m physdev --physdev-is-bridged -j ACCEPT
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-EXTERNAL-SERVICES -d 192.168.99.22/32 -p tcp -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 3001 -j DROP
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name  ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns2/svc2:p80 health check node port" -m tcp --dport 30000 -j ACCEPT
-A KUBE-PROXY-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp --dport 80 -j DROP
-A KUBE-SERVICES -d 172.30.0.46/32 -p tcp -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
# Completed on Sat Nov 22 02:30:00 2025
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 22 02:30:00 2025
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-4XN4Y7BLDMS4FVTY - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-LXVODXWDISEETFEF - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -s 10.0.0.0/8 -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -s 203.0.113.0/25 -m comment --comment "ns5/svc5:p80 loadbalancer IP" -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns2/svc2:p80" -m tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns5/svc5:p80" -m tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-4XN4Y7BLDMS4FVTY -s 10.180.0.4/32 -m comment --comment "ns5/svc5:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-4XN4Y7BLDMS4FVTY -p tcp -m comment --comment "ns5/svc5:p80" -m recent --set --name KUBE-SEP-4XN4Y7BLDMS4FVTY --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -s 10.180.0.3/32 -m comment --comment "ns5/svc5:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -p tcp -m comment --comment "ns5/svc5:p80" -m recent --set --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-LXVODXWDISEETFEF -s 10.180.0.2/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-LXVODXWDISEETFEF -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -s 10.180.0.2/32 -m comment --comment "ns2/svc2:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -p tcp -m comment --comment "ns2/svc2:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -d 172.30.0.42/32 -p tcp -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -d 192.168.99.22/32 -p tcp -m comment --comment "ns2/svc2:p80 external IP" -m tcp --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -d 172.30.0.45/32 -p tcp -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT ! -s 10.0.0.0/8 -d 172.30.0.42/32 -p tcp -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C ! -s 10.0.0.0/8 -d 172.30.0.45/32 -p tcp -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.4:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-4XN4Y7BLDMS4FVTY --mask 255.255.255.255 --rsource -j KUBE-SEP-4XN4Y7BLDMS4FVTY
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.4:80" -j KUBE-SEP-4XN4Y7BLDMS4FVTY
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
COMMIT
# Completed on Sat Nov 22 02:30:00 2025
"""

SVC1 = "KUBE-SVC-XPGD46QRK7WJZT7O"
SEP1 = "KUBE-SEP-SXIVWICOYRO3J4NJ"  # ns1/svc1 -> 10.180.0.1:80
SEP2 = "KUBE-SEP-LXVODXWDISEETFEF"  # ns1/svc1 -> 10.180.0.2:80
SVC5_SEP_A = "KUBE-SEP-I77PXRDZVX7PMWMN"  # ns5/svc5 -> 10.180.0.3:80
SVC5_SEP_B = "KUBE-SEP-4XN4Y7BLDMS4FVTY"  # ns5/svc5 -> 10.180.0.4:80


@pytest.fixture(scope="module")
def restore() -> Ruleset:
    return parse_ruleset(RESTORE)


@pytest.fixture(scope="module")
def saved() -> Ruleset:
    return parse_ruleset(SAVE)


def trace(rs: Ruleset, src: str, dst: str, dport: int, **kwargs: Any) -> Trace:
    kwargs.setdefault("local_ips", NODE_IPS)
    return trace_packet(rs, src=src, dst=dst, dport=dport, **kwargs)


@dataclass(frozen=True)
class Flow:
    name: str
    src: str
    dst: str
    dport: int
    output: str
    masq: bool = False
    verdict: Verdict | None = None
    protocol: str = "tcp"


# Flows valid for both RESTORE and SAVE (services present in both).
COMMON_FLOWS = [
    Flow("no match", POD, "10.0.0.3", 80, "", verdict=Verdict.NONE),
    Flow(
        "cluster IP, two endpoints",
        POD,
        "172.30.0.41",
        80,
        "10.180.0.1:80, 10.180.0.2:80",
        verdict=Verdict.DNAT,
    ),
    Flow("cluster IP, wrong port", POD, "172.30.0.41", 81, "", verdict=Verdict.NONE),
    Flow("cluster IP, wrong protocol", POD, "172.30.0.41", 80, "", protocol="udp"),
    Flow(
        "cluster IP from outside the pod CIDR is masqueraded",
        NODE_IP,
        "172.30.0.41",
        80,
        "10.180.0.1:80, 10.180.0.2:80",
        masq=True,
    ),
    Flow(
        "hairpin: endpoint to its own service",
        "10.180.0.1",
        "172.30.0.41",
        80,
        "10.180.0.1:80, 10.180.0.2:80",
        masq=True,
    ),
    Flow("no endpoints: REJECT", POD, "172.30.0.46", 80, "REJECT", verdict=Verdict.REJECT),
    Flow(
        "eTP=Local, no local endpoints: external client DROP",
        EXTERNAL,
        "192.168.99.22",
        80,
        "DROP",
        verdict=Verdict.DROP,
    ),
    Flow("eTP=Local LB IP, external client DROP", EXTERNAL, "1.2.3.4", 80, "DROP"),
    Flow("eTP=Local NodePort, external client DROP", EXTERNAL, NODE_IP, 3001, "DROP"),
    Flow("eTP=Local, pod traffic short-circuits", POD, "192.168.99.22", 80, "10.180.0.2:80"),
    Flow(
        "eTP=Local, LOCAL traffic masqueraded",
        NODE_IP,
        "192.168.99.22",
        80,
        "10.180.0.2:80",
        masq=True,
    ),
    Flow("health check node port", EXTERNAL, NODE_IP, 30000, "ACCEPT", verdict=Verdict.ACCEPT),
    Flow(
        "LB with source ranges, allowed source",
        EXTERNAL,
        "5.6.7.8",
        80,
        "10.180.0.3:80, 10.180.0.4:80",
        masq=True,
    ),
    Flow(
        "LB with source ranges, blocked source",
        BLOCKED,
        "5.6.7.8",
        80,
        "DROP",
        verdict=Verdict.DROP,
    ),
    Flow(
        "NodePort of an LB with source ranges bypasses them",
        BLOCKED,
        NODE_IP,
        3002,
        "10.180.0.3:80, 10.180.0.4:80",
        masq=True,
    ),
    Flow("NodePort on a non-local IP", EXTERNAL, "192.168.0.99", 3002, ""),
    Flow(
        "localhost counts as LOCAL",
        "127.0.0.1",
        "127.0.0.1",
        3002,
        "10.180.0.3:80, 10.180.0.4:80",
        masq=True,
    ),
]

RESTORE_ONLY_FLOWS = [
    Flow(
        "NodePort eTP=Cluster is masqueraded",
        EXTERNAL,
        NODE_IP,
        3003,
        "10.180.0.3:80",
        masq=True,
        verdict=Verdict.DNAT,
    ),
    Flow(
        "NodePort on the second node IP", EXTERNAL, "192.168.1.2", 3003, "10.180.0.3:80", masq=True
    ),
    Flow(
        "eTP=Local NodePort with a local endpoint, external client",
        EXTERNAL,
        NODE_IP,
        3007,
        "10.180.0.7:80",
    ),
    Flow(
        "eTP=Local NodePort, pod client gets every endpoint",
        POD,
        NODE_IP,
        3007,
        "10.180.0.7:80, 10.180.1.7:80",
    ),
    Flow(
        "eTP=Local NodePort, node client gets every endpoint, masqueraded",
        NODE_IP,
        NODE_IP,
        3007,
        "10.180.0.7:80, 10.180.1.7:80",
        masq=True,
    ),
]


def _check(rs: Ruleset, flow: Flow, **kwargs: Any) -> Trace:
    t = trace(rs, flow.src, flow.dst, flow.dport, protocol=flow.protocol, **kwargs)
    problems = []
    if t.output != flow.output:
        problems.append(f"output {t.output!r}, expected {flow.output!r}")
    if t.masquerade != flow.masq:
        problems.append(f"masquerade {t.masquerade}, expected {flow.masq}")
    if flow.verdict is not None and t.verdict != flow.verdict:
        problems.append(f"verdict {t.verdict}, expected {flow.verdict}")
    assert not problems, "\n".join([*problems, t.describe()])
    return t


@pytest.mark.parametrize("flow", COMMON_FLOWS + RESTORE_ONLY_FLOWS, ids=lambda f: f.name)
def test_flows_restore_format(restore: Ruleset, flow: Flow) -> None:
    # No built-in chain jumps in the renderer's output: upstream's direct KUBE-* run.
    _check(restore, flow)


@pytest.mark.parametrize("flow", COMMON_FLOWS, ids=lambda f: f.name)
def test_flows_iptables_save_format(saved: Ruleset, flow: Flow) -> None:
    # Same flows, same results from the reordered text (built-in chains are walked in
    # test_builtin_walk_and_state).
    _check(saved, flow, entry="kube")


def _path(trace: Trace) -> list[tuple[str, str, int, str, str | None, int]]:
    return [(s.table, s.chain, s.index, s.action, s.target, s.depth) for s in trace.steps]


def test_steps_of_a_load_balanced_cluster_ip(restore: Ruleset) -> None:
    trace = _check(
        restore,
        Flow("", POD, "172.30.0.41", 80, "10.180.0.1:80, 10.180.0.2:80", verdict=Verdict.DNAT),
    )
    a = StepAction
    assert _path(trace) == [
        ("nat", "KUBE-SERVICES", 0, a.ENTER, None, 0),
        ("nat", "KUBE-SERVICES", 1, a.JUMPED, SVC1, 0),
        ("nat", SVC1, 2, a.BRANCHED, SEP1, 1),
        ("nat", SEP1, 2, a.DNAT, "10.180.0.1:80", 2),
        ("nat", SVC1, 3, a.JUMPED, SEP2, 1),
        ("nat", SEP2, 2, a.DNAT, "10.180.0.2:80", 2),
        ("filter", "KUBE-SERVICES", 0, a.ENTER, None, 0),
        ("filter", "KUBE-EXTERNAL-SERVICES", 0, a.ENTER, None, 0),
        ("filter", "KUBE-NODEPORTS", 0, a.ENTER, None, 0),
        ("filter", "KUBE-PROXY-FIREWALL", 0, a.ENTER, None, 0),
    ]
    assert trace.steps[1].rule.startswith('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80')
    assert [(b.endpoint, b.masquerade, b.probability) for b in trace.branches] == [
        ("10.180.0.1:80", False, 0.5),
        ("10.180.0.2:80", False, 0.5),
    ]
    assert trace.warnings == ()
    assert "KUBE-SEP-SXIVWICOYRO3J4NJ" in trace.describe()


def test_steps_of_masquerade_and_hairpin(restore: Ruleset) -> None:
    trace = _check(
        restore, Flow("", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80, 10.180.0.2:80", True)
    )
    # Only the path that lands on the sender itself is masqueraded.
    assert [(b.endpoint, b.masquerade) for b in trace.branches] == [
        ("10.180.0.1:80", False),
        ("10.180.0.2:80", True),
    ]
    marks = [s for s in trace.steps if s.target == "MARK"]
    assert len(marks) == 1
    assert marks[0].chain == "KUBE-MARK-MASQ"
    assert marks[0].note == "mark 0x0 -> 0x4000 (masquerade)"
    assert ("nat", "KUBE-MARK-MASQ", 0, StepAction.RETURNED, None, 3) in _path(trace)


def test_lb_source_ranges_drop_path(restore: Ruleset) -> None:
    trace = _check(restore, Flow("", BLOCKED, "5.6.7.8", 80, "DROP", verdict=Verdict.DROP))
    a = StepAction
    assert _path(trace) == [
        ("nat", "KUBE-SERVICES", 0, a.ENTER, None, 0),
        ("nat", "KUBE-SERVICES", 7, a.JUMPED, "KUBE-FW-NUKIZ6OKUXPJNT4C", 0),
        ("nat", "KUBE-FW-NUKIZ6OKUXPJNT4C", 2, a.MATCHED, None, 1),
        ("nat", "KUBE-FW-NUKIZ6OKUXPJNT4C", 0, a.RETURNED, None, 1),
        ("filter", "KUBE-SERVICES", 0, a.ENTER, None, 0),
        ("filter", "KUBE-EXTERNAL-SERVICES", 0, a.ENTER, None, 0),
        ("filter", "KUBE-NODEPORTS", 0, a.ENTER, None, 0),
        ("filter", "KUBE-PROXY-FIREWALL", 0, a.ENTER, None, 0),
        ("filter", "KUBE-PROXY-FIREWALL", 1, a.VERDICT, "DROP", 0),
    ]


def test_client_ip_affinity(restore: Ruleset) -> None:
    lb_ip = "172.30.0.45"
    # No recent-list state: the affinity rules are skipped, both endpoints possible.
    t = trace(restore, POD, lb_ip, 80)
    assert t.output == "10.180.0.3:80, 10.180.0.4:80"
    skipped = [s for s in t.steps if s.action == StepAction.SKIPPED]
    assert [s.target for s in skipped] == [SVC5_SEP_A, SVC5_SEP_B]
    assert "ClientIP affinity" in skipped[0].note
    # The client already has affinity to the second endpoint: only that one.
    t = trace(restore, POD, lb_ip, 80, recent={SVC5_SEP_B: [POD]})
    assert t.output == "10.180.0.4:80"
    assert [s.action for s in t.steps if s.chain == "KUBE-SVC-NUKIZ6OKUXPJNT4C"] == [
        StepAction.JUMPED
    ]
    # Someone else's affinity doesn't count.
    t = trace(restore, POD, lb_ip, 80, recent={SVC5_SEP_B: ["10.9.9.9"]})
    assert t.output == "10.180.0.3:80, 10.180.0.4:80"


def test_from_node_uses_output_chains(saved: Ruleset) -> None:
    # from_node makes the source LOCAL even when it's not listed.
    t = trace(saved, NODE_IP, "172.30.0.41", 80, local_ips=(), from_node=True, ctstate="NEW")
    assert t.output == "10.180.0.1:80, 10.180.0.2:80"
    assert t.masquerade
    entered = [(s.table, s.chain) for s in t.steps if s.action == StepAction.ENTER]
    assert entered == [("nat", "OUTPUT"), ("filter", "OUTPUT")]


def test_builtin_walk_and_state(saved: Ruleset) -> None:
    # Forwarded to a remote endpoint: FORWARD -> KUBE-FORWARD accepts the marked packet
    # (the tracer knows the masquerade bit it set itself).
    t = trace(saved, EXTERNAL, "5.6.7.8", 80, ctstate="NEW")
    assert t.output == "10.180.0.3:80, 10.180.0.4:80, ACCEPT"
    assert t.verdict == Verdict.DNAT
    assert t.filter_verdict == Verdict.ACCEPT
    entered = [(s.table, s.chain) for s in t.steps if s.action == StepAction.ENTER]
    assert entered == [("nat", "PREROUTING"), ("filter", "FORWARD")]
    # Without conntrack state the ctstate-guarded jumps can't be taken: the REJECT for a
    # service without endpoints is not reached, and FORWARD's DROP policy decides.
    dropping = parse_ruleset(SAVE.replace(":FORWARD ACCEPT", ":FORWARD DROP"))
    t = trace(dropping, EXTERNAL, "172.30.0.46", 80)
    assert t.output == "DROP"
    assert t.steps[-1].action == StepAction.POLICY
    skipped = {s.target for s in t.steps if s.action == StepAction.SKIPPED and s.chain == "FORWARD"}
    assert skipped == {"KUBE-PROXY-FIREWALL", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"}
    assert any(s.action == StepAction.UNKNOWN for s in t.steps)  # -m physdev
    t = trace(dropping, EXTERNAL, "172.30.0.46", 80, ctstate="NEW")
    assert t.output == "REJECT"
    # Upstream's direct mode on the same text, whatever the built-in chains say.
    t = trace(dropping, EXTERNAL, "172.30.0.46", 80, entry="kube")
    assert t.output == "REJECT"


def test_unknown_match_is_reported_where_it_matters(saved: Ruleset) -> None:
    # Delivered locally (node IP, a port nobody serves): INPUT's ipset rule can't be
    # evaluated, so it's assumed not to match and reported; the policy then accepts.
    t = trace(saved, EXTERNAL, NODE_IP, 22, ctstate="NEW")
    assert t.verdict == Verdict.NONE
    assert t.output == ""
    unknown = [s for s in t.steps if s.action == StepAction.UNKNOWN]
    assert [(s.chain, s.index) for s in unknown] == [("INPUT", 5)]
    assert "ipset trusted-hosts" in unknown[0].note
    assert t.warnings == ("filter/INPUT #5: can't evaluate: ipset trusted-hosts contents unknown",)
    assert t.steps[-1].action == StepAction.POLICY


def test_localhost_firewall_uses_dnat_ctstate() -> None:
    rs = parse_ruleset(
        "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n"
        "-A INPUT -j KUBE-FIREWALL\n"
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" '
        "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
        "-j DROP\nCOMMIT\n"
    )
    assert trace(rs, EXTERNAL, "127.0.0.1", 3001, ctstate="NEW").output == "DROP"
    assert trace(rs, EXTERNAL, "127.0.0.1", 3001, ctstate="ESTABLISHED").output == ""
    assert trace(rs, EXTERNAL, "127.0.0.1", 3001).output == ""


IPV6 = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SVC-C2DO364MY4EZZI3V - [0:0]
:KUBE-SEP-ENEX4BI6XWD55KUY - [0:0]
:KUBE-SEP-4WJRTQKXTYOZCJM5 - [0:0]
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns8/svc8:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::48 --dport 80 -j KUBE-SVC-C2DO364MY4EZZI3V
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -m comment --comment ns8/svc8:p80 -m tcp -p tcp --dport 3008 -j KUBE-SVC-C2DO364MY4EZZI3V
-A KUBE-SVC-C2DO364MY4EZZI3V -m comment --comment "ns8/svc8:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::48 --dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ
-A KUBE-SVC-C2DO364MY4EZZI3V -m comment --comment "ns8/svc8:p80 -> [fd00:10:180::1]:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-ENEX4BI6XWD55KUY
-A KUBE-SVC-C2DO364MY4EZZI3V -m comment --comment "ns8/svc8:p80 -> [fd00:10:180::2]:80" -j KUBE-SEP-4WJRTQKXTYOZCJM5
-A KUBE-SEP-ENEX4BI6XWD55KUY -m comment --comment ns8/svc8:p80 -s fd00:10:180::1 -j KUBE-MARK-MASQ
-A KUBE-SEP-ENEX4BI6XWD55KUY -m comment --comment ns8/svc8:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::1]:80
-A KUBE-SEP-4WJRTQKXTYOZCJM5 -m comment --comment ns8/svc8:p80 -s fd00:10:180::2 -j KUBE-MARK-MASQ
-A KUBE-SEP-4WJRTQKXTYOZCJM5 -m comment --comment ns8/svc8:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::2]:80
COMMIT
"""


def test_ipv6() -> None:
    rs = parse_ruleset(IPV6)
    assert check_jumps(rs) == []
    node = ("2001:db8::1",)
    t = trace_packet(rs, src="fd00:10::2", dst="fd00:172:30::48", dport=80, local_ips=node)
    assert t.endpoints == ("[fd00:10:180::1]:80", "[fd00:10:180::2]:80")
    assert t.output == "[fd00:10:180::1]:80, [fd00:10:180::2]:80"
    assert not t.masquerade
    t = trace_packet(rs, src="2001:db8::99", dst="2001:db8::1", dport=3008, local_ips=node)
    assert t.output == "[fd00:10:180::1]:80, [fd00:10:180::2]:80"
    # ::1 is LOCAL but excluded from NodePorts by the rule itself.
    t = trace_packet(rs, src="::1", dst="::1", dport=3008, local_ips=node)
    assert t.output == ""
    with pytest.raises(ValueError, match="mixed IP families"):
        trace_packet(rs, src="10.0.0.1", dst="fd00:172:30::48", dport=80, local_ips=node)


# --- parser -----------------------------------------------------------------------------------


def test_parse_kube_proxy_and_iptables_save_orders_agree() -> None:
    written = parse_rule(
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
        "-d 10.96.0.10 --dport 53 -j KUBE-SVC-XPGD46QRK7WJZT7O"
    )
    saved = parse_rule(
        "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment "
        '--comment "ns1/svc1:p80 cluster IP" -m tcp --dport 53 -j KUBE-SVC-XPGD46QRK7WJZT7O'
    )
    for r in (written, saved):
        assert r.chain == "KUBE-SERVICES"
        assert r.comment == "ns1/svc1:p80 cluster IP"
        assert r.protocol == Match("tcp")
        assert r.dport == PortMatch("53", ((53, 53),))
        assert r.jump == "KUBE-SVC-XPGD46QRK7WJZT7O"
        assert r.target == "KUBE-SVC-XPGD46QRK7WJZT7O"
        assert r.unknown == ()
        assert r.destination is not None
        assert r.destination.networks is not None
        assert str(r.destination.networks[0]) == "10.96.0.10/32"
    assert written.destination == AddressMatch("10.96.0.10")
    assert saved.destination == AddressMatch("10.96.0.10/32")


def test_parse_every_kube_proxy_field() -> None:
    r = parse_rule(
        '-A KUBE-SVC-X -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent '
        "--name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77"
    )
    assert r.recent == RecentMatch("KUBE-SEP-I77PXRDZVX7PMWMN", "rcheck", 10800, True)
    r = parse_rule(
        "-A KUBE-SVC-X -m comment --comment x -m statistic --mode random "
        "--probability 0.3333333333 -j KUBE-SEP-A"
    )
    assert r.statistic == Statistic("random", "0.3333333333")
    assert r.probability == pytest.approx(1 / 3)
    r = parse_rule("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN")
    assert r.mark == MarkMatch(0x4000, 0x4000, negated=True)
    r = parse_rule(
        "-A KUBE-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack "
        "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    )
    assert r.ctstate == ConntrackMatch(frozenset({"RELATED", "ESTABLISHED", "DNAT"}), True)
    assert r.source == AddressMatch("127.0.0.0/8", negated=True)
    assert r.destination == AddressMatch("127.0.0.0/8")
    r = parse_rule("-A KUBE-EXT-X -m addrtype ! --src-type LOCAL -j KUBE-MARK-MASQ")
    assert r.src_type == Match("LOCAL", negated=True)
    r = parse_rule("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000")
    assert r.set_mark == MarkTarget("or", 0x4000)
    assert r.set_mark.apply(0x1) == 0x4001
    r = parse_rule("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")
    assert r.set_mark is not None
    assert r.set_mark.apply(0x1) == 0x4001
    r = parse_rule("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0")  # --xor-mark
    assert r.set_mark is not None
    assert r.set_mark.apply(0x4001) == 0x1
    r = parse_rule(
        "-A KUBE-SEP-X -m comment --comment ns1/svc1:p80 -m tcp -p tcp "
        "-j DNAT --to-destination [fd00::1]:80"
    )
    assert r.to_destination == "[fd00::1]:80"
    r = parse_rule("-A KUBE-POSTROUTING -j MASQUERADE --random-fully")
    assert (r.jump, r.random_fully) == ("MASQUERADE", True)
    r = parse_rule(
        "-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 "
        "--dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X"
    )
    assert r.nfacct == "localhost_nps_accepted_pkts"
    r = parse_rule("-A X -m multiport -p udp --dports 53,1000:1002 -g KUBE-Y")
    assert r.dport == PortMatch("53,1000:1002", ((53, 53), (1000, 1002)))
    assert (r.jump, r.goto, r.target) == (None, "KUBE-Y", "KUBE-Y")
    r = parse_rule(
        "-A X -m physdev ! --physdev-is-in -m set --match-set KUBE-IPS dst,dst -j ACCEPT"
    )
    assert r.physdev == (Match("physdev-is-in", negated=True),)
    assert r.match_set is not None
    assert (r.match_set.name, r.match_set.flags) == ("KUBE-IPS", "dst,dst")
    r = parse_rule("-A X -p tcp ! --dport 80 -i veth+ ! -o eth0 -j REJECT --reject-with tcp-reset")
    assert r.dport == PortMatch("80", ((80, 80),), negated=True)
    assert (r.in_interface, r.out_interface) == (Match("veth+"), Match("eth0", negated=True))
    assert r.reject_with == "tcp-reset"


def test_unknown_options_are_kept_not_fatal() -> None:
    r = parse_rule(
        "-A X -p tcp -m tcp --tcp-flags SYN,ACK SYN -m pkttype --pkt-type unicast -j LOG "
        '--log-prefix "kube drop: " --log-level 4'
    )
    assert r.unknown == ("--tcp-flags SYN,ACK SYN", "-m pkttype", "--pkt-type unicast")
    assert r.unknown_target == ("--log-prefix kube drop: ", "--log-level 4")
    assert r.jump == "LOG"
    # Old-style negation after the option.
    assert parse_rule("-A X -s ! 10.0.0.0/8 -j Y").source == AddressMatch("10.0.0.0/8", True)


def test_tokeniser() -> None:
    assert split_words('-A X -m comment --comment "a b" -j Y') == [
        "-A", "X", "-m", "comment", "--comment", "a b", "-j", "Y",
    ]  # fmt: skip
    # iptables-save escapes quotes inside comments; shell-style single quotes work too.
    assert split_words(r'--comment "say \"hi\" it\'s"') == ["--comment", 'say "hi" it\'s']
    assert split_words("--comment 'x y'z") == ["--comment", "x yz"]
    assert split_words("--comment can't") == ["--comment", "can't"]  # lone quote is literal


def test_parse_ruleset_structure() -> None:
    rs = parse_ruleset(
        "# comment\n*nat\n:PREROUTING ACCEPT [5:300]\n:KUBE-SERVICES - [0:0]\n"
        ":KUBE-SVC-OLD - [0:0]\n-X KUBE-SVC-OLD\n"
        "[3:180] -A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n"
        "*filter\nCOMMIT\n*nat\n-I KUBE-SERVICES -j ACCEPT\nCOMMIT\n"
    )
    assert [t.name for t in rs.tables] == ["nat", "filter"]
    pre = rs.chain("nat", "PREROUTING")
    assert pre is not None
    assert (pre.policy, pre.packets, pre.bytes) == ("ACCEPT", 5, 300)
    assert pre.rules[0].raw == "-A PREROUTING -j KUBE-SERVICES"
    old = rs.chain("nat", "KUBE-SVC-OLD")
    assert old is not None
    assert old.deleted
    assert [r.jump for r in rs.rules("nat", "KUBE-SERVICES")] == ["ACCEPT", "RETURN"]
    assert rs.rules("nat", "NOPE") == ()
    assert rs.chain("mangle", "X") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-A X -j Y\n", r"outside a \*table"),
        ("*nat\n-A X -j Y\n", "no COMMIT"),
        ("*nat\n:X - [0:0]\n-X X\n-A X -j Y\nCOMMIT\n", "deleted chain"),
        ("*nat\n:X - [0:0]\n-A X -j Y\n-X X\nCOMMIT\n", "chain with rules"),
        ("*nat\n-Z X\nCOMMIT\n", "unknown command"),
        ("*nat\n:X\nCOMMIT\n", "bad chain declaration"),
        ("*nat\n*filter\nCOMMIT\n", "before COMMIT"),
    ],
)
def test_parse_errors(text: str, reason: str) -> None:
    with pytest.raises(RulesetParseError, match=reason):
        parse_ruleset(text)


def test_trace_edge_semantics() -> None:
    rs = parse_ruleset(
        "*nat\n:KUBE-SERVICES - [0:0]\n:A - [0:0]\n:B - [0:0]\n:L - [0:0]\n"
        "-A KUBE-SERVICES -g A\n"
        "-A KUBE-SERVICES -j DNAT --to-destination 1.1.1.1:1\n"
        "-A A -j RETURN\n"
        "COMMIT\n"
    )
    t = trace_packet(rs, src="10.0.0.1", dst="10.0.0.2", dport=1, local_ips=())
    # -g: when A returns, KUBE-SERVICES is done too (the DNAT after it is not reached).
    assert t.verdict == Verdict.NONE
    rs = parse_ruleset(
        "*nat\n:KUBE-SERVICES - [0:0]\n:L - [0:0]\n"
        "-A KUBE-SERVICES -j L\n-A L -j KUBE-SERVICES\n-A KUBE-SERVICES -j NOWHERE\nCOMMIT\n"
    )
    t = trace_packet(rs, src="10.0.0.1", dst="10.0.0.2", dport=1, local_ips=())
    assert t.warnings == (
        "nat: chain loop through KUBE-SERVICES",
        "nat: jump to missing chain NOWHERE",
    )


# --- golden-test helpers ------------------------------------------------------------------


def test_check_jumps() -> None:
    assert check_jumps(parse_ruleset(RESTORE)) == []
    assert check_jumps(parse_ruleset(SAVE)) == []
    head = "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n"
    jump = "-A KUBE-SERVICES -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O\n"
    assert check_jumps(parse_ruleset(head + jump + "COMMIT\n")) == [
        "some chains in nat are used but were not created: ['KUBE-SVC-XPGD46QRK7WJZT7O']",
        "some chains in nat are jumped to but have no rules: ['KUBE-SVC-XPGD46QRK7WJZT7O']",
    ]
    decl = ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n"
    assert check_jumps(parse_ruleset(head + decl + jump + "COMMIT\n")) == [
        "some chains in nat are jumped to but have no rules: ['KUBE-SVC-XPGD46QRK7WJZT7O']"
    ]
    assert check_jumps(parse_ruleset(head + decl + "COMMIT\n")) == [
        "some chains in nat are created but not used: ['KUBE-SVC-XPGD46QRK7WJZT7O']"
    ]
    # A chain declared then deleted in the same restore is neither created nor unused.
    assert check_jumps(parse_ruleset(head + decl + "-X KUBE-SVC-XPGD46QRK7WJZT7O\nCOMMIT\n")) == []
    # KUBE-SERVICES always jumps to KUBE-NODEPORTS, even if empty.
    nodeports = (
        ":KUBE-NODEPORTS - [0:0]\n-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"
    )
    assert check_jumps(parse_ruleset(head + nodeports + "COMMIT\n")) == []


def test_sort_ruleset_text() -> None:
    text = (
        "*nat\n:KUBE-SVC-B - [0:0]\n:KUBE-SERVICES - [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n:KUBE-A - [0:0]\n:KUBE-OLD - [0:0]\n"
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j KUBE-NODEPORTS\n'
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -j KUBE-SVC-B\n'
        "-A KUBE-SERVICES -m comment --comment ns1/svc1 line1\n"
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" line2\n'
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" line3\n'
        "-A KUBE-SVC-B -j KUBE-A\n-A KUBE-A -j RETURN\n"
        "-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -j KUBE-SVC-B\n"
        "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -j KUBE-SVC-B\n"
        "-X KUBE-OLD\nCOMMIT\n*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"
    )
    assert sort_ruleset_text(text) == (
        "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"
        "*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-A - [0:0]\n"
        ":KUBE-OLD - [0:0]\n:KUBE-SVC-B - [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
        "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -j KUBE-SVC-B\n"
        "-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -j KUBE-SVC-B\n"
        "-A KUBE-SERVICES -m comment --comment ns1/svc1 line1\n"
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" line3\n'
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -j KUBE-SVC-B\n'
        '-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" line2\n'
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j KUBE-NODEPORTS\n'
        "-A KUBE-A -j RETURN\n-A KUBE-SVC-B -j KUBE-A\n"
        "-X KUBE-OLD\nCOMMIT\n"
    )
    # Sorting is idempotent and order-insensitive with respect to service processing order.
    assert sort_ruleset_text(sort_ruleset_text(text)) == sort_ruleset_text(text)
    assert sort_ruleset_text(RESTORE) == sort_ruleset_text(sort_ruleset_text(RESTORE))


def test_parse_is_lazy() -> None:
    # ~2k lines; rule options are only parsed when a chain's rules are read. How long parsing
    # takes is measured by hack/bench_tracer.py, not asserted here (a loaded runner is slow).
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    for i in range(500):
        svc = f"KUBE-SVC-{i:016d}"
        lines.append(f":{svc} - [0:0]")
        lines.append(
            f'-A KUBE-SERVICES -m comment --comment "ns/svc{i}:p80 cluster IP" -m tcp -p tcp '
            f"-d 172.30.{i // 250}.{i % 250} --dport 80 -j {svc}"
        )
        lines.append(
            f'-A {svc} -m comment --comment "ns/svc{i}:p80 -> 10.1.0.1:80" -m statistic '
            f"--mode random --probability 0.5000000000 -j KUBE-SEP-A"
        )
        lines.append(f"-A {svc} -j KUBE-SEP-B")
    lines += ["COMMIT", ""]
    rs = parse_ruleset("\n".join(lines))
    services = rs.chain("nat", "KUBE-SERVICES")
    assert services is not None
    assert len(services.lines) == 500
    assert services.targets()[0] == "KUBE-SVC-0000000000000000"
    assert services._rules is None  # the laziness itself is under test
    assert isinstance(services.rules[0], Rule)
    assert services.rules is services.rules  # parsed once


def test_state_parameters() -> None:
    rs = parse_ruleset(
        "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-X - [0:0]\n-A INPUT -j KUBE-X\n"
        "-A KUBE-X -i veth+ -p tcp --sport 1000:2000 -j ACCEPT\n"
        "-A KUBE-X -m mark --mark 0x1/0x1 -j DROP\nCOMMIT\n"
    )
    # Interface and source port not given: can't tell, reported, assumed no match; the
    # mark is unknown: skipped.
    t = trace(rs, EXTERNAL, NODE_IP, 80)
    assert [(s.index, s.action) for s in t.steps if s.chain == "KUBE-X"] == [
        (1, StepAction.UNKNOWN),
        (2, StepAction.SKIPPED),
        (0, StepAction.RETURNED),
    ]
    assert t.steps[2].note == (
        "can't evaluate: source port not given; input interface not given; assumed no match"
    )
    assert t.verdict == Verdict.NONE
    t = trace(rs, EXTERNAL, NODE_IP, 80, in_interface="veth1234", sport=1500)
    assert t.verdict == Verdict.ACCEPT
    assert trace(rs, EXTERNAL, NODE_IP, 80, in_interface="eth0", sport=1500, mark=0).output == ""
    assert trace(rs, EXTERNAL, NODE_IP, 80, in_interface="eth0", sport=1500, mark=3).output == (
        "DROP"
    )


def test_describe_is_readable(restore: Ruleset) -> None:
    text = trace(restore, NODE_IP, "172.30.0.41", 80).describe()
    assert text.splitlines()[:4] == [
        "verdict: DNAT -> 10.180.0.1:80 (50%), 10.180.0.2:80 (50%); masquerade: yes",
        "nat/KUBE-SERVICES: enter",
        "nat/KUBE-SERVICES #1: jumped KUBE-SVC-XPGD46QRK7WJZT7O",
        '    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
        "-d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
    ]
    assert "    nat/KUBE-MARK-MASQ #1: matched MARK (mark 0x0 -> 0x4000 (masquerade))" in text


def _save_quote(value: str) -> str:
    # How iptables-save writes a comment: double quotes, backslash before " and \.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize(
    "comment",
    ["", "a", "ns1/svc1:p80 cluster IP", 'say "hi"', "back\\slash", "it's", "x -j KUBE-Y", '"',
     "\\", '\\"', "  padded  ", "tab\there", "'quoted'", "a\"b'c\\d"],
)  # fmt: skip
def test_tokeniser_reads_back_quoted_comments(comment: str) -> None:
    line = f"-A X -m comment --comment {_save_quote(comment)} -j Y"
    assert split_words(line) == ["-A", "X", "-m", "comment", "--comment", comment, "-j", "Y"]
    assert parse_rule(line).comment == comment
