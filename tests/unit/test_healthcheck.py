"""/healthz, /livez and health-check node ports behave as kube-proxy's (proxy_health.go,
service_health.go): codes, JSON bodies and headers, over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message

import pytest

from pyproxy.healthcheck import (
    HealthzServer,
    ProxyHealth,
    ServiceHealthServer,
    format_go_time,
    service_health_body,
)
from pyproxy.httpserver import parse_bind_address
from pyproxy.metrics import Metrics, MetricsServer
from pyproxy.model import IPFamily, NamespacedName, Node

V4, V6 = IPFamily.IPv4, IPFamily.IPv6
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
TIMEOUT = 60.0  # 2 x a 30 s sync period

# No environment proxy may sit between the tests and 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str) -> tuple[int, Message, bytes]:
    try:
        with _opener.open(url, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> ProxyHealth:
    return ProxyHealth(TIMEOUT, clock=clock)


# --- time format and addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "text"),
    [
        (None, "0001-01-01T00:00:00Z"),
        (T0, "2023-11-14T22:13:20Z"),
        (T0 + 0.5, "2023-11-14T22:13:20.5Z"),
        (T0 + 0.123456, "2023-11-14T22:13:20.123456Z"),
        (0.0, "1970-01-01T00:00:00Z"),
    ],
)
def test_times_print_like_go_json(t: float | None, text: str) -> None:
    assert format_go_time(t) == text


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("", None),
        ("0.0.0.0:10256", ("0.0.0.0", 10256)),
        ("127.0.0.1:10249", ("127.0.0.1", 10249)),
        ("[::]:10256", ("::", 10256)),
        ("[::1]:10249", ("::1", 10249)),
        (":10256", ("", 10256)),
    ],
)
def test_bind_addresses(text: str, parsed: tuple[str, int] | None) -> None:
    assert parse_bind_address(text) == parsed


@pytest.mark.parametrize("text", ["10256", "localhost:10256", "1.2.3.4:port", "1.2.3.4:70000"])
def test_bad_bind_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bind_address(text)


# --- ProxyHealth: the state behind /healthz and /livez ------------------------------------------


def test_fresh_start_is_healthy_and_reports_now(health: ProxyHealth) -> None:
    code, body = health.healthz()
    assert code == 200
    # No family synced yet: no status map (omitempty), lastUpdated reported as now.
    assert body == {
        "lastUpdated": "2023-11-14T22:13:20Z",
        "currentTime": "2023-11-14T22:13:20Z",
        "nodeEligible": True,
        "healthy": True,
    }
    assert list(body) == ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
    assert health.livez() == (200, {k: v for k, v in body.items() if k != "nodeEligible"})


def test_synced_family_is_healthy_and_listed(health: ProxyHealth, clock: FakeClock) -> None:
    health.updated(V4)
    clock.now += 5
    code, body = health.healthz()
    assert code == 200
    assert body["lastUpdated"] == "2023-11-14T22:13:25Z"  # healthy: now, as upstream
    assert body["status"] == {"IPv4": {"lastUpdated": "2023-11-14T22:13:20Z", "healthy": True}}


def test_pending_update_is_healthy_until_the_timeout(health: ProxyHealth, clock: FakeClock) -> None:
    health.updated(V4)
    clock.now += 1
    health.queued_update(V4)
    clock.now += TIMEOUT - 1
    assert health.healthz()[0] == 200
    clock.now += 1
    code, body = health.healthz()
    assert code == 503
    assert body == {
        "lastUpdated": "2023-11-14T22:13:20Z",  # unhealthy: the real last sync
        "currentTime": "2023-11-14T22:14:21Z",
        "nodeEligible": True,
        "healthy": False,
        "status": {"IPv4": {"lastUpdated": "2023-11-14T22:13:20Z", "healthy": False}},
    }
    assert health.livez()[0] == 503
    assert not health.is_healthy()


def test_the_oldest_pending_update_counts(health: ProxyHealth, clock: FakeClock) -> None:
    health.updated(V4)
    health.queued_update(V4)
    clock.now += TIMEOUT / 2
    health.queued_update(V4)  # must not reset the clock
    clock.now += TIMEOUT / 2
    assert health.healthz()[0] == 503
    health.updated(V4)
    assert health.healthz()[0] == 200


def test_family_never_synced_is_not_judged(health: ProxyHealth, clock: FakeClock) -> None:
    # Upstream only judges families that have synced once (SyncLoop calls Updated at start).
    health.queued_update(V4)
    clock.now += 10 * TIMEOUT
    assert health.healthz()[0] == 200


def test_dual_stack_one_late_family_makes_the_proxy_unhealthy(
    health: ProxyHealth, clock: FakeClock
) -> None:
    health.updated(V6)
    health.updated(V4)
    health.queued_update(V6)
    clock.now += TIMEOUT
    code, body = health.livez()
    assert code == 503
    assert body["healthy"] is False
    assert body["status"] == {
        "IPv4": {"lastUpdated": "2023-11-14T22:13:20Z", "healthy": True},
        "IPv6": {"lastUpdated": "2023-11-14T22:13:20Z", "healthy": False},
    }
    assert list(body["status"]) == ["IPv4", "IPv6"]


def test_node_not_eligible_fails_healthz_but_not_livez(health: ProxyHealth) -> None:
    health.updated(V4)
    health.node_eligible = False
    code, body = health.healthz()
    assert code == 503
    assert body["nodeEligible"] is False
    assert body["healthy"] is True  # the proxier itself is fine
    assert health.livez()[0] == 200
    assert "nodeEligible" not in health.livez()[1]


@pytest.mark.parametrize(
    ("node", "eligible"),
    [
        (None, False),
        (Node("n1", being_deleted=True), False),
        (Node("n1"), True),
    ],
)
def test_node_eligibility_from_the_node(
    health: ProxyHealth, node: Node | None, eligible: bool
) -> None:
    health.sync_node(node)
    assert health.node_eligible is eligible


# --- HealthzServer over HTTP --------------------------------------------------------------------


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def healthz(health: ProxyHealth, metrics: Metrics) -> Iterator[str]:
    server = HealthzServer(health, "127.0.0.1:0", metrics=metrics)
    server.start()
    assert server.address is not None
    try:
        yield f"http://127.0.0.1:{server.address[1]}"
    finally:
        server.stop()


def test_healthz_http(
    healthz: str, health: ProxyHealth, clock: FakeClock, metrics: Metrics
) -> None:
    health.updated(V4)
    code, headers, body = http_get(healthz + "/healthz")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body == (
        b'{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z",'
        b'"nodeEligible":true,"healthy":true,'
        b'"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":true}}}'
    )

    health.queued_update(V4)
    clock.now += TIMEOUT
    code, headers, body = http_get(healthz + "/healthz")
    assert code == 503
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["healthy"] is False
    assert http_get(healthz + "/livez")[0] == 503

    health.updated(V4)
    health.node_eligible = False
    assert http_get(healthz + "/healthz")[0] == 503
    code, _, body = http_get(healthz + "/livez")
    assert code == 200
    assert "nodeEligible" not in json.loads(body)

    assert http_get(healthz + "/nothing-here")[0] == 404
    assert metrics.registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "200"}) == 1
    assert metrics.registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "503"}) == 2
    assert metrics.registry.get_sample_value("kubeproxy_proxy_livez_total", {"code": "503"}) == 1
    assert metrics.registry.get_sample_value("kubeproxy_proxy_livez_total", {"code": "200"}) == 1


def test_healthz_stop_closes_the_socket(health: ProxyHealth) -> None:
    server = HealthzServer(health, "127.0.0.1:0")
    server.start()
    assert server.address is not None
    port = server.address[1]
    assert http_get(f"http://127.0.0.1:{port}/livez")[0] == 200
    server.stop()
    assert server.address is None
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{port}/livez")
    server.stop()  # idempotent


def test_healthz_disabled_by_empty_address(health: ProxyHealth) -> None:
    server = HealthzServer(health, "")
    assert not server.enabled
    server.start()
    assert server.address is None
    server.stop()


def test_healthz_bind_failure_raises(health: ProxyHealth) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = HealthzServer(health, f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(OSError):
            server.start()
        assert server.address is None


def test_server_starts_once_the_port_is_released(health: ProxyHealth) -> None:
    """The proxy pyproxy replaces may still hold 10256 when pyproxy starts: it must not give up
    (a pod without /healthz never turns Ready), but bind as soon as the port is free."""
    stop = threading.Event()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    server = HealthzServer(health, f"127.0.0.1:{port}")
    try:
        server.start_retrying(stop, interval=0.05)
        assert server.address is None
        taken.close()
        deadline = time.monotonic() + 30
        while server.address is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.address == ("127.0.0.1", port)
        assert http_get(f"http://127.0.0.1:{port}/livez")[0] == 200
    finally:
        stop.set()
        taken.close()
        server.stop()


# --- health-check node ports --------------------------------------------------------------------

SVC = NamespacedName("default", "web")


@pytest.fixture
def hcnp(health: ProxyHealth) -> Iterator[ServiceHealthServer]:
    server = ServiceHealthServer(health, ["127.0.0.1"])
    try:
        yield server
    finally:
        server.stop()


def test_body_layout_matches_upstream_template() -> None:
    assert service_health_body(SVC, 2, True) == (
        b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )


def test_hcnp_ports_follow_each_sync(hcnp: ServiceHealthServer) -> None:
    p1, p2 = free_port(), free_port()
    hcnp.sync_services({p1: ("default", "web"), p2: ("default", "api")})
    assert hcnp.ports == {p1, p2}
    assert http_get(f"http://127.0.0.1:{p1}/")[0] == 503
    assert http_get(f"http://127.0.0.1:{p2}/")[0] == 503

    hcnp.sync_services({p2: ("default", "api")})
    assert hcnp.ports == {p2}
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{p1}/")
    assert http_get(f"http://127.0.0.1:{p2}/")[0] == 503

    hcnp.sync_services({})
    assert hcnp.ports == frozenset()
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{p2}/")


def test_hcnp_answers_with_local_endpoint_count(
    hcnp: ServiceHealthServer, health: ProxyHealth, clock: FakeClock
) -> None:
    port = free_port()
    health.updated(V4)
    hcnp.sync_services({port: SVC})
    url = f"http://127.0.0.1:{port}/any/path"

    code, headers, body = http_get(url)
    assert code == 503
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    assert json.loads(body) == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 0,
        "serviceProxyHealthy": True,
    }

    hcnp.sync_endpoints({("default", "web"): 3})
    code, headers, body = http_get(url)
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "3"
    assert body == service_health_body(SVC, 3, True)

    # The proxy falling behind fails every health-check node port...
    health.queued_update(V4)
    clock.now += TIMEOUT
    code, headers, body = http_get(url)
    assert code == 503
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "3"
    assert json.loads(body)["serviceProxyHealthy"] is False

    # ...but the Node being deleted does not (that is /healthz's job).
    health.updated(V4)
    health.node_eligible = False
    assert http_get(url)[0] == 200

    # A Service missing from the next endpoints sync has no local endpoints.
    hcnp.sync_endpoints({})
    assert http_get(url)[0] == 503


def test_hcnp_port_in_use_is_retried_on_the_next_sync(hcnp: ServiceHealthServer) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = int(taken.getsockname()[1])
    free = free_port()
    try:
        hcnp.sync_services({busy: SVC, free: ("default", "other")})
        assert hcnp.ports == {free}  # the free one still opened
    finally:
        taken.close()
    hcnp.sync_services({busy: SVC, free: ("default", "other")})
    assert hcnp.ports == {busy, free}
    assert http_get(f"http://127.0.0.1:{busy}/")[0] == 503


def test_hcnp_port_changing_service_keeps_listening(hcnp: ServiceHealthServer) -> None:
    port = free_port()
    hcnp.sync_services({port: SVC})
    hcnp.sync_services({port: ("other", "svc")})
    hcnp.sync_endpoints({NamespacedName("other", "svc"): 1})
    code, _, body = http_get(f"http://127.0.0.1:{port}/")
    assert code == 200
    assert json.loads(body)["service"] == {"namespace": "other", "name": "svc"}


# --- rebinding after a restart ------------------------------------------------------------------

TCP_TIME_WAIT = "06"  # the state column of /proc/net/tcp


def time_wait_sockets(port: int) -> int:
    """How many TIME_WAIT sockets have local address 127.0.0.1:`port`."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == TCP_TIME_WAIT)


