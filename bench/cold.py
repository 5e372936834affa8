"""Cold start only, repeated, optionally profiled: the tool for working on figure (a).

    sudo .venv/bin/python -m bench.cold [--size 10000] [--repeat 3]
        [--proxies kube-proxy,pyproxy] [--families ipv4] [--v 0] [--py-spy DIR]

Starts the test control plane, creates N Services as bench.run does (same objects), then
`--repeat` times for each proxy (the order alternating): a fresh node namespace, process start →
the whole ruleset in the kernel (as bench.run's (a)), stop. Prints each figure, the median per
proxy, and both proxies' timelines (pyproxy's `listed` and `synced` log lines; kube-proxy's
"Caches are synced" and "SyncProxyRules complete", which it logs from --v=2: pass the same --v
to both).

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

from bench.model import FAMILIES, NAMESPACES, node_body
from bench.node import (
    Api,
    NodeNetns,
    ProxyProcess,
    Rules,
    iptables_shim,
    proxy_argv,
)
from bench.run import create_services, interleaved, progress, wait_complete

REPO = Path(__file__).resolve().parents[1]

#: pyproxy's and kube-proxy's (--v=2) log lines that mark the steps of a cold start.
_TIMELINE = re.compile(r'"event":"(listed|synced)"|Caches are synced|SyncProxyRules complete')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--proxies", default="kube-proxy,pyproxy")
    parser.add_argument("--min-sync", type=float, default=1.0)
    parser.add_argument("--backend", choices=("legacy", "nft"), default="legacy")
    parser.add_argument("--families", choices=tuple(FAMILIES), default="ipv4")
    parser.add_argument("--v", type=int, default=0, help="--v of both proxies")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--py-spy", type=Path, help="record pyproxy with py-spy into this folder")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from tests.netlab.controlplane import ControlPlane, find_bin_dir

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
        fams = FAMILIES[args.families]
        env = {"PATH": str(iptables_shim(workdir, args.backend, fams))}
        for k in range(args.repeat):
            for proxy in interleaved(args.proxies.split(","), k):
                command = proxy_argv(
                    proxy,
                    bin_dir=bin_dir,
                    kubeconfig=cp.kubeconfig_proxy,
                    min_sync=args.min_sync,
                    backend=args.backend,
                    families=fams,
                    verbosity=args.v,
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
                    rules = Rules(netns.name, args.backend, fams)
                    complete = functools.partial(lambda r: r.svc_jumps() >= args.size, rules)
                    process = ProxyProcess(netns.name, command, log, env)
                    started = process.start()
                    try:
                        seen = wait_complete(
                            rules,
                            complete,
                            timeout=300,
                            interval=0.02,
                            settle=args.settle,
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
