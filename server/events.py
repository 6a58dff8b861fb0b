"""Typed events, published once, consumed by every sink (the journal, metrics, the request log).

The router, the breakers, shadow mode, drills and the edge publish through one ``EventBus``
(``record_route``, ``record_breaker``...: each builds one frozen event and hands it to every
sink in order). Sinks: ``server.journal.Journal.consume`` (SQLite, in its own thread),
``server.metrics.Metrics.consume`` (Prometheus counters and histograms) and
``server.logs.request_log`` (one structured line per request). A sink that raises is logged
and skipped: a metrics bug never fails a request.

No event carries request or answer text: identifiers, labels, numbers and reason codes only.
Publishers call from the event-loop thread, except breaker transitions, which may come from
the prober task (same thread) or a drill (same thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("understudy.events")


@dataclass(frozen=True)
class RouteDone:
    """A request answered (or refused): who answered, how fast, how many tokens."""

    request_id: str
    endpoint: str
    workload: str | None
    upstream: str | None
    route: str
    model: str | None
    reason: str | None
    status: int
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    detail: str | None = None
    provenance: str | None = None
    key_id: str | None = None
    ttft_ms: float | None = None
    """Time to the first content token (streams); None when not measured."""
    itl_ms: float | None = None
    """Mean time between tokens of this answer (local streams)."""
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class BreakerChanged:
    upstream: str
    old: str
    new: str
    why: str
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DrillFinished:
    drill_id: str
    verdict: str
    requests: int
    local: int
    failed: int
    detail: str
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ShadowCompared:
    workload: str
    model: str | None
    outcome: str
    numbers: str
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AdminAction:
    """Something an operator did: a drill started or aborted, keys reloaded, a drain begun."""

    action: str
    key_id: str | None
    detail: str
    ts: float = field(default_factory=time.time)


Event = RouteDone | BreakerChanged | DrillFinished | ShadowCompared | AdminAction


class EventBus:
    def __init__(self, sinks: list[Callable[[Event], None]] | None = None) -> None:
        self.sinks: list[Callable[[Event], None]] = list(sinks or [])

    def publish(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # noqa: BLE001 - a sink's bug must not fail the request that published
                log.exception("event sink %s failed on %s", getattr(sink, "__qualname__", sink), type(event).__name__)

    # The publishers' vocabulary: one method per event.
    def record_route(self, **fields: object) -> None:
        self.publish(RouteDone(**fields))  # type: ignore[arg-type]

    def record_breaker(self, upstream: str, old: str, new: str, why: str) -> None:
        self.publish(BreakerChanged(upstream, old, new, why))

    def record_drill(self, drill_id: str, verdict: str, requests: int, local: int, failed: int, detail: str) -> None:
        self.publish(DrillFinished(drill_id, verdict, requests, local, failed, detail))

    def record_shadow(self, workload: str, model: str | None, outcome: str, numbers: str) -> None:
        self.publish(ShadowCompared(workload, model, outcome, numbers))

    def record_admin(self, action: str, key_id: str | None, detail: str = "") -> None:
        self.publish(AdminAction(action, key_id, detail))
