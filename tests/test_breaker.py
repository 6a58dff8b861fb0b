"""Circuit breaker transitions, driven by a fake clock (no sleeping, no network)."""

from __future__ import annotations

import random

from server.breaker import BreakerConfig, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make(**kw: float) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock = Clock()
    events: list[tuple[str, str]] = []
    config = BreakerConfig(**{"jitter": 0.0, **kw})  # type: ignore[arg-type]
    b = CircuitBreaker("cloud", config, clock, random.Random(7), lambda old, new, why: events.append((old.value, new.value)))
    return b, clock, events


def test_opens_after_n_consecutive_failures_and_not_before() -> None:
    b, _, events = make(failure_threshold=3)
    b.on_failure("connect_error")
    b.on_failure("timeout")
    assert b.state is BreakerState.CLOSED and b.try_acquire()
    b.on_failure("upstream_5xx")
    assert b.state is BreakerState.OPEN
    assert not b.try_acquire()
    assert events == [("closed", "open")]


def test_a_success_resets_the_consecutive_count() -> None:
    b, _, _ = make(failure_threshold=3, min_calls=100)
    for _ in range(5):
        b.on_failure("timeout")
        b.on_failure("timeout")
        b.on_success()
    assert b.state is BreakerState.CLOSED


def test_failure_rate_over_the_window_with_a_minimum_count() -> None:
    b, clock, _ = make(failure_threshold=100, failure_rate=0.5, window_s=10, min_calls=6)
    for _ in range(2):
        b.on_success()
        b.on_failure("upstream_5xx")
    assert b.state is BreakerState.CLOSED  # 2/4 failed but fewer than 6 calls
    b.on_success()
    b.on_failure("upstream_5xx")
    assert b.state is BreakerState.OPEN  # 3/6
    b2, clock2, _ = make(failure_threshold=100, failure_rate=0.5, window_s=10, min_calls=6)
    for _ in range(3):
        b2.on_failure("upstream_5xx")
        clock2.advance(6)  # old failures leave the window
        b2.on_success()
        b2.on_success()
    assert b2.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_trial_through() -> None:
    b, clock, _ = make(failure_threshold=1, open_base_s=5)
    b.on_failure("connect_error")
    clock.advance(4.9)
    assert b.state is BreakerState.OPEN and not b.try_acquire()
    clock.advance(0.2)
    assert b.state is BreakerState.HALF_OPEN
    granted = [b.try_acquire() for _ in range(10)]
    assert granted.count(True) == 1 and granted[0] is True
    b.on_success()
    assert b.state is BreakerState.CLOSED
    assert all(b.try_acquire() for _ in range(5))


def test_abandoned_trial_lets_the_next_one_through() -> None:
    b, clock, _ = make(failure_threshold=1, open_base_s=1)
    b.on_failure("timeout")
    clock.advance(1.5)
    assert b.try_acquire() and not b.try_acquire()
    b.on_abandon()
    assert b.try_acquire()


def test_failed_trial_reopens_for_longer_each_time_capped() -> None:
    b, clock, _ = make(failure_threshold=1, open_base_s=2, open_max_s=10)
    b.on_failure("connect_error")
    waits = []
    for _ in range(5):
        waits.append(round(b.retry_after(), 6))
        clock.advance(b.retry_after())
        assert b.try_acquire()
        b.on_failure("connect_error")
    assert waits == [2, 4, 8, 10, 10]
    clock.advance(b.retry_after())
    assert b.try_acquire()
    b.on_success()
    b.on_failure("connect_error")
    assert round(b.retry_after(), 6) == 2  # back to the base after closing


def test_open_time_is_jittered_within_bounds() -> None:
    seen = set()
    for seed in range(20):
        clock = Clock()
        b = CircuitBreaker("c", BreakerConfig(failure_threshold=1, open_base_s=10, jitter=0.2), clock, random.Random(seed))
        b.on_failure("timeout")
        wait = b.retry_after()
        assert 8.0 <= wait <= 12.0
        seen.add(round(wait, 3))
    assert len(seen) > 5


def test_4xx_never_trips_it() -> None:
    b, _, _ = make(failure_threshold=2, min_calls=2)
    for _ in range(50):
        b.on_success()  # the router reports a 4xx answer as a success: the upstream is up
    assert b.state is BreakerState.CLOSED


def test_429_opens_for_retry_after_and_a_second_429_extends_it() -> None:
    b, clock, events = make(failure_threshold=100)
    b.on_rate_limited(20)
    assert b.state is BreakerState.OPEN and round(b.retry_after()) == 20
    clock.advance(15)
    b.on_rate_limited(20)
    assert round(b.retry_after()) == 20  # until t+35, not t+20
    clock.advance(19)
    assert b.state is BreakerState.OPEN
    clock.advance(1.5)
    assert b.state is BreakerState.HALF_OPEN
    b.on_rate_limited(3)  # the trial was rate limited again
    assert b.state is BreakerState.OPEN and round(b.retry_after()) == 3
    assert events[:2] == [("closed", "open"), ("open", "half_open")]


def test_429_without_retry_after_uses_the_base_open_time() -> None:
    b, _, _ = make(open_base_s=7)
    b.on_rate_limited(None)
    assert round(b.retry_after()) == 7


def test_probe_success_moves_open_to_half_open_early() -> None:
    b, _, events = make(failure_threshold=1, open_base_s=60)
    b.on_failure("connect_error")
    b.on_probe_ok()
    assert b.state is BreakerState.HALF_OPEN
    assert events == [("closed", "open"), ("open", "half_open")]


def test_late_failure_while_open_changes_nothing() -> None:
    b, _, _ = make(failure_threshold=1, open_base_s=5)
    b.on_failure("timeout")
    before = b.retry_after()
    b.on_failure("timeout")
    b.on_success()
    assert b.state is BreakerState.OPEN and b.retry_after() == before


def test_probe_success_does_not_cut_a_429_short() -> None:
    b, clock, _ = make()
    b.on_rate_limited(10)
    b.on_probe_ok()
    assert b.state is BreakerState.OPEN
    clock.advance(10.1)
    assert b.state is BreakerState.HALF_OPEN
