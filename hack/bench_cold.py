#!/usr/bin/env python3
"""Cold start only, repeated, optionally profiled: the tool for working on figure (a).

    sudo .venv/bin/python hack/bench_cold.py [--size 10000] [--repeat 3]
        [--proxies kube-proxy,pyproxy] [--py-spy DIR]

Starts the test control plane, creates N Services as hack/bench.py does (same objects), then
`--repeat` times for each proxy: a fresh node namespace, process start → nat KUBE-SERVICES holds a
jump per Service (as hack/bench.py's (a)), stop. Prints each figure, the median per proxy, and
pyproxy's own timeline (its `listed` and `synced` log lines, relative to the process start).

`--py-spy DIR` runs pyproxy under `py-spy record` (flame graphs in DIR, one per run; py-spy
adds a few per cent). Not a test; results are printed, not written.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(HACK))
sys.path.insert(0, str(REPO / "tests" / "integration"))

from bench_model import NAMESPACES, node_body  # noqa: E402
from bench_node import (  # noqa: E402
    Api,
    NodeNetns,
    ProxyProcess,
    Rules,
    iptables_shim,
    proxy_argv,
)

from bench import create_services, progress, wait_rules  # noqa: E402

#: pyproxy's and kube-proxy's (--v=2) log lines that mark the steps of a cold start.
_TIMELINE = re.compile(r'"event":"(listed|synced)"|Caches are synced|SyncProxyRules complete')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--proxies", default="kube-proxy,pyproxy")
    parser.add_argument("--min-sync", type=float, default=1.0)
    parser.add_argument("--backend", choices=("legacy", "nft"), default="legacy")
    parser.add_argument("--py-spy", type=Path, help="record pyproxy with py-spy into this folder")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from controlplane import ControlPlane, find_bin_dir  # tests/integration

    bin_dir = find_bin_dir()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-cold-"))
    cp = ControlPlane(workdir / "control-plane", bin_dir)
    cp.start()
    figures: dict[str, list[float]] = {}
    try:
        api = Api(cp.kubeconfig_admin, cp.workdir / "ca.crt")
        for ns in NAMESPACES:
            api.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        api.create("/api/v1/nodes", node_body())
        svc_s, slice_s = create_services(api, 0, args.size, args.workers)
        progress(f"created {args.size} Services ({svc_s:.1f} s) and slices ({slice_s:.1f} s)")
        env = {"PATH": f"{iptables_shim(workdir, args.backend)}:/usr/sbin:/usr/bin:/sbin:/bin"}
        for k in range(args.repeat):
            for proxy in args.proxies.split(","):
                command = proxy_argv(
                    proxy,
                    bin_dir=bin_dir,
                    kubeconfig=cp.kubeconfig_proxy,
                    min_sync=args.min_sync,
                    backend=args.backend,
                )
                if proxy == "pyproxy" and args.py_spy:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                    out = args.py_spy.resolve() / f"pyproxy-{args.size}-{k}.svg"
                    command = [
                        str(REPO / ".venv" / "bin" / "py-spy"),
                        "record",
                        "--subprocesses",
                        "--threads",
                        "-o",
                        str(out),
                        "--",
                        *command,
                    ]
                log = workdir / f"{proxy}-{k}.log"
                with NodeNetns(cp.server, workdir) as netns:
                    rules = Rules(netns, args.backend)
                    complete = functools.partial(lambda r: r.svc_jumps() >= args.size, rules)
                    process = ProxyProcess(netns, command, log, env)
                    started = process.start()
                    try:
                        seen = wait_rules(
                            rules,
                            complete,
                            timeout=300,
                            interval=0.02,
                            proxy=process,
                        )
                    finally:
                        process.stop()
                        rules.close()
                cold = None if seen is None else seen - started
                figures.setdefault(proxy, []).append(cold if cold is not None else float("nan"))
                shown = "TIMEOUT" if cold is None else f"{cold:.3f} s"
                progress(f"{proxy} run {k}: cold start {shown}")
                for line in log.read_text(errors="replace").splitlines():
                    if _TIMELINE.search(line):
                        print("    " + line[:220], file=sys.stderr)
        for proxy, values in figures.items():
            print(
                f"{proxy}: cold start median {statistics.median(values):.3f} s "
                f"(runs {', '.join(f'{v:.3f}' for v in values)})"
            )
    finally:
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