def leave_time_wait(port: int, path: str) -> None:
    """One HTTP/1.0 exchange that the server closes first, as a kubelet probe does: the
    server's end of it then waits in TIME_WAIT on `port` (for 60 s, longer than the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        while client.recv(4096):  # until the server's FIN: it closed first
            pass
    for _ in range(100):  # our FIN moves the server's end from FIN_WAIT2 to TIME_WAIT
        if time_wait_sockets(port):
            return
        time.sleep(0.05)
    raise AssertionError(f"no TIME_WAIT socket on 127.0.0.1:{port}")


@pytest.mark.parametrize("kind", ["healthz", "metrics"])
def test_server_rebinds_at_once_despite_time_wait(health: ProxyHealth, kind: str) -> None:
    port = free_port()

    def server() -> HealthzServer | MetricsServer:
        if kind == "healthz":
            return HealthzServer(health, f"127.0.0.1:{port}")
        return MetricsServer(Metrics(), "iptables", f"127.0.0.1:{port}")

    path = "/livez" if kind == "healthz" else "/proxyMode"
    first = server()
    first.start()
    leave_time_wait(port, path)
    first.stop()  # the agent exits; its probes' connections stay in TIME_WAIT

    restarted = server()
    restarted.start()  # [Errno 98] Address already in use without SO_REUSEADDR
    try:
        assert time_wait_sockets(port) > 0  # the restart really met a TIME_WAIT socket
        assert http_get(f"http://127.0.0.1:{port}{path}")[0] == 200
    finally:
        restarted.stop()


def test_hcnp_rebinds_at_once_despite_time_wait(health: ProxyHealth) -> None:
    port = free_port()
    first = ServiceHealthServer(health, ["127.0.0.1"])
    first.sync_services({port: SVC})
    leave_time_wait(port, "/")
    first.stop()

    restarted = ServiceHealthServer(health, ["127.0.0.1"])
    try:
        restarted.sync_services({port: SVC})
        assert time_wait_sockets(port) > 0
        assert restarted.ports == {port}
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 503
    finally:
        restarted.stop()


def test_reuseaddr_still_refuses_a_port_someone_listens_on(health: ProxyHealth) -> None:
    first = HealthzServer(health, "127.0.0.1:0")
    first.start()
    assert first.address is not None
    try:
        second = HealthzServer(health, f"127.0.0.1:{first.address[1]}")
        with pytest.raises(OSError):
            second.start()
    finally:
        first.stop()
