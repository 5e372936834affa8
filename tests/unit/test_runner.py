"""BoundedFrequencyRunner driven by a hand-moved clock: coalescing, min and max interval, retry."""

from __future__ import annotations

import threading
import time

import pytest

from pyproxy.runner import BoundedFrequencyRunner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(min_interval: float = 1.0, max_interval: float = 30.0, fail: int = 0):
    clock = Clock()
    calls: list[tuple[float, bool]] = []
    failures = [fail]

    def fn(periodic: bool) -> None:
        calls.append((clock.now, periodic))
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("boom")

    runner = BoundedFrequencyRunner(
        fn, min_interval=min_interval, max_interval=max_interval, retry_interval=5.0, clock=clock
    )
    return runner, clock, calls


def test_requests_coalesce_and_respect_min_interval() -> None:
    runner, clock, calls = make()
    runner.request()
    runner.request()
    assert runner.step() == 0.0 and len(calls) == 1
    runner.request()
    wait = runner.step()
    assert len(calls) == 1 and wait == pytest.approx(1.0)
    clock.now += 1.0
    runner.step()
    assert len(calls) == 2 and calls[1] == (1001.0, False)


def test_zero_min_interval_runs_every_request() -> None:
    runner, _clock, calls = make(min_interval=0.0)
    for _ in range(3):
        runner.request()
        runner.step()
    assert len(calls) == 3


def test_periodic_run_without_requests() -> None:
    runner, clock, calls = make()
    assert runner.step() == pytest.approx(30.0)
    clock.now += 30.0
    runner.step()
    assert calls == [(1030.0, True)]


def test_failure_is_retried() -> None:
    runner, clock, calls = make(fail=1)
    runner.request()
    runner.step()
    assert len(calls) == 1
    assert runner.step() == pytest.approx(5.0)
    clock.now += 5.0
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
    started = time.monotonic()
    runner.stop()
    assert time.monotonic() - started < 2
