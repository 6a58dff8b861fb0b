"""An upstream's first-token latencies feeding its breaker's SLOW state.

One ``Health`` per upstream, next to its breaker, on the event loop. The race executor reports
each timed cloud attempt with ``observe``; the planner's ``slow_verdict`` decides, and this
module only applies the verdict to the breaker (so the decision stays a pure function).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from server.breaker import BreakerState, CircuitBreaker
from server.config import HedgePolicy, SlowPolicy
from server.failover.latency import Observation, UpstreamLatency
from server.failover.planner import first_token_deadline, slow_verdict


#: Deadlines and the baseline median are recomputed at most this often (seconds): a pass-through
#: request must not pay for sorting hundreds of observations.
REFRESH_S = 1.0


class Health:
    def __init__(self, breaker: CircuitBreaker, policy: SlowPolicy, clock: Callable[[], float]) -> None:
        self.breaker = breaker
        self.policy = policy
        self.latency = UpstreamLatency(policy.window_s)
        self._clock = clock
        self._state = breaker.state
        self._deadlines: dict[tuple[str, bool], tuple[float, HedgePolicy, float]] = {}
        self._baseline: tuple[float, float | None] = (float("-inf"), None)

    def deadline(self, hedge: HedgePolicy, workload: str, streamed: bool) -> float:
        now = self._clock()
        key = (workload, streamed)
        cached = self._deadlines.get(key)
        if cached is not None and now - cached[0] < REFRESH_S and cached[1] is hedge:
            return cached[2]
        value = first_token_deadline(hedge, self.latency.window(workload, streamed).values(now, censored=False))
        self._deadlines[key] = (now, hedge, value)
        return value

    def baseline_median(self, now: float) -> float | None:
        """The median of the normal observations of the last hour (None with fewer than
        ``min_samples``); cached for ``REFRESH_S``."""
        at, median = self._baseline
        if now - at >= REFRESH_S:
            values = self.latency.baseline.values(now, censored=False)
            median = statistics.median(values) if len(values) >= self.policy.min_samples else None
            self._baseline = (now, median)
        return median

    def observe(self, workload: str | None, streamed: bool, seconds: float, censored: bool, trial: bool) -> None:
        """A cloud attempt's first-token latency (``censored``: it lost the race at ``seconds``)."""
        now = self._clock()
        state = self.breaker.state
        if state is not self._state:  # judged afresh after any transition
            self.latency.reset_recent()
            self._state = state
        self.latency.record(workload, streamed, Observation(now, seconds, censored), normal=state is BreakerState.CLOSED)
        recent = self.latency.recent.last(self.policy.min_samples, now)
        verdict = slow_verdict(self.policy, recent, self.baseline_median(now))
        if state is BreakerState.CLOSED and verdict.slow:
            self.breaker.enter_slow(verdict.why())
        elif state is BreakerState.SLOW:
            if trial and not censored and seconds <= verdict.threshold_s:
                self.breaker.leave_slow(f"trial's first token in {seconds:.2f} s (threshold {verdict.threshold_s:.2f} s)")
            elif verdict.samples >= self.policy.min_samples and not verdict.slow:
                self.breaker.leave_slow(verdict.why())
        if self.breaker.state is not state:
            self.latency.reset_recent()
            self._state = self.breaker.state
