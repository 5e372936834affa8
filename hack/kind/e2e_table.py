#!/usr/bin/env python3
"""The per-test table of hack/upstream-e2e.sh: kube-proxy (control) against pyproxy.

Reads the two JUnit reports e2e.test wrote, keeps the specs the run selected (the
same focus and skip regular expressions ginkgo used: the report also lists the
specs the filter left out), and writes a markdown table: spec, kube-proxy result,
pyproxy result, and the skip message or the first line of the failure. A spec
that passed with kube-proxy and not with pyproxy makes the exit status 1.

Standard library only (it runs under the host's python3).
"""

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

Result = tuple[str, str]  # (passed|failed|skipped|missing, reason)


def read_report(path: Path) -> dict[str, Result]:
    if not path.exists():
        return {}
    results: dict[str, Result] = {}
    # S314: the reports are e2e.test's own output on this machine, not untrusted input.
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314
        name = re.sub(r"^\[It\] ", "", case.get("name", ""))
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            assert node is not None
            message = (node.get("message") or node.text or "").strip().splitlines()
            results[name] = ("failed", message[0] if message else "")
        elif skipped is not None or case.get("status") == "skipped":
            message = (skipped.get("message") if skipped is not None else "") or ""
            results[name] = ("skipped", message.strip().splitlines()[0] if message.strip() else "")
        else:
            results[name] = ("passed", "")
    return results


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--focus", required=True)
    parser.add_argument("--skip", required=True)
    parser.add_argument("--kube-proxy", type=Path, required=True)
    parser.add_argument("--pyproxy", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    focus, skip = re.compile(args.focus), re.compile(args.skip)
    control, pyproxy = read_report(args.kube_proxy), read_report(args.pyproxy)
    selected = (n for n in control.keys() | pyproxy.keys() if focus.search(n))
    names = sorted(n for n in selected if not skip.search(n))
    missing: Result = ("not run", "")
    regressions = []
    counts = {"kube-proxy": dict.fromkeys(("passed", "failed", "skipped", "not run"), 0)}
    counts["pyproxy"] = dict(counts["kube-proxy"])
    rows = []
    for name in names:
        k, p = control.get(name, missing), pyproxy.get(name, missing)
        counts["kube-proxy"][k[0]] += 1
        counts["pyproxy"][p[0]] += 1
        if k[0] == "passed" and p[0] != "passed":
            regressions.append(name)
        reason = p[1] or k[1]
        rows.append(f"| {cell(name)} | {k[0]} | {p[0]} | {cell(reason)} |")

    lines = [
        "# Upstream e2e: kube-proxy (control) and pyproxy on kind",
        "",
        "Written by `hack/upstream-e2e.sh` (do not edit by hand). Kubernetes v1.34.4's own",
        "e2e.test, built from Go modules, run against two otherwise identical 3-node kind",
        "clusters: one with kind's kube-proxy (iptables), one with pyproxy's DaemonSet (iptables).",
        "",
        f"- focus: `{args.focus}`",
        f"- skip: `{args.skip}` (reasons in hack/upstream-e2e.sh)",
    ]
    for proxy, c in counts.items():
        lines.append(f"- {proxy}: " + ", ".join(f"{v} {k}" for k, v in c.items()))
    lines.append(f"- passed with kube-proxy, not with pyproxy: {len(regressions)}")
    lines += ["", "| spec | kube-proxy | pyproxy | skip / failure reason |"]
    lines += ["| --- | --- | --- | --- |"]
    lines += rows
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6 : 10 + len(counts)]))
    for name in regressions:
        print(f"pyproxy-only failure: {name}", file=sys.stderr)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
