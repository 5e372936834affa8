#!/usr/bin/env python3
"""pyproxy against upstream kube-proxy, iptables mode, on a real control plane (not a test).

    sudo .venv/bin/python hack/bench.py [--sizes 1000,5000,10000] [--min-sync 1,0]
        [--proxies kube-proxy,pyproxy] [--changes 30] [--new-services 10] [--out bench/results]
        [--backend legacy|nft] [--gap 1.5]

What it does (see bench/README.md for the figures and how to read them):

1. starts etcd + kube-apiserver (tests/integration/controlplane.py, binaries from
   hack/build-control-plane.sh) and creates the Node "node-bench";
2. for each N (ascending; the objects of a smaller N are reused): creates Services 0..N-1 and one
   EndpointSlice of 5 endpoints each, directly, in parallel over raw HTTPS (timed separately);
3. for each min sync period, for each proxy, in a fresh node network namespace:
   (a) cold start: process start → nat KUBE-SERVICES holds a KUBE-SVC- jump per Service (the
       ruleset is written in one iptables-restore, so that is the complete ruleset; a full
       iptables-save afterwards cross-checks the chain counts);
   (b) --changes endpoint changes (add, then remove, one extra endpoint of one Service) → time
       until that Service's KUBE-SVC- chain has the new number of KUBE-SEP- jumps; p50, p99;
   (c) --new-services new Services (Service + EndpointSlice) → time until their KUBE-SVC- chain
       has its 5 endpoints; p50;
   (d) CPU seconds (self + waited-for children, i.e. the iptables-restore runs) and peak RSS
       (VmHWM) of the proxy process over the whole run, from /proc just before SIGTERM;
   (e) bytes of iptables-restore input per full and per partial sync (pyproxy's log: medians;
       kube-proxy does not expose it: null);
   then the extra objects of (b)/(c) are put back as they were;
4. writes bench/results/<stamp>.json and latest.json (the issue's schema), <stamp>-details.json
   (creation times, wall time of each run, chain counts, every latency sample), <stamp>.md, and a
   PNG plot (latest.png) of (a), (b) p50 and (c) against N.

Runs as root (network namespaces). Progress lines go to stderr; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(HACK))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from bench_model import (  # noqa: E402
    ENDPOINTS_PER_SERVICE,
    EXTRA_POD_BASE,
    NAMESPACES,
    NEW_SERVICE_BASE,
    change_plan,
    document,
    lb_status,
    markdown_table,
    median_int,
    mix,
    node_body,
    percentile,
    rounded,
    run_record,
    service_body,
    service_chain,
    service_spec,
    slice_body,
    validate,
)
from bench_node import (  # noqa: E402
    Api,
    BenchError,
    NodeNetns,
    ProxyProcess,
    Rules,
    iptables_shim,
    metric_value,
    proxy_argv,
    pyproxy_restore_bytes,
    run,
)

T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def wait_rules(
    rules: Rules,
    check: Any,
    *,
    timeout: float,
    interval: float,
    proxy: ProxyProcess,
    since: object = None,
) -> float | None:
    """Like wait_until, but only runs the (possibly costly) `check()` when the nat table has
    changed (rules.token()) since `since` (a token taken before the change was made; None:
    check at once); the time returned is when the change was first seen.

    With the legacy variant, reading a chain copies the whole table out of the kernel under the
    xtables lock (0.3 s at N = 10,000): a read right after the change would hold up the proxy's
    iptables-restore, so after a change nothing is read until the table has changed."""
    deadline = time.monotonic() + timeout
    last: object = object() if since is None else since
    while True:
        seen = time.monotonic()
        token = rules.token()
        if rules.info is None or token != last:
            last = token
            if check():
                # If the table changed again while check() ran, the state it saw may be newer
                # than `token`: count from after the check (an upper bound).
                return seen if rules.token() == token else time.monotonic()
        proxy.check_alive()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


# --- objects ------------------------------------------------------------------------------------


def create_services(api: Api, start: int, stop: int, workers: int) -> tuple[float, float]:
    """Services start..stop-1 (LoadBalancer ones with their status), then their EndpointSlices;
    returns the seconds each half took."""

    def service_job(i: int) -> Any:
        spec = service_spec(i)

        def job() -> None:
            api.create(api.services(spec.namespace), service_body(spec))
            if spec.type == "LoadBalancer":
                api.merge_patch(
                    api.services(spec.namespace, spec.name) + "/status", {"status": lb_status(spec)}
                )

        return job

    def slice_job(i: int) -> Any:
        spec = service_spec(i)
        return lambda: api.create(api.slices(spec.namespace), slice_body(spec))

    t = time.monotonic()
    api.parallel([service_job(i) for i in range(start, stop)], workers)
    services_s = time.monotonic() - t
    t = time.monotonic()
    api.parallel([slice_job(i) for i in range(start, stop)], workers)
    return services_s, time.monotonic() - t


def restore_objects(api: Api, n: int, changes: int, new_services: int) -> None:
    """Put back what (b) and (c) changed: original slices, no new Services."""
    for index in {i for i, _ in change_plan(n, changes)}:
        spec = service_spec(index)
        api.merge_patch(
            api.slices(spec.namespace, f"{spec.name}-abcde"),
            {"endpoints": slice_body(spec)["endpoints"]},
        )
    for k in range(new_services):
        spec = service_spec(NEW_SERVICE_BASE + k, prefix="new")
        api.delete(api.slices(spec.namespace, f"{spec.name}-abcde"))
        api.delete(api.services(spec.namespace, spec.name))


# --- one proxy run ------------------------------------------------------------------------------


def one_run(
    *,
    proxy: str,
    n: int,
    min_sync: float,
    args: argparse.Namespace,
    api: Api,
    api_server: str,
    bin_dir: Path,
    kubeconfig: Path,
    workdir: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    started_wall = time.monotonic()
    details: dict[str, Any] = {"proxy": proxy, "n_services": n, "min_sync_period_s": min_sync}
    env = dict(os.environ)
    env["PATH"] = f"{iptables_shim(workdir, args.backend)}:{env.get('PATH', '/usr/sbin:/usr/bin')}"
    log = workdir / f"{proxy}-n{n}-min{min_sync:g}.log"
    log.unlink(missing_ok=True)
    details["log"] = str(log)
    with NodeNetns(api_server, workdir) as netns:
        rules = Rules(netns, args.backend)
        argv = proxy_argv(
            proxy, bin_dir=bin_dir, kubeconfig=kubeconfig, min_sync=min_sync, backend=args.backend
        )
        details["command"] = " ".join([*netns.exec_prefix()[:3], "NODE", *argv])
        p = ProxyProcess(netns, argv, log, env)
        progress(f"{proxy} N={n} min-sync={min_sync:g}s: starting in {netns.name}")
        try:
            t_start = p.start()
            # (a) cold start
            last_report = [time.monotonic()]

            def complete() -> bool:
                count = rules.svc_jumps()
                if time.monotonic() - last_report[0] > 30:
                    last_report[0] = time.monotonic()
                    progress(f"  cold start: {count}/{n} Services in KUBE-SERVICES so far")
                return count >= n

            seen = wait_rules(
                rules,
                complete,
                timeout=args.cold_timeout,
                interval=args.poll if rules.info is not None else args.cold_poll,
                proxy=p,
            )
            cold = None if seen is None else seen - t_start
            progress(f"  (a) cold start {'TIMEOUT' if cold is None else f'{cold:.2f} s'}")
            details["cold_start_s"] = cold
            t = time.monotonic()
            details["nat_counts"] = rules.save_counts(log.with_suffix(".nat"))
            details["iptables_save_s"] = round(time.monotonic() - t, 3)
            progress(
                f"  nat table: {details['nat_counts']} (save took {details['iptables_save_s']} s)"
            )

            # (b) endpoint changes
            latencies: list[float] = []
            timeouts = 0
            for k, (index, add) in enumerate(change_plan(n, args.changes)):
                time.sleep(args.gap)
                spec = service_spec(index)
                chain = service_chain(spec.port_name)
                expected = ENDPOINTS_PER_SERVICE + (1 if add else 0)
                body = slice_body(spec, extra=EXTRA_POD_BASE + k // 2 if add else None)
                before = rules.token()
                t0 = time.monotonic()
                api.merge_patch(
                    api.slices(spec.namespace, f"{spec.name}-abcde"),
                    {"endpoints": body["endpoints"]},
                )
                seen = wait_rules(
                    rules,
                    lambda chain=chain, expected=expected: rules.sep_jumps(chain) == expected,
                    timeout=args.change_timeout,
                    interval=args.poll,
                    proxy=p,
                    since=before,
                )
                if seen is None:
                    timeouts += 1
                    progress(f"  (b) change {k + 1}: TIMEOUT ({spec.name})")
                else:
                    latencies.append(seen - t0)
                if (k + 1) % 10 == 0 or k + 1 == args.changes:
                    progress(
                        f"  (b) {k + 1}/{args.changes} changes, p50 so far "
                        f"{percentile(latencies, 50) or float('nan'):.3f} s"
                    )
            details["endpoint_change_samples_s"] = [round(x, 4) for x in latencies]
            details["endpoint_change_timeouts"] = timeouts

            # (c) new Services
            new_lat: list[float] = []
            new_timeouts = 0
            for k in range(args.new_services):
                time.sleep(args.gap)
                spec = service_spec(NEW_SERVICE_BASE + k, prefix="new")
                chain = service_chain(spec.port_name)
                before = rules.token()
                t0 = time.monotonic()
                api.create(api.services(spec.namespace), service_body(spec))
                api.create(api.slices(spec.namespace), slice_body(spec))
                seen = wait_rules(
                    rules,
                    lambda chain=chain: rules.sep_jumps(chain) == ENDPOINTS_PER_SERVICE,
                    timeout=args.change_timeout,
                    interval=args.poll,
                    proxy=p,
                    since=before,
                )
                if seen is None:
                    new_timeouts += 1
                    progress(f"  (c) new Service {k + 1}: TIMEOUT")
                else:
                    new_lat.append(seen - t0)
            progress(
                f"  (c) {len(new_lat)}/{args.new_services} new Services, p50 "
                f"{percentile(new_lat, 50) or float('nan'):.3f} s"
            )
            details["new_service_samples_s"] = [round(x, 4) for x in new_lat]
            details["new_service_timeouts"] = new_timeouts

            # (d), (e)
            p.check_alive()
            metrics = p.metrics()
            cpu, rss = p.usage()
        finally:
            code = p.stop()
            rules.close()
            details["exit_code"] = code
        log_text = log.read_text(errors="replace")
        if proxy == "pyproxy":
            full, partial = pyproxy_restore_bytes(log_text)
            details["restore_bytes_full_samples"] = full
            details["restore_bytes_partial_samples_count"] = len(partial)
            details["syncs_full"], details["syncs_partial"] = len(full), len(partial)
            bytes_full, bytes_partial = median_int(full), median_int(partial)
            if bytes_full is None:
                value = metric_value(metrics, "pyproxy_sync_restore_bytes", kind="full")
                bytes_full = None if value is None else int(value)
            if bytes_partial is None:
                value = metric_value(metrics, "pyproxy_sync_restore_bytes", kind="partial")
                bytes_partial = None if value is None else int(value)
        else:
            bytes_full = bytes_partial = None
            details["syncs_full"] = log_text.count(
                '"Syncing iptables rules" ipFamily="IPv4" fullSync=true'
            )
            details["syncs_partial"] = log_text.count(
                '"Syncing iptables rules" ipFamily="IPv4" fullSync=false'
            )
        for name in ("kubeproxy_sync_proxy_rules_iptables_total",):
            details[name] = metric_value(metrics, name, table="nat")
    details["wall_s"] = round(time.monotonic() - started_wall, 1)
    record = run_record(
        proxy=proxy,
        mode="iptables",
        n_services=n,
        endpoints_per_service=ENDPOINTS_PER_SERVICE,
        min_sync_period_s=min_sync,
        cold_start_s=rounded(cold, 3),
        endpoint_change_p50_s=rounded(percentile(latencies, 50)),
        endpoint_change_p99_s=rounded(percentile(latencies, 99)),
        new_service_p50_s=rounded(percentile(new_lat, 50)),
        cpu_s=round(cpu, 2),
        peak_rss_mib=round(rss, 1),
        restore_bytes_full=bytes_full,
        restore_bytes_partial=bytes_partial,
    )
    progress(
        f"  done in {details['wall_s']} s: cpu {cpu:.1f} s, peak RSS {rss:.0f} MiB, "
        f"restore bytes full/partial {bytes_full}/{bytes_partial}"
    )
    return record, details


# --- output -------------------------------------------------------------------------------------


def machine(backend: str) -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ipt = run([f"iptables-{backend}", "--version"], check=False).strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB, Linux {platform.release()}, "
        f"{ipt}, Python {platform.python_version()}"
    )


def plot(runs: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        progress("matplotlib missing: no plot (pip install matplotlib)")
        return False
    figures = [
        ("cold_start_s", "(a) cold start"),
        ("endpoint_change_p50_s", "(b) endpoint change p50"),
        ("new_service_p50_s", "(c) new Service p50"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        series.setdefault((r["proxy"], r["min_sync_period_s"]), []).append(r)
    for ax, (key, heading) in zip(axes, figures, strict=True):
        for (proxy, min_sync), rs in sorted(series.items()):
            points = sorted((r["n_services"], r[key]) for r in rs if r[key] is not None)
            if not points:
                continue
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker="o",
                linestyle="-" if proxy == "pyproxy" else "--",
                label=f"{proxy}, min sync {min_sync:g} s",
            )
        ax.set_title(heading)
        ax.set_xlabel("Services (5 endpoints each)")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(
    out: Path, stamp: str, doc: dict[str, Any], details: dict[str, Any], table: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    problems = validate(doc)
    if problems:
        raise BenchError(f"results do not follow the schema: {problems}")
    text = json.dumps(doc, indent=2) + "\n"
    (out / f"{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    detail_text = json.dumps(details, indent=2) + "\n"
    (out / f"{stamp}-details.json").write_text(detail_text)
    (out / "latest-details.json").write_text(detail_text)
    (out / f"{stamp}.md").write_text(table)
    (out / "latest.md").write_text(table)
    title = f"kube-proxy {doc['kubernetes_version']} vs pyproxy, iptables mode; {doc['machine']}"
    if plot(doc["runs"], out / f"{stamp}.png", title):
        shutil.copyfile(out / f"{stamp}.png", out / "latest.png")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000,10000", help="N values (Services)")
    p.add_argument("--min-sync", default="1,0", help="--iptables-min-sync-period values (s)")
    p.add_argument("--proxies", default="kube-proxy,pyproxy")
    p.add_argument("--changes", type=int, default=30, help="endpoint changes for (b)")
    p.add_argument("--new-services", type=int, default=10, help="new Services for (c)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--backend",
        choices=("nft", "legacy"),
        default="legacy",
        help="iptables variant both proxies write (and the benchmark reads); iptables-nft-restore"
        " 1.8.9 needs minutes per full sync from about 5,000 Services (default legacy)",
    )
    p.add_argument("--gap", type=float, default=1.5, help="pause before each change (s)")
    p.add_argument("--poll", type=float, default=0.01, help="pause between chain reads (s)")
    p.add_argument("--cold-poll", type=float, default=0.2, help="pause between KUBE-SERVICES reads")
    p.add_argument("--cold-timeout", type=float, default=3600)
    p.add_argument("--change-timeout", type=float, default=600)
    p.add_argument("--workers", type=int, default=16, help="parallel API requests for creation")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.min_sync = [float(s) for s in args.min_sync.split(",")]
    args.proxies = [s.strip() for s in args.proxies.split(",")]
    for proxy in args.proxies:
        if proxy not in ("kube-proxy", "pyproxy"):
            p.error(f"unknown proxy {proxy}")
    if args.sizes[-1] > NEW_SERVICE_BASE:
        p.error(f"at most {NEW_SERVICE_BASE} Services")
    if args.changes % 2:
        p.error("--changes must be even (each add is followed by its remove)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Clean up (proxy, namespace, control plane) on SIGTERM and on SIGINT even when started in
    # the background, where the shell ignores SIGINT.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.geteuid() != 0:
        print("hack/bench.py needs root (network namespaces)", file=sys.stderr)
        return 2
    from controlplane import ControlPlane, find_bin_dir  # tests/integration

    bin_dir = find_bin_dir()
    version = run([str(bin_dir / "kube-proxy"), "--version"]).strip().replace("Kubernetes ", "")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-bench-"))
    progress(f"work directory {workdir}; kube-proxy {version}; backend {args.backend}")
    runs: list[dict[str, Any]] = []
    details: dict[str, Any] = {
        "stamp": stamp,
        "argv": sys.argv,
        "backend": args.backend,
        "gap_s": args.gap,
        "creation": [],
        "runs": [],
    }
    mach = machine(args.backend)
    cp = ControlPlane(workdir / "control-plane", bin_dir)
    t = time.monotonic()
    cp.start()
    progress(f"control plane up at {cp.server} in {time.monotonic() - t:.1f} s")
    try:
        api = Api(cp.kubeconfig_admin, cp.workdir / "ca.crt")
        for ns in NAMESPACES:
            api.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        api.create("/api/v1/nodes", node_body())
        have = 0
        for n in args.sizes:
            t = time.monotonic()
            svc_s, slice_s = create_services(api, have, n, args.workers)
            created = n - have
            progress(
                f"N={n}: created {created} Services in {svc_s:.1f} s "
                f"({created / max(svc_s, 1e-9):.0f}/s) and {created} EndpointSlices in "
                f"{slice_s:.1f} s; mix {mix(n)}"
            )
            details["creation"].append(
                {
                    "n_services": n,
                    "created": created,
                    "services_s": round(svc_s, 2),
                    "slices_s": round(slice_s, 2),
                }
            )
            have = n
            for min_sync in args.min_sync:
                for proxy in args.proxies:
                    try:
                        record, d = one_run(
                            proxy=proxy,
                            n=n,
                            min_sync=min_sync,
                            args=args,
                            api=api,
                            api_server=cp.server,
                            bin_dir=bin_dir,
                            kubeconfig=cp.kubeconfig_proxy,
                            workdir=workdir,
                        )
                    except (BenchError, OSError, subprocess.SubprocessError) as err:
                        progress(f"  {proxy} N={n} min-sync={min_sync:g}s FAILED: {err}")
                        record = run_record(
                            proxy=proxy,
                            mode="iptables",
                            n_services=n,
                            endpoints_per_service=ENDPOINTS_PER_SERVICE,
                            min_sync_period_s=min_sync,
                        )
                        d = {
                            "proxy": proxy,
                            "n_services": n,
                            "min_sync_period_s": min_sync,
                            "error": str(err),
                        }
                    restore_objects(api, n, args.changes, args.new_services)
                    runs.append(record)
                    details["runs"].append(d)
                    doc = document(version, mach, runs)
                    table = markdown_table(doc["runs"])
                    write_results(args.out, stamp, doc, details, table)
        sys.stdout.write(table if runs else "no runs\n")
        progress(
            f"results in {args.out}/latest.json (and {stamp}.*); "
            f"total {time.monotonic() - T0:.0f} s"
        )
    finally:
        cp.stop()
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
