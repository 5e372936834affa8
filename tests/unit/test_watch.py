"""The list+watch layer against a scripted fake API server (stdlib http.server on 127.0.0.1).

Each test scripts the server's answers per resource path (list pages, chunked watch streams with
events and bookmarks, 410 Gone, 5xx, a connection dropped mid-stream; and raw faults: a body cut
or reset inside an event, garbage lines, HTML error pages, truncated JSON) and checks what the
consumer saw, which requests were made (resourceVersion, continue, selectors) and which backoff
delays were waited (the sleep is injected, so nothing here really waits for a backoff).
"""

from __future__ import annotations

import base64
import gc
import json
import queue
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
import urllib3

from pyproxy.errors import ConfigError
from pyproxy.gcpause import gc_paused
from pyproxy.sources.kube import (
    ENDPOINT_SLICES_PATH,
    NODES_PATH,
    PROXY_LABEL_SELECTOR,
    SERVICES_PATH,
    KubeSource,
    connect,
    load_configuration,
)
from pyproxy.sources.watch import ApiConnection, Backoff, BackoffPolicy, ListWatch

NO_JITTER = BackoffPolicy(initial=0.2, maximum=1.0, factor=2.0, jitter=0.0)
PATH = "/api/v1/services"

# --- the fake API server ------------------------------------------------------------------


@dataclass
class Json:
    """A plain JSON answer."""

    body: dict[str, Any]
    status: int = 200


@dataclass
class Stream:
    """A chunked watch stream: the lines, then a clean end, a dropped connection, or holding the
    connection open (until the client goes away or the test ends)."""

    events: list[dict[str, Any]]
    end: Literal["close", "drop", "hold"] = "hold"


