"""When to sync: upstream's BoundedFrequencyRunner, simplified to what the proxier needs.

- `request()` asks for a sync soon; requests arriving while one is pending coalesce into one.
- Two syncs start at least `min_interval` apart (--iptables-min-sync-period; 0 allowed).
- A sync happens at least every `max_interval` even without requests (--iptables-sync-period);
  the function is told whether this run is such a periodic one.
- A failed run is retried after `retry_interval`.

The clock and the wait are injected, so tests drive time by hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

logger = structlog.get_logger("pyproxy.runner")


class BoundedFrequencyRunner:
    def __init__(
        self,
        fn: Callable[[bool], None],
        *,
        min_interval: float,
        max_interval: float,
        retry_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_interval = retry_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._requested = False
        self._stopped = False
        self._last_run = -float("inf")
        self._next_periodic = clock() + max_interval
        self._retry_at: float | None = None
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        with self._cond:
            self._requested = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop, name="sync-runner", daemon=True)
        self._thread.start()

    def _due(self, now: float) -> tuple[bool, bool, float]:
        """(run now?, periodic?, seconds to wait otherwise)."""
        earliest = self._last_run + self.min_interval
        periodic = now >= self._next_periodic
        wanted = (
            self._requested or periodic or (self._retry_at is not None and now >= self._retry_at)
        )
        if wanted and now >= earliest:
            return True, periodic, 0.0
        wake = self._next_periodic
        if self._retry_at is not None:
            wake = min(wake, self._retry_at)
        if wanted:
            wake = earliest
        return False, periodic, max(0.0, wake - now)

    def step(self) -> float | None:
        """Run once if due; returns how long to wait before the next step (None: stopped)."""
        with self._cond:
            if self._stopped:
                return None
            now = self._clock()
            run, periodic, wait = self._due(now)
            if not run:
                return wait
            self._requested = False
            self._retry_at = None
            self._last_run = now
            if periodic:
                self._next_periodic = now + self.max_interval
        try:
            self._fn(periodic)
        except Exception:
            logger.exception("sync failed; will retry", retry_in_s=self.retry_interval)
            with self._cond:
                self._retry_at = self._clock() + self.retry_interval
        return 0.0

    def loop(self) -> None:
        while self.step() is not None:
            with self._cond:
                if self._stopped:
                    return
                # Re-check under the lock: a request may have come in while the sync ran.
                run, _, wait = self._due(self._clock())
                if not run:
                    self._cond.wait(timeout=wait)
