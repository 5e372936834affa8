"""Constant client load for hack/kind-disruption.sh, run inside a client pod.

Three streams against one Service until the file STOP exists, then one JSON line
with the counts:

* `clusterip`: a new TCP connection per request to the ClusterIP;
* `nodeport`: a new TCP connection per request to the NodePort of another node
  (so two nodes' rules are on the path);
* `established`: one keep-alive HTTP connection to the ClusterIP, opened at the
  start and reused for every request; a failure is counted, then it reconnects.
  It shows whether connections made before a disruption survive it (their
  conntrack entries must outlive the proxy's restart).

Usage: python3 - CLUSTER_IP NODE_IP NODE_PORT STOP < load.py
Standard library only: it runs in the pyproxy image, which every kind cluster of
this project has loaded.
"""

import http.client
import json
import os
import sys
import threading
import time

TIMEOUT_SECONDS = 2.0
PAUSE_SECONDS = 0.05


def new_connections(host: str, port: int, stop: str, counts: dict[str, int]) -> None:
    while not os.path.exists(stop):
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
        try:
            connection.request("GET", "/hostname")
            connection.getresponse().read()
            counts["ok"] += 1
        except OSError:
            counts["failed"] += 1
        finally:
            connection.close()
        time.sleep(PAUSE_SECONDS)


def established(host: str, stop: str, counts: dict[str, int]) -> None:
    connection = http.client.HTTPConnection(host, 80, timeout=TIMEOUT_SECONDS)
    while not os.path.exists(stop):
        try:
            connection.request("GET", "/hostname")
            connection.getresponse().read()
            counts["ok"] += 1
        except (OSError, http.client.HTTPException):
            counts["failed"] += 1
            connection.close()
            counts["reconnects"] += 1
            connection = http.client.HTTPConnection(host, 80, timeout=TIMEOUT_SECONDS)
        time.sleep(PAUSE_SECONDS)
    connection.close()


def main() -> None:
    cluster_ip, node_ip, node_port, stop = sys.argv[1:5]
    results: dict[str, dict[str, int]] = {
        "clusterip": {"ok": 0, "failed": 0},
        "nodeport": {"ok": 0, "failed": 0},
        "established": {"ok": 0, "failed": 0, "reconnects": 0},
    }
    threads = [
        threading.Thread(target=new_connections, args=(cluster_ip, 80, stop, results["clusterip"])),
        threading.Thread(
            target=new_connections, args=(node_ip, int(node_port), stop, results["nodeport"])
        ),
        threading.Thread(target=established, args=(cluster_ip, stop, results["established"])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
