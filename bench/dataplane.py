"""What a packet costs: first-packet (new TCP connection) latency through a ClusterIP, pyproxy
against kube-proxy, in the same node namespaces, with the floor beside it.

    sudo .venv/bin/python -m bench.dataplane [--sizes 1000,10000,30000] [--backends legacy,nft]
        [--proxies kube-proxy,pyproxy] [--runs 3] [--connections 3000] [--nft-max 5000]
        [--out bench/results]

Why: the rules decide what every new connection pays (iptables walks nat KUBE-SERVICES rule by
rule for the first packet of each connection), which is what users feel, not how fast the rules
were written.

What it does:

1. starts the test control plane (tests/netlab/controlplane.py) and, as bench.run does, creates
   N Services x 5 endpoints (the same objects), plus one measured Service `dp-target`
   (ClusterIP, port 80 → 8080) whose three endpoints are real pods;
2. builds a netlab cluster (tests/netlab: namespaces and veths only, nothing leaves them):
   node-a (172.30.0.2, the benchmark's Node `node-bench`) with pods `c1` (the client) and `a1`,
   node-b with `b1` and `b2`; a1, b1, b2 run `connlat serve 8080` (accept, close);
3. per iptables variant and N: the floor with no rules at all (`bare_floor`), then `--runs`
   times both proxies in turn (order alternating), each in node-a with the same flags, PATH and
   families as in bench.run (IPv4): start, wait for its whole ruleset (as bench.run's (a)),
   then `connlat` in c1 connects `--connections` times, alternating the ClusterIP and the
   endpoints' own addresses (the floor: the same connection with no Service, through the same
   node and the same rules), and the proxy is stopped and node-a's tables flushed;
4. writes the `dataplane` section of <out>/latest.json (keeping its `runs`), a
   <stamp>-dataplane.json with every run, and latest.md.

The load generator is bench/connlat.c, built here with the system's cc: C, because a connect
takes tens of microseconds and the clock must be read right around the system call only (see
its header). Connections are made one at a time, so the client is never the bottleneck and
the proxy is idle while they run.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.model import (
    FAMILIES,
    NAMESPACES,
    NEW_SERVICE_BASE,
    NODE_NAME,
    PORT,
    TARGET_PORT,
    TOP_KEYS,
    dataplane_cells,
    dataplane_record,
    node_body,
    percentile,
    report,
    validate,
)
from bench.node import (
    Api,
    ApiBridge,
    BenchError,
    ProxyProcess,
    Rules,
    iptables_shim,
    proxy_argv,
    run,
)
from bench.run import create_services, interleaved, machine_meta, progress, wait_complete

REPO = Path(__file__).resolve().parents[1]
#: The measured Service and where it lives.
TARGET_NAMESPACE = NAMESPACES[0]
TARGET_NAME = "dp-target"
#: The pods of the netlab cluster: c1 connects; a1 (same node), b1, b2 (other node) serve.
LAYOUT = {"a": ("c1", "a1"), "b": ("b1", "b2")}
SERVERS = ("a1", "b1", "b2")
#: connects discarded at the start of each measurement (neighbour resolution, cold caches).
WARMUP = 60
#: connlat's limit for one connect (SO_SNDTIMEO in connlat.c).
CONNECT_LIMIT_S = 2.0


def build_connlat(workdir: Path) -> Path:
    binary = workdir / "connlat"
    source = Path(__file__).with_name("connlat.c")
    run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)])
    return binary


def target_objects(pods: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The measured Service and its EndpointSlice (a1 on this node, b1 and b2 on node-b)."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": TARGET_NAME, "namespace": TARGET_NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}],
        },
    }
    endpoints = [
        {
            "addresses": [pods[name]],
            "nodeName": NODE_NAME if name.startswith("a") else "node-b",
            "conditions": {"ready": True},
        }
        for name in SERVERS
    ]
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{TARGET_NAME}-abcde",
            "namespace": TARGET_NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": TARGET_NAME,
                "endpointslice.kubernetes.io/managed-by": "bench.pyproxy.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    }
    return service, endpoint_slice


def flush_rules(netns: str) -> None:
    """Empty every table of node-a in both variants, so each proxy starts from nothing."""
    empty = "".join(f"*{t}\nCOMMIT\n" for t in ("raw", "mangle", "nat", "filter"))
    for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore"):
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, tool],
            input=empty,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"{tool} in {netns}: {proc.stderr.strip()}")
    run(["ip", "netns", "exec", netns, "nft", "flush", "ruleset"])


def measure(
    connlat: Path, client_ns: str, cluster_ip: str | None, servers: list[str], connections: int
) -> dict[str, Any]:
    """`connections` connects from the client, alternating the ClusterIP and each server's own
    address (only the latter without a ClusterIP); microseconds for both, failures counted
    (a connect that timed out also counts as CONNECT_LIMIT_S in the percentiles)."""
    targets: list[str] = []
    for ip in servers:
        if cluster_ip is not None:
            targets += [cluster_ip, str(PORT)]
        targets += [ip, str(TARGET_PORT)]
    per_target = 2 if cluster_ip is not None else 1
    total = WARMUP + connections
    proc = subprocess.run(
        ["ip", "netns", "exec", client_ns, str(connlat), str(total), *targets],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise BenchError(f"connlat: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    service: list[float] = []
    floor: list[float] = []
    failures = 0
    for line in proc.stdout.splitlines()[WARMUP:]:
        index, value = (int(x) for x in line.split())
        if value < 0:
            failures += 1
            if -value not in (errno.EINPROGRESS, errno.ETIMEDOUT):
                continue  # refused or unreachable: no latency to speak of, counted only
            # connlat gave up after CONNECT_LIMIT_S: that (a lower bound) enters the percentiles.
            value = int(CONNECT_LIMIT_S * 1e9)
        (service if per_target == 2 and index % 2 == 0 else floor).append(value / 1000)
    return {"service_us": service, "floor_us": floor, "failures": failures}


def us(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def one_proxy(
    *,
    proxy: str,
    backend: str,
    n: int,
    args: argparse.Namespace,
    node_ns: str,
    client_ns: str,
    cluster_ip: str,
    servers: list[str],
    connlat: Path,
    bin_dir: Path,
    kubeconfig: Path,
    workdir: Path,
    repeat: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    fams = FAMILIES["ipv4"]
    env = {"PATH": str(iptables_shim(workdir, backend, fams)), "LANG": "C.UTF-8"}
    argv = proxy_argv(
        proxy,
        bin_dir=bin_dir,
        kubeconfig=kubeconfig,
        min_sync=1.0,
        backend=backend,
        families=fams,
        verbosity=args.v,
    )
    log = workdir / f"dp-{proxy}-{backend}-n{n}-r{repeat}.log"
    flush_rules(node_ns)
    rules = Rules(node_ns, backend, fams)
    p = ProxyProcess(node_ns, argv, log, env)
    progress(f"{proxy} {backend} N={n} run {repeat + 1}: starting")
    try:
        started = p.start()
        seen = wait_complete(
            rules,
            lambda: rules.svc_jumps() >= n + 1,
            timeout=args.cold_timeout,
            interval=0.01,
            settle=args.settle,
            proxy=p,
        )
        if seen is None:
            raise BenchError(f"{proxy}: ruleset not complete after {args.cold_timeout} s")
        progress(f"  ruleset in {seen - started:.2f} s; {args.connections} connections")
        m = measure(connlat, client_ns, cluster_ip, servers, args.connections)
        p.check_alive()
    finally:
        p.stop()
        rules.close()
        flush_rules(node_ns)
    record = dataplane_record(
        mode="iptables",
        backend=backend,
        n_services=n,
        proxy=proxy,
        connect_p50_us=us(percentile(m["service_us"], 50)),
        connect_p99_us=us(percentile(m["service_us"], 99)),
        floor_p50_us=us(percentile(m["floor_us"], 50)),
        floor_p99_us=us(percentile(m["floor_us"], 99)),
        samples=len(m["service_us"]) + len(m["floor_us"]),
        failures=m["failures"],
    )
    progress(
        f"  connect p50/p99 {record['connect_p50_us']}/{record['connect_p99_us']} µs, "
        f"floor p50 {record['floor_p50_us']} µs, failures {m['failures']}"
    )
    return record, {"log": str(log), "cold_start_s": round(seen - started, 3), **m}


def write(out: Path, entries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Replace the dataplane section of latest.json (creating it if needed); its `runs` stay
    only if they were taken from the same pyproxy commit with the same label."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads((out / "latest.json").read_text())
    except (OSError, ValueError):
        doc = {}
    same = all(doc.get(k) == meta[k] for k in ("label", "pyproxy_commit"))
    merged = {key: meta.get(key) for key in TOP_KEYS} | {
        "runs": doc.get("runs", []) if same else [],
        "dataplane": entries,
    }
    problems = validate(merged)
    if problems:
        raise BenchError(f"results do not follow the schema: {problems}")
    (out / "latest.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "latest.md").write_text(report(merged))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,30000")
    parser.add_argument("--backends", default="legacy,nft")
    parser.add_argument(
        "--nft-max",
        type=int,
        default=5000,
        help="largest N for nft: iptables-nft-restore 1.8.9 needs minutes per full sync beyond",
    )
    parser.add_argument("--proxies", default="kube-proxy,pyproxy")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=3000, help="per run, both targets")
    parser.add_argument("--v", type=int, default=0, help="--v of both proxies")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--cold-timeout", type=float, default=3600)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--label", default="smoke run: not figures of record")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if sizes[-1] > NEW_SERVICE_BASE:
        parser.error(f"at most {NEW_SERVICE_BASE} Services")
    backends = [b.strip() for b in args.backends.split(",")]
    proxies = [p.strip() for p in args.proxies.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("bench.dataplane needs root (network namespaces)", file=sys.stderr)
        return 2
    from tests.netlab import Cluster
    from tests.netlab.controlplane import ControlPlane, find_bin_dir

    bin_dir = find_bin_dir()
    version = run([str(bin_dir / "kube-proxy"), "--version"]).strip().replace("Kubernetes ", "")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-dataplane-"))
    meta = {
        "label": args.label,
        "kubernetes_version": version,
        **machine_meta(),
        "runs_per_cell": args.runs,
    }
    meta = {
        k: meta[k]
        for k in (
            "label",
            "kubernetes_version",
            "pyproxy_commit",
            "machine",
            "kernel",
            "iptables_version",
            "nft_version",
            "runs_per_cell",
        )
    }
    connlat = build_connlat(workdir)
    records: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    cp = ControlPlane(workdir / "control-plane", bin_dir)
    cp.start()
    try:
        with Cluster(LAYOUT, serve=None) as cluster:
            node = cluster.node("a")
            client = cluster.pod("c1")
            servers = [cluster.pod(name).ip for name in SERVERS]
            for name in SERVERS:
                cluster.pod(name).popen([str(connlat), "serve", str(TARGET_PORT)])
            api = Api(cp.kubeconfig_admin, cp.workdir / "ca.crt")
            for ns in NAMESPACES:
                api.create(
                    "/api/v1/namespaces",
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                )
            api.create("/api/v1/nodes", node_body())
            service, endpoint_slice = target_objects(
                {name: cluster.pod(name).ip for name in SERVERS}
            )
            _, created = api.request("POST", api.services(TARGET_NAMESPACE), service)
            cluster_ip = created["spec"]["clusterIP"]
            api.create(api.slices(TARGET_NAMESPACE), endpoint_slice)
            progress(f"dp-target {cluster_ip} → {servers}; client {client.ip} on {node.name}")
            with ApiBridge(cp.server, node.name, workdir):
                have = 0
                for n in sizes:
                    svc_s, slice_s = create_services(api, have, n, args.workers)
                    progress(
                        f"N={n}: created {n - have} Services ({svc_s:.1f} s + {slice_s:.1f} s)"
                    )
                    have = n
                    for backend in backends:
                        if backend == "nft" and n > args.nft_max:
                            progress(f"nft N={n}: skipped (above --nft-max {args.nft_max})")
                            continue
                        flush_rules(node.name)
                        bare = measure(connlat, client.name, None, servers, args.connections)
                        bare_p50 = us(percentile(bare["floor_us"], 50))
                        progress(f"{backend} N={n}: floor with no rules p50 {bare_p50} µs")
                        for repeat in range(args.runs):
                            for proxy in interleaved(proxies, repeat):
                                try:
                                    record, d = one_proxy(
                                        proxy=proxy,
                                        backend=backend,
                                        n=n,
                                        args=args,
                                        node_ns=node.name,
                                        client_ns=client.name,
                                        cluster_ip=cluster_ip,
                                        servers=servers,
                                        connlat=connlat,
                                        bin_dir=bin_dir,
                                        kubeconfig=cp.kubeconfig_proxy,
                                        workdir=workdir,
                                        repeat=repeat,
                                    )
                                except (BenchError, OSError, subprocess.SubprocessError) as err:
                                    progress(f"  {proxy} {backend} N={n} FAILED: {err}")
                                    continue
                                record["bare_floor_p50_us"] = bare_p50
                                records.append(record)
                                details.append(
                                    {
                                        "record": record,
                                        "log": d["log"],
                                        "cold_start_s": d["cold_start_s"],
                                        "service_us": [round(x, 1) for x in d["service_us"]],
                                        "floor_us": [round(x, 1) for x in d["floor_us"]],
                                    }
                                )
                                entries = dataplane_cells(records)
                                write(args.out, entries, meta)
                                (args.out / f"{stamp}-dataplane.json").write_text(
                                    json.dumps({"meta": meta, "runs": details}) + "\n"
                                )
        sys.stdout.write(report(json.loads((args.out / "latest.json").read_text())))
    finally:
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
