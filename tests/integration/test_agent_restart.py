"""A restarted agent rebinds every listening port at once, although probes kept coming.

Each probe of /healthz (kubelet), of a health-check node port (load balancers) and of /metrics
(Prometheus) is an HTTP/1.0 exchange that the server closes first, so the server's end waits in
TIME_WAIT on the listening port for 60 s. Without SO_REUSEADDR a restarted agent cannot bind that
port until they expire (issue 16: liveness then killed the pod, a rolling restart of 3 nodes
took 3.5 min). Here a client keeps probing all three ports while the agent is stopped with
SIGTERM, started again, killed with SIGKILL and started again; each new agent must answer on
all three and log no bind failure.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from agent import A1, NODE_A, Agent, eventually, make_service, running_agent, set_endpoints
from netlab import Cluster, Node
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

node_cluster = cluster_fixture({"a": ("a1",)})

HEALTH_CHECK_NODE_PORT = 32062
#: (host, port, path) of every listener the agent opens.
PROBES = (
    ("127.0.0.1", 10256, "/healthz"),
    (NODE_A, HEALTH_CHECK_NODE_PORT, "/"),
    ("127.0.0.1", 10249, "/metrics"),
)
PORTS = {port for _, port, _ in PROBES}


@pytest.fixture
def agent(node_cluster: Cluster, control_plane: ControlPlane, tmp_path: Path) -> Iterator[Agent]:
    with running_agent(
        node_cluster, control_plane.server, control_plane.kubeconfig_proxy, tmp_path
    ) as a:
        yield a


def probe(node: Node, host: str, port: int, path: str) -> int:
    """One HTTP/1.0 GET from inside `node`, as a kubelet probe: the status, or 0 if none."""
    try:
        with node.socket() as s:
            s.settimeout(5)
            s.connect((host, port))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            response = b""
            while chunk := s.recv(65536):  # to the server's FIN: the server closes first
                response += chunk
    except OSError:
        return 0
    status = response.split(b"\r\n", 1)[0].split()
    return int(status[1]) if len(status) >= 2 and status[1].isdigit() else 0


class Prober:
    """Probes every port in a loop from node-a, as the kubelet and load balancers would."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.answers: list[tuple[int, int]] = []  # (port, status), in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for host, port, path in PROBES:
                self.answers.append((port, probe(self.node, host, port, path)))

    def mark(self) -> int:
        return len(self.answers)

    def all_answered_since(self, mark: int) -> bool:
        """Every port gave an HTTP answer (any status) since `mark`."""
        return {port for port, status in self.answers[mark:] if status} == PORTS

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def time_wait(node: Node, port: int) -> int:
    """TIME_WAIT sockets on local `port` in `node`."""
    out = node.run(["ss", "-Htan", "state", "time-wait", "sport", "=", f":{port}"]).stdout
    return len(out.splitlines())


def all_answer(agent: Agent) -> bool:
    return all(probe(agent.node, *p) for p in PROBES)


def restart(agent: Agent, prober: Prober, sig: signal.Signals) -> None:
    """Stop the agent with `sig` while probes keep coming, start it again, and check that the
    new agent answers on every port and logged no bind failure."""
    before = prober.mark()
    eventually(lambda: prober.all_answered_since(before), what="the prober gets answers")
    agent.stop(sig)
    # The probes' connections the old agent closed are waiting on its ports.
    for port in sorted(PORTS):
        assert time_wait(agent.node, port) > 0, (sig.name, port)

    log_mark = len(agent.text())
    agent.start()
    after = prober.mark()
    eventually(
        lambda: prober.all_answered_since(after),
        60,
        f"every port answers the prober after a {sig.name} restart",
        explain=lambda: agent.text()[log_mark:][-3000:],
    )
    log = agent.text()[log_mark:]
    for failure in ("Address already in use", "cannot start", "failed to start"):
        assert failure not in log, log


def test_restarted_agent_rebinds_every_port_at_once(
    agent: Agent, api: kubernetes.client.ApiClient, namespace: str
) -> None:
    make_service(
        api,
        namespace,
        "lb",
        "10.96.1.62",
        spec={
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": HEALTH_CHECK_NODE_PORT,
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30062}],
        },
    )
    set_endpoints(api, namespace, "lb", [(A1, "node-a")])
    eventually(lambda: all_answer(agent), 30, "healthz, health check node port and metrics")

    with Prober(agent.node) as prober:
        restart(agent, prober, signal.SIGTERM)
        restart(agent, prober, signal.SIGKILL)
    assert agent.proc is not None and agent.proc.poll() is None
