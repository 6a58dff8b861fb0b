"""Active health probes of the upstreams, so an outage is usually known before a user's request
times out, and a recovery is noticed without sending a user's request into a dead cloud.

One asyncio task per upstream (started by ``server.app`` at start-up). Each probe opens a new TCP
connection and sends ``GET /models`` (no tokens spent), with the upstream's connect timeout and
``probe_timeout_s``. Pace: every ``probe_interval_s`` while the breaker is closed and the last
probe succeeded; every ``probe_interval_open_s`` while it is open or half-open, and after a
failed probe. What a probe result does to the breaker:

- CLOSED: a failure counts like a failed request (so three failed probes open it); a success
  changes nothing (only real answers reset the failure count: ``/models`` answering does not
  prove that completions work).
- OPEN: if a probe has failed during this outage (the probes can see it), a success moves the
  breaker to HALF_OPEN at once and the next probe, immediately, is the trial.
- HALF_OPEN: under the same condition, the probe takes the trial if no request holds it:
  success closes, failure reopens for longer. When the probes never saw the outage (completions
  fail while ``/models`` answers), only the open timer and a real request's trial can close it.

``sleep`` is injected so unit tests drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server.breaker import BreakerState
from server.upstream import Upstream

log = logging.getLogger("understudy.prober")


class Prober:
    def __init__(self, upstream: Upstream, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.upstream = upstream
        self._sleep = sleep
        self._last_ok = True
        self._saw_outage = False

    def interval(self) -> float:
        cfg = self.upstream.config
        if self.upstream.breaker.state is BreakerState.CLOSED and self._last_ok:
            return cfg.probe_interval_s
        return cfg.probe_interval_open_s

    async def run(self) -> None:
        while True:
            await self._sleep(self.interval())
            try:
                again = await self.probe_once()
                while again:
                    again = await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop probing
                log.exception("probe of %s failed unexpectedly", self.upstream.name)

    async def probe_once(self) -> bool:
        """One probe; returns True when another one should follow at once (open → half-open)."""
        breaker = self.upstream.breaker
        state = breaker.state
        if state is BreakerState.CLOSED:
            self._saw_outage = False
        elif state is BreakerState.HALF_OPEN and (not self._saw_outage or not breaker.try_acquire()):
            return False  # a user's request will be (or is) the trial
        failure, retry_after = await self.upstream.probe()
        self._last_ok = failure is None
        if failure is not None:
            self._saw_outage = True
        if state is BreakerState.OPEN:
            if failure is None and self._saw_outage:
                breaker.on_probe_ok()
                return True
            return False
        if state is BreakerState.HALF_OPEN:
            if failure is None:
                breaker.on_success()
            else:
                breaker.on_failure(failure)
            return False
        if failure == "rate_limited":
            breaker.on_rate_limited(retry_after)
        elif failure is not None:
            breaker.on_failure(failure)
        return False
