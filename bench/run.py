"""pyproxy against upstream kube-proxy, iptables mode, on a real control plane (not a test).

    sudo .venv/bin/python -m bench.run [--sizes 1000,5000,10000] [--min-sync 1,0]
        [--families ipv4,dual-stack] [--backend legacy|nft] [--runs 3]
        [--changes 30] [--new-services 10] [--out bench/results] [--label TEXT]

What it does (bench/README.md says what each figure includes and the fairness rules):

1. starts etcd + kube-apiserver (tests/netlab/controlplane.py, binaries from
   hack/build-control-plane.sh) and creates the Node "node-bench";
2. for each N (ascending; the objects of a smaller N are reused): creates Services 0..N-1 and one
   EndpointSlice of 5 endpoints each, directly, in parallel over raw HTTPS (timed separately);
3. for each family variant, each min sync period and each of --runs repeats, both proxies (the
   order alternates from one repeat to the next), each in a fresh node network namespace, with
   the same flags, PATH, verbosity and families:
   (a) cold start: process start → the whole ruleset is in the kernel;
   (b) --changes endpoint changes (add, then remove, one extra endpoint of one Service) → the
       whole ruleset holding the change; p50, p99;
   (c) --new-services new Services (Service + EndpointSlice) → likewise; p50;
   (d) CPU seconds (self + waited-for children, i.e. the iptables-restore runs) and peak RSS
       (VmHWM) of the proxy process over the whole run, from /proc just before SIGTERM;
   (e) bytes of iptables-restore input per full and per partial sync (pyproxy's log: medians;
       kube-proxy does not expose it: null);
   then the extra objects of (b)/(c) are put back as they were;
4. writes <out>/<stamp>.json and latest.json (one record per cell: medians over its runs, the
   min-max in `spread`, the timeouts counted), <stamp>-details.json (every run, every sample),
   <stamp>.md / latest.md and a PNG plot (latest.png). A `dataplane` section already in
   latest.json (bench.dataplane) is kept.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.model import (
    ENDPOINTS_PER_SERVICE,
    EXTRA_POD_BASE,
    FAMILIES,
    NAMESPACES,
    NEW_SERVICE_BASE,
    censored,
    change_plan,
    document,
    lb_status,
    markdown_table,
    median_int,
    mix,
    node_body,
    percentile,
    report,
    rounded,
    run_record,
    service_body,
    service_chain,
    service_spec,
    slice_body,
    validate,
)
from bench.node import (
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

REPO = Path(__file__).resolve().parents[1]
T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def wait_complete(
    rules: Rules,
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float,
    settle: float,
    proxy: ProxyProcess,
    since: object = None,
    timeline: list[tuple[float, object]] | None = None,
) -> float | None:
    """When the whole ruleset holding a change was in the kernel, or None after `timeout`.

    Polls `rules.token()` (a fingerprint of filter and nat in every family served) every
    `interval`; runs the (possibly costly) `check()` only when the token has changed since
    `since` (a token taken before the change was made; None: check at once). Once `check()`
    holds, it keeps polling for `settle` seconds: the time returned is when the last token seen
    was first seen, i.e. when the last table write before the ruleset came to rest landed
    (a proxy that writes nat first and filter after, or IPv4 first and IPv6 after, is timed
    to its last write, whatever the order).

    With the legacy variant, reading a chain copies the whole table out of the kernel under the
    xtables lock (0.3 s at N = 10,000): a read right after the change would hold up the proxy's
    iptables-restore, so after a change nothing is read until some table has changed.

    `timeline`, if given, gets (time, token) of every change seen (for the details)."""
    deadline = time.monotonic() + timeout
    last: object = object() if since is None else since
    first_seen = time.monotonic()
    while True:
        seen = time.monotonic()
        token = rules.token()
        if token != last:
            last, first_seen = token, seen
            if timeline is not None:
                timeline.append((seen, token))
            if check():
                break
        proxy.check_alive()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)
    end = time.monotonic() + settle
    while time.monotonic() < end:
        seen = time.monotonic()
        token = rules.token()
        if token != last:
            last, first_seen = token, seen
            if timeline is not None:
                timeline.append((seen, token))
        proxy.check_alive()
        time.sleep(interval)
    return first_seen


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
    families: str,
    repeat: int,
    args: argparse.Namespace,
    api: Api,
    api_server: str,
    bin_dir: Path,
    kubeconfig: Path,
    workdir: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    started_wall = time.monotonic()
    fams = FAMILIES[families]
    details: dict[str, Any] = {
        "proxy": proxy,
        "backend": args.backend,
        "families": families,
        "n_services": n,
        "min_sync_period_s": min_sync,
        "repeat": repeat,
    }
    # The proxies' whole PATH: the chosen variant's tools for the served families, nothing else.
    env = {"PATH": str(iptables_shim(workdir, args.backend, fams)), "LANG": "C.UTF-8"}
    log = workdir / f"{proxy}-{args.backend}-{families}-n{n}-min{min_sync:g}-r{repeat}.log"
    log.unlink(missing_ok=True)
    details["log"] = str(log)
    timeouts = {"cold_start": 0, "endpoint_change": 0, "new_service": 0}
    with NodeNetns(api_server, workdir) as netns:
        rules = Rules(netns.name, args.backend, fams)
        argv = proxy_argv(
            proxy,
            bin_dir=bin_dir,
            kubeconfig=kubeconfig,
            min_sync=min_sync,
            backend=args.backend,
            families=fams,
            verbosity=args.v,
            sync_period=args.sync_period,
        )
        details["command"] = " ".join(["ip", "netns", "exec", "NODE", *argv])
        details["path"] = sorted(p.name for p in Path(env["PATH"]).iterdir())
        p = ProxyProcess(netns.name, argv, log, env)
        progress(
            f"{proxy} N={n} {args.backend} {families} min-sync={min_sync:g}s run {repeat + 1}: "
            f"starting in {netns.name}"
        )
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

            timeline: list[tuple[float, object]] = []
            seen = wait_complete(
                rules,
                complete,
                timeout=args.cold_timeout,
                interval=args.poll,
                settle=args.settle,
                proxy=p,
                timeline=timeline,
            )
            # When each table fingerprint changed, from the process start: shows which write
            # stopped the clock.
            details["cold_start_timeline"] = [
                [round(at - t_start, 3), token] for at, token in timeline
            ]
            if seen is None:
                timeouts["cold_start"] += 1
                cold = args.cold_timeout
            else:
                cold = seen - t_start
            progress(f"  (a) cold start {'TIMEOUT' if seen is None else f'{cold:.2f} s'}")
            details["cold_start_s"] = cold
            t = time.monotonic()
            details["rule_counts"] = rules.save_counts(log.with_suffix(".rules"))
            details["iptables_save_s"] = round(time.monotonic() - t, 3)
            progress(
                f"  rules: {details['rule_counts']} (save took {details['iptables_save_s']} s)"
            )

            # (b) endpoint changes; the settle window of each is the pause before the next.
            latencies: list[float] = []
            for k, (index, add) in enumerate(change_plan(n, args.changes)):
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
                seen = wait_complete(
                    rules,
                    lambda chain=chain, expected=expected: rules.sep_jumps(chain) == expected,
                    timeout=args.change_timeout,
                    interval=args.poll,
                    settle=args.gap,
                    proxy=p,
                    since=before,
                )
                if seen is None:
                    timeouts["endpoint_change"] += 1
                    progress(f"  (b) change {k + 1}: TIMEOUT ({spec.name})")
                else:
                    latencies.append(seen - t0)
                if (k + 1) % 10 == 0 or k + 1 == args.changes:
                    progress(
                        f"  (b) {k + 1}/{args.changes} changes, p50 so far "
                        f"{percentile(latencies, 50) or float('nan'):.3f} s"
                    )
            details["endpoint_change_samples_s"] = [round(x, 4) for x in latencies]

            # (c) new Services
            new_lat: list[float] = []
            for k in range(args.new_services):
                spec = service_spec(NEW_SERVICE_BASE + k, prefix="new")
                chain = service_chain(spec.port_name)
                before = rules.token()
                t0 = time.monotonic()
                api.create(api.services(spec.namespace), service_body(spec))
                api.create(api.slices(spec.namespace), slice_body(spec))
                seen = wait_complete(
                    rules,
                    lambda chain=chain: rules.sep_jumps(chain) == ENDPOINTS_PER_SERVICE,
                    timeout=args.change_timeout,
                    interval=args.poll,
                    settle=args.gap,
                    proxy=p,
                    since=before,
                )
                if seen is None:
                    timeouts["new_service"] += 1
                    progress(f"  (c) new Service {k + 1}: TIMEOUT")
                else:
                    new_lat.append(seen - t0)
            progress(
                f"  (c) {len(new_lat)}/{args.new_services} new Services, p50 "
                f"{percentile(new_lat, 50) or float('nan'):.3f} s"
            )
            details["new_service_samples_s"] = [round(x, 4) for x in new_lat]
            details["timeouts"] = timeouts

            # (d), (e)
            p.check_alive()
            metrics = p.metrics()
            cpu, rss = p.usage()
        finally:
            code = p.stop()
            rules.close()
            details["exit_code"] = code
        log_text = log.read_text(errors="replace")
        bytes_full = bytes_partial = None
        if proxy == "pyproxy":
            full, partial = pyproxy_restore_bytes(log_text)
            details["restore_bytes_full_samples"] = full
            details["restore_bytes_partial_samples_count"] = len(partial)
            bytes_full, bytes_partial = median_int(full), median_int(partial)
        for kind in ("full", "partial"):
            name = f"kubeproxy_sync_{kind}_proxy_rules_duration_seconds_count"
            details[f"syncs_{kind}"] = metric_value(metrics, name)
        details["kubeproxy_sync_proxy_rules_iptables_total_nat"] = metric_value(
            metrics, "kubeproxy_sync_proxy_rules_iptables_total", table="nat"
        )
    details["wall_s"] = round(time.monotonic() - started_wall, 1)
    changes = censored(latencies, timeouts["endpoint_change"], args.change_timeout)
    news = censored(new_lat, timeouts["new_service"], args.change_timeout)
    record = run_record(
        proxy=proxy,
        mode="iptables",
        backend=args.backend,
        families=families,
        n_services=n,
        endpoints_per_service=ENDPOINTS_PER_SERVICE,
        min_sync_period_s=min_sync,
        cold_start_s=rounded(cold, 3),
        endpoint_change_p50_s=rounded(percentile(changes, 50)),
        endpoint_change_p99_s=rounded(percentile(changes, 99)),
        new_service_p50_s=rounded(percentile(news, 50)),
        cpu_s=round(cpu, 2),
        peak_rss_mib=round(rss, 1),
        restore_bytes_full=bytes_full,
        restore_bytes_partial=bytes_partial,
        timeouts=timeouts,
    )
    progress(
        f"  done in {details['wall_s']} s: cpu {cpu:.1f} s, peak RSS {rss:.0f} MiB, "
        f"restore bytes full/partial {bytes_full}/{bytes_partial}"
    )
    return record, details


# --- output -------------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        out = run(argv, check=False).strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def machine_meta() -> dict[str, Any]:
    """What the figures were taken on: machine, kernel, tool versions, pyproxy's commit."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "pyproxy"])
    return {
        "pyproxy_commit": None if commit is None else commit + ("-dirty" if dirty else ""),
        "machine": f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB, "
        f"Python {platform.python_version()}",
        "kernel": f"Linux {platform.release()} {platform.version()}",
        "iptables_version": "; ".join(
            v for v in (_first_line([f"iptables-{b}", "--version"]) for b in ("legacy", "nft")) if v
        ),
        "nft_version": _first_line(["nft", "--version"]),
    }


