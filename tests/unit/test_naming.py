"""Chain names and probabilities, exactly as kube-proxy computes them.

Spec: reference/kube-proxy.md §b "Chain-name suffix algorithm (exact)" and "Probability string";
the hash values below are the ones the reference lists as verified, plus chain names that appear
verbatim in upstream's proxier_test.go expected outputs (TestOverallIPTablesRules,
TestSyncProxyRulesRepeated, TestSyncProxyRulesLargeClusterMode).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyproxy.iptables.render import probability
from pyproxy.iptables.vocabulary import (
    endpoint_chain,
    external_chain,
    firewall_chain,
    is_service_chain,
    local_chain,
    port_proto_hash,
    service_chain,
)
from pyproxy.model import Protocol, format_endpoint
from pyproxy.serviceport import EndpointInfo, ServicePortName

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def spn(namespace: str, name: str, port: str = "", protocol: Protocol = TCP) -> ServicePortName:
    return ServicePortName(namespace, name, port, protocol)


# --- the values the reference lists as verified ----------------------------------------------


def test_port_proto_hash_verified_values() -> None:
    assert port_proto_hash("ns1/svc1:p80", "tcp") == "XPGD46QRK7WJZT7O"
    assert port_proto_hash("ns1/svc1", "tcp") == "AQI2S6QIMU7PVVRP"


def test_service_chain_names_verified_values() -> None:
    named = spn("ns1", "svc1", "p80")
    assert service_chain(named) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    # An unnamed port: servicePortName is "ns/name", without ":".
    assert str(spn("ns1", "svc1")) == "ns1/svc1"
    assert service_chain(spn("ns1", "svc1")) == "KUBE-SVC-AQI2S6QIMU7PVVRP"


def test_endpoint_chain_names_verified_values() -> None:
    named = spn("ns1", "svc1", "p80")
    assert endpoint_chain(named, "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert endpoint_chain(named, "[ff06::c1]:80") == "KUBE-SEP-LIGRYQQLSZN4UWQ5"
    # TestSyncProxyRulesLargeClusterMode
    assert endpoint_chain(named, "10.0.0.0:80") == "KUBE-SEP-DKGQUZGBKLTPAR56"


def test_ipv6_endpoint_is_hashed_in_join_host_port_form() -> None:
    """The endpoint string is Go's net.JoinHostPort: `[ip]:port` for IPv6, IP normalised."""
    ip = ipaddress.ip_address("ff06:0:0:0:0:0:0:c1")
    ep = EndpointInfo.make(ip, 80, is_local=False)
    assert ep.endpoint == "[ff06::c1]:80"
    assert format_endpoint(ipaddress.ip_address("10.180.0.1"), 80) == "10.180.0.1:80"
    assert endpoint_chain(spn("ns1", "svc1", "p80"), ep.endpoint) == "KUBE-SEP-LIGRYQQLSZN4UWQ5"


# --- more names, as they appear in upstream's expected rule dumps ----------------------------

UPSTREAM_SERVICE_CHAINS = [
    # (namespace, name, port name, protocol, hash) — TestOverallIPTablesRules et al.
    ("ns2", "svc2", "p80", TCP, "GNZBNJ2PO5MGZ6GT"),
    ("ns3", "svc3", "p80", TCP, "X27LE4BHSL4DOUIK"),
    ("ns4", "svc4", "p80", TCP, "4SW47YFZTEDKD3PK"),
    ("ns5", "svc5", "p80", TCP, "NUKIZ6OKUXPJNT4C"),
    ("ns2", "svc2", "p8080", TCP, "2VJB64SDSIJUP5T6"),
    ("ns4", "svc4", "p8082", TCP, "EBDQOQU5SJFXRIL3"),
]

UPSTREAM_ENDPOINT_CHAINS = [
    # (namespace, name, port name, endpoint, hash)
    ("ns2", "svc2", "p80", "10.180.0.2:80", "RS4RBKLTHTF2IUXJ"),
    ("ns3", "svc3", "p80", "10.180.0.3:80", "OYPFS5VJICHGATKP"),
    ("ns4", "svc4", "p80", "10.180.0.4:80", "UKSFD7AGPMPPLUHC"),
    ("ns4", "svc4", "p80", "10.180.0.5:80", "C6EBXVWJJZMIWKLZ"),
    ("ns5", "svc5", "p80", "10.180.0.3:80", "I77PXRDZVX7PMWMN"),
    ("ns1", "svc1", "p80", "10.0.1.1:80", "SNQ3ZNILQDEJNDQO"),
    ("ns2", "svc2", "p8080", "10.0.2.1:8080", "UHEGFW77JX3KXTOV"),
    ("ns3", "svc3", "p80", "10.0.3.1:80", "BSWRHOQ77KEXZLNL"),
    ("ns3", "svc3", "p8081", "203.0.113.4:8081", "RUVVH7YV3PHQBDOS"),
    ("ns4", "svc4", "p8082", "10.4.0.1:8082", "SU5STNODRYEWJAUF"),
]


