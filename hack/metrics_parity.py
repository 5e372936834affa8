"""Compare the /metrics name sets of upstream kube-proxy and pyproxy on the same node.

Usage (root; needs the control plane from hack/build-control-plane.sh):

    .venv/bin/python hack/metrics_parity.py [--mode iptables --mode nftables]

For each mode, one after the other in a fresh node namespace (bench/node.py's NodeNetns: the
node IPs on lo, the real kube-apiserver through a loopback bridge), kube-proxy v1.34.4 and then
pyproxy run against the same objects: a few Services of bench/model.py's mix (ClusterIP,
NodePort, LoadBalancer, some with externalTrafficPolicy Local and no local endpoints), then, once
the first sync is in, an EndpointSlice change with a trigger-time annotation (a partial sync and
network programming latency) and a GET of /healthz and /livez. Then /metrics is scraped.

A metric family counts as exported when it has at least one sample: Go's client shows nothing
for a labelled family that was never used, prometheus_client shows its HELP and TYPE lines, so
HELP lines alone would compare the libraries rather than the proxies.

Writes docs/metrics-parity.md (the table) and tests/integration/kube_proxy_metric_names.json
(kube-proxy's kubeproxy_* names per mode, which tests/integration/test_metrics_parity.py holds
pyproxy's agent to).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.model import NAMESPACES, node_body, service_spec, slice_body  # noqa: E402 - path above
from bench.node import (  # noqa: E402 - path above
    HEALTHZ_ADDR,
    Api,
    BenchError,
    NodeNetns,
    ProxyProcess,
    iptables_shim,
    nsenter,
    proxy_argv,
    run,
)
from bench.run import create_services  # noqa: E402 - path above

SERVICES = 12
#: Generous: in the VM (ipvs mode) everything runs under emulation.
FIRST_SYNC_TIMEOUT = 600
#: Seconds given to the endpoint change to be synced (minimum sync period 1 s; slow VM).
SETTLE = 15
OUT_MD = REPO / "docs" / "metrics-parity.md"
OUT_JSON = REPO / "tests" / "integration" / "kube_proxy_metric_names.json"
PROXIES = ("kube-proxy", "pyproxy")
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
YES, NO = "yes", "no"

_CONNTRACK_NOTE = (
    "labelled, so shown once observed, i.e. after a conntrack cleanup ran: kube-proxy runs one"
    " when its endpoint update says ConntrackCleanupRequired (not in this run), pyproxy when"
    " conntrack_plan.cleanup_needed (every frontend is new on its first sync)"
)
#: Why a name of one proxy is missing from the other; the table prints these.
EXPLAINED = {
    "kubeproxy_conntrack_reconciler_deleted_entries_total": _CONNTRACK_NOTE,
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": _CONNTRACK_NOTE,
    "kubeproxy_network_programming_duration_seconds": (
        "not observed by kube-proxy in this run (ipvs: in the VM, under emulation; whether its"
        " sync of the annotated change fell outside the 15 s settle was not checked)"
    ),
    "pyproxy_sync_restore_bytes": "pyproxy's own: restore input size per sync kind",
}


def families(text: str) -> set[str]:
    """Metric family names with at least one sample (suffixes folded into the family)."""
    typed: dict[str, str] = {}
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            typed[name] = kind
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample = line.split("{", 1)[0].split(" ", 1)[0]
        family = sample
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample.removesuffix(suffix)
            if base != sample and typed.get(base) in ("histogram", "summary"):
                family = base
        names.add(family)
    return names


def curl(netns: str, url: str) -> str:
    return run([*nsenter(netns), "curl", "-s", "--max-time", "10", url], check=False, timeout=20)


def one(proxy: str, mode: str, *, api: Api, server: str, kubeconfig: Path, workdir: Path) -> str:
    shim = iptables_shim(workdir, "nft", ("ipv4",))
    for tool in ("nft", "ipset"):  # nftables mode; ipvs mode (kube-proxy calls ipset)
        found = shutil.which(tool)
        if found and not (shim / tool).exists():
            (shim / tool).symlink_to(found)
    env = {"PATH": str(shim), "LANG": "C.UTF-8"}
    bin_dir = Path(run([str(REPO / "hack" / "build-control-plane.sh"), "--print-bin-dir"]).strip())
    argv = proxy_argv(
        proxy,
        bin_dir=bin_dir,
        kubeconfig=kubeconfig,
        min_sync=1.0,
        backend="nft",
    )
    argv[argv.index("--proxy-mode") + 1] = mode
    log = workdir / f"{proxy}-{mode}.log"
    with NodeNetns(server, workdir) as netns:
        p = ProxyProcess(netns.name, argv, log, env)
        p.start()
        try:
            deadline = time.monotonic() + FIRST_SYNC_TIMEOUT
            while "kubeproxy_sync_proxy_rules_last_timestamp_seconds{" not in p.metrics():
                p.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"{proxy} {mode}: no sync in {FIRST_SYNC_TIMEOUT} s; {log}")
                time.sleep(1)
            spec = service_spec(0)
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            api.merge_patch(
                api.slices(spec.namespace, slice_body(spec)["metadata"]["name"]),
                {
                    "metadata": {"annotations": {TRIGGER_TIME: now}},
                    "endpoints": slice_body(spec, extra=4000)["endpoints"],
                },
            )
            time.sleep(SETTLE)
            for path in ("/healthz", "/livez"):
                curl(netns.name, f"http://{HEALTHZ_ADDR}{path}")
            text = p.metrics()
            # Undo the change for the next proxy.
            api.merge_patch(
                api.slices(spec.namespace, slice_body(spec)["metadata"]["name"]),
                {"endpoints": slice_body(spec)["endpoints"]},
            )
            return text
        finally:
            p.stop()


def headers(text: str) -> dict[str, tuple[str, str]]:
    """{family: (TYPE, HELP without component-base's "[STABILITY] " prefix)}."""
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            kinds[name] = kind
        elif line.startswith("# HELP "):
            _, _, name, *rest = line.split(" ", 3)
            doc = rest[0] if rest else ""
            for level in ("[ALPHA] ", "[BETA] ", "[STABLE] "):
                doc = doc.removeprefix(level)
            helps[name] = doc
    return {n: (kinds.get(n, ""), helps.get(n, "")) for n in kinds}


def table(results: dict[str, dict[str, str]], failures: dict[str, dict[str, str]]) -> str:
    lines = [
        "# /metrics: kube-proxy v1.34.4 and pyproxy on the same node",
        "",
        "Generated by `hack/metrics_parity.py` (run it as root to reproduce); see its docstring",
        "for the node, the objects and what counts as exported (a family with at least one",
        "sample). For the families both export, TYPE and HELP are compared too (HELP without",
        "component-base's `[ALPHA] ` prefix, which pyproxy does not write). Go runtime, process",
        "and component-base families (`go_*`, `process_*`, `rest_client_*`, `kubernetes_*`,",
        "...) are counted at the end of each mode, not listed.",
        "",
    ]
    for mode in sorted(set(results) | set(failures)):
        texts = results.get(mode, {})
        lines += [f"## {mode} mode", ""]
        for proxy, reason in failures.get(mode, {}).items():
            lines += [f"{proxy} did not run in this mode: {reason}", ""]
        sets = {proxy: families(text) for proxy, text in texts.items()}
        meta = {proxy: headers(text) for proxy, text in texts.items()}
        kp, py = sets.get("kube-proxy", set()), sets.get("pyproxy", set())
        ours = sorted(n for n in kp | py if n.startswith(("kubeproxy_", "pyproxy_")))
        lines += ["| metric | kube-proxy | pyproxy | note |", "| --- | --- | --- | --- |"]
        for name in ours:
            note = ""
            if (name in kp) != (name in py):
                note = EXPLAINED.get(name, "")
            elif name in kp and meta["kube-proxy"].get(name) != meta["pyproxy"].get(name):
                theirs, ours_ = meta["kube-proxy"].get(name), meta["pyproxy"].get(name)
                note = f"TYPE/HELP differ: {theirs} vs {ours_}"
            lines.append(
                f"| `{name}` | {YES if name in kp else NO} | {YES if name in py else NO} | {note} |"
            )
        other_kp = sorted(n for n in kp if not n.startswith("kubeproxy_"))
        other_py = sorted(n for n in py if not n.startswith(("kubeproxy_", "pyproxy_")))
        prefixes = sorted({n.split("_", 1)[0] + "_*" for n in other_kp})
        lines += [
            "",
            f"Other families: kube-proxy {len(other_kp)} ({', '.join(prefixes)}); "
            f"pyproxy {len(other_py)}" + (f" ({', '.join(other_py)})" if other_py else "") + ".",
            "",
        ]
    return "\n".join(lines)


def merged(old: str, new: str) -> str:
    """`new`'s header and mode sections, plus the sections of `old` for modes not run now."""

    def split(text: str) -> tuple[str, dict[str, str]]:
        head, *parts = text.split("\n## ")
        return head, {p.split("\n", 1)[0]: "## " + p for p in parts}

    _, old_sections = split(old)
    head, sections = split(new)
    everything = old_sections | sections
    return "\n".join([head, *(everything[k].rstrip("\n") + "\n" for k in sorted(everything))])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", action="append", choices=("iptables", "nftables", "ipvs"))
    args = parser.parse_args(argv)
    modes = args.mode or ["iptables", "nftables"]
    if os.geteuid() != 0:
        print("metrics_parity needs root (network namespaces)", file=sys.stderr)
        return 2
    from tests.netlab import controlplane
    from tests.netlab.controlplane import ControlPlane, find_bin_dir

    if "ipvs" in modes:
        # ipvs runs in the VM, under emulation when there is no KVM: the apiserver needs longer.
        controlplane.READY_TIMEOUT = 600.0

    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-metrics-parity-"))
    cp = ControlPlane(workdir / "control-plane", find_bin_dir())
    cp.start()
    results: dict[str, dict[str, str]] = {}
    failures: dict[str, dict[str, str]] = {}
    try:
        api = Api(cp.kubeconfig_admin, cp.workdir / "ca.crt")
        for ns in NAMESPACES:
            api.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        api.create("/api/v1/nodes", node_body())
        create_services(api, 0, SERVICES, 4)
        for mode in modes:
            for proxy in PROXIES:
                try:
                    text = one(
                        proxy,
                        mode,
                        api=api,
                        server=cp.server,
                        kubeconfig=cp.kubeconfig_proxy,
                        workdir=workdir,
                    )
                except BenchError as err:
                    reason = str(err).splitlines()[-1]
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        reason = json.loads(reason)["error"]  # pyproxy's JSON log line
                    failures.setdefault(mode, {})[proxy] = f"`{reason}`"
                    print(f"{mode} {proxy}: failed: {reason}", file=sys.stderr)
                    continue
                (workdir / f"{proxy}-{mode}.metrics").write_text(text)
                results.setdefault(mode, {})[proxy] = text
                print(f"{mode} {proxy}: {len(families(text))} families", file=sys.stderr)
    finally:
        cp.stop()
    OUT_MD.write_text(
        merged(OUT_MD.read_text() if OUT_MD.exists() else "", table(results, failures))
    )
    previous = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    for mode, texts in results.items():
        if "kube-proxy" in texts:
            names = families(texts["kube-proxy"])
            previous[mode] = sorted(n for n in names if n.startswith("kubeproxy_"))
    OUT_JSON.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT_MD.relative_to(REPO)} and {OUT_JSON.relative_to(REPO)}; raw in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