@dataclass
class Raw:
    """Bytes as a broken server, or a proxy in front of it, would send them: any status and
    content type; the body as one chunk of a chunked stream, or whole with a Content-Length
    (`declared` announces more than is sent) or, `declared=-1`, with none (the body ends when
    the connection does); then a clean end, a cut (FIN, no terminating chunk) or a reset
    (RST)."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    chunked: bool = True
    end: Literal["close", "cut", "reset"] = "close"
    declared: int | None = None


Reply = Json | Stream | Raw


@dataclass
class Request:
    path: str
    params: dict[str, str]
    headers: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.params.get("watch") == "true"


@dataclass
class FakeApi:
    """Per path, a queue of replies for lists and one for watches. When a queue is empty, a list
    answers 500 and a watch holds the connection with no events."""

    port: int = 0
    requests: list[Request] = field(default_factory=list)
    lists: dict[str, queue.Queue[Reply]] = field(default_factory=dict)
    watches: dict[str, queue.Queue[Reply]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on_list(self, path: str, *replies: Reply) -> None:
        for reply in replies:
            self.lists.setdefault(path, queue.Queue()).put(reply)

    def on_watch(self, path: str, *replies: Reply) -> None:
        for reply in replies:
            self.watches.setdefault(path, queue.Queue()).put(reply)

    def requests_for(self, path: str, *, watch: bool | None = None) -> list[Request]:
        return [
            r for r in self.requests if r.path == path and (watch is None or r.is_watch == watch)
        ]

    def next_reply(self, request: Request) -> Reply:
        replies = (self.watches if request.is_watch else self.lists).get(request.path)
        try:
            if replies is None:
                raise queue.Empty
            return replies.get_nowait()
        except queue.Empty:
            if request.is_watch:
                return Stream([], end="hold")
            return Json(status_body(500, "no scripted reply"), status=500)


def status_body(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "code": code,
    }


def make_handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            request = Request(
                parts.path,
                dict(urllib.parse.parse_qsl(parts.query)),
                {k.lower(): v for k, v in self.headers.items()},
            )
            api.requests.append(request)
            if api.token is not None and request.headers.get("authorization") != (
                f"Bearer {api.token}"
            ):
                self.send_json(Json(status_body(401, "Unauthorized"), status=401))
                return
            reply = api.next_reply(request)
            if isinstance(reply, Json):
                self.send_json(reply)
            elif isinstance(reply, Raw):
                self.send_raw(reply)
            else:
                self.send_stream(reply)

        def send_raw(self, reply: Raw) -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                declared = len(reply.body) if reply.declared is None else reply.declared
                if declared >= 0:
                    self.send_header("Content-Length", str(declared))
            self.end_headers()
            if reply.chunked and reply.body:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(reply.body), reply.body))
            elif reply.body:
                self.wfile.write(reply.body)
            self.wfile.flush()
            self.close_connection = True
            if reply.end == "close":
                if reply.chunked:
                    self.wfile.write(b"0\r\n\r\n")
            elif reply.end == "cut":
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                # close() with a zero linger sends RST; the makefile()s hold the socket open.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.rfile.close()
                self.wfile.close()
                self.connection.close()

        def send_json(self, reply: Json) -> None:
            data = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_stream(self, reply: Stream) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in reply.events:
                line = json.dumps(event).encode() + b"\n"
                # Split each event over two chunks: the client must reassemble lines.
                for piece in (line[:7], line[7:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            if reply.end == "close":
                self.wfile.write(b"0\r\n\r\n")
            elif reply.end == "drop":
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            else:
                self.hold()
                self.close_connection = True

        def hold(self) -> None:
            """Keep the stream open until the client closes it or the test ends."""
            while not api.release.is_set():
                readable, _, _ = select.select([self.connection], [], [], 0.05)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return  # the client hung up

    return Handler


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(api))
    api.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield api
    finally:
        api.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def conn(fake_api: FakeApi) -> Iterator[ApiConnection]:
    connection = ApiConnection(urllib3.PoolManager(), fake_api.url)
    try:
        yield connection
    finally:
        connection.close()


# --- helpers ------------------------------------------------------------------------------


def obj(name: str, rv: str, kind: str = "Service") -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


def page(names: list[str], rv: str, cont: str = "") -> Json:
    metadata = {"resourceVersion": rv, **({"continue": cont} if cont else {})}
    return Json({"kind": "ServiceList", "metadata": metadata, "items": [obj(n, rv) for n in names]})


def event(type_: str, name: str, rv: str) -> dict[str, Any]:
    return {"type": type_, "object": obj(name, rv)}


def bookmark(rv: str) -> dict[str, Any]:
    return {"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": rv}}}


def gone() -> dict[str, Any]:
    return {"type": "ERROR", "object": status_body(410, "too old resource version: 1 (5)")}


class Recorder:
    """A WatchHandler writing down what it was told, thread-safely."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.changed = threading.Condition()
        self.fail_next_event = False
        self.gc_enabled_in_replace: list[bool] = []

    def on_replace(self, objects: list[dict[str, Any]]) -> None:
        with self.changed:
            self.gc_enabled_in_replace.append(gc.isenabled())
            self.calls.append(("replace", sorted(o["metadata"]["name"] for o in objects)))
            self.changed.notify_all()

    def on_event(self, event_type: str, obj: dict[str, Any]) -> None:
        with self.changed:
            if self.fail_next_event:
                self.fail_next_event = False
                raise RuntimeError("consumer bug")
            self.calls.append((event_type, obj["metadata"]["name"]))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"expected {count} calls, got {self.calls}")
            return list(self.calls)


