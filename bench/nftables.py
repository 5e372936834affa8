"""nftables mode's kernel side alone, in a throwaway network namespace (no API server).

    sudo .venv/bin/python -m bench.nftables [--size 1000] [--endpoints 5] [--repeat 5]

N ClusterIP+NodePort Services x E endpoints, as a state in memory. Prints: the full sync (render
+ one `nft -f -` from nothing; seconds and transaction bytes), then `--repeat` partial syncs of
one endpoint change and of one new Service (median seconds, bytes). A first look for issue 13's
targets (partial-sync bytes independent of N); not the benchmark of record (bench.run,
against kube-proxy through the API server), and not a test.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from pyproxy.convert import state_from_objects
from pyproxy.model import NamespacedName
from pyproxy.nftables.nft import Nft
from pyproxy.nftables.proxier import NftablesProxier
from pyproxy.nftables.render import TABLE
from pyproxy.options import parse_options, proxier_configs
from pyproxy.proxystate import desired_state

NODE = "node-a"


def objects(n: int, endpoints: int, *, first_ep: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        name = f"svc{i:05d}"
        out.append(
            {
                "kind": "Service",
                "metadata": {"namespace": "bench", "name": name},
                "spec": {
                    "type": "NodePort",
                    "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                    "ports": [
                        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30000 + i}
                    ],
                },
            }
        )
        eps = [
            {
                "addresses": [
                    f"10.{100 + j}.{i // 250}.{i % 250 + 1 + (first_ep if i == 0 else 0)}"
                ],
                "nodeName": NODE if j == 0 else "node-b",
            }
            for j in range(endpoints)
        ]
        out.append(
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "namespace": "bench",
                    "name": f"{name}-1",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": eps,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    ns = f"pyproxy-bench-nft-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        flags = "--proxy-mode nftables --node-ip 172.30.0.2 --cluster-cidr 10.0.0.0/8"
        options = parse_options([*flags.split(), "--hostname-override", NODE])
        (config,) = proxier_configs(options, None, ())
        nft = Nft("ip", TABLE, command=("ip", "netns", "exec", ns, "nft"))
        proxier = NftablesProxier(config, nft)

        t = time.perf_counter()
        cluster, _ = state_from_objects(objects(args.size, args.endpoints))
        states = desired_state(cluster, config)
        t_state = time.perf_counter() - t
        t = time.perf_counter()
        full = proxier.sync(states, None)
        t_full = time.perf_counter() - t
        print(
            f"N={args.size} x {args.endpoints} endpoints: state {t_state:.2f} s;"
            f" full sync {t_full:.2f} s, {full.restore_bytes} bytes"
        )

        ep_times, ep_bytes, new_times, new_bytes = [], [], [], []
        for r in range(1, args.repeat + 1):
            cluster, _ = state_from_objects(objects(args.size, args.endpoints, first_ep=r))
            states = desired_state(cluster, config)
            t = time.perf_counter()
            result = proxier.sync(states, {NamespacedName("bench", "svc00000")})
            ep_times.append(time.perf_counter() - t)
            ep_bytes.append(result.restore_bytes)

            extra = objects(args.size + r, args.endpoints, first_ep=r)
            cluster, _ = state_from_objects(extra)
            states = desired_state(cluster, config)
            t = time.perf_counter()
            result = proxier.sync(states, {NamespacedName("bench", f"svc{args.size + r - 1:05d}")})
            new_times.append(time.perf_counter() - t)
            new_bytes.append(result.restore_bytes)
        print(
            f"endpoint change: p50 {statistics.median(ep_times) * 1000:.1f} ms,"
            f" {statistics.median(ep_bytes):.0f} bytes;"
            f" new Service: p50 {statistics.median(new_times) * 1000:.1f} ms,"
            f" {statistics.median(new_bytes):.0f} bytes (sync only; state building excluded)"
        )
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