@pytest.mark.parametrize(("ns", "name", "port_name", "proto", "suffix"), UPSTREAM_SERVICE_CHAINS)
def test_service_chain_names_from_upstream_dumps(
    ns: str, name: str, port_name: str, proto: Protocol, suffix: str
) -> None:
    assert service_chain(spn(ns, name, port_name, proto)) == f"KUBE-SVC-{suffix}"


@pytest.mark.parametrize(
    ("ns", "name", "port_name", "endpoint", "suffix"), UPSTREAM_ENDPOINT_CHAINS
)
def test_endpoint_chain_names_from_upstream_dumps(
    ns: str, name: str, port_name: str, endpoint: str, suffix: str
) -> None:
    assert endpoint_chain(spn(ns, name, port_name), endpoint) == f"KUBE-SEP-{suffix}"


def test_svc_svl_ext_fw_share_one_suffix() -> None:
    name = spn("ns5", "svc5", "p80")
    assert service_chain(name) == "KUBE-SVC-NUKIZ6OKUXPJNT4C"
    assert local_chain(name) == "KUBE-SVL-NUKIZ6OKUXPJNT4C"
    assert external_chain(name) == "KUBE-EXT-NUKIZ6OKUXPJNT4C"
    assert firewall_chain(name) == "KUBE-FW-NUKIZ6OKUXPJNT4C"


def test_protocol_is_lowercase_and_part_of_the_hash() -> None:
    """Same port name and number on TCP/UDP/SCTP are three service ports, three chains."""
    names = {service_chain(spn("ns2", "svc2", "dns", p)) for p in (TCP, UDP, SCTP)}
    assert len(names) == 3
    assert service_chain(spn("ns2", "svc2", "dns", UDP)) == "KUBE-SVC-" + reference_hash(
        "ns2/svc2:dnsudp"
    )
    assert endpoint_chain(spn("ns2", "svc2", "dns", SCTP), "10.180.0.1:53") == (
        "KUBE-SEP-" + reference_hash("ns2/svc2:dnssctp10.180.0.1:53")
    )


def reference_hash(text: str) -> str:
    """The reference's Python spelling of the algorithm."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


_name = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@given(
    ns=_name,
    name=_name,
    port_name=st.one_of(st.just(""), _name),
    proto=st.sampled_from(list(Protocol)),
    ip=st.ip_addresses(),
    number=st.integers(1, 65535),
)
def test_names_follow_the_reference_formula(
    *,
    ns: str,
    name: str,
    port_name: str,
    proto: Protocol,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    number: int,
) -> None:
    port_name_str = f"{ns}/{name}:{port_name}" if port_name else f"{ns}/{name}"
    key = spn(ns, name, port_name, proto)
    suffix = reference_hash(port_name_str + proto.value.lower())
    assert service_chain(key) == f"KUBE-SVC-{suffix}"
    assert local_chain(key) == f"KUBE-SVL-{suffix}"
    assert external_chain(key) == f"KUBE-EXT-{suffix}"
    assert firewall_chain(key) == f"KUBE-FW-{suffix}"
    joined = f"[{ip}]:{number}" if ip.version == 6 else f"{ip}:{number}"
    ep = EndpointInfo.make(ip, number, is_local=False)
    assert ep.endpoint == joined
    sep = endpoint_chain(key, ep.endpoint)
    assert sep == "KUBE-SEP-" + reference_hash(port_name_str + proto.value.lower() + joined)
    # iptables chain names are at most 28 characters.
    assert max(len(c) for c in (sep, service_chain(key), firewall_chain(key))) <= 28
    for chain in (sep, service_chain(key), local_chain(key), external_chain(key)):
        assert is_service_chain(chain)


def test_is_service_chain_only_for_the_five_prefixes() -> None:
    for fixed in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"):
        assert not is_service_chain(fixed)
    for chain in ("KUBE-SVC-X", "KUBE-SVL-X", "KUBE-EXT-X", "KUBE-FW-X", "KUBE-SEP-X"):
        assert is_service_chain(chain)
    assert not is_service_chain("KUBE-XLB-ABC")  # pre-1.24 name, not ours


# --- probabilities ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, "1.0000000000"),
        (2, "0.5000000000"),
        (3, "0.3333333333"),
        (10, "0.1000000000"),
        (100, "0.0100000000"),
        (1000, "0.0010000000"),
        (10000, "0.0001000000"),
        (100000, "0.0000100000"),
        (100001, "0.0000099999"),
    ],
)
def test_probability_strings(n: int, expected: str) -> None:
    """Go's fmt.Sprintf("%0.10f", 1.0/float64(n)) (upstream TestComputeProbability)."""
    assert probability(n) == expected


def test_probability_strictly_increases_as_n_decreases() -> None:
    previous = 0.0
    for n in range(100000, 1, -1):
        current = float(probability(n))
        assert current > previous, (n, probability(n))
        previous = current