class Sleeps:
    """The injected sleep: records delays and never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.on_sleep: Callable[[int], None] | None = None

    def __call__(self, delay: float) -> None:
        self.delays.append(round(delay, 3))
        if self.on_sleep is not None:
            self.on_sleep(len(self.delays))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def running() -> Iterator[Callable[[ListWatch], ListWatch]]:
    """Start ListWatches; stop each at the end of the test and check that it did stop."""
    started: list[ListWatch] = []

    def start(lw: ListWatch) -> ListWatch:
        started.append(lw)
        lw.start()
        return lw

    yield start
    for lw in started:
        assert lw.stop(5.0), "ListWatch did not stop"


def list_watch(conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, **kwargs: Any) -> ListWatch:
    return ListWatch(
        conn, PATH, recorder, backoff=NO_JITTER, sleep=sleeps, rand=lambda: 0.5, **kwargs
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- Backoff ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(NO_JITTER)
    assert [backoff.next() for _ in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next() == pytest.approx(0.2)


def test_backoff_jitter_stays_within_bounds() -> None:
    policy = BackoffPolicy(initial=1.0, maximum=30.0, jitter=0.2)
    assert Backoff(policy, rand=lambda: 0.0).next() == pytest.approx(0.8)
    assert Backoff(policy, rand=lambda: 1.0).next() == pytest.approx(1.2)


def test_gc_paused_nests_across_threads_and_restores_the_previous_state() -> None:
    assert gc.isenabled()
    inner_started, outer_done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other_thread() -> None:
        with gc_paused():
            inner_started.set()
            outer_done.wait(5)
            seen.append(gc.isenabled())  # the first pause ended, this one has not
        seen.append(gc.isenabled())

    with gc_paused():
        assert not gc.isenabled()
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert inner_started.wait(5)
    outer_done.set()
    thread.join()
    assert seen == [False, True]
    assert gc.isenabled()

    gc.disable()  # someone else turned it off: a pause must not turn it back on
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# --- list, then watch ---------------------------------------------------------------------


def test_paginated_list_then_watch_from_the_lists_resource_version(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, page(["a", "b"], "10", cont="next-page"), page(["c"], "10"))
    fake_api.on_watch(
        PATH,
        Stream(
            [
                event("ADDED", "d", "11"),
                event("MODIFIED", "a", "12"),
                bookmark("15"),
                event("DELETED", "b", "16"),
            ]
        ),
    )
    lw = running(
        list_watch(conn, recorder, sleeps, label_selector=PROXY_LABEL_SELECTOR, page_size=2)
    )
    assert lw.wait_synced(5.0)
    calls = recorder.wait_for(4)
    assert calls == [
        ("replace", ["a", "b", "c"]),
        ("ADDED", "d"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    wait_until(lambda: lw.resource_version == "16")

    first, second, watch = fake_api.requests[:3]
    assert first.params == {"labelSelector": PROXY_LABEL_SELECTOR, "limit": "2"}
    assert second.params == {**first.params, "continue": "next-page"}
    assert watch.params == {
        "labelSelector": PROXY_LABEL_SELECTOR,
        "watch": "true",
        "resourceVersion": "10",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "450",  # watch_timeout 300 * (1 + rand 0.5)
    }
    assert "sendInitialEvents" not in watch.params
    assert sleeps.delays == []
    assert recorder.gc_enabled_in_replace == [False]  # the bulk hand-over runs with the GC off
    assert gc.isenabled()


def test_has_synced_only_after_the_last_page(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    # The second page fails once: nothing reaches the consumer until a whole list has arrived.
    fake_api.on_list(
        PATH,
        page(["a"], "5", cont="p2"),
        Json(status_body(500, "boom"), 500),
        page(["a"], "6", cont="p2"),
        page(["b"], "6"),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert lw.wait_synced(5.0)
    assert recorder.calls == [("replace", ["a", "b"])]
    lists = fake_api.requests_for(PATH, watch=False)
    # After the failure the list starts again from the first page.
    assert [r.params.get("continue") for r in lists] == [None, "p2", None, "p2"]
    assert sleeps.delays == [0.2]
    assert lw.lists == 1


def test_dropped_watch_resumes_from_the_last_event_without_relisting(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"))
    fake_api.on_watch(
        PATH,
        Stream([event("ADDED", "b", "6"), bookmark("9")], end="drop"),
        Stream([event("ADDED", "c", "10")], end="close"),  # a server-side timeout
        Stream([event("DELETED", "a", "11")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(4) == [
        ("replace", ["a"]),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("DELETED", "a"),
    ]
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches] == ["5", "9", "10"]
    assert len(fake_api.requests_for(PATH, watch=False)) == 1
    assert sleeps.delays == []  # each stream made progress: reconnect at once
    assert lw.lists == 1


def test_gone_event_relists_and_replaces_the_whole_set(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, page(["a", "b"], "5"), page(["a", "c"], "50"))
    fake_api.on_watch(
        PATH,
        Stream([event("MODIFIED", "a", "6"), gone()], end="close"),
        Stream([event("ADDED", "d", "51")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    # b was deleted and c created while the watch was away: the replace carries the new set.
    assert recorder.wait_for(4) == [
        ("replace", ["a", "b"]),
        ("MODIFIED", "a"),
        ("replace", ["a", "c"]),
        ("ADDED", "d"),
    ]
    lists = fake_api.requests_for(PATH, watch=False)
    assert [r.params for r in lists] == [{"limit": "5000"}, {"limit": "5000"}]
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches] == ["5", "50"]
    assert sleeps.delays == [0.2]  # the relist backoff, reset by the event before the 410
    assert lw.lists == 2


def test_gone_http_status_on_the_watch_request_relists(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"), page(["b"], "70"))
    fake_api.on_watch(PATH, Json(status_body(410, "too old resource version"), status=410))
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(2) == [("replace", ["a"]), ("replace", ["b"])]
    wait_until(lambda: len(fake_api.requests_for(PATH, watch=True)) == 2)
    assert fake_api.requests_for(PATH, watch=True)[1].params["resourceVersion"] == "70"
    assert lw.lists == 2


def test_repeated_gone_right_after_each_list_backs_off(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    """No progress between relists: the relist backoff grows instead of spinning."""
    for rv in ("1", "2", "3", "4"):
        fake_api.on_list(PATH, page(["a"], rv))
        fake_api.on_watch(PATH, Stream([gone()], end="close"))
    fake_api.on_list(PATH, page(["a"], "5"))
    lw = running(list_watch(conn, recorder, sleeps))
    wait_until(lambda: lw.lists == 5)
    assert sleeps.delays == [0.2, 0.4, 0.8, 1.0]


def test_connection_refused_backs_off_exponentially_and_stops(
    recorder: Recorder, sleeps: Sleeps
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = ApiConnection(urllib3.PoolManager(), f"http://127.0.0.1:{port}")
    lw = list_watch(conn, recorder, sleeps)
    sleeps.on_sleep = lambda n: lw.request_stop() if n == 6 else None
    lw.run()  # in this thread: returns once stopped
    conn.close()
    assert sleeps.delays == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert recorder.calls == []
    assert not lw.has_synced()


def test_server_errors_on_the_watch_back_off_and_resume_from_the_same_version(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"))
    fake_api.on_watch(
        PATH,
        Json(status_body(503, "unavailable"), status=503),
        Json(status_body(429, "too many requests"), status=429),
        Stream([], end="close"),  # ended with no event at all: also backs off
        Stream([{"type": "ERROR", "object": status_body(500, "internal error")}], end="close"),
        Stream([event("ADDED", "b", "6")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(2) == [("replace", ["a"]), ("ADDED", "b")]
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches] == ["5"] * 5
    assert sleeps.delays == [0.2, 0.4, 0.8, 1.0]
    assert lw.lists == 1


def test_a_malformed_list_is_retried(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, Json({"kind": "ServiceList", "items": []}), page(["a"], "5"))
    lw = running(list_watch(conn, recorder, sleeps))
    assert lw.wait_synced(5.0)
    assert recorder.calls == [("replace", ["a"])]
    assert sleeps.delays == [0.2]


def test_a_failing_consumer_gets_a_fresh_replace(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder, sleeps: Sleeps, running: Any
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"), page(["a", "b"], "7"))
    fake_api.on_watch(PATH, Stream([event("ADDED", "b", "6")]), Stream([]))
    recorder.fail_next_event = True
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(2) == [("replace", ["a"]), ("replace", ["a", "b"])]
    assert sleeps.delays == [0.2]
    assert lw.lists == 2


def test_stop_unblocks_a_watch_that_is_waiting_for_events(
    fake_api: FakeApi, conn: ApiConnection, recorder: Recorder
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"))
    lw = ListWatch(conn, PATH, recorder)  # real sleep: the stop event
    lw.start()
    assert lw.wait_synced(5.0)
    wait_until(lambda: len(fake_api.requests_for(PATH, watch=True)) == 1)
    time.sleep(0.1)  # let the loop block in its read
    started = time.monotonic()
    assert lw.stop(5.0)
    assert time.monotonic() - started < 1.0


def test_stop_interrupts_a_backoff_wait(recorder: Recorder) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = ApiConnection(urllib3.PoolManager(), f"http://127.0.0.1:{port}")
    lw = ListWatch(conn, PATH, recorder, backoff=BackoffPolicy(initial=60.0, maximum=60.0))
    lw.start()
    time.sleep(0.2)  # in its first 60 s backoff by now
    started = time.monotonic()
    assert lw.stop(5.0)
    assert time.monotonic() - started < 1.0
    conn.close()


# --- faults in what arrives: the stream cut, garbage, HTML, truncated JSON ----------------
#
# Each fault must end in: a log line naming the resource and the fault, no exception out of the
# loop (the catch-all "failed unexpectedly" is not a handling), nothing wrong or partial handed
# to the consumer, and the watch resumed from the last good resourceVersion.


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """The structured log lines (ListWatches bind their logger when built: build them inside)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


