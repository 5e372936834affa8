"""Hostile input: non-ASCII digits in IPs, hostile Unicode in names, labels and comments, and
very large objects.

Go's parsers (net.ParseIP via netutils.ParseIPSloppy, ParseCIDRSloppy, time.ParseDuration) take
ASCII digits only; Python's `\\d`, str.isdigit and int() also take fullwidth (U+FF11) or
Arabic-Indic (U+0661) digits, so fullwidth "10" then ".0.0.1" would quietly become 10.0.0.1
where kube-proxy rejects the object. Names that are not DNS labels are invalid objects; label
values (zones, hints) are compared, never written into rules; the rules stay ASCII whatever the
input.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import (
    EXTERNAL_CLIENT,
    TEST_NODE,
    endpoint,
    endpoint_slice,
    family_ruleset,
    node,
    port,
    render,
    rules_of,
    sections,
    service,
    slice_port,
    trace,
)

from pyproxy.convert import parse_cidr, parse_ip, service_from_api, state_from_objects
from pyproxy.errors import ConfigError, InvalidObject, StateFileError
from pyproxy.options import parse_duration, parse_options
from pyproxy.proxystate import LARGE_CLUSTER_ENDPOINTS_THRESHOLD
from pyproxy.sources.statefile import read_objects

# --- non-ASCII digits ------------------------------------------------------------------------

NON_ASCII_IPS = [
    pytest.param("\uff11\uff10.0.0.1", id="fullwidth-first-octet"),
    pytest.param("10.0.0.\uff11", id="fullwidth-last-octet"),
    pytest.param("10.0.0.\u0661", id="arabic-indic"),
    pytest.param("10.0.0.0\u0967", id="devanagari-after-leading-zero"),
    pytest.param("10.0.0.\u00b9", id="superscript-one"),
    pytest.param("\U0001d7cf0.0.0.1", id="mathematical-bold-one"),
    pytest.param("fd00::\uff11", id="fullwidth-in-ipv6"),
    pytest.param("10.0.0.1\u00a0", id="no-break-space"),
    pytest.param("\u300010.0.0.1", id="ideographic-space"),
    pytest.param("10.0.0.1\u200b", id="zero-width-space"),
    pytest.param("10\uff0e0.0.1", id="fullwidth-full-stop"),
]


@pytest.mark.parametrize("text", NON_ASCII_IPS)
def test_ip_with_non_ascii_characters_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ip(text)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/\uff11\uff16",
        "10.0.0.0/\u00b2",
        "10.0.0.0/\u0662\u0664",
        "\uff11\uff10.0.0.0/8",
        "10.0.0.0/8\u00a0",
    ],
)
def test_cidr_with_non_ascii_characters_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cidr(text)


def test_ascii_sloppy_forms_are_still_accepted() -> None:
    """Leading zeros are decimal and ASCII blanks around the text are trimmed, as before."""
    assert str(parse_ip("010.000.000.001")) == "10.0.0.1"
    assert str(parse_ip(" 10.0.0.1\t")) == "10.0.0.1"
    assert str(parse_cidr("010.0.0.0/08")) == "10.0.0.0/8"


def test_non_ascii_cluster_ip_makes_the_service_invalid() -> None:
    with pytest.raises(InvalidObject) as info:
        service_from_api(service("ns1", "svc1", "172.30.0.\uff14\uff11"))
    assert info.value.field == "spec.clusterIPs[0]"


def test_non_ascii_endpoint_address_is_dropped_and_reported() -> None:
    objects = [
        service("ns1", "svc1", "172.30.0.41"),
        endpoint_slice("ns1", "svc1", ["10.180.0.\u0661", "10.180.0.2"]),
    ]
    cluster, problems = state_from_objects(objects)
    [es] = cluster.endpoint_slices.values()
    assert [str(e.address) for e in es.endpoints] == ["10.180.0.2"]
    assert [p.field for p in problems] == ["endpoints[0].addresses[0]"]


def test_non_ascii_source_range_is_ignored_and_reported() -> None:
    obj = service(
        "ns1",
        "svc1",
        "172.30.0.41",
        type="LoadBalancer",
        lb_ingress=["1.2.3.4"],
        source_ranges=["203.0.113.0/\uff12\uff14", "198.51.100.0/24"],
    )
    cluster, problems = state_from_objects([obj])
    [svc] = cluster.services.values()
    assert [str(r) for r in svc.load_balancer_source_ranges] == ["198.51.100.0/24"]
    assert [p.field for p in problems] == ["spec.loadBalancerSourceRanges[0]"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--cluster-cidr", "10.0.0.0/\uff18"],
        ["--nodeport-addresses", "192.168.0.0/\uff11\uff16"],
    ],
)
def test_non_ascii_digits_in_cidr_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_options(argv)


def test_non_ascii_digits_in_node_ip_and_durations_are_rejected() -> None:
    with pytest.raises(ValueError):
        parse_duration("\uff13\uff10s")
    with pytest.raises(SystemExit):  # argparse's usage error for a bad flag value
        parse_options(["--node-ip", "192.168.0.\uff12"])


# --- hostile Unicode in names, labels and comments -------------------------------------------

HOSTILE_NAMES = [
    pytest.param("\u0455vc", id="cyrillic-homoglyph"),
    pytest.param("svc\u202eelif", id="right-to-left-override"),
    pytest.param("s\u200dvc", id="zero-width-joiner"),
    pytest.param("svc\u0000", id="nul"),
    pytest.param("svc\n-A KUBE-SERVICES -j ACCEPT", id="newline-rule"),
    pytest.param("\uff53vc", id="fullwidth-letter"),
    pytest.param("svc\u0301", id="combining-accent"),
    pytest.param("\U0001f600", id="emoji"),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_service_name_is_an_invalid_object(name: str) -> None:
    objects = [
        service("ns1", name, "172.30.0.41"),
        service("ns1", "good", "172.30.0.42"),
        endpoint_slice("ns1", "good", ["10.180.0.1"]),
    ]
    cluster, problems = state_from_objects(objects)
    assert [s.name for s in cluster.services.values()] == ["good"]
    assert [(p.kind, p.field) for p in problems] == [("Service", "metadata.name")]
    assert render([o for o in objects if o["metadata"]["name"] == "good"]).isascii()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_namespace_port_name_and_service_label_are_invalid(name: str) -> None:
    in_namespace = service(name, "svc1", "172.30.0.41")
    in_port = service("ns1", "svc2", "172.30.0.42", [port(name, 80)])
    bad_label = endpoint_slice("ns1", "svc3", ["10.180.0.1"], name="svc3-1")
    bad_label["metadata"]["labels"]["kubernetes.io/service-name"] = name
    _, problems = state_from_objects([in_namespace, in_port, bad_label])
    assert [(p.kind, p.field) for p in problems] == [
        ("Service", "metadata.namespace"),
        ("Service", "spec.ports[0].name"),
        ("EndpointSlice", "metadata.labels[kubernetes.io/service-name]"),
    ]


def test_hostile_unicode_in_labels_annotations_and_hints_stays_out_of_the_rules() -> None:
    """Zone labels and hint names are only compared: a zone that differs from the hint by an
    invisible character is another zone (no topology filtering), and the rules stay ASCII."""
    rtl_zone = "zone-a\u202e\u200b"
    hostile = {"app": "x\u202e\u0000\n-A KUBE-SERVICES -j ACCEPT", "tier": "\U0001f600"}
    svc = service("ns1", "svc1", "172.30.0.41", labels=hostile)
    svc["metadata"]["annotations"] = {"note": "\u202e\ufeff\U0001f600 \r\n COMMIT"}
    objects = [
        node(TEST_NODE, ("192.168.0.2",), **{"topology.kubernetes.io/zone": rtl_zone}),
        svc,
        endpoint_slice(
            "ns1",
            "svc1",
            [
                endpoint("10.180.0.1", TEST_NODE, zones=["zone-a"]),
                endpoint("10.180.0.2", "other", zones=["zone-b"]),
            ],
            labels=hostile,
        ),
    ]
    cluster, problems = state_from_objects(objects)
    assert problems == []
    assert cluster.nodes[TEST_NODE].zone == rtl_zone
    out = render(objects)
    assert out.isascii()
    rs = family_ruleset(out)
    assert trace(rs, EXTERNAL_CLIENT, "172.30.0.41", 80).output == "10.180.0.1:80, 10.180.0.2:80"


def test_hostile_unicode_in_state_file_comments(tmp_path: Path) -> None:
    state = tmp_path / "state.yaml"
    state.write_text(
        textwrap.dedent(
            """\
            # \u202e\u200d\U0001f600 right-to-left override, zero-width joiner, emoji
            # -A KUBE-SERVICES -j ACCEPT \ufffd\U000e0001\u0301 replacement, tag, combining
            apiVersion: v1
            kind: List
            items:
            - apiVersion: v1  # \uff11\uff10.0.0.1 \ufeff
              kind: Service
              metadata: {name: svc1, namespace: ns1}  # \u0455vc
              spec:
                clusterIP: 172.30.0.41
                ports: [{name: p80, port: 80, protocol: TCP}]
            """
        ),
        encoding="utf-8",
    )
    objects = read_objects(state)
    cluster, problems = state_from_objects(objects)
    assert problems == []
    assert [s.name for s in cluster.services.values()] == ["svc1"]
    out = render(objects)
    assert out.isascii()
    # A control character YAML forbids is a clear error naming the file, not a crash.
    state.write_text("# \u0000\n" + state.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(StateFileError, match=r"state\.yaml"):
        read_objects(state)
    assert rules_of(sections(out)["IPv4"], "filter", "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp -p tcp'
        " -d 172.30.0.41 --dport 80 -j REJECT"
    ]


# --- very large objects --------------------------------------------------------------------


def test_service_with_thousands_of_ports() -> None:
    """2,500 ports on one Service and its slice: every port gets its chain, in one render."""
    count = 2500
    ports = [port(f"p{i}", 1000 + i) for i in range(count)]
    objects: list[dict[str, Any]] = [
        service("ns1", "wide", "172.30.0.41", ports),
        endpoint_slice(
            "ns1", "wide", ["10.180.0.1"], [slice_port(f"p{i}", 20000 + i) for i in range(count)]
        ),
    ]
    cluster, problems = state_from_objects(objects)
    assert problems == []
    assert len(cluster.services[next(iter(cluster.services))].ports) == count
    out = render(objects)
    restore = sections(out)["IPv4"]
    assert len(rules_of(restore, "nat", "KUBE-SERVICES")) == count + 1  # + KUBE-NODEPORTS jump
    rs = family_ruleset(out)
    for i in (0, count // 2, count - 1):
        got = trace(rs, EXTERNAL_CLIENT, "172.30.0.41", 1000 + i).output
        assert got == f"10.180.0.1:{20000 + i}"


def test_slice_with_a_thousand_endpoints() -> None:
    """1,000 endpoints in one slice (the API's maximum per slice): all used, with comments
    (upstream's large-cluster mode starts above 1,000 endpoints)."""
    count = 1000
    eps = [f"10.180.{i // 250}.{i % 250 + 1}" for i in range(count)]
    objects: list[dict[str, Any]] = [
        service("ns1", "big", "172.30.0.41"),
        endpoint_slice("ns1", "big", eps),
    ]
    assert count == LARGE_CLUSTER_ENDPOINTS_THRESHOLD
    cluster, problems = state_from_objects(objects)
    assert problems == []
    [es] = cluster.endpoint_slices.values()
    assert len(es.endpoints) == count
    out = render(objects)
    rs = family_ruleset(out)
    used = trace(rs, EXTERNAL_CLIENT, "172.30.0.41", 80).output.split(", ")
    assert sorted(used) == sorted(f"{ip}:80" for ip in eps)
