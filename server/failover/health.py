"""An upstream's first-token latencies feeding its breaker's SLOW state.

One ``Health`` per upstream, next to its breaker, on the event loop. The race executor reports
each timed cloud attempt with ``observe``; the planner's ``slow_verdict`` decides, and this
module only applies the verdict to the breaker (so the decision stays a pure function).
"""

from __future__ import annotations

from collections.abc import Callable

from server.breaker import BreakerState, CircuitBreaker
from server.config import HedgePolicy, SlowPolicy
from server.failover.latency import Observation, UpstreamLatency
from server.failover.planner import first_token_deadline, slow_verdict


class Health:
    def __init__(self, breaker: CircuitBreaker, policy: SlowPolicy, clock: Callable[[], float]) -> None:
        self.breaker = breaker
        self.policy = policy
        self.latency = UpstreamLatency(policy.window_s)
        self._clock = clock
        self._state = breaker.state

    def deadline(self, hedge: HedgePolicy, workload: str, streamed: bool) -> float:
        return first_token_deadline(hedge, self.latency.window(workload, streamed).values(self._clock(), censored=False))

    def observe(self, workload: str | None, streamed: bool, seconds: float, censored: bool, trial: bool) -> None:
        """A cloud attempt's first-token latency (``censored``: it lost the race at ``seconds``)."""
        now = self._clock()
        state = self.breaker.state
        if state is not self._state:  # judged afresh after any transition
            self.latency.reset_recent()
            self._state = state
        self.latency.record(workload, streamed, Observation(now, seconds, censored), normal=state is BreakerState.CLOSED)
        recent = self.latency.recent.values(now)[-self.policy.min_samples:]
        verdict = slow_verdict(self.policy, recent, self.latency.baseline.values(now, censored=False))
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
