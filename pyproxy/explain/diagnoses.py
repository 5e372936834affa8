"""The usual misconfigurations, named in plain words (`Diagnosis`, one `Code` each).

Kept apart from the endpoint and connection code: a diagnosis reads their results and the
Service spec, and never changes them. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pyproxy.errors import InvalidObject
from pyproxy.explain.endpoints import ServiceContext
from pyproxy.explain.report import (
    Code,
    Diagnosis,
    EndpointView,
    Severity,
    describe_port,
    join,
    plural,
    port_label,
)
from pyproxy.model import IPFamily, LoadBalancerIPMode, NamespacedName, ServicePort
from pyproxy.policy import TopologyMode, available_for_topology


def port_diagnoses(
    ctx: ServiceContext, ports: Sequence[ServicePort], views: Sequence[EndpointView]
) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    total = sum(len(s.endpoints) for s in ctx.slices)
    if not ctx.slices or total == 0:
        what = "no EndpointSlices" if not ctx.slices else "EndpointSlices with no endpoints"
        if ctx.extras.selector is not None and not ctx.extras.selector:
            out.append(
                Diagnosis(
                    Code.NO_SELECTOR_NO_ENDPOINTS,
                    Severity.ERROR,
                    f"the Service has no selector and {what}: someone must create its"
                    " EndpointSlices (labelled kubernetes.io/service-name); until then every"
                    " connection is rejected",
                )
            )
        else:
            selector = (
                ""
                if not ctx.extras.selector
                else " ("
                + ",".join(f"{k}={v}" for k, v in sorted(ctx.extras.selector.items()))
                + ")"
            )
            out.append(
                Diagnosis(
                    Code.SELECTOR_MATCHES_NO_PODS,
                    Severity.ERROR,
                    f"the Service has {what}: its selector{selector} matches no pods (check"
                    " the pods' labels and namespace); every connection is rejected",
                )
            )
        return out

    served = [f for f in ctx.families if f in ctx.configs]
    for sp in ports:
        label = port_label(sp.name, sp.protocol)
        slice_ports = {
            (p.name, p.protocol)
            for s in ctx.slices
            if s.address_type in served and s.endpoints
            for p in s.ports
        }
        listed = any(s.endpoints and s.address_type in served for s in ctx.slices)
        if listed and (sp.name, sp.protocol) not in slice_ports:
            same_name = [p for p in slice_ports if p[0] == sp.name]
            have = join(sorted(port_label(n, p) for n, p in slice_ports), "no ports")
            target = ctx.extras.target_ports.get((sp.name, sp.protocol))
            hint = ""
            if same_name:
                hint = " (same name, other protocol)"
            elif target is not None and not target.isdigit():
                hint = (
                    f"; targetPort {target!r} is a name: the pods must declare a container port"
                    f" named {target!r}, or the EndpointSlice controller leaves this port out"
                )
            elif target is not None:
                hint = f" (targetPort {target})"
            out.append(
                Diagnosis(
                    Code.PORT_NAME_MISMATCH,
                    Severity.ERROR,
                    f"Service port {describe_port(sp, ctx.extras)} has no matching port in the"
                    f" EndpointSlices, which list {have}{hint}; connections to this port are"
                    " rejected",
                )
            )
            continue
        for family in served:
            state = ctx.states.get((family, ctx.spn(sp)))
            if state is None or not state.endpoints:
                continue
            eps = state.endpoints
            cat = state.categorized
            fam = f" ({family.value})" if len(served) > 1 else ""
            if not any(e.ready for e in eps):
                n_terminating = sum(e.serving and e.terminating for e in eps)
                terminating = plural(n_terminating, "serving-terminating endpoint") + (
                    " is" if n_terminating == 1 else " are"
                )
                if cat.has_any:
                    out.append(
                        Diagnosis(
                            Code.ONLY_TERMINATING_ENDPOINTS,
                            Severity.WARNING,
                            f"port {label}{fam}: no endpoint is ready; {terminating} used"
                            " meanwhile (rollout or scale-down in progress?)",
                        )
                    )
                else:
                    out.append(
                        Diagnosis(
                            Code.ENDPOINTS_NOT_READY,
                            Severity.ERROR,
                            f"port {label}{fam}: all {plural(len(eps), 'endpoint')} are not"
                            " ready (readiness probe failing, or pods starting); connections are"
                            " rejected",
                        )
                    )
                continue
            info = state.info
            config = ctx.configs[family]
            remote = join(sorted({e.node_name or "no node" for e in eps if e.ready}))
            if info.external_policy_local and info.externally_accessible and not cat.local:
                out.append(
                    Diagnosis(
                        Code.NO_LOCAL_ENDPOINTS,
                        Severity.WARNING,
                        f"port {label}{fam}: externalTrafficPolicy is Local and this node"
                        f" ({config.node_name}) has no endpoint (they are on {remote}):"
                        " external traffic to node ports, external IPs and load-balancer IPs is"
                        " dropped here; pods and the node itself still reach the Service",
                    )
                )
            if info.internal_policy_local and not cat.local:
                out.append(
                    Diagnosis(
                        Code.NO_LOCAL_ENDPOINTS,
                        Severity.ERROR,
                        f"port {label}{fam}: internalTrafficPolicy is Local and this node"
                        f" ({config.node_name}) has no endpoint (they are on {remote}):"
                        " connections to the cluster IP from here are dropped",
                    )
                )
            if cat.topology is not TopologyMode.NONE:
                skipped = [
                    e.endpoint
                    for e in eps
                    if e.ready
                    and not available_for_topology(
                        e, cat.topology, node_name=config.node_name, zone=config.zone
                    )
                ]
                if skipped:
                    out.append(
                        Diagnosis(
                            Code.TOPOLOGY,
                            Severity.INFO,
                            f"port {label}{fam}: topology ({cat.topology.value}) keeps this"
                            f" node's cluster traffic on {join(e.endpoint for e in cat.cluster)};"
                            f" {join(skipped)} are hinted for other zones or nodes",
                        )
                    )
    return out


def family_diagnoses(ctx: ServiceContext) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    svc = ctx.service
    families = set(ctx.families)
    for family in ctx.families:
        if family not in ctx.configs:
            out.append(
                Diagnosis(
                    Code.FAMILY_NOT_SERVED,
                    Severity.WARNING,
                    f"this node has no {family.value} address (--node-ip or the Node object),"
                    f" so it writes no {family.value} rules: the Service's {family.value}"
                    " addresses do not work from here",
                )
            )
    other = [s for s in ctx.slices if s.address_type not in families and s.endpoints]
    for endpoint_slice in other:
        slice_family = endpoint_slice.address_type.value
        out.append(
            Diagnosis(
                Code.OTHER_IP_FAMILY,
                Severity.WARNING,
                f"EndpointSlice {endpoint_slice.name} holds {slice_family} endpoints but the"
                f" Service has no {slice_family} cluster IP (ipFamilies/ipFamilyPolicy): they"
                " are never used",
            )
        )
    for what, ips in (
        ("externalIP", svc.external_ips),
        ("load-balancer IP", tuple(i.ip for i in svc.load_balancer_ingress)),
    ):
        for ip in ips:
            fam = IPFamily.of(ip)
            if fam not in families:
                out.append(
                    Diagnosis(
                        Code.OTHER_IP_FAMILY,
                        Severity.ERROR,
                        f"{what} {ip} is {fam.value} but the Service has no {fam.value}"
                        " cluster IP: no rules are written for it",
                    )
                )
    for ingress in svc.load_balancer_ingress:
        if ingress.ip_mode is LoadBalancerIPMode.PROXY:
            out.append(
                Diagnosis(
                    Code.PROXY_IP_MODE,
                    Severity.INFO,
                    f"load-balancer IP {ingress.ip} has ipMode Proxy: traffic to it must go"
                    " through the load balancer, which forwards to node ports",
                )
            )
    return out


def problem_diagnoses(problems: Sequence[InvalidObject], name: NamespacedName) -> list[Diagnosis]:
    """Objects the converter skipped that belong to this Service (slices by name prefix: the
    EndpointSlice controller names them `<service>-<suffix>`)."""
    out = []
    for p in problems:
        if p.namespace != name.namespace:
            continue
        if p.kind == "EndpointSlice" and (
            p.name == name.name or p.name.startswith(f"{name.name}-")
        ):
            other_family = p.field.endswith("addresses[0]") and " is not an " in p.reason
            out.append(
                Diagnosis(
                    Code.OTHER_IP_FAMILY if other_family else Code.INVALID_OBJECT,
                    Severity.WARNING,
                    f"EndpointSlice {p.name}: {p.field}: {p.reason}; that endpoint is skipped",
                )
            )
    return out


def dedupe(diagnoses: Iterable[Diagnosis]) -> tuple[Diagnosis, ...]:
    return tuple(dict.fromkeys(diagnoses))
