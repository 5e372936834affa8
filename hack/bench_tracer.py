"""How long `parse_ruleset` takes on a kube-proxy-shaped nat table (the tracer's first step).

Moved here from tests/unit/test_tracer.py, which asserted a wall-clock bound (flaky on a loaded
runner); the unit test keeps checking that rules are parsed lazily. Prints one row per size:

    .venv/bin/python hack/bench_tracer.py [SERVICES ...]     # default: 500 5000 25000
"""

from __future__ import annotations

import sys
import time

from pyproxy.iptables.tracer import parse_ruleset


def nat_table(services: int) -> str:
    """KUBE-SERVICES with one rule per Service and a two-endpoint KUBE-SVC chain each."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    for i in range(services):
        svc = f"KUBE-SVC-{i:016d}"
        lines.append(f":{svc} - [0:0]")
        lines.append(
            f'-A KUBE-SERVICES -m comment --comment "ns/svc{i}:p80 cluster IP" -m tcp -p tcp '
            f"-d 172.{16 + i // 65536}.{i // 256 % 256}.{i % 256} --dport 80 -j {svc}"
        )
        lines.append(
            f'-A {svc} -m comment --comment "ns/svc{i}:p80 -> 10.1.0.1:80" -m statistic '
            f"--mode random --probability 0.5000000000 -j KUBE-SEP-A"
        )
        lines.append(f"-A {svc} -j KUBE-SEP-B")
    return "\n".join([*lines, "COMMIT", ""])


def best_of(runs: int, text: str) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        parse_ruleset(text)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [500, 5000, 25000]
    print("| services | lines | parse_ruleset (best of 5) |")
    print("| ---: | ---: | ---: |")
    for n in sizes:
        text = nat_table(n)
        print(f"| {n} | {text.count(chr(10))} | {best_of(5, text) * 1000:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
