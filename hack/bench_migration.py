#!/usr/bin/env python3
"""Failed requests while a node switches from kube-proxy to pyproxy and back (not a test).

    sudo .venv/bin/python hack/bench_migration.py [--procedures cleanup,takeover]
        [--kube-proxy-modes iptables,nftables] [--steady 20] [--after 30] [--rate 20] [--out docs]

For each procedure, in a fresh netlab cluster (node-a with pods a1, a2; node-b with b1; one
outside client) against one real kube-apiserver: kube-proxy v1.34.4 (hack/build-control-plane.sh)
runs in node-a, then pyproxy, then kube-proxy again, while the client opens `--rate` new TCP
connections per second to a ClusterIP (routed to node-a) and to a NodePort of node-a. Failed
connections (refused, unreachable, no answer within 5 s) are counted per phase and target:

    kube-proxy  `--steady` s of kube-proxy alone
    takeover    SIGTERM to kube-proxy, [pyproxy --cleanup,] pyproxy started, its first sync + 2 s
    pyproxy     `--steady` s of pyproxy alone (an endpoint is added: it must answer)
    rollback    SIGTERM to pyproxy, [pyproxy --cleanup,] kube-proxy started, its first sync + 2 s
    after       `--after` s of kube-proxy alone (that endpoint is removed)

"cleanup" is the procedure docs/deploy.md described before issue 16 (with a cleanup between the
proxies), "takeover" the one it describes now (no cleanup). `--kube-proxy-modes` nftables also
runs the takeover from kube-proxy in nftables mode (pyproxy deletes its tables after its first
sync; the rollback goes to kube-proxy in iptables mode). Writes <out>/migration-results.json
(every count, the timeline of events, the KUBE-* chains and rules after each proxy's first sync
and their differences) and <out>/migration-results.md (the table); prints the table. The
committed copies in docs/ are the figures of record (bench/results/ is not committed). The
machinery is tests/integration/migration.py, which tests/integration/test_migration.py uses
with shorter phases to assert zero failures for "takeover".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import kubernetes  # noqa: E402
from controlplane import ControlPlane, api_client, find_bin_dir  # noqa: E402
from migration import (  # noqa: E402
    PROCEDURES,
    SLOW,
    Lab,
    MigrationReport,
    create_objects,
    delete_node,
    failure_kinds,
    markdown,
    migrate,
)
from netlab import Cluster  # noqa: E402

T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[migration {time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def version(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procedures", default=",".join(PROCEDURES))
    parser.add_argument("--steady", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument(
        "--kube-proxy-modes",
        default="iptables",
        help="modes of the first kube-proxy, each run with every procedure (iptables,nftables)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    procedures = [p for p in args.procedures.split(",") if p]
    for p in procedures:
        if p not in PROCEDURES:
            parser.error(f"unknown procedure {p!r}; choose from {PROCEDURES}")

    bin_dir = find_bin_dir()
    reports: list[MigrationReport] = []
    with tempfile.TemporaryDirectory(prefix="pyproxy-bench-migration-") as tmp:
        workdir = Path(tmp)
        cp = ControlPlane(workdir / "control-plane", bin_dir)
        cp.start()
        try:
            with api_client(cp.kubeconfig_admin) as api:
                for mode in args.kube_proxy_modes.split(","):
                    for procedure in procedures:
                        if procedure == "cleanup" and mode != "iptables":
                            # The old procedure cleaned other modes with kube-proxy --cleanup,
                            # which this lab does not run; only its iptables case is compared.
                            continue
                        reports.append(
                            run_one(
                                cp, api, bin_dir, workdir, procedure=procedure, mode=mode, args=args
                            )
                        )
        finally:
            cp.stop()

    table = markdown(reports)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "migration",
        "command": "sudo .venv/bin/python hack/bench_migration.py "
        + " ".join(
            [
                f"--procedures {args.procedures}",
                f"--steady {args.steady:g}",
                f"--after {args.after:g}",
                f"--rate {args.rate:g}",
                f"--kube-proxy-modes {args.kube_proxy_modes}",
            ]
        ),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"kernel": platform.release(), "cpus": _cpus()},
        "kube_proxy": version([str(bin_dir / "kube-proxy"), "--version"]),
        "iptables": version(["iptables-nft", "--version"]),
        "runs": [r.as_dict() for r in reports],
    }
    (args.out / "migration-results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "migration-results.md").write_text(
        "# Failed requests per phase, kube-proxy ⇄ pyproxy on one node\n\n"
        f"`{doc['command']}` — {doc['date']}, {doc['kube_proxy']}, {doc['iptables']}, "
        f"{args.rate:g} new TCP connections/s per target. Cells: failed / requests started in "
        f"the phase (answered, but after more than {SLOW:g} s: a retransmitted SYN).\n\n"
        + table
        + "\nFailure kinds: "
        + "; ".join(f"{r.label}: {failure_kinds(r)}" for r in reports)
        + "\n"
        + "".join(differences(r) for r in reports)
    )
    progress(f"wrote {args.out / 'migration-results.json'} and {args.out / 'migration-results.md'}")
    return 0


def differences(report: MigrationReport) -> str:
    """The KUBE-* chains and rules (both families, iptables-save lines) that differ between
    kube-proxy's first sync and pyproxy's takeover, and between kube-proxy's first sync and the
    end of the rollback (same API objects)."""
    out = []
    for a, b in (("kube-proxy", "pyproxy"), ("kube-proxy", "kube-proxy at the end")):
        if a not in report.snapshots or b not in report.snapshots:
            continue
        diff = report.snapshot_diff(a, b)
        if report.kube_proxy_mode != "iptables":
            # Nothing in common but the nftables tables, which must be gone after the takeover.
            diff = {
                side: [x for x in lines if x.startswith("nft ")] for side, lines in diff.items()
            }
        out.append(f"\n{report.label}: {a} vs {b}: ")
        if not any(diff.values()):
            out.append("identical\n")
            continue
        out.append("\n\n```\n")
        for side, lines in diff.items():
            out.extend(f"{side}: {line}\n" for line in lines)
        out.append("```\n")
    return "".join(out)


def run_one(
    cp: ControlPlane,
    api: kubernetes.client.ApiClient,
    bin_dir: Path,
    workdir: Path,
    *,
    procedure: str,
    mode: str,
    args: argparse.Namespace,
) -> MigrationReport:
    namespace = f"migration-{uuid.uuid4().hex[:8]}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    run_dir = workdir / f"{procedure}-{mode}"
    run_dir.mkdir()
    try:
        with Cluster({"a": ("a1", "a2"), "b": ("b1",)}) as cluster:
            lab = Lab(
                cluster,
                cp.server,
                cp.kubeconfig_proxy,
                bin_dir / "kube-proxy",
                run_dir,
                python=str(REPO / ".venv" / "bin" / "python"),
            )
            with lab.api_bridge():
                create_objects(api, namespace)
                try:
                    report = migrate(
                        lab,
                        api,
                        namespace,
                        procedure,
                        steady=args.steady,
                        after=args.after,
                        rate=args.rate,
                        kube_proxy_mode=mode,
                        progress=progress,
                    )
                except BaseException:
                    for log in sorted(run_dir.glob("*.log")):
                        tail = log.read_text(errors="replace")[-2000:]
                        print(f"--- {log.name}\n{tail}", file=sys.stderr)
                    raise
                finally:
                    delete_node(api)
    finally:
        core.delete_collection_namespaced_service(namespace)
        kubernetes.client.DiscoveryV1Api(api).delete_collection_namespaced_endpoint_slice(namespace)
        core.delete_namespace(namespace)
    progress(f"{report.label}:\n{markdown([report])}")
    return report


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
