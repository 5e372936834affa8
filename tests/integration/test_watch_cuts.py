"""pyproxy's watches through a relay that cuts connections, against the real API server.

Issue 15 item 9: the watch stream under faults, once against the real thing. The agent reaches
kube-apiserver through `CuttingProxy` (cutproxy.py), which resets connections part way through
what the server sends (inside a TLS record, so inside a watch event) and, now and then, all at
once, while Services and EndpointSlices are created, changed and deleted through the API. The
agent must end with exactly the rules a `--dry-run` of the API's final state renders, and the
rules of the Service that never changed must be in every sample of the ruleset taken meanwhile,
and it must keep answering: a fault never deletes what was programmed.

The cuts are random but seeded (PYPROXY_CUT_SEED, printed on failure) and bounded in number.
"""

from __future__ import annotations

import json
import os
import random
import threading
import urllib.parse
from pathlib import Path

import kubernetes
import pytest
import yaml
from agent import (
    A1,
    B1,
    Agent,
    answers,
    api_state,
    chains,
    eventually,
    make_service,
    node_a_dry_run,
    running_agent,
    set_endpoints,
)
from cutproxy import CuttingProxy
from netlab import Cluster, Reply, tcp_ask
from netlab.controlplane import ControlPlane
from netlab.fixtures import cluster_fixture

pytestmark = [pytest.mark.integration, pytest.mark.kernel]

node_cluster = cluster_fixture({"a": ("a1", "a2"), "b": ("b1",)})

SEED = int(os.environ.get("PYPROXY_CUT_SEED", "915"))
ROUNDS = 12
STABLE_IP = "10.96.1.90"


class Sampler:
    """Saves the node's ruleset over and over (a bounded number of times) in a thread and
    records every sample that lacks one of the `kept` rules."""

    def __init__(self, agent: Agent, kept: set[str], limit: int = 400) -> None:
        self.agent = agent
        self.kept = kept
        self.limit = limit
        self.samples = 0
        self.missing: list[tuple[int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set() and self.samples < self.limit:
            lines = set(self.agent.save().splitlines())
            self.samples += 1
            gone = self.kept - lines
            if gone:
                self.missing.append((self.samples, sorted(gone)))
            self._stop.wait(0.1)


def _log_events(agent: Agent) -> list[dict[str, object]]:
    return [json.loads(x) for x in agent.text().splitlines() if x.startswith("{")]


def test_cut_connections_lose_nothing_and_the_watch_converges(
    node_cluster: Cluster,
    control_plane: ControlPlane,
    api: kubernetes.client.ApiClient,
    namespace: str,
    tmp_path: Path,
) -> None:
    c = node_cluster
    rng = random.Random(SEED)  # noqa: S311 - a reproducible fault schedule, not crypto
    api_port = urllib.parse.urlsplit(control_plane.server).port
    assert api_port is not None
    core = kubernetes.client.CoreV1Api(api)
    with (
        CuttingProxy(api_port, SEED) as proxy,
        running_agent(
            c,
            control_plane.server,
            control_plane.kubeconfig_proxy,
            tmp_path,
            host_port=proxy.port,
        ) as agent,
    ):
        make_service(api, namespace, "stable", STABLE_IP)
        set_endpoints(api, namespace, "stable", [(A1, "node-a"), (B1, "node-b")])
        eventually(lambda: answers(c.pod("a2"), STABLE_IP, 80, 6) == {"a1", "b1"}, 60)
        # The stable Service's rules (its KUBE-SERVICES jump, KUBE-SVC and KUBE-SEP rules):
        # each one must be in every sample from now on.
        kept = {x for x in agent.save().splitlines() if f"{namespace}/stable:p" in x}
        assert sum("-j KUBE-SEP-" in x for x in kept) == 2, kept

        failures: list[tuple[int, object]] = []
        with Sampler(agent, kept) as sampler:
            for i in range(ROUNDS):
                proxy.arm(rng.randint(1, 2))
                make_service(api, namespace, f"churn{i}", f"10.96.3.{i + 1}")
                set_endpoints(api, namespace, f"churn{i}", [(A1, "node-a")])
                if i >= 2:  # a change to an existing slice
                    set_endpoints(api, namespace, f"churn{i - 2}", [(B1, "node-b")])
                if i >= 4 and i % 2 == 0:
                    core.delete_namespaced_service(f"churn{i - 4}", namespace)
                if rng.random() < 0.3:
                    proxy.cut_all()  # idle watches too
                r = tcp_ask(c.pod("a2"), STABLE_IP, 80, timeout=1)
                if not isinstance(r, Reply) or r.name not in {"a1", "b1"}:
                    failures.append((i, r))

            state = tmp_path / "state.yaml"
            state.write_text(yaml.safe_dump(api_state(api)))
            want = chains(node_a_dry_run(state))
            eventually(
                lambda: chains(agent.save()) == want,
                120,
                f"kernel == dry-run (seed {SEED})",
                explain=agent.save,
            )
        # The last change of each kind reached the data plane, through cut watches.
        assert answers(c.pod("a2"), f"10.96.3.{ROUNDS}", 80, 3) == {"a1"}
        assert answers(c.pod("a2"), f"10.96.3.{ROUNDS - 2}", 80, 3) == {"b1"}
        assert sampler.samples > ROUNDS
        assert sampler.missing == [], f"seed {SEED}"
        assert failures == [], f"seed {SEED}"
        assert agent.proc is not None and agent.proc.poll() is None

        # The faults did happen, and were handled as faults, not as bugs.
        events = _log_events(agent)
        resumed = [e for e in events if "resuming from the last resourceVersion" in str(e["event"])]
        lists = [e for e in events if e["event"] == "listed"]
        print(
            f"seed {SEED}: {proxy.cuts} cuts of {proxy.connections} connections, "
            f"{len(resumed)} watches resumed, {len(lists)} lists, {sampler.samples} samples"
        )
        assert proxy.cuts >= ROUNDS // 2, (proxy.cuts, proxy.connections)
        # Resumed from the last resourceVersion every time: no relist after the first three
        # lists (Services, EndpointSlices, Node), which finished before the first cut.
        assert len(lists) == 3, lists
        assert resumed, f"no watch was cut (seed {SEED})"
        assert {e["resource"] for e in resumed} & {
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
        }
        assert not [e for e in events if "unexpectedly" in str(e["event"])]
        assert not [e for e in events if "consumer failed" in str(e["event"])]
