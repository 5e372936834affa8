"""How long pyproxy takes to turn a big list response into its model, and what the GC costs.

    .venv/bin/python -m bench.decode [--services 10000] [--slices 10000] [--endpoints 5]
                                          [--repeat 5] [--json FILE]

The input is what a list of 10,000 Services or EndpointSlices looks like on the wire: JSON bytes
of a `ServiceList` / `EndpointSliceList` whose items have the metadata the API server really
returns (uid, resourceVersion, creationTimestamp, labels, managedFields). Each row is the median
over --repeat runs (CPU seconds of this process, so a busy machine skews them less; the wall
column is the wall-clock time of both stages) of:

    decode   orjson.loads(body)                         (what ListWatch does per page)
    convert  pyproxy.convert.*_from_api on every item   (what the controller does)

under three garbage-collector settings:

    gc on       CPython's default thresholds; the previous round's objects are still alive, as a
                controller holds its old state while a relist arrives
    gc off      gc.disable() around decode + convert (what pyproxy.gcpause.gc_paused does)
    gc frozen   gc.freeze() of the heap first (what a controller can do after its first sync), then
                decode + convert with the GC on

A script, not a test: it prints a table and optionally writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from pyproxy.convert import endpoint_slice_from_api, service_from_api
from pyproxy.gcpause import gc_paused

MANAGER_TIME = "2026-01-15T10:00:00Z"


def _metadata(kind_prefix: str, i: int, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": f"{kind_prefix}-{i}",
        "namespace": namespace,
        "uid": f"6f1c2d3e-{i:04x}-4a5b-8c9d-{i:012x}",
        "resourceVersion": str(100000 + i),
        "creationTimestamp": MANAGER_TIME,
        "labels": labels,
        "managedFields": [
            {
                "manager": "kubectl-client-side-apply",
                "operation": "Update",
                "apiVersion": "v1",
                "time": MANAGER_TIME,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                    "f:spec": {"f:ports": {".": {}, 'k:{"port":80,"protocol":"TCP"}': {
                        ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {},
                        "f:targetPort": {}}}, "f:selector": {}, "f:type": {}},
                },
            }
        ],
    }  # fmt: skip


def service(i: int) -> dict[str, Any]:
    namespace = f"ns-{i % 100}"
    ip = f"10.96.{(i >> 8) & 255}.{i & 255}"
    return {
        "metadata": _metadata("svc", i, namespace, {"app": f"app-{i}"}),
        "spec": {
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
            "selector": {"app": f"app-{i}"},
            "clusterIP": ip,
            "clusterIPs": [ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(i: int, endpoints: int) -> dict[str, Any]:
    namespace = f"ns-{i % 100}"
    labels = {
        "kubernetes.io/service-name": f"svc-{i}",
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
    }
    metadata = _metadata(f"svc-{i}", i, namespace, labels)
    metadata["name"] = f"svc-{i}-abcde"
    metadata["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": MANAGER_TIME}
    return {
        "metadata": metadata,
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{(i & 255) ^ e}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": f"app-{i}-{e}",
                              "uid": f"0a1b2c3d-{e:04x}-4e5f-8a9b-{i:012x}"},
                "nodeName": f"node-{(i + e) % 50}",
                "zone": f"zone-{e % 3}",
            }
            for e in range(endpoints)
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    }  # fmt: skip


def list_body(kind: str, items: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "kind": kind,
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "200000"},
            "items": items,
        }
    )


def measure(
    body: bytes, convert: Callable[[dict[str, Any]], object], mode: str, repeat: int
) -> dict[str, float]:
    """Median CPU seconds of decode and convert (CPU time, so that other processes on a busy
    machine do not count), and the median wall time of both together."""
    decode_times: list[float] = []
    convert_times: list[float] = []
    wall_times: list[float] = []
    held: object = None  # the previous round's result, alive like a controller's old state
    for _ in range(repeat):
        gc.collect()
        if mode == "gc frozen":
            gc.freeze()
        pause = gc_paused() if mode == "gc off" else contextlib.nullcontext()
        try:
            with pause:
                w0, t0 = time.perf_counter(), time.process_time()
                decoded = orjson.loads(body)
                t1 = time.process_time()
                converted = [convert(item) for item in decoded["items"]]
                t2, w2 = time.process_time(), time.perf_counter()
        finally:
            if mode == "gc frozen":
                gc.unfreeze()
        decode_times.append(t1 - t0)
        convert_times.append(t2 - t1)
        wall_times.append(w2 - w0)
        held = (decoded, converted)
    del held
    decode = statistics.median(decode_times)
    conv = statistics.median(convert_times)
    return {
        "decode": decode,
        "convert": conv,
        "total": decode + conv,
        "wall": statistics.median(wall_times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--slices", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5, help="endpoints per slice")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    inputs: dict[str, tuple[bytes, Callable[[dict[str, Any]], object]]] = {
        f"{args.services} Services": (
            list_body("ServiceList", [service(i) for i in range(args.services)]),
            service_from_api,
        ),
        f"{args.slices} EndpointSlices ({args.endpoints} endpoints each)": (
            list_body(
                "EndpointSliceList", [endpoint_slice(i, args.endpoints) for i in range(args.slices)]
            ),
            endpoint_slice_from_api,
        ),
    }
    print(f"Python {sys.version.split()[0]}, orjson {orjson.__version__}")
    print(f"CPU seconds (median of {args.repeat}); wall = wall-clock seconds of decode + convert")
    print(
        f"{'input':<44} {'gc':<10} {'MB':>6} {'decode':>7} {'convert':>8} {'total':>7} {'wall':>7}"
    )
    results: list[dict[str, Any]] = []
    for name, (body, convert) in inputs.items():
        for mode in ("gc on", "gc off", "gc frozen"):
            figures = measure(body, convert, mode, args.repeat)
            mb = len(body) / 1e6
            print(
                f"{name:<44} {mode:<10} {mb:>6.1f} {figures['decode']:>7.3f} "
                f"{figures['convert']:>8.3f} {figures['total']:>7.3f} {figures['wall']:>7.3f}"
            )
            results.append({"input": name, "gc": mode, "bytes": len(body), **figures})
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
