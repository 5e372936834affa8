"""When to sync: upstream's BoundedFrequencyRunner (pkg/proxy/runner, 1.34), with its pacing.

- `request()` asks for a sync soon; requests arriving while one is pending, or while a sync
  runs, coalesce into one.
- After a sync *ends*, nothing runs for `min_interval` (--iptables-min-sync-period; 0 allowed):
  a sync that takes longer than the interval is not followed by another at once, so a busy
  node gets breathing room between syncs instead of syncing back to back.
- A sync happens at least every `max_interval` without requests, counted from the end of the
  last one; `fn` is told whether this run is such a periodic one.
- A failed run (fn raised) is run again `retry_interval` after it ended (at most
  `max_interval`), unless a request or the periodic timer runs it sooner. The controller
  passes the sync period, as upstream's proxiers do.

The clock is injected and `step()` does one turn of the loop, so tests drive time by hand.
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
        #: The end of the last run plus min_interval: nothing runs before (upstream's
        #: minIntervalTimer, which the loop waits out after every run).
        self._quiet_until = -float("inf")
        #: When the next run is due without a request (upstream's nextRunTimer), and whether
        #: that run is a retry of a failed one rather than the periodic one.
        self._next_run = clock() + max_interval
        self._next_is_retry = False
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
        if now < self._quiet_until:
            return False, False, self._quiet_until - now
        timer = now >= self._next_run
        if self._requested or timer:
            return True, timer and not self._next_is_retry, 0.0
        return False, False, self._next_run - now

    def step(self) -> float | None:
        """Run once if due; returns how long to wait before the next step (None: stopped)."""
        with self._cond:
            if self._stopped:
                return None
            run, periodic, wait = self._due(self._clock())
            if not run:
                return wait
            # Requests that arrive while fn runs are kept for the run after this one.
            self._requested = False
        failed = False
        try:
            self._fn(periodic)
        except Exception:
            failed = True
            logger.exception(
                "sync failed; will retry",
                retry_in_s=min(self.retry_interval, self.max_interval),
            )
        with self._cond:
            ended = self._clock()
            # As upstream: both timers restart when the run ends, not when it started.
            self._quiet_until = ended + self.min_interval
            interval = min(self.retry_interval, self.max_interval) if failed else self.max_interval
            self._next_run = ended + interval
            self._next_is_retry = failed
            return self._due(ended)[2]

    def loop(self) -> None:
        while self.step() is not None:
            with self._cond:
                if self._stopped:
                    return
                # Re-check under the lock: a request may have come in while the sync ran.
                run, _, wait = self._due(self._clock())
                if not run:
                    self._cond.wait(timeout=wait)
