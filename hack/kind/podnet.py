#!/usr/bin/python3
"""A minimal pod network for offline kind clusters: a stand-in for kindnetd.

kind's default CNI, kindnetd, ships as an image from a registry, and its source
is a nested Go module the module proxy does not serve, so an offline machine
can neither pull nor build it. This fixture does the part of kindnetd that
pyproxy's tests need, and nothing more:

* it writes the node's CNI configuration: the `ptp` plugin with `host-local`
  IPAM over the node's `spec.podCIDR`, and `portmap` (hostPort), the plugins
  Debian's containernetworking-plugins package puts in the node image;
* every few seconds it routes each other node's pod CIDR via that node's
  InternalIP, so pod-to-pod traffic crosses nodes over the kind network.

Not done (kindnetd does them): masquerading of pod traffic leaving the
cluster, NetworkPolicy, IPv6. Nothing in the kind tier needs them: clients
outside the pod network reach Services through node addresses, where the
service proxy masquerades as kube-proxy would.

It reaches the API server through the control-plane node (CONTROL_PLANE_ENDPOINT,
which kind patches into the manifest), not the `kubernetes` ClusterIP: it must
work before any service proxy runs. Standard library only (it runs in the
project's offline Python base image).
"""

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CNI_CONFIG = "/etc/cni/net.d/10-podnet.conflist"
INTERVAL_SECONDS = 5


def log(message: str) -> None:
    print(f"podnet: {message}", file=sys.stderr, flush=True)


def list_nodes(endpoint: str, context: ssl.SSLContext) -> list[dict[str, object]]:
    with open(f"{SA_DIR}/token", encoding="ascii") as f:
        token = f.read().strip()
    request = urllib.request.Request(
        f"https://{endpoint}/api/v1/nodes", headers={"Authorization": f"Bearer {token}"}
    )
    # S310: the URL is https:// built above, never a user-supplied scheme.
    with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
        items: list[dict[str, object]] = json.load(response)["items"]
        return items


def internal_ip(node: dict[str, object]) -> str | None:
    status = node.get("status")
    assert isinstance(status, dict)
    for address in status.get("addresses", []):
        if address.get("type") == "InternalIP" and ":" not in address["address"]:
            return str(address["address"])
    return None


def write_cni_config(pod_cidr: str) -> None:
    config = {
        "cniVersion": "0.3.1",
        "name": "podnet",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": "/run/cni-ipam-state",
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [[{"subnet": pod_cidr}]],
                },
                "mtu": 1500,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    text = json.dumps(config, indent=2) + "\n"
    try:
        with open(CNI_CONFIG, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    # Written next to it and renamed: the kubelet must never read half a file.
    with open(CNI_CONFIG + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.rename(CNI_CONFIG + ".tmp", CNI_CONFIG)
    log(f"wrote {CNI_CONFIG} for pod CIDR {pod_cidr}")


def sync(endpoint: str, context: ssl.SSLContext, node_name: str) -> None:
    for node in list_nodes(endpoint, context):
        metadata, spec = node["metadata"], node.get("spec", {})
        assert isinstance(metadata, dict)
        assert isinstance(spec, dict)
        pod_cidr = spec.get("podCIDR")
        if not pod_cidr:
            continue
        if metadata["name"] == node_name:
            write_cni_config(pod_cidr)
            continue
        via = internal_ip(node)
        if via is not None:
            subprocess.run(["ip", "route", "replace", pod_cidr, "via", via], check=True)


def main() -> None:
    endpoint = os.environ["CONTROL_PLANE_ENDPOINT"]
    node_name = os.environ["NODE_NAME"]
    context = ssl.create_default_context(cafile=f"{SA_DIR}/ca.crt")
    log(f"node {node_name}, API server {endpoint}")
    while True:
        try:
            sync(endpoint, context, node_name)
        except (OSError, subprocess.CalledProcessError, KeyError, ValueError) as error:
            log(f"sync failed, retrying: {error}")
        time.sleep(INTERVAL_SECONDS)


if __name__ == "__main__":
    main()