def warnings_for(logs: list[MutableMapping[str, Any]], text: str) -> list[MutableMapping[str, Any]]:
    found = [e for e in logs if text in e["event"] and e.get("resource") == PATH]
    assert not [e for e in logs if "unexpectedly" in e["event"]], logs
    return found


def line(event_: dict[str, Any]) -> bytes:
    return json.dumps(event_).encode() + b"\n"


@pytest.mark.parametrize("unframed", [False, True], ids=["chunked", "until-close"])
@pytest.mark.parametrize("end", ["cut", "reset"])
@pytest.mark.parametrize("cut_at", ["half", "before-newline"])
def test_a_watch_cut_mid_event_applies_nothing_of_it_and_resumes(
    fake_api: FakeApi,
    conn: ApiConnection,
    *,  # fixtures are passed by name; keyword-only keeps PLR0917 meaningful elsewhere
    recorder: Recorder,
    sleeps: Sleeps,
    running: Any,
    logs: list[MutableMapping[str, Any]],
    end: Literal["cut", "reset"],
    cut_at: str,
    unframed: bool,
) -> None:
    """Cut inside an event, even just before its newline (the bytes then parse as a whole
    event): the event is not applied from the broken stream but asked for again. Chunked, the
    cut is an HTTP error; with no framing (a body that ends with the connection, as an HTTP/1.0
    proxy sends it) only the missing newline tells."""
    whole = line(event("ADDED", "c", "7"))
    partial = whole[: len(whole) // 2] if cut_at == "half" else whole[:-1]
    fake_api.on_list(PATH, page(["a"], "5"))
    fake_api.on_watch(
        PATH,
        Raw(partial, end=end, chunked=not unframed, declared=-1 if unframed else None),
        Stream([event("ADDED", "c", "7"), event("DELETED", "a", "8")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(3) == [("replace", ["a"]), ("ADDED", "c"), ("DELETED", "a")]
    wait_until(lambda: lw.resource_version == "8")
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches] == ["5", "5"]
    assert lw.lists == 1  # resumed, not relisted
    assert sleeps.delays == [0.2]  # no event came through: the reconnect backs off
    if end == "cut":
        assert warnings_for(logs, "cut mid-event")
    else:  # the reset may be seen before the bytes it follows
        assert warnings_for(logs, "cut mid-event") or warnings_for(logs, "stream broken")


@pytest.mark.parametrize(
    "garbage",
    [
        b"this is not json",
        b'["a", "list"]',
        b'{"type": "ADDED"}',
        b'{"type": "ADDED", "object": "a string"}',
        b'{"type": "MODIFIED", "object": {"kind": "Service"}}',
        b'{"type": "DELETED", "object": {"metadata": ["not", "a", "map"]}}',
        b'{"type": "BOOKMARK", "object": {"kind": "Service"}}',
        b'{"type": "ERROR", "object": "gateway timeout"}',
        b'{"object": {"metadata": {"name": "x", "resourceVersion": "7"}}}',
    ],
)
def test_a_malformed_watch_line_is_not_applied_and_the_watch_resumes_before_it(
    fake_api: FakeApi,
    conn: ApiConnection,
    *,  # fixtures are passed by name; keyword-only keeps PLR0917 meaningful elsewhere
    recorder: Recorder,
    sleeps: Sleeps,
    running: Any,
    logs: list[MutableMapping[str, Any]],
    garbage: bytes,
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"))
    fake_api.on_watch(
        PATH,
        # The event after the garbage is never read from this stream: it comes again after it.
        Raw(line(event("ADDED", "b", "6")) + garbage + b"\n" + line(event("ADDED", "c", "7"))),
        Stream([event("ADDED", "c", "7")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(3) == [("replace", ["a"]), ("ADDED", "b"), ("ADDED", "c")]
    wait_until(lambda: lw.resource_version == "7")
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches] == ["5", "6"]
    assert lw.lists == 1  # a garbled event is not the consumer's failure: no relist
    assert sleeps.delays == []  # an event came before the garbage: progress, resume at once
    (warning,) = warnings_for(logs, "malformed watch event")
    assert warning["resource_version"] == "6"
    assert garbage[:20].decode() in warning["line"]


def test_unknown_event_types_bookmarks_and_error_events(
    fake_api: FakeApi,
    conn: ApiConnection,
    *,  # fixtures are passed by name; keyword-only keeps PLR0917 meaningful elsewhere
    recorder: Recorder,
    sleeps: Sleeps,
    running: Any,
    logs: list[MutableMapping[str, Any]],
) -> None:
    fake_api.on_list(PATH, page(["a"], "5"))
    fake_api.on_watch(
        PATH,
        Stream(
            [
                event("ADDED", "b", "6"),
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": ""}}},
                {"type": "SURPRISE", "object": obj("x", "7")},  # skipped, its version kept
                {"type": "SURPRISE", "object": {}},
                event("MODIFIED", "a", "8"),
            ],
            end="close",
        ),
        Stream([{"type": "ERROR", "object": status_body(500, "etcd leader changed")}], "close"),
        Stream([{"type": "ERROR", "object": {"code": "weird"}}], end="close"),
        Stream([event("DELETED", "b", "9")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(4) == [
        ("replace", ["a"]),
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    wait_until(lambda: lw.resource_version == "9")
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches] == ["5", "8", "8", "8"]
    assert sleeps.delays == [0.2, 0.4]  # the two error events: no progress, back off
    assert lw.lists == 1
    unknown = warnings_for(logs, "unknown watch event type")
    assert [e["event_type"] for e in unknown] == ["'SURPRISE'", "'SURPRISE'"]
    errors = warnings_for(logs, "watch error event")
    assert [e["error"] for e in errors] == [
        "ERROR event 500: etcd leader changed",
        "ERROR event weird: ",
    ]


HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body>\r\n"
    b"</html>\r\n"
)


def test_an_html_error_page_on_list_and_watch_is_retried(
    fake_api: FakeApi,
    conn: ApiConnection,
    *,  # fixtures are passed by name; keyword-only keeps PLR0917 meaningful elsewhere
    recorder: Recorder,
    sleeps: Sleeps,
    running: Any,
    logs: list[MutableMapping[str, Any]],
) -> None:
    """A proxy in front of the API server answers with its own HTML: as an error status, and
    (a captive portal, a misrouted request) as a 200."""
    html = {"content_type": "text/html", "chunked": False}
    fake_api.on_list(
        PATH, Raw(HTML_502, status=502, **html), Raw(HTML_502, **html), page(["a"], "5")
    )
    fake_api.on_watch(
        PATH,
        Raw(HTML_502, status=502, **html),
        Raw(HTML_502, content_type="text/html"),  # a 200, chunked: read as lines
        Stream([event("ADDED", "b", "6")]),
    )
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(2) == [("replace", ["a"]), ("ADDED", "b")]
    # Once the last stream has ended the watch goes on (from "6"), and what it does next may
    # already have happened; and a pooled connection the fake closed after an unframed body
    # can cost one more failed attempt (and backoff step) before the next answer. So only
    # what led up to the event is asserted, in order.
    watches = fake_api.requests_for(PATH, watch=True)
    assert [w.params["resourceVersion"] for w in watches][:3] == ["5", "5", "5"]
    assert sleeps.delays[:2] == [0.2, 0.4]  # backing off, not spinning
    assert lw.lists == 1
    failed = warnings_for(logs, "API request failed")
    actions = [e["action"] for e in failed]
    assert actions[:2] == ["list", "list"]
    assert "watch" in actions
    errors = [e["error"] for e in failed]
    assert "HTTP 502: <html>" in errors[0]
    assert any("malformed list response" in e for e in errors if e)
    assert any("502 Bad Gateway" in e for e, a in zip(errors, actions, strict=True) if a == "watch")
    assert warnings_for(logs, "malformed watch event")


def test_a_truncated_list_never_reaches_the_consumer(
    fake_api: FakeApi,
    conn: ApiConnection,
    *,  # fixtures are passed by name; keyword-only keeps PLR0917 meaningful elsewhere
    recorder: Recorder,
    sleeps: Sleeps,
    running: Any,
    logs: list[MutableMapping[str, Any]],
) -> None:
    """A relist (after 410) whose second page breaks: the consumer keeps what it had (a partial
    replace would delete b) until a whole list has arrived."""
    second = json.dumps(page(["b", "c"], "50").body).encode()
    fake_api.on_list(
        PATH,
        page(["a", "b"], "5"),
        page(["a"], "50", cont="p2"),
        Raw(second[: len(second) // 2], chunked=False, end="cut", declared=len(second)),
        page(["a"], "50", cont="p2"),
        Raw(second[: len(second) // 2], chunked=False),  # a whole body, of truncated JSON
        page(["a"], "50", cont="p2"),
        Json({"kind": "ServiceList", "metadata": {"resourceVersion": "50"}, "items": {"b": 1}}),
        page(["a"], "50", cont="p2"),
        page(["b", "c"], "50"),
    )
    fake_api.on_watch(PATH, Stream([gone()], end="close"), Stream([event("ADDED", "d", "51")]))
    lw = running(list_watch(conn, recorder, sleeps))
    assert recorder.wait_for(3) == [
        ("replace", ["a", "b"]),
        ("replace", ["a", "b", "c"]),
        ("ADDED", "d"),
    ]
    lists = fake_api.requests_for(PATH, watch=False)
    assert [r.params.get("continue") for r in lists] == [None] + [None, "p2"] * 4
    assert lw.lists == 2
    failed = warnings_for(logs, "API request failed")
    assert [e["action"] for e in failed] == ["list"] * 3
    assert "ProtocolError" in failed[0]["error"]
    assert "malformed list response" in failed[1]["error"]
    assert "malformed list response" in failed[2]["error"]


# --- KubeSource: three ListWatches, one consumer ------------------------------------------


class KindRecorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, list[str] | str]] = []

    def on_replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        with self.lock:
            self.calls.append((kind, "replace", sorted(o["metadata"]["name"] for o in objects)))

    def on_event(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append((kind, event_type, obj["metadata"]["name"]))


def test_kube_source_watches_the_three_kinds_with_kube_proxys_selectors(
    fake_api: FakeApi, conn: ApiConnection
) -> None:
    fake_api.on_list(SERVICES_PATH, page(["svc"], "3"))
    fake_api.on_list(ENDPOINT_SLICES_PATH, page(["svc-abc"], "3"))
    fake_api.on_list(NODES_PATH, page(["node-a"], "3"))
    fake_api.on_watch(ENDPOINT_SLICES_PATH, Stream([event("MODIFIED", "svc-abc", "4")]))
    consumer = KindRecorder()
    source = KubeSource(None, "node-a", consumer, api=conn)
    assert not source.has_synced()
    source.start()
    try:
        assert source.wait_synced(5.0)
        assert source.has_synced()
        wait_until(lambda: len(consumer.calls) == 4)
    finally:
        assert source.stop(5.0)
    assert sorted(consumer.calls) == [
        ("EndpointSlice", "MODIFIED", "svc-abc"),
        ("EndpointSlice", "replace", ["svc-abc"]),
        ("Node", "replace", ["node-a"]),
        ("Service", "replace", ["svc"]),
    ]
    selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    for path in (SERVICES_PATH, ENDPOINT_SLICES_PATH):
        for request in fake_api.requests_for(path):
            assert request.params["labelSelector"] == selector
            assert "fieldSelector" not in request.params
    for request in fake_api.requests_for(NODES_PATH):
        assert request.params["fieldSelector"] == "metadata.name=node-a"
        assert "labelSelector" not in request.params


def test_wait_synced_times_out_while_a_kind_cannot_be_listed(
    fake_api: FakeApi, conn: ApiConnection
) -> None:
    fake_api.on_list(SERVICES_PATH, page(["svc"], "3"))
    fake_api.on_list(NODES_PATH, page(["node-a"], "3"))  # no EndpointSlices: 500s
    source = KubeSource(None, "node-a", KindRecorder(), api=conn)
    source.start()
    try:
        assert not source.wait_synced(0.5)
        assert not source.has_synced()
        assert source.watches["Service"].has_synced()
    finally:
        assert source.stop(5.0)


# --- configuration and authentication through the official client -------------------------


def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(config))
    return path


def test_kubeconfig_token_is_sent_on_lists_and_watches(
    fake_api: FakeApi, recorder: Recorder, sleeps: Sleeps, tmp_path: Path
) -> None:
    fake_api.token = "s3cret-token"  # noqa: S105 - a test token
    fake_api.on_list(PATH, page(["a"], "5"))
    fake_api.on_watch(PATH, Stream([event("ADDED", "b", "6")]))
    api = connect(str(write_kubeconfig(tmp_path / "kubeconfig", fake_api.url, "s3cret-token")))
    lw = ListWatch(api, PATH, recorder, sleep=sleeps)
    lw.start()
    try:
        assert recorder.wait_for(2) == [("replace", ["a"]), ("ADDED", "b")]
    finally:
        assert lw.stop(5.0)
        api.close()
    assert all(r.headers["authorization"] == "Bearer s3cret-token" for r in fake_api.requests)
    assert sleeps.delays == []


def test_wrong_token_is_retried_not_fatal(
    fake_api: FakeApi, recorder: Recorder, sleeps: Sleeps, tmp_path: Path
) -> None:
    fake_api.token = "right"  # noqa: S105 - a test token
    api = connect(str(write_kubeconfig(tmp_path / "kubeconfig", fake_api.url, "wrong")))
    lw = ListWatch(api, PATH, recorder, sleep=sleeps, backoff=NO_JITTER)
    sleeps.on_sleep = lambda n: lw.request_stop() if n == 3 else None
    lw.run()
    api.close()
    assert sleeps.delays == [0.2, 0.4, 0.8]
    assert recorder.calls == []


def test_bad_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load Kubernetes client configuration"):
        load_configuration(str(tmp_path / "missing"))
    (tmp_path / "garbage").write_text("{not: [yaml")
    with pytest.raises(ConfigError):
        load_configuration(str(tmp_path / "garbage"))


def test_in_cluster_configuration_outside_a_cluster_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="in-cluster"):
        load_configuration(None)


def test_kubeconfig_client_certificate_and_ca_reach_the_pool(tmp_path: Path) -> None:
    """TLS material from the kubeconfig ends up in the urllib3 pool the watches use."""
    fake_pem = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority-data": fake_pem.decode(),
                },
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate-data": fake_pem.decode(),
                    "client-key-data": fake_pem.decode(),
                },
            }
        ],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(config))
    api = connect(str(tmp_path / "kubeconfig"))
    try:
        assert api.server == "https://127.0.0.1:6443"
        kw = api.pool.connection_pool_kw
        assert kw["cert_reqs"] is not None
        assert Path(kw["ca_certs"] or "").is_file()
        assert Path(kw["cert_file"] or "").is_file()
        assert Path(kw["key_file"] or "").is_file()
    finally:
        api.close()
