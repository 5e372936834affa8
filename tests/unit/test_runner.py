"""BoundedFrequencyRunner driven by a hand-moved clock: coalescing, min and max interval, retry.

The pacing is upstream 1.34's (bounded_frequency_runner.go): the min interval and the next
periodic or retry run are counted from the *end* of a run, so the clock is moved inside the
work function where a test cares how long a sync took.
"""

from __future__ import annotations

import threading

import pytest

from pyproxy.runner import BoundedFrequencyRunner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    min_interval: float = 1.0,
    max_interval: float = 30.0,
    retry_interval: float = 5.0,
    fail: int = 0,
    takes: float = 0.0,
) -> tuple[BoundedFrequencyRunner, Clock, list[tuple[float, bool]]]:
    """A runner whose work function records (start time, periodic), takes `takes` seconds of
    the fake clock and fails the first `fail` times."""
    clock = Clock()
    calls: list[tuple[float, bool]] = []
    failures = [fail]

    def fn(periodic: bool) -> None:
        calls.append((clock.now, periodic))
        clock.now += takes
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("boom")

    runner = BoundedFrequencyRunner(
        fn,
        min_interval=min_interval,
        max_interval=max_interval,
        retry_interval=retry_interval,
        clock=clock,
    )
    return runner, clock, calls


def test_requests_coalesce_and_respect_min_interval() -> None:
    runner, clock, calls = make()
    runner.request()
    runner.request()
    assert runner.step() == pytest.approx(1.0) and len(calls) == 1
    runner.request()
    wait = runner.step()
    assert len(calls) == 1 and wait == pytest.approx(1.0)
    clock.now += 1.0
    runner.step()
    assert len(calls) == 2 and calls[1] == (1001.0, False)
    # Nothing asked for since: after the quiet second, the next run is the periodic one.
    clock.now += 1.0
    assert runner.step() == pytest.approx(29.0)


def test_min_interval_counts_from_the_end_of_a_slow_sync() -> None:
    runner, clock, calls = make(min_interval=1.0, takes=5.0)
    runner.request()
    runner.step()  # runs from 1000 to 1005
    runner.request()  # a change that arrived while it ran
    assert runner.step() == pytest.approx(1.0)  # not at once, though 5 s > min since the start
    clock.now += 0.5
    runner.step()
    assert len(calls) == 1
    clock.now += 0.5
    runner.step()
    assert calls == [(1000.0, False), (1006.0, False)]


def test_request_during_the_sync_is_kept_for_the_next_run() -> None:
    clock = Clock()
    calls: list[float] = []
    runner: BoundedFrequencyRunner

    def fn(_periodic: bool) -> None:
        calls.append(clock.now)
        if len(calls) == 1:
            runner.request()  # an event handler, while the sync takes its changes
        clock.now += 2.0

    runner = BoundedFrequencyRunner(
        fn, min_interval=0.0, max_interval=30.0, retry_interval=30.0, clock=clock
    )
    runner.request()
    assert runner.step() == 0.0
    runner.step()
    assert calls == [1000.0, 1002.0]
    assert runner.step() == pytest.approx(30.0)


def test_zero_min_interval_runs_every_request() -> None:
    runner, _clock, calls = make(min_interval=0.0)
    for _ in range(3):
        runner.request()
        runner.step()
    assert len(calls) == 3


def test_periodic_run_without_requests_counts_from_the_end_of_the_last_run() -> None:
    runner, clock, calls = make(takes=2.0)
    assert runner.step() == pytest.approx(30.0)
    clock.now += 30.0
    assert runner.step() == pytest.approx(1.0)  # the min interval, from the end (1032)
    assert calls == [(1030.0, True)]
    clock.now += 29.0  # 31 s after the periodic run started, 29 s after it ended
    runner.step()
    assert len(calls) == 1
    clock.now += 1.0
    runner.step()
    assert calls == [(1030.0, True), (1062.0, True)]


def test_failure_is_retried_after_the_retry_interval_from_its_end() -> None:
    runner, clock, calls = make(fail=1, retry_interval=30.0, max_interval=3600.0, takes=4.0)
    runner.request()
    runner.step()  # fails at 1004
    clock.now += 29.0
    assert runner.step() == pytest.approx(1.0)
    assert len(calls) == 1
    clock.now += 1.0
    runner.step()
    # The retry is not the periodic run: it is not told periodic=True.
    assert calls == [(1000.0, False), (1034.0, False)]
    # It succeeded (at 1038): no more retries, the next run is the periodic one.
    clock.now += 1.0
    assert runner.step() == pytest.approx(3599.0)


def test_a_request_runs_a_failed_sync_again_before_the_retry_is_due() -> None:
    runner, clock, calls = make(fail=1, retry_interval=30.0)
    runner.request()
    runner.step()
    runner.request()
    clock.now += 1.0
    runner.step()
    assert [t for t, _ in calls] == [1000.0, 1001.0]
    clock.now += 1.0
    assert runner.step() == pytest.approx(29.0)  # periodic, no retry left


def test_retry_never_waits_longer_than_the_max_interval() -> None:
    runner, clock, calls = make(fail=1, retry_interval=60.0, max_interval=10.0)
    runner.request()
    runner.step()
    clock.now += 1.0
    assert runner.step() == pytest.approx(9.0)
    clock.now += 9.0
    runner.step()
    assert len(calls) == 2


def test_min_interval_holds_back_a_due_retry() -> None:
    runner, clock, calls = make(fail=1, min_interval=10.0, retry_interval=2.0, max_interval=60.0)
    runner.request()
    assert runner.step() == pytest.approx(10.0)
    clock.now += 2.0
    runner.step()
    assert len(calls) == 1
    clock.now += 8.0
    runner.step()
    assert len(calls) == 2


def test_thread_loop_reacts_to_requests_and_stops() -> None:
    done = threading.Event()
    runner = BoundedFrequencyRunner(
        lambda _p: done.set(), min_interval=0.0, max_interval=3600.0, retry_interval=1.0
    )
    runner.start()
    runner.request()
    assert done.wait(5)
    runner.stop()
    # stop() wakes the waiting loop and joins it (no wall-clock threshold: it must end at all).
    assert runner._thread is not None and not runner._thread.is_alive()
