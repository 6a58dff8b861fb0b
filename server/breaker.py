"""Circuit breaker, one per upstream. Pure: the clock and the random source are injected.

States (``BreakerState``)::

    CLOSED ──(N consecutive failures, or failure rate ≥ r over the window with ≥ m calls)──▶ OPEN
    OPEN ──(open time elapsed, or the prober saw the upstream answer)──▶ HALF_OPEN
    HALF_OPEN ──(the single trial succeeds)──▶ CLOSED
    HALF_OPEN ──(the trial fails)──▶ OPEN, for longer
    CLOSED ──(enter_slow: first tokens far slower than usual)──▶ SLOW
    SLOW ──(leave_slow: a trial or the recent calls are fast again)──▶ CLOSED
    SLOW ──(failures, as in CLOSED)──▶ OPEN
    any ──(429 with Retry-After)──▶ OPEN until at least now + Retry-After (a second 429 extends it)

- Failures are transport errors, timeouts and 5xx. A 4xx is a success as far as the breaker is
  concerned: the upstream is up and answered (a 4xx never trips it).
- Open time grows with consecutive trips: ``open_base_s × 2^(trips-1)``, ±``jitter``, capped at
  ``open_max_s``; it resets when the breaker closes.
- HALF_OPEN lets exactly one trial through (``try_acquire`` returns True once); the trial's
  owner must report ``on_success``, ``on_failure`` or ``on_abandon``.
- SLOW (the upstream answers, but its first tokens come far later than its own baseline: the
  verdict is ``server.failover.planner.slow_verdict``): covered workloads answer locally first;
  ``try_acquire`` hands out one trial at a time, at most one per ``trial_interval_s``, which
  the router sends to the cloud with a deadline (hedged), and whose first token decides
  whether the upstream is back to normal. Uncovered workloads keep using the cloud.

Called from the event loop only (router and prober); no locks, nothing held across an await.
Every transition calls ``listener(old, new, reason)`` (the journal records them).
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    SLOW = "slow"


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    failure_rate: float = 0.5
    window_s: float = 30.0
    min_calls: int = 10
    open_base_s: float = 5.0
    open_max_s: float = 300.0
    jitter: float = 0.2
    trial_interval_s: float = 1.0
    """SLOW: the least time between two trials (the upstream's ``probe_interval_open_s``)."""


Listener = Callable[[BreakerState, BreakerState, str], None]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._listener = listener
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._calls: deque[tuple[float, bool]] = deque()  # (time, failed) within the window
        self._trips = 0
        self._open_until = 0.0
        self._trial_in_flight = False
        self._hold_until = 0.0  # a 429's Retry-After: no probe may shorten it
        self._last_trial = float("-inf")
        self.forced = False
        """Held open by a drill (``force_open``): nothing but ``release`` moves it."""
        self.last_reason = ""

    # -- queries ---------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        if self.forced:
            return BreakerState.OPEN
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._move(BreakerState.HALF_OPEN, "open time elapsed")
        return self._state

    def open_reason(self) -> str:
        """Why calls are held off: ``drill``, ``rate_limited`` (a 429) or ``circuit_open``."""
        if self.forced:
            return "drill"
        return "rate_limited" if self.last_reason == "rate_limited" else "circuit_open"

    def retry_after(self) -> float:
        """Seconds until the upstream may be tried again (0 when it may be tried now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._open_until - self._clock())
        return 0.0

    # -- commands --------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """May a call go to the upstream now? In HALF_OPEN, True for exactly one caller."""
        if self.forced:
            return False
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        if state is BreakerState.SLOW and not self._trial_in_flight:
            now = self._clock()
            if now - self._last_trial >= self.config.trial_interval_s:
                self._trial_in_flight = True
                self._last_trial = now
                return True
        return False

    def on_success(self) -> None:
        now = self._clock()
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            self._trips = 0
            self._consecutive = 0
            self._calls.clear()
            self._move(BreakerState.CLOSED, "trial succeeded")
        elif self._state in (BreakerState.CLOSED, BreakerState.SLOW):
            self._trial_in_flight = False
            self._consecutive = 0
            self._record(now, failed=False)

    def on_failure(self, reason: str) -> None:
        now = self._clock()
        self.last_reason = reason
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            self._trip(now, f"trial failed: {reason}")
        elif self._state in (BreakerState.CLOSED, BreakerState.SLOW):
            self._trial_in_flight = False
            self._consecutive += 1
            self._record(now, failed=True)
            failures = sum(1 for _, failed in self._calls if failed)
            if self._consecutive >= self.config.failure_threshold:
                self._trip(now, f"{self._consecutive} consecutive failures ({reason})")
            elif len(self._calls) >= self.config.min_calls and failures / len(self._calls) >= self.config.failure_rate:
                self._trip(now, f"{failures}/{len(self._calls)} calls failed in {self.config.window_s:g} s ({reason})")
        # OPEN: a late failure of a call started before the breaker opened changes nothing

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429: stay away for the Retry-After it carries (or the base open time)."""
        now = self._clock()
        wait = retry_after if retry_after is not None and retry_after > 0 else self.config.open_base_s
        self.last_reason = "rate_limited"
        self._trial_in_flight = False
        until = max(self._open_until if self._state is BreakerState.OPEN else 0.0, now + wait)
        self._open_until = until
        self._hold_until = until
        if self._state is not BreakerState.OPEN:
            self._move(BreakerState.OPEN, f"rate limited for {wait:g} s")

    def on_abandon(self) -> None:
        """The caller gave up without an answer (client gone, or the local answer won the race):
        neither a success nor a failure; let another trial through."""
        self._trial_in_flight = False

    def force_open(self, why: str, until: float) -> None:
        """A drill: open now, exactly as in a real outage, until ``release`` (probes, timers and
        late answers change nothing meanwhile). ``until`` is the drill's end (for Retry-After)."""
        self.forced = True
        self._open_until = until
        self._trial_in_flight = False
        self._state_before_drill = self._state
        self._state = BreakerState.OPEN
        if self._listener is not None:
            self._listener(self._state_before_drill, BreakerState.OPEN, why)

    def release(self, why: str) -> None:
        """End a drill: closed again with a clean record (a cloud that really failed meanwhile
        reopens it within ``failure_threshold`` calls or probes)."""
        if not self.forced:
            return
        self.forced = False
        self._consecutive = 0
        self._calls.clear()
        self._trips = 0
        self._state = BreakerState.OPEN
        self._move(BreakerState.CLOSED, why)

    def enter_slow(self, why: str) -> None:
        """CLOSED → SLOW (the planner's slow verdict)."""
        if self._state is BreakerState.CLOSED:
            self.last_reason = "slow_upstream"
            self._trial_in_flight = False
            self._last_trial = self._clock()  # the first trial comes one interval later
            self._move(BreakerState.SLOW, why)

    def leave_slow(self, why: str) -> None:
        """SLOW → CLOSED: a trial's first token (or the recent calls) came fast again."""
        if self._state is BreakerState.SLOW:
            self._trial_in_flight = False
            self._move(BreakerState.CLOSED, why)

    def on_probe_ok(self) -> None:
        """The active prober reached the upstream while OPEN: try it now instead of waiting
        (not before a 429's Retry-After has passed: the upstream asked us to stay away)."""
        if self.forced:
            return
        if self._state is BreakerState.OPEN and self._clock() >= self._hold_until:
            self._open_until = self._clock()
            self._move(BreakerState.HALF_OPEN, "probe succeeded")

    # -- internals -------------------------------------------------------------------------------
    def _record(self, now: float, failed: bool) -> None:
        calls = self._calls
        calls.append((now, failed))
        horizon = now - self.config.window_s
        while calls and calls[0][0] < horizon:
            calls.popleft()

    def _trip(self, now: float, why: str) -> None:
        self._trips += 1
        base = self.config.open_base_s * (2 ** (self._trips - 1))
        jitter = 1.0 + self.config.jitter * (2 * self._rng.random() - 1)
        self._open_until = now + min(self.config.open_max_s, base * jitter)
        self._consecutive = 0
        self._calls.clear()
        self._move(BreakerState.OPEN, why)

    def _move(self, new: BreakerState, why: str) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        if self._listener is not None:
            self._listener(old, new, why)
