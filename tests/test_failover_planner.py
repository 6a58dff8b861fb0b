"""The failover planner, the latency windows and the breaker's SLOW state: pure, with made-up inputs
and a fake clock (no server, no model)."""

from __future__ import annotations

import pytest

from server.breaker import BreakerConfig, BreakerState, CircuitBreaker
from server.config import HedgePolicy, SlowPolicy
from server.failover.health import Health
from server.failover.latency import Observation, Window, percentile
from server.failover.planner import (
    MIN_SAMPLES,
    First,
    LocalLoad,
    choose,
    first_token_deadline,
    hedge_limit,
    may_hedge,
    slow_verdict,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 95) == 95.0 and percentile(values, 50) == 50.0 and percentile([3.0], 95) == 3.0


def test_auto_deadline_is_max_until_enough_samples_then_p95_times_margin_clamped() -> None:
    policy = HedgePolicy(min_s=2.0, max_s=3.5, margin=1.5)
    assert first_token_deadline(policy, []) == 3.5  # cold start: the very first request is covered too
    assert first_token_deadline(policy, [0.1] * (MIN_SAMPLES - 1)) == 3.5
    assert first_token_deadline(policy, [0.1] * MIN_SAMPLES) == 2.0  # a fast cloud: clamped up to the minimum
    assert first_token_deadline(policy, [2.0] * 19 + [9.0]) == 3.0  # p95 = 2.0 (one outlier in 20) x 1.5
    assert first_token_deadline(policy, [4.0] * 20) == 3.5  # a slow cloud never teaches it to wait longer than max


def test_fixed_deadline_is_used_as_given() -> None:
    assert first_token_deadline(HedgePolicy(deadline_s=0.7), [9.0] * 50) == 0.7


def test_hedge_budget_counts_slots_and_never_hedges_onto_a_queue() -> None:
    policy = HedgePolicy(budget=0.2)
    assert hedge_limit(policy, 8) == 1 and hedge_limit(policy, 16) == 3 and hedge_limit(policy, 2) == 1
    assert may_hedge(policy, LocalLoad(slots=8, waiting=0, hedges=0))
    assert not may_hedge(policy, LocalLoad(slots=8, waiting=0, hedges=1))  # budget exhausted
    assert not may_hedge(policy, LocalLoad(slots=8, waiting=1, hedges=0))  # real work already waits


def test_slow_verdict_against_baseline_floor_and_cold_start() -> None:
    policy = SlowPolicy(multiple=3.0, min_samples=3, floor_s=1.0, cold_s=3.0)
    assert not slow_verdict(policy, [1.6, 1.6], 0.5).slow  # too few samples
    assert slow_verdict(policy, [1.6, 1.6, 1.6], 0.5).slow  # 1.6 > 3 x 0.5
    assert slow_verdict(policy, [0.4, 1.6, 1.7], 0.5).slow  # two slow calls of the last three
    assert not slow_verdict(policy, [1.4, 1.4, 1.4], 0.5).slow
    assert not slow_verdict(policy, [0.5, 0.6, 0.9], 0.1).slow  # 3 x 0.1 = 0.3, but under the 1 s floor
    verdict = slow_verdict(policy, [3.5, 3.6, 3.6], None)
    assert verdict.slow and verdict.threshold_s == 3.0  # no baseline yet: the cold threshold
    assert not slow_verdict(policy, [2.0, 2.0, 2.0], None).slow


@pytest.mark.parametrize("covered", [True, False])
def test_choose_for_each_breaker_state(covered: bool) -> None:
    assert choose(covered, BreakerState.CLOSED, True, "circuit_open").first is First.CLOUD
    open_ = choose(covered, BreakerState.OPEN, False, "circuit_open")
    assert open_.first is (First.LOCAL if covered else First.REFUSE) and open_.reason == "circuit_open"
    assert choose(covered, BreakerState.OPEN, False, "rate_limited").reason == "rate_limited"
    trial = choose(covered, BreakerState.HALF_OPEN, True, "circuit_open")
    assert trial.first is First.CLOUD and trial.trial
    slow = choose(covered, BreakerState.SLOW, False, "circuit_open")
    if covered:
        assert slow.first is First.LOCAL and slow.reason == "slow_upstream"
        assert choose(covered, BreakerState.SLOW, True, "circuit_open").trial
    else:
        assert slow.first is First.CLOUD and not slow.trial  # uncovered: still the cloud, its own timeouts


def test_window_drops_old_and_excess_observations() -> None:
    w = Window(horizon_s=10.0, max_samples=3)
    for t in range(5):
        w.add(Observation(at=float(t), seconds=float(t)))
    assert w.values(4.0) == [2.0, 3.0, 4.0]
    assert w.values(13.5) == [4.0]
    w.add(Observation(at=14.0, seconds=9.0, censored=True))
    assert w.values(14.0, censored=False) == [4.0] and w.values(14.0) == [4.0, 9.0]
    assert w.last(1, 14.0) == [9.0] and w.last(5, 14.0) == [4.0, 9.0] and w.last(5, 20.0) == [9.0]


def test_breaker_slow_state_entry_trials_and_exit() -> None:
    clock = Clock()
    moves: list[tuple[str, str]] = []
    breaker = CircuitBreaker("cloud", BreakerConfig(trial_interval_s=1.0), clock,
                             listener=lambda old, new, why: moves.append((old.value, new.value)))
    health = Health(breaker, SlowPolicy(multiple=3.0, window_s=30.0, min_samples=3, floor_s=1.0, cold_s=3.0), clock)
    for _ in range(10):  # a normal cloud: first token in 0.4 s
        clock.now += 1
        health.observe("triage", True, 0.4, censored=False, trial=False)
    assert breaker.state is BreakerState.CLOSED
    clock.now += 1
    health.observe("triage", True, 2.1, censored=True, trial=False)  # a race lost at about 2.1 s
    assert breaker.state is BreakerState.CLOSED  # one slow call out of the last three is not a verdict
    clock.now += 1
    health.observe("triage", True, 2.1, censored=True, trial=False)
    assert breaker.state is BreakerState.SLOW and moves[-1] == ("closed", "slow")
    assert breaker.last_reason == "slow_upstream"
    assert not breaker.try_acquire()  # the first trial waits one interval
    clock.now += 1.0
    assert breaker.try_acquire() and not breaker.try_acquire()  # one trial at a time
    breaker.on_abandon()  # the trial lost its race: still slow
    health.observe("triage", True, 2.2, censored=True, trial=True)
    assert breaker.state is BreakerState.SLOW
    assert not breaker.try_acquire()  # and the next one only after another interval
    clock.now += 1.0
    assert breaker.try_acquire()
    health.observe("triage", True, 0.5, censored=False, trial=True)  # the cloud is fast again
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED and moves[-1] == ("slow", "closed")


def test_slow_upstream_that_fails_opens_like_a_closed_one() -> None:
    clock = Clock()
    breaker = CircuitBreaker("cloud", BreakerConfig(failure_threshold=2), clock)
    breaker.enter_slow("test")
    breaker.on_failure("timeout")
    breaker.on_failure("timeout")
    assert breaker.state is BreakerState.OPEN
