"""Failover decisions as pure functions of their inputs and a time: no I/O, no awaits, no clock.

Called on the event loop by the router (``server.routing``) and the race executor
(``server.failover.race``); unit-tested in ``tests/test_failover_planner.py`` with made-up
inputs.

- ``first_token_deadline``: how long a covered request waits for the cloud's first content token
  before the local answer is started too.
- ``may_hedge``: whether the local side may be started *speculatively* now (the hedge budget).
- ``slow_verdict``: whether an upstream's recent first-token latency makes it *slow*.
- ``choose``: which backend a request goes to first, given its workload and the breaker.
"""

from __future__ import annotations

import enum
import statistics
from dataclasses import dataclass

from server.breaker import BreakerState
from server.config import HedgePolicy, SlowPolicy
from server.failover.latency import percentile

#: An ``auto`` deadline needs this many observations of its (workload, streamed) kind first.
MIN_SAMPLES = 5
#: The percentile of recent first-token latencies that an ``auto`` deadline starts from.
DEADLINE_PERCENTILE = 95


def first_token_deadline(policy: HedgePolicy, samples: list[float]) -> float:
    """Seconds to wait for the cloud's first content token. A fixed ``deadline_s`` is used as it
    is; ``auto`` is p95 × margin clamped to ``[min_s, max_s]``, and ``max_s`` until
    ``MIN_SAMPLES`` observations exist (so the first request after a restart is covered too)."""
    if policy.deadline_s is not None:
        return policy.deadline_s
    if len(samples) < MIN_SAMPLES:
        return policy.max_s
    return min(policy.max_s, max(policy.min_s, percentile(samples, DEADLINE_PERCENTILE) * policy.margin))


@dataclass(frozen=True)
class LocalLoad:
    """What the local model is doing: its slots, the requests waiting for one, and the hedges
    (speculative local answers) running on it now."""

    slots: int
    waiting: int
    hedges: int


def hedge_limit(policy: HedgePolicy, slots: int) -> int:
    return max(1, int(policy.budget * slots))


def may_hedge(policy: HedgePolicy, load: LocalLoad) -> bool:
    """A speculative local start is allowed while the hedges hold less than the budget's share
    of the slots and nothing waits for a slot (a queue means the box is busy with real work)."""
    return load.hedges < hedge_limit(policy, load.slots) and load.waiting == 0


@dataclass(frozen=True)
class SlowVerdict:
    slow: bool
    median_s: float | None
    threshold_s: float
    samples: int

    def why(self) -> str:
        median = "n/a" if self.median_s is None else f"{self.median_s:.2f} s"
        return f"first-token median {median} over {self.samples} calls (threshold {self.threshold_s:.2f} s)"


def slow_verdict(policy: SlowPolicy, recent: list[float], baseline_median: float | None) -> SlowVerdict:
    """Slow when the recent observations (the caller passes the last ``min_samples``; censored
    ones count at their lower bound) are at least ``min_samples`` and their median is above
    ``multiple`` × the baseline median (and above ``floor_s``); without a baseline (None: fewer
    than ``min_samples`` normal observations), above ``cold_s``."""
    if baseline_median is not None:
        threshold = max(policy.floor_s, policy.multiple * baseline_median)
    else:
        threshold = max(policy.floor_s, policy.cold_s)
    if len(recent) < policy.min_samples:
        return SlowVerdict(False, statistics.median(recent) if recent else None, threshold, len(recent))
    median = statistics.median(recent)
    return SlowVerdict(median > threshold, median, threshold, len(recent))


class First(enum.Enum):
    CLOUD = "cloud"
    """Send to the cloud (a covered request also gets a deadline and may be hedged)."""
    LOCAL = "local"
    """Answer locally now (a covered workload whose upstream is open, rate-limited or slow)."""
    REFUSE = "refuse"
    """503: an uncovered workload whose upstream is open."""


@dataclass(frozen=True)
class Choice:
    first: First
    reason: str | None = None
    trial: bool = False
    """This cloud call is the breaker's trial (half-open, or a slow upstream's test request)."""


def choose(covered: bool, state: BreakerState, acquired: bool, open_reason: str) -> Choice:
    """Where a workload request goes first. ``acquired`` is the breaker's answer to
    ``try_acquire()`` (taken by the caller, since it has an effect: it may hand out the trial).

    - closed, or a trial acquired: the cloud;
    - slow: uncovered requests still go to the cloud (they wait for their own timeouts);
      covered ones answer locally, except the one trial that tests the cloud (hedged);
    - open or half-open without the trial: local if covered, else 503, with ``open_reason``
      (``circuit_open``, ``rate_limited``, ``drill``).
    """
    if state is BreakerState.CLOSED:
        return Choice(First.CLOUD)
    if state is BreakerState.SLOW:
        if not covered:
            return Choice(First.CLOUD)
        return Choice(First.CLOUD, trial=True) if acquired else Choice(First.LOCAL, "slow_upstream")
    if acquired:
        return Choice(First.CLOUD, trial=True)
    return Choice(First.LOCAL if covered else First.REFUSE, open_reason)
