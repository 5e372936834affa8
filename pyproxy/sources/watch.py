"""A thin list+watch of one Kubernetes resource path, over urllib3, decoded with orjson.

Why not the official client's `Watch.stream`: it decodes into the client's model classes (several
times slower than orjson, see docs on decoding cost), and on 410 Gone it retries once with the same
stale resourceVersion and then raises, so the caller has to relist anyway. This module is the small
part of client-go's reflector that a proxy needs, and nothing else:

    run()                       forever, until stop(): the retry policy below
    └── _list()                 paginated GET (limit, continue) → handler.on_replace(all objects)
    └── _watch()                GET ?watch=1 from the last resourceVersion, bookmarks on
        └── _lines()            the chunked body split into JSON lines

- Every event (ADDED, MODIFIED, DELETED and BOOKMARK) advances the resourceVersion, so a dropped
  or timed-out watch resumes where it stopped without a relist.
- 410 Gone (as the HTTP status or as an ERROR event with code 410) means the resourceVersion has
  been compacted away: events were lost, so list again and hand the consumer the whole new set
  (`on_replace`), which also removes objects deleted while we were away.
- Connection errors, 5xx and 429 are retried with exponential backoff and jitter, resuming the
  watch from the last resourceVersion (a relist only if that version has expired meanwhile).
  Two backoffs keep this free of hot loops: `reconnect` for an unreachable or failing server
  (reset by a complete list or a watch event) and `relist` for 410s and consumer failures (reset
  only by a watch event, so "list, 410, list, 410" slows down instead of spinning).
- Faults in what arrives are never applied (the watch stream is the only record of changes, and
  the consumer programs from it): a body cut before an event's newline, a line that is not a
  JSON event, an event whose object is not an object with metadata, a list that is not a
  complete ListMeta+items document (an HTML error page from a proxy, truncated JSON). Each is
  logged with the resource and the fault, and the watch resumes from the last resourceVersion
  that was handed over (the failed list is retried from its first page), so the event that
  broke is asked for again and nothing the consumer has is dropped on the way. An event of an
  unknown type is logged and skipped, as client-go's reflector does.
- List pages are decoded, and the whole list handed to the consumer, with the cyclic GC paused
  (`pyproxy.gcpause.gc_paused`): it would otherwise double the cost of a 10,000-object relist.
- Streaming lists (`sendInitialEvents=true`) are never used: they need etcd's watch-progress
  support, which not every cluster has.

Threads: `start()` runs the loop in a daemon thread and calls the handler from it. `stop()` sets
an event and shuts down the socket of the request in flight, so a blocked read returns at once.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
import structlog
import urllib3

from pyproxy.errors import PyproxyError
from pyproxy.gcpause import gc_paused

logger = structlog.get_logger("pyproxy.sources.watch")

ApiObject = dict[str, Any]
"""One decoded API object (a Service, an EndpointSlice, a Node ...), as orjson returns it."""

_READ_SIZE: Final = 256 * 1024
#: Objects per list page, for the proxy's list+watch and for `pyproxy explain`'s one-shot lists.
#: client-go's reflector asks for 500 but lists from the watch cache (resourceVersion=0), which
#: ignores the limit; 20 sequential pages of 500 EndpointSlices cost kube-apiserver twice the
#: time of 2 pages of 5,000 (0.83 s against 0.43 s at 10,000 slices).
LIST_PAGE_SIZE: Final = 5000
#: Read timeout of one list page.
LIST_READ_TIMEOUT: Final = 60.0
# The server ends a watch after timeoutSeconds; no byte for this much longer means a dead peer.
_WATCH_READ_GRACE: Final = 30.0
# The event types whose object is an API object (with metadata.resourceVersion).
_OBJECT_EVENTS: Final = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")


class WatchHandler(Protocol):
    """What a ListWatch feeds. Called from the ListWatch's own thread, one call at a time."""

    def on_replace(self, objects: list[ApiObject]) -> None:
        """The complete current set of objects (first list, or a relist after 410 Gone)."""

    def on_event(self, event_type: str, obj: ApiObject) -> None:
        """One change: event_type is "ADDED", "MODIFIED" or "DELETED"."""


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential backoff: initial, initial*factor, ... capped at maximum, each ± jitter."""

    initial: float = 0.2
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2  # fraction of the delay, both ways


DEFAULT_BACKOFF: Final = BackoffPolicy()


class Backoff:
    """The retry delays of one failure stream; `reset()` when things work again."""

    def __init__(self, policy: BackoffPolicy, rand: Callable[[], float] = random.random) -> None:
        self._policy = policy
        self._rand = rand
        self._next = policy.initial

    def next(self) -> float:
        base = self._next
        self._next = min(base * self._policy.factor, self._policy.maximum)
        jitter = self._policy.jitter
        return base * (1.0 - jitter + 2.0 * jitter * self._rand())

    def reset(self) -> None:
        self._next = self._policy.initial


class MalformedList(PyproxyError):
    """A list page that is not a Kubernetes list (JSON with `metadata.resourceVersion`)."""


def list_pages(
    fetch: Callable[[Mapping[str, str]], bytes],
    params: Mapping[str, str],
    page_size: int = LIST_PAGE_SIZE,
) -> tuple[list[ApiObject], str]:
    """Every item of a paginated list, and the list's resourceVersion.

    The one pager of the project (the proxy's list+watch, `pyproxy explain`): GET with `limit`,
    then with each `continue` token until the server gives none. `fetch` GETs one page with
    the given query parameters and returns its body; its errors are the caller's own. Pages
    are decoded with the cyclic GC paused (`gc_paused`). Raises MalformedList.
    """
    items: list[ApiObject] = []
    query = {**params, "limit": str(page_size)}
    while True:
        body = fetch(query)
        try:
            with gc_paused():
                page = orjson.loads(body)
            page_items = page.get("items") or []
            metadata = page["metadata"]
            resource_version: str = metadata["resourceVersion"]
            continue_token = metadata.get("continue") or ""
            # A page the consumer cannot take whole must not reach it: on_replace drops every
            # object not in the list, so a partial or garbled list would delete rules.
            if not (
                isinstance(page_items, list)
                and all(isinstance(item, dict) for item in page_items)
                and isinstance(resource_version, str)
                and resource_version
                and isinstance(continue_token, str)
            ):
                raise TypeError("items is not a list of objects or metadata is incomplete")
            items.extend(page_items)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
            raise MalformedList(
                f"malformed list response: {err!r}; body starts {body[:80]!r}"
            ) from err
        if not continue_token:
            return items, resource_version
        query["continue"] = continue_token


class ApiConnection:
    """How to reach one API server: a urllib3 pool (TLS, client certificates, proxy already set
    up by whoever built it), the server URL and a function giving the auth headers per request
    (so refreshed tokens are picked up)."""

    def __init__(
        self,
        pool: urllib3.PoolManager,
        server: str,
        headers: Callable[[], Mapping[str, str]] | None = None,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        self.pool = pool
        self.server = server.rstrip("/")
        self._headers = headers
        self.connect_timeout = connect_timeout

    def get(
        self, path: str, params: Mapping[str, str], *, read_timeout: float
    ) -> urllib3.BaseHTTPResponse:
        """Start a GET and return the response with its body unread (the caller closes it).

        Raises urllib3.exceptions.HTTPError (connection refused, TLS, timeouts) or OSError.
        """
        headers = {"Accept": "application/json", "User-Agent": "pyproxy"}
        if self._headers is not None:
            headers.update(self._headers())
        query = urllib.parse.urlencode(params)
        return self.pool.request(
            "GET",
            f"{self.server}{path}?{query}" if query else f"{self.server}{path}",
            headers=headers,
            preload_content=False,
            retries=False,  # retries are ListWatch's business (backoff, resourceVersion)
            timeout=urllib3.Timeout(connect=self.connect_timeout, read=read_timeout),
        )

    def close(self) -> None:
        """Close the idle connections of the pool."""
        self.pool.clear()


# --- why a list or watch ended early (never leave this module) ----------------------------


class _Expired(Exception):
    """410 Gone: the resourceVersion (or continue token) is too old; relist."""


class _Unavailable(Exception):
    """The server could not be reached or answered with an error; retry later."""


class _HandlerFailed(Exception):
    """The consumer raised; relist so it gets a consistent set again."""


class _Stopped(Exception):
    """stop() was called."""


class _CutMidEvent(Exception):
    """The watch body ended or broke inside an event (bytes after the last newline)."""


def _status_message(status: int, body: bytes) -> str:
    """The `message` of a metav1.Status body, or the start of the body."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        return f"HTTP {status}: {decoded['message']}"
    return f"HTTP {status}: {body[:200].decode(errors='replace')}"


class ListWatch:
    """List, then watch, one resource path (`/api/v1/services`, ...), forever, until stopped.

    `sleep` (default: an interruptible wait on the stop event) and `rand` (jitter and the watch
    timeout spread) are injectable so tests can check the retry policy without waiting.
    """

    def __init__(
        self,
        api: ApiConnection,
        path: str,
        handler: WatchHandler,
        *,
        label_selector: str = "",
        field_selector: str = "",
        page_size: int = LIST_PAGE_SIZE,
        watch_timeout: float = 300.0,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        sleep: Callable[[float], object] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.api = api
        self.path = path
        self.handler = handler
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self._sleep = sleep
        self._rand = rand
        self._reconnect = Backoff(backoff, rand)
        self._relist = Backoff(backoff, rand)
        self._resource_version = ""
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._thread: threading.Thread | None = None
        self._log = logger.bind(resource=path)
        self.lists = 0  # completed lists, for tests and metrics

    # --- public -------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The last resourceVersion seen (from a list or any watch event); "" before the first."""
        return self._resource_version

    def has_synced(self) -> bool:
        """True once the first complete list has been handed to the handler (stays true)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"ListWatch {self.path} already started")
        self._thread = threading.Thread(target=self.run, name=f"watch {self.path}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the loop and unblock its read; True when the thread has ended within timeout."""
        self.request_stop()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def request_stop(self) -> None:
        """Ask the loop to end without waiting for it (to stop several ListWatches at once)."""
        self._stopping.set()
        with self._lock:
            response = self._response
        if response is not None:
            # The blocked read in the loop's thread returns now. ValueError/RuntimeError: the
            # response was already closed or released, so nothing is blocked on it.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                response.shutdown()

    def run(self) -> None:
        """The loop (in the caller's thread); returns after stop()."""
        relist = True
        while not self._stopping.is_set():
            try:
                if relist:
                    self._list()
                    relist = False
                    self._reconnect.reset()
                if self._watch():
                    continue  # it ended (server timeout, dropped) after events: resume at once
                delay = self._reconnect.next()
                self._log.debug("watch ended without events", retry_in=round(delay, 2))
            except _Stopped:
                break
            except _Expired as err:
                relist = True
                delay = self._relist.next()
                self._log.info("resourceVersion expired, relisting", reason=str(err))
            except _Unavailable as err:
                delay = self._reconnect.next()
                self._log.warning(
                    "API request failed",
                    action="list" if relist else "watch",
                    error=str(err),
                    retry_in=round(delay, 2),
                )
            except _HandlerFailed as err:
                relist = True
                delay = self._relist.next()
                self._log.error(
                    "consumer failed; relisting", retry_in=round(delay, 2), exc_info=err.__cause__
                )
            except Exception as err:
                # A bug here must not end the thread silently (has_synced would stay false, or
                # the state would freeze): say so loudly and start over from a list.
                relist = True
                delay = self._relist.next()
                self._log.error(
                    "list+watch failed unexpectedly; relisting",
                    retry_in=round(delay, 2),
                    exc_info=err,
                )
            self._wait(delay)
        self._log.debug("stopped")

    # --- the pieces ---------------------------------------------------------------------

    def _wait(self, delay: float) -> None:
        if self._sleep is not None:
            self._sleep(delay)
        else:
            self._stopping.wait(delay)

    def _selectors(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        return params

    def _open(self, params: Mapping[str, str], read_timeout: float) -> urllib3.BaseHTTPResponse:
        """GET, registered for stop(); raises _Expired on 410, _Unavailable on other errors."""
        if self._stopping.is_set():
            raise _Stopped
        try:
            response = self.api.get(self.path, params, read_timeout=read_timeout)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if self._stopping.is_set():
                raise _Stopped from err
            raise _Unavailable(f"{type(err).__name__}: {err}") from err
        with self._lock:
            self._response = response
            stopping = self._stopping.is_set()
        if stopping:
            self._close(response)
            raise _Stopped
        if response.status != 200:
            try:
                body = response.read()
            except (urllib3.exceptions.HTTPError, OSError):
                body = b""
            self._close(response)
            message = _status_message(response.status, body)
            if response.status == 410:
                raise _Expired(message)
            raise _Unavailable(message)
        return response

    def _close(self, response: urllib3.BaseHTTPResponse) -> None:
        with self._lock:
            if self._response is response:
                self._response = None
        response.close()

    def _list(self) -> None:
        """All pages of the list to the handler at once; then watch from the list's RV."""
        started = time.monotonic()

        def fetch(params: Mapping[str, str]) -> bytes:
            response = self._open(params, LIST_READ_TIMEOUT)
            try:
                return response.read()
            except (urllib3.exceptions.HTTPError, OSError) as err:
                raise self._read_failed(err) from err
            finally:
                self._close(response)

        try:
            items, resource_version = list_pages(fetch, self._selectors(), self.page_size)
        except MalformedList as err:
            raise _Unavailable(str(err)) from err
        if self._stopping.is_set():
            raise _Stopped
        try:
            with gc_paused():  # the consumer converts the whole list into its model here
                self.handler.on_replace(items)
        except Exception as err:
            raise _HandlerFailed from err
        self._resource_version = resource_version
        self.lists += 1
        self._synced.set()
        self._log.info(
            "listed",
            objects=len(items),
            resource_version=resource_version,
            elapsed=round(time.monotonic() - started, 3),
        )

    def _read_failed(self, err: BaseException) -> Exception:
        if self._stopping.is_set():
            return _Stopped()
        return _Unavailable(f"{type(err).__name__}: {err}")

    def _watch(self) -> bool:
        """One watch request from the current resourceVersion, until the server ends it or the
        connection breaks. Returns whether any event arrived (progress). Raises _Expired on 410."""
        # client-go's spread: between watch_timeout and twice that, so watchers don't reconnect
        # in lockstep after an API server restart.
        timeout_seconds = int(self.watch_timeout * (1.0 + self._rand()))
        params = self._selectors()
        params.update(
            watch="true",
            resourceVersion=self._resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        response = self._open(params, timeout_seconds + _WATCH_READ_GRACE)
        progress = False
        try:
            for line in _lines(response):
                if self._stopping.is_set():
                    raise _Stopped
                try:
                    event = orjson.loads(line)
                    event_type = event["type"]
                    obj = event["object"]
                    if not isinstance(obj, dict):
                        raise TypeError(f"object is {type(obj).__name__}, not an object")
                    metadata = obj.get("metadata")
                    if event_type in _OBJECT_EVENTS and not isinstance(metadata, dict):
                        raise TypeError(f"{event_type} object has no metadata")
                except (orjson.JSONDecodeError, KeyError, TypeError) as err:
                    # Skipping it would lose a change for good; resuming from the last good
                    # resourceVersion asks for this event again (with backoff if it recurs).
                    self._log.warning(
                        "malformed watch event; resuming from the last resourceVersion",
                        error=repr(err),
                        line=line[:120].decode(errors="replace"),
                        resource_version=self._resource_version,
                    )
                    return progress
                if event_type == "ERROR":
                    code = obj.get("code")
                    message = f"ERROR event {code}: {obj.get('message', '')}"
                    if code == 410:
                        raise _Expired(message)
                    self._log.warning("watch error event; reconnecting", error=message)
                    return progress
                if not progress:
                    progress = True
                    self._reconnect.reset()
                    self._relist.reset()
                resource_version = metadata.get("resourceVersion") if metadata else None
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    try:
                        self.handler.on_event(event_type, obj)
                    except Exception as err:
                        raise _HandlerFailed from err
                elif event_type != "BOOKMARK":
                    self._log.warning(
                        "unknown watch event type ignored", event_type=repr(event_type)[:40]
                    )
                if isinstance(resource_version, str) and resource_version:
                    self._resource_version = resource_version
        except _CutMidEvent as err:
            if self._stopping.is_set():
                raise _Stopped from err
            self._log.warning(
                "watch stream cut mid-event; resuming from the last resourceVersion",
                error=str(err),
                resource_version=self._resource_version,
            )
        except (urllib3.exceptions.HTTPError, OSError) as err:
            failure = self._read_failed(err)
            if isinstance(failure, _Stopped):
                raise failure from err
            self._log.info(
                "watch stream broken; resuming from the last resourceVersion",
                error=str(failure),
                progress=progress,
                resource_version=self._resource_version,
            )
        finally:
            self._close(response)
        return progress


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The non-empty lines of a streamed body, each as soon as its newline has arrived.

    Raises _CutMidEvent when the body ends or breaks after bytes with no newline: the API server
    ends every event with one, so those bytes are the start of an event whose connection was cut
    (they may even parse, as a prefix of a number does, and must not be applied).

    `read1` returns what one chunk of the chunked body holds instead of waiting for a full
    buffer, so an event is seen when the server flushes it, not when 256 KiB have piled up.
    """
    buffer = b""
    while True:
        try:
            data = response.read1(_READ_SIZE)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if buffer.strip():
                raise _CutMidEvent(
                    f"the stream broke {len(buffer)} bytes into an event: {err}"
                ) from err
            raise
        if not data:
            break
        buffer += data
        start = 0
        end = buffer.find(b"\n")
        while end >= 0:
            if end > start:
                yield buffer[start:end]
            start = end + 1
            end = buffer.find(b"\n", start)
        buffer = buffer[start:]
    if buffer.strip():
        raise _CutMidEvent(f"the body ended {len(buffer)} bytes into an event")
