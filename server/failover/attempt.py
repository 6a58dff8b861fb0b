"""One cloud attempt's end, reported to its upstream's breaker exactly once.

Every attempt ends as one of: a **success** (the cloud answered, a 4xx included: the upstream
is up), a **failure** (connect error, timeout, 5xx, a broken first event; a 429 holds traffic
off for its Retry-After), or **abandoned** (the client went away, or the local answer won the
race first): neither, so a slow cloud that loses races is judged by its latency
(``server.failover.health``), never counted as failing. The router calls one of the three;
whatever comes later is ignored, and ``abandon`` in a ``finally`` closes any path left open.
"""

from __future__ import annotations

from server.breaker import CircuitBreaker
from server.upstream import UpstreamError, UpstreamRateLimited, UpstreamRejected


class Attempt:
    __slots__ = ("_breaker", "outcome")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self.outcome: str | None = None

    def succeeded(self) -> None:
        if self.outcome is None:
            self.outcome = "success"
            self._breaker.on_success()

    def failed(self, exc: UpstreamError) -> None:
        if self.outcome is not None:
            return
        if isinstance(exc, UpstreamRejected):
            self.succeeded()
            return
        self.outcome = "failure"
        if isinstance(exc, UpstreamRateLimited):
            self._breaker.on_rate_limited(exc.retry_after)
        else:
            self._breaker.on_failure(exc.reason)

    def abandon(self) -> None:
        if self.outcome is None:
            self.outcome = "abandoned"
            self._breaker.on_abandon()
