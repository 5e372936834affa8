"""pyproxy's node agent (the real Controller: sync loop, rules, /healthz, health-check node
ports) fed from a state file instead of an API server, for kernel tests without a control plane.

    python tests/kernel/state_agent.py STATE.yaml [pyproxy flags...]

Only the source differs from `pyproxy` with `--kubeconfig`: the objects of STATE.yaml are
delivered once as the complete lists (Nodes, Services, EndpointSlices), as KubeSource's first
list would deliver them; everything after that is the agent's own code. Prints `SYNCED` once
the first sync has been written, then runs until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from pyproxy import log
from pyproxy.cli import proxier_factory
from pyproxy.conntrack import ConntrackCleaner
from pyproxy.controller import Controller
from pyproxy.hostnet import host_addresses
from pyproxy.iptables.restore import detect_backend
from pyproxy.nfacct import open_nfacct
from pyproxy.nodeconfig import prepare_host
from pyproxy.options import parse_options
from pyproxy.sources.statefile import read_objects


class StateSource:
    """The first complete lists come from a file; nothing changes afterwards."""

    def __init__(self, consumer: Controller, path: Path) -> None:
        self.consumer = consumer
        self.objects = read_objects(path)
        self.synced = threading.Event()

    def start(self) -> None:
        for kind in ("Node", "Service", "EndpointSlice"):
            self.consumer.on_replace(kind, [dict(o) for o in self.objects if o.get("kind") == kind])
        self.synced.set()

    def stop(self) -> bool:
        return True

    def has_synced(self) -> bool:
        return self.synced.is_set()


def main(argv: list[str]) -> int:
    state, flags = Path(argv[0]), argv[1:]
    options = parse_options(flags)
    log.configure(options.verbosity)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller = Controller(
        options,
        proxier_factory=proxier_factory(options, detect_backend(options.iptables_backend)),
        source_factory=lambda c: StateSource(c, state),
        host_addresses=host_addresses,
        prepare_host=lambda configs: prepare_host(configs, options.proxy_mode),
        conntrack=ConntrackCleaner,
        nfacct=open_nfacct() if options.proxy_mode == "iptables" else None,
    )
    controller.start()
    try:
        while not stop.wait(0.05):
            if controller.syncs > 0 and controller.service_health is not None:
                print("SYNCED", flush=True)
                break
        stop.wait()
    finally:
        controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