def previous_dataplane(out: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The data-plane section of the latest.json already there (bench.dataplane's), kept if it
    was taken from the same pyproxy commit with the same label."""
    try:
        doc = json.loads((out / "latest.json").read_text())
    except (OSError, ValueError):
        return []
    if any(doc.get(k) != meta[k] for k in ("label", "pyproxy_commit")):
        return []
    return list(doc.get("dataplane") or [])


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
    series: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        cell = (r["proxy"], r["backend"], r["families"], r["min_sync_period_s"])
        series.setdefault(cell, []).append(r)
    for ax, (key, heading) in zip(axes, figures, strict=True):
        for (proxy, backend, families, min_sync), rs in sorted(series.items()):
            points = sorted(
                (r["n_services"], r[key], r["spread"][key]) for r in rs if r[key] is not None
            )
            if not points:
                continue
            # The median, with the min-max over the cell's runs as the error bar.
            ax.errorbar(
                [x for x, _, _ in points],
                [y for _, y, _ in points],
                yerr=[
                    [y - b[0] for _, y, b in points],
                    [b[1] - y for _, y, b in points],
                ],
                marker="o",
                capsize=3,
                linestyle="-" if proxy == "pyproxy" else "--",
                label=f"{proxy}, {backend}, {families}, min sync {min_sync:g} s",
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
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(out: Path, stamp: str, doc: dict[str, Any], details: dict[str, Any]) -> None:
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
    table = report(doc)
    (out / f"{stamp}.md").write_text(table)
    (out / "latest.md").write_text(table)
    title = "\n".join(
        [
            doc["label"],
            f"kube-proxy {doc['kubernetes_version']} vs pyproxy {doc['pyproxy_commit'] or '?'}, "
            f"iptables mode; {doc['machine']}; {doc['kernel']}",
        ]
    )
    if plot(doc["runs"], out / f"{stamp}.png", title):
        shutil.copyfile(out / f"{stamp}.png", out / "latest.png")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000,10000", help="N values (Services)")
    p.add_argument("--min-sync", default="1,0", help="--iptables-min-sync-period values (s)")
    p.add_argument(
        "--families",
        default="ipv4,dual-stack",
        help="family variants, each run by both proxies: ipv4, dual-stack",
    )
    p.add_argument("--proxies", default="kube-proxy,pyproxy")
    p.add_argument("--runs", type=int, default=3, help="runs per cell (proxies interleaved)")
    p.add_argument("--changes", type=int, default=30, help="endpoint changes for (b)")
    p.add_argument("--new-services", type=int, default=10, help="new Services for (c)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--label", default="smoke run: not figures of record")
    p.add_argument(
        "--backend",
        choices=("nft", "legacy"),
        default="legacy",
        help="iptables variant both proxies write (and the benchmark reads); iptables-nft-restore"
        " 1.8.9 needs minutes per full sync from about 5,000 Services (default legacy)",
    )
    p.add_argument(
        "--gap",
        type=float,
        default=1.5,
        help="settle window after each change, which is also the pause before the next (s)",
    )
    p.add_argument("--settle", type=float, default=3.0, help="settle window after (a) (s)")
    p.add_argument("--poll", type=float, default=0.01, help="pause between token reads (s)")
    p.add_argument("--v", type=int, default=0, help="--v of both proxies")
    p.add_argument("--sync-period", default="1h", help="--iptables-sync-period of both")
    p.add_argument("--cold-timeout", type=float, default=3600)
    p.add_argument("--change-timeout", type=float, default=600)
    p.add_argument("--workers", type=int, default=16, help="parallel API requests for creation")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.min_sync = [float(s) for s in args.min_sync.split(",")]
    args.families = [s.strip() for s in args.families.split(",")]
    args.proxies = [s.strip() for s in args.proxies.split(",")]
    for proxy in args.proxies:
        if proxy not in ("kube-proxy", "pyproxy"):
            p.error(f"unknown proxy {proxy}")
    for families in args.families:
        if families not in FAMILIES:
            p.error(f"unknown family variant {families} ({', '.join(FAMILIES)})")
    if args.sizes[-1] > NEW_SERVICE_BASE:
        p.error(f"at most {NEW_SERVICE_BASE} Services")
    if args.changes % 2:
        p.error("--changes must be even (each add is followed by its remove)")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def interleaved(proxies: Sequence[str], repeat: int) -> list[str]:
    """The proxies in their order for even repeats, reversed for odd ones, so neither always
    runs first (right after the objects were created, or right after the other's run)."""
    return list(proxies) if repeat % 2 == 0 else list(reversed(proxies))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Clean up (proxy, namespace, control plane) on SIGTERM and on SIGINT even when started in
    # the background, where the shell ignores SIGINT.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.geteuid() != 0:
        print("bench.run needs root (network namespaces)", file=sys.stderr)
        return 2
    from tests.netlab.controlplane import ControlPlane, find_bin_dir

    bin_dir = find_bin_dir()
    version = run([str(bin_dir / "kube-proxy"), "--version"]).strip().replace("Kubernetes ", "")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-bench-"))
    progress(f"work directory {workdir}; kube-proxy {version}; backend {args.backend}")
    meta = machine_meta() | {
        "label": args.label,
        "kubernetes_version": version,
        "runs_per_cell": args.runs,
    }
    dataplane = previous_dataplane(args.out, meta)
    runs: list[dict[str, Any]] = []
    details: dict[str, Any] = {
        "stamp": stamp,
        "argv": sys.argv,
        "meta": meta,
        "backend": args.backend,
        "gap_s": args.gap,
        "settle_s": args.settle,
        "creation": [],
        "runs": [],
    }
    cp = ControlPlane(workdir / "control-plane", bin_dir)
    t = time.monotonic()
    cp.start()
    progress(f"control plane up at {cp.server} in {time.monotonic() - t:.1f} s")
    table = ""
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
            for families in args.families:
                for min_sync in args.min_sync:
                    for repeat in range(args.runs):
                        for proxy in interleaved(args.proxies, repeat):
                            try:
                                record, d = one_run(
                                    proxy=proxy,
                                    n=n,
                                    min_sync=min_sync,
                                    families=families,
                                    repeat=repeat,
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
                                    backend=args.backend,
                                    families=families,
                                    n_services=n,
                                    endpoints_per_service=ENDPOINTS_PER_SERVICE,
                                    min_sync_period_s=min_sync,
                                )
                                d = {
                                    "proxy": proxy,
                                    "families": families,
                                    "n_services": n,
                                    "min_sync_period_s": min_sync,
                                    "repeat": repeat,
                                    "error": str(err),
                                }
                            restore_objects(api, n, args.changes, args.new_services)
                            runs.append(record)
                            details["runs"].append(d | {"record": record})
                            doc = document(meta, runs, dataplane)
                            table = markdown_table(doc["runs"])
                            write_results(args.out, stamp, doc, details)
        sys.stdout.write(table or "no runs\n")
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
